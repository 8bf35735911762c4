"""The errors a user can act on.

Each carries a one-line message saying what is wrong and a hint saying what to
do. The CLI prints them as ``error: …`` / ``hint: …`` and exits 1 (QualityError: 3); any other
exception is a bug and propagates.
"""

from __future__ import annotations


class QlowerError(Exception):
    """Base of every user-facing error."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class ModelLoadError(QlowerError):
    """The model file could not be read, run, or did not define a model."""


class ConfigError(QlowerError):
    """A config file, scheme, or option value is invalid."""


class CalibrationError(QlowerError):
    """Calibration data is missing, unreadable, or of the wrong shape or dtype."""


class ExportError(QlowerError):
    """torch.export, quantization or lowering rejected the model."""


class StrictError(QlowerError):
    """--strict was given and some layer could not take the requested scheme."""


class OutputError(QlowerError):
    """The output path cannot be written."""


class PteError(QlowerError):
    """A .pte file is missing, truncated, corrupted, or not a .pte at all."""


class VerifyError(QlowerError):
    """Verification could not run (unknown op, mismatched inputs)."""


class QualityError(QlowerError):
    """The file computes what the quantized model computes, but quantization costs more
    against float than the bar the user set (--min-sqnr-float): exit 3, apart from defects."""

    exit_code = 3


class DeviceError(QlowerError):
    """No usable Vulkan device, or the device failed."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, for one-line error reports."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
