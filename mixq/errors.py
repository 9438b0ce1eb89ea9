"""mixq's error types: one family per kind of bad input, all under MixqError.

Catch `mixq.MixqError` to handle anything mixq refuses; each message names the file or layer, what is
wrong and how to fix it. The command-line tools print these messages without a traceback and exit
with status 2. Each class also derives from the built-in exception its family used before
(ValueError, RuntimeError, OSError), so existing `except ValueError` handlers keep working.
"""

from __future__ import annotations


class MixqError(Exception):
    """Base of every error mixq raises on purpose."""


class ConfigError(MixqError, ValueError):
    """A calibration config or command-line setting that is unknown, mistyped or out of range."""


class PromptFileError(MixqError, ValueError):
    """A prompts file that is missing, unreadable or malformed."""


class PlanMismatchError(MixqError, ValueError):
    """A bit plan that is malformed or was made for another model."""


class CheckpointError(MixqError, ValueError):
    """A checkpoint that cannot be saved or loaded as asked."""


class CalibrationFileError(MixqError, ValueError):
    """An activation-range, reference or sensitivity file that is malformed or belongs elsewhere."""


class BudgetError(MixqError, ValueError):
    """A bit budget that is out of range or cannot be met by the candidate bit-widths."""


class NonFiniteActivationError(MixqError, RuntimeError):
    """NaN or Inf reached a layer's input or weights."""


class ModelLoadError(MixqError, OSError):
    """A pipeline that could not be loaded (Hub unreachable, offline mode, a folder without a model)."""


class StorageError(MixqError, OSError):
    """A file that could not be written: a full disk or another I/O error reported by safetensors."""


class RunFolderError(MixqError, ValueError):
    """A calibration run folder whose recorded inputs differ from the ones given now."""


__all__ = [
    "MixqError",
    "ConfigError",
    "PromptFileError",
    "PlanMismatchError",
    "CheckpointError",
    "CalibrationFileError",
    "BudgetError",
    "NonFiniteActivationError",
    "ModelLoadError",
    "RunFolderError",
    "StorageError",
]
