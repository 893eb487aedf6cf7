"""The README's quick start is what users run and what CI runs: keep the three in step."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_start() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start\n\n```bash\n(.*?)```", readme, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.strip().splitlines()]


def test_quick_start_is_two_lines_install_and_run():
    install_run, install_test = quick_start()
    assert install_run == "pip install -r requirements.txt && dvc repro"
    assert install_test.startswith("pip install -r requirements-dev.txt && ")


def test_ci_runs_the_readme_test_line():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert quick_start()[1] in [line.strip() for line in ci]


def test_requirements_pin_torch_and_install_the_project():
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    assert "torch==2.14.1" in lines and "torchvision==0.29.1" in lines and "-e ." in lines
    assert "-r requirements.txt" in (ROOT / "requirements-dev.txt").read_text().splitlines()


def test_fast_recipe_in_readme_is_the_benchmarked_one_and_valid():
    from mnist_pipeline.params import apply_overrides, load_params

    readme = (ROOT / "README.md").read_text().replace("\\\n", " ")
    command = re.search(r"^dvc exp run (-S model=cnn -S cnn\.train\.ema=0 .*)$", readme, re.M).group(1)
    overrides = [o.strip("'") for o in command.split()[1::2]]
    measured = json.loads((ROOT / "benchmarks/results/canonical.json").read_text())["fast_recipe"]
    assert overrides == measured
    params = apply_overrides(load_params(ROOT / "params.yaml"), overrides)
    assert params.model == "cnn" and params.train.epochs <= 2
    assert params.train.ema == 0 and not params.train.augment.enabled


def test_params_defaults_are_the_recipes_measured_in_defaults_json():
    """The README's opening figures (benchmarks/results/defaults.json) describe params.yaml's recipes as they are."""
    from mnist_pipeline.params import load_params

    measured = json.loads((ROOT / "benchmarks/results/defaults.json").read_text())
    now = load_params(ROOT / "params.yaml")
    assert measured["params"] == {model: now.section(model) for model in ("mlp", "cnn")}
    assert {r["name"]: len(r["seeds"]) for r in measured["recipes"]} == {
        "cnn-before": 5, "cnn-default": 5, "mlp-before": 5, "mlp-default": 5}
