"""Render the results files into the blocks of README.md, docs/*.md and benchmarks/README.md.

    python benchmarks/report.py            # rewrite every block
    python benchmarks/report.py --check    # exit 1 if a block differs from its rendering, or quotes a stale file

A block lies between `<!-- NAME:start -->` and `<!-- NAME:end -->` and is replaced wholesale, so a
document shows what the benchmarks measured. A results file names the commit of the code that
produced it. It is stale when one of its inputs changed since: its code (the import closure of its
script and of the commands it runs), the params.yaml keys it reads, the DVC outputs it reads
(depends.py). `--check` fails on a stale file that a block in README.md or docs/ quotes;
benchmarks/README.md lists every file with its state. It imports neither torch nor the package.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import depends
from depends import RESULTS, script_of, staleness

ROOT = depends.ROOT
DOCUMENTS = ["README.md", "docs", "benchmarks/README.md"]


def load(name: str, folder: Path = RESULTS) -> dict | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.2%}"


def secs(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f} s"


# ---------------------------------------------------------------- the README's blocks


def shipped(r: dict, name: str) -> dict:
    return next(row for row in r["shipped"] if row["recipe"] == name)


def seed_range(seeds: list[int]) -> str:
    return f"{seeds[0]}–{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) else ", ".join(map(str, seeds))


def figures(row: dict) -> str:
    acc = row["test_acc"]
    return f"{pct(acc['mean'])} ± {pct(acc['std'])}"


def headline() -> str:
    """The opening figures: the default as a fresh clone runs it, and the record recipes."""
    r, first = load("defaults"), load("first_run")
    if not r or not first:
        return ""
    mlp, cnn, distilled = (shipped(r, n) for n in ("mlp-default", "cnn", "mlp-distilled"))
    return (f"On a 2-core CPU a fresh clone's `dvc repro` takes {secs(first['median_seconds'])} and gives an MLP with "
            f"{figures(mlp)} test accuracy (mean ± std over seeds {seed_range(r['seeds'])}). The record recipes are one command away: "
            f"the {cnn['params']:,}-parameter CNN reaches {figures(cnn)} with {secs(cnn['total_train_seconds'])} of "
            f"training, the MLP distilled from it {figures(distilled)} with "
            f"{secs(distilled['total_train_seconds'])} (its teacher's included); see [Results](#results).\n")


def first_run() -> str:
    r = load("first_run")
    if not r:
        return ""
    stages = {name: statistics.median(run["stages"].get(name, 0.0) for run in r["runs"])
              for name in r["runs"][0]["stages"]}
    parts = ", ".join(f"{name} {secs(t)}" for name, t in stages.items())
    return (f"The first line takes {secs(r['median_seconds'])} on this project's 2-core CI machine once the "
            f"packages are installed (median of {r['repeats']} fresh clones with `MNIST_MIRROR`: {parts}; "
            f"`python benchmarks/bench_first_run.py`). Every stage pays {secs(r['import_torch_seconds'])} for "
            f"`import torch` there. The outputs: `metrics/*.json` and `plots/` (the numbers and figures), "
            f"`models/export/model.onnx` (the model `mnist-predict` and `mnist-serve` use), `models/checkpoint.pt`.\n")


def kernels_block() -> str:
    """Portable against native kernels (issue 29): training, side by side, and a fresh clone's first run."""
    r, first = load("kernels"), load("first_run")
    if not r or not first or "native" not in first:
        return ""
    m = r["machine"]
    lines = [f"| training ({m['cpu']}, {m['cores']} cores, torch {m['torch']}) | portable | native | portable / native |",
             "|---|---|---|---|"]
    for name, row in r["models"].items():
        t = row["median_train_seconds"]
        lines.append(f"| {name.upper()}, {row['epochs']} epochs (train stage, median of {r['repeats']}) | "
                     f"{secs(t['portable'])} | {secs(t['native'])} | {row['ratio']:.2f}× |")
    n = first["native"]
    lines.append(f"| a fresh clone's first `dvc repro` (median of {first['repeats']}) | {secs(first['median_seconds'])} | "
                 f"{secs(n['median_seconds'])} | {n['portable_over_native']:.2f}× |")
    verdict = "met" if r["met"] else "missed"
    return ("\n".join(lines) + f"\n\nGoal: portable training at most {r['goal_ratio']}× native for the default MLP: "
            f"{verdict} ({r['models']['mlp']['ratio']:.2f}×); the first run at most {secs(first['goal_seconds'])}: "
            f"{'met' if first['met'] else 'missed'} ({secs(first['median_seconds'])}). Nearly all of the cost is "
            "MKL's `COMPATIBLE` matmul (`python benchmarks/bench_kernels.py`, `python benchmarks/bench_first_run.py`).\n")


def results() -> str:
    r = load("defaults")
    if not r:
        return ""
    m = r["machine"]
    lines = [f"Seeds {', '.join(map(str, r['seeds']))}, each a fresh model, trained as the train stage trains it, "
             f"seed by seed through the recipes in one run (`python benchmarks/bench_defaults.py`, `defaults.json`; "
             f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}). Training seconds are the mean over the seeds and "
             "include the per-epoch validation pass; a distilled model's include its teacher's.", "",
             "| recipe | command | params | test accuracy | val accuracy | training |", "|---|---|---|---|---|---|"]
    commands = {"mlp-default": "`dvc repro`", "cnn": "`dvc exp run -S model=cnn`",
                "mlp-distilled": "[docs/frontier.md](docs/frontier.md#the-record-recipes)"}
    for row in r["shipped"]:
        teacher = f" ({secs(row['train_seconds'])} + teacher {secs(row['teacher_seconds'])})" \
            if row["teacher_seconds"] else ""
        lines.append(f"| `{row['recipe']}` ({row['views']} views) | {commands[row['recipe']]} | {row['params']:,} | "
                     f"{figures(row)} | {pct(row['val_acc']['mean'])} | "
                     f"{secs(row['total_train_seconds'])}{teacher} |")
    return "\n".join(lines) + "\n"


def train_loop() -> str:
    """docs/architecture.md: the training loop against a tutorial's per-sample DataLoader (bench_train.py)."""
    r = load("train")
    if not r:
        return ""
    m = r["machine"]
    lines = [f"| model ({m['cpu']}, {m['cores']} cores) | this loop, s/epoch | tutorial `DataLoader`, s/epoch "
             "(`num_workers` 0 / 2) | faster | share of the matmul rate |", "|---|---|---|---|---|"]
    for name, row in r["models"].items():
        lines.append(f"| {name} ({row['params']:,} params) | {row['project']['seconds_per_epoch']:.2f} | "
                     f"{row['baseline']['seconds_per_epoch']:.2f} / {row['baseline_workers2']['seconds_per_epoch']:.2f} | "
                     f"{row['epoch_speedup']}× / {row['epoch_speedup_vs_workers2']}× | "
                     f"{100 * row['fraction_of_matmul_rate']:.0f} % of {r['matmul_gflops']} GFLOP/s |")
    return ("Training keeps the split as one uint8 tensor and augments whole batches with one `grid_sample`, "
            "against torchvision's `datasets.MNIST` through a per-sample `DataLoader` with the same augmentation "
            "and recipe (`python benchmarks/bench_train.py`, `train.json`; an epoch includes its validation "
            "pass):\n\n" + "\n".join(lines) + "\n")


def records() -> str:
    """docs/frontier.md: the record recipes' commands, from the overrides defaults.json measured."""
    r = load("defaults")
    if not r:
        return ""
    lines = []
    for name in ("cnn", "mlp-distilled"):
        row = shipped(r, name)
        overrides = " ".join(f"-S {o}" for o in row["overrides"])
        lines += [f"- `{name}`: {figures(row)} test accuracy over seeds {seed_range(r['seeds'])}, {secs(row['total_train_seconds'])} of "
                  "training" + (" counting its teacher's" if row["teacher_seconds"] else "") + ":", "",
                  f"  ```bash\n  dvc exp run {overrides}\n  ```", ""]
    return "\n".join(lines)


def fashion() -> str:
    r = load("fashion_mnist")
    if not r:
        return ""
    return (f"With Debian's `dataset-fashion-mnist` package, `{r['command']}` reached {pct(r['test_accuracy'])} "
            f"Fashion-MNIST test accuracy at seed {r['seed']} with the {r['params']:,}-parameter CNN in "
            f"{secs(r['experiment_seconds'])} (`python benchmarks/bench_fashion_mnist.py`, `fashion_mnist.json`).\n")


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
    for key, engine in (("feedback", "a SQLite store"), ("feedback_postgresql", "a PostgreSQL store on this machine")):
        if key not in r:
            continue
        server = r[key]["median_round"]
        fb, pr = server["feedback"], server["predict"]
        lines += ["", f"`POST /feedback` (`--feedback`, the same PNG and a label, every 201 a committed transaction, "
                      f"{engine}) on the "
                      f"2-worker server: {fb['requests_per_second']:,.0f} requests/s, p99 {ms(fb['latency_ms']['p99'])}, "
                      f"{fb['non_2xx']} non-2xx of {fb['requests']:,}, against `/predict`'s "
                      f"{pr['requests_per_second']:,.0f} requests/s on the same server in the same round "
                      f"({server['feedback_share_of_predict']:.2f}×), median of {len(r[key]['rounds'])} rounds."]
    if "switch" in r:
        sw = r["switch"]
        ok = (sw["switching"]["non_2xx"] == 0 and sw["switching"]["failed"] == 0 and sw["p99_ratio"] <= 2
              and sw["promoted_served_after_s"] <= 10 and sw["rolled_back_served_after_s"] <= 10)
        lines += ["", f"The switch under load: `ab -k -c 8 -t 30` on a 2-worker server following a model base path "
                      f"(`--model models/serving`), a promotion 10 s in and `mnist-promote rollback` 10 s later: "
                      f"{sw['switching']['requests']:,} requests, {sw['switching']['non_2xx']} non-2xx, "
                      f"{sw['switching']['failed']} failed, p99 {ms(sw['switching']['latency_ms']['p99'])} against "
                      f"{ms(sw['steady']['latency_ms']['p99'])} with no switch in the same run "
                      f"({sw['p99_ratio']:.2f}×); `/healthz` named the new model {sw['promoted_served_after_s']:.2f} s "
                      f"after the promotion and the old one {sw['rolled_back_served_after_s']:.2f} s after the "
                      f"rollback (20 answers in a row, both workers). Goal (issue 36): 0 non-2xx, p99 ≤ 2× steady, "
                      f"each switch within 10 s: {met(ok)}."]
    if "fleet" in r:
        fleet = r["fleet"]["median_round"]
        lines += ["", f"Two 1-worker servers sharing one PostgreSQL store, each under its own `ab` at once: "
                      f"{fleet['two_servers']['requests_per_second']:,.0f} corrections/s together, against "
                      f"{fleet['one_server']['requests_per_second']:,.0f} for one such server alone "
                      f"({fleet['two_over_one']:.2f}×; median of {len(r['fleet']['rounds'])} rounds; both servers, the "
                      "database and `ab` share this machine's 2 cores)."]
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


FEEDBACK_ROWS = {  # scenario: (what is sent, the defence)
    "clean": ("every digit, every label right", "on"),
    "wrong_only_defended": ("only what the model misread, + 10 % confirmations", "on"),
    "wrong_only_naive": ("only what the model misread, + 10 % confirmations", "off (naive ingest)"),
    "flips_defended": ("every digit, 20 % random wrong labels", "on"),
    "targeted_defended": ("every digit + 20 % adversarial: 7s labelled 1", "on"),
    "targeted_naive": ("every digit + 20 % adversarial: 7s labelled 1", "off (naive ingest)"),
    "heavy_defended": ("every digit + one honest writer sending 20 %", "on"),
}


def met(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def postgres_goals(served: dict) -> list[str]:
    """The goals of a PostgreSQL store: its rate against /predict's, and a fleet's against one server's."""
    if "feedback_postgresql" not in served or "fleet" not in served:
        return []
    server, fleet = served["feedback_postgresql"]["median_round"], served["fleet"]["median_round"]
    fb = server["feedback"]
    return [f"- with a PostgreSQL store on the same machine ≥ 0.7× `/predict`, p99 ≤ 50 ms: "
            f"{met(server['feedback_share_of_predict'] >= 0.7 and fb['latency_ms']['p99'] <= 50)} "
            f"({fb['requests_per_second']:.0f} req/s, {server['feedback_share_of_predict']:.2f}×, p99 "
            f"{fb['latency_ms']['p99']:.0f} ms);",
            f"- two servers writing to one PostgreSQL store reach ≥ 1.5× one server's rate: "
            f"{met(fleet['two_over_one'] >= 1.5)} ({fleet['two_over_one']:.2f}×, 1-worker servers; "
            f"{fleet['two_servers']['requests_per_second']:.0f} against {fleet['one_server']['requests_per_second']:.0f} "
            "req/s);"]


def feedback_block() -> str:
    """One loop of users' corrections: held-out users, their targeted error and MNIST, for each kind of sender;
    the server; snapshots."""
    r = load("feedback")
    if not r:
        return ""
    pop, summary = r["population"], r["summary"]
    seeds = ", ".join(map(str, r["seeds"]))
    lines = [f"One loop on the stand-in population (`python benchmarks/bench_feedback.py`, `feedback.json`, seeds "
             f"{seeds}, means): {pop['writers']} writers simulated with a stroke model "
             f"([benchmarks/writers.py](../benchmarks/writers.py)), {pop['per_digit']} samples of each digit, "
             f"uploaded as 280×280 PNGs. {pop['correcting_writers']} writers send every digit they drew as a "
             f"correction; the other {pop['held_out_writers']} never do, and their digits are the held-out users "
             f"scored here through `images.prepare` and the exported model. Every loop starts from the default model "
             f"at that seed.", "",
             "| sent | defence | held-out users' accuracy | their error × | held-out 7s read as 1 | MNIST test "
             "| passed curation | of the gain |",
             "|---|---|---|---|---|---|---|---|"]
    for name, (labels, defence) in FEEDBACK_ROWS.items():
        if name not in summary:  # a scenario this run left out (bench_feedback.py --scenarios)
            continue
        row = summary[name]
        lines.append(f"| {labels} | {defence} | {pct(row['held_out_accuracy_before'])} → "
                     f"{pct(row['held_out_accuracy_after'])} | {row['held_out_error_ratio']:.2f} | "
                     f"{pct(row['target_error_before'])} → {pct(row['target_error_after'])} | "
                     f"{pct(row['mnist_test_before'])} → {pct(row['mnist_test_after'])} "
                     f"({row['mnist_test_change_points']:+.2f} pts) | {pct(row['passed'])} | "
                     f"{row['share_of_reference_gain']:.0%} of {row['reference'].replace('_', ' ')} |")
    lines += ["", "\"Passed curation\" is the share of the corrections admitted or kept in the user split. In every "
                  "loop a reviewer looked at up to 300 corrections of held-out submitters (accepting the right labels, "
                  "rejecting the wrong); the gate compared the candidate with the model before the loop on the "
                  "validation split and those accepted digits, and the figures are the *served* model's: the "
                  "candidate if blessed, else the model before. Gate verdicts per seed: "
              + "; ".join(f"{name.replace('_', ' ')} {'/'.join('blessed' if b else 'refused' for b in row['blessed'])}"
                          for name, row in summary.items() if name in FEEDBACK_ROWS and "blessed" in row) + "."]
    adaptive = {k: v for k, v in summary.items() if k.startswith("adaptive_") and "reference_target_error_after" in v}
    if adaptive:
        lines += ["", f"The adaptive adversary (seed {r['seeds'][0]}, against the clean loop at that seed): it queries "
                      "the model and sends three digits labelled with its second guess (wrong, never implausible) "
                      "for each 7 labelled 1, under 1 identity or 10:", "",
                  "| identities | share of all records | gate | served: held-out users | held-out 7s read as 1 "
                  "(clean loop) | MNIST test against the clean loop | of the clean gain | candidate's 7s read as 1 |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, row in adaptive.items():
            _, ids, share = name.split("_")
            lines.append(f"| {ids} | {share} % | {'blessed' if all(row['blessed']) else 'refused'} | "
                         f"{pct(row['held_out_accuracy_before'])} → {pct(row['held_out_accuracy_after'])} | "
                         f"{pct(row['target_error_after'])} ({pct(row['reference_target_error_after'])}) | "
                         f"{row['mnist_test_against_reference_points']:+.2f} pts | "
                         f"{row['share_of_reference_gain']:.0%} | {pct(row['candidate_target_error'])} |")
    clean, wrong, attacked = summary["clean"], summary["wrong_only_defended"], summary.get("targeted_defended")
    left_out = [name.replace("_", " ") for name in FEEDBACK_ROWS if name not in summary]
    if left_out:
        lines += ["", f"Not run this time: {', '.join(left_out)} (`git log benchmarks/results/feedback.json` has "
                      "their last figures)."]
    snap = r["snapshot"]
    served = load("serve")
    if not served or "feedback" not in served:
        return ""
    server = served["feedback"]["median_round"]
    where = f"`python benchmarks/bench_serve.py`, `serve.json`, median of {len(served['feedback']['rounds'])} rounds"
    fb, pr = server["feedback"], server["predict"]
    first, nxt = snap["first_10000"], snap["next_1000"]
    lines += ["", "Goals:",
              f"- one loop halves the held-out users' error, MNIST test at most 0.05 points lower: "
              f"{met(clean['held_out_error_ratio'] <= 0.5 and clean['mnist_test_change_points'] >= -0.05)} "
              f"(error × {clean['held_out_error_ratio']:.2f}, MNIST {clean['mnist_test_change_points']:+.2f} pts);",
              f"- wrong-only users: at least 95 % of their corrections pass curation and the defended loop keeps at "
              f"least 95 % of the naive loop's gain: {met(wrong['passed'] >= 0.95 and wrong['share_of_reference_gain'] >= 0.95)} "
              f"({pct(wrong['passed'])} passed, {wrong['share_of_reference_gain']:.0%} of the naive gain);",
              *([] if attacked is None or "targeted_naive" not in summary else [
              f"- one adversary at 20 % of all records (defended): MNIST test at most 0.05 points lower, at least 80 % "
              f"of the clean gain kept, held-out 7s read as 1 no more often than without the attack: "
              f"{met(attacked['mnist_test_change_points'] >= -0.05 and attacked['share_of_reference_gain'] >= 0.8 and attacked['target_error_after'] <= clean['target_error_after'])} "
              f"({attacked['mnist_test_change_points']:+.2f} pts, {attacked['share_of_reference_gain']:.0%}, "
              f"{pct(attacked['target_error_after'])} against {pct(clean['target_error_after'])}; naive "
              f"{pct(summary['targeted_naive']['target_error_after'])});"]),
              f"- `POST /feedback` with 2 workers and a SQLite store ≥ 0.85× `/predict`'s rate, p99 ≤ 50 ms: "
              f"{met(server['feedback_share_of_predict'] >= 0.85 and fb['latency_ms']['p99'] <= 50)} "
              f"({fb['requests_per_second']:.0f} req/s, {server['feedback_share_of_predict']:.2f}×, p99 "
              f"{fb['latency_ms']['p99']:.0f} ms, {fb['non_2xx']} non-2xx of {fb['requests']:,}; `/predict` "
              f"{pr['requests_per_second']:.0f} req/s on the same server in the same run; peak RSS "
              f"{', '.join(f'{m:.0f}' for m in server['peak_rss_mb_by_process'])} MB by process; `ab -k -c 8`, "
              f"the 200×200 PNG of `bench_serve.py` and a label; {where});",
              *postgres_goals(served),
              *adaptive_goals(summary),
              f"- snapshot and push cost grows with the new records only: uploaded bytes "
              f"{met(snap['bytes_ratio'] <= 2 * nxt['records'] / first['records'])}, time not shown at this size "
              f"(10,000 records: {secs(first['snapshot_and_push_seconds'])}, {first['uploaded_bytes'] / 1e6:.1f} MB "
              f"uploaded; 1,000 more on top: {secs(nxt['snapshot_and_push_seconds'])}, "
              f"{nxt['uploaded_bytes'] / 1e6:.1f} MB: {snap['bytes_ratio']:.0%} of the bytes but {snap['time_ratio']:.0%} "
              f"of the time, which is mostly the fixed cost of starting `dvc add` and `dvc push`; a local DVC remote)."]
    return "\n".join(lines) + "\n"


def adaptive_goals(summary: dict) -> list[str]:
    """Issue 36's goals for the adaptive adversary and the honest loops' blessing."""
    needed = [f"adaptive_{n}_{share}" for n in (1, 10) for share in (20, 50)] + ["clean", "wrong_only_defended"]
    if not all(name in summary and "blessed" in summary[name] for name in needed):
        return []
    at20 = [summary[f"adaptive_{n}_20"] for n in (1, 10)]
    at50 = [summary[f"adaptive_{n}_50"] for n in (1, 10)]
    ok20 = all(a["target_error_after"] <= a["reference_target_error_after"]
               and a["mnist_test_against_reference_points"] >= -0.05 and a["share_of_reference_gain"] >= 0.8
               for a in at20)
    ok50 = all(a["held_out_accuracy_after"] >= a["held_out_accuracy_before"]
               and a["target_error_after"] <= a["target_error_before"] for a in at50)
    honest = [b for name in ("clean", "wrong_only_defended") for b in summary[name]["blessed"]]
    return [f"- the adaptive adversary at 20 %, 1 and 10 identities, defended: the served model reads held-out 7s "
            f"as 1 no more often than after the clean loop, MNIST test ≥ −0.05 points against it, ≥ 80 % of its gain: "
            f"{met(ok20)} (" + "; ".join(f"{n} identit{'y' if n == 1 else 'ies'}: {pct(a['target_error_after'])} "
                                         f"against {pct(a['reference_target_error_after'])}, "
                                         f"{a['mnist_test_against_reference_points']:+.2f} pts, "
                                         f"{a['share_of_reference_gain']:.0%}" for n, a in zip((1, 10), at20)) + ");",
            f"- at 50 %, the served model never worse than the one before the loop on held-out users and on 7s read "
            f"as 1: {met(ok50)} (" + "; ".join(f"{n}: {pct(a['held_out_accuracy_before'])} → "
                                              f"{pct(a['held_out_accuracy_after'])}, 7 as 1 "
                                              f"{pct(a['target_error_before'])} → {pct(a['target_error_after'])}"
                                              for n, a in zip((1, 10), at50)) + ");",
            f"- honest loops (every digit, wrong-only) blessed at every seed: {met(all(honest))} "
            f"({sum(honest)} of {len(honest)});"]


def store_block() -> str:
    """The feedback store under faults (10,000 acknowledged posts each), and its other operations."""
    r = load("store")
    if not r:
        return ""
    names = {"worker": "a worker killed with SIGKILL, twice", "server": "the whole server killed with SIGKILL, "
             "twice, then again at the end", "postgresql": "PostgreSQL restarted in immediate mode, twice",
             "disk": "the disk (a tmpfs) full, then some space back, then full again"}
    lines = [f"Fault runs (`python benchmarks/bench_store.py`, `store.json`; PostgreSQL {re.findall(r'[0-9.]+', r['postgresql_version'])[0]}): "
             f"`mnist-serve --feedback` with {r['workers']} workers, {r['clients']} keep-alive clients posting until "
             f"at least {r['posts_per_run_at_least']:,} corrections are acknowledged, a fault a third and two thirds "
             "of the way; then `mnist-feedback export`.", "",
             "| fault | acknowledged (201) | in the export | acknowledged, not exported | exported twice "
             "| committed, not acknowledged | other answers |", "|---|---|---|---|---|---|---|"]
    for name, label in names.items():
        f = r["faults"][name]
        other = ", ".join(f"{n:,} × {s}" for s, n in sorted(f["statuses"].items()) if s != "201") or "none"
        lines.append(f"| {label} | {f['acknowledged']:,} | {f['in_export']:,} | "
                     f"{f['acknowledged_missing_from_export']} | {f['duplicate_ids_in_export']} | "
                     f"{f['committed_not_acknowledged']} | {other} |")
    lines += ["", "\"Committed, not acknowledged\" are records whose answer never reached the client (the server "
              "was killed after the commit) or that came in a 503 batch that did commit: a client's retry sends "
              "them again under a new id, so no acknowledged one is lost and none is counted twice.", ""]
    ops = r["operations"]
    for engine, o in ops.items():
        lines.append(f"- {'SQLite' if engine == 'sqlite' else 'PostgreSQL'}: a snapshot of 1,000 new records "
                     f"takes {o['snapshot_1000_new_of_10000_s'] * 1000:.0f} ms on a store of 10,000 and "
                     f"{o['snapshot_1000_new_of_100000_s'] * 1000:.0f} ms on one of 100,000 "
                     f"({o['snapshot_ratio_100k_over_10k']:.2f}×); `mnist-feedback export` of 100,000 records "
                     f"{secs(o['export_100000_jsonl_s'])} as JSON lines, {secs(o['export_100000_csv_s'])} as CSV.")
    every = all(f["all_acknowledged_exported_once"] for f in r["faults"].values())
    least = min(f["acknowledged"] for f in r["faults"].values())
    lines += ["", "Goals:",
              f"- every fault run: at least 10,000 acknowledged, all of them in the export, each once: "
              f"{met(every and least >= 10_000)} (the fewest acknowledged in a run: {least:,});",
              f"- a snapshot costs what is new (100,000 against 10,000 about the same): "
              f"{met(all(o['snapshot_ratio_100k_over_10k'] <= 2 for o in ops.values()))};",
              f"- `export` of 100,000 records ≤ 10 s: "
              f"{met(all(o['export_100000_jsonl_s'] <= 10 and o['export_100000_csv_s'] <= 10 for o in ops.values()))}."]
    return "\n".join(lines) + "\n"


def replace_block(text: str, name: str, body: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if not body or start not in text or end not in text:
        return text
    head, rest = text.split(start, 1)
    return head + start + "\n" + body + end + rest.split(end, 1)[1]


# ---------------------------------------------------------------- benchmarks/README.md


def inputs_text(name: str) -> str:
    """What makes a results file stale, as depends.py reads it."""
    inputs = depends.inputs_of(name)
    parts = [f"{len(depends.code_of(name))} files of code and data, the locks among them"]
    if inputs.pipeline:
        parts.append("every stage, dvc.yaml and params.yaml")
    parts += [f"`{c}`" for c in inputs.commands]
    params = depends.params_of(name)
    parts += [f"params `{', '.join(params)}`"] if params and not inputs.pipeline else []
    parts += [f"`{d}`" for d in inputs.data]
    return ", ".join(parts)


def status() -> str:
    """Every maintained results file and the commit it was measured at (which are stale depends on HEAD:
    `report.py --check` says)."""
    lines = ["| benchmark | results file | measured at | stale when one of these changed |", "|---|---|---|---|"]
    for path in sorted(RESULTS.glob("*.json")):
        result = json.loads(path.read_text())
        lines.append(f"| `{script_of(path.stem)}` | `{path.name}` | `{str(result.get('commit'))[:7]}` | "
                     f"{inputs_text(path.stem)} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- blocks, documents and the check

# block name → (renderer, the results files it quotes)
BLOCKS: dict[str, tuple[Callable[[], str], list[str]]] = {
    "headline": (headline, ["defaults", "first_run"]),
    "first-run": (first_run, ["first_run"]),
    "kernels": (kernels_block, ["kernels", "first_run"]),
    "results": (results, ["defaults"]),
    "records": (records, ["defaults"]),
    "train-loop": (train_loop, ["train"]),
    "serve": (serve, ["serve"]),
    "sweep": (sweep_block, ["sweep_cluster"]),
    "fashion": (fashion, ["fashion_mnist"]),
    "feedback": (feedback_block, ["feedback", "serve"]),
    "store": (store_block, ["store"]),
    "status": (status, []),
}


# Blocks no document shows until their results file is re-measured (the document says so in their place).
WITHDRAWN: set[str] = set()


def documents() -> list[Path]:
    found = []
    for entry in DOCUMENTS:
        path = ROOT / entry
        found += sorted(path.glob("*.md")) if path.is_dir() else [path]
    return [p for p in found if p.exists()]


def blocks_in(text: str) -> list[str]:
    return [name for name in BLOCKS if f"<!-- {name}:start -->" in text]


def rendered(text: str, renderings: dict[str, str]) -> str:
    for name in blocks_in(text):
        text = replace_block(text, name, renderings[name])
    return text


def render_all() -> dict[str, str]:
    """Every block's text (a withdrawn block's is empty: its results file may predate its renderer)."""
    return {name: "" if name in WITHDRAWN else render() for name, (render, _) in BLOCKS.items()}


def unrendered(renderings: dict[str, str]) -> list[Path]:
    """The documents whose committed blocks differ from `renderings`."""
    return [doc for doc in documents() if rendered(doc.read_text(), renderings) != doc.read_text()]


def check(renderings: dict[str, str]) -> list[str]:
    problems = [f"{doc.relative_to(ROOT)}: a block differs from its rendering: run `python benchmarks/report.py` "
                "and commit the result" for doc in unrendered(renderings)]
    # Each results file judged once (git diff and git show each time), however many blocks quote it.
    stale = {path.stem: staleness(path.stem, json.loads(path.read_text())) for path in sorted(RESULTS.glob("*.json"))}
    for doc in documents():
        text = doc.read_text()
        for name in blocks_in(text):
            for quoted in BLOCKS[name][1]:
                why = stale[quoted] if quoted in stale else "no results file"
                if why:
                    problems.append(f"{doc.relative_to(ROOT)}: block `{name}` quotes {quoted}.json, which is "
                                    f"stale ({why}): re-measure with `python {script_of(quoted)}`")
    for name, why in stale.items():
        if why and not any(name in quoted for _, quoted in BLOCKS.values()):
            print(f"note: {name}.json is stale ({why}); nothing quotes it", file=sys.stderr)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 on a stale block or file")
    args = parser.parse_args(argv)
    renderings = render_all()
    if args.check:
        problems = check(renderings)
        for problem in problems:
            print(problem, file=sys.stderr)
        print(f"{len(documents())} documents, {len(problems)} problems")
        return 1 if problems else 0
    for doc in documents():
        text = doc.read_text()
        new = rendered(text, renderings)
        if new != text:
            doc.write_text(new)
            print(f"rewrote {doc.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
