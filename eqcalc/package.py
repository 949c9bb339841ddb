"""Model package files (``.eqm``): a zip of ``metadata.json`` + ``weights.safetensors``.

Only data is stored: JSON and safetensors. Nothing in a package is ever unpickled or executed;
architecture code comes from the installed ``potentials`` package. Writing and reading live side
by side here, and every reading failure names the file and the fix.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict

import torch

from eqcalc.errors import ModelFileError, ModelVersionError

SCHEMA_VERSION = 1
FORMAT = "eqcalc-model"
METADATA = "metadata.json"
WEIGHTS = "weights.safetensors"
DTYPES = ("float32", "float64")
PICKLE_MAGIC = (b"\x80", b"(", b"c", b"]", b"}")  # protocol 2+ and protocol 0/1 openings


@dataclass(frozen=True)
class Package:
    """A read and checked package: its metadata and its weights (CPU tensors)."""

    path: str
    metadata: Dict[str, Any]
    weights: Dict[str, torch.Tensor]


def weights_sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def write(path: str | os.PathLike, metadata: Dict[str, Any], weights: Dict[str, torch.Tensor]) -> Path:
    """Write a package. ``metadata`` needs at least architecture, config, species, cutoff, dtype."""
    from safetensors.torch import save

    blob = save({k: v.detach().cpu().contiguous() for k, v in weights.items()})
    from eqcalc import __version__

    meta = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "eqcalc_version": __version__,
        "torch_version": torch.__version__,
        "units": {"energy": "eV", "length": "Å", "forces": "eV/Å", "stress": "eV/Å^3"},
        **metadata,
        "weights_sha256": weights_sha256(blob),
    }
    _check_metadata(meta, str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr(METADATA, json.dumps(meta, indent=2, ensure_ascii=False))
        z.writestr(WEIGHTS, blob)
    os.replace(tmp, path)  # never leave a half-written package under the real name
    return path


def read(path: str | os.PathLike) -> Package:
    """Read and check a package; raise :class:`ModelFileError` with the fix on any problem."""
    path = str(path)
    if not os.path.exists(path):
        raise ModelFileError(
            f"model file {path!r} does not exist; pass a path to a .eqm file or a shipped model name")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith(b"PK"):
        what = "a pickle" if head[:1] in PICKLE_MAGIC else "not a zip archive"
        raise ModelFileError(
            f"{path!r} is {what}, not an eqcalc model package; eqcalc never unpickles files. "
            "Re-create the package with potentials.save(model, path)")
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            if METADATA not in names or WEIGHTS not in names:
                hint = (" It looks like a torch.save/TorchScript archive, which may run code and is "
                        "never loaded." if any(n.endswith(".pkl") for n in names) else "")
                raise ModelFileError(
                    f"{path!r} is a zip file without {METADATA} and {WEIGHTS}: not an eqcalc model "
                    f"package.{hint} Write packages with potentials.save(model, path)")
            meta_bytes, blob = z.read(METADATA), z.read(WEIGHTS)
    except (zipfile.BadZipFile, EOFError, zlib.error) as e:
        raise ModelFileError(
            f"{path!r} is corrupt or truncated ({e}); download or copy it again, or re-export it") from e
    try:
        meta = json.loads(meta_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path!r}: {METADATA} is not valid JSON ({e}); the file is corrupt") from e
    _check_metadata(meta, path)
    if weights_sha256(blob) != meta["weights_sha256"]:
        raise ModelFileError(
            f"{path!r}: the weights do not match the sha256 in the metadata; the file is corrupt "
            "or was modified. Copy it again from its source")
    from safetensors.torch import load

    try:
        weights = load(blob)
    except Exception as e:  # safetensors raises several types on bad bytes
        raise ModelFileError(f"{path!r}: the weights cannot be read ({e}); the file is corrupt") from e
    return Package(path=path, metadata=meta, weights=weights)


def _check_metadata(meta: Dict[str, Any], path: str) -> None:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFileError(f"{path!r} is not an eqcalc model package (format is not {FORMAT!r})")
    version = meta.get("schema_version")
    if not isinstance(version, int):
        raise ModelFileError(f"{path!r}: schema_version missing; the file is corrupt")
    if version > SCHEMA_VERSION:
        raise ModelVersionError(
            f"{path!r} uses model schema version {version}, newer than this eqcalc understands "
            f"({SCHEMA_VERSION}); upgrade eqcalc (pip install -U eqcalc)")
    for field in ("architecture", "config", "species", "cutoff", "dtype", "force_modes"):
        if field not in meta:
            raise ModelFileError(f"{path!r}: metadata lacks {field!r}; re-save the model with potentials.save")
    if meta["dtype"] not in DTYPES:
        raise ModelFileError(f"{path!r}: dtype {meta['dtype']!r} is not one of {DTYPES}")
    from ase.data import chemical_symbols

    bad = [s for s in meta["species"] if s not in chemical_symbols[1:]]
    if bad or not meta["species"]:
        raise ModelFileError(f"{path!r}: species {meta['species']} hold unknown symbols {bad}")
    if not (isinstance(meta["cutoff"], (int, float)) and meta["cutoff"] > 0):
        raise ModelFileError(f"{path!r}: cutoff {meta['cutoff']!r} must be a positive number")


def shipped_dir() -> Path:
    """Folder of the models shipped inside the ``potentials`` package (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("potentials")
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError("the potentials package is not installed; reinstall eqcalc (pip install .)")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def resolve(model: str | os.PathLike) -> str:
    """A path, or the name of a shipped model (``"default"``), → the path of a package file."""
    if os.path.exists(model):
        return str(model)
    name = str(model)
    if os.sep not in name and not name.endswith(".eqm"):
        candidate = shipped_dir() / f"{name}.eqm"
        if candidate.exists():
            return str(candidate)
        names = sorted(p.stem for p in shipped_dir().glob("*.eqm"))
        raise ModelFileError(
            f"no model file or shipped model named {name!r}; shipped models: {names or 'none'}; "
            "or pass the path of a .eqm file")
    return name  # read() reports the missing file


def build_eager(pkg: Package, dtype: str | None = None) -> torch.nn.Module:
    """Rebuild the architecture from ``potentials`` and load the weights (strictly)."""
    from potentials.registry import from_config  # the one lazy lookup of the registry

    dtype = dtype or pkg.metadata["dtype"]
    # Files written before frame averaging existed have no such field: "none", as they were.
    model = from_config(pkg.metadata["architecture"], pkg.metadata["config"], dtype=dtype,
                        frame_averaging=pkg.metadata.get("frame_averaging", "none"),
                        frame_source=pkg.metadata.get("frame_source", "edges"))
    torch_dtype = getattr(torch, dtype)
    weights = {k: (v.to(torch_dtype) if v.is_floating_point() else v) for k, v in pkg.weights.items()}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise ModelFileError(
            f"{pkg.path!r}: weights do not fit architecture {pkg.metadata['architecture']!r} "
            f"({str(e).splitlines()[0]}); the file was written by an incompatible version") from e
    return model.eval()
