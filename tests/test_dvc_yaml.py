"""dvc.yaml stays honest: each stage depends on exactly the code it imports and the params it reads.

The module list comes from `stage.package_modules()`, the same function the train stage
fingerprints its resume state with, run after importing the stage script in a fresh
interpreter; the params list from the `params.…` reads in the script.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mnist_pipeline import processed

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
SELECTED_MODEL = "${model}"  # dvc.yaml's entry for the section of whichever model params.yaml selects
# Narrower reads: the selected model's teacher choice alone, and the teacher's section (`cnn`, the one teacher).
# Sections whose keys different stages read (feedback: curate the policy, train `repeat`): a stage
# reading one key of them depends on that key alone.
SHARED_SECTIONS = {"feedback"}
NARROW = {"teacher": SELECTED_MODEL + ".train.distill.teacher", "teacher_params": "cnn"}

IMPORTED = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("stage_script", sys.argv[1])
spec.loader.exec_module(importlib.util.module_from_spec(spec))
from mnist_pipeline.stage import package_modules
print(json.dumps([str(p) for p in package_modules()]))
"""


def imported_modules(script: Path) -> set[str]:
    result = subprocess.run([sys.executable, "-c", IMPORTED, str(script)], capture_output=True, text=True,
                            cwd=ROOT, check=True)
    return {str(Path(p).resolve().relative_to(ROOT)) for p in json.loads(result.stdout)}


def params_read(script: Path) -> set[str]:
    """Top-level params keys a stage script reads: `params.X`, `params.section("X")`, and the
    selected model's section through `params.model_kwargs()`, `params.model_params`,
    `params.train` (the selected model's recipe) or `params.section(params.model)`; one key of a
    shared section read directly (`params.feedback.repeat`) is that key alone."""
    keys = set()
    tree = ast.parse(script.read_text())
    narrowed = set()
    for node in ast.walk(tree):
        inner = node.value if isinstance(node, ast.Attribute) else None
        if isinstance(inner, ast.Attribute) and isinstance(inner.value, ast.Name) and inner.value.id == "params" \
                and inner.attr in SHARED_SECTIONS:
            keys.add(f"{inner.attr}.{node.attr}")
            narrowed.add(id(inner))
    for node in ast.walk(tree):
        if id(node) in narrowed:
            continue
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "params":
            keys.add(SELECTED_MODEL if node.attr in ("model_kwargs", "model_params", "train")
                     else NARROW.get(node.attr, node.attr))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "section" \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "params":
            arg = node.args[0]
            keys.add(arg.value if isinstance(arg, ast.Constant) else SELECTED_MODEL)
    if SELECTED_MODEL in keys:  # the whole section covers its parts
        keys = {k for k in keys if not k.startswith(SELECTED_MODEL + ".")}
    return keys - {"section"}


@pytest.mark.parametrize("name", sorted(STAGES))
@pytest.mark.slow
def test_stage_code_deps_are_exactly_the_imported_modules(name):
    stage = STAGES[name]
    script = stage["cmd"].split()[1]
    assert script == f"stages/{name}.py" and script in stage["deps"]
    code_deps = {d for d in stage["deps"] if d.startswith("mnist_pipeline/")}
    imported = imported_modules(ROOT / script)
    assert code_deps == imported, (f"stage {name}: deps lack {sorted(imported - code_deps)}, "
                                   f"list unused {sorted(code_deps - imported)}")


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_params_are_exactly_the_keys_it_reads(name):
    declared = {p.split("#")[0].strip() for p in STAGES[name].get("params", [])}
    assert declared == params_read(ROOT / "stages" / f"{name}.py")


def test_training_does_not_depend_on_the_unused_models_section():
    declared = set(STAGES["train"]["params"])
    assert SELECTED_MODEL in declared and not declared & {"mlp", "cnn", "train"}


def test_the_teacher_does_not_depend_on_its_students_recipe():
    declared = {p.split("#")[0].strip() for p in STAGES["teacher"]["params"]}
    assert SELECTED_MODEL not in declared and "mlp" not in declared


@pytest.mark.slow
def test_download_does_not_import_torch():
    probe = IMPORTED.split("from mnist_pipeline")[0] + "print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe, str(ROOT / "stages/download.py")],
                            capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "False", "the download stage needs no torch: importing it costs ~2 s"


def test_processed_deps_are_files_the_processed_module_writes():
    names = {processed.split_path(Path("data/processed"), s).name for s in processed.SPLITS} | {processed.STATS}
    for name, stage in STAGES.items():
        for dep in stage["deps"]:
            if dep.startswith("data/processed/"):
                assert Path(dep).name in names, f"stage {name}: {dep} is not a file processed.py writes"


def test_every_output_path_appears_in_the_command():
    for name, stage in STAGES.items():
        for out in stage.get("outs", []) + stage.get("metrics", []):
            path = next(iter(out)) if isinstance(out, dict) else out
            assert path in stage["cmd"], f"stage {name}: output {path} is not passed to the script"


def test_every_stage_that_computes_depends_on_the_lock():
    """The environment is part of the lock: a new torch (or numpy, onnx, …) may round differently, so every stage
    but download (which only fetches and verifies) reruns when requirements.txt changes."""
    lists = {name for name, stage in STAGES.items() if "requirements.txt" in stage["deps"]}
    assert lists == set(STAGES) - {"download"}
    assert "--lock requirements.txt" in STAGES["export"]["cmd"]  # the model card names the lock's hash
