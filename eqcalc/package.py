"""Model package files (``.eqm``): a zip of ``metadata.json`` + ``weights.safetensors``.

Only data is stored: JSON and safetensors. Nothing in a package is ever unpickled or executed;
architecture code comes from the installed ``potentials`` package. Writing and reading live side
by side here, and every reading failure is a :class:`~eqcalc.errors.ModelFileError` naming the
file, the field and the fix.

Schema (version 2)
------------------
Reading checks the whole file before any number is used:

* the zip: both members present once, no encryption, declared sizes within
  :data:`MAX_METADATA_BYTES` / :data:`MAX_WEIGHTS_BYTES` and a compression ratio of at most
  :data:`MAX_COMPRESSION_RATIO`, checked on the zip header before anything is decompressed;
* ``metadata.json``: strict JSON (no NaN, no duplicate keys), every field of :data:`FIELDS` with
  its type and range (``cutoff`` a finite float in (0, :data:`MAX_CUTOFF`] Å and not a bool,
  ``species`` a list of unique chemical symbols, ``dtype``, ``force_modes``, ``units``, ...);
* ``config``: every hyperparameter known to the architecture's ``Config`` dataclass (looked up in
  the registry) and of the type it declares, then the ``Config``'s own range checks;
* duplicated values agree: metadata ``species``/``cutoff`` vs the config, ``force_modes`` vs
  ``direct_forces``, ``weights_sha256`` vs the weights, and (in :func:`build_eager`, against the
  architecture built from the config) every weight's name, shape and dtype, integer buffers'
  values (e.g. the atomic numbers of the species) and ``n_parameters``;
* one hash, ``sha256``, covers the canonical metadata and the weights bytes: any edit of the
  file (a cutoff, a reordered species list) is refused.

Version 1 files (hash of the weights only, no ``sha256``) are what users have: they still load,
with every check above except the whole-file hash. :func:`upgrade` rewrites one as version 2.
"""
from __future__ import annotations

import collections.abc
import hashlib
import json
import math
import os
import typing
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict

import torch

from eqcalc.errors import ModelFileError, ModelVersionError

SCHEMA_VERSION = 2
FORMAT = "eqcalc-model"
METADATA = "metadata.json"
WEIGHTS = "weights.safetensors"
DTYPES = ("float32", "float64")
FORCE_MODES = ("conservative", "direct")
UNITS = {"energy": "eV", "length": "Å", "forces": "eV/Å", "stress": "eV/Å^3"}
PICKLE_MAGIC = (b"\x80", b"(", b"c", b"]", b"}")  # protocol 2+ and protocol 0/1 openings
#: Metadata is a few kB (training block included); anything near this is not an eqcalc file.
MAX_METADATA_BYTES = 1 << 20
#: Weights of the largest sensible model, uncompressed (4 GiB).
MAX_WEIGHTS_BYTES = 1 << 32
#: Trained weights barely compress (about 1.1); a much higher ratio is a zip bomb.
MAX_COMPRESSION_RATIO = 100
#: Å; no interatomic potential looks this far (the neighbor search would not end either).
MAX_CUTOFF = 100.0
RESAVE = "re-save it with potentials.save(model, path) or copy it again from its source"


@dataclass(frozen=True)
class Package:
    """A read and checked package: its metadata and its weights (CPU tensors)."""

    path: str
    metadata: Dict[str, Any]
    weights: Dict[str, torch.Tensor]


def refuse(path, field: str, problem: str, fix: str = RESAVE) -> ModelFileError:
    """The error for one bad ``field`` of file ``path``: ``'path': field problem; fix``."""
    error = ModelFileError(f"{str(path)!r}: {field} {problem}; {fix}")
    error.path, error.field = str(path), field
    return error


def weights_sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def canonical(meta: Dict[str, Any]) -> bytes:
    """The metadata as canonical JSON bytes (sorted keys, no spaces), without ``sha256``."""
    body = {k: v for k, v in meta.items() if k != "sha256"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode()


def content_sha256(meta: Dict[str, Any], blob: bytes) -> str:
    """The one hash of schema 2: canonical metadata, a newline, the weights bytes."""
    return hashlib.sha256(canonical(meta) + b"\n" + blob).hexdigest()


# ---- writing --------------------------------------------------------------------------------
def write(path: str | os.PathLike, metadata: Dict[str, Any], weights: Dict[str, torch.Tensor]) -> Path:
    """Write a package. ``metadata`` needs at least architecture, config, species, cutoff, dtype,
    force_modes; versions and units default to this installation's. Atomic: a reader sees the old
    file or the new one, never half of one."""
    from safetensors.torch import save

    from eqcalc import __version__

    blob = save({k: v.detach().cpu().contiguous() for k, v in weights.items()})
    meta = {"format": FORMAT, "eqcalc_version": __version__, "torch_version": torch.__version__,
            "units": dict(UNITS), **metadata}
    meta.update(format=FORMAT, schema_version=SCHEMA_VERSION, weights_sha256=weights_sha256(blob))
    meta.pop("sha256", None)
    meta["sha256"] = content_sha256(meta, blob)
    check_metadata(meta, str(path))
    from eqcalc.outputs import replace_atomically, writable_file

    path = writable_file(path)

    def zip_into(f):
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as z:
            z.writestr(METADATA, json.dumps(meta, indent=2, ensure_ascii=False))
            z.writestr(WEIGHTS, blob)

    replace_atomically(path, zip_into)  # never a half-written package under the real name
    return path


def upgrade(path: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """Rewrite a package (of any schema this eqcalc reads) in the current schema, keeping its
    metadata (training block, versions) and its weights bit for bit. ``output`` defaults to
    ``path`` itself (replaced atomically)."""
    pkg = read(path)
    build_eager(pkg)  # every weight checked against the architecture before it is re-signed
    meta = {k: v for k, v in pkg.metadata.items() if k not in ("sha256", "weights_sha256", "schema_version")}
    return write(output or path, meta, pkg.weights)


# ---- reading --------------------------------------------------------------------------------
def read(path: str | os.PathLike) -> Package:
    """Read and check a package (module docstring); :class:`ModelFileError` with the fix on any
    problem."""
    path = str(path)
    if not os.path.exists(path):
        raise ModelFileError(
            f"model file {path!r} does not exist; pass a path to a .eqm file or a shipped model name")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise ModelFileError(f"model file {path!r} cannot be opened ({e.strerror or e}); pass a "
                             "readable .eqm file (check the path and its permissions)") from e
    if not head.startswith(b"PK"):
        what = "a pickle" if head[:1] in PICKLE_MAGIC else "not a zip archive"
        raise ModelFileError(
            f"{path!r} is {what}, not an eqcalc model package; eqcalc never unpickles files. "
            "Re-create the package with potentials.save(model, path)")
    meta_bytes, blob = _members(path)
    meta = _parse_json(meta_bytes, path)
    check_metadata(meta, path)
    if weights_sha256(blob) != meta["weights_sha256"]:
        raise refuse(path, "weights_sha256", "does not match the weights: the file is corrupt or was "
                     "modified", "copy it again from its source")
    if "sha256" in meta and content_sha256(meta, blob) != meta["sha256"]:
        raise refuse(path, "sha256", "(the hash of metadata and weights) does not match: metadata.json "
                     "was edited or damaged, and an edited cutoff or species list would give wrong "
                     "numbers", "copy the file again from its source, or re-save the model with "
                     "potentials.save instead of editing the file")
    from safetensors.torch import load

    try:
        weights = load(blob)
    except Exception as e:  # safetensors raises several types on bad bytes
        raise refuse(path, WEIGHTS, f"cannot be read ({e}): the file is corrupt",
                     "copy it again from its source") from e
    return Package(path=path, metadata=meta, weights=weights)


def _members(path: str):
    """``(metadata bytes, weights bytes)``, sizes checked on the zip header first."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            names = [i.filename for i in infos]
            if METADATA not in names or WEIGHTS not in names:
                hint = (" It looks like a torch.save/TorchScript archive, which may run code and is "
                        "never loaded." if any(n.endswith(".pkl") for n in names) else "")
                raise ModelFileError(
                    f"{path!r} is a zip file without {METADATA} and {WEIGHTS}: not an eqcalc model "
                    f"package.{hint} Write packages with potentials.save(model, path)")
            for name, cap in ((METADATA, MAX_METADATA_BYTES), (WEIGHTS, MAX_WEIGHTS_BYTES)):
                found = [i for i in infos if i.filename == name]
                if len(found) > 1:
                    raise refuse(path, name, f"appears {len(found)} times in the zip; which one counts "
                                 "is ambiguous")
                info = found[0]
                if info.flag_bits & 0x1:
                    raise refuse(path, name, "is encrypted", "store packages unencrypted")
                if info.file_size > cap:
                    raise refuse(path, name, f"declares {info.file_size} bytes uncompressed, more than "
                                 f"the {cap} an eqcalc package holds (a zip bomb?); it was not unpacked")
                ratio = info.file_size / max(info.compress_size, 1)
                if info.file_size > (1 << 20) and ratio > MAX_COMPRESSION_RATIO:
                    raise refuse(path, name, f"is compressed {ratio:.0f}:1 (at most "
                                 f"{MAX_COMPRESSION_RATIO}:1 is plausible; a zip bomb?); it was not unpacked")
            # ZipExtFile never yields more than the declared size, and checks the CRC at the end.
            return z.read(METADATA), z.read(WEIGHTS)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error, NotImplementedError,
            RuntimeError, OSError, ValueError) as e:
        if isinstance(e, ModelFileError):
            raise
        raise ModelFileError(
            f"{path!r} is corrupt or truncated ({type(e).__name__}: {e}); download or copy it again, "
            "or re-export it") from e


def _parse_json(data: bytes, path: str) -> Dict[str, Any]:
    def no_constants(name):
        raise ValueError(f"{name} is not allowed in metadata")

    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"duplicate key(s) {dup}")
        return dict(pairs)

    try:
        meta = json.loads(data.decode("utf-8"), parse_constant=no_constants,
                          object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise refuse(path, METADATA, f"is not valid JSON ({e}): the file is corrupt") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFileError(f"{path!r} is not an eqcalc model package (format is not {FORMAT!r}); "
                             "write packages with potentials.save(model, path)")
    return meta


# ---- schema ---------------------------------------------------------------------------------
def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _symbols(value) -> bool:
    from ase.data import chemical_symbols

    return (isinstance(value, list) and len(value) > 0 and all(isinstance(s, str) for s in value)
            and all(s in chemical_symbols[1:] for s in value) and len(set(value)) == len(value))


def _hex64(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


#: field → (required, check, what it must be). ``sha256`` is required from schema 2 on.
FIELDS = {
    "schema_version": (True, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                       "a positive integer"),
    "architecture": (True, lambda v: isinstance(v, str) and v != "", "the name of a registered architecture"),
    "config": (True, lambda v: isinstance(v, dict), "a JSON object of hyperparameters"),
    "species": (True, _symbols, "a non-empty list of unique chemical symbols, e.g. [\"Cu\", \"O\"]"),
    "cutoff": (True, lambda v: _number(v) and 0 < v <= MAX_CUTOFF,
               f"a finite number of Å in (0, {MAX_CUTOFF:g}] (not a bool or string)"),
    "dtype": (True, lambda v: v in DTYPES, f"one of {list(DTYPES)}"),
    "force_modes": (True, lambda v: isinstance(v, list) and len(v) > 0 and len(set(map(str, v))) == len(v)
                    and all(m in FORCE_MODES for m in v), f"a non-empty list of unique modes from {list(FORCE_MODES)}"),
    "weights_sha256": (True, _hex64, "64 lowercase hex digits"),
    "sha256": (False, _hex64, "64 lowercase hex digits"),
    "stress": (False, lambda v: isinstance(v, bool), "true or false"),
    "units": (False, lambda v: v == UNITS, f"{UNITS} (eqcalc's units; convert the model instead)"),
    "n_parameters": (False, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                     "a non-negative integer"),
    "eqcalc_version": (False, lambda v: isinstance(v, str), "a version string"),
    "torch_version": (False, lambda v: isinstance(v, str), "a version string"),
    "training": (False, lambda v: isinstance(v, dict), "a JSON object"),
    "frame_averaging": (False, lambda v: isinstance(v, str), "a frame-averaging mode"),
    "frame_source": (False, lambda v: isinstance(v, str), "'edges' or 'positions'"),
    # potentials.convert: the foreign file a package was converted from (sha256, code version, head)
    "source": (False, lambda v: isinstance(v, dict), "a JSON object"),
}


def check_metadata(meta: Dict[str, Any], path: str) -> None:
    """Check ``meta`` against the schema (module docstring); raise :class:`ModelFileError` (or
    :class:`ModelVersionError` for a newer schema) naming the file, the field and the fix."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFileError(f"{path!r} is not an eqcalc model package (format is not {FORMAT!r}); "
                             "write packages with potentials.save(model, path)")
    version = meta.get("schema_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        raise ModelVersionError(
            f"{path!r} uses model schema version {version}, newer than this eqcalc understands "
            f"({SCHEMA_VERSION}); upgrade eqcalc (pip install -U eqcalc)")
    for field, (required, ok, what) in FIELDS.items():
        required = required or (field == "sha256" and version == SCHEMA_VERSION)
        if field not in meta:
            if required:
                raise refuse(path, field, "is missing from the metadata")
            continue
        if not ok(meta[field]):
            raise refuse(path, field, f"is {json.dumps(meta[field], ensure_ascii=False)[:80]} but must be {what}")
    _check_config(meta, path)


def _architecture(name: str, path: str):
    """The registered model class ``name`` (the lazy lookup of the registry)."""
    import potentials  # noqa: F401  (importing registers the architectures)
    from potentials.registry import ARCHITECTURES

    if name not in ARCHITECTURES:
        raise refuse(path, "architecture", f"{name!r} is not known to this installation (known: "
                     f"{', '.join(sorted(ARCHITECTURES))})", "upgrade eqcalc, or install the package that "
                     "provides this architecture")
    return ARCHITECTURES[name]


def _conforms(value, hint) -> bool:
    """Whether the JSON ``value`` fits the type annotation ``hint`` of a Config field."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return True
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return _number(value)
    if hint is str:
        return isinstance(value, str)
    if origin is typing.Union:
        return any(_conforms(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin in (tuple, list, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):  # a list once read back from JSON; a tuple while written
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_conforms(v, a) for v, a in zip(value, args))
        return all(_conforms(v, args[0]) for v in value) if args else True
    if hint is type(None):
        return value is None
    return True  # a type this check does not know: the Config's own validation decides


def _check_config(meta: Dict[str, Any], path: str) -> None:
    import dataclasses

    cls = _architecture(meta["architecture"], path)
    config = meta["config"]
    fields = {f.name: f for f in dataclasses.fields(cls.Config)}
    try:
        hints = typing.get_type_hints(cls.Config)
    except Exception:  # an annotation this Python cannot resolve: the Config's checks decide
        hints = {}
    for key, value in config.items():
        if key not in fields:
            raise refuse(path, f"config.{key}", f"is not a hyperparameter of {meta['architecture']} "
                         f"(it has {', '.join(fields)})")
        if not _conforms(value, hints.get(key, typing.Any)):
            raise refuse(path, f"config.{key}", f"is {json.dumps(value)[:80]}, not of type "
                         f"{getattr(hints[key], '__name__', hints[key])}")

    # fields added after a file was written take the value it was trained with (registry.from_config)
    file_defaults = getattr(cls.Config, "FILE_DEFAULTS", {})

    def configured(name):
        field = fields.get(name)
        if name in config or name in file_defaults:
            return config.get(name, file_defaults.get(name))
        return None if field is None or field.default is dataclasses.MISSING else field.default

    if configured("species") is not None and list(configured("species")) != meta["species"]:
        raise refuse(path, "species", f"{meta['species']} differs from config.species "
                     f"{configured('species')}: the model would see elements in another order")
    if configured("cutoff") is not None and configured("cutoff") != meta["cutoff"]:
        raise refuse(path, "cutoff", f"{meta['cutoff']} Å differs from config.cutoff {configured('cutoff')} Å")
    direct = configured("direct_forces")
    if direct is not None and ("direct" in meta["force_modes"]) != bool(direct):
        raise refuse(path, "force_modes", f"{meta['force_modes']} disagrees with config.direct_forces={direct}")
    from potentials.frames import MODES, SOURCES

    for field, choices in (("frame_averaging", MODES), ("frame_source", SOURCES)):
        if field in meta and meta[field] not in choices:
            raise refuse(path, field, f"is {meta[field]!r}, not one of {list(choices)}")
    values = {**file_defaults, **config, "species": tuple(meta["species"])}
    try:
        cls.Config(**values)  # the architecture's own range checks
    except Exception as e:  # InvalidOptionError, TypeError for a missing field, ...
        raise refuse(path, "config", f"is refused by {meta['architecture']} ({e})") from e


# ---- shipped models and eager models ----------------------------------------------------------
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


def check_weights(pkg: Package, model: torch.nn.Module) -> None:
    """Every weight of ``pkg`` against ``model`` (the architecture built from its config): the
    same names and shapes, floating weights stored in the metadata's dtype and finite, integer
    buffers (fixed by the config, e.g. atomic numbers) equal, and ``n_parameters`` right."""
    path, meta = pkg.path, pkg.metadata
    expected = model.state_dict()
    missing = sorted(set(expected) - set(pkg.weights))
    extra = sorted(set(pkg.weights) - set(expected))
    if missing or extra:
        raise refuse(path, WEIGHTS, f"do not fit architecture {meta['architecture']!r} with this config "
                     f"(missing {missing[:3]}, unexpected {extra[:3]}): the weights do not fit the "
                     "architecture; the file was written by an incompatible version", "re-export the model")
    want = getattr(torch, meta["dtype"])
    for name, stored in pkg.weights.items():
        ref = expected[name]
        if tuple(stored.shape) != tuple(ref.shape):
            raise refuse(path, f"weight {name!r}", f"has shape {list(stored.shape)} but {meta['architecture']} "
                         f"with this config needs {list(ref.shape)}: the weights do not fit the architecture")
        dtype = want if ref.is_floating_point() else ref.dtype
        if stored.dtype != dtype:
            raise refuse(path, f"weight {name!r}", f"is stored as {str(stored.dtype)[6:]} but must be "
                         f"{str(dtype)[6:]} (metadata dtype {meta['dtype']!r})")
        if ref.is_floating_point():
            if not bool(torch.isfinite(stored).all()):
                raise refuse(path, f"weight {name!r}", "holds NaN or inf: the model would return NaN")
        elif not torch.equal(stored, ref.to(stored.device)):
            raise refuse(path, f"weight {name!r}", "(fixed by the config, e.g. the species' atomic numbers) "
                         "differs from what the config gives: the model would treat elements as others")
    n = sum(p.numel() for p in model.parameters())
    if "n_parameters" in meta and meta["n_parameters"] != n:
        raise refuse(path, "n_parameters", f"is {meta['n_parameters']} but the architecture has {n}")


def build_eager(pkg: Package, dtype: str | None = None) -> torch.nn.Module:
    """Rebuild the architecture from ``potentials``, check the weights against it
    (:func:`check_weights`) and load them strictly."""
    from potentials.registry import from_config  # the one lazy lookup of the registry

    dtype = dtype or pkg.metadata["dtype"]
    # Files written before frame averaging existed have no such field: "none", as they were.
    try:
        model = from_config(pkg.metadata["architecture"], pkg.metadata["config"], dtype=dtype,
                            frame_averaging=pkg.metadata.get("frame_averaging", "none"),
                            frame_source=pkg.metadata.get("frame_source", "edges"))
    except ModelFileError:
        raise
    except Exception as e:  # InvalidOptionError and friends from the architecture
        raise refuse(pkg.path, "config", f"cannot build {pkg.metadata['architecture']!r} ({e})") from e
    check_weights(pkg, model)
    torch_dtype = getattr(torch, dtype)
    weights = {k: (v.to(torch_dtype) if v.is_floating_point() else v) for k, v in pkg.weights.items()}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise refuse(pkg.path, WEIGHTS, f"do not fit architecture {pkg.metadata['architecture']!r} "
                     f"({str(e).splitlines()[0]})", "the file was written by an incompatible version") from e
    return model.eval()
