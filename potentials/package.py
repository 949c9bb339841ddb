"""Saving architectures as eqcalc model packages (metadata JSON + safetensors, no pickle)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from eqcalc import package


def metadata_of(model: torch.nn.Module, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The metadata block of ``model``: architecture, hyperparameters, species, cutoff, dtype."""
    config = model.config_dict()
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    modes = ["conservative"] + (["direct"] if config.get("direct_forces") else [])
    meta = {
        "architecture": model.architecture,
        "config": config,
        "species": list(config["species"]),
        "cutoff": float(config["cutoff"]),
        "dtype": dtype,
        "force_modes": modes,
        "stress": True,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        # potentials.frames: "none" unless the model is wrapped in frame averaging
        "frame_averaging": getattr(model, "frame_averaging", "none"),
        "training": {},
    }
    if getattr(model, "frame_source", "edges") != "edges":
        meta["frame_source"] = model.frame_source
    meta.update(extra or {})
    return meta


def save(model: torch.nn.Module, path: str | os.PathLike, **metadata: Any) -> Path:
    """Write ``model`` as a ``.eqm`` package any ``EquivariantCalculator`` loads.

    Extra keyword arguments go into the metadata (e.g. ``training={...}`` with data summary
    and metrics).
    """
    return package.write(path, metadata_of(model, metadata), model.state_dict())


def load(path: str | os.PathLike, dtype: Optional[str] = None) -> torch.nn.Module:
    """Read a package back into an eager, trainable model (weights checked by sha256)."""
    return package.build_eager(package.read(package.resolve(path)), dtype)
