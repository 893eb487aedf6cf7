"""Curation: the snapshot's corrections → a held-out user split and the admitted training part.

Corrections are untrusted. The split is by submitter (a hash of the pseudonym keyed by
`feedback.split_key`, not by the training seed: a seed sweep scores the same users) and by image:
an image a held-out user sent is held out under every pseudonym, so no digit is both trained on
and scored. The user split is every correction that passes review: it is scored on what users
sent, never only on what a model agreed with (a filter by the model's own probability would drop
exactly its confident mistakes and flatter it).

No rule here survives an attacker who reads it; the gate (mnist_pipeline/gate.py) is the
defence that does. These rules bound what any one identity, and all anonymous ones together,
can teach, and hand out trust only for what an attacker cannot make cheaply. In the order they
apply to the training part:

1. review: a person's verdict (`mnist-feedback review`) overrides everything below; a submitter
   with at least `trusted_reviews` corrections accepted and none rejected (ever: a label sent
   again does not undo a rejection) is trusted: their implausible labels pass, and neither the
   submitter rule (3) nor the per-digit bounds (4, 5) apply to them;
2. implausible: a label the model that answered gave less than `min_prob` (its calibrated
   probability, recorded when the correction came in, so out of sample) *and* that is not among
   its `top_k` guesses, unless another submitter gave the same image the same label
   (independent agreement). Plausible labels earn no trust: a runner-up label costs nothing;
3. submitter: a submitter with at least `min_records` disagreements with the model (label ≠
   answer), more than `max_implausible` of them implausible, loses all their corrections;
4. cap: at most `max_per_submitter` records of one submitter, the earliest, and at most
   `max_per_class` disagreements labelled any one digit, so a flood of 7s called 1 counts as
   that many and no more;
5. anonymous: submitters whose identity costs nothing (an address, a name in an imported file;
   `records.anonymous`) together get at most `anonymous_per_class` admitted disagreements
   labelled any one digit, shared out one submitter at a time.

`defence: false` turns 2–5 off (naive ingest), for comparison. A submitter is a person: the
pseudonym without its kind letter (`identity_key`), so an address keyed before the letter
existed and after it is one submitter, under one set of caps. Duplicates (one submitter, one
image) keep the latest label. The policy is params.yaml's `feedback:` section itself
(`FeedbackParams`). Everything here is numpy: the stage needs no torch.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from mnist_pipeline.feedback.records import Record, anonymous
from mnist_pipeline.params import FeedbackParams

if TYPE_CHECKING:
    from PIL import Image

REASONS = ("rejected", "held_out_image", "implausible", "submitter", "cap", "class_cap", "anonymous")


@dataclass
class Curated:
    admitted: list[Record] = field(default_factory=list)
    users: list[Record] = field(default_factory=list)
    reviewed: list[Record] = field(default_factory=list)  # the user split's corrections a reviewer accepted: the gate's
    quarantined: dict[str, list[Record]] = field(default_factory=lambda: {r: [] for r in REASONS})
    held_out_submitters: set[str] = field(default_factory=set)
    trusted_submitters: set[str] = field(default_factory=set)


def held_out(submitter: str, share: float, key: str) -> bool:
    """Whether a submitter's records form part of the user split: a keyed hash, stable as records arrive. The
    pseudonym's kind letter is not hashed, so an address keyed `s…` before the letter meant anything is on the same
    side."""
    digest = hashlib.sha256(f"{key}:{identity_key(submitter)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def identity_key(submitter: str) -> str:
    """A pseudonym without its kind letter (records.pseudonym); any other name as it is."""
    return submitter[1:] if re.fullmatch(r"[ans][0-9a-f]{15}", submitter) else submitter


def image_key(r: Record) -> bytes:
    assert r.image is not None
    return hashlib.sha256(r.image.tobytes()).digest()


def latest_per_image(records: list[Record]) -> list[Record]:
    """One record per (submitter, image): the last label a person gave a digit is the one they meant."""
    kept: dict[tuple[str, bytes], Record] = {}
    for r in records:  # in id order, so later ones replace earlier ones
        kept[(identity_key(r.submitter), image_key(r))] = r
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


def trusted(latest: list[Record], every: list[Record], reviewed: dict[str, str], needed: int) -> set[str]:
    """Submitters (`identity_key`) a reviewer vouched for: at least `needed` of their latest labels (one per image)
    accepted, and no correction they ever sent rejected. A label sent again replaces an accepted one, so it no
    longer counts (nor do three accepted copies of one image), while it cannot hide a rejection."""
    accepted = Counter(identity_key(r.submitter) for r in latest if reviewed.get(r.id) == "accept")
    rejected = {identity_key(r.submitter) for r in every if reviewed.get(r.id) == "reject"}
    return {s for s, n in accepted.items() if n >= needed and s not in rejected}


def corroborated(corrections: list[Record]) -> set[str]:
    """Ids of corrections whose label another submitter whose identity cost something (signed in, a token, an
    operator) gave the same image: independent agreement. Anonymous copies agree with whatever they are told to."""
    givers: dict[tuple[bytes, int], set[str]] = defaultdict(set)
    for r in corrections:
        if not anonymous(r.submitter):
            givers[(image_key(r), r.label)].add(identity_key(r.submitter))
    return {r.id for r in corrections if givers[(image_key(r), r.label)] - {identity_key(r.submitter)}}


def round_robin(candidates: list[Record], room: int) -> tuple[list[Record], list[Record]]:
    """(kept, left): up to `room` records taken one per submitter in turn, each submitter's earliest first, so
    that many identities share the room with everyone else instead of filling it."""
    queues: dict[str, list[Record]] = defaultdict(list)
    for r in sorted(candidates, key=lambda r: r.id):
        queues[identity_key(r.submitter)].append(r)
    kept: list[Record] = []
    while len(kept) < room and any(queues.values()):
        for submitter in sorted(queues):
            if queues[submitter] and len(kept) < room:
                kept.append(queues[submitter].pop(0))
    left = [r for q in queues.values() for r in q]
    return kept, left


def curate(records: list[Record], policy: FeedbackParams) -> Curated:
    reviewed = verdicts(records)
    every = [r for r in records if r.kind == "correction"]
    corrections = latest_per_image(every)
    out = Curated(trusted_submitters=trusted(corrections, every, reviewed, policy.trusted_reviews))
    agreed = corroborated(corrections)
    users = {
        identity_key(r.submitter) for r in corrections if held_out(r.submitter, policy.user_split, policy.split_key)
    }
    out.held_out_submitters = users
    # An image a held-out user sent is held out under every pseudonym: scored once, trained on by no one.
    held_images: dict[bytes, Record] = {}
    for r in corrections:  # the copy scored: one a reviewer accepted, else the earliest
        if identity_key(r.submitter) in users and reviewed.get(r.id) != "reject":
            first = held_images.get(image_key(r))
            if first is None or (reviewed.get(r.id) == "accept" and reviewed.get(first.id) != "accept"):
                held_images[image_key(r)] = r
    by_submitter: dict[str, list[Record]] = defaultdict(list)
    for r in corrections:
        by_submitter[identity_key(r.submitter)].append(r)
    pending: list[Record] = []  # admitted so far: anonymous disagreements still face the per-class bound
    for submitter, mine in sorted(by_submitter.items()):
        vouched = submitter in out.trusted_submitters
        implausible = {
            r.id
            for r in mine
            if reviewed.get(r.id) != "accept" and r.id not in agreed and not plausible(r, policy.min_prob, policy.top_k)
        }
        disagreements = sum(r.label != r.answer for r in mine)
        distrusted = (
            not vouched
            and disagreements >= policy.min_records
            and len(implausible) > policy.max_implausible * disagreements
        )
        kept, per_class = 0, Counter[int]()
        for r in mine:
            verdict = reviewed.get(r.id)
            reason: str | None = None
            if verdict == "reject":
                reason = "rejected"
            elif submitter in users:
                if held_images.get(image_key(r)) is not r:
                    reason = "held_out_image"  # another held-out user's copy of it is the one scored
            elif image_key(r) in held_images:
                reason = "held_out_image"
            elif verdict == "accept" or not policy.defence:
                pass
            elif distrusted:
                reason = "submitter"
            elif r.id in implausible and not vouched:
                reason = "implausible"
            elif kept >= policy.max_per_submitter:
                reason = "cap"
            elif r.label != r.answer and not vouched and per_class[r.label] >= policy.max_per_class:
                reason = "class_cap"
            if reason is not None:
                out.quarantined[reason].append(r)
            elif submitter in users:
                out.users.append(r)
            else:
                pending.append(r)
                kept += 1
                per_class[r.label] += r.label != r.answer
    # Anonymous identities are cheap to multiply: together, their disagreements admitted in any one class are
    # bounded, shared out one submitter at a time.
    bounded = [
        r
        for r in pending
        if policy.defence
        and anonymous(r.submitter)
        and r.label != r.answer
        and reviewed.get(r.id) != "accept"
        and identity_key(r.submitter) not in out.trusted_submitters
    ]
    over: set[str] = set()
    for c in range(10):
        _, left = round_robin([r for r in bounded if r.label == c], policy.anonymous_per_class)
        over |= {r.id for r in left}
    out.admitted = [r for r in pending if r.id not in over]
    out.reviewed = [r for r in out.users if reviewed.get(r.id) == "accept"]
    out.quarantined["anonymous"] = [r for r in pending if r.id in over]
    if not policy.use:
        out.admitted = []
    return out


def snapshot_id(shard_names: list[str]) -> str:
    """Names carry their content hash, so the list of names identifies the snapshot."""
    return hashlib.sha256("\n".join(shard_names).encode()).hexdigest()[:12] if shard_names else "none"


def report(records: list[Record], result: Curated, policy: FeedbackParams, shard_names: list[str]) -> dict[str, Any]:
    """metrics/curate.json: byte-stable counts (no times), so `dvc metrics diff` shows what changed."""
    corrections = [r for r in records if r.kind == "correction"]
    per: dict[str, Counter] = defaultdict(Counter)  # by person, as curate counts them: identity_key
    for r in result.admitted:
        per[identity_key(r.submitter)]["admitted"] += 1
    for r in result.users:
        per[identity_key(r.submitter)]["user_split"] += 1
    for reason, rs in result.quarantined.items():
        for r in rs:
            per[identity_key(r.submitter)][reason] += 1
    return {
        "snapshot": {"id": snapshot_id(shard_names), "shards": len(shard_names), "records": len(records)},
        "corrections": len(corrections),
        "reviews": len(records) - len(corrections),
        "submitters": len({identity_key(r.submitter) for r in corrections}),
        "use": policy.use,
        "defence": policy.defence,
        "admitted": len(result.admitted),
        "user_split": {"samples": len(result.users), "submitters": len(result.held_out_submitters)},
        "reviewed": len(result.reviewed),
        "trusted_submitters": len(result.trusted_submitters),
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
