"""One error hierarchy for eqcalc.

Every bad input raises a subclass of :class:`EqcalcError`. Each message names the offending
input and says how to fix it. Subclasses that describe a bad *value* also derive from
``ValueError`` (ASE habit), file problems from ``OSError`` where the file is missing.
"""
from __future__ import annotations


class EqcalcError(Exception):
    """Base class of every error eqcalc raises on purpose."""


class InvalidAtomsError(EqcalcError, ValueError):
    """The structure cannot be evaluated: empty, NaN/inf, overlapping atoms, bad cell."""


class UnknownElementError(InvalidAtomsError):
    """An element the model was not trained on."""


class CellError(InvalidAtomsError):
    """A periodic direction has a zero or singular cell vector."""


class InvalidOptionError(EqcalcError, ValueError):
    """An option value is not one of the allowed choices."""


class DeviceError(EqcalcError, RuntimeError):
    """The requested device is not available on this machine."""


class ModelFileError(EqcalcError, ValueError):
    """A model package file is missing, corrupt, truncated, foreign or unsafe."""


class UnsafeModelError(ModelFileError):
    """A foreign model file (e.g. a pickle) asks for something a converter refuses to do: an
    unknown global, an unaccepted opcode, a size beyond the limits. Nothing of it was run."""


class UnsupportedModelError(ModelFileError):
    """A foreign model file is readable but uses a block or option the converter cannot
    reproduce exactly; the message names it and the way out."""


class ModelVersionError(ModelFileError):
    """The model file was written by a newer schema/package than this one understands."""


class CompileError(EqcalcError, RuntimeError):
    """A compiled form could not be built or disagrees with the eager model."""


try:  # ASE's own type, so ASE code that catches it keeps working
    from ase.calculators.calculator import PropertyNotImplementedError as _ASEPropertyError
except ImportError:  # pragma: no cover - ase is a dependency
    _ASEPropertyError = NotImplementedError


class PropertyNotAvailableError(EqcalcError, _ASEPropertyError):
    """A property this model or structure cannot give (e.g. stress of a molecule)."""


class MissingDependencyError(EqcalcError, ImportError):
    """An optional package a feature needs is not installed (the message says which extra)."""


class SystemTooLargeError(EqcalcError, MemoryError):
    """The batch would need more memory than the device has (e.g. the triplets of a dense cell)."""


class NonFiniteOutputError(EqcalcError, FloatingPointError):
    """The model produced NaN or inf; the structure is far outside what it was trained on."""


class UnstableSimulationError(NonFiniteOutputError):
    """An MD run or relaxation left physics (non-finite values, or temperature or forces far
    beyond any physical run); ``system`` and ``step`` say where it happened."""

    def __init__(self, message: str, system: int | None = None, step: int | None = None):
        super().__init__(message)
        self.system, self.step = system, step


class OutputError(EqcalcError, OSError):
    """An output file or folder cannot be written (missing, read-only, disk full)."""


class RunFolderBusyError(OutputError):
    """Another live process is writing into the same output folder."""


class CheckpointError(EqcalcError, ValueError):
    """A checkpoint is corrupt, foreign, or does not match the model, inputs or settings."""


class DataFileError(EqcalcError, ValueError):
    """A data or structure file cannot be read (the message names file and reason)."""


def check_choice(name: str, value, choices) -> None:
    """Raise :class:`InvalidOptionError` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise InvalidOptionError(
            f"{name}={value!r} is not a valid choice; use one of {', '.join(map(repr, choices))}"
        )
