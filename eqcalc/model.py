"""A loaded model ready to run: package → eager model → force/stress wrapper → compiled runner.

``Model`` is what the calculator, the batched engine and the command line share. It owns the
choice of device, dtype, force mode and compiled form, and turns a batch of validated tensors
plus a neighbor list into energies, forces and stress.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, Optional

import numpy as np
import torch
from torch import Tensor

from eqcalc import compile as compiled
from eqcalc import keys, package
from eqcalc.atoms import SystemTensors, check_overlaps, symbols_to_numbers
from eqcalc import derivatives
from eqcalc.derivatives import FORCE_MODES, ForceStressModel, edge_vectors
from eqcalc.errors import (CompileError, DeviceError, InvalidOptionError, NonFiniteOutputError,
                           PropertyNotAvailableError, check_choice)

log = logging.getLogger("eqcalc")

DEVICES_HELP = "'auto', 'cpu', 'cuda' or 'cuda:N'"


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` → CUDA when present, else CPU; a missing CUDA device is a typed error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InvalidOptionError(f"device={device!r} is not a device; use {DEVICES_HELP}") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device={device!r} but CUDA is not available here; use device='cpu' or 'auto'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device={device!r} but only {torch.cuda.device_count()} CUDA device(s) exist; "
                "use 'cuda:0' or 'auto'")
    elif dev.type != "cpu":
        raise InvalidOptionError(f"device={device!r} is not supported; use {DEVICES_HELP}")
    return dev


class Model:
    """A model package loaded for inference.

    Parameters: ``model`` a path to a ``.eqm`` file or a shipped model name; ``device``
    ``"auto" | "cpu" | "cuda[:N]"``; ``forces`` ``"auto" | "conservative" | "direct"``;
    ``compile`` ``"auto" | "aoti" | "torchscript" | "eager"``; ``dtype`` ``None`` (the model's
    own) ``| "float32" | "float64"``.
    """

    def __init__(self, model: str | os.PathLike = "default", device="auto", forces="auto",
                 compile="auto", dtype=None):
        check_choice("forces", forces, ("auto",) + FORCE_MODES)
        check_choice("compile", compile, ("auto",) + compiled.KINDS)
        check_choice("dtype", dtype, (None,) + package.DTYPES)
        self.device = resolve_device(device)
        self.name = str(model)
        self.package = package.read(package.resolve(model))
        meta = self.metadata = self.package.metadata
        if forces == "auto":
            forces = "conservative" if "conservative" in meta["force_modes"] else "direct"
        if forces not in meta["force_modes"]:
            raise InvalidOptionError(
                f"forces={forces!r} but this model offers {meta['force_modes']}; choose one of them")
        self.forces = forces
        self.dtype = dtype or meta["dtype"]
        self.cutoff = float(meta["cutoff"])
        self.species = list(meta["species"])
        # Atomic number → species index; -1 marks elements the model does not know.
        table = torch.full((119,), -1, dtype=torch.int64)
        table[symbols_to_numbers(self.species)] = torch.arange(len(self.species))
        self.species_index = table.to(self.device)
        eager = package.build_eager(self.package, self.dtype)
        self.wrapper = ForceStressModel(eager, forces=forces, stress=True).to(self.device)
        self.compile_kind, self.runner = self._choose_runner(compile)

    # ---- compiled forms ---------------------------------------------------------------------
    def probe_inputs(self):
        """Two small systems (periodic and slab) of the model's species, for checks and tracing."""
        from eqcalc.neighbors import compute_neighbors

        rng = np.random.default_rng(0)
        grids = [(3, [True, True, True]), (2, [True, True, False])]
        pos, cells, pbc, system, numbers = [], [], [], [], []
        for s, (n, periodic) in enumerate(grids):
            a = 2.6  # Å: a compact lattice, so every species sees neighbors
            g = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1).reshape(-1, 3) * a
            pos.append(g + rng.normal(scale=0.1, size=g.shape))
            cells.append(np.eye(3) * n * a + (0 if all(periodic) else np.diag([0, 0, 6.0])))
            pbc.append(periodic)
            system.append(np.full(len(g), s))
            numbers.append(np.resize(symbols_to_numbers(self.species), len(g)))
        t = SystemTensors(
            positions=torch.tensor(np.concatenate(pos), device=self.device),
            numbers=torch.tensor(np.concatenate(numbers), device=self.device),
            cell=torch.tensor(np.stack(cells), device=self.device),
            pbc=torch.tensor(pbc, device=self.device),
            system=torch.tensor(np.concatenate(system), device=self.device))
        edge_index, shifts = compute_neighbors(t.positions, t.cell, t.pbc, self.cutoff, t.system)
        return self.inputs(t, edge_index, shifts)

    def _choose_runner(self, kind: str):
        if kind == "eager":
            return "eager", self.wrapper
        probe = self.probe_inputs()
        reference = self.wrapper(*probe)
        candidates = [kind] if kind != "auto" else self._auto_candidates()
        # "auto": the choice recorded on this machine, so every calculator of this model agrees
        recorded = compiled.recorded_choice(self.aoti_key(), candidates) if kind == "auto" else None
        timings = {}
        best = None
        for name in [recorded["choice"]] if recorded else candidates:
            runner = self._build(name, probe)
            error = compiled.max_relative_error(runner(*probe), reference)
            if error > compiled.tolerance(self.wrapper.dtype_probe.dtype):
                msg = f"{name} form differs from eager by {error:.2e} on the probe structure"
                if kind != "auto":
                    raise CompileError(msg + "; use compile='eager'")
                log.warning("%s; not using it", msg)
                continue
            if recorded:
                best = (name, runner)
                break
            timings[name] = compiled.best_time(lambda: runner(*probe)[keys.ENERGY].cpu())
            if best is None or timings[name] < timings[best[0]]:
                best = (name, runner)
        if recorded and best is None:  # the recorded form no longer passes: forget it, choose again
            compiled.record_choice(self.aoti_key(), [], "", {})
            return self._choose_runner(kind)
        if kind == "auto" and not recorded:
            compiled.record_choice(self.aoti_key(), candidates, best[0], timings)
        self.compile_timings = recorded["timings"] if recorded else timings
        log.info("compiled forms timed on the probe (s): %s -> using %s%s",
                 {k: round(v, 5) for k, v in self.compile_timings.items()}, best[0],
                 " (the choice recorded on this machine)" if recorded else "")
        return best

    def aoti_key(self) -> str:
        return compiled.cache_key(self.metadata["weights_sha256"], self.forces, True, self.device, self.dtype)

    def _auto_candidates(self):
        # AOTInductor costs minutes to build on a CPU: "auto" uses it once it is in the cache
        # (eqcalc export or compile="aoti" puts it there) and on CUDA, where it pays off at once.
        aoti_ready = compiled.verified(compiled.aoti_path(self.aoti_key()), "not using it")
        return ["eager", "torchscript"] + (["aoti"] if aoti_ready or self.device.type == "cuda" else [])

    def _build(self, name: str, probe):
        if name == "eager":
            return self.wrapper
        if name == "torchscript":
            return compiled.torchscript(self.wrapper)
        return compiled.aoti(self.wrapper, probe, self.aoti_key())

    # ---- evaluation -------------------------------------------------------------------------
    def inputs(self, t: SystemTensors, edge_index: Tensor, shifts: Tensor):
        """Positional inputs of :class:`ForceStressModel` from a batch and its neighbor list."""
        species = self.species_index[t.numbers]
        return (t.positions, t.cell, species, edge_index, shifts.to(torch.float64), t.system)

    def within_cutoff(self, t: SystemTensors, edge_index: Tensor, shifts: Tensor):
        """The pairs of a neighbor list (possibly with a Verlet skin) within the cutoff, after
        checking that no atoms overlap (InvalidAtomsError naming them)."""
        lengths = edge_vectors(t.positions, t.cell, edge_index, shifts.to(t.positions.dtype), t.system).norm(dim=1)
        check_overlaps(lengths, edge_index, t.numbers, t.system)
        keep = lengths < self.cutoff
        if not bool(keep.all()):
            edge_index, shifts = edge_index[:, keep], shifts[keep]
        return edge_index, shifts

    def __call__(self, t: SystemTensors, edge_index: Tensor, shifts: Tensor) -> Dict[str, Tensor]:
        """Energy ``(n_systems,)``, energies ``(n_atoms,)``, forces ``(n_atoms, 3)``, stress
        ``(n_systems, 3, 3)`` for the batch ``t`` with neighbor list ``(edge_index, shifts)``.

        The list may reach beyond the cutoff (a Verlet skin): overlapping atoms raise
        InvalidAtomsError, and only pairs within the cutoff reach the model, whose cost is per
        edge (16 catalyst slabs, 0.5 Å skin: 22282 -> 18640 edges, model call 206 -> 142 ms).
        Results are the same either way: every edge term carries an envelope that is 0 there.
        """
        out = dict(self.runner(*self.inputs(t, *self.within_cutoff(t, edge_index, shifts))))
        for k in (keys.ENERGY, keys.FORCES):
            if not bool(torch.isfinite(out[k]).all()):
                raise NonFiniteOutputError(
                    f"the model returned non-finite {k}; the structure is far outside its training "
                    "data (atoms too close, or an exploding simulation). Check the input geometry")
        return out

    def hessian(self, t: SystemTensors, edge_index: Tensor, shifts: Tensor, rows: Tensor,
                max_batch: Optional[int] = None) -> Tensor:
        """Rows ``rows`` ``(n_rows,)`` (flat ``3 * atom + axis``) of the Hessian of the batch ``t``,
        ``(n_rows, 3 * n_atoms)`` eV/Å², float64, by autograd through the eager model in this
        Model's dtype (see :func:`eqcalc.derivatives.hessian`)."""
        self.check_smooth()
        h = derivatives.hessian(self.wrapper.model, *self.inputs(t, *self.within_cutoff(t, edge_index, shifts)),
                                rows=rows, max_batch=max_batch)
        if not bool(torch.isfinite(h).all()):
            raise NonFiniteOutputError(
                "the model returned a non-finite Hessian; the structure is far outside its training "
                "data. Check the input geometry")
        return h

    def check_smooth(self) -> None:
        """Second derivatives need an energy that is twice differentiable everywhere; a model that
        is not (frame averaging switches frames where eigenvalues cross; PaiNN files written with
        the paper's norm have a cusp at symmetric sites) gets a typed error saying why."""
        model = self.wrapper.model
        if getattr(model, "smooth", True):
            return
        reason = getattr(model, "not_smooth_because", "its energy is not twice differentiable everywhere")
        raise PropertyNotAvailableError(
            f"second derivatives (Hessian, vibrations, phonons) are not available for this "
            f"{self.metadata['architecture']} model: {reason}. Use a model without that limit, e.g. "
            "'default', or finite differences of the forces (ase.vibrations.Vibrations)")

    def provenance(self) -> Dict[str, str]:
        """What produces this model's numbers, as JSON-able strings: model name and file, its
        hashes, architecture, dtype, device, force mode and compiled form."""
        from eqcalc import __version__

        m = self.metadata
        return {"model": self.name, "model_path": os.path.abspath(self.package.path),
                "weights_sha256": m["weights_sha256"], "sha256": m.get("sha256", ""),
                "architecture": m["architecture"], "dtype": self.dtype, "device": str(self.device),
                "forces": self.forces, "compile": self.compile_kind, "eqcalc_version": __version__}

    def summary(self) -> str:
        m = self.metadata
        return (f"{m['architecture']} model, species {','.join(self.species)}, cutoff {self.cutoff} Å, "
                f"{self.dtype}, forces={self.forces}, compiled={self.compile_kind}, device={self.device}")
