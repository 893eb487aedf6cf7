import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mnist_pipeline.errors import ParamsError
from mnist_pipeline.params import apply_overrides, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = yaml.safe_load((ROOT / "params.yaml").read_text())


def with_change(path: str, value, base: dict | None = None):
    data = copy.deepcopy(DEFAULTS if base is None else base)
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[key]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return data


DELETE = object()


def test_defaults_are_valid_and_round_trip():
    params = parse_params(DEFAULTS)
    assert params.model in ("mlp", "cnn")
    assert params.model_dump(mode="json") == DEFAULTS


@pytest.mark.parametrize(
    "path, value, fragments",
    [
        ("model", "cnnn", ["model", "'cnnn'", "mlp, cnn"]),
        ("dataset", "emnist", ["dataset", "'emnist'", "mnist, fashion_mnist, kmnist"]),
        ("mlp.train.optimizer", "rmsprop", ["mlp.train.optimizer", "sgd, adam, adamw"]),
        ("mlp.train.scheduler", "linear", ["mlp.train.scheduler", "onecycle, cosine, plateau, step, none"]),
        ("mlp.train.lr", -0.1, ["mlp.train.lr", "-0.1", "> 0"]),
        ("mlp.train.lr", 0, ["mlp.train.lr", "> 0"]),
        ("mlp.train.batch_size", 0, ["mlp.train.batch_size", ">= 1"]),
        ("mlp.train.epochs", 2.5, ["mlp.train.epochs", "an integer"]),
        ("mlp.train.nesterov", "yes", ["mlp.train.nesterov", "true or false"]),
        ("mlp.train.augment.rotate", "ten", ["mlp.train.augment.rotate", "a finite number"]),
        ("cnn.train.lr", 0, ["cnn.train.lr", "> 0"]),
        ("mlp.dropout", 1.0, ["mlp.dropout", "< 1"]),
        ("mlp.hidden", [], ["mlp.hidden", "at least 1"]),
        ("cnn.channels", [[8], []], ["cnn.channels[1]", "[]", "at least 1 item"]),
        ("data.val_size", 60000, ["data.val_size", "60000", "fewer than the 60000"]),
        ("export.formats", ["onnx", "torchscript"], ["export.formats", "onnx, pt2"]),
        ("mlp.train.early_stopping", 3, ["mlp.train.early_stopping", "mapping"]),
        ("cnn.views", 3, ["cnn.views = 3", "one of 1, 5, 9"]),
        ("mlp.train.augment.elastic_sigma", 0.0, ["mlp.train.augment.elastic_sigma", "> 0"]),
    ],
)
def test_bad_values_name_key_value_and_allowed(path, value, fragments):
    with pytest.raises(ParamsError) as err:
        parse_params(with_change(path, value))
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_unknown_key_is_named_with_allowed_keys():
    data = with_change("mlp.train.learning_rate", 0.1)
    with pytest.raises(ParamsError, match=r"unknown key 'mlp.train.learning_rate' \(allowed in mlp.train: epochs, .*lr"):
        parse_params(data)


def test_missing_key_is_named():
    with pytest.raises(ParamsError, match=r"missing key 'cnn.train.augment.shift'"):
        parse_params(with_change("cnn.train.augment.shift", DELETE))


def test_each_model_trains_with_its_own_recipe():
    mlp = parse_params(with_change("cnn.train.lr", 0.3))
    assert mlp.model == "mlp" and mlp.train.lr == DEFAULTS["mlp"]["train"]["lr"]
    cnn = parse_params(with_change("model", "cnn", with_change("cnn.train.lr", 0.3)))
    assert cnn.train.lr == 0.3
    assert "train" not in cnn.model_kwargs() and set(cnn.model_kwargs()) == {"channels", "dropout", "views"}
    assert cnn.with_train(epochs=3).cnn.train.epochs == 3 and cnn.with_train(epochs=3).mlp == cnn.mlp


def test_overrides_act_like_dvc_exp_run_set_param():
    base = parse_params(DEFAULTS)
    changed = apply_overrides(base, ["model=cnn", "cnn.train.lr=2e-1", "cnn.train.augment.enabled=false"])
    assert (changed.model, changed.train.lr, changed.train.augment.enabled) == ("cnn", 0.2, False)
    assert changed.mlp == base.mlp
    with pytest.raises(ParamsError, match=r"cnn\.train\.lrr is not a key"):
        apply_overrides(base, ["cnn.train.lrr=0.1"])
    with pytest.raises(ParamsError, match=r"seed\.x is not a key"):
        apply_overrides(base, ["seed.x=1"])
    with pytest.raises(ParamsError, match=r"cnn\.train\.lr = -1"):
        apply_overrides(base, ["cnn.train.lr=-1"])


def test_yaml_syntax_error_and_missing_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("model: [mlp\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(ParamsError, match="file not found"):
        load_params(tmp_path / "nope.yaml")


@pytest.mark.slow
def test_stage_exits_2_with_one_line(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(with_change("model", "cnnn")))
    result = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "train.py"), str(tmp_path), "--params", str(params),
         *[f"--{o}={tmp_path / o}" for o in ("teacher", "checkpoint", "metrics", "history", "timing", "live",
                                             "state-dir")]],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "model = 'cnnn'" in result.stderr and "mlp, cnn" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "checkpoint").exists()


def test_model_names_are_the_model_registry():
    from typing import get_args

    from mnist_pipeline.models import MODELS
    from mnist_pipeline.params import ModelName, Params

    assert set(get_args(ModelName)) == set(MODELS)
    assert set(MODELS) <= set(Params.model_fields), "each model has its params section"


@pytest.mark.parametrize("text, expected", [("1e-3", 0.001), ("5e-4", 0.0005), ("1E-3", 0.001), ("2.5e+1", 25.0)])
def test_scientific_learning_rates_are_numbers(tmp_path, text, expected):
    path = tmp_path / "params.yaml"
    # The first `lr:` is the default model's (mlp comes first in params.yaml).
    content, replaced = re.subn(r"(?m)^(\s+lr: )\S+", rf"\g<1>{text}", (ROOT / "params.yaml").read_text(), count=1)
    assert replaced == 1
    path.write_text(content)
    assert load_params(path).train.lr == expected


@pytest.mark.parametrize("seed, fragment", [(2**64, "< 18446744073709551616"), (-1, ">= 0")])
def test_seed_out_of_torchs_range_is_refused(seed, fragment):
    with pytest.raises(ParamsError, match=f"seed = {seed} is invalid: expected a value {fragment}"):
        parse_params(with_change("seed", seed))


@pytest.mark.parametrize("text", [
    "lr: 1e-3\n", "lr: 1E-3\n", "enabled: yes\n", "enabled: on\n", "octal: 0o17\n", "n: 012\n", "x: .5\n",
    "big: 18446744073709551616\n", "nan: .nan\n", "s: '1e-3'\n", "l: [1, 2.5e+1, true]\n", "t: True\n",
])
def test_params_are_read_as_dvc_reads_them(text):
    from dvc.utils.serialize import parse_yaml

    from mnist_pipeline.params import read_yaml

    ours, dvcs = read_yaml(text), parse_yaml(text, "params.yaml")
    assert ours == dvcs or (ours != ours and dvcs != dvcs), (ours, dvcs)  # NaN equals nothing


def test_overrides_use_dvcs_grammar():
    base = parse_params(DEFAULTS)
    changed = apply_overrides(base, ["mlp.hidden=[64,32]", "mlp.train.augment.rotate=7.5", "dataset=kmnist"])
    assert (changed.mlp.hidden, changed.mlp.train.augment.rotate, changed.dataset) == ((64, 32), 7.5, "kmnist")
    with pytest.raises(ParamsError, match="Error parsing override 'oops'"):
        apply_overrides(base, ["oops"])
