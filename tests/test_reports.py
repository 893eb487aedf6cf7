import json

import numpy as np
import pytest
import torch

from mnist_pipeline import reports

CLASSES = ["a", "b", "c"]


def logits_for(predicted, num_classes=3):
    return torch.nn.functional.one_hot(torch.tensor(predicted), num_classes).double() * 5


def test_metrics_on_a_hand_made_prediction_set():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    predicted = [0, 0, 0, 1, 1, 1, 2, 2, 2, 0]
    m = reports.classification_metrics(logits_for(predicted), labels, CLASSES, num_params=123)
    cm = reports.confusion_matrix(labels, torch.tensor(predicted), 3)
    assert cm.tolist() == [[3, 1, 0], [0, 2, 1], [1, 0, 2]]
    assert m["accuracy"] == 0.7 and m["errors"] == 3 and m["samples"] == 10 and m["params"] == 123
    # class a: P = 3/4, R = 3/4; b: P = 2/3, R = 2/3; c: P = 2/3, R = 2/3
    assert m["per_class"]["a"] == {"precision": 0.75, "recall": 0.75, "f1": 0.75, "support": 4}
    assert m["per_class"]["b"]["f1"] == pytest.approx(2 / 3, abs=1e-6)
    assert m["macro_f1"] == pytest.approx((0.75 + 2 / 3 + 2 / 3) / 3, abs=1e-6)
    assert m["loss"] > 0
    json.dumps(m)


def test_absent_class_scores_zero_not_nan():
    labels = torch.tensor([0, 0, 1])
    m = reports.classification_metrics(logits_for([0, 0, 0]), labels, CLASSES, 1)
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["per_class"]["b"]["recall"] == 0.0


def test_confusion_rows_for_dvc_template():
    rows = reports.confusion_rows(torch.tensor([0, 2]), torch.tensor([1, 2]), CLASSES)
    assert rows == [{"actual": "a", "predicted": "b"}, {"actual": "c", "predicted": "c"}]


def test_figures_are_written(tmp_path):
    import pandas as pd

    labels = torch.tensor([0, 1, 2, 1])
    logits = logits_for([0, 2, 2, 0])
    images = torch.randint(0, 255, (4, 28, 28), dtype=torch.uint8)
    reports.plot_confusion(reports.confusion_matrix(labels, logits.argmax(1), 3), CLASSES, tmp_path / "c.png")
    reports.plot_misclassified(images, labels, logits, CLASSES, tmp_path / "m.png")
    history = pd.DataFrame({"epoch": [1, 2], "train_loss": [1, 0.5], "val_loss": [1, 0.6],
                            "train_acc": [0.5, 0.8], "val_acc": [0.5, 0.7]})
    reports.plot_history(history, tmp_path / "h.png")
    from PIL import Image

    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "h.png", "m.png"]
    shown = {}
    for name in ("c.png", "m.png", "h.png"):
        with Image.open(tmp_path / name) as image:  # decodes: a real PNG, not just its magic bytes
            assert image.format == "PNG" and min(image.size) >= 150
            shown[name] = np.asarray(image.convert("RGB"))
        assert len(np.unique(shown[name].reshape(-1, 3), axis=0)) > 20, f"{name} is (nearly) blank"
    # The confusion matrix: its diagonal cells are shaded (Blues), so deep blue pixels are present.
    c = shown["c.png"].astype(int)
    assert ((c[..., 2] - c[..., 0] > 100) & (c[..., 2] > 100)).sum() > 1000
    # Two of the four images are wrong, so two panels show digits: dark pixels from the images.
    assert (shown["m.png"].max(axis=2) < 60).sum() > 200


def test_curves_show_the_error_rate_on_a_log_axis():
    import pandas as pd

    history = pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [1, 0.5, 0.4], "val_loss": [1, 0.6, 0.5],
                            "train_acc": [0.9, 0.99, 0.995], "val_acc": [0.95, 0.991, 1.0]})
    _, errors = reports.history_figure(history).axes
    assert errors.get_yscale() == "log"
    train, val = errors.get_lines()
    assert list(train.get_ydata()) == pytest.approx([10.0, 1.0, 0.5])  # percent
    assert list(val.get_ydata()) == pytest.approx([5.0, 0.9, 1e-3])   # a perfect epoch is clipped, not lost
