"""The gate: is the candidate model at least as good as the champion, per class, beyond noise?

Only a blessed model is promoted (`mnist-promote`), and the gate is the defence an attacker who
reads curate's rules cannot read around: it compares the two models on data no user controls,
the validation split (MNIST's own digits, never trained on) and corrections a reviewer accepted
from the held-out users (digits like users', labelled by a person, trained on by no model). Never
MNIST's test split: that stays a test.

Each slice is judged on its own, as TFX's Evaluator judges slices: a 7 → 1 attack barely moves
MNIST's 7s while it flips users' 7s. Within a slice the two models answered the same images, so
the comparison is paired: McNemar's exact test on the images one model got right and the other
wrong (`b`: only the champion right, `c`: only the candidate), one-sided, `P(X ≥ b)` for
`X ~ Binomial(b + c, 1/2)`. A class is significantly worse when b > c and that p-value is under
`alpha / classes` (Bonferroni over the classes of a slice); the slice as a whole when it is under
`alpha`. The candidate is blessed when nothing is.

Two models trained on the same data with other seeds already differ by about 0.07 points on
MNIST, and a paired test on 5,000 images sees that as a real difference: honest loops were refused
for 8 images in 5,000. So a group may lose up to `margin` of its images (rounded down: 5 of the
5,000 validation digits at 0.1 %, none of a class's 500 or of a few hundred reviewed digits)
before the test starts counting: the test is of non-inferiority, b − m against c. Pure Python and
numpy: exact integers, so the verdict is the same bytes on every machine.

A model's identity, as the champion record (models/champion.json) and the verdict write it, is its
checkpoint's MD5 (the key DVC's cache keeps it under) and its ONNX file's SHA-256 (what a server
reports); the gate stage, `mnist-promote` and the feedback benchmark all take it from `identity`.
"""

from __future__ import annotations

import hashlib
import json
import re
from math import comb
from pathlib import Path
from typing import Any

import numpy as np

from mnist_pipeline.errors import DatasetError
from mnist_pipeline.fileio import sha256_file

HEX32, HEX64 = re.compile(r"[0-9a-f]{32}"), re.compile(r"[0-9a-f]{64}")


def identity(checkpoint: bytes, model: Path) -> dict[str, str]:
    """A model's identity: its checkpoint's MD5 (given the checkpoint's bytes) and its ONNX file's SHA-256."""
    return {"checkpoint_md5": hashlib.md5(checkpoint).hexdigest(), "model_sha256": sha256_file(model)}


def read_champion(path: Path) -> dict[str, Any]:
    """models/champion.json, its hashes checked: an MD5 becomes a path in DVC's cache, so `../` must not."""
    try:
        champion = json.loads(path.read_text())
        md5, sha = champion["checkpoint_md5"], champion["model_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{path}: not a champion record ({type(exc).__name__}: {exc})") from None
    if not (isinstance(md5, str) and HEX32.fullmatch(md5) and isinstance(sha, str) and HEX64.fullmatch(sha)):
        raise DatasetError(f"{path}: checkpoint_md5 must be 32 lowercase hex digits and model_sha256 64")
    return champion


def worse_p(b: int, c: int) -> float:
    """One-sided exact McNemar p-value that the candidate is worse: P(X ≥ b), X ~ Binomial(b + c, 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    return sum(comb(n, k) for k in range(b, n + 1)) / 2**n


def paired(
    champion: np.ndarray, candidate: np.ndarray, labels: np.ndarray, alpha: float, margin: float = 0.0
) -> dict[str, Any]:
    """The counts, p-value and verdict of one group of images both models answered; up to `margin` of the images
    lost are allowed before the test counts."""
    right_before, right_after = champion == labels, candidate == labels
    b = int((right_before & ~right_after).sum())
    c = int((~right_before & right_after).sum())
    allowed = int(margin * len(labels))
    p = worse_p(max(b - allowed, 0), c)
    return {
        "images": int(len(labels)),
        "champion_correct": int(right_before.sum()),
        "candidate_correct": int(right_after.sum()),
        "only_champion": b,
        "only_candidate": c,
        "allowed": allowed,
        "p_worse": round(p, 6),
        "worse": b - allowed > c and p < alpha,
    }


def judge_slice(
    champion: np.ndarray,
    candidate: np.ndarray,
    labels: np.ndarray,
    alpha: float,
    margin: float = 0.0,
    classes: int = 10,
) -> dict[str, Any]:
    """A slice overall at `alpha`, and each class at `alpha / classes`, each allowed to lose `margin` of its images."""
    per_class = {
        str(k): paired(champion[labels == k], candidate[labels == k], labels[labels == k], alpha / classes, margin)
        for k in range(classes)
    }
    return {"overall": paired(champion, candidate, labels, alpha, margin), "per_class": per_class}


def verdict(slices: dict[str, dict[str, Any]]) -> tuple[bool, list[str]]:
    """(blessed, the reasons it is not): every class and slice that got significantly worse."""
    reasons = []
    for name, judged in slices.items():
        if judged["overall"]["worse"]:
            o = judged["overall"]
            reasons.append(
                f"{name}: worse overall ({o['candidate_correct']} right against {o['champion_correct']} "
                f"of {o['images']}, p = {o['p_worse']:.2g})"
            )
        for k, r in judged["per_class"].items():
            if r["worse"]:
                reasons.append(
                    f"{name}: class {k} worse ({r['only_champion']} images only the champion got right, "
                    f"{r['only_candidate']} only the candidate, p = {r['p_worse']:.2g})"
                )
    return not reasons, reasons
