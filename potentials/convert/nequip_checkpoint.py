"""nequip training checkpoints (Lightning ``.ckpt``) → eqcalc, through nequip's own packager.

A checkpoint holds the weights (``state_dict``, EMA copies included) and the resolved training
config (``hyper_parameters``), but not the irreps, instructions and gate layouts that nequip
derives from the config when it builds the model; those are what :mod:`potentials.convert.nequip`
reads from a package. So this route needs nequip: where it is importable (its own interpreter,
``--nequip-python`` or ``EQCALC_NEQUIP_PYTHON``, or ``nequip-package`` on ``PATH``), it runs
``nequip-package build`` and converts the package it writes.

nequip's packager unpickles the checkpoint (``torch.load(weights_only=False)``) and builds every
``_target_`` of its config with hydra, so it never sees the user's file. eqcalc first reads the
checkpoint with its restricted reader (plain data and tensors only: a checkpoint asking for
anything else is refused, :class:`~eqcalc.errors.UnsafeModelError`), checks the model options
(an unsupported one is named before nequip starts), replaces the training data (which the packager
loads for its example input and the user may no longer have) with one structure holding an atom
of every type, checks that every ``_target_`` left names a class of nequip's, torch's or
lightning's known modules, and writes a copy of plain data only (weights, config, no optimizer
state). nequip packages that copy; the converted numbers are the package's (the packager keeps the
evaluation weights: the EMA ones when the run kept them).

    read_checkpoint("last.ckpt", nequip_python="~/nequip-env/bin/python") -> (model, source)
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from eqcalc.errors import MissingDependencyError, ModelFileError, UnsafeModelError
from potentials.convert import nequip
from potentials.convert.mace import sha256
from potentials.convert.torch_pickle import Allow, TorchArchive

log = logging.getLogger(__name__)

#: Modules whose classes a checkpoint's hydra ``_target_`` may name. nequip's packager builds
#: them; a name outside these modules, or not a class name (a function, or a module attribute such
#: as ``nequip.train.os``), is refused before nequip starts.
TARGET_MODULES = (
    "nequip.model", "nequip.nn.pair_potential", "nequip.train", "nequip.train.callbacks", "nequip.data",
    "nequip.data.datamodule", "nequip.data.transforms", "nequip.data.stats", "torch.optim",
    "torch.optim.lr_scheduler", "torch.utils.data", "lightning", "lightning.pytorch.callbacks",
)
CLASS_NAME = re.compile(r"[A-Z][A-Za-z0-9]*\Z")
#: Top-level entries of the copy nequip packages (optimizer and loop state are left out).
KEPT = ("epoch", "global_step", "pytorch-lightning_version", "state_dict", "hparams_name", "hyper_parameters")
TIMEOUT_S = 1800


def check_targets(path: str, tree: Any, where: str = "hyper_parameters") -> None:
    """:class:`UnsafeModelError` unless every ``_target_`` in ``tree`` is a class of
    :data:`TARGET_MODULES`."""
    stack = [(where, tree)]
    while stack:
        at, node = stack.pop()
        if isinstance(node, dict):
            target = node.get("_target_")
            if target is not None:
                module, _, name = str(target).rpartition(".")
                if module not in TARGET_MODULES or not CLASS_NAME.match(name):
                    raise UnsafeModelError(
                        f"{path!r}: {at}._target_ = {target!r} is not a class of nequip, torch or lightning "
                        f"that eqcalc lets nequip build (modules: {', '.join(TARGET_MODULES)})")
            stack.extend((f"{at}.{k}", v) for k, v in node.items())
        elif isinstance(node, (list, tuple)):
            stack.extend((f"{at}[{i}]", v) for i, v in enumerate(node))


def nequip_command(nequip_python: Optional[str] = None) -> List[str]:
    """The command that runs ``nequip-package``: ``nequip_python -m nequip.scripts.package``,
    else ``$EQCALC_NEQUIP_PYTHON``'s, else ``nequip-package`` on ``PATH``."""
    python = nequip_python or os.environ.get("EQCALC_NEQUIP_PYTHON")
    if python:
        python = os.path.abspath(os.path.expanduser(python))  # the packager runs in a temporary folder
        if not (os.path.isfile(python) and os.access(python, os.X_OK)):
            raise MissingDependencyError(f"nequip_python={python!r} is not an executable interpreter; pass the "
                                         "python of the environment where nequip is installed")
        return [python, "-m", "nequip.scripts.package"]
    found = shutil.which("nequip-package")
    if found:
        return [found]
    raise MissingDependencyError(
        "converting a nequip checkpoint needs nequip (its packager derives the model's layout from "
        "the config): pass --nequip-python /path/to/nequip-env/bin/python (or set "
        "EQCALC_NEQUIP_PYTHON), or run `nequip-package build last.ckpt model.nequip.zip` where nequip "
        "is installed and convert the .nequip.zip, which needs no nequip")


def plain_copy(path: str, out: Path) -> Dict[str, Any]:
    """Read the checkpoint ``path`` with the restricted reader, check it, and write the plain-data
    copy nequip packages to ``out`` (with ``example.xyz`` beside it). Returns the model options."""
    from ase import Atoms
    from ase.data import chemical_symbols
    from ase.io import write

    with TorchArchive(path) as archive:
        ckpt = archive.load(Allow())
    try:
        hp = ckpt["hyper_parameters"]
        opts = hp["info_dict"]["training_module"]["model"]
        ckpt["state_dict"].items()
    except (KeyError, TypeError, AttributeError) as e:
        raise ModelFileError(f"{path!r} is not a nequip training checkpoint (no hyper_parameters.info_dict."
                             "training_module.model and state_dict); convert a .nequip.zip package or a "
                             "checkpoint written by nequip-train") from e
    if not isinstance(opts, dict):
        raise ModelFileError(f"{path!r}: training_module.model is not a mapping")
    nequip.check_options(path, opts)
    types = [str(t) for t in opts["type_names"]]
    if any(t not in chemical_symbols[1:] for t in types):
        nequip.unsupported(path, f"type names {types} that are not chemical symbols")
    r_max = float(opts["r_max"])
    example = out.parent / "example.xyz"
    # an atom of every type, neighbours in a row: nequip only traces its example input through
    write(str(example), Atoms(types, positions=[[0.5 * r_max * i, 0.0, 0.0] for i in range(len(types))]),
          format="extxyz")
    hp["info_dict"]["data"] = dict(
        _target_="nequip.data.datamodule.ASEDataModule", seed=0, train_file_path=str(example),
        val_file_path=str(example),
        transforms=[dict(_target_="nequip.data.transforms.ChemicalSpeciesToAtomTypeMapper", model_type_names=types,
                         chemical_species_to_atom_type_map={t: t for t in types}),
                    dict(_target_="nequip.data.transforms.NeighborListTransform", r_max=r_max)])
    check_targets(path, hp)
    torch.save({k: ckpt[k] for k in KEPT if k in ckpt}, str(out))
    return opts


def read_checkpoint(path: str | Path, nequip_python: Optional[str] = None):
    """A nequip ``.ckpt`` → ``(model, source_metadata)`` (see the module doc). Raises
    :class:`MissingDependencyError` when no nequip is found, :class:`UnsafeModelError` /
    :class:`UnsupportedModelError` before nequip runs, :class:`ModelFileError` when its packager
    fails (with its last output)."""
    path = str(path)
    start = time.perf_counter()
    command = nequip_command(nequip_python)
    with tempfile.TemporaryDirectory(prefix="eqcalc-nequip-ckpt-") as tmp:
        copy = Path(tmp) / "plain.ckpt"
        plain_copy(path, copy)
        package = Path(tmp) / "model.nequip.zip"
        log.info("packaging %s with %s", path, " ".join(command))
        try:
            done = subprocess.run(command + ["build", str(copy), str(package)], cwd=tmp, capture_output=True,
                                  text=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise ModelFileError(f"{path!r}: nequip-package build ran past {TIMEOUT_S} s") from e
        except OSError as e:
            raise MissingDependencyError(f"cannot start nequip's packager ({' '.join(command)}): {e}") from e
        if done.returncode != 0 or not package.exists():
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            raise ModelFileError(f"{path!r}: nequip-package build ({' '.join(command)}) failed with exit code "
                                 f"{done.returncode}:\n{tail}")
        packaged = time.perf_counter()
        model, source = nequip.read(package)
    source.update({
        "format": "nequip checkpoint (Lightning .ckpt), packaged by nequip-package build",
        "file": Path(path).name, "sha256": sha256(path),
        "packaging_seconds": round(packaged - start, 3),
        "conversion_seconds": round(time.perf_counter() - start, 3),
    })
    return model, source
