"""dvc.yaml stays honest: each stage depends on every package module its script imports."""

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def package_imports(path: Path, seen: set[str] | None = None) -> set[str]:
    """mnist_pipeline modules imported by `path`, followed transitively, as repo-relative paths."""
    seen = set() if seen is None else seen
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mnist_pipeline"):
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("mnist_pipeline")]
        for name in names:
            module = ROOT / (name.replace(".", "/") + ".py")
            rel = str(module.relative_to(ROOT))
            if module.exists() and rel not in seen and not rel.endswith("__init__.py"):
                seen.add(rel)
                package_imports(module, seen)
    return seen


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_cover_imported_modules(name):
    stage = STAGES[name]
    script = stage["cmd"].split()[1]
    assert script == f"stages/{name}.py" and script in stage["deps"]
    missing = package_imports(ROOT / script) - set(stage["deps"])
    assert not missing, f"stage {name} imports {sorted(missing)} but does not list them in deps"


def test_every_output_path_appears_in_the_command():
    for name, stage in STAGES.items():
        for out in stage.get("outs", []):
            path = next(iter(out)) if isinstance(out, dict) else out
            assert path in stage["cmd"], f"stage {name}: output {path} is not passed to the script"
