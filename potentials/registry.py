"""Registry of architectures: name → model class, and seeded construction.

Every registered class has a class attribute ``architecture`` (its registry name), a frozen
dataclass ``Config`` (fields ``species``, ``cutoff``, then its own hyperparameters), takes a
``Config`` in its constructor and offers ``config_dict()``.

Any architecture can be wrapped in frame averaging (:mod:`potentials.frames`) with
``frame_averaging="full" | "se3" | "2d" | "stochastic" | "none"``; a class may set
``default_frame_averaging`` (FAENet: ``"stochastic"``), the others default to ``"none"``.
"""
import dataclasses
from typing import Dict, List, Optional, Sequence

import torch

from eqcalc.errors import InvalidOptionError

ARCHITECTURES: Dict[str, type] = {}
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def register(name: str):
    """Class decorator: register a model class under ``name`` (and set its ``architecture``)."""

    def decorator(cls: type) -> type:
        if name in ARCHITECTURES and ARCHITECTURES[name] is not cls:
            raise InvalidOptionError(f"architecture {name!r} is already registered")
        cls.architecture = name
        ARCHITECTURES[name] = cls
        return cls

    return decorator


def architectures() -> List[str]:
    """Names of the registered architectures, sorted."""
    return sorted(ARCHITECTURES)


def get(name: str) -> type:
    """The model class registered under ``name``; InvalidOptionError listing the valid names."""
    if name not in ARCHITECTURES:
        raise InvalidOptionError(
            f"architecture {name!r} is unknown; use one of {', '.join(map(repr, architectures()))}")
    return ARCHITECTURES[name]


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.replace("torch.", "") in DTYPES:
        return DTYPES[dtype.replace("torch.", "")]
    raise InvalidOptionError(f"dtype={dtype!r} is not supported; use 'float32' or 'float64'")


def _make_config(cls: type, name: str, values: Dict):
    fields = [f.name for f in dataclasses.fields(cls.Config)]
    unknown = [k for k in values if k not in fields]
    if unknown:
        raise InvalidOptionError(
            f"{name} has no hyperparameter {', '.join(map(repr, unknown))}; "
            f"valid ones are {', '.join(map(repr, fields))}")
    if "species" not in values:
        raise InvalidOptionError(f"{name} needs species, the chemical symbols it covers")
    try:
        return cls.Config(**values)
    except TypeError as error:  # e.g. a wrong type for a field
        raise InvalidOptionError(f"{name}: {error}") from None


def _construct(cls: type, config, dtype, seed: int, frame_averaging: str = "none",
               frame_source: str = "edges") -> torch.nn.Module:
    from potentials.frames import wrap

    # fork_rng restores the global RNG afterwards: building a model never perturbs the caller.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = cls(config)
    return wrap(model.to(_dtype(dtype)), frame_averaging, frame_source)


def build(name: str, species: Sequence[str], cutoff: float = 5.0, dtype="float32", seed: int = 0,
          frame_averaging: Optional[str] = None, frame_source: str = "edges",
          **hyperparameters) -> torch.nn.Module:
    """An untrained model of architecture ``name`` for ``species`` (chemical symbols), seeded.

    ``cutoff`` in Å; ``dtype`` "float32" or "float64"; ``frame_averaging`` "full" | "se3" | "2d" |
    "stochastic" | "none" (None: the architecture's default) and ``frame_source`` "edges" |
    "positions" (see :mod:`potentials.frames`); other keywords are the architecture's
    hyperparameters (see its ``Config``). Same arguments and seed → identical weights.
    """
    cls = get(name)
    if isinstance(species, str):
        species = [species]
    config = _make_config(cls, name, dict(hyperparameters, species=tuple(species), cutoff=cutoff))
    if frame_averaging is None:
        frame_averaging = getattr(cls, "default_frame_averaging", "none")
    return _construct(cls, config, dtype, seed, frame_averaging, frame_source)


def from_config(name: str, config_dict: Dict, dtype="float32", frame_averaging: str = "none",
                frame_source: str = "edges") -> torch.nn.Module:
    """Rebuild a model from ``model.config_dict()`` and the metadata's ``frame_averaging`` and
    ``frame_source`` (weights still to be loaded)."""
    cls = get(name)
    # Fields added after a file was written take the value the file was trained with.
    values = {**getattr(cls.Config, "FILE_DEFAULTS", {}), **config_dict}
    if "species" in values:
        values["species"] = tuple(values["species"])
    return _construct(cls, _make_config(cls, name, values), dtype, 0, frame_averaging, frame_source)
