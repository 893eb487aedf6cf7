"""curate stage: the snapshot's corrections → a held-out user split and the admitted training part.

Params: feedback (use, defence, user_split, min_prob, top_k, max_implausible, trusted_reviews, max_per_class,
anonymous_per_class,
min_records, max_per_submitter, split_key; repeat is the train stage's).
Reads: SNAPSHOTS/shard-*.rec (what `mnist-feedback snapshot` froze; never the live store).
Writes: --admitted {images,labels}.npy + meta.json (what train mixes in: empty without
feedback or with feedback.use false), --users {images,labels}.npy (submitters held out,
never trained on: evaluate scores them), --reviewed (those of them a reviewer accepted: the gate's
digits like users' that no attacker labelled), --report (counts, reasons, per submitter), --figure
(samples of each group), --quarantine (the review queue for `mnist-feedback review`: the quarantined ids
and reasons, then the user split's unjudged corrections, reason `user_split`).
Without feedback every output is empty and byte-stable, so nothing downstream reruns.
"""

from __future__ import annotations

import mnist_pipeline.kernels  # noqa: F401  first of all: pins torch's CPU kernels before torch loads

# isort: split
from pathlib import Path

from mnist_pipeline import stage
from mnist_pipeline.feedback import curate, splits
from mnist_pipeline.feedback.records import read_shards, shards
from mnist_pipeline.fileio import atomic_path, write_json


def configure(parser) -> None:
    parser.add_argument("snapshots", type=Path)
    for option in ("admitted", "users", "reviewed", "report", "figure", "quarantine"):
        parser.add_argument(f"--{option}", type=Path, required=True)


def main(argv: list[str] | None = None) -> int:
    args, params = stage.parse(__doc__, configure, argv)
    policy = params.feedback
    names = [p.name for p in shards(args.snapshots)]
    records = read_shards(args.snapshots).records
    result = curate.curate(records, policy)
    report = curate.report(records, result, policy, names)
    splits.save(
        args.admitted,
        result.admitted,
        {"corrections": len(result.admitted), "snapshot": report["snapshot"]["id"]},
    )
    splits.save(args.users, result.users)
    splits.save(args.reviewed, result.reviewed)
    write_json(args.report, report)
    # The review queue: what was quarantined, then the held-out users' corrections no one has judged yet (a
    # verdict on one of those makes it a digit the gate judges candidates on).
    judged = curate.verdicts(records)
    write_json(
        args.quarantine,
        [
            {"id": r.id, "reason": reason, "label": r.label, "answer": r.answer}
            for reason, rs in result.quarantined.items()
            for r in rs
        ]
        + [
            {"id": r.id, "reason": "user_split", "label": r.label, "answer": r.answer}
            for r in result.users
            if r.id not in judged
        ],
    )
    groups = {
        "admitted": result.admitted,
        "user split": result.users,
        **{f"quarantined: {k}": v for k, v in result.quarantined.items()},
    }
    with atomic_path(args.figure) as tmp:
        curate.sample_sheet(groups).save(tmp, "PNG")
    q = report["quarantined"]
    print(
        f"{report['corrections']} corrections from {report['submitters']} submitters "
        f"(snapshot {report['snapshot']['id']}): {report['admitted']} admitted, "
        f"{report['user_split']['samples']} in the user split, "
        + ", ".join(f"{n} {k}" for k, n in q.items())
        + " quarantined"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(stage.run(main))
