"""Metrics, confusion data and figures from predictions.

Everything here is a pure function of logits and labels (plus the history), so
the metrics JSON and the confusion rows are byte-identical for the same model.
Figures are drawn on `matplotlib.figure.Figure` objects and rendered by Agg, so no
display, no pyplot state and no global backend switch are involved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from mnist_pipeline.fileio import atomic_path


def confusion_matrix(labels: torch.Tensor, predicted: torch.Tensor, num_classes: int) -> torch.Tensor:
    """counts[actual, predicted]."""
    flat = labels.long() * num_classes + predicted.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_report(confusion: torch.Tensor, classes: list[str]) -> pd.DataFrame:
    """Precision, recall, F1 and support per class (0 where a ratio is undefined)."""
    cm = confusion.double()
    tp = cm.diag()
    predicted = cm.sum(0)
    actual = cm.sum(1)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(actual > 0, tp / actual.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), torch.zeros_like(tp))
    return pd.DataFrame(
        {
            "precision": precision.tolist(),
            "recall": recall.tolist(),
            "f1": f1.tolist(),
            "support": actual.long().tolist(),
        },
        index=pd.Index(classes, name="class"),
    )


def _round(x: float | torch.Tensor) -> float:
    # 6 significant decimals: enough to compare runs, and stable to print.
    return round(float(x), 6)


def classification_metrics(
    logits: torch.Tensor, labels: torch.Tensor, classes: list[str], num_params: int
) -> dict[str, Any]:
    predicted = logits.argmax(1)
    confusion = confusion_matrix(labels, predicted, len(classes))
    report = per_class_report(confusion, classes)
    errors = int((predicted != labels).sum())
    return {
        "accuracy": _round(1 - errors / len(labels)),
        "loss": _round(F.cross_entropy(logits.double(), labels)),
        "macro_f1": _round(report["f1"].mean()),
        "errors": errors,
        "samples": len(labels),
        "params": num_params,
        "per_class": {
            name: {k: (_round(v) if k != "support" else int(v)) for k, v in row.items()}
            for name, row in report.to_dict(orient="index").items()
        },
    }


def users_metrics(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> dict[str, Any]:
    """Accuracy and calibration (ECE with the val-fitted temperature) on the users' held-out digits."""
    from mnist_pipeline.calibration import expected_calibration_error

    if len(labels) == 0:
        return {"samples": 0, "accuracy": None, "errors": None, "ece": None}
    errors = int((logits.argmax(1) != labels).sum())
    probs = F.softmax(logits.double() / temperature, dim=1)
    return {
        "samples": len(labels),
        "accuracy": _round(1 - errors / len(labels)),
        "errors": errors,
        "ece": _round(expected_calibration_error(probs, labels)),
    }


def confusion_rows(labels: torch.Tensor, predicted: torch.Tensor, classes: list[str]) -> list[dict[str, str]]:
    """One {actual, predicted} row per test image, the shape DVC's `confusion` template reads."""
    return [
        {"actual": classes[a], "predicted": classes[p]}
        for a, p in zip(labels.tolist(), predicted.tolist(), strict=True)
    ]


def _save(fig: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        # Fixed metadata keeps the PNG bytes independent of the matplotlib build date.
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})


def plot_confusion(confusion: torch.Tensor, classes: list[str], path: Path) -> None:
    cm = confusion.numpy()
    fig = Figure(figsize=(7, 6))
    ax = fig.subplots()
    shown = cm.astype(float)
    ax.imshow(shown / shown.sum(1, keepdims=True).clip(min=1), cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            if cm[i, j]:
                ax.text(
                    j, i, str(cm[i, j]), ha="center", va="center", fontsize=8, color="white" if i == j else "crimson"
                )
    ax.set_xticks(range(len(classes)), classes, rotation=45 if max(map(len, classes)) > 2 else 0)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    errors = int(cm.sum() - cm.trace())
    ax.set_title(f"Confusion matrix (test): {errors} errors of {int(cm.sum())}")
    fig.tight_layout()
    _save(fig, path)


def plot_misclassified(
    images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor, classes: list[str], path: Path, count: int = 24
) -> None:
    """The most confidently wrong test images, with true class, prediction and confidence."""
    probs = logits.softmax(1)
    confidence, predicted = probs.max(1)
    wrong = torch.nonzero(predicted != labels).flatten()
    order = wrong[torch.argsort(confidence[wrong], descending=True, stable=True)][:count]
    cols = 8
    rows = max(1, -(-len(order) // cols))
    fig = Figure(figsize=(cols * 1.4, rows * 1.7))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, order.tolist(), strict=False):
        ax.imshow(images[i].numpy(), cmap="gray_r")
        ax.set_title(f"{classes[labels[i]]}→{classes[predicted[i]]} {confidence[i]:.0%}", fontsize=8)
    fig.suptitle("Most confidently wrong test images (true→predicted confidence)", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def history_figure(history: pd.DataFrame) -> Figure:
    """Loss, and the error rate (1 − accuracy) on a log axis: above 98 % accuracy a linear
    0–1 axis shows flat lines, while halving the error shows as the same step wherever it is."""
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_err = fig.subplots(1, 2)
    ax_loss.plot(history["epoch"], history["train_loss"], label="train")
    ax_loss.plot(history["epoch"], history["val_loss"], label="val")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    # A zero error (tiny or easy data) has no logarithm: clip at a tenth of a test image's share.
    for column, label in (("train_acc", "train (augmented)"), ("val_acc", "val")):
        ax_err.plot(history["epoch"], (100 * (1 - history[column])).clip(lower=1e-3), label=label)
    ax_err.set_yscale("log")
    ax_err.yaxis.set_major_formatter(PercentFormatter(decimals=1))
    ax_err.set_xlabel("epoch")
    ax_err.set_ylabel("error rate (log scale)")
    ax_err.grid(True, which="both", alpha=0.3)
    ax_err.legend()
    fig.suptitle("Training curves")
    fig.tight_layout()
    return fig


def plot_history(history: pd.DataFrame, path: Path) -> None:
    _save(history_figure(history), path)


def plot_reliability(
    before: list[dict[str, float]],
    after: list[dict[str, float]],
    temperature: float,
    eces: tuple[float, float],
    path: Path,
) -> None:
    """Accuracy against confidence per bin (`calibration.reliability`), before and after the temperature."""
    fig = Figure(figsize=(6, 5))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="perfectly calibrated")
    for rows, label, ece, style in (
        (before, "softmax as trained", eces[0], "o-"),
        (after, f"÷ temperature {temperature:.3f}", eces[1], "s-"),
    ):
        kept = [r for r in rows if r["count"]]
        ax.plot(
            [r["confidence"] for r in kept],
            [r["accuracy"] for r in kept],
            style,
            markersize=4,
            label=f"{label} (ECE {ece:.2%})",
        )
    ax.set_xlabel("confidence (mean of the bin)")
    ax.set_ylabel("accuracy in the bin")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("Reliability (test): temperature fitted on validation")
    fig.tight_layout()
    _save(fig, path)
