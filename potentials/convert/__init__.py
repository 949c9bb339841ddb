"""Convert models trained elsewhere into eqcalc ``.eqm`` packages, never running their code.

``potentials.convert("model.model", "model.eqm")`` reads a mace-torch file with the restricted
reader (:mod:`potentials.convert.torch_pickle`), maps it onto eqcalc's own architecture
(:mod:`potentials.convert.mace`) and writes an ordinary package whose metadata records the
source (file sha256, package version, conventions, head). nequip ``.nequip.zip`` packages go the
same way (:mod:`potentials.convert.nequip`); nequip ``.ckpt`` checkpoints are packaged by nequip
itself first, where it is installed (:mod:`potentials.convert.nequip_checkpoint`).
"""
from __future__ import annotations

import os
import sys
import time
import types
from pathlib import Path
from typing import Optional

from eqcalc.errors import ModelFileError, UnsupportedModelError


def convert(source: str | os.PathLike, output: str | os.PathLike, head: Optional[str] = None,
            nequip_python: Optional[str] = None) -> Path:
    """Convert ``source`` (a mace-torch ``.model``, a nequip ``.nequip.zip`` or a nequip training
    checkpoint ``.ckpt``) to the eqcalc package ``output`` (``.eqm``).

    ``head``: for multi-head files, the head to keep (default: the only head, or the one named
    "default"). ``nequip_python``: for checkpoints, the interpreter of an environment with nequip
    (:mod:`potentials.convert.nequip_checkpoint`; default ``$EQCALC_NEQUIP_PYTHON`` or
    ``nequip-package`` on ``PATH``). Raises :class:`~eqcalc.errors.UnsafeModelError` for files that ask for anything
    beyond plain model data, :class:`~eqcalc.errors.UnsupportedModelError` for blocks eqcalc
    cannot reproduce exactly. Returns the path written.
    """
    import potentials
    from potentials.convert import mace, nequip, nequip_checkpoint

    source = str(source)
    if not os.path.isfile(source):
        raise ModelFileError(f"{source!r} does not exist; pass the path of a mace-torch .model file "
                             "or a nequip .nequip.zip package")
    if source.endswith((".nequip.pt2", ".pt2", ".nequip.pth")):
        raise UnsupportedModelError(
            f"{source!r} is a compiled nequip model (AOTInductor/TorchScript: weights baked into "
            "compiled code); convert the .nequip.zip package it was compiled from instead")
    with open(source, "rb") as f:
        magic = f.read(4)
    if not magic.startswith(b"PK"):
        raise ModelFileError(
            f"{source!r} is not a zip archive; eqcalc converts mace-torch .model files written by "
            "torch.save, nequip .nequip.zip packages and nequip .ckpt checkpoints; legacy (pre-1.6) torch pickles are not read")
    start = time.perf_counter()
    checkpoint = source.endswith(".ckpt")
    nequip_file = checkpoint or _is_nequip_package(source)
    if nequip_file and head is not None:
        raise UnsupportedModelError(f"{source!r}: nequip models have no heads; drop head={head!r}")
    if checkpoint:
        model, info = nequip_checkpoint.read_checkpoint(source, nequip_python)
    elif nequip_file:
        model, info = nequip.read(source)
    else:
        model, info = mace.read(source, head=head)
    info["conversion_seconds"] = round(time.perf_counter() - start, 3)
    return potentials.save(model, output, source=info)


def _is_nequip_package(path: str) -> bool:
    """A zip with ``<name>/model/config.yaml`` (what ``nequip-package build`` writes)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/model/config.yaml") and n.count("/") == 2 for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


class _CallableModule(types.ModuleType):
    """``potentials.convert`` is both this package and the function :func:`convert`."""

    def __call__(self, source, output, head=None, nequip_python=None) -> Path:
        return convert(source, output, head=head, nequip_python=nequip_python)


sys.modules[__name__].__class__ = _CallableModule
