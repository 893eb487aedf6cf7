"""Curation: the snapshot's corrections → a held-out user split and the admitted training part.

Corrections are untrusted. The split is by submitter (a hash of the pseudonym keyed by
`feedback.split_key`, not by the training seed: a seed sweep scores the same users), so no
writer's digits are both trained on and scored. The user split is every correction that passes
review: it is scored on what users sent, never only on what a model agreed with (a filter by the
model's own probability would drop exactly its confident mistakes and flatter it). The defence,
in the order it is applied to the training part:

1. review: a person's verdict (`mnist-feedback review`) overrides everything below;
2. implausible: a label the model that answered gave less than `min_prob` (its calibrated
   probability, recorded when the correction came in, so out of sample: that model never
   trained on it) *and* that is not among its `top_k` guesses. The rank is what keeps honest
   corrections: when the model is confidently wrong, the true digit is nearly always its second
   or third guess, while a careless user's random label lands anywhere among the nine others
   and an adversary's chosen one (a 7 called 1) is rarely a near miss (docs/feedback.md has
   the measured shares);
3. submitter: a submitter with at least `min_records` disagreements with the model (label ≠
   answer), more than `max_implausible` of them implausible, loses all their corrections: an
   adversary flipping 7s to 1s at volume is judged as a whole. Only disagreements count, so
   confirmations ("Right ✓") cannot dilute the share, and a record a reviewer accepted is
   not implausible. The other way round, a submitter whose disagreements are implausible at
   most `trusted_implausible` of the time is trusted, and their implausible labels pass too:
   an honest user's rare correction that the model ranked lower still, with no evidence
   against it;
4. cap: at most `max_per_submitter` records of one submitter, the earliest, so one flood
   cannot outweigh everyone else.

`defence: false` turns 2–4 off (naive ingest), for comparison. Duplicates (one submitter,
one image) keep the latest label. The policy is params.yaml's `feedback:` section itself
(`FeedbackParams`). Everything here is numpy: the stage needs no torch.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from mnist_pipeline.feedback.records import Record
from mnist_pipeline.params import FeedbackParams

if TYPE_CHECKING:
    from PIL import Image

REASONS = ("rejected", "implausible", "submitter", "cap")


@dataclass
class Curated:
    admitted: list[Record] = field(default_factory=list)
    users: list[Record] = field(default_factory=list)
    quarantined: dict[str, list[Record]] = field(default_factory=lambda: {r: [] for r in REASONS})
    held_out_submitters: set[str] = field(default_factory=set)


def held_out(submitter: str, share: float, key: str) -> bool:
    """Whether a submitter's records form part of the user split: a keyed hash, stable as records arrive."""
    digest = hashlib.sha256(f"{key}:{submitter}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def latest_per_image(records: list[Record]) -> list[Record]:
    """One record per (submitter, image): the last label a person gave a digit is the one they meant."""
    kept: dict[tuple[str, bytes], Record] = {}
    for r in records:  # in id order, so later ones replace earlier ones
        assert r.image is not None
        kept[(r.submitter, hashlib.sha256(r.image.tobytes()).digest())] = r
    return sorted(kept.values(), key=lambda r: r.id)


def verdicts(records: list[Record]) -> dict[str, str]:
    """target id → the latest review verdict."""
    return {r.target: r.verdict for r in records if r.kind == "review"}


def plausible(r: Record, min_prob: float, top_k: int) -> bool:
    """Whether the answering model found the label possible: enough probability, or one of its top guesses."""
    if not 0 <= r.label < len(r.probabilities):
        return False
    p = r.probabilities[r.label]
    return p >= min_prob or sum(q > p for q in r.probabilities) < top_k


def curate(records: list[Record], policy: FeedbackParams) -> Curated:
    reviewed = verdicts(records)
    corrections = latest_per_image([r for r in records if r.kind == "correction"])
    out = Curated()
    by_submitter: dict[str, list[Record]] = defaultdict(list)
    for r in corrections:
        by_submitter[r.submitter].append(r)
    for submitter, mine in sorted(by_submitter.items()):
        users = held_out(submitter, policy.user_split, policy.split_key)
        if users:
            out.held_out_submitters.add(submitter)
        implausible = {
            r.id for r in mine if reviewed.get(r.id) != "accept" and not plausible(r, policy.min_prob, policy.top_k)
        }
        disagreements = sum(r.label != r.answer for r in mine)
        distrusted = disagreements >= policy.min_records and len(implausible) > policy.max_implausible * disagreements
        trusted = len(implausible) <= policy.trusted_implausible * disagreements
        kept = 0
        for r in mine:
            verdict = reviewed.get(r.id)
            if verdict == "reject":
                reason: str | None = "rejected"
            elif verdict == "accept" or not policy.defence or users:
                reason = None
            elif distrusted:
                reason = "submitter"
            elif r.id in implausible and not trusted:
                reason = "implausible"
            elif kept >= policy.max_per_submitter:
                reason = "cap"
            else:
                reason = None
            if reason is not None:
                out.quarantined[reason].append(r)
            elif users:
                out.users.append(r)
            else:
                out.admitted.append(r)
                kept += 1
    if not policy.use:
        out.admitted = []
    return out


def snapshot_id(shard_names: list[str]) -> str:
    """Names carry their content hash, so the list of names identifies the snapshot."""
    return hashlib.sha256("\n".join(shard_names).encode()).hexdigest()[:12] if shard_names else "none"


def report(records: list[Record], result: Curated, policy: FeedbackParams, shard_names: list[str]) -> dict[str, Any]:
    """metrics/curate.json: byte-stable counts (no times), so `dvc metrics diff` shows what changed."""
    corrections = [r for r in records if r.kind == "correction"]
    per: dict[str, Counter] = defaultdict(Counter)
    for r in result.admitted:
        per[r.submitter]["admitted"] += 1
    for r in result.users:
        per[r.submitter]["user_split"] += 1
    for reason, rs in result.quarantined.items():
        for r in rs:
            per[r.submitter][reason] += 1
    return {
        "snapshot": {"id": snapshot_id(shard_names), "shards": len(shard_names), "records": len(records)},
        "corrections": len(corrections),
        "reviews": len(records) - len(corrections),
        "submitters": len({r.submitter for r in corrections}),
        "use": policy.use,
        "defence": policy.defence,
        "admitted": len(result.admitted),
        "user_split": {"samples": len(result.users), "submitters": len(result.held_out_submitters)},
        "quarantined": {reason: len(rs) for reason, rs in result.quarantined.items()},
        "admitted_per_class": [sum(r.label == c for r in result.admitted) for c in range(10)],
        "per_submitter": {s: dict(sorted(c.items())) for s, c in sorted(per.items())},
    }


def sample_sheet(groups: dict[str, list[Record]], per_row: int = 16, scale: int = 2) -> Image.Image:
    """One row per group: its name and count, then up to `per_row` digits with their labels (white on black)."""
    from PIL import Image, ImageDraw

    cell, label_w = 28 * scale + 4, 150
    sheet = Image.new("L", (label_w + per_row * cell, max(1, len(groups)) * (cell + 12)), 255)
    draw = ImageDraw.Draw(sheet)
    for row, (name, records) in enumerate(groups.items()):
        top = row * (cell + 12)
        draw.text((4, top + cell // 2 - 6), f"{name} ({len(records)})", fill=0)
        for i, r in enumerate(records[:per_row]):
            assert r.image is not None
            digit = Image.fromarray((np.clip(r.image, 0, 1) * 255).round().astype(np.uint8), "L")
            x = label_w + i * cell
            sheet.paste(digit.resize((28 * scale, 28 * scale), Image.Resampling.NEAREST), (x, top + 2))
            draw.text(
                (x + 2, top + cell - 2), f"{r.label}" + ("" if r.answer == r.label else f" (model {r.answer})"), fill=0
            )
    return sheet
