"""Render benchmarks/results/*.json as results/results.md and the README's results section.

    python benchmarks/report.py

Each README block lies between `<!-- NAME:start -->` and `<!-- NAME:end -->` markers and
is replaced wholesale, so the README shows what the benchmarks measured: `headline` (the
opening paragraph's figures), `serve` (serving under load, with its goals), `sweep` (Ray
against `dvc queue`) and `results` (everything, with where each figure comes from).
"""

from __future__ import annotations

import json
import subprocess

import common
from common import load

FRONTIER_PNG = common.ROOT / "docs" / "frontier.png"
GOALS = {"cnn": (0.996, "CNN ≤ 20,000 parameters: ≥ 99.6 % mean test accuracy over seeds 1–5"),
         "mlp": (0.992, "MLP: ≥ 99.2 % mean over seeds 1–5")}


def pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.2%}"


def secs(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f} s"


# The script behind each results file, where it is not bench_<name>.py.
SCRIPTS = {"sweep": "benchmarks/seed_sweep.py"}


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
        views = inference.get("views")
        if views:
            one = views["1"]
            rates = "; ".join(f"{n} view{'s' * (n != '1')}: {v['batch_1000']:,} img/s in batches of 1,000 "
                              f"({v['batch_1000'] / one['batch_1000']:.2f}×), {v['batch_1']:,} one at a time "
                              f"({v['batch_1'] / one['batch_1']:.2f}×)" for n, v in views.items())
            lines += ["", f"What test-time views cost at inference (the same weights exported with 1, 5 and 9 "
                          f"views, onnxruntime, same run): {rates}."]
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
        peer = canonical.get("peer")
        if peer:
            lines += ["", f"Against the fastest public recipe (tuomaso/train_mnist_fast's final notebook, "
                          f"{peer['params']:,} parameters, one epoch), same run, seeds "
                          f"{', '.join(str(r['seed']) for r in peer['seeds'])}: {secs(peer['mean_train_seconds'])} "
                          f"of training, mean test accuracy {pct(peer['mean_test_acc'])} ({peer['reached']} at 99 %); "
                          f"the pipeline's one-epoch recipe takes {peer['pipeline_time_ratio']}× its time "
                          f"(goal of issue 19: ≤ 0.5× with a mean of at least 99.0 %: **"
                          f"{'met' if peer['pipeline_time_ratio'] <= 0.5 and ours['mean_test_acc'] >= 0.99 else 'missed'}**)."]
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


def shipped(r: dict, model: str) -> dict:
    """defaults.json's leaderboard row for params.yaml's recipe of `model`, at the views it ships with."""
    views = r["params"][model]["views"]
    name = f"{model}-default" + ("" if views == 1 else f"+views{views}")
    return next(row for row in r["leaderboard"] if row["recipe"] == name)


def headline() -> str:
    """The opening figures: params.yaml's recipes as defaults.json measured them at seeds 1–5."""
    r = load("defaults")
    if not r:
        return ""
    mlp, cnn = shipped(r, "mlp"), shipped(r, "cnn")

    def figures(row: dict) -> str:
        return (f"{pct(row['test_acc']['mean'])} ± {pct(row['test_acc']['std'])} test accuracy over seeds 1–5 "
                f"with {secs(row['train_seconds'])} of training")

    teacher = (f" (distilled from that CNN, trained once by the teacher stage)"
               if r["params"]["mlp"]["train"]["distill"]["teacher"] != "none" else "")
    return (f"On a 2-core CPU the {cnn['params']:,}-parameter CNN (`-S model=cnn`) reaches {figures(cnn)}, and the "
            f"default MLP{teacher} {figures(mlp)} (`defaults.json`; see "
            f"[The accuracy frontier](#the-accuracy-frontier)).\n")


def ms(x: float) -> str:
    return "< 1 ms" if x < 1 else f"{x:.0f} ms"


def serve() -> str:
    r = load("serve")
    if not r or "stall" not in r:
        return ""
    one, two, stall = r["median_round_1_worker"], r["median_round_2_worker"], r["stall"]
    lines = [f"Measured with `{r['tool']}` (`python benchmarks/bench_serve.py`, `serve.json`), posting an MNIST "
             f"test digit inverted and upscaled to 200×200 ({r['upload_bytes']:,}-byte PNG), 8 keep-alive clients on "
             f"the same 2 cores, median of {len(r['rounds']['1'])} alternated rounds:", "",
             "| server | requests/s | p50 | p99 | resident memory (all processes) | `/healthz` requests/s, same run |",
             "|---|---|---|---|---|---|"]
    for label, run in (("1 worker (default)", one), ("`--workers 2`", two)):
        lines.append(f"| {label} | {run['requests_per_second']:,.0f} | {ms(run['latency_ms']['p50'])} | "
                     f"{ms(run['latency_ms']['p99'])} | {run['rss_mb_total']} MB ({' + '.join(map(str, run['rss_mb_by_process']))}) "
                     f"| {run['healthz']['requests_per_second']:,.0f} |")
    health = stall["healthz_during"]["latency_ms"]
    cpu = r["cpu_us_per_request"]
    steps = ", ".join(f"{name} {us:.0f} µs" for name, us in cpu.items() if name != "total of the steps")
    lines += ["", f"While 8 clients each posted the 16-file request of the stall report ({stall['heavy_requests']} "
                  f"requests of {stall['heavy_request_bytes']:,} bytes: 64-megapixel PNGs and 9-megapixel RGBA PNGs, "
                  f"{stall['heavy_seconds']:.1f} s in all), `/healthz` answered {stall['healthz_during']['requests']:,} "
                  f"requests with p99 {ms(health['p99'])} (max {ms(health['max'])}), and the worker peaked at "
                  f"{stall['worker_peak_rss_mb']} MB.",
              "", f"CPU per request, step by step (in-process, median of repeats): {steps}; "
                  f"{cpu['total of the steps']:.0f} µs in all. The rest of a request's cost is the HTTP server's: "
                  "the 2-worker server answers `/healthz`, which does no work, at the rate in the last column.",
              "", "Goals (issue 17): `/healthz` p99 ≤ 50 ms under that load: "
                  f"**{'met' if health['p99'] <= 50 else 'missed'}** ({ms(health['p99'])}); ≤ 250 MB per worker: "
                  f"**{'met' if stall['worker_peak_rss_mb'] <= 250 else 'missed'}** ({stall['worker_peak_rss_mb']} MB "
                  f"peak); ≥ 1,000 requests/s with 2 workers, p99 ≤ 20 ms, ≤ 250 MB: **"
                  f"{'met' if two['requests_per_second'] >= 1000 and two['latency_ms']['p99'] <= 20 and two['rss_mb_total'] <= 250 else 'missed'}"
                  f"** ({two['requests_per_second']:,.0f}/s, {ms(two['latency_ms']['p99'])}, {two['rss_mb_total']} MB); "
                  f"≥ 500 requests/s with 1 worker: **{'met' if one['requests_per_second'] >= 500 else 'missed'}** "
                  f"({one['requests_per_second']:,.0f}/s)."]
    return "\n".join(lines) + "\n"


def sweep_block() -> str:
    r = load("sweep_cluster")
    if not r:
        return ""
    expected = ", ".join(f"{n} machine{'s' * (int(n) > 1)}: {secs(t)}" for n, t in r["expected_seconds_on_n_machines"].items())
    return (f"The same {r['trials']} real-MNIST trials (`{' '.join('-S ' + g for g in r['grid'])}`) both ways on this "
            f"2-core machine (`python benchmarks/bench_sweep.py`, `sweep_cluster.json`): "
            f"`OMP_NUM_THREADS=1 dvc queue start -j 2` {secs(r['queue_seconds'])}, `mnist-sweep --cpus-per-trial 1` "
            f"(the local default, 2 trials at a time) {secs(r['sweep_seconds'])}: **{r['sweep_vs_queue']}×** the "
            f"queue's time (goal ≤ 1.2×: **{'met' if r['sweep_vs_queue'] <= 1.2 else 'missed'}**). Fixed costs: Ray's "
            f"start {secs(r['ray_start_seconds'])}; a trial that trains nothing (clone, `dvc exp run` finding every "
            f"stage up to date, `dvc push`, `dvc exp push`) {secs(r['fixed_seconds_per_trial'])}; a trial here took "
            f"{secs(r['mean_trial_seconds'])} on average. Expected for this sweep on N such machines (2 trials each "
            f"at a time): {expected}. GPU: {r['gpu']}.\n")


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (less x, more y), by increasing x."""
    front, best = [], -1.0
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def frontier_plot(r: dict) -> None:
    """Test accuracy (mean ± std over the seeds) against training seconds and against parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colours = {"mlp": "tab:blue", "cnn": "tab:orange"}
    markers = {1: "o", 5: "s", 9: "^"}
    rows = r["leaderboard"]
    for ax, key, label in ((axes[0], "train_seconds", "training seconds (mean over seeds, 2-core CPU)"),
                           (axes[1], "params", "parameters")):
        for row in rows:
            acc = row["test_acc"]
            ax.errorbar(row[key], 100 * acc["mean"], yerr=100 * acc["std"], fmt=markers[row["inference_views"]],
                        color=colours[row["model"]], alpha=0.85, ms=5, capsize=2)
        front = pareto([(row[key], 100 * row["test_acc"]["mean"]) for row in rows])
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="black", lw=1,
                label="Pareto front")
        for model, (goal, _) in GOALS.items():
            ax.axhline(100 * goal, color=colours[model], ls="--", lw=0.8, label=f"{model} goal {goal:.1%}")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("test accuracy, % (mean ± std, seeds 1–5)")
    for model, colour in colours.items():
        axes[1].plot([], [], "o", color=colour, label=model)
    for views, marker in markers.items():
        axes[1].plot([], [], marker, color="grey", label=f"{views} test-time view{'s' * (views > 1)}")
    axes[1].legend(fontsize=7, loc="center")
    fig.suptitle("Every recipe tried (benchmarks/results/frontier.json)", fontsize=10)
    fig.tight_layout()
    fig.savefig(FRONTIER_PNG, dpi=90, metadata={"Software": None})
    plt.close(fig)


def frontier_block() -> str:
    r = load("frontier")
    if not r:
        return ""
    frontier_plot(r)
    by_name = {row["recipe"]: row for row in r["leaderboard"]}
    lines = [f"Every recipe at seeds {', '.join(map(str, r['seeds']))}, each a fresh model, beside today's recipes "
             "in the same run (`python benchmarks/bench_frontier.py`, `frontier.json`); training seconds include "
             "the per-epoch validation pass; a *views* column is the same trained models scored with that many "
             "test-time views (`-S <model>.views=N`, inference ×N).", "",
             "![accuracy against training seconds and parameters](docs/frontier.png)", "",
             "| recipe | lever | params | training s (× today's) | test, 1 view | 5 views | 9 views | val, 1 view |",
             "|---|---|---|---|---|---|---|---|"]
    for recipe in r["recipes"]:
        row = by_name[recipe["name"]]
        cells = [f"{100 * recipe[f'test_acc_views{v}']['mean']:.2f} ± {100 * recipe[f'test_acc_views{v}']['std']:.2f}"
                 for v in (1, 5, 9)]
        teacher = f" + teacher {secs(row['teacher_seconds'])}" if row["teacher_seconds"] else ""
        lines.append(f"| `{recipe['name']}` | {recipe['lever']} | {recipe['params']:,} | "
                     f"{secs(row['train_seconds'])} ({row['time_ratio']}×){teacher} | " + " | ".join(cells)
                     + f" | {100 * recipe['val_acc_views1']['mean']:.2f} |")
    chosen = ", ".join(f"{model}: `{name}`" for model, name in r["chosen_on_val"].items())
    lines += ["", f"Chosen on mean validation accuracy among the rows within their time budget: {chosen}. "
                  "params.yaml's defaults are those recipes."]
    d = load("defaults")
    if d:
        lines += ["", f"params.yaml's recipes as shipped, against the recipes they replaced (params.yaml at "
                      f"`{d['before'][:7]}`), seeds 1–5, same run (`python benchmarks/bench_defaults.py`, "
                      "`defaults.json`):", "",
                  "| recipe | params | training s (× before) | test accuracy | val accuracy |", "|---|---|---|---|---|"]
        for model in ("cnn", "mlp"):
            before = next(row for row in d["leaderboard"] if row["recipe"] == f"{model}-before")
            for row in (before, shipped(d, model)):
                teacher = f" + teacher {secs(row['teacher_seconds'])} once" if row["teacher_seconds"] else ""
                lines.append(f"| `{row['recipe']}` | {row['params']:,} | {secs(row['train_seconds'])} "
                             f"({row['time_ratio']}×){teacher} | {pct(row['test_acc']['mean'])} ± "
                             f"{pct(row['test_acc']['std'])} | {pct(row['val_acc'])} |")
        lines += ["", "Goals (issue 19), each within its time budget (CNN 1.5×, MLP 2× the recipe before, same run):"]
        for model, (goal, text) in GOALS.items():
            row = shipped(d, model)
            met = row["test_acc"]["mean"] >= goal and row["within_budget"]
            lines.append(f"- {text}: **{'met' if met else 'missed'}**: {row['test_acc']['mean']:.2%} at "
                         f"{row['time_ratio']}× the time.")
    return "\n".join(lines) + "\n"


    return "\n".join(lines) + "\n"


def fast_block() -> str:
    """The README's quick-demo recipe, from canonical.json: its command and what it did."""
    r = load("canonical")
    if not r or "peer" not in r:
        return ""
    ours, peer = r["pipeline"], r["peer"]
    seconds = sum(s["epochs"][-1]["train_seconds"] for s in ours["seeds"]) / len(ours["seeds"])
    # Brackets are shell glob characters: quote those overrides.
    overrides = " ".join(f"-S '{o}'" if "[" in o else f"-S {o}" for o in r["fast_recipe"])
    return (f"A 99 % model in a few seconds, for a demo or a quick check of a change: the CNN without its weight "
            f"average and augmentation, chosen on the validation split among {len(r['candidates'])} short recipes "
            f"as the fastest to clear {r['target_test_accuracy'] + r.get('margin', 0.0):.1%} ({secs(seconds)} of training on "
            f"average here, {pct(ours['mean_test_acc'])} mean test accuracy over seeds 1–5, {ours['reached']} at "
            f"99 % or more; the search that chose it cost {secs(ours['search_seconds'])} of training). The fastest "
            f"public recipe, tuomaso/train_mnist_fast's, took {secs(peer['mean_train_seconds'])} for "
            f"{pct(peer['mean_test_acc'])} in the same run (`benchmarks/results/canonical.json`):\n\n"
            f"```bash\ndvc exp run {overrides}\n```\n")


def replace_block(text: str, name: str, body: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if not body or start not in text or end not in text:
        return text
    head, rest = text.split(start, 1)
    return head + start + "\n" + body + end + rest.split(end, 1)[1]


def main() -> None:
    body = render()
    frontier = frontier_block()
    (common.RESULTS / "results.md").write_text("# Benchmark results\n\n" + body + "\n" + serve() + "\n" + sweep_block()
                                               + "\n" + frontier)
    readme = common.ROOT / "README.md"
    text = readme.read_text()
    for name, block in (("headline", headline()), ("serve", serve()), ("sweep", sweep_block()),
                        ("frontier", frontier), ("fast", fast_block()), ("results", body)):
        text = replace_block(text, name, block)
    readme.write_text(text)
    print(body)


if __name__ == "__main__":
    main()
