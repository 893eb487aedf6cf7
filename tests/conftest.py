from pathlib import Path

import pytest
import yaml

from mnist_pipeline.params import parse_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def params():
    """The repository's params.yaml, shrunk to sizes that train in a second."""
    p = parse_params(yaml.safe_load((ROOT / "params.yaml").read_text()))
    train = p.train.model_copy(update={"epochs": 2, "batch_size": 32, "lr": 0.05, "ema": 0.0})
    return p.model_copy(update={"train": train, "mlp": p.mlp.model_copy(update={"hidden": (32,)}),
                                "cnn": p.cnn.model_copy(update={"channels": ((4,), (8,))})})
