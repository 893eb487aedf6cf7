"""Temperature scaling: fitted on held-out data, measured by ECE and NLL, shipped inside the exported model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mnist_pipeline import calibration, export, exported
from mnist_pipeline.models import CNN


def calibrated_data(n: int = 20_000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels drawn from softmax(logits): calibrated as they are (T = 1)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 10, generator=g, dtype=torch.float64) * 3
    labels = torch.multinomial(logits.softmax(1), 1, generator=g).flatten()
    return logits, labels


@pytest.mark.parametrize("scale", [0.4, 1.0, 3.0])
def test_the_fitted_temperature_undoes_a_mis_scaling(scale):
    logits, labels = calibrated_data()
    t = calibration.fit_temperature(logits * scale, labels)
    assert t == pytest.approx(scale, rel=0.05)
    test_logits, test_labels = calibrated_data(seed=1)
    report, _, _ = calibration.report(logits * scale, labels, test_logits * scale, test_labels)
    # Fitted on one sample and scored on another: an already calibrated model may lose a hair of NLL.
    assert report["ece_after"] < 0.015 and report["nll_after"] <= report["nll_before"] + (1e-3 if scale == 1 else 0)
    if scale != 1.0:  # an uncalibrated model is caught: its ECE is far over the calibrated one's
        assert report["ece_before"] > 3 * report["ece_after"] and report["ece_before"] > 0.03


def test_ece_of_a_known_case():
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 0])  # bin 0.9: 50 % right; bin 0.6: 100 % right
    assert calibration.expected_calibration_error(probs, labels) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    rows = [r for r in calibration.reliability(probs, labels) if r["count"]]
    assert [(r["count"], r["accuracy"]) for r in rows] == [(2, 1.0), (2, 0.5)]


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_the_exported_model_carries_its_temperature(tmp_path, fmt):
    torch.manual_seed(0)
    model = CNN([[4], [8]], 0.0)
    plain, scaled = export.deployable(model, 0.13, 0.31), export.deployable(model, 0.13, 0.31, temperature=2.5)
    meta = exported.metadata("cnn", list("0123456789"), 0.13, 0.31)
    x = np.random.default_rng(0).random((16, 28, 28)).astype(np.float32)
    path = tmp_path / exported.FILE_NAMES[fmt]
    (export.export_onnx(scaled, path, 18, meta) if fmt == "onnx" else export.export_pt2(scaled, path, meta))
    loaded = exported.load_model(path, trust_pickle=True)
    with torch.no_grad():
        logits = plain(torch.from_numpy(x)[:, None]).double()
    assert np.allclose(loaded.probabilities(x), (logits / 2.5).softmax(1).numpy(), atol=1e-5)
    assert not np.allclose(loaded.probabilities(x), logits.softmax(1).numpy(), atol=1e-3)
