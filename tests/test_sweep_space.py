"""mnist-sweep's search space, in-process: `-S` in Hydra's grammar → Ray Tune domains, and the refusals.
(Crossing the swept keys is Ray Tune's: tests/test_sweep.py runs real sweeps on a real cluster.)"""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                reason="needs the sweep extra: pip install -e '.[sweep]'")


def test_a_grid_sweeps_each_list_and_keeps_the_rest_fixed():
    from mnist_pipeline.sweep.space import search_space

    fixed, swept = search_space(["mlp.train.lr=0.02,0.1", "seed=1,2,3", "model=mlp", "mlp.train.epochs=range(2,5)"],
                                "grid")
    assert fixed == {"model": "mlp"}
    assert swept == {"mlp.train.lr": {"grid_search": [0.02, 0.1]}, "seed": {"grid_search": [1, 2, 3]},
                     "mlp.train.epochs": {"grid_search": [2, 3, 4]}}


@pytest.mark.parametrize("search", ["random", "optuna"])
def test_a_search_samples_lists_and_intervals(search):
    from ray.tune.search.sample import Categorical, Float

    from mnist_pipeline.sweep.space import search_space

    _, swept = search_space(["seed=1,2", "mlp.train.lr=tag(log,interval(0.001,0.3))", "mlp.dropout=interval(0,0.5)"],
                            search)
    assert isinstance(swept["seed"], Categorical) and swept["seed"].categories == [1, 2]
    lr, dropout = swept["mlp.train.lr"], swept["mlp.dropout"]
    assert isinstance(lr, Float) and (lr.lower, lr.upper) == (0.001, 0.3) and type(lr.sampler).__name__.endswith("LogUniform")
    assert isinstance(dropout, Float) and type(dropout.sampler).__name__.lstrip("_") == "Uniform"


@pytest.mark.parametrize("overrides, search, message", [
    (["mlp.train.lr=interval(0.01,0.1)"], "grid", "an interval needs --search optuna or random"),
    (["mlp.train.lr=[0.1"], "grid", "-S: "),
])
def test_a_bad_space_is_refused_before_any_trial(overrides, search, message):
    from mnist_pipeline.sweep.space import SweepError, search_space

    with pytest.raises(SweepError, match=message.replace("(", r"\(")):
        search_space(overrides, search)
