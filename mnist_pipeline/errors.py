"""The one error type the stages and tools turn into a one-line message.

Every expected failure — a params typo, a corrupt download, an unreadable checkpoint,
an export that disagrees with PyTorch, a diverging training — is a `PipelineError`
whose message is meant for the user as it is. `stage.run` prints it on one line and
exits with `exit_code`; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors
    about failures inside libraries whose messages run to many lines."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class PipelineError(Exception):
    """An expected failure; `str(error)` says what went wrong and what to do."""

    exit_code = 1


class ParamsError(PipelineError):
    """params.yaml is unusable: a bad value, an unknown or missing key, bad YAML."""

    exit_code = 2


class DatasetError(PipelineError):
    """A download, a data file or a processed split is unusable; the message names it."""


class CheckpointError(PipelineError):
    """A checkpoint or resume-state file is missing, corrupt or not ours."""


class TrainingDiverged(PipelineError):
    """The training loss became NaN or infinite."""


class ParityError(PipelineError):
    """An exported model disagrees with the PyTorch checkpoint."""


class DeviceError(PipelineError):
    """MNIST_DEVICE names a device that is unknown or not on this machine."""


class ModelFileError(PipelineError):
    """An exported model file that cannot be (or may not be) loaded."""
