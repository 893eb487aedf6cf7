"""The README's quick start is what users run and what CI runs: keep the three in step."""

import json
import re
from pathlib import Path

import pytest

from helpers import benchmark_module

ROOT = Path(__file__).resolve().parents[1]


def quick_start() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start\n\n```bash\n(.*?)```", readme, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.strip().splitlines()]


def test_quick_start_is_two_lines_install_and_run():
    install_run, install_test = quick_start()
    project = "pip install --no-deps --no-build-isolation -e ."  # this project, from the locked setuptools
    assert install_run == f"pip install -r requirements.txt && {project} && dvc repro"
    assert install_test == f"pip install -r requirements-dev.txt && {project} && pytest"


def test_ci_runs_the_readme_test_line():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert quick_start()[1] in [line.strip() for line in ci]


def test_requirements_pin_torch():
    lines = (ROOT / "requirements.in").read_text().splitlines()
    assert "torch==2.14.1" in lines and "torchvision==0.29.1" in lines
    assert "-r requirements.in" in (ROOT / "requirements-dev.in").read_text().splitlines()


def test_fast_recipe_in_the_docs_is_the_benchmarked_one_and_valid():
    from mnist_pipeline.params import apply_overrides, load_params

    page = (ROOT / "docs" / "frontier.md").read_text().replace("\\\n", " ")
    command = re.search(r"^dvc exp run (-S model=cnn -S cnn\.train\.ema=0 .*)$", page, re.M).group(1)
    overrides = [o.strip("'") for o in command.split()[1::2]]
    params = apply_overrides(load_params(ROOT / "params.yaml"), overrides)
    assert params.model == "cnn" and params.train.epochs <= 2
    assert params.train.ema == 0 and not params.train.augment.enabled


def test_params_defaults_are_the_recipes_measured_in_defaults_json():
    """The README's figures (benchmarks/results/defaults.json) describe params.yaml's recipes as they are."""
    from mnist_pipeline.params import apply_overrides, load_params

    measured = json.loads((ROOT / "benchmarks/results/defaults.json").read_text())
    now = load_params(ROOT / "params.yaml")
    assert measured["params"] == {model: now.section(model) for model in ("mlp", "cnn")}
    seeds = len(measured["seeds"])
    assert seeds >= 3 and {r["name"]: len(r["seeds"]) for r in measured["recipes"]} == \
        {"mlp-default": seeds, "cnn": seeds, "mlp-distilled": seeds}
    # The record commands the docs print are valid overrides of today's params.yaml.
    for row in measured["shipped"]:
        apply_overrides(now, row["overrides"])


DOCUMENTS = ["README.md", "CONTRIBUTING.md", "benchmarks/README.md",
             *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]


def test_readme_fits_a_screen_or_so():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"(?ms)^```.*?^```", "", path.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"(?m)^#{1,6} (.+)$", text)}


def links(path: Path) -> list[str]:
    """The targets of a Markdown file's links and images, outside code."""
    text = re.sub(r"(?ms)^```.*?^```", "", path.read_text())
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_relative_link_and_anchor_resolves(document):
    source = ROOT / document
    assert source.exists(), document
    broken = []
    for target in links(source):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not ours to check offline
            continue
        path, _, anchor = target.partition("#")
        resolved = (source.parent / path).resolve() if path else source
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (resolved.suffix != ".md" or anchor not in anchors(resolved)):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{document}: {broken}"


def test_the_link_check_catches_a_broken_file_and_anchor(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\n## Some `code` heading\n\n[ok](#some-code-heading) "
                                   "[gone](missing.md) [bad](#nowhere)\n```\n[in code](ignored.md)\n```\n")
    assert links(tmp_path / "a.md") == ["#some-code-heading", "missing.md", "#nowhere"]
    assert anchors(tmp_path / "a.md") == {"title", "some-code-heading"}


def test_every_generated_block_is_what_the_results_files_render():
    """benchmarks/report.py renders each block from a results file; the committed text must be that rendering."""
    report = benchmark_module("report")
    differing = [str(doc.relative_to(ROOT)) for doc in report.unrendered(report.render_all())]
    assert not differing, f"run `python benchmarks/report.py`: these differ from their rendering: {differing}"
    used = {name for doc in report.documents() for name in report.blocks_in(doc.read_text())}
    shown = set(report.BLOCKS) - report.WITHDRAWN
    assert used == shown, f"blocks rendered but shown nowhere, or missing: {shown ^ used}"
