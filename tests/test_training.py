import math
from pathlib import Path

import pytest
import torch

from helpers import synthetic_digits
from mnist_pipeline import checkpoint
from mnist_pipeline.engine import Trainer, make_schedule, predict_logits, seed_everything, select_device
from mnist_pipeline.errors import CheckpointError, DeviceError, TrainingDiverged
from mnist_pipeline.fileio import write_torch
from mnist_pipeline.models import CNN, MLP, build_model, count_parameters
from mnist_pipeline.params import load_params

CPU = torch.device("cpu")


def data(n=320, seed=0):
    x, y = synthetic_digits(n, seed)
    return x, y.long()


@pytest.mark.parametrize("name, kwargs, expected", [
    ("mlp", {"hidden": [512, 256], "dropout": 0.1}, 784 * 512 + 2 * 512 + 512 * 256 + 2 * 256 + 256 * 10 + 10),
    ("cnn", {"channels": [[8], [16, 16], [32, 32]], "dropout": 0.0},
     9 * (8 + 8 * 16 + 16 * 16 + 16 * 32 + 32 * 32) + 2 * (8 + 16 + 16 + 32 + 32) + 32 * 10 + 10),
])
def test_models_return_logits_and_count_parameters(name, kwargs, expected):
    model = build_model(name, **kwargs).eval()
    assert model(torch.zeros(5, 1, 28, 28)).shape == (5, 10)
    assert count_parameters(model) == expected


def test_default_cnn_is_under_20k_parameters():
    defaults = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    cnn = defaults.model_copy(update={"model": "cnn"})
    assert count_parameters(build_model("cnn", **cnn.model_kwargs())) <= 20_000


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        build_model("resnet")


def make_trainer(params, model_name="mlp", seed=0, **train_changes):
    seed_everything(seed)
    p = params.model_copy(update={"model": model_name}).with_train(**train_changes)
    model = build_model(model_name, **p.model_kwargs())
    x, y = data()
    vx, vy = data(100, seed=5)
    return Trainer(model, (x, y), (vx, vy), p.train, 0.2, 0.3, seed, CPU)


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_training_lowers_the_loss(params, model_name):
    trainer = make_trainer(params, model_name, epochs=4)
    first_loss, first_acc = trainer.validate()
    trainer.fit()
    assert trainer.history[-1]["train_loss"] < trainer.history[0]["train_loss"]
    assert min(h["val_loss"] for h in trainer.history) < first_loss
    assert trainer.best.val_acc > (0.5 if model_name == "mlp" else 0.2) > first_acc


def test_one_step_lowers_the_loss_on_that_batch():
    torch.manual_seed(0)
    model = MLP([16], 0.0)
    x, y = data(64)
    inputs = x.unsqueeze(1).float() / 255
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = torch.nn.functional.cross_entropy(model(inputs), y)
    before.backward()
    opt.step()
    after = torch.nn.functional.cross_entropy(model(inputs), y)
    assert after < before


def test_ema_weights_are_validated_and_kept(params):
    trainer = make_trainer(params, "cnn", epochs=3, ema=0.9)
    ema_after: dict[int, dict] = {}
    trainer.fit(on_epoch=lambda stats: ema_after.__setitem__(
        stats.epoch, {k: v.clone() for k, v in trainer.ema.module.state_dict().items()}))
    raw_state = trainer.model.state_dict()
    assert any(not torch.equal(trainer.ema.module.state_dict()[k], raw_state[k]) for k in raw_state)
    # Whichever epoch was best on val, the kept weights are the EMA's as they were after that epoch.
    best = trainer.best.state
    assert all(torch.equal(best[k], ema_after[trainer.best.epoch][k]) for k in best)
    assert any(not torch.equal(best[k], raw_state[k]) for k in best), "the raw weights were kept"


@pytest.mark.parametrize("changes, expected", [
    # lr at the start of each of 3 epochs, as the history records it
    ({"optimizer": "adam", "lr": 0.01, "scheduler": "cosine"}, "falls every epoch"),
    ({"optimizer": "sgd", "lr": 0.05, "scheduler": "onecycle", "warmup": 0.5}, "warms up from lr/25"),
    ({"optimizer": "adamw", "lr": 0.01, "scheduler": "step", "step_size": 1, "gamma": 0.5, "ema": 0.0},
     [0.01, 0.005, 0.0025]),
    ({"optimizer": "sgd", "scheduler": "plateau", "nesterov": False}, "trains"),  # its rate: the test below
    ({"optimizer": "sgd", "lr": 0.05, "scheduler": "none", "momentum": 0.0}, [0.05, 0.05, 0.05]),
])
def test_every_optimizer_and_scheduler_trains_at_the_rate_it_should(params, changes, expected):
    trainer = make_trainer(params, "mlp", epochs=3, **changes)
    trainer.fit()
    assert len(trainer.history) == 3
    assert all(math.isfinite(h["train_loss"]) for h in trainer.history)
    rates = [h["lr"] for h in trainer.history]
    if expected == "trains":
        assert trainer.history[-1]["train_loss"] < trainer.history[0]["train_loss"]
    elif expected == "falls every epoch":
        assert rates[0] == pytest.approx(changes["lr"]) and rates[0] > rates[1] > rates[2] > 0
    elif expected == "warms up from lr/25":
        assert rates[0] == pytest.approx(changes["lr"] / 25) and rates[1] > rates[0]
    else:
        assert rates == pytest.approx(expected, rel=1e-6, abs=0)


def test_plateau_lowers_the_rate_after_patience_epochs_without_improvement(params):
    tp = params.mlp.train.model_copy(update={"scheduler": "plateau", "lr": 0.1, "gamma": 0.5, "plateau_patience": 1})
    optimizer = torch.optim.SGD(MLP([8], 0.0).parameters(), lr=tp.lr)
    schedule = make_schedule(optimizer, tp, steps_per_epoch=10)
    rates = []
    for val_acc in (0.50, 0.60, 0.60, 0.60, 0.70, 0.70, 0.70):  # stalls twice for 2 epochs
        schedule.after_batch()
        schedule.after_epoch(val_acc)
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025], rel=1e-9, abs=0)


def test_same_seed_gives_identical_weights_and_another_seed_does_not(params):
    runs = []
    for seed in (1, 1, 2):
        trainer = make_trainer(params, "cnn", seed=seed)
        trainer.fit()
        runs.append(trainer.best.state)
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_resumed_training_matches_uninterrupted(params, tmp_path):
    full = make_trainer(params, "cnn", epochs=3)
    full.fit()
    first = make_trainer(params, "cnn", epochs=3)
    first.run_epoch()
    write_torch(tmp_path / "state.pt", first.state_dict())
    torch.manual_seed(1234)  # whatever happened to the global RNG before the crash
    resumed = make_trainer(params, "cnn", epochs=3)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    resumed.fit()
    assert resumed.history == full.history
    assert all(torch.equal(full.best.state[k], resumed.best.state[k]) for k in full.best.state)


def test_early_stopping_stops(params):
    trainer = make_trainer(params, "mlp", epochs=30, lr=1e-6, scheduler="none",
                           early_stopping=params.train.early_stopping.model_copy(update={"patience": 2, "min_delta": 0.5}))
    trainer.fit()
    assert len(trainer.history) == 3  # epoch 1 sets the best; 2 more without a 0.5 gain stop it
    assert trainer.finished and trainer.best.epoch == 1


def test_divergence_names_epoch_and_learning_rate(params):
    trainer = make_trainer(params, "mlp", lr=1e30, scheduler="none", optimizer="sgd", label_smoothing=0.0)
    with pytest.raises(TrainingDiverged, match=r"epoch 1 \(learning rate 1e\+30\)"):
        trainer.fit()


def test_predict_logits_batches_consistently():
    torch.manual_seed(0)
    model = CNN([[4], [8]], 0.0).eval()
    x, _ = data(50)
    a = predict_logits(model, x, 0.2, 0.3, 7, CPU)
    b = predict_logits(model, x, 0.2, 0.3, 50, CPU)
    assert a.shape == (50, 10) and torch.allclose(a, b, atol=1e-5)


def test_device_override(monkeypatch):
    assert select_device({"MNIST_DEVICE": "cpu"}) == CPU
    with pytest.raises(DeviceError, match="MNIST_DEVICE='tpu'"):
        select_device({"MNIST_DEVICE": "tpu"})
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="not available"):
            select_device({"MNIST_DEVICE": "cuda"})


def test_checkpoint_rebuilds_model_and_refuses_bad_files(tmp_path):
    torch.manual_seed(0)
    model = CNN([[4], [8]], 0.0).eval()
    ckpt = checkpoint.Checkpoint(model="cnn", model_kwargs={"channels": [[4], [8]], "dropout": 0.0},
                                 state_dict=model.state_dict(), normalisation={"mean": 0.1, "std": 0.3},
                                 classes=list("0123456789"), params={"seed": 1}, data={"train": "ab"},
                                 best={"epoch": 1})
    checkpoint.save_checkpoint(tmp_path / "c.pt", ckpt)
    loaded = checkpoint.load_checkpoint(tmp_path / "c.pt").build()
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(loaded(x), model(x))

    (tmp_path / "trunc.pt").write_bytes((tmp_path / "c.pt").read_bytes()[:500])
    with pytest.raises(CheckpointError, match="trunc.pt: not a valid checkpoint"):
        checkpoint.load_checkpoint(tmp_path / "trunc.pt")

    torch.save({"format": checkpoint.FORMAT, "evil": Evil()}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match="pickled.pt: .*pickled objects"):
        checkpoint.load_checkpoint(tmp_path / "pickled.pt")
    assert not (tmp_path / "pwned").exists()

    write_torch(tmp_path / "other.pt", {"state_dict": model.state_dict()})
    with pytest.raises(CheckpointError, match="other.pt: not a mnist-pipeline-checkpoint"):
        checkpoint.load_checkpoint(tmp_path / "other.pt")


class Evil:
    """Unpickling this would run code; weights_only loading must refuse it."""

    def __reduce__(self):
        return (open, ("pwned", "w"))
