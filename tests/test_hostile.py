"""Hostile and odd input to mnist-predict: nothing runs, nothing crashes, every file gets its line.

Property-based (Hypothesis): images in every Pillow mode the readers meet, in every documented
format, at extreme sizes, with NaN/inf pixels, EXIF orientations and animation, plus random and
mutated bytes of real files. Whatever the batch, `mnist-predict --json` prints one line per file
in order, never a traceback, answers the good file, and exits 1 exactly when a file failed.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from helpers import loadgen
from mnist_pipeline.serving import predict
from mnist_pipeline.images import FORMATS, MAX_PIXELS, ImageError, prepare_file

BIN = Path(sys.executable).parent
MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F")
SAVE_AS = {"PNG": "png", "JPEG": "jpg", "BMP": "bmp", "GIF": "gif", "TIFF": "tiff", "WEBP": "webp"}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


GOOD = loadgen.digit_png(120, 90)
# The refusals images.py documents; an image refused for any other reason is a bug.
DOCUMENTED = re.compile(r"^(empty file|image has no pixels|blank image: no ink|truncated or corrupt image: |"
                        r"not an image in a supported format|image is \d+×\d+ pixels.*pixel limit|"
                        r"refused as a decompression bomb)")


def encode(pixels: np.ndarray, mode: str, fmt: str, exif_orientation: int | None = None) -> bytes:
    """Pixels (float in [0, 1], possibly NaN/inf) as an image of `mode`, encoded as `fmt`."""
    if mode == "F":
        image = Image.fromarray(pixels.astype(np.float32), "F")
    elif mode in ("I;16", "I"):
        scaled = np.nan_to_num(pixels, nan=0.5, posinf=1, neginf=0).clip(0, 1) * 65535
        image = Image.fromarray(scaled.astype(np.uint16)).convert(mode) if mode == "I" else \
            Image.fromarray(scaled.astype(np.uint16))
    else:
        gray = (np.nan_to_num(pixels, nan=0.5, posinf=1, neginf=0).clip(0, 1) * 255).astype(np.uint8)
        image = Image.fromarray(gray, "L").convert(mode)
    buffer = io.BytesIO()
    kwargs = {}
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


pixels = st.tuples(st.integers(1, 64), st.integers(1, 64), st.integers(0, 2**32 - 1)).map(
    lambda hws: np.random.default_rng(hws[2]).random((hws[0], hws[1])))
extreme_shapes = st.sampled_from([(1, 1), (1, 3000), (3000, 1), (2, 900), (700, 3)]).map(
    lambda hw: np.random.default_rng(hw[0] * 7 + hw[1]).random(hw))
special_values = st.sampled_from([np.nan, np.inf, -np.inf, 1e30, -1e30, 0.0])


@st.composite
def image_files(draw) -> bytes:
    array = draw(st.one_of(pixels, extreme_shapes))
    if draw(st.booleans()):  # sprinkle NaN / inf / huge values (only float images keep them)
        flat = array.ravel()
        for i in draw(st.lists(st.integers(0, flat.size - 1), max_size=5)):
            flat[i] = draw(special_values)
    mode = draw(st.sampled_from(MODES))
    fmt = draw(st.sampled_from(FORMATS))
    orientation = draw(st.one_of(st.none(), st.integers(1, 8))) if fmt in ("JPEG", "PNG", "TIFF", "WEBP") else None
    try:
        data = encode(array, mode, fmt, orientation)
    except (OSError, ValueError, KeyError, TypeError):
        assume(False)  # Pillow cannot write this mode in this format: not an input anyone has
    return data


@st.composite
def mutated_files(draw) -> bytes:
    data = bytearray(draw(image_files()))
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "zero-run"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            data[at:at + 32] = bytes(min(32, len(data) - at))
    return bytes(data)


any_file = st.one_of(image_files(), mutated_files(), st.binary(max_size=512))


def run_cli(folder: Path, files: list[bytes], model: Path, capsys) -> tuple[int, list[dict]]:
    paths = []
    for i, data in enumerate(files):
        paths.append(folder / f"f{i}.img")
        paths[-1].write_bytes(data)
    code = predict.main([*map(str, paths), "--json", "--model", str(model)])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["file"] for r in records] == list(map(str, paths)), "one line per file, in order"
    return code, records


@FUZZ
@given(batch=st.lists(any_file, min_size=1, max_size=4), good_at=st.integers(0, 4))
def test_any_batch_gets_one_line_per_file_and_the_good_file_answered(batch, good_at, exported_models, tmp_path,
                                                                     capsys):
    files = batch[:good_at] + [GOOD] + batch[good_at:]
    code, records = run_cli(tmp_path, files, exported_models[1] / "model.onnx", capsys)
    good = records[min(good_at, len(batch))]
    assert "prediction" in good and sum(good["probabilities"].values()) == pytest.approx(1, abs=1e-4)
    failed = [r for r in records if "error" in r]
    assert code == (1 if failed else 0)
    assert all(DOCUMENTED.search(r["error"]) for r in failed), failed
    for record in records:
        if "prediction" in record:
            assert all(np.isfinite(p) for p in record["probabilities"].values())


@FUZZ
@given(data=image_files())
def test_every_decodable_image_is_prepared_or_refused_with_a_reason(data, tmp_path):
    path = tmp_path / "x.img"
    path.write_bytes(data)
    try:
        digit = prepare_file(path)
    except ImageError as exc:  # only the documented refusals count; any other exception fails the test
        assert DOCUMENTED.search(str(exc)), f"undocumented refusal: {exc}"
    else:
        assert digit.shape == (28, 28) and np.isfinite(digit).all() and 0 <= digit.min() <= digit.max() <= 1


def test_float_tiff_with_nan_pixels_is_answered(exported_models, tmp_path, capsys):
    array = np.zeros((40, 30), np.float32)
    array[5:35, 12:18] = 1.0
    array[0, 0] = np.nan  # round(nan) used to crash the whole run
    array[1, 1] = np.inf
    code, records = run_cli(tmp_path, [encode(array, "F", "TIFF"), GOOD], exported_models[1] / "model.onnx", capsys)
    assert code == 0 and all("prediction" in r for r in records)


def eps_file() -> bytes:
    return (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\n"
            b"newpath 10 4 moveto 10 24 lineto 4 setlinewidth stroke\nshowpage\n%%EOF\n")


@pytest.mark.slow
def test_eps_is_never_rendered(exported_models, tmp_path):
    # Pillow renders EPS by running Ghostscript. A fake `gs` first on PATH would leave a mark.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    marker = tmp_path / "ghostscript-ran"
    (fake_bin / "gs").write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    (fake_bin / "gs").chmod(0o755)
    (tmp_path / "digit.eps").write_bytes(eps_file())
    (tmp_path / "good.png").write_bytes(GOOD)
    env = {**os.environ, "PATH": f"{fake_bin}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run([str(BIN / "mnist-predict"), str(tmp_path / "digit.eps"), str(tmp_path / "good.png"),
                             "--model", str(exported_models[1] / "model.onnx")], capture_output=True, text=True,
                            env=env)
    assert not marker.exists(), "Ghostscript was started for an untrusted file"
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{tmp_path / 'digit.eps'}: error: not an image in a supported format" in result.stderr
    assert result.stdout.startswith(f"{tmp_path / 'good.png'}: ")


def png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def test_own_pixel_limit_fires_below_pillows(tmp_path):
    width, height = 8000, 8001  # 64.0 M pixels: over ours, under Pillow's own bomb limit (89.5 M)
    assert width * height > MAX_PIXELS and width * height < Image.MAX_IMAGE_PIXELS
    (tmp_path / "big.png").write_bytes(png_header(width, height))
    with pytest.raises(ImageError, match=r"8000×8001 pixels, over the 64,000,000 pixel limit"):
        prepare_file(tmp_path / "big.png")


def test_oversized_file_is_refused_before_reading(tmp_path):
    path = tmp_path / "huge.png"
    with open(path, "wb") as handle:  # sparse: 100 MB that cost no disk
        handle.truncate(100 << 20)
    with pytest.raises(ImageError, match="over the .* byte limit"):
        prepare_file(path)


def test_pt2_needs_an_explicit_opt_in(exported_models, tmp_path, capsys):
    (tmp_path / "good.png").write_bytes(GOOD)
    pt2 = str(exported_models[1] / "model.pt2")
    assert predict.main([str(tmp_path / "good.png"), "--model", pt2]) == 2
    assert "pickle" in capsys.readouterr().err
    assert predict.main([str(tmp_path / "good.png"), "--model", pt2, "--trust-pt2"]) == 0
    with pytest.raises(SystemExit):
        predict.main(["--help"])
    assert "pickle" in capsys.readouterr().out


@pytest.mark.parametrize("content", [b"", b"not a model", b"\x08\x01" * 100])
def test_corrupt_model_file_is_one_line(tmp_path, capsys, content):
    (tmp_path / "good.png").write_bytes(GOOD)
    (tmp_path / "model.onnx").write_bytes(content)
    assert predict.main([str(tmp_path / "good.png"), "--model", str(tmp_path / "model.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {tmp_path / 'model.onnx'}: ")
