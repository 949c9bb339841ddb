"""Run loops around :mod:`eqcalc.md`: trajectories, logs, progress, checkpoints and restart.

``run_md`` moves a batch of ASE structures with one integrator and writes, in ``output_dir``:

* ``NAME.extxyz`` per structure, a frame every ``interval`` steps (step 0 included) with
  energy, forces, momenta, stress (bulk) and FixAtoms (``move_mask``), through ``ase.io``;
* ``md.log``: ``step time_ps system temperature_K epot_eV etot_eV`` per system and record;
* ``checkpoint.pt`` every ``checkpoint_interval`` steps: plain tensors only (state, thermostat
  variables, the generator's state), read back with ``torch.load(weights_only=True)``.

Restart (``restart=path``) continues from the checkpoint and reproduces the uninterrupted run
exactly: the checkpoint holds the forces at its positions, the generator state and the
thermostat variables, and the neighbor list is rebuilt after each checkpoint in both runs, so
the same floating-point operations happen in the same order. Frames and log lines written after
the checkpoint by the interrupted run are dropped from the files, and so is a half-written last
frame (a kill or a full disk). The checkpoint records the model (weights hash, dtype, force
mode) and the integrator; a restart with others, or with ``steps`` not beyond the checkpoint's
step, is refused.

The run folder cannot be corrupted (:mod:`eqcalc.outputs`): it is locked while a run writes
there (a second run into it is refused; a killed run's folder is taken over), every frame and log
record is written whole or not at all, and checkpoints are replaced atomically. A system that
leaves physics stops the run with a typed error (:func:`eqcalc.md.check_physical`) before the
next checkpoint, so the last checkpoint is always a good state.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from eqcalc import outputs
from eqcalc.engine import md
from eqcalc.errors import CheckpointError, InvalidAtomsError, InvalidOptionError, UnstableSimulationError

CHECKPOINT = "checkpoint.pt"
LOG = "md.log"
_STATE_FIELDS = ("positions", "momenta", "masses", "numbers", "cell", "pbc", "system", "fixed",
                 "energy", "forces", "stress", "dof")


@dataclass
class MDRun:
    """What :func:`run_md` returns: the final state and the per-record log arrays
    ``(n_records, n_systems)`` (``step`` is ``(n_records,)``)."""

    state: md.MDState
    log: Dict[str, np.ndarray]
    files: List[str]
    seconds: float
    steps_run: int


def integrator_to_dict(integrator) -> Dict:
    return {"kind": type(integrator).__name__, **{k: (list(v) if isinstance(v, (list, tuple)) else v)
                                                   for k, v in asdict(integrator).items()}}


def integrator_from_dict(d: Dict):
    kinds = {c.__name__: c for c in (md.NVE, md.Langevin, md.Bussi, md.NoseHooverChain)}
    d = dict(d)
    cls = kinds.get(d.pop("kind", None))
    if cls is None:
        raise CheckpointError("checkpoint names an unknown integrator; it was not written by eqcalc.drivers")
    return cls(**d)


def potential_identity(potential) -> Dict:
    """What produced the forces: model weights hash, dtype and force mode (empty for a potential
    that is not an eqcalc model)."""
    model = getattr(potential, "model", None)
    meta = getattr(model, "metadata", None)
    if not meta:
        return {}
    return {"weights_sha256": meta.get("weights_sha256"), "dtype": model.dtype, "forces": model.forces}


def save_checkpoint(path, state: md.MDState, integrator, generator: torch.Generator,
                    identity: Optional[Dict] = None) -> None:
    """Write ``state``, ``integrator`` settings, ``generator`` state and the model ``identity``
    as plain tensors and strings, atomically (a kill or a full disk leaves the previous one)."""
    data = {k: getattr(state, k).cpu() for k in _STATE_FIELDS if getattr(state, k) is not None}
    data.update({f"thermostat.{k}": v.cpu() for k, v in state.thermostat.items()})
    data["step"] = torch.tensor(state.step)
    data["rng_state"] = generator.get_state()
    data["integrator"] = json.dumps(integrator_to_dict(integrator))
    data["model"] = json.dumps(identity or {})
    outputs.replace_atomically(path, lambda f: torch.save(data, f))


def load_checkpoint(path, device="cpu"):
    """``(state, integrator, generator_state)`` from :func:`save_checkpoint`'s file (safe load:
    plain tensors only)."""
    return _load(path, device)[:3]


def _load(path, device):
    """:func:`load_checkpoint` plus the model identity (:func:`potential_identity`) it records."""
    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; give the checkpoint.pt of an "
                              "earlier run (written with --checkpoint-interval)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        state = md.MDState(**{k: data[k].to(device) for k in _STATE_FIELDS if k in data},
                           step=int(data["step"]),
                           thermostat={k.split(".", 1)[1]: v.to(device) for k, v in data.items()
                                       if k.startswith("thermostat.")})
        integrator = integrator_from_dict(json.loads(data["integrator"]))
        identity = json.loads(data.get("model", "{}"))
        return state, integrator, data["rng_state"], identity
    except CheckpointError:
        raise
    except Exception as e:  # corrupt, foreign or unsafe file
        raise CheckpointError(f"{path} is not an eqcalc MD checkpoint ({type(e).__name__}: {e}); restart "
                              "from a file written by run_md (checkpoint_interval=...)") from e


def _names(structures, names) -> List[str]:
    if names is None:
        names = [f"system{k}" for k in range(len(structures))]
    if len(names) != len(structures) or len(set(names)) != len(names):
        raise InvalidOptionError(f"names={names!r} must be {len(structures)} distinct names, one per structure")
    return list(names)


_STEP = re.compile(rb"(?:^|\s)step=(-?\d+)(?:\s|$)")


def _end_of_frames(data: bytes, step: int) -> int:
    """Byte offset after the last complete extxyz frame with ``info['step'] <= step``: frames a
    run wrote after its checkpoint and a half-written frame (a kill, a full disk) lie beyond."""
    pos = keep = 0
    while True:
        line_end = data.find(b"\n", pos)
        if line_end < 0:
            return keep
        try:
            count = int(data[pos:line_end])
        except ValueError:
            return keep
        comment_end = data.find(b"\n", line_end + 1)
        end = comment_end
        for _ in range(max(count, 0)):
            if end < 0:
                break
            end = data.find(b"\n", end + 1)
        if count < 1 or end < 0:
            return keep
        found = _STEP.search(data[line_end + 1:comment_end])
        if found is None or int(found.group(1)) > step:
            return keep
        pos = keep = end + 1


def _end_of_log(data: bytes, step: int) -> int:
    """Byte offset after the last complete md.log line of a step ``<= step``."""
    pos = keep = 0
    while True:
        end = data.find(b"\n", pos)
        if end < 0:
            return keep
        line = data[pos:end]
        if not line.startswith(b"#"):
            fields = line.split()
            if len(fields) != 6 or not fields[0].isdigit() or int(fields[0]) > step:
                return keep
        pos = keep = end + 1


def _truncate_after(output_dir: Path, names, step: int) -> None:
    """Cut trajectories and log after ``step`` and after their last complete record."""
    for path, end in [(output_dir / f"{n}.extxyz", _end_of_frames) for n in names] + [(output_dir / LOG, _end_of_log)]:
        if path.exists():
            outputs.cut_tail(path, end(path.read_bytes(), step))


class _Files:
    """The run folder's trajectories (one per system) and log, written record by record."""

    def __init__(self, out_dir: Path, names, restart: bool):
        self.names = names
        self.paths = [out_dir / f"{n}.extxyz" for n in names] + [out_dir / LOG]
        self.trajectories = {n: outputs.RecordFile(out_dir / f"{n}.extxyz", append=restart) for n in names}
        self.log = outputs.RecordFile(out_dir / LOG, append=restart)
        if not restart:
            self.log.write("# step time_ps system temperature_K epot_eV etot_eV\n")
        self.last_frame = None

    def frames(self, state, structures, timestep_fs: float) -> None:
        import io

        import ase.io

        for name, atoms in zip(self.names, md.to_atoms(state, structures)):
            atoms.info["step"] = state.step
            atoms.info["time_fs"] = state.step * timestep_fs
            text = io.StringIO()
            ase.io.write(text, atoms, format="extxyz")
            self.trajectories[name].write(text.getvalue())
        self.last_frame = state.step

    def close(self) -> None:
        for f in list(self.trajectories.values()) + [self.log]:
            f.close()


def _check_restart(restart, state, saved, identity, integrator, potential, fresh, steps) -> None:
    """The checkpoint must come from the same integrator settings, model and inputs, and lie
    before ``steps``."""
    if integrator_to_dict(saved) != integrator_to_dict(integrator):
        raise CheckpointError(f"checkpoint {restart} was written by {saved}, not {integrator}; restart "
                              "with the same integrator settings (ensemble, thermostat, timestep, ...)")
    now = potential_identity(potential)
    if identity and now and identity != now:
        raise CheckpointError(
            f"checkpoint {restart} was written with another model or settings ({identity}) than this run "
            f"({now}); restart with the same --model, --dtype and forces, or start a new run without --restart")
    if not torch.equal(fresh.numbers, state.numbers) or not torch.equal(fresh.system, state.system):
        raise CheckpointError(f"checkpoint {restart} holds other structures than the inputs; "
                              "restart with the same input files in the same order")
    if steps <= state.step:
        raise InvalidOptionError(
            f"steps={steps} is at or below the checkpoint's step {state.step}: nothing to run. steps counts "
            f"from the start of the run; ask for more (e.g. steps={state.step + max(state.step, 100)})")


def run_md(structures: Sequence, potential, integrator, steps: int, *,
           temperature_K: Optional[md.PerSystem] = None, seed: int = 0, interval: int = 10,
           log_interval: Optional[int] = None, output_dir=None, names: Optional[Sequence[str]] = None,
           checkpoint_interval: Optional[int] = None, restart=None, progress: bool = False) -> MDRun:
    """Run ``integrator`` on ``structures`` (ASE Atoms or pymatgen Structures, one batch) until
    ``steps`` steps are done.

    ``potential`` is a :class:`~eqcalc.md.ModelPotential` (or any callable of the same shape);
    ``temperature_K`` (one value or per system) draws Maxwell–Boltzmann momenta with ``seed``
    where a structure has none; ``interval`` is the trajectory stride, ``log_interval`` the log
    stride (default ``interval``); files go to ``output_dir`` (none written if ``None``), which
    is locked against other runs while this one writes; ``restart`` a checkpoint path to
    continue from (same model, integrator and inputs; ``steps`` beyond its step).

    A system that leaves physics (:func:`eqcalc.md.check_physical`) stops the run with
    :class:`~eqcalc.errors.UnstableSimulationError`; frames written so far stay readable and the
    last checkpoint (written before the failure) stays intact.
    """
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0):
        raise InvalidOptionError(f"steps={steps!r} must be an integer >= 0")
    for name, value in (("interval", interval), ("log_interval", log_interval),
                        ("checkpoint_interval", checkpoint_interval)):
        if value is not None and not (isinstance(value, int) and value >= 1):
            raise InvalidOptionError(f"{name}={value!r} must be an integer >= 1")
    log_interval = log_interval or interval
    from eqcalc.atoms import to_ase

    structures = [to_ase(s).copy() for s in structures]
    names = _names(structures, names)
    out_dir = outputs.writable_dir(output_dir) if output_dir is not None else None
    lock = outputs.FolderLock(out_dir).acquire() if out_dir is not None else None
    try:
        return _run(structures, potential, integrator, steps, temperature_K, seed, interval, log_interval,
                    out_dir, names, checkpoint_interval, restart, progress)
    finally:
        if lock is not None:
            lock.release()


def _run(structures, potential, integrator, steps, temperature_K, seed, interval, log_interval, out_dir,
         names, checkpoint_interval, restart, progress) -> MDRun:
    device = getattr(getattr(potential, "model", None), "device", "cpu")
    species = getattr(potential, "species", None)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    identity = potential_identity(potential)

    if restart is not None:
        state, saved, rng_state, saved_identity = _load(restart, device)
        fresh = md.state_from_atoms(structures, device, species)
        _check_restart(restart, state, saved, saved_identity, integrator, potential, fresh, steps)
        generator.set_state(rng_state)
        if out_dir is not None:
            _truncate_after(out_dir, names, state.step)
    else:
        state = md.state_from_atoms(structures, device, species)
        if temperature_K is not None and not bool(state.momenta.any()):
            state = md.maxwell_boltzmann(state, temperature_K, generator, integrator.conserves_momentum)
    state = integrator.init(state, potential)

    records: Dict[str, list] = {"step": [], "temperature_K": [], "epot_eV": [], "etot_eV": [],
                                "conserved_eV": []}
    files = _Files(out_dir, names, restart is not None) if out_dir is not None else None
    checkpoint_step = state.step if restart is not None else None

    def record(state):
        if state.step % log_interval == 0:
            T = md.temperature(state)
            ekin = md.kinetic_energy(state)
            rows = torch.stack([T, state.energy, state.energy + ekin,
                                md.conserved_energy(state, integrator)]).cpu().numpy()
            records["step"].append(state.step)
            for key, row in zip(("temperature_K", "epot_eV", "etot_eV", "conserved_eV"), rows):
                records[key].append(row)
            if files is not None:
                time_ps = state.step * integrator.timestep_fs / 1000.0
                files.log.write("".join(
                    f"{state.step:8d} {time_ps:10.4f} {s:4d} {rows[0, s]:10.2f} {rows[1, s]:16.6f} "
                    f"{rows[2, s]:16.6f}\n" for s in range(state.n_systems)))
        if state.step % interval == 0 and files is not None:
            files.frames(state, structures, integrator.timestep_fs)

    from tqdm.auto import tqdm

    start, first_step = time.perf_counter(), state.step
    try:
        if restart is None:
            record(state)
        with tqdm(total=steps, initial=min(state.step, steps), disable=not progress, unit="step") as bar:
            while state.step < steps:
                state = integrator.step(state, potential, generator)
                record(state)
                if out_dir is not None and checkpoint_interval and state.step % checkpoint_interval == 0:
                    save_checkpoint(out_dir / CHECKPOINT, state, integrator, generator, identity)
                    checkpoint_step = state.step
                    potential.reset()  # the restarted run starts from a fresh list too: identical
                bar.update(1)
    except (UnstableSimulationError, InvalidAtomsError) as e:
        if isinstance(e, InvalidAtomsError):  # atoms met during the run: the simulation exploded
            s = getattr(e, "system", None)
            e = UnstableSimulationError(f"system {s} left physics at step {state.step + 1}: {str(e).split(';')[0]}",
                                        system=s, step=state.step + 1)
        where = ""
        if files is not None:
            where = (f" Trajectories in {out_dir} hold frames up to step {files.last_frame}; "
                     + (f"the checkpoint of step {checkpoint_step} is intact: restart from it with a smaller "
                        "time step." if checkpoint_step is not None else "no checkpoint was written."))
        name = names[e.system] if e.system is not None else "a system"
        raise UnstableSimulationError(f"{name}: {e}.{where}", system=e.system, step=e.step) from e
    finally:
        if files is not None:
            files.close()
    log = {k: np.asarray(v) for k, v in records.items()}
    return MDRun(state=state, log=log, files=[str(p) for p in files.paths] if files else [],
                 seconds=time.perf_counter() - start, steps_run=state.step - first_step)


def read_structures(paths: Sequence[str]) -> List:
    """Last frame of each input file (any format ASE reads; constraints kept where the format has them)."""
    import ase.io

    from eqcalc.errors import InvalidAtomsError

    out = []
    for p in paths:
        if not Path(p).is_file():
            raise InvalidAtomsError(f"input file {p!r} does not exist; give structure files ASE can read")
        try:
            out.append(ase.io.read(p))
        except Exception as e:
            raise InvalidAtomsError(f"cannot read {p!r} as a structure ({e}); use extxyz, POSCAR, cif, ...") from e
    return out


def read_pairs(paths: Sequence[str]) -> List[tuple]:
    """``INITIAL FINAL [INITIAL FINAL ...]`` files → ``[(initial, final), ...]`` Atoms."""
    if len(paths) % 2:
        raise InvalidOptionError(f"got {len(paths)} structure files; give them in pairs: INITIAL FINAL "
                                 "[INITIAL FINAL ...]")
    structures = read_structures(paths)
    return list(zip(structures[0::2], structures[1::2]))


def unique_names(paths: Sequence[str]) -> List[str]:
    """File stems, made unique with their index where two inputs share a stem."""
    stems = [Path(p).stem for p in paths]
    return [s if stems.count(s) == 1 else f"{s}_{k}" for k, s in enumerate(stems)]


# ----------------------------------------------------------------------------------------------
# command line shells (eqcalc md / eqcalc relax)
# ----------------------------------------------------------------------------------------------
def add_model_arguments(parser) -> None:
    parser.add_argument("--model", default="default", help="shipped model name or .eqm path (default: default)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--compile", default="eager", help="eager | torchscript | aoti | auto")
    parser.add_argument("--dtype", choices=["float32", "float64"], default=None, help="default: the model's own")


def add_md_arguments(parser) -> None:
    """Options of ``eqcalc md``."""
    from eqcalc.cli import nonnegative_float, nonnegative_int, positive_float, positive_int

    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="structure files (extxyz, POSCAR, ...), run as one batch")
    add_model_arguments(parser)
    parser.add_argument("--ensemble", choices=["nve", "nvt"], default="nvt")
    parser.add_argument("--thermostat", default="langevin", help="langevin | bussi | nose-hoover (NVT)")
    parser.add_argument("--temperature-K", type=positive_float, default=300.0,
                        help="NVT target and initial Maxwell-Boltzmann temperature, K")
    parser.add_argument("--timestep-fs", type=positive_float, default=1.0, help="time step, fs")
    parser.add_argument("--steps", type=nonnegative_int, default=1000, help="number of steps")
    parser.add_argument("--interval", type=positive_int, default=10, help="write a frame every K steps")
    parser.add_argument("--friction-per-fs", type=positive_float, default=0.01, help="Langevin friction, 1/fs")
    parser.add_argument("--tau-fs", type=positive_float, default=100.0, help="Bussi / Nose-Hoover time constant, fs")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="seed of initial velocities and noise")
    parser.add_argument("--checkpoint-interval", type=positive_int, default=None, help="write checkpoint.pt every K steps")
    parser.add_argument("--restart", default=None, help="continue from this checkpoint.pt")
    parser.add_argument("--skin", type=nonnegative_float, default=0.5, help="neighbor-list skin, Å")
    parser.add_argument("--output-dir", default="eqcalc-md", help="folder for trajectories, md.log, checkpoint.pt")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    _screening().add_arguments(parser)


def _screening():
    """The screening module (--scheduler, --db: many inputs on a Dask cluster, results in a
    database); importing it imports no dask."""
    from eqcalc.workflows import distributed

    return distributed


def md_main(args) -> int:
    if _screening().requested(args):
        return _screening().md_main(args)
    integrator = md.make_integrator(args.ensemble, args.timestep_fs, args.thermostat, args.temperature_K,
                                    args.friction_per_fs, args.tau_fs)
    structures = read_structures(args.inputs)
    outputs.writable_dir(args.output_dir)  # before loading and compiling the model
    potential = md.ModelPotential(args.model, device=_device(args.device), compile=args.compile,
                                  dtype=args.dtype, skin=args.skin)
    run = run_md(structures, potential, integrator, args.steps, temperature_K=args.temperature_K,
                 seed=args.seed, interval=args.interval, output_dir=args.output_dir,
                 names=unique_names(args.inputs), checkpoint_interval=args.checkpoint_interval,
                 restart=args.restart, progress=not args.no_progress)
    n_atoms = len(run.state.system)
    print(f"{args.ensemble.upper()} {run.steps_run} steps of {args.timestep_fs} fs (now at step {run.state.step}), "
          f"{len(structures)} systems ({n_atoms} atoms) in {run.seconds:.1f} s "
          f"({n_atoms * run.steps_run / max(run.seconds, 1e-9):.0f} atom-steps/s)")
    last = {k: v[-1] for k, v in run.log.items() if k != "step"}
    for s, name in enumerate(unique_names(args.inputs)):
        print(f"  {name:20s} T {last['temperature_K'][s]:8.1f} K  E_pot {last['epot_eV'][s]:12.4f} eV  "
              f"E_tot {last['etot_eV'][s]:12.4f} eV")
    print(f"wrote {', '.join(run.files)}")
    return 0


def _device(device: str) -> str:
    from eqcalc.model import resolve_device

    return str(resolve_device(device))


def add_relax_arguments(parser) -> None:
    """Options of ``eqcalc relax``."""
    from eqcalc.cli import nonnegative_int, positive_float

    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="structure files, relaxed as one batch")
    add_model_arguments(parser)
    parser.add_argument("--fmax", type=positive_float, default=0.05, help="force threshold per system, eV/Å")
    parser.add_argument("--max-steps", type=nonnegative_int, default=500, help="optimizer steps at most")
    parser.add_argument("--cell", action="store_true", help="also relax the cell of fully periodic (bulk) systems")
    parser.add_argument("--optimizer", default="fire", help="fire | lbfgs (ASE's algorithms, batched)")
    parser.add_argument("--output-dir", default="eqcalc-relax", help="folder for the relaxed structures")
    _screening().add_arguments(parser)


def relax_main(args) -> int:
    from eqcalc.engine.relax import relax

    if _screening().requested(args):
        return _screening().relax_main(args)
    structures = read_structures(args.inputs)
    out = outputs.writable_dir(args.output_dir)  # before the relaxation, not after it
    potential = md.ModelPotential(args.model, device=_device(args.device), compile=args.compile,
                                  dtype=args.dtype, skin=0.5)
    result = relax(structures, potential, fmax=args.fmax, max_steps=args.max_steps, cell=args.cell,
                   optimizer=args.optimizer)
    for name, atoms, ok, n, f in zip(unique_names(args.inputs), result.structures, result.converged,
                                     result.steps, result.fmax):
        path = out / f"{name}.extxyz"
        outputs.write_atoms(path, atoms)
        print(f"  {name:20s} E {atoms.get_potential_energy():12.4f} eV  fmax {f:.4f} eV/Å  {n:4d} steps  "
              f"{'converged' if ok else 'NOT converged'} -> {path}")
    print(f"relaxed {len(structures)} systems as one batch ({args.optimizer}) in {result.seconds:.1f} s")
    return 0 if all(result.converged) else 1


# ----------------------------------------------------------------------------------------------
# eqcalc neb
# ----------------------------------------------------------------------------------------------
def add_neb_arguments(parser) -> None:
    """Options of ``eqcalc neb``."""
    import argparse

    from eqcalc.cli import nonnegative_float, nonnegative_int, positive_float

    parser.add_argument("inputs", nargs="+", metavar="INITIAL FINAL",
                        help="end points in pairs (extxyz, POSCAR, ...): INITIAL FINAL [INITIAL FINAL ...]; "
                             "all bands run as one batch")
    add_model_arguments(parser)
    parser.add_argument("--images", type=int, default=7, help="images per band, end points included (>= 3)")
    parser.add_argument("--climb", action=argparse.BooleanOptionalAction, default=True,
                        help="climbing image (default: on)")
    parser.add_argument("--fmax", type=positive_float, default=0.03,
                        help="force threshold on the band and end points, eV/Å")
    parser.add_argument("--k", type=positive_float, default=0.1, help="spring constant, eV/Å²")
    parser.add_argument("--interpolation", default="idpp", help="idpp | linear (minimum image on periodic cells)")
    parser.add_argument("--optimizer", default="fire", help="fire | lbfgs (per band, as ASE's)")
    parser.add_argument("--max-steps", type=nonnegative_int, default=1000, help="optimizer steps at most")
    parser.add_argument("--no-relax-endpoints", action="store_true", help="use the end points as given")
    parser.add_argument("--no-saddle-check", action="store_true",
                        help="skip counting imaginary modes at the climbing images (autograd Hessian of the "
                             "free atoms; a band whose climbing image is not a first-order saddle makes the "
                             "exit code 1, like a band that did not converge)")
    parser.add_argument("--skin", type=nonnegative_float, default=0.5, help="neighbor-list skin, Å")
    parser.add_argument("--output-dir", default="eqcalc-neb", help="folder for bands, barriers.csv and profiles")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    _screening().add_arguments(parser)


def write_band(result, name: str, output_dir) -> List[str]:
    """``NAME.extxyz`` (the band: energies, forces, FixAtoms) and ``NAME.png`` (energy profile
    along the path length), each written atomically. Returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r, out = result, Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.extxyz"
    outputs.write_atoms(path, r.images)
    s = np.concatenate([[0.0], np.cumsum([np.linalg.norm(b.positions - a.positions)
                                          for a, b in zip(r.images, r.images[1:])])])
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot(s, r.energies - r.energies[0], "o-")
    ax.plot(s[r.climbing_image], r.barrier, "r*", ms=12,
            label="climbing image" if r.images[r.climbing_image].info.get("climbing") else "highest image")
    ax.set_xlabel("path length (Å)")
    ax.set_ylabel("E - E(initial) (eV)")
    ax.set_title(f"{name}: barrier {r.barrier:.3f} eV, ΔE {r.reaction_energy:.3f} eV"
                 + ("" if r.converged else " (NOT converged)"), fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    png = out / f"{name}.png"
    outputs.replace_atomically(png, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return [str(path), str(png)]


def write_barriers(results, names: Sequence[str], output_dir) -> str:
    """``barriers.csv``: one row per reaction (barrier, reaction energy, convergence, steps,
    final fmax, climbing image, saddle check), written atomically. Returns its path."""
    import csv
    import io

    rows = [dict(reaction=name, barrier_eV=f"{r.barrier:.6f}", reaction_energy_eV=f"{r.reaction_energy:.6f}",
                 converged=r.converged, endpoints_converged=r.endpoints_converged, steps=r.steps,
                 fmax_eV_per_A=f"{r.fmax:.4f}", climbing_image=r.climbing_image,
                 imaginary_modes="" if r.imaginary_modes is None else r.imaginary_modes,
                 reaction_mode_cm1="" if r.reaction_mode_cm1 is None else f"{r.reaction_mode_cm1:.1f}",
                 tangent_overlap="" if r.tangent_overlap is None else f"{r.tangent_overlap:.3f}",
                 saddle_check=r.saddle_check)
            for name, r in zip(names, results)]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    path = Path(output_dir) / "barriers.csv"
    outputs.replace_atomically(path, lambda f: f.write(buffer.getvalue().encode()))
    return str(path)


def neb_main(args) -> int:
    from eqcalc.engine.neb import neb

    if _screening().requested(args):
        return _screening().neb_main(args)
    pairs = read_pairs(args.inputs)
    outputs.writable_dir(args.output_dir)  # before the work, not after it
    stems = unique_names(args.inputs)
    names = unique_names([f"{a}-{b}" for a, b in zip(stems[0::2], stems[1::2])])
    potential = md.ModelPotential(args.model, device=_device(args.device), compile=args.compile,
                                  dtype=args.dtype, skin=args.skin)
    start = time.perf_counter()
    results = neb(pairs, potential, n_images=args.images, climb=args.climb, fmax=args.fmax, k=args.k,
                  interpolation=args.interpolation, optimizer=args.optimizer, max_steps=args.max_steps,
                  relax_endpoints=not args.no_relax_endpoints, check_saddles=not args.no_saddle_check,
                  output_dir=args.output_dir, names=names, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    files = [str(Path(args.output_dir) / n) for name in names for n in (f"{name}.extxyz", f"{name}.png")]
    files = [str(Path(args.output_dir) / "barriers.csv")] + files
    print(f"{'reaction':30s} {'barrier/eV':>10s} {'dE/eV':>8s} {'steps':>6s} {'fmax':>7s}  status")
    for name, r in zip(names, results):
        status = "converged" if r.converged else ("NOT converged" + ("" if r.endpoints_converged else
                                                                     " (end points not relaxed)"))
        print(f"{name:30s} {r.barrier:10.4f} {r.reaction_energy:8.4f} {r.steps:6d} {r.fmax:7.4f}  {status}; "
              f"saddle {r.saddle_check}")
    print(f"{len(results)} bands x {args.images} images in {seconds:.1f} s; wrote {', '.join(files[:3])}"
          f"{' ...' if len(files) > 3 else ''}")
    failed_saddles = [r for r in results if r.imaginary_modes is not None and not r.saddle_verified]
    return 0 if all(r.converged for r in results) and not failed_saddles else 1
