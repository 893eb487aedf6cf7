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
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from mnist_pipeline.data import batch_indices, random_affine, to_unit
from mnist_pipeline.params import TrainParams

DEVICE_ENV = "MNIST_DEVICE"


class TrainingDiverged(RuntimeError):
    pass


def seed_everything(seed: int) -> None:
    """Seed every generator and ask for deterministic kernels (PyTorch reproducibility notes)."""
    random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    # warn_only: a few CUDA backward kernels have no deterministic version; on the
    # CPU (and for what this project uses) every kernel is deterministic.
    torch.use_deterministic_algorithms(True, warn_only=True)


def select_device(env: dict[str, str] | os._Environ[str] = os.environ) -> torch.device:
    """CUDA, then MPS, then CPU; `MNIST_DEVICE=cpu|cuda|cuda:N|mps` overrides."""
    wanted = env.get(DEVICE_ENV, "").strip()
    if wanted:
        try:
            device = torch.device(wanted)
        except RuntimeError:
            raise ValueError(f"{DEVICE_ENV}={wanted!r}: expected cpu, cuda, cuda:N or mps") from None
        available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
        if not available.get(device.type, False):
            raise ValueError(f"{DEVICE_ENV}={wanted!r}: that device is not available on this machine")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def uses_channels_last(model: nn.Module) -> bool:
    # Measured on this project's CNN (benchmarks/): oneDNN's NHWC convolutions are
    # ~1.3-1.8× faster on CPU; an MLP has no convolutions to gain from it.
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def _prepare(x: torch.Tensor, mean: float, std: float, channels_last: bool) -> torch.Tensor:
    x = x.sub_(mean).div_(std)
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


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    lr: float


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


def make_scheduler(optimizer: torch.optim.Optimizer, tp: TrainParams, steps_per_epoch: int):
    """The scheduler, or None for a constant learning rate. onecycle and cosine step
    every batch; step and plateau step once per epoch."""
    total = tp.epochs * steps_per_epoch
    if tp.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=tp.lr, total_steps=total, pct_start=tp.warmup)
    if tp.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if tp.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=tp.step_size, gamma=tp.gamma)
    if tp.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=tp.gamma, patience=tp.plateau_patience
        )
    return None


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
    ):
        self.tp, self.mean, self.std, self.device = tp, mean, std, device
        self.channels_last = uses_channels_last(model)
        self.model = model.to(device, memory_format=torch.channels_last) if self.channels_last else model.to(device)
        self.train_x, self.train_y = (t.to(device) for t in train)
        self.val_x, self.val_y = (t.to(device) for t in val)
        self.steps_per_epoch = math.ceil(len(self.train_x) / tp.batch_size)
        self.optimizer = make_optimizer(self.model, tp)
        self.scheduler = make_scheduler(self.optimizer, tp, self.steps_per_epoch)
        self.ema = (
            AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(tp.ema), use_buffers=True) if tp.ema else None
        )
        # Batch order and augmentation draw from their own generator, dropout from the
        # global one; both are part of the saved state.
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self.best: dict = {"val_acc": -1.0, "val_loss": math.inf, "epoch": 0, "state": None}
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
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python_rng": random.getstate(),
            "epoch": self.epoch,
            "best": self.best,
            "bad_epochs": self.bad_epochs,
            "history": self.history,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        random.setstate(state["python_rng"])
        self.epoch, self.best, self.bad_epochs = state["epoch"], state["best"], state["bad_epochs"]
        self.history = state["history"]

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def run_epoch(self, progress: bool = False) -> EpochStats:
        tp, aug = self.tp, self.tp.augment
        self.model.train()
        total_loss = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        lr = self._lr()
        bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {self.epoch + 1}/{tp.epochs}", leave=False,
                   disable=not progress, file=sys.stderr)
        for idx in batch_indices(len(self.train_x), tp.batch_size, self.generator):
            idx = idx.to(self.device)
            x = to_unit(self.train_x[idx])
            if aug.enabled:
                x = random_affine(x, aug.rotate, aug.scale, aug.shift, self.generator)
            x = _prepare(x, self.mean, self.std, self.channels_last)
            y = self.train_y[idx]
            logits = self.model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=tp.label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            if isinstance(self.scheduler, (torch.optim.lr_scheduler.OneCycleLR,
                                           torch.optim.lr_scheduler.CosineAnnealingLR)):
                self.scheduler.step()
            total_loss += loss.detach() * len(idx)
            correct += (logits.argmax(1) == y).sum()
            bar.update()
        bar.close()
        train_loss = float(total_loss) / len(self.train_x)
        if not math.isfinite(train_loss):
            raise TrainingDiverged(
                f"training diverged: the loss became {train_loss} in epoch {self.epoch + 1} "
                f"(learning rate {lr:g}); lower train.lr or use a warm-up scheduler"
            )
        val_loss, val_acc = self.validate()
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(val_acc)
        elif isinstance(self.scheduler, torch.optim.lr_scheduler.StepLR):
            self.scheduler.step()
        self.epoch += 1
        stats = EpochStats(self.epoch, train_loss, float(correct) / len(self.train_x), val_loss, val_acc, lr)
        self._track_best(stats)
        self.history.append(asdict(stats))
        return stats

    @torch.no_grad()
    def validate(self) -> tuple[float, float]:
        logits = predict_logits(self.eval_model, self.val_x, self.mean, self.std, 1000, self.device)
        labels = self.val_y.cpu()
        loss = float(F.cross_entropy(logits, labels))
        return loss, float((logits.argmax(1) == labels).double().mean())

    def _track_best(self, stats: EpochStats) -> None:
        """Keep the weights of the best epoch on val: higher accuracy, ties to the lower loss."""
        best = self.best
        better_acc = stats.val_acc > best["val_acc"] + self.tp.early_stopping.min_delta
        tie = stats.val_acc == best["val_acc"] and stats.val_loss < best["val_loss"]
        if better_acc or tie:
            state = {k: v.detach().cpu().clone() for k, v in self.eval_model.state_dict().items()}
            self.best = {"val_acc": stats.val_acc, "val_loss": stats.val_loss, "epoch": stats.epoch, "state": state}
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
