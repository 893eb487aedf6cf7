import json
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import synthetic_digits
from mnist_pipeline import export, exported
from mnist_pipeline.serving import predict
from mnist_pipeline.errors import ParityError
from mnist_pipeline.images import ImageError, prepare_file
from conftest import META

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_export_parity_and_dynamic_batch(exported_models, fmt):
    model, folder = exported_models
    x = torch.rand(37, 1, 28, 28)
    loaded = exported.load_model(folder / exported.FILE_NAMES[fmt], trust_pickle=True)
    assert loaded.classes == list("0123456789")
    out = loaded.run(x.numpy())
    report = export.parity(model(x).detach().numpy(), out)
    assert report["top1_agreement"] == 1.0 and report["max_abs_logit_diff"] <= 1e-4
    export.check_parity(report, fmt)
    with pytest.raises(ParityError, match=f"{fmt} export disagrees"):
        export.check_parity({**report, "top1_agreement": 0.99}, fmt)


def test_onnx_export_is_byte_reproducible(exported_models, tmp_path):
    model, folder = exported_models
    export.export_onnx(model, tmp_path / "again.onnx", 18, META)
    assert (tmp_path / "again.onnx").read_bytes() == (folder / "model.onnx").read_bytes()


@pytest.mark.parametrize("name", ["model.onnx", "model.pt2"])
def test_exports_carry_no_source_paths(exported_models, name):
    # The exporters record each node's Python stack; left in, every checkout path or edited
    # line number would change the exported bytes (and dvc.lock) for the same model.
    data = (exported_models[1] / name).read_bytes()
    assert b"models.py" not in data and str(Path(__file__).parents[1]).encode() not in data


def ink_centre(a: np.ndarray) -> tuple[float, float]:
    ys, xs = np.indices(a.shape)
    return float((ys * a).sum() / a.sum()), float((xs * a).sum() / a.sum())


def test_stroke_in_a_corner_of_a_large_white_canvas_is_centred(tmp_path):
    canvas = np.full((600, 800), 255, np.uint8)
    canvas[40:200, 60:90] = 20  # a dark vertical bar ("1") near the top-left corner
    Image.fromarray(canvas).save(tmp_path / "one.png")
    digit = prepare_file(tmp_path / "one.png")
    assert digit.shape == (28, 28)
    assert digit.max() == pytest.approx(1.0, abs=0.05) and digit[0, 0] == 0  # white ink on black
    rows, cols = np.nonzero(digit.any(1))[0], np.nonzero(digit.any(0))[0]
    assert rows[-1] - rows[0] + 1 <= 21 and rows[-1] - rows[0] + 1 >= 19  # longer side fitted to 20
    assert cols[-1] - cols[0] + 1 <= 6
    cy, cx = ink_centre(digit)
    assert abs(cy - 14) <= 0.5 and abs(cx - 14) <= 0.5


def mnist_style(seed: int) -> np.ndarray:
    """A digit already in MNIST's form: white ink on black, longer side 20, centre of mass at (14, 14)."""
    images, _ = synthetic_digits(1, seed=seed)
    glyph = images[0].numpy()[7:21, 7:21].copy()
    glyph[glyph < 60] = 0  # no background noise
    rows, cols = np.nonzero(glyph.any(1))[0], np.nonzero(glyph.any(0))[0]
    glyph = glyph[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]
    scale = 20 / max(glyph.shape)
    size = (max(1, round(glyph.shape[1] * scale)), max(1, round(glyph.shape[0] * scale)))
    patch = np.asarray(Image.fromarray(glyph).resize(size, Image.Resampling.BILINEAR))
    cy, cx = ink_centre(patch.astype(float))
    digit = np.zeros((28, 28), np.uint8)
    top, left = round(14 - cy), round(14 - cx)
    digit[top: top + patch.shape[0], left: left + patch.shape[1]] = patch
    return digit


@pytest.mark.parametrize("seed", range(5))
def test_mnist_style_digit_is_kept_nearly_unchanged(tmp_path, seed):
    digit = mnist_style(seed)
    Image.fromarray(digit).save(tmp_path / "d.png")
    out = prepare_file(tmp_path / "d.png")
    expected = digit / digit.max()  # only the contrast stretch and the faint-ink threshold may change it
    assert np.abs(out - expected).mean() < 0.01 and np.abs(out - expected).max() <= 0.11
    assert np.corrcoef(out.ravel(), expected.ravel())[0, 1] > 0.995


def test_alpha_16bit_and_exif_orientation(tmp_path):
    rgba = np.zeros((100, 60, 4), np.uint8)
    rgba[20:80, 25:35] = (0, 0, 0, 255)  # opaque black stroke on transparent: composited onto white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    a = prepare_file(tmp_path / "alpha.png")
    deep = np.full((100, 60), 65535, np.uint16)
    deep[20:80, 25:35] = 0
    Image.fromarray(deep).save(tmp_path / "deep.png")
    b = prepare_file(tmp_path / "deep.png")
    assert np.allclose(a, b, atol=0.02)
    # The same tall bar stored lying down with EXIF "rotate 90": upright after transposition.
    pixels = np.full((60, 100), 255, np.uint8)
    pixels[25:35, 20:80] = 0  # stored wide
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    Image.fromarray(pixels).save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    c = prepare_file(tmp_path / "rotated.jpg")
    rows, cols = np.nonzero(c > 0.5)
    assert np.ptp(rows) > 3 * np.ptp(cols)  # tall after EXIF rotation


def bomb_png(path: Path, side: int = 100_000) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


@pytest.fixture
def inputs(tmp_path):
    canvas = np.full((280, 280), 255, np.uint8)
    canvas[60:220, 130:150] = 0
    Image.fromarray(canvas).save(tmp_path / "good.png")
    Image.fromarray(canvas).convert("RGB").save(tmp_path / "good.jpg")
    (tmp_path / "notes.txt").write_text("not an image\n")
    (tmp_path / "empty.png").write_bytes(b"")
    data = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    bomb_png(tmp_path / "bomb.png")
    Image.new("L", (200, 200), 250).save(tmp_path / "blank.png")
    return tmp_path


@pytest.mark.parametrize("name, reason", [
    ("notes.txt", "not an image"),
    ("empty.png", "empty file"),
    ("truncated.png", "truncated or corrupt"),
    ("bomb.png", "decompression bomb"),
    ("blank.png", "blank image"),
    ("missing.png", "no such file"),
])
def test_bad_inputs_get_clear_errors(inputs, name, reason):
    with pytest.raises(ImageError, match=reason):
        prepare_file(inputs / name)


def test_cli_answers_good_files_reports_bad_ones_and_fails(exported_models, inputs, capsys):
    _, folder = exported_models
    files = [inputs / n for n in ("good.png", "notes.txt", "good.jpg", "bomb.png")]
    code = predict.main([*map(str, files), "--model", str(folder / "model.onnx"), "--top-k", "3"])
    out, err = capsys.readouterr()
    assert code == 1
    lines = out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == [str(files[0]), str(files[2])]
    assert all(line.count("%)") == 3 for line in lines)
    assert f"{files[1]}: error: not an image" in err and f"{files[3]}: error:" in err


def test_json_lines_schema(exported_models, inputs, capsys):
    _, folder = exported_models
    code = predict.main([str(inputs / "good.png"), str(inputs / "empty.png"), "--json", "--top-k", "2",
                         "--model", str(folder / "model.pt2"), "--trust-pt2"])
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1
    good, bad = records
    assert set(good) == {"file", "prediction", "confidence", "top_k", "probabilities"}
    assert set(good["probabilities"]) == set("0123456789")
    assert sum(good["probabilities"].values()) == pytest.approx(1, abs=1e-4)
    assert good["prediction"] == good["top_k"][0]["class"] and len(good["top_k"]) == 2
    assert good["confidence"] == good["probabilities"][good["prediction"]]
    assert bad == {"file": str(inputs / "empty.png"), "error": "empty file"}


def test_missing_model_is_a_usage_error(inputs, capsys):
    assert predict.main([str(inputs / "good.png"), "--model", str(inputs / "nope.onnx")]) == 2
    assert "run `dvc repro`" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_runs_without_importing_torch(exported_models, inputs):
    _, folder = exported_models
    script = shutil.which("mnist-predict", path=str(BIN))
    assert script, "mnist-predict is installed with the project"
    result = subprocess.run([script, str(inputs / "good.png"), "--model", str(folder / "model.onnx")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{inputs / 'good.png'}: ")
    probe = ("import sys; from mnist_pipeline.serving import predict; "
             f"code = predict.main([{str(inputs / 'good.png')!r}, '--model', {str(folder / 'model.onnx')!r}]); "
             "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_served_path_matches_pytorch_and_catches_a_second_normalisation(exported_models):
    model, folder = exported_models
    images, _ = synthetic_digits(20, seed=7)
    loaded = exported.load_model(folder / "model.onnx")
    report = export.prepared_parity(model, loaded, export.served_inputs(images))
    assert report["top1_agreement"] == 1.0 and report["max_abs_prob_diff"] <= 1e-5 and report["samples"] == 20
    # Had the numpy side normalised the digits again (the rule written twice), the check would say so.
    twice = exported.Model(lambda x: loaded.run((x - 0.13) / 0.31), loaded.classes)
    worse = export.prepared_parity(model, twice, export.served_inputs(images))
    with pytest.raises(ParityError, match="through images.prepare"):
        export.check_parity({"top1_agreement": 1.0, "max_abs_logit_diff": 0.0, "prepared_path": worse}, "onnx")


def test_an_export_made_for_standardised_input_is_refused(exported_models, tmp_path):
    import onnx

    proto = onnx.load(exported_models[1] / "model.onnx")
    for prop in proto.metadata_props:
        if prop.key == "input":
            prop.value = "float32 N×1×28×28: grayscale, white digit on black, (pixel/255 - mean) / std"
    onnx.save(proto, tmp_path / "old.onnx")
    with pytest.raises(exported.ModelFileError, match="made for another input.*dvc repro export"):
        exported.load_model(tmp_path / "old.onnx")
