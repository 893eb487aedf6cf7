import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import synthetic_digits, write_mirror
from mnist_pipeline import processed
from mnist_pipeline.data import batch_indices, normalisation_stats, random_affine, stratified_split
from mnist_pipeline.errors import DatasetError

ROOT = Path(__file__).resolve().parents[1]


def test_stratified_split_is_exact_disjoint_proportional_and_seeded():
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate([50, 70, 30, 90, 60, 40, 80, 20, 65, 95])])
    train, val = stratified_split(labels, 60, seed=3)
    assert len(val) == 60 and len(train) == len(labels) - 60
    assert set(train.tolist()).isdisjoint(val.tolist())
    expected = torch.bincount(labels).double() * 60 / len(labels)
    got = torch.bincount(labels[val], minlength=10).double()
    assert torch.all((got - expected).abs() < 1)
    again_train, again_val = stratified_split(labels, 60, seed=3)
    assert torch.equal(val, again_val) and torch.equal(train, again_train)
    assert not torch.equal(val, stratified_split(labels, 60, seed=4)[1])


def test_stratified_split_rejects_impossible_sizes():
    with pytest.raises(DatasetError, match="data.val_size = 100: this dataset has only 100 training images"):
        stratified_split(torch.arange(100) % 10, 100, seed=0)


def test_batches_cover_every_index_once():
    g = torch.Generator().manual_seed(0)
    seen = torch.cat(list(batch_indices(103, 10, g)))
    assert sorted(seen.tolist()) == list(range(103))
    assert torch.equal(torch.cat(list(batch_indices(5, 2))), torch.arange(5))


def test_random_affine_keeps_shape_background_and_is_seeded():
    x = torch.zeros(64, 1, 28, 28)
    x[:, :, 10:18, 10:18] = 1  # an 8×8 block of ink at the centre, background 0
    a = random_affine(x, 15, 0.1, 2, torch.Generator().manual_seed(1))
    b = random_affine(x, 15, 0.1, 2, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a, x) and not torch.equal(a, random_affine(x, 15, 0.1, 2, torch.Generator().manual_seed(2)))
    # ±15° about the centre, ±10 % zoom and ±2 px moves no ink more than ~6 px: the outer 3 pixels
    # stay exact background, and the ink's mass changes only by the zoom's area factor.
    ring = torch.ones(28, 28, dtype=torch.bool)
    ring[3:25, 3:25] = False
    assert torch.count_nonzero(a[:, 0, ring]) == 0
    mass = a.sum((1, 2, 3))
    assert ((mass >= 64 * 0.9**2 * 0.97) & (mass <= 64 * 1.1**2 * 1.03)).all(), mass
    assert (a.amax((1, 2, 3)) > 0.99).all(), "the block's inside is still full ink"
    # Ink at the edge: what the warp brings in from outside the image is background, never repeated ink.
    edge = torch.zeros(64, 1, 28, 28)
    edge[:, :, :, :4] = 1
    assert (random_affine(edge, 15, 0.1, 2, torch.Generator().manual_seed(1)).sum((1, 2, 3))
            <= 112 * 1.1**2 * 1.03).all()
    identity = random_affine(x, 0, 0, 0, torch.Generator().manual_seed(1))
    assert torch.allclose(identity, x, atol=1e-5)


def test_shift_moves_ink_by_pixels():
    x = torch.zeros(1, 1, 28, 28)
    x[0, 0, 10:14, 10:14] = 1
    g = torch.Generator().manual_seed(0)
    out = random_affine(x.expand(256, 1, 28, 28).clone(), 0, 0, 3, g)
    ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    cx = (out[:, 0] * xs).sum((1, 2)) / out[:, 0].sum((1, 2))
    assert (cx - 11.5).abs().max() <= 3.01 and (cx - 11.5).abs().max() > 2


STATS = processed.Stats(dataset="mnist", classes=list("0123456789"), mean=0.13, std=0.31,
                        counts={"train": 12, "val": 12, "test": 12})


def test_processed_folder_round_trip_and_errors(tmp_path):
    images, labels = synthetic_digits(12, seed=0)
    split = (images, labels.long())
    processed.save(tmp_path / "ok", {"train": split, "val": split, "test": split}, STATS)
    x, y = processed.load_split(tmp_path / "ok", "test")
    assert torch.equal(x, images) and y.dtype == torch.int64
    assert processed.load_stats(tmp_path / "ok") == STATS
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.pt").write_bytes((tmp_path / "ok" / "train.pt").read_bytes()[:100])
    with pytest.raises(DatasetError, match="train.pt: not a readable tensor file"):
        processed.load_split(bad, "train")
    torch.save({"images": images.float(), "labels": labels}, bad / "val.pt")
    with pytest.raises(DatasetError, match="val.pt: expected uint8 images"):
        processed.load_split(bad, "val")
    with pytest.raises(DatasetError, match="test.pt: not found"):
        processed.load_split(bad, "test")


@pytest.mark.parametrize("content, message", [
    ("{not json", "not readable JSON"),
    ('{"dataset": "mnist"}', "expected an object with exactly"),
    ('{"dataset": "mnist", "classes": ["0", "1"], "mean": 0.1, "std": 0, "counts": {}}', "invalid std 0"),
    ('{"dataset": "mnist", "classes": ["0", "1"], "mean": NaN, "std": 0.3, "counts": {}}', "invalid mean nan"),
    ('{"dataset": "mnist", "classes": "01", "mean": 0.1, "std": 0.3, "counts": {}}', "invalid classes '01'"),
])
def test_bad_stats_json_is_named(tmp_path, content, message):
    (tmp_path / "stats.json").write_text(content)
    with pytest.raises(DatasetError, match=f"stats.json: .*{message}"):
        processed.load_stats(tmp_path)


def test_normalisation_stats():
    mean, std = normalisation_stats(torch.tensor([[[0, 255]]], dtype=torch.uint8))
    assert mean == pytest.approx(0.5) and std == pytest.approx(0.7071, abs=1e-4)


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.slow
def test_preprocess_twice_gives_identical_bytes(tmp_path):
    write_mirror(tmp_path / "raw", n_train=300, n_test=50, compressed=False)
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text().replace("val_size: 5000", "val_size: 50"))
    outs = []
    for run in ("a", "b"):
        result = subprocess.run([sys.executable, str(ROOT / "stages" / "preprocess.py"), str(tmp_path / "raw"),
                                 str(tmp_path / run), "--params", str(params)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        outs.append(_digests(tmp_path / run))
    assert outs[0] == outs[1]
    assert set(outs[0]) == {"train.pt", "val.pt", "test.pt", "stats.json"}
    train_x, _ = processed.load_split(tmp_path / "a", "train")
    val_x, _ = processed.load_split(tmp_path / "a", "val")
    assert (len(train_x), len(val_x)) == (250, 50)
    assert not list((tmp_path / "a").glob(".*tmp*"))
