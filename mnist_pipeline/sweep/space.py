"""The search space: `-S` overrides in Hydra's grammar, as `dvc exp run -S` reads them, made Ray
Tune domains; the experiment name a trial's params give; and the check of every value a trial
could get against params.yaml, before any trial starts."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from mnist_pipeline.errors import PipelineError
from mnist_pipeline.params import apply_overrides, parse_params, read_yaml

SEARCHES = ("grid", "random", "optuna")


class SweepError(PipelineError):
    """The sweep cannot start: a bad -S, a missing origin, remote or revision."""

    exit_code = 2


def search_space(overrides: list[str], search: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(fixed {key: value}, swept {key: Ray Tune domain}) from `-S` overrides in Hydra's grammar."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from hydra.errors import HydraException
    from ray import tune

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise SweepError(f"-S: {' '.join(str(exc).split())}") from None
    fixed, swept = {}, {}
    for override in parsed:
        key, value = override.key_or_group, override.value()
        if isinstance(value, (ChoiceSweep, RangeSweep)):
            options = (
                list(value.list)
                if isinstance(value, ChoiceSweep)
                else list(range(int(value.start or 0), int(value.stop or 0), int(value.step or 1)))
            )
            swept[key] = tune.grid_search(options) if search == "grid" else tune.choice(options)
        elif isinstance(value, IntervalSweep):
            if search == "grid":
                raise SweepError(
                    f"-S {override.input_line}: an interval needs --search optuna or random, "
                    "a grid takes a list such as 'key=0.1,0.2'"
                )
            lo, hi, log = value.start, value.end, "log" in value.tags
            if lo is None or hi is None:
                raise SweepError(f"-S {override.input_line}: an interval needs both ends")
            if isinstance(lo, int) and isinstance(hi, int):
                swept[key] = (tune.lograndint if log else tune.randint)(lo, hi)
            else:
                swept[key] = (tune.loguniform if log else tune.uniform)(lo, hi)
        else:
            fixed[key] = value
    return fixed, swept


def as_override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else value}"


def experiment_name(overrides: list[str]) -> str:
    """A git-ref-safe name derived from the trial's overrides alone: the same params, the same name."""
    digest = hashlib.sha1("\n".join(sorted(overrides)).encode()).hexdigest()[:7]
    slug = "_".join(f"{o.split('=', 1)[0].rsplit('.', 1)[-1]}-{o.split('=', 1)[1]}" for o in sorted(overrides))
    slug = re.sub(r"[^A-Za-z0-9._-]+", "", slug)[:48].strip("._-")
    return f"{slug}-{digest}" if slug else f"sweep-{digest}"


def check_params(params_yaml: str, rev: str, fixed: dict[str, Any], swept: dict[str, Any]) -> None:
    """Every key and value a trial could get, against params.yaml at the revision (one line, exit 2)."""
    from ray.tune.search.sample import Float, Integer

    try:
        base = parse_params(read_yaml(params_yaml))
    except PipelineError as exc:
        raise SweepError(f"params.yaml at {rev[:7]}: {exc}") from None
    candidates: dict[str, list[Any]] = {}
    for key, domain in swept.items():
        if isinstance(domain, dict) and "grid_search" in domain:
            candidates[key] = domain["grid_search"]
        elif hasattr(domain, "categories"):
            candidates[key] = list(domain.categories)
        elif isinstance(domain, Float):
            candidates[key] = [domain.lower, domain.upper]
        elif isinstance(domain, Integer):  # randint's upper end is exclusive
            candidates[key] = [domain.lower, domain.upper - 1]
    try:
        apply_overrides(base, [as_override(k, v) for k, v in fixed.items()])
        for key, values in candidates.items():
            for value in values:
                apply_overrides(base, [as_override(k, v) for k, v in fixed.items()] + [as_override(key, value)])
    except PipelineError as exc:
        raise SweepError(str(exc)) from None
