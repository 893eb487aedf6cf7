"""Seeding, device choice, the training loop and batched inference.

`Trainer` owns everything an epoch changes — model, optimizer, scheduler, EMA,
random generators, early-stopping counters, history — and exposes it through
`state_dict()` / `load_state_dict()`, so a run resumed from the state saved after
epoch k continues exactly as the uninterrupted run would have, bit for bit.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from mnist_pipeline.data import batch_indices, random_affine, standardise, to_unit
from mnist_pipeline.errors import DeviceError, TrainingDiverged
from mnist_pipeline.models import single_view
from mnist_pipeline.params import TrainParams

DEVICE_ENV = "MNIST_DEVICE"


def seed_everything(seed: int) -> None:
    """Seed every generator and ask for deterministic kernels (PyTorch reproducibility notes)."""
    random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    # warn_only: a few CUDA backward kernels have no deterministic version; on the
    # CPU (and for what this project uses) every kernel is deterministic.
    torch.use_deterministic_algorithms(True, warn_only=True)


def select_device(env: Mapping[str, str] = os.environ) -> torch.device:
    """The accelerator when there is one (CUDA, MPS, …), else the CPU; `MNIST_DEVICE` overrides."""
    wanted = env.get(DEVICE_ENV, "").strip()
    if not wanted:
        return torch.accelerator.current_accelerator(check_available=True) or torch.device("cpu")
    try:
        device = torch.device(wanted)
    except RuntimeError:
        raise DeviceError(f"{DEVICE_ENV}={wanted!r}: expected cpu, cuda, cuda:N or mps") from None
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    if device.type != "cpu" and (accelerator is None or accelerator.type != device.type):
        raise DeviceError(f"{DEVICE_ENV}={wanted!r}: that device is not available on this machine")
    return device


def uses_channels_last(model: nn.Module) -> bool:
    # oneDNN's NHWC convolutions: the default CNN's training step is 1.62× faster in
    # channels_last on the 2-core CPU (benchmarks/results/ops.json); an MLP has no
    # convolutions to gain from it.
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def _prepare(x: torch.Tensor, mean: float, std: float, channels_last: bool) -> torch.Tensor:
    x = standardise(x, mean, std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.no_grad()
def predict_logits(
    model: nn.Module, images: torch.Tensor, mean: float, std: float, batch_size: int, device: torch.device
) -> torch.Tensor:
    """Logits (float32, on the CPU) for uint8 images N×28×28, in batches."""
    model.eval()
    channels_last = uses_channels_last(model)
    outputs = []
    for idx in batch_indices(len(images), batch_size):
        x = _prepare(to_unit(images[idx].to(device)), mean, std, channels_last)
        outputs.append(model(x).float().cpu())
    return torch.cat(outputs) if outputs else torch.empty(0, 10)


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    lr: float


@dataclass(frozen=True)
class BestEpoch:
    """The epoch kept so far: its validation scores and (evaluation) weights."""

    epoch: int = 0
    val_acc: float = -1.0
    val_loss: float = math.inf
    state: dict[str, torch.Tensor] | None = None

    def summary(self) -> dict[str, float | int]:
        return {"epoch": self.epoch, "val_acc": self.val_acc, "val_loss": self.val_loss}

    def weights(self) -> dict[str, torch.Tensor]:
        """The kept epoch's weights; only a fit that ran no epoch has none."""
        if self.state is None:
            raise RuntimeError("no epoch was kept: training ran no epoch")
        return self.state


@dataclass(frozen=True)
class Distillation:
    """Soft targets from a trained teacher (Hinton et al. 2015): its logits for every training
    image, computed once before training (the un-augmented train split, in its order), so the
    teacher costs one inference pass. The loss becomes (1 − weight)·CE(labels) +
    weight·T²·KL(teacher ‖ student), both softened by the temperature T."""

    logits: torch.Tensor
    weight: float
    temperature: float

    def loss(self, hard: torch.Tensor, logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        target = F.log_softmax(self.logits[idx] / self.temperature, dim=1)
        soft = (
            F.kl_div(F.log_softmax(logits / self.temperature, dim=1), target, log_target=True, reduction="batchmean")
            * self.temperature**2
        )
        return (1 - self.weight) * hard + self.weight * soft


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # Decay only weight matrices and kernels; decaying BatchNorm scales and biases hurts small nets.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, tp: TrainParams) -> torch.optim.Optimizer:
    groups = _param_groups(model, tp.weight_decay)
    if tp.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=tp.lr, momentum=tp.momentum, nesterov=tp.nesterov and tp.momentum > 0)
    if tp.optimizer == "adam":
        return torch.optim.Adam(groups, lr=tp.lr)
    return torch.optim.AdamW(groups, lr=tp.lr)


@dataclass(frozen=True)
class Schedule:
    """The learning-rate scheduler (None: constant) and when it moves, decided once."""

    scheduler: Any
    after_batch: Callable[[], None]
    after_epoch: Callable[[float], Any]  # takes the epoch's validation accuracy


def _still() -> None:
    return None


def make_schedule(optimizer: torch.optim.Optimizer, tp: TrainParams, steps_per_epoch: int) -> Schedule:
    """onecycle and cosine move every batch; step once per epoch; plateau per epoch on val accuracy."""
    total = tp.epochs * steps_per_epoch
    lr_scheduler = torch.optim.lr_scheduler
    s: Any
    if tp.scheduler == "onecycle":
        s = lr_scheduler.OneCycleLR(optimizer, max_lr=tp.lr, total_steps=total, pct_start=tp.warmup)
        return Schedule(s, s.step, lambda val_acc: None)
    if tp.scheduler == "cosine":
        s = lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        return Schedule(s, s.step, lambda val_acc: None)
    if tp.scheduler == "step":
        s = lr_scheduler.StepLR(optimizer, step_size=tp.step_size, gamma=tp.gamma)
        return Schedule(s, _still, lambda val_acc: s.step())
    if tp.scheduler == "plateau":
        s = lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=tp.gamma, patience=tp.plateau_patience)
        return Schedule(s, _still, s.step)
    return Schedule(None, _still, lambda val_acc: None)


class Trainer:
    """Trains `model` on uint8 tensors held in memory (on `device`), one epoch per `run_epoch`."""

    def __init__(
        self,
        model: nn.Module,
        train: tuple[torch.Tensor, torch.Tensor],
        val: tuple[torch.Tensor, torch.Tensor],
        tp: TrainParams,
        mean: float,
        std: float,
        seed: int,
        device: torch.device,
        distill: Distillation | None = None,
    ):
        self.tp, self.mean, self.std, self.device = tp, mean, std, device
        self.distill = None if distill is None else replace(distill, logits=distill.logits.to(device))
        self.channels_last = uses_channels_last(model)
        self.model = model.to(device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.train_x, self.train_y = (t.to(device) for t in train)
        self.val_x, self.val_y = (t.to(device) for t in val)
        self.steps_per_epoch = math.ceil(len(self.train_x) / tp.batch_size)
        self.optimizer = make_optimizer(self.model, tp)
        self.schedule = make_schedule(self.optimizer, tp, self.steps_per_epoch)
        self.ema = (
            AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(tp.ema), use_buffers=True) if tp.ema else None
        )
        # Batch order and augmentation draw from their own generator, dropout from the
        # global one; both are part of the saved state.
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self.best = BestEpoch()
        self.bad_epochs = 0
        self.history: list[dict] = []

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    @property
    def finished(self) -> bool:
        patience = self.tp.early_stopping.patience
        return self.epoch >= self.tp.epochs or (patience > 0 and self.bad_epochs >= patience)

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.scheduler.state_dict() if self.schedule.scheduler is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python_rng": random.getstate(),
            "epoch": self.epoch,
            "best": {**self.best.summary(), "state": self.best.state},
            "bad_epochs": self.bad_epochs,
            "history": self.history,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.schedule.scheduler is not None:
            self.schedule.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        random.setstate(state["python_rng"])
        self.epoch, self.best, self.bad_epochs = state["epoch"], BestEpoch(**state["best"]), state["bad_epochs"]
        self.history = state["history"]

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def run_epoch(self, progress: bool = False) -> EpochStats:
        tp, aug = self.tp, self.tp.augment
        self.model.train()
        total_loss = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        lr = self._lr()
        bar = tqdm(
            total=self.steps_per_epoch,
            desc=f"epoch {self.epoch + 1}/{tp.epochs}",
            leave=False,
            disable=not progress,
            file=sys.stderr,
        )
        for idx in batch_indices(len(self.train_x), tp.batch_size, self.generator):
            idx = idx.to(self.device)
            x = to_unit(self.train_x[idx])
            if aug.enabled:
                x = random_affine(x, aug.rotate, aug.scale, aug.shift, self.generator, aug.elastic, aug.elastic_sigma)
            x = _prepare(x, self.mean, self.std, self.channels_last)
            y = self.train_y[idx]
            logits = self.model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=tp.label_smoothing)
            if self.distill is not None:
                loss = self.distill.loss(loss, logits, idx)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            self.schedule.after_batch()
            total_loss += loss.detach() * len(idx)
            correct += (logits.argmax(1) == y).sum()
            bar.update()
        bar.close()
        train_loss = float(total_loss) / len(self.train_x)
        if not math.isfinite(train_loss):
            raise TrainingDiverged(
                f"training diverged: the loss became {train_loss} in epoch {self.epoch + 1} "
                f"(learning rate {lr:g}); lower the model's train.lr (mlp.train.lr or cnn.train.lr) "
                "or use a warm-up scheduler"
            )
        val_loss, val_acc = self.validate()
        self.schedule.after_epoch(val_acc)
        self.epoch += 1
        stats = EpochStats(self.epoch, train_loss, float(correct) / len(self.train_x), val_loss, val_acc, lr)
        self._track_best(stats)
        self.history.append(asdict(stats))
        return stats

    @torch.no_grad()
    def validate(self) -> tuple[float, float]:
        # The epoch is judged on one view: test-time views (`<model>.views`) cost only at inference,
        # not in every epoch of training (nine views would make a CNN epoch's validation 9× longer).
        with single_view(self.eval_model):
            logits = predict_logits(self.eval_model, self.val_x, self.mean, self.std, 1000, self.device)
        labels = self.val_y.cpu()
        loss = float(F.cross_entropy(logits, labels))
        return loss, float((logits.argmax(1) == labels).double().mean())

    def _track_best(self, stats: EpochStats) -> None:
        """Keep the weights of the best epoch on val: higher accuracy, ties to the lower loss."""
        best = self.best
        better_acc = stats.val_acc > best.val_acc + self.tp.early_stopping.min_delta
        tie = stats.val_acc == best.val_acc and stats.val_loss < best.val_loss
        if better_acc or tie:
            state = {k: v.detach().cpu().clone() for k, v in self.eval_model.state_dict().items()}
            self.best = BestEpoch(stats.epoch, stats.val_acc, stats.val_loss, state)
        if better_acc:
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1

    def fit(self, on_epoch: Callable[[EpochStats], None] = lambda stats: None, progress: bool = False) -> float:
        """Train until `epochs` or early stopping; returns the seconds spent in this call."""
        start = time.perf_counter()
        while not self.finished:
            on_epoch(self.run_epoch(progress))
        return time.perf_counter() - start
