import dataclasses
from pathlib import Path

import pytest
import yaml

from mnist_pipeline.params import parse_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def params():
    """The repository's params.yaml, shrunk to sizes that train in a second."""
    p = parse_params(yaml.safe_load((ROOT / "params.yaml").read_text()))
    train = dataclasses.replace(p.train, epochs=2, batch_size=32, lr=0.05, ema=0.0)
    return dataclasses.replace(p, train=train, mlp=dataclasses.replace(p.mlp, hidden=(32,)),
                               cnn=dataclasses.replace(p.cnn, channels=((4,), (8,))))
