"""Training any registered architecture on energies, forces and stress.

``train(config) -> path`` of the written ``.eqm`` model package. ``config`` is a plain dict (the
recipes in ``potentials/recipes/*.yaml`` are such dicts); every key has a default in
:data:`DEFAULTS`:

``data``            extxyz file from :func:`potentials.data.generate` (splits in ``info``).
``generate``        optional ``{n_structures, seed, elements}``: write ``data`` first if missing.
``extra_data``      more data files (a path or a list), each with its own splits, joined to ``data``'s.
``generate_extra``  optional, one mapping per ``extra_data`` file (a single mapping: the first),
                    writing it if missing: ``{kind: near_minima, n_structures, seed, elements}``
                    (:func:`potentials.data.generate_near_minima`, the default kind) or
                    ``{kind: paths, n_paths, seed, elements}`` (:func:`potentials.data.generate_paths`).
``init``            fine-tune: start from this model package (path or shipped name) instead of
                    fresh weights; its architecture, hyperparameters, species, cutoff, dtype and
                    reference energies are kept (recipe values for those must agree or be unset).
``architecture``    registry name (``"painn"``, ``"schnet"``, ...); ``model``: its hyperparameters;
                    ``cutoff`` (Å), ``dtype``, ``species`` (default: the elements in the data).
``energy_weight``, ``forces_weight``, ``stress_weight``: loss = w_E MSE(E/N) [eV²/atom²]
                    + w_F MSE(F) [eV²/Å²] + w_S MSE(σ) [eV²/Å⁶] (stress only on frames with it).
                    ``forces_weight = 0`` trains on energies only (forces then need not exist).
``force_mode``      ``"conservative"`` (default: the force loss is on ``-dE/dr``) or ``"direct"``
                    (the force loss is on the model's force head; needs ``direct_forces: true``;
                    metrics then also report the conservative forces of the same model).
``energy_grad_weight`` w_G of the energy-gradient consistency term of FAENet (paper Eq. 9),
                    direct mode only: + w_G MSE(F_direct - (-dE/dr)) [eV²/Å²], which pulls the
                    force head and the energy gradient together (conservative forces usable).
``conservative_forces_weight`` w_C, direct mode only: + w_C MSE(-dE/dr - F_ref) [eV²/Å²], the
                    force labels on the energy gradient as well as on the head. Without it the
                    energy learns forces only through the Eq. 9 term, i.e. only as fast as the head.
``lr``, ``weight_decay`` (AdamW; not on biases, embeddings and the per-species scale/shift),
``warmup_steps``, ``min_lr_ratio`` (linear warm-up then cosine to ``lr * min_lr_ratio`` at
``max_steps``), ``clip_grad`` (max gradient norm), ``ema_decay``, ``batch_size``,
``schedule``        ``"cosine"`` (above) or ``"plateau"``: after the warm-up the learning rate
                    is multiplied by ``plateau_factor`` whenever ``plateau_patience`` validations
                    in a row did not improve, down to ``lr * min_lr_ratio``.
``val_every`` (steps), ``patience`` (validations without improvement before stopping early),
``max_steps``, ``max_time_s`` (stop early at a wall-clock budget), ``seed``.
``work_dir``        checkpoint, plots and metrics; ``output``: the model package path.
``threads``         torch intra-op threads while training (restored afterwards); None leaves them.
``max_force``       drop frames with any force component above this (eV/Å) from all splits
``select``          the model written: "best" (EMA weights with the lowest validation loss) or
                    "last" (EMA weights at the end of the schedule)
                    (EMT puts H atoms rattled into the surface at up to ~90 eV/Å; such outliers
                    would dominate an MSE loss); the count goes into the metadata.
``resume``          continue from ``work_dir/checkpoint.pt`` exactly where it stopped.
``stop_after_steps`` stop (checkpoint written) after this many steps without finishing:
                    what an interruption looks like; ``resume`` then gives the same result as
                    an uninterrupted run.

Before training the per-element reference energies are fitted by least squares on the training
split (``E ≈ Σ_Z n_Z e_Z``) and written into the model's per-species energy shift, and the
per-species energy scale is set to the RMS training force, so the network starts from the right
magnitudes; a model with a ``calibrate(run)`` method (GemNet's scaling factors) then calibrates
on the first training batch. Everything random draws from local ``torch.Generator`` / numpy generators seeded by
``seed``; torch's global dtype, seed and thread count are left alone.

Data-parallel training: under ``torchrun --nproc_per_node N`` (``WORLD_SIZE > 1`` in the
environment) ``torch.distributed`` is initialised with the gloo backend (and torn down again
afterwards unless the caller had initialised it). Every rank draws the same global batch of
``batch_size`` frames per step and computes the loss on its share (frames ``rank::world_size``;
``batch_size >= world_size``), the gradients are averaged with ``all_reduce`` before clipping, so
all ranks take identical optimizer steps and hold identical weights; validation runs on every
rank (early-stopping decisions agree), and only rank 0 generates data and writes checkpoints,
plots, metrics and the model (``metrics.json`` gets ``world_size`` and each rank's
``rank_weights_sha256``, see :func:`weights_sha256`). Every rank returns the model path.

Stochastic frame averaging (``frame_averaging: stochastic`` in ``model``, FAENet's default): at
every training step each structure of the batch gets one random frame of the 8, drawn from a
generator seeded by ``seed`` and the step (so ``resume`` reproduces it); validation and test use
the full 8-frame average (the model's evaluation mode).

At the end (best EMA weights on the validation split): ``learning_curve.png``,
``energy_parity.png``, ``force_parity.png`` and ``metrics.json`` (test-split energy MAE
meV/atom, force MAE meV/Å, stress MAE meV/Å³) in ``work_dir``, and the model in ``output``
via :func:`potentials.save` with data summary and test metrics in ``training``.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from eqcalc import keys
from eqcalc.errors import InvalidOptionError

DEFAULTS: Dict = {
    "data": "build/potentials/emt.xyz",
    "generate": None,
    "extra_data": [],
    "generate_extra": None,
    "init": None,
    "architecture": "painn",
    "model": {},
    "cutoff": 5.0,
    "dtype": "float32",
    "species": None,
    "energy_weight": 10.0,
    "forces_weight": 1.0,
    "stress_weight": 100.0,
    "force_mode": "conservative",
    "energy_grad_weight": 0.0,
    "conservative_forces_weight": 0.0,
    "lr": 2e-3,
    "weight_decay": 1e-4,
    "warmup_steps": 100,
    "min_lr_ratio": 0.02,
    "clip_grad": 10.0,
    "ema_decay": 0.99,
    "batch_size": 8,
    "val_every": 100,
    "patience": 20,
    "schedule": "cosine",
    "plateau_factor": 0.5,
    "plateau_patience": 3,
    "max_steps": 2000,
    "max_time_s": None,
    "stop_after_steps": None,
    "seed": 0,
    "work_dir": "build/potentials/run",
    "output": "build/potentials/model.eqm",
    "resume": False,
    "progress": True,
    "threads": None,
    "plots": True,
    "max_val_frames": None,
    "max_force": None,
    "select": "best",
}


# ----------------------------------------------------------------------------------------------
# data → tensors
# ----------------------------------------------------------------------------------------------
class Frame:
    """One structure as tensors: float64 geometry and labels, species indices."""

    __slots__ = ("positions", "cell", "pbc", "species", "energy", "forces", "stress", "n", "edges")

    def __init__(self, atoms, index: Dict[int, int]):
        from potentials.data import labels

        lab = labels(atoms)
        f64 = torch.float64
        self.n = len(atoms)
        self.positions = torch.as_tensor(atoms.positions, dtype=f64)
        self.cell = torch.as_tensor(np.asarray(atoms.cell.array), dtype=f64)
        self.pbc = torch.as_tensor(np.asarray(atoms.pbc, dtype=bool))
        self.species = torch.as_tensor([index[z] for z in atoms.numbers], dtype=torch.int64)
        self.energy = float(lab["energy"])
        self.forces = torch.as_tensor(lab["forces"], dtype=f64) if "forces" in lab else None
        stress = lab.get("stress")
        if stress is not None and atoms.pbc.all():
            from ase.stress import voigt_6_to_full_3x3_stress

            stress = np.asarray(stress)
            stress = voigt_6_to_full_3x3_stress(stress) if stress.shape == (6,) else stress.reshape(3, 3)
            self.stress = torch.as_tensor(stress, dtype=f64)
        else:
            self.stress = None
        self.edges = None  # (cutoff, edge_index, shifts), computed once by collate

    def neighbors(self, cutoff: float):
        """This frame's neighbor list (``compute_neighbors``), cached: the data never move."""
        from eqcalc.neighbors import compute_neighbors

        if self.edges is None or self.edges[0] != cutoff:
            edge_index, shifts = compute_neighbors(self.positions, self.cell.unsqueeze(0), self.pbc.unsqueeze(0),
                                                   cutoff, torch.zeros(self.n, dtype=torch.int64))
            self.edges = (cutoff, edge_index, shifts.to(torch.float64))
        return self.edges[1], self.edges[2]


def collate(frames: Sequence[Frame], cutoff: float) -> Dict[str, torch.Tensor]:
    """Concatenate frames into one batch (``system`` index, atoms contiguous, systems in order).

    The neighbor list of each frame comes from ``compute_neighbors`` once and is reused
    (offset by the atoms before it): the same edges as ``compute_neighbors`` on the whole batch,
    without recomputing them every step.
    """
    counts = torch.tensor([f.n for f in frames])
    positions = torch.cat([f.positions for f in frames])
    cell = torch.stack([f.cell for f in frames])
    pbc = torch.stack([f.pbc for f in frames])
    system = torch.repeat_interleave(torch.arange(len(frames)), counts)
    offsets = torch.cumsum(counts, 0) - counts
    lists = [f.neighbors(cutoff) for f in frames]
    edge_index = torch.cat([e + int(o) for (e, _), o in zip(lists, offsets)], dim=1)
    shifts = torch.cat([s for _, s in lists])
    batch = {
        keys.POSITIONS: positions, keys.CELL: cell, keys.PBC: pbc, keys.SPECIES: torch.cat([f.species for f in frames]),
        keys.EDGE_INDEX: edge_index, keys.SHIFTS: shifts, keys.SYSTEM: system,
        "n_atoms": counts.to(torch.float64),
        "energy_ref": torch.tensor([f.energy for f in frames], dtype=torch.float64),
    }
    if all(f.forces is not None for f in frames):
        batch["forces_ref"] = torch.cat([f.forces for f in frames])
    has_stress = torch.tensor([f.stress is not None for f in frames])
    batch["stress_mask"] = has_stress
    batch["stress_ref"] = torch.stack([f.stress if f.stress is not None else torch.zeros(3, 3, dtype=torch.float64)
                                       for f in frames])
    return batch


class _Capture(torch.nn.Module):
    """Passes the energy model through, keeping its direct forces of the last forward."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.forces = torch.zeros(0)

    def forward(self, data: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        out = self.model(data)
        self.forces = out[keys.FORCES]
        return out


class DirectForces(torch.nn.Module):
    """Training view of a direct-force model: one forward gives the head's forces (``forces``) and
    the conservative forces ``-dE/dr`` of the same energy (``forces_conservative``, for the Eq. 9
    term and for reporting), plus energy and stress as :class:`ForceStressModel` does."""

    def __init__(self, model: torch.nn.Module, stress: bool, create_graph: bool):
        super().__init__()
        from eqcalc.derivatives import ForceStressModel

        self.capture = _Capture(model)
        self.wrapper = ForceStressModel(self.capture, forces="conservative", stress=stress,
                                        create_graph=create_graph)

    def forward(self, *inputs):
        out = dict(self.wrapper(*inputs))
        out["forces_conservative"] = out[keys.FORCES]
        out[keys.FORCES] = self.capture.forces.to(torch.float64)
        if not self.wrapper.create_graph:
            out[keys.FORCES] = out[keys.FORCES].detach()
        return out


def make_wrapper(model: torch.nn.Module, force_mode: str = "conservative", stress: bool = True,
                 create_graph: bool = False) -> torch.nn.Module:
    """The forces/stress wrapper training and evaluation run: ForceStressModel, or
    :class:`DirectForces` for ``force_mode="direct"``."""
    from eqcalc.derivatives import ForceStressModel

    if force_mode == "direct":
        return DirectForces(model, stress, create_graph)
    return ForceStressModel(model, create_graph=create_graph, stress=stress)


def _forward(wrapper, batch):
    return wrapper(batch[keys.POSITIONS], batch[keys.CELL], batch[keys.SPECIES], batch[keys.EDGE_INDEX],
                   batch[keys.SHIFTS], batch[keys.SYSTEM])


def _loss(out, batch, weights) -> Dict[str, torch.Tensor]:
    """Weighted MSE terms in float64 (the wrapper's energies are float64; forces too)."""
    w_e, w_f, w_s = weights[:3]
    w_g = weights[3] if len(weights) > 3 else 0.0
    w_c = weights[4] if len(weights) > 4 else 0.0
    n = batch["n_atoms"]
    e_err = (out[keys.ENERGY] - batch["energy_ref"]) / n
    terms = {"energy": (e_err ** 2).mean()}
    total = w_e * terms["energy"]
    if w_f > 0 and "forces_ref" in batch:
        terms["forces"] = ((out[keys.FORCES] - batch["forces_ref"]) ** 2).mean()
        total = total + w_f * terms["forces"]
    mask = batch["stress_mask"]
    if w_s > 0 and bool(mask.any()):
        terms["stress"] = ((out[keys.STRESS][mask] - batch["stress_ref"][mask]) ** 2).mean()
        total = total + w_s * terms["stress"]
    if w_g > 0 and "forces_conservative" in out:
        # FAENet Eq. 9: the direct forces should be the negative energy gradient.
        terms["energy_grad"] = ((out[keys.FORCES] - out["forces_conservative"]) ** 2).mean()
        total = total + w_g * terms["energy_grad"]
    if w_c > 0 and "forces_conservative" in out and "forces_ref" in batch:
        terms["conservative_forces"] = ((out["forces_conservative"] - batch["forces_ref"]) ** 2).mean()
        total = total + w_c * terms["conservative_forces"]
    terms["total"] = total
    return terms


# ----------------------------------------------------------------------------------------------
# model preparation
# ----------------------------------------------------------------------------------------------
def _initial_model(cfg: Dict, species: List[str], cutoff: float) -> Tuple[torch.nn.Module, Dict]:
    """The model of ``cfg["init"]`` (a package path or shipped name), trainable, checked against
    the recipe (fine-tuning keeps the package's architecture, hyperparameters, species and
    cutoff), and the package's metadata."""
    from eqcalc import package

    pkg = package.read(package.resolve(cfg["init"]))
    model = package.build_eager(pkg)
    config = model.config_dict()
    problems = []
    architecture = pkg.metadata.get("architecture")
    if cfg["architecture"] != architecture:
        problems.append(f"architecture {cfg['architecture']!r} vs the package's {architecture!r}")
    if list(config["species"]) != list(species):
        problems.append(f"species {species} (from the data) vs the package's {list(config['species'])}")
    if abs(float(model.cutoff) - cutoff) > 1e-9:
        problems.append(f"cutoff {cutoff} vs the package's {float(model.cutoff)}")
    if str(next(model.parameters()).dtype).replace("torch.", "") != cfg["dtype"]:
        problems.append(f"dtype {cfg['dtype']} vs the package's {next(model.parameters()).dtype}")
    for key, value in (cfg["model"] or {}).items():
        if key in config and config[key] != value:
            problems.append(f"model.{key}={value!r} vs the package's {config[key]!r}")
    if problems:
        raise InvalidOptionError(f"init={cfg['init']!r} does not match the recipe: {'; '.join(problems)}; "
                                 "fine-tuning keeps the package's model, so remove or align these options "
                                 "(species: set species to the package's list)")
    return model.train(), pkg.metadata


def _species_parameter(model: torch.nn.Module, name: str, n_species: int) -> torch.Tensor:
    """The per-species tensor of ``model`` whose name ends in ``name`` (``shift``/``scale``)."""
    found = [(k, p) for k, p in list(model.named_parameters()) + list(model.named_buffers())
             if k.split(".")[-1] == name and tuple(p.shape) == (n_species,)]
    if len(found) != 1:
        raise InvalidOptionError(
            f"{type(model).__name__} has {len(found)} per-species {name!r} tensors of shape "
            f"({n_species},); expected exactly one to hold the reference energies")
    return found[0][1]


def fit_reference_energies(frames: Sequence[Frame], n_species: int) -> np.ndarray:
    """Least-squares per-species energies ``e_Z`` (eV) with ``E ≈ Σ_Z n_Z e_Z``."""
    counts = np.zeros((len(frames), n_species))
    for k, f in enumerate(frames):
        counts[k] = np.bincount(f.species.numpy(), minlength=n_species)
    energies = np.array([f.energy for f in frames])
    solution, *_ = np.linalg.lstsq(counts, energies, rcond=None)
    solution[counts.sum(0) == 0] = 0.0  # species absent from the data keep a zero shift
    return solution


def _param_groups(model: torch.nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        leaf = name.split(".")[-1]
        if p.dim() < 2 or "embedding" in name or leaf in ("scale", "shift"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_factor(step: int, warmup: int, total: int, min_ratio: float, plateau_scale=None) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine to ``min_ratio`` at ``total``, or
    (``plateau_scale`` given) the plateau schedule's current scale, never below ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    if plateau_scale is not None:
        return max(min_ratio, plateau_scale)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _plateau_update(state: Dict, improved: bool, factor: float, patience: int) -> None:
    """Plateau schedule after one validation: count validations without improvement and cut the
    scale by ``factor`` after ``patience`` of them in a row (state is checkpointed: exact resume)."""
    state["plateau_bad"] = 0 if improved else state.get("plateau_bad", 0) + 1
    if state["plateau_bad"] >= patience:
        state["lr_scale"] = state.get("lr_scale", 1.0) * factor
        state["plateau_bad"] = 0


# ----------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------
def evaluate(model: torch.nn.Module, batches: Sequence[Dict], weights,
             force_mode: str = "conservative") -> Dict[str, float]:
    """Losses and MAEs (energy meV/atom, forces meV/Å, stress meV/Å³) over ``batches``; in
    ``force_mode="direct"`` the forces are the head's, and ``conservative_forces_mae_meV_per_A``
    those of ``-dE/dr``."""
    wrapper = make_wrapper(model, force_mode)
    sums = {"loss": 0.0, "energy_mae": 0.0, "forces_mae": 0.0, "stress_mae": 0.0, "cons_mae": 0.0}
    n_sys = n_comp = n_stress = 0
    for batch in batches:
        out = _forward(wrapper, batch)
        terms = _loss(out, batch, weights)
        k = len(batch["energy_ref"])
        sums["loss"] += float(terms["total"]) * k
        sums["energy_mae"] += float(((out[keys.ENERGY] - batch["energy_ref"]).abs() / batch["n_atoms"]).sum())
        n_sys += k
        if "forces_ref" in batch:
            sums["forces_mae"] += float((out[keys.FORCES] - batch["forces_ref"]).abs().sum())
            n_comp += batch["forces_ref"].numel()
            if "forces_conservative" in out:
                sums["cons_mae"] += float((out["forces_conservative"] - batch["forces_ref"]).abs().sum())
        mask = batch["stress_mask"]
        if bool(mask.any()):
            sums["stress_mae"] += float((out[keys.STRESS][mask] - batch["stress_ref"][mask]).abs().sum())
            n_stress += int(mask.sum()) * 9
    result = {"loss": sums["loss"] / max(n_sys, 1),
              "energy_mae_meV_per_atom": 1000 * sums["energy_mae"] / max(n_sys, 1),
              "forces_mae_meV_per_A": 1000 * sums["forces_mae"] / max(n_comp, 1) if n_comp else float("nan"),
              "stress_mae_meV_per_A3": 1000 * sums["stress_mae"] / max(n_stress, 1) if n_stress else float("nan")}
    if force_mode == "direct":
        result["conservative_forces_mae_meV_per_A"] = (1000 * sums["cons_mae"] / max(n_comp, 1)
                                                       if n_comp else float("nan"))
    return result


def predictions(model: torch.nn.Module, batches: Sequence[Dict], force_mode: str = "conservative"):
    """(E/N ref, E/N pred, F ref, F pred) as numpy arrays for parity plots."""
    wrapper = make_wrapper(model, force_mode)
    e_ref, e_pred, f_ref, f_pred = [], [], [], []
    for batch in batches:
        out = _forward(wrapper, batch)
        e_ref.append((batch["energy_ref"] / batch["n_atoms"]).numpy())
        e_pred.append((out[keys.ENERGY] / batch["n_atoms"]).numpy())
        if "forces_ref" in batch:
            f_ref.append(batch["forces_ref"].numpy().ravel())
            f_pred.append(out[keys.FORCES].detach().numpy().ravel())
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)  # noqa: E731
    return cat(e_ref), cat(e_pred), cat(f_ref), cat(f_pred)


# ----------------------------------------------------------------------------------------------
# EMA
# ----------------------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of the parameters (buffers copied)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        # warm start: early on the average follows the weights more closely
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, model: torch.nn.Module) -> torch.nn.Module:
        ema_model = copy.deepcopy(model)
        ema_model.load_state_dict(self.shadow)
        return ema_model


# ----------------------------------------------------------------------------------------------
# the training loop
# ----------------------------------------------------------------------------------------------
def _batches(frames: List[Frame], size: int, cutoff: float, limit=None) -> List[Dict]:
    frames = frames if limit is None else frames[:limit]
    return [collate(frames[k:k + size], cutoff) for k in range(0, len(frames), size)]


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes, bytes in key order): equal hashes
    mean bit-identical weights (used to check that data-parallel ranks agree)."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        h.update(f"{k}:{v.dtype}:{tuple(v.shape)};".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


class _Dist:
    """The data-parallel context: ``rank``/``world`` (0/1 without torch.distributed)."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.owned = False
        self.rank, self.world = 0, 1
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available():
            if not dist.is_initialized():
                dist.init_process_group(backend="gloo")
                self.owned = True
            self.rank, self.world = dist.get_rank(), dist.get_world_size()

    @property
    def on(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.on:
            self.dist.barrier()

    def average_gradients(self, params: List[torch.nn.Parameter], loss: float) -> float:
        """Average the gradients (and the loss, returned) over the ranks in one all_reduce.
        A gradient missing on every rank stays None; missing on some only, it counts as zero."""
        if not self.on:
            return loss
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float64)
        self.dist.all_reduce(has, op=self.dist.ReduceOp.MAX)
        active = [p for p, h in zip(params, has.tolist()) if h > 0]
        for p in active:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1).to(torch.float64) for p in active]
                         + [torch.tensor([loss], dtype=torch.float64)])
        self.dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in active:
            n = p.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n
        return float(flat[-1])

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any (keeps stop decisions in step)."""
        if not self.on:
            return flag
        t = torch.tensor([float(flag)])
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def gather(self, obj) -> list:
        if not self.on:
            return [obj]
        out = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owned and self.dist.is_initialized():
            self.dist.destroy_process_group()


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


#: option → (test, what it must be); ``None`` is allowed where the default is ``None``.
OPTION_RULES = {
    "lr": (lambda v: _num(v) and v > 0, "a finite number > 0, e.g. 2e-3"),
    "weight_decay": (lambda v: _num(v) and v >= 0, "a finite number >= 0"),
    "warmup_steps": (lambda v: _int(v) and v >= 0, "an integer >= 0"),
    "min_lr_ratio": (lambda v: _num(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "clip_grad": (lambda v: _num(v) and v > 0, "a finite number > 0"),
    "ema_decay": (lambda v: _num(v) and 0 <= v < 1, "a number in [0, 1)"),
    "batch_size": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "val_every": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "patience": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "plateau_factor": (lambda v: _num(v) and 0 < v < 1, "a number in (0, 1)"),
    "plateau_patience": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "max_steps": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "max_time_s": (lambda v: _num(v) and v > 0, "a number of seconds > 0"),
    "stop_after_steps": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "seed": (lambda v: _int(v) and v >= 0, "an integer >= 0"),
    "cutoff": (lambda v: _num(v) and v > 0, "a finite number of Å > 0"),
    "threads": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "max_val_frames": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "max_force": (lambda v: _num(v) and v > 0, "a number of eV/Å > 0"),
    "select": (lambda v: v in ("best", "last"), "'best' or 'last'"),
    **{k: (lambda v: _num(v) and v >= 0, "a finite number >= 0")
       for k in ("energy_weight", "forces_weight", "stress_weight", "energy_grad_weight",
                 "conservative_forces_weight")},
}


def check_options(cfg: Dict) -> None:
    """:class:`InvalidOptionError` naming the first option outside :data:`OPTION_RULES`; the
    output and work folders are checked writable here, before any training."""
    for key, (ok, what) in OPTION_RULES.items():
        value = cfg.get(key)
        if value is None and DEFAULTS.get(key) is None:
            continue
        if not ok(value):
            raise InvalidOptionError(f"training option {key}={value!r} must be {what}; fix it in the recipe "
                                     f"or with --set {key}=...")
    from eqcalc import outputs

    outputs.writable_file(cfg["output"])
    outputs.writable_dir(cfg["work_dir"])


def _generate_extra(path, gen: Dict, seed: int, progress: bool) -> None:
    """Write one ``extra_data`` file from its ``generate_extra`` mapping (see the module docstring)."""
    from potentials import data as datamod

    kind = gen.pop("kind", "near_minima")
    elements = gen.get("elements", datamod.ELEMENTS)
    if kind == "near_minima":
        datamod.generate_near_minima(path, int(gen.get("n_structures", 1000)), int(gen.get("seed", seed)),
                                     elements=elements, progress=progress)
    elif kind == "paths":
        datamod.generate_paths(path, int(gen.get("n_paths", 100)), int(gen.get("seed", seed)),
                               elements=elements, progress=progress)
    else:
        raise InvalidOptionError(f"generate_extra kind={kind!r}; use near_minima or paths")


def train(config: Dict) -> Path:
    """Train per ``config`` (see the module docstring); returns the path of the model package.

    Under ``torchrun`` with ``WORLD_SIZE > 1`` trains data-parallel (module docstring)."""
    threads = torch.get_num_threads()
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    ddp = _Dist()
    try:
        return _train(config, ddp)
    finally:
        ddp.close()
        torch.set_num_threads(threads)


def _train(config: Dict, ddp: "_Dist | None" = None) -> Path:
    import potentials
    from potentials import data as datamod

    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        raise InvalidOptionError(f"unknown training option(s) {unknown}; valid: {sorted(DEFAULTS)}")
    cfg = dict(DEFAULTS, **config)
    check_options(cfg)
    ddp = ddp or _Dist()
    main = ddp.rank == 0
    if int(cfg["batch_size"]) < ddp.world:
        raise InvalidOptionError(f"batch_size={cfg['batch_size']} is smaller than the {ddp.world} data-parallel "
                                 "ranks; use batch_size >= world size (it is the global batch)")
    cfg["progress"] = bool(cfg["progress"]) and main
    seed = int(cfg["seed"])
    work = Path(cfg["work_dir"])
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    # ---- data ----
    data_path = Path(cfg["data"])
    if cfg["generate"] and not data_path.exists() and main:
        gen = dict(cfg["generate"])
        datamod.generate(data_path, int(gen.get("n_structures", 1000)), int(gen.get("seed", seed)),
                         elements=gen.get("elements", datamod.ELEMENTS), progress=cfg["progress"])
    ddp.barrier()  # the other ranks read the data rank 0 may just have written
    weights = (float(cfg["energy_weight"]), float(cfg["forces_weight"]), float(cfg["stress_weight"]),
               float(cfg["energy_grad_weight"]), float(cfg["conservative_forces_weight"]))
    force_mode = cfg["force_mode"]
    from eqcalc.errors import check_choice

    check_choice("force_mode", force_mode, ("conservative", "direct"))
    check_choice("schedule", cfg["schedule"], ("cosine", "plateau"))
    if weights[3] > 0 and force_mode != "direct":
        raise InvalidOptionError("energy_grad_weight > 0 needs force_mode: direct (it ties the force head "
                                 "to the energy gradient); set force_mode: direct or energy_grad_weight: 0")
    if weights[4] > 0 and force_mode != "direct":
        raise InvalidOptionError("conservative_forces_weight > 0 needs force_mode: direct (in conservative "
                                 "mode forces_weight already trains -dE/dr); set it to 0")
    require = ("energy", "forces") if weights[1] > 0 else ("energy",)
    extra = cfg["extra_data"] or []
    extra = [extra] if isinstance(extra, (str, Path)) else list(extra)
    recipes = cfg["generate_extra"] or []
    recipes = [recipes] if isinstance(recipes, dict) else list(recipes)
    for target, gen in zip(extra, recipes):
        if not Path(target).exists() and main:
            _generate_extra(target, dict(gen), seed, cfg["progress"])
    ddp.barrier()
    frames_ase = [f for p in [data_path, *extra] for f in datamod.read_dataset(p, require=require)]
    n_dropped = 0
    if cfg["max_force"] is not None:
        kept = [a for a in frames_ase if "forces" not in datamod.labels(a)
                or np.abs(datamod.labels(a)["forces"]).max() <= float(cfg["max_force"])]
        n_dropped = len(frames_ase) - len(kept)
        frames_ase = kept
    from ase.data import atomic_numbers

    species = list(cfg["species"] or sorted({s for a in frames_ase for s in a.get_chemical_symbols()},
                                           key=atomic_numbers.get))
    index = {atomic_numbers[s]: k for k, s in enumerate(species)}
    missing = sorted({s for a in frames_ase for s in a.get_chemical_symbols()} - set(species))
    if missing:
        raise InvalidOptionError(f"the data holds elements {missing} not in species={species}")
    splits = {name: [Frame(a, index) for a in datamod.split(frames_ase, name)] for name in datamod.SPLITS}
    if not splits["train"] or not splits["val"]:
        raise InvalidOptionError(f"{data_path}: need frames in the train and val splits, found "
                                 f"{ {k: len(v) for k, v in splits.items()} }")
    cutoff = float(cfg["cutoff"])
    bs = int(cfg["batch_size"])
    val_batches = _batches(splits["val"], 2 * bs, cutoff, cfg["max_val_frames"])

    # ---- model ----
    if cfg["init"]:
        model, init_meta = _initial_model(cfg, species, cutoff)
        dtype = next(model.parameters()).dtype
        fitted = (init_meta.get("training") or {}).get("reference_energies_eV")
        refs = (np.array([fitted[s] for s in species]) if fitted and set(species) <= set(fitted)
                else _species_parameter(model, "shift", len(species)).detach().double().numpy())
    else:
        model = potentials.build(cfg["architecture"], species=species, cutoff=cutoff, dtype=cfg["dtype"],
                                 seed=seed, **cfg["model"])
        dtype = next(model.parameters()).dtype
        refs = fit_reference_energies(splits["train"], len(species))
        forces_rms = (float(torch.cat([f.forces for f in splits["train"] if f.forces is not None]).pow(2).mean().sqrt())
                      if require[-1] == "forces" else 1.0)
        with torch.no_grad():
            _species_parameter(model, "shift", len(species)).copy_(torch.as_tensor(refs, dtype=dtype))
            _species_parameter(model, "scale", len(species)).fill_(max(forces_rms, 1e-2))
        if hasattr(model, "calibrate"):
            # GemNet's scaling factors, fitted on a training batch before the EMA copies the weights
            # (a fine-tune keeps its package's).
            calibration = _batches(splits["train"][:bs], bs, cutoff)[0]
            model.calibrate(lambda: _forward(make_wrapper(model, stress=False), calibration))
    if force_mode == "direct" and not model.config_dict().get("direct_forces"):
        raise InvalidOptionError("force_mode: direct needs a force head; add direct_forces: true under model")
    wrapper = make_wrapper(model, force_mode, stress=weights[2] > 0, create_graph=True)
    from potentials.frames import frame_choices

    stochastic = frame_choices([model])  # wrappers that draw one frame per structure per step
    optimizer = torch.optim.AdamW(_param_groups(model, float(cfg["weight_decay"])), lr=float(cfg["lr"]))
    ema = EMA(model, float(cfg["ema_decay"]))
    max_steps = int(cfg["max_steps"])
    state = {"step": 0, "best": float("inf"), "best_step": 0, "bad": 0, "history": [], "train_time": 0.0}
    best_state = copy.deepcopy(ema.shadow)

    ckpt_path = work / "checkpoint.pt"
    if cfg["resume"] and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        ema.shadow = ckpt["ema"]
        best_state = ckpt["best_model"]
        state = json.loads(ckpt["state"])

    plateau = cfg["schedule"] == "plateau"

    def lr_at(step):
        scale = state.get("lr_scale", 1.0) if plateau else None
        return float(cfg["lr"]) * _lr_factor(step, int(cfg["warmup_steps"]), max_steps,
                                             float(cfg["min_lr_ratio"]), scale)

    def save_checkpoint():
        if not main:
            return
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "ema": ema.shadow,
                    "best_model": best_state, "state": json.dumps(state)}, ckpt_path)

    n_train = len(splits["train"])
    per_epoch = max(1, n_train // bs)  # drop the ragged last batch: every step sees bs frames

    def batch_at(step):
        epoch, pos = divmod(step, per_epoch)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n_train, generator=g)[pos * bs:(pos + 1) * bs].tolist()
        order = order[ddp.rank::ddp.world]  # this rank's share of the global batch
        return collate([splits["train"][k] for k in order], cutoff)

    bar = None
    if cfg["progress"]:
        from tqdm import tqdm
        bar = tqdm(total=max_steps, initial=state["step"], desc=f"train {cfg['architecture']}", unit="step")
    stop_after = cfg["stop_after_steps"]
    stopped_early = False
    segment_start = time.perf_counter()
    base_time = state["train_time"]
    running = state.get("running")
    if state["step"] == 0 and not state["history"]:
        # the starting point of the learning curve (reference energies already in place)
        metrics = evaluate(model.eval(), val_batches, weights, force_mode)
        state["history"].append({"step": 0, "train_loss": float("nan"), "lr": 0.0, "grad_norm": float("nan"),
                                 **{f"val_{k}": v for k, v in metrics.items()}})
    while state["step"] < max_steps:
        step = state["step"]
        if stop_after is not None and step >= int(stop_after):
            break
        if cfg["max_time_s"] is not None and ddp.any(
                base_time + time.perf_counter() - segment_start > float(cfg["max_time_s"])):
            stopped_early = True
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        batch = batch_at(step)
        model.train()
        if stochastic:
            draw = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * step + 1)
            for fa in stochastic:
                fa.choose_frames(len(batch["energy_ref"]), draw)
        out = _forward(wrapper, batch)
        terms = _loss(out, batch, weights)
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        loss = ddp.average_gradients([p for p in model.parameters() if p.requires_grad],
                                     float(terms["total"].detach()))
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float(cfg["clip_grad"]))
        optimizer.step()
        ema.update(model, step)
        state["step"] = step + 1
        running = loss if running is None else 0.95 * running + 0.05 * loss
        state["running"] = running
        if state["step"] % int(cfg["val_every"]) == 0 or state["step"] == max_steps:
            metrics = evaluate(ema.copy_to(model).eval(), val_batches, weights, force_mode)
            record = {"step": state["step"], "train_loss": running, "lr": lr_at(step),
                      "grad_norm": float(grad_norm), **{f"val_{k}": v for k, v in metrics.items()}}
            state["history"].append(record)
            improved = metrics["loss"] < state["best"]
            if plateau:
                _plateau_update(state, improved, float(cfg["plateau_factor"]), int(cfg["plateau_patience"]))
            if improved:
                state.update(best=metrics["loss"], best_step=state["step"], bad=0)
                best_state = copy.deepcopy(ema.shadow)
            else:
                state["bad"] += 1
            state["train_time"] = base_time + time.perf_counter() - segment_start
            save_checkpoint()
            if bar is not None:
                bar.set_postfix(loss=f"{running:.3g}", val_E=f"{metrics['energy_mae_meV_per_atom']:.1f}meV/at",
                                val_F=f"{metrics['forces_mae_meV_per_A']:.0f}meV/Å", lr=f"{lr_at(step):.1e}")
            if state["bad"] >= int(cfg["patience"]):
                stopped_early = True
                break
        if bar is not None:
            bar.update(1)
            if state["step"] % 10 == 0:
                bar.set_postfix_str(f"loss={running:.3g}" + (
                    f" val_E={state['history'][-1]['val_energy_mae_meV_per_atom']:.1f}meV/at"
                    f" val_F={state['history'][-1]['val_forces_mae_meV_per_A']:.0f}meV/Å"
                    if state["history"] else ""))
    if bar is not None:
        bar.close()
    state["train_time"] = base_time + time.perf_counter() - segment_start
    save_checkpoint()
    if stop_after is not None and state["step"] >= int(stop_after) and state["step"] < max_steps and not stopped_early:
        ddp.barrier()  # the checkpoint is on disk before any rank returns
        return ckpt_path  # interrupted on purpose: resume later with resume=True

    # ---- final model: the EMA weights with the best validation loss, or those at the end ----
    model.load_state_dict(best_state if cfg["select"] == "best" else ema.shadow)
    model.eval()
    rank_hashes = ddp.gather(weights_sha256(model))
    if not main:
        ddp.barrier()  # rank 0 writes metrics, plots and the model
        return Path(cfg["output"])
    test_batches = _batches(splits["test"], 2 * bs, cutoff)
    test = evaluate(model, test_batches, weights, force_mode) if test_batches else {}
    val = evaluate(model, val_batches, weights, force_mode)
    metrics = {
        "test": test, "val": val, "steps": state["step"], "best_step": state["best_step"], "select": cfg["select"],
        "stopped_early": stopped_early, "train_time_s": round(state["train_time"], 1),
        "wall_time_s": round(time.perf_counter() - started, 1),
        "test_energy_mae_meV_per_atom": test.get("energy_mae_meV_per_atom"),
        "test_forces_mae_meV_per_A": test.get("forces_mae_meV_per_A"),
        "test_stress_mae_meV_per_A3": test.get("stress_mae_meV_per_A3"),
    }
    if ddp.on:
        metrics.update(world_size=ddp.world, rank_weights_sha256=rank_hashes)
    (work / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (work / "history.json").write_text(json.dumps(state["history"], indent=1))
    if cfg["plots"]:
        _plots(work, state["history"], predictions(model, test_batches or val_batches, force_mode))
    summary = datamod.summary(frames_ase)
    summary.update(file=str(data_path.name), generate=cfg["generate"], dropped_max_force=n_dropped)
    if extra:
        summary.update(extra_files=[Path(p).name for p in extra], generate_extra=cfg["generate_extra"])
    if cfg["init"]:
        summary["init"] = {"model": str(cfg["init"]), "sha256": init_meta.get("sha256"),
                           "weights_sha256": init_meta.get("weights_sha256")}
    training = {
        "data": summary,
        "reference_energies_eV": {s: round(float(e), 6) for s, e in zip(species, refs)},
        "test_metrics": {k: (round(v, 3) if math.isfinite(v) else None) for k, v in test.items()},
        "recipe": {k: v for k, v in cfg.items() if k not in ("progress", "resume", "stop_after_steps")},
        "steps": state["step"], "train_time_s": round(state["train_time"], 1), "seed": seed,
    }
    path = Path(potentials.save(model, cfg["output"], training=training))
    ddp.barrier()
    return path


def _plots(work: Path, history: List[Dict], preds) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if history:
        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        steps = [h["step"] for h in history]
        ax[0].semilogy(steps, [h["train_loss"] for h in history], label="train (running)")
        ax[0].semilogy(steps, [h["val_loss"] for h in history], label="validation (EMA)")
        ax[0].set_xlabel("step"), ax[0].set_ylabel("loss"), ax[0].legend()
        ax[1].semilogy(steps, [h["val_energy_mae_meV_per_atom"] for h in history], label="E MAE meV/atom")
        ax[1].semilogy(steps, [h["val_forces_mae_meV_per_A"] for h in history], label="F MAE meV/Å")
        ax[1].set_xlabel("step"), ax[1].set_title("validation"), ax[1].legend()
        fig.tight_layout()
        fig.savefig(work / "learning_curve.png", dpi=100)
        plt.close(fig)
    e_ref, e_pred, f_ref, f_pred = preds
    for name, ref, pred, unit in (("energy", e_ref, e_pred, "eV/atom"), ("force", f_ref, f_pred, "eV/Å")):
        if len(ref) == 0:
            continue
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.scatter(ref, pred, s=3, alpha=0.5)
        lo, hi = float(min(ref.min(), pred.min())), float(max(ref.max(), pred.max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        mae = float(np.abs(ref - pred).mean()) * 1000
        ax.set_xlabel(f"EMT {name} ({unit})"), ax.set_ylabel(f"model {name} ({unit})")
        ax.set_title(f"{name} parity (test), MAE {mae:.1f} m{unit}")
        fig.tight_layout()
        fig.savefig(work / f"{name}_parity.png", dpi=100)
        plt.close(fig)
