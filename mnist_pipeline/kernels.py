"""Which CPU kernels torch runs: a portable set by default, so a run gives the same bytes on any x86-64 CPU.

Import this module before anything imports torch (every stage script does so first, as does
tests/conftest.py and benchmarks/common.py). It imports torch itself, after setting:

- `ATEN_CPU_CAPABILITY=avx2`: ATen's elementwise ops, reductions and optimizers use their AVX2
  code even on an AVX-512 CPU (the vector width decides the order of a sum);
- `MKL_CBWR=COMPATIBLE`: MKL's matmul takes its conditional-numerical-reproducibility path, the one
  it honours on AMD as well as Intel. It is MKL's SSE2 code, the cost of the set (1.36× for the
  default MLP's training at its last measure, benchmarks/results/kernels.json). `AVX2,STRICT` is faster and agrees
  between AMD CPUs, but an emulated Intel Haswell trained another MLP with it;
- `ONEDNN_MAX_CPU_ISA=AVX2`: oneDNN's convolutions stop at AVX2;

and then a fixed intra-op thread count (`THREADS`): ATen splits a reduction (BatchNorm's batch
statistics, a large sum) into one part per thread, so the count decides the order of the additions.

`MNIST_KERNELS=native` leaves all of it alone: the fastest kernels and every core of the machine at
hand, for speed records, with bytes that are this machine's own. docs/reproducibility.md says what is
promised, and tests/test_portable.py checks it under `qemu-x86_64` on CPUs of other vendors.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping

from mnist_pipeline.errors import PipelineError

ENV = "MNIST_KERNELS"
PORTABLE, NATIVE = "portable", "native"
PINS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "AVX2"}
THREADS = 2  # the cores of the CI machine; more buys little for tensors this small
CAPABILITY = "AVX2"  # what torch.backends.cpu.get_cpu_capability() reports with the pins


class KernelsError(PipelineError):
    """The portable kernels cannot be guaranteed in this process."""

    exit_code = 2


def mode(environ: Mapping[str, str] = os.environ) -> str:
    wanted = environ.get(ENV, PORTABLE).strip().lower() or PORTABLE
    if wanted not in (PORTABLE, NATIVE):
        raise KernelsError(f"{ENV}={environ[ENV]!r}: expected {PORTABLE} (the default) or {NATIVE}")
    return wanted


def pin(environ: MutableMapping[str, str] = os.environ) -> str:
    """Set the portable kernel variables in `environ` (unless native) and return the mode. The
    variables are read once, when torch loads: pinning after that would silently do nothing."""
    chosen = mode(environ)
    if chosen == PORTABLE:
        if "torch" in sys.modules and environ is os.environ and any(os.environ.get(k) != v for k, v in PINS.items()):
            raise KernelsError(
                "torch was imported before mnist_pipeline.kernels: its CPU kernels can no longer be "
                "pinned (import mnist_pipeline.kernels first)"
            )
        environ.update(PINS)
    return chosen


def child_env(chosen: str, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """`environ` for a child process that runs `chosen` kernels. This process pinned its own, and a native
    child must not inherit those pins; a portable child pins itself."""
    return {**{k: v for k, v in environ.items() if k not in PINS}, ENV: chosen}


def describe() -> str:
    """One line for logs: which kernels and how many threads this process runs."""
    import torch

    return f"{mode()} kernels: {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads"


def _apply() -> None:
    if pin() == NATIVE:
        return
    import torch

    torch.set_num_threads(THREADS)
    if torch.backends.cpu.get_cpu_capability() != CAPABILITY:  # a CPU without AVX2 (before 2013), or an ignored pin
        raise KernelsError(
            f"portable kernels need {CAPABILITY}; this CPU runs "
            f"{torch.backends.cpu.get_cpu_capability()} (set {ENV}={NATIVE} to run anyway)"
        )


try:
    _apply()
except KernelsError as exc:  # at import, before any stage.run: the same one line and exit code as a params typo
    print(f"error: {exc}", file=sys.stderr)
    raise SystemExit(exc.exit_code) from None
