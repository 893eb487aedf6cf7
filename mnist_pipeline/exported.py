"""The exported-model format: file names, input spec, metadata, and the one loader.

An exported model takes a float batch N×1×28×28 of [0, 1] pixels (white digit on black,
as `images.prepare` makes them) and returns N×10 logits, with a dynamic batch dimension.
The normalisation is the graph's first layer (`data.Standardise`), so no caller restates
it. What a user of the file needs besides the graph — class names, model name, the
statistics for reference — travels inside it: ONNX
`metadata_props`, or a `model.json` extra file in a `.pt2`. The export stage writes
it with `metadata` and checks parity by loading through `load_model`, the same path
`mnist-predict` takes.

`.onnx` files are read by onnxruntime (protobuf, no code execution). `.pt2` files
are read by `torch.export.load`, which unpickles: that runs code from the file, so
it needs `trust_pickle=True`, for files you made yourself.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnist_pipeline.errors import ModelFileError, first_line

INPUT_NAME, OUTPUT_NAME = "image", "logits"
INPUT_SPEC = "float32 N×1×28×28 in [0, 1] (pixel/255): grayscale, white digit on black; output N×10 logits"
FILE_NAMES = {"onnx": "model.onnx", "pt2": "model.pt2"}
PT2_METADATA = "model.json"  # the extra file of a .pt2 export that holds its metadata
MAX_MODEL_BYTES = 256 << 20  # far above any model this pipeline makes; bounds what a loader reads


@dataclass(frozen=True)
class Model:
    run: Callable[[np.ndarray], np.ndarray]  # float32 N×1×28×28 in [0, 1] → N×10 logits
    classes: list[str]
    sha256: str = ""  # of the very bytes loaded: which model answered (`/healthz`, every `/predict` answer)

    def probabilities(self, digits: np.ndarray) -> np.ndarray:
        """Class probabilities for prepared digits N×28×28 in [0, 1]."""
        logits = np.asarray(self.run(digits.astype(np.float32, copy=False)[:, None]), dtype=np.float64)
        logits -= logits.max(1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(1, keepdims=True)


def metadata(model: str, classes: list[str], mean: float, std: float) -> dict[str, str]:
    """What an exported file carries so that `load_model` needs nothing else (strings: ONNX metadata_props)."""
    return {"model": model, "classes": json.dumps(classes), "mean": repr(mean), "std": repr(std), "input": INPUT_SPEC}


def _from_metadata(meta: dict[str, str], run: Callable[[np.ndarray], np.ndarray], path: Path, sha256: str) -> Model:
    try:
        classes, mean, std = json.loads(meta["classes"]), float(meta["mean"]), float(meta["std"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: not a model exported by this pipeline (missing metadata {exc})") from None
    if (
        not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) for c in classes))
        or not math.isfinite(mean)
        or not (math.isfinite(std) and std > 0)
    ):
        raise ModelFileError(
            f"{path}: invalid metadata (classes {meta['classes']!r}, mean {meta['mean']!r}, std {meta['std']!r})"
        )
    if meta.get("input") != INPUT_SPEC:  # earlier exports took standardised input: fed pixels, they would be wrong
        raise ModelFileError(
            f"{path}: made for another input ({meta.get('input')!r}); re-export it with `dvc repro export`"
        )
    return Model(run, classes, sha256)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read it ({exc.strerror or exc})") from None


def _load_onnx(path: Path, threads: int | None) -> Model:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = options.inter_op_num_threads = threads
        # Idle pool threads otherwise spin, taking CPU from the request handling around them.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    data = _read(path)  # hashed and loaded from the same bytes: a file replaced meanwhile cannot mismatch
    try:
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own types for a corrupt or foreign file
        raise ModelFileError(f"{path}: not a loadable ONNX model: {first_line(exc)}") from None
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ModelFileError(f"{path}: expected one input, the model has {len(inputs)}")
    name = inputs[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {name: x})[0]

    return _from_metadata(session.get_modelmeta().custom_metadata_map, run, path, hashlib.sha256(data).hexdigest())


def _load_pt2(path: Path) -> Model:
    import torch  # only this format needs it

    extra = {PT2_METADATA: ""}
    data = _read(path)
    try:
        module = torch.export.load(io.BytesIO(data), extra_files=extra).module()
    except Exception as exc:  # a corrupt archive fails in many ways inside torch
        raise ModelFileError(f"{path}: not a loadable .pt2 model: {first_line(exc)}") from None

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()

    try:
        meta = json.loads(extra[PT2_METADATA] or "{}")
    except ValueError:
        meta = {}
    return _from_metadata(meta if isinstance(meta, dict) else {}, run, path, hashlib.sha256(data).hexdigest())


def load_model(path: Path, trust_pickle: bool = False, threads: int | None = None) -> Model:
    """Load an exported `.onnx` (or, with `trust_pickle`, `.pt2`) model; ModelFileError says why not.

    `threads` caps onnxruntime's thread pool (a server answering one image at a time wants 1);
    None keeps its default, one thread per core, which batches of many images use."""
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model (run `dvc repro` to export one, or pass --model)")
    if path.stat().st_size > MAX_MODEL_BYTES:
        raise ModelFileError(f"{path}: {path.stat().st_size:,} bytes, over the {MAX_MODEL_BYTES:,} byte limit")
    if path.suffix == ".onnx":
        return _load_onnx(path, threads)
    if path.suffix == ".pt2":
        if not trust_pickle:
            raise ModelFileError(
                f"{path}: .pt2 files are loaded with pickle, which can run code from the file; "
                "use the .onnx model, or pass --trust-pt2 for a file you made yourself"
            )
        return _load_pt2(path)
    raise ModelFileError(f"{path}: expected a .onnx or .pt2 model")
