"""Render benchmarks/results/*.json as results/results.md and the README's results section.

    python benchmarks/report.py

The README's table lies between the `<!-- results:start -->` and `<!-- results:end -->`
markers and is replaced wholesale, so it always shows what the benchmarks measured.
"""

from __future__ import annotations

import json
import subprocess

import common

START, END = "<!-- results:start -->", "<!-- results:end -->"


def load(name: str) -> dict | None:
    path = common.RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.2%}"


def secs(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f} s"


# The script behind each results file, where it is not bench_<name>.py.
SCRIPTS = {"sweep": "benchmarks/seed_sweep.py", "fashion_mnist": "tests/test_real_data.py"}


def script_of(name: str) -> str:
    return SCRIPTS.get(name, f"benchmarks/bench_{name}.py")


def trace(name: str, result: dict) -> str:
    """How a results file's figures trace to code: its commit, and whether that commit holds the
    benchmark as it is now (a file measured before its script's last change is stale)."""
    commit = str(result.get("commit", "unknown"))
    if result.get("dirty", False):
        return f"`{commit[:7]}` + uncommitted changes (diff sha256 {str(result.get('diff_sha256'))[:12]}): not traceable"
    script = script_of(name)
    try:
        changed = subprocess.run(["git", "log", "--format=%h", f"{commit}..HEAD", "--", script],
                                 cwd=common.ROOT, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return f"`{commit[:7]}`: not in this repository's history"
    if changed:
        return f"`{commit[:7]}`: stale, `{script}` changed since (in {', '.join(changed[-1:])}); re-measure"
    return f"`{commit[:7]}`"


def provenance() -> list[str]:
    lines = ["", "Where each figure comes from (results file: the commit whose code produced it):", ""]
    for path in sorted(common.RESULTS.glob("*.json")):
        lines.append(f"- `{path.name}`: {trace(path.stem, json.loads(path.read_text()))}")
    return lines


def render() -> str:
    train, dvc, inference, sweep = load("train"), load("dvc"), load("inference"), load("sweep")
    any_result = next(r for r in (train, dvc, inference, sweep) if r)
    m = any_result["machine"]
    lines = [f"Measured on {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads), "
             f"Python {m['python']}, torch {m['torch']}, no GPU. Regenerate with the commands in "
             "`benchmarks/` and `python benchmarks/report.py`.", ""]
    lines += ["| model | params | test accuracy (seed 42) | seeds 1–3: mean ± std | training loop | full `dvc repro` |",
              "|---|---|---|---|---|---|"]
    for model in ("mlp", "cnn"):
        d = (dvc or {}).get("metrics", {}).get(model, {})
        s = (sweep or {}).get("experiments", {}).get(model)
        spread = f"{s['mean']:.2%} ± {s['std']:.2%}" if s else "–"
        lines.append(f"| {model} | {d.get('params', '–'):,} | {pct(d.get('test_accuracy'))} | {spread} | "
                     f"{secs(d.get('train_seconds'))} | {secs((dvc or {}).get('full_repro_seconds', {}).get(model))} |")
    if train:
        lines += ["", f"Training loop against a tutorial per-sample DataLoader with `num_workers=0` and with "
                      f"`num_workers=2` (persistent workers), same model and recipe, same run, epochs including "
                      f"validation on both sides; fp32 matmul rate measured at {train['matmul_gflops']} GFLOP/s:", "",
                  "| model | s/epoch (ours) | s/epoch (tutorial, 0 workers) | s/epoch (tutorial, 2 workers) | speed-up "
                  "(vs 0 / 2 workers) | images/s (ours) | time to target val accuracy "
                  "| train FLOPs/image | share of matmul rate |", "|---|---|---|---|---|---|---|---|---|"]
        for model, e in train["models"].items():
            targets = ", ".join(f"{float(k.rsplit('_', 1)[1]):.1%}: {secs(v)}" for k, v in e["project"].items()
                                if k.startswith("seconds_to"))
            two = e.get("baseline_workers2", {}).get("seconds_per_epoch")
            lines.append(f"| {model} | {e['project']['seconds_per_epoch']:.2f} | {e['baseline']['seconds_per_epoch']:.2f} "
                         f"| {'–' if two is None else f'{two:.2f}'} | {e['epoch_speedup']:.1f}× / {e.get('epoch_speedup_vs_workers2', 0):.1f}× "
                         f"| {e['project']['images_per_second']:,.0f} | {targets} | "
                         f"{e['train_flops_per_image'] / 1e6:.1f} M | {e['fraction_of_matmul_rate']:.0%} |")
    if inference:
        t, c = inference["throughput_images_per_second"], inference["cold_start_seconds"]
        lines += ["", f"Inference ({inference['model']}): onnxruntime {t['batch_1000']['onnxruntime']:,} img/s vs "
                      f"PyTorch eager {t['batch_1000']['pytorch_eager']:,} img/s in batches of 1,000 "
                      f"({t['batch_1000']['ratio']}×); batch 1: {t['batch_1']['onnxruntime']:,} vs "
                      f"{t['batch_1']['pytorch_eager']:,} img/s. `mnist-predict` on one image: "
                      f"{c['mnist_predict']:.2f} s cold start (a bare `import torch` takes {c['python_import_torch']:.2f} s)."]
    if dvc:
        lines += ["", f"No-op `dvc repro`: {dvc['noop_repro_seconds']:.2f} s (`dvc version` alone: "
                      f"{dvc['dvc_version_seconds']:.2f} s)."]
        per_stage = dvc.get("stage_seconds")
        if per_stage:
            names = list(dict.fromkeys(name for model in per_stage.values() for name in model))
            lines += ["", "Full `dvc repro` per stage, from a fresh copy with an empty cache (each stage from DVC's "
                          "\"Running stage\" line to the next, so DVC's hashing of its outputs counts to it)"
                          + (f"; this machine's fp32 matmul rate during that run: {dvc['matmul_gflops']} GFLOP/s"
                             if "matmul_gflops" in dvc else "") + ":", "",
                      "| model | " + " | ".join(names) + " | total |", "|---|" + "---|" * (len(names) + 1)]
            for model, stages in per_stage.items():
                lines.append(f"| {model} | " + " | ".join(secs(stages.get(n)) for n in names)
                             + f" | {secs(dvc['full_repro_seconds'][model])} |")
    export = load("export")
    if export:
        labels = {"dynamo": "`dynamo=True` (shipped)", "dynamo_no_optimize": "without the optimizer",
                  "from_exported_program": "from a shared `torch.export` trace",
                  "legacy_torchscript": "legacy TorchScript exporter (deprecated, to be removed)"}
        ways = "; ".join(f"{labels[way]}: " + ", ".join(f"{model} {export['models'][model][way]['cold_process_seconds']:.1f} s"
                                                        for model in export["models"]) for way in labels)
        lines += ["", f"ONNX export, one fresh process each (imports included), parity ≤ 1e-4 for all: {ways}."]
    canonical = load("canonical")
    if canonical and "speedup_with_search" in canonical:
        ours, theirs = canonical["pipeline"], canonical["canonical"]
        lines += ["", f"Seconds of training to {canonical['target_test_accuracy']:.0%} test accuracy against the "
                      f"canonical PyTorch example (pytorch/examples `mnist/main.py`'s recipe, same run): pipeline "
                      f"{secs(ours['mean_seconds_to_target'])}, the mean of seeds "
                      f"{', '.join(str(s['seed']) for s in ours['seeds'])} ({ours['reached']} reached it; mean test "
                      f"accuracy {pct(ours['mean_test_acc'])}; {ours['params']:,} parameters, "
                      f"`{' '.join('-S ' + o for o in canonical['fast_recipe'])}`, chosen on validation among "
                      f"{len(canonical['candidates'])} candidates), example {secs(theirs['seconds_to_target'])} "
                      f"(its seed 1, {theirs['params']:,} parameters, {len(theirs['epochs'])} epochs) → "
                      f"{canonical['speedup']}×; counting the recipe search ({secs(ours['search_seconds'])} of "
                      f"training) → {canonical['speedup_with_search']}×."]
    remote, queue = load("remote"), load("queue")
    if remote:
        lines += ["", f"Full artifact set over an ssh DVC remote on loopback ({remote['objects']} objects, "
                      f"{remote['megabytes']} MB): `dvc push` {remote['push_seconds_median']:.1f} s, `dvc pull` "
                      f"{remote['pull_seconds_median']:.1f} s; `scp -r` of the same objects "
                      f"{remote['scp_seconds_median']:.1f} s (push {remote['push_vs_scp']}×, pull {remote['pull_vs_scp']}× "
                      f"scp's time; medians of {remote['repeats']})."]
    if queue:
        runs = "; ".join(f"{label}: {r['seconds']:.1f} s ({r['speedup_vs_j1']}×)" for label, r in queue["sweeps"].items())
        lines += ["", f"`dvc queue` on {queue['experiments']} experiments of {queue['epochs']} epochs: {runs}. "
                      f"Best: {queue['best']}."]
    return "\n".join(lines + provenance()) + "\n"


def main() -> None:
    body = render()
    (common.RESULTS / "results.md").write_text("# Benchmark results\n\n" + body)
    readme = common.ROOT / "README.md"
    text = readme.read_text()
    if START in text and END in text:
        head, rest = text.split(START, 1)
        readme.write_text(head + START + "\n" + body + END + rest.split(END, 1)[1])
    print(body)


if __name__ == "__main__":
    main()
