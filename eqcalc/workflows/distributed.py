"""Screening beyond one machine: relax, adsorption, MD and NEB jobs on a Dask cluster, results in
an ASE database.

::

    client: one Job per input (name, structure, skip key)  ── minus the keys the database holds done
            batches by atom count  ──►  workers: run_batch(kind, model, batch)
                                          the model is loaded once per worker process and kept
                                          (keyed by weights sha256, device, dtype, compile form);
                                          the batched engine; plain results back (numbers, Atoms)
            ◄──  one Outcome per input  ──  one database row per input, a batch's rows in one transaction

* The row's ``job_key`` is the sha256 of the job kind, its settings, the model's weights hash and
  dtype, and the input (numbers, positions, cell, pbc, constraints, momenta). A rerun skips the keys
  the database holds as done (an identical input under a new name gets a copy of the done row) and
  retries the failed ones, overwriting their rows.
* A worker that dies takes no result with it: the scheduler runs its batch elsewhere (up to
  ``distributed.scheduler.allowed-failures`` times, 3 by default); a batch that keeps killing
  workers is split in halves until the input that does it stands alone; run again at the end with
  nothing else in flight (a death also counts against innocent inputs waiting on the same worker),
  an input whose workers still die is recorded as failed.
* An input that raises is recorded with its error and stops nothing else: each input is checked
  alone before its batch runs, and a batch that fails as a whole (a system that explodes, a device
  out of memory) is split in halves on the worker until the failing input is isolated.
* Ctrl-C leaves the database consistent: the rows of a batch are written in one transaction
  (committed together or not at all), and a rerun resumes.
* Only the client writes to the database. Workers need eqcalc and read access to the model file
  (a shared filesystem, as on any SLURM/PBS cluster); the weights hash is checked on each worker.

Without a client (``client=None``) the same batches run in this process one after the other:
``eqcalc relax --db results.db`` on one machine gives the same rows and the same resume. dask is
imported only when a client is given (``--scheduler``).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, ClassVar, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from eqcalc.errors import EqcalcError, InvalidOptionError, MissingDependencyError, ModelFileError, check_choice

CPU_BATCH_ATOMS = 512        # atoms per batch on a CPU worker: enough to amortise per-step overhead
GPU_BATCH_ATOMS_PER_GIB = 512  # atoms per GiB of GPU memory; an out-of-memory batch is split anyway
WORKER_WAIT_S = 600.0        # how long to wait for the first worker to join the scheduler

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# the model, as each worker loads and keeps it
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelRef:
    """A model as workers load it: the package ``path`` (absolute; workers must be able to read
    it), the ``sha256`` of its weights (checked on each worker), the ``name`` the user gave,
    ``dtype`` (the model's own unless given), ``device`` (resolved on each worker: ``"auto"``
    takes its GPU), the ``compile`` form and the neighbor-list ``skin`` (Å)."""

    path: str
    sha256: str
    name: str
    dtype: str
    device: str = "auto"
    compile: str = "eager"
    skin: float = 0.5

    @classmethod
    def of(cls, model="default", device: str = "auto", compile: str = "eager", dtype=None,
           skin: float = 0.5) -> "ModelRef":
        """Resolve a shipped name or a ``.eqm`` path here on the client and read its weights hash."""
        from eqcalc import package

        if dtype is not None:
            check_choice("dtype", dtype, ("float32", "float64"))
        path = os.path.abspath(package.resolve(model))
        meta = package.read(path).metadata
        return cls(path=path, sha256=meta["weights_sha256"], name=str(model), dtype=dtype or meta["dtype"],
                   device=device, compile=compile, skin=skin)


_MODELS: Dict[tuple, object] = {}  # this process's loaded models (a worker keeps them for its life)
_MODELS_LOCK = threading.Lock()


def load_model(ref: ModelRef):
    """The :class:`~eqcalc.model.Model` for ``ref`` in this process: loaded (and compiled) on first
    use, then kept. Raises :class:`ModelFileError` if this machine's file holds other weights."""
    from eqcalc import package
    from eqcalc.model import Model

    key = (ref.sha256, ref.device, ref.compile, ref.dtype)
    with _MODELS_LOCK:
        if key not in _MODELS:
            path = ref.path if os.path.exists(ref.path) else package.resolve(ref.name)  # shipped name
            try:
                model = Model(path, device=ref.device, compile=ref.compile, dtype=ref.dtype)
            except ModelFileError as e:
                raise ModelFileError(f"on worker {_worker_name()}: {e}; workers must be able to read the "
                                     "model file (put it on a shared filesystem)") from e
            if model.metadata["weights_sha256"] != ref.sha256:
                raise ModelFileError(
                    f"{path} on worker {_worker_name()} holds other weights (sha256 "
                    f"{model.metadata['weights_sha256'][:12]}…) than the client's {ref.path} "
                    f"({ref.sha256[:12]}…); give the workers the same file (a shared filesystem)")
            _MODELS[key] = model
        return _MODELS[key]


def device_batch_atoms(device: str) -> int:
    """Atoms per batch for this process's ``device``: :data:`CPU_BATCH_ATOMS` on a CPU,
    :data:`GPU_BATCH_ATOMS_PER_GIB` per GiB of memory on a GPU."""
    from eqcalc.model import resolve_device

    d = resolve_device(device)
    if d.type == "cuda":
        import torch

        return int(GPU_BATCH_ATOMS_PER_GIB * torch.cuda.get_device_properties(d).total_memory / 2 ** 30)
    return CPU_BATCH_ATOMS


# Dask starts its workers with MALLOC_TRIM_THRESHOLD_=65536, and any explicit trim threshold also pins
# glibc's mmap threshold at 128 KiB: every tensor buffer becomes a fresh mmap and page faults, and a
# CPU worker runs the model about 2x slower (benchmarks/bench_distributed.py). Workers started with
# this environment keep Dask's intent (memory handed back) at large sizes and run at full speed.
WORKER_ENV = {"MALLOC_TRIM_THRESHOLD_": "134217728", "MALLOC_MMAP_THRESHOLD_": "67108864"}


def probe_worker(device: str) -> Dict:
    """Run on each worker: its ``batch_atoms`` for ``device`` and whether its allocator is pinned
    (``MALLOC_TRIM_THRESHOLD_`` without ``MALLOC_MMAP_THRESHOLD_``; see :data:`WORKER_ENV`)."""
    return {"batch_atoms": device_batch_atoms(device),
            "pinned_malloc": "MALLOC_TRIM_THRESHOLD_" in os.environ and "MALLOC_MMAP_THRESHOLD_" not in os.environ}


def _worker_name() -> str:
    if "distributed" in sys.modules:  # never import dask just to ask
        from distributed import get_worker

        try:
            return get_worker().address
        except ValueError:  # not inside a worker
            pass
    return "local"


# ----------------------------------------------------------------------------------------------
# job kinds: what a worker does with a batch
# ----------------------------------------------------------------------------------------------
def _check_positive(name: str, value, unit: str) -> None:
    if not (isinstance(value, (int, float)) and np.isfinite(value) and value > 0):
        raise InvalidOptionError(f"{name}={value!r} must be a finite number > 0 ({unit})")


def _check_count(name: str, value, minimum: int = 0) -> None:
    if not (isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= minimum):
        raise InvalidOptionError(f"{name}={value!r} must be an integer >= {minimum}")


class _OneStructure:
    """A job kind whose input is one Atoms: it costs its atom count."""

    def structures(self, item) -> list:
        return [item]

    def cost(self, item) -> int:
        return len(item)


@dataclass(frozen=True)
class Relax(_OneStructure):
    """Relax each input with :func:`eqcalc.relax.relax` (batched FIRE / L-BFGS). Row values:
    ``converged``, ``steps`` and ``relax_fmax`` (eV/Å; generalised with ``cell``)."""

    fmax: float = 0.05
    max_steps: int = 500
    cell: bool = False
    optimizer: str = "fire"
    name: ClassVar[str] = "relax"

    def __post_init__(self):  # here on the client, not once per input on the workers
        from eqcalc.engine.relax import check_fmax, make_optimizer

        check_fmax(self.fmax)
        _check_count("max_steps", self.max_steps)
        make_optimizer(self.optimizer)

    def settings(self) -> Dict:
        return asdict(self)

    def run(self, items, potential, keys) -> Tuple[list, int]:
        """``[(atoms, values, data)]`` per item and the batch's atom-steps (Σ atoms × (steps + 1):
        the model evaluations each system needed)."""
        from eqcalc.engine.relax import relax

        r = relax(items, potential, fmax=self.fmax, max_steps=self.max_steps, cell=self.cell,
                  optimizer=self.optimizer)
        results = [(atoms, {"converged": bool(c), "steps": int(s), "relax_fmax": float(f)}, {})
                   for atoms, c, s, f in zip(r.structures, r.converged, r.steps, r.fmax)]
        return results, sum(len(a) * (s + 1) for a, s in zip(items, r.steps))


@dataclass(frozen=True)
class Adsorption(Relax):
    """The relaxations of an adsorption screening (placements, clean slabs, gas molecules): as
    :class:`Relax`, under their own kind so their rows and keys stay apart from plain relaxations."""

    name: ClassVar[str] = "adsorption"


@dataclass(frozen=True)
class MD(_OneStructure):
    """``steps`` of ``integrator`` (an :mod:`eqcalc.md` integrator) on each input with
    :func:`eqcalc.drivers.run_md`. Row: the last frame (positions, momenta, energy, forces) and
    ``temperature_K``, ``epot_eV``, ``etot_eV`` at the end; row data: the log every
    ``log_interval`` steps (``step``, ``temperature_K``, ``epot_eV``, ``etot_eV``).

    As in one ``eqcalc md`` batch, initial momenta at ``temperature_K`` are drawn only if no
    input of the batch has momenta, and thermostat noise comes from one generator per batch; its
    seed is derived from ``seed`` and the batch's inputs, so a rerun of the same batch is
    identical. NVE from given momenta does not depend on how inputs are batched."""

    integrator: object
    steps: int
    temperature_K: Optional[float] = None
    seed: int = 0
    log_interval: int = 10
    name: ClassVar[str] = "md"

    def __post_init__(self):
        _check_count("steps", self.steps)
        _check_count("log_interval", self.log_interval, 1)
        if self.temperature_K is not None:
            _check_positive("temperature_K", self.temperature_K, "K")

    def settings(self) -> Dict:
        from eqcalc.engine.drivers import integrator_to_dict

        return {"integrator": integrator_to_dict(self.integrator), "steps": self.steps,
                "temperature_K": self.temperature_K, "seed": self.seed, "log_interval": self.log_interval}

    def run(self, items, potential, keys) -> Tuple[list, int]:
        from eqcalc.engine import md
        from eqcalc.engine.drivers import run_md

        seed = int(hashlib.sha256(f"{self.seed}:{','.join(keys)}".encode()).hexdigest()[:15], 16)
        run = run_md(items, potential, self.integrator, self.steps, temperature_K=self.temperature_K,
                     seed=seed, interval=self.log_interval)
        log = run.log
        results = []
        for s, atoms in enumerate(md.to_atoms(run.state, items)):
            series = {k: np.asarray(log[k][:, s]) for k in ("temperature_K", "epot_eV", "etot_eV")}
            values = {k: float(v[-1]) for k, v in series.items()}
            results.append((atoms, values, {"step": np.asarray(log["step"]), **series}))
        return results, len(run.state.system) * run.steps_run


@dataclass(frozen=True)
class NEB:
    """Nudged elastic band of each ``(initial, final)`` pair with :func:`eqcalc.neb.neb` (all bands
    of a batch together). Row: the climbing image (the saddle estimate, with energy and forces),
    ``barrier_eV``, ``reaction_energy_eV``, ``converged``, ``steps``, ``neb_fmax``,
    ``climbing_image``, ``imaginary_modes`` (absent if not checked), ``saddle_verified`` and
    ``saddle_check``; row data: ``energies`` ``(n_images,)`` eV and ``positions``
    ``(n_images, n_atoms, 3)`` Å of the band."""

    n_images: int = 7
    climb: bool = True
    fmax: float = 0.03
    interpolation: str = "idpp"
    k: float = 0.1
    optimizer: str = "fire"
    max_steps: int = 1000
    relax_endpoints: bool = True
    check_saddles: bool = True
    name: ClassVar[str] = "neb"

    def __post_init__(self):
        from eqcalc.engine.neb import INTERPOLATIONS
        from eqcalc.engine.relax import check_fmax, make_optimizer

        check_fmax(self.fmax)
        _check_positive("k", self.k, "eV/Å², e.g. 0.1")
        _check_count("n_images", self.n_images, 3)
        _check_count("max_steps", self.max_steps)
        check_choice("interpolation", self.interpolation, INTERPOLATIONS)
        make_optimizer(self.optimizer)

    def settings(self) -> Dict:
        return asdict(self)

    def structures(self, item) -> list:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise InvalidOptionError(f"a NEB input is an (initial, final) pair of Atoms, not {type(item).__name__}")
        return list(item)

    def cost(self, item) -> int:
        return len(item[0]) * self.n_images

    def run(self, items, potential, keys) -> Tuple[list, int]:
        from eqcalc.engine.neb import neb

        bands = neb(items, potential, n_images=self.n_images, climb=self.climb, fmax=self.fmax,
                    interpolation=self.interpolation, k=self.k, optimizer=self.optimizer,
                    max_steps=self.max_steps, relax_endpoints=self.relax_endpoints,
                    check_saddles=self.check_saddles)
        results = []
        for band in bands:
            values = {"barrier_eV": band.barrier, "reaction_energy_eV": band.reaction_energy,
                      "converged": bool(band.converged), "steps": int(band.steps), "neb_fmax": float(band.fmax),
                      "climbing_image": int(band.climbing_image), "imaginary_modes": band.imaginary_modes,
                      "saddle_verified": band.saddle_verified, "saddle_check": band.saddle_check}
            data = {"energies": np.asarray(band.energies),
                    "positions": np.stack([image.positions for image in band.images])}
            results.append((band.images[band.climbing_image], values, data))
        interior = self.n_images - 2
        return results, sum(len(pair[0]) * interior * (band.steps + 1) for pair, band in zip(items, bands))


# ----------------------------------------------------------------------------------------------
# jobs, outcomes and their keys
# ----------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One input on the client: ``item`` (an Atoms), its ``name`` (the file name), the skip
    ``key`` (filled by :func:`screen`), extra row ``values``, and for rows built from other rows
    (adsorption energies) the keys it ``needs`` and ``finish(outcome, {key: outcome}) -> values``.
    ``error`` set: the input failed before it could run (recorded, never sent)."""

    name: str
    item: object
    key: str = ""
    values: Dict = field(default_factory=dict)
    needs: Tuple[str, ...] = ()
    finish: Optional[Callable] = None
    error: str = ""


@dataclass
class Outcome:
    """One input's result as plain data: ``status`` ``"done"`` or ``"failed"``; ``atoms`` the
    result (single-point calculator: energy eV, forces eV/Å, stress eV/Å³ for bulk) or, failed,
    the input; row ``values``; ``data`` (arrays, e.g. the MD log); ``error`` text; the ``worker``,
    ``wall_s`` and ``batch_size`` of the (sub-)batch it ran in; ``skipped``: read back from the
    database instead of computed."""

    key: str
    status: str
    atoms: object = None
    values: Dict = field(default_factory=dict)
    data: Dict = field(default_factory=dict)
    error: str = ""
    worker: str = ""
    wall_s: float = 0.0
    batch_size: int = 0
    skipped: bool = False

    @property
    def energy(self) -> Optional[float]:
        """Energy of the result, eV (``None`` if failed)."""
        if self.status != "done" or self.atoms is None or self.atoms.calc is None:
            return None
        return float(self.atoms.get_potential_energy())


def structure_hash(atoms) -> str:
    """sha256 of what defines a structure as input: numbers, positions, cell, pbc, constraints,
    momenta (exact float64 bytes)."""
    h = hashlib.sha256()
    for a in (atoms.numbers.astype(np.int64), atoms.positions.astype(np.float64),
              atoms.cell.array.astype(np.float64), atoms.pbc.astype(bool), atoms.get_momenta().astype(np.float64)):
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(json.dumps([c.todict() for c in atoms.constraints], sort_keys=True, default=str).encode())
    return h.hexdigest()


def job_key(kind, ref: ModelRef, item, extra: str = "") -> str:
    """The rerun-skip key of ``item`` under ``kind`` with ``ref``'s model (weights and dtype)."""
    spec = {"kind": kind.name, "settings": kind.settings(), "model": ref.sha256, "dtype": ref.dtype,
            "input": [structure_hash(a) for a in kind.structures(item)], "extra": extra}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def _failed(key: str, item, error: str, tb: str = "", worker: str = "") -> Outcome:
    atoms = item[0] if isinstance(item, tuple) else item
    return Outcome(key=key, status="failed", atoms=atoms.copy(), error=error,
                   data={"traceback": tb} if tb else {}, worker=worker)


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


# ----------------------------------------------------------------------------------------------
# worker side
# ----------------------------------------------------------------------------------------------
def run_batch(kind, ref: ModelRef, batch: List[Tuple[str, object]]) -> Tuple[List[Outcome], Dict]:
    """Run ``batch`` ``[(key, item)]`` where this is called (a Dask worker or the client):
    one :class:`Outcome` per item, in order, and the batch's stats (``worker``, ``seconds``,
    ``atom_steps``). A model that cannot be loaded raises: that is the run's fault, not an input's."""
    from eqcalc.atoms import to_ase, validate
    from eqcalc.engine.md import fixed_mask

    start = time.perf_counter()
    model = load_model(ref)
    worker = _worker_name()
    out: Dict[str, Outcome] = {}
    good = []
    for key, item in batch:
        try:  # one bad input must not fail its whole batch
            for atoms in kind.structures(item):
                validate(to_ase(atoms), model.species)
                fixed_mask(atoms)
            good.append((key, item))
        except Exception as e:  # noqa: BLE001 - any error of an input is recorded with it
            out[key] = _failed(key, item, _describe(e), traceback.format_exc(), worker)
    atom_steps = _run_split(kind, model, ref, good, out, worker)
    return [out[key] for key, _ in batch], {"worker": worker, "seconds": time.perf_counter() - start,
                                            "atom_steps": atom_steps}


def _run_split(kind, model, ref: ModelRef, batch, out: Dict[str, Outcome], worker: str) -> int:
    """Run ``batch``; if it fails as a whole, run its halves, down to the one input that fails."""
    from eqcalc.engine.md import ModelPotential

    if not batch:
        return 0
    start = time.perf_counter()
    try:
        results, atom_steps = kind.run([item for _, item in batch], ModelPotential(model, skin=ref.skin),
                                       [key for key, _ in batch])
    except Exception as e:  # noqa: BLE001
        if len(batch) == 1:
            key, item = batch[0]
            out[key] = _failed(key, item, _describe(e), traceback.format_exc(), worker)
            return 0
        half = len(batch) // 2
        return (_run_split(kind, model, ref, batch[:half], out, worker)
                + _run_split(kind, model, ref, batch[half:], out, worker))
    wall = time.perf_counter() - start
    for (key, _), (atoms, values, data) in zip(batch, results):
        out[key] = Outcome(key=key, status="done", atoms=atoms, values=values, data=data, worker=worker,
                           wall_s=wall, batch_size=len(batch))
    return atom_steps


# ----------------------------------------------------------------------------------------------
# client side: batches, dispatch, the database
# ----------------------------------------------------------------------------------------------
def make_batches(payload: Sequence[Tuple[str, object]], costs: Sequence[int], max_atoms: int) -> List[list]:
    """Consecutive items in batches of at most ``max_atoms`` atoms (an item larger than that
    gets a batch of its own)."""
    batches, current, size = [], [], 0
    for entry, cost in zip(payload, costs):
        if current and size + cost > max_atoms:
            batches.append(current)
            current, size = [], 0
        current.append(entry)
        size += cost
    if current:
        batches.append(current)
    return batches


def _batch_atoms(client, ref: ModelRef, costs: Sequence[int]) -> int:
    """Atoms per batch: the smallest worker device's capacity, and on a cluster no more than an
    even share of the work over twice the workers (so every worker gets some)."""
    if client is None:
        return device_batch_atoms(ref.device)
    try:
        client.wait_for_workers(1, timeout=WORKER_WAIT_S)
    except TimeoutError as e:
        raise InvalidOptionError(f"no worker joined the scheduler {client.scheduler.address} within "
                                 f"{WORKER_WAIT_S:.0f} s; start workers (dask worker ADDRESS)") from e
    probes = client.run(probe_worker, ref.device)
    pinned = sum(p["pinned_malloc"] for p in probes.values())
    if pinned:
        log.warning("%d of %d workers run with Dask's MALLOC_TRIM_THRESHOLD_ and no MALLOC_MMAP_THRESHOLD_: "
                    "every tensor is a fresh mmap and a model on CPU runs about 2x slower; start workers with %s",
                    pinned, len(probes), " ".join(f"{k}={v}" for k, v in WORKER_ENV.items()))
    share = math.ceil(sum(costs) / (2 * len(probes)))
    return max(1, min(min(p["batch_atoms"] for p in probes.values()), share))


def _in_process(kind, ref: ModelRef, batches) -> Iterator[Tuple[List[Outcome], Dict]]:
    for batch in batches:
        yield run_batch(kind, ref, batch)


def _on_cluster(client, kind, ref: ModelRef, batches) -> Iterator[Tuple[List[Outcome], Dict]]:
    """Batches through the client's workers, results as they finish. A batch whose workers kept
    dying (``KilledWorker``) is split in halves. A single input that gets ``KilledWorker`` is only
    a suspect: the scheduler also counts a death against every task waiting on the dead worker, so
    an innocent input that shared a worker with a crashing one can be blamed too. Suspects run again
    at the end, one at a time with nothing else in flight; one whose workers still die is recorded
    failed."""
    from distributed import KilledWorker, as_completed

    pending = {}
    suspects = []

    def submit(batch):
        future = client.submit(run_batch, kind, ref, batch, pure=False)
        pending[future] = batch
        return future

    def killed(batch):
        key, item = batch[0]
        return ([_failed(key, item, "KilledWorker: every worker that ran this input alone died "
                                    "(it crashes the process or exhausts its memory)")],
                {"worker": "", "seconds": 0.0, "atom_steps": 0})

    queue = as_completed([submit(b) for b in batches])
    try:
        for future in queue:
            batch = pending.pop(future)
            try:
                result = future.result()
            except KilledWorker:
                if len(batch) > 1:
                    half = len(batch) // 2
                    queue.update([submit(batch[:half]), submit(batch[half:])])
                else:
                    suspects.append(batch)
                continue
            finally:
                future.release()
            yield result
        for batch in suspects:
            future = submit(batch)
            try:
                result = future.result()
            except KilledWorker:
                result = killed(batch)
            finally:
                pending.pop(future, None)
                future.release()
            yield result
    finally:
        if pending:  # Ctrl-C or an error: nothing keeps running for nobody
            client.cancel(list(pending))


@dataclass
class _Row:
    """What the client keeps of a database row."""

    id: int
    name: str
    status: str


class ResultsDB:
    """The run's ASE database (``ase.db.connect(url)``: a file name is SQLite, ``postgresql://``
    a server), written only by the client, one row per input. Rows are written in transactions
    (:meth:`transaction`: the rows of one batch together, a commit costs ~40 ms on this disk)."""

    STANDARD = ("name", "kind", "status", "job_key", "model", "model_sha256", "dtype", "wall_s", "worker",
                "batch_size", "error")

    def __init__(self, url: str):
        import ase.db

        if "://" not in str(url):
            Path(url).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = ase.db.connect(str(url))
            self.rows: Dict[str, List[_Row]] = {}  # job_key -> its rows
            for row in self.db.select(include_data=False):
                if "job_key" in row:
                    self.rows.setdefault(row.job_key, []).append(_Row(row.id, row.get("name", ""),
                                                                      row.get("status", "")))
        except Exception as e:  # noqa: BLE001 - sqlite3, psycopg2, json errors alike
            raise InvalidOptionError(f"--db {url!r}: cannot open it as an ASE database ({_describe(e)}); give "
                                     "a file name (results.db: SQLite) or a URL ase.db accepts "
                                     "(postgresql://user:password@host:5432/name)") from e
        self.url = str(url)

    def transaction(self):
        """``with db.transaction():`` every row written inside commits together or not at all."""
        return self.db

    def done(self, key: str, name: Optional[str] = None) -> Optional[_Row]:
        """The done row of ``key`` (with that ``name`` if given), or ``None``."""
        return next((r for r in self.rows.get(key, []) if r.status == "done"
                     and (name is None or r.name == name)), None)

    def outcome(self, row: _Row) -> Outcome:
        """A done row read back as an :class:`Outcome` (``skipped``)."""
        full = self.db.get(id=row.id)
        values = {k: v for k, v in full.key_value_pairs.items() if k not in self.STANDARD}
        return Outcome(key=full.job_key, status="done", atoms=full.toatoms(), values=values, data=dict(full.data),
                       worker=full.get("worker", ""), wall_s=full.get("wall_s", 0.0),
                       batch_size=full.get("batch_size", 0), skipped=True)

    def write(self, job: Job, outcome: Outcome, kind, ref: ModelRef) -> int:
        """Write (or, for an input that failed before, overwrite) the row of ``job``."""
        kvp = {"name": job.name, "kind": kind.name, "status": outcome.status, "job_key": job.key,
               "model": ref.name, "model_sha256": ref.sha256, "dtype": ref.dtype, "wall_s": float(outcome.wall_s),
               "worker": outcome.worker, "batch_size": int(outcome.batch_size), **job.values, **outcome.values}
        if outcome.error:
            kvp["error"] = outcome.error
        kvp = {k: _plain(v) for k, v in kvp.items() if v is not None}
        old = next((r for r in self.rows.get(job.key, []) if r.name == job.name), None)
        row_id = self.db.write(outcome.atoms, key_value_pairs=kvp, data=outcome.data,
                               id=None if old is None else old.id)
        self.rows[job.key] = [r for r in self.rows.get(job.key, []) if r is not old] + [
            _Row(row_id, job.name, outcome.status)]
        return row_id


def _plain(v):
    """numpy scalars → Python scalars (ASE's key-value pairs take bool, int, float, str)."""
    return v.item() if isinstance(v, np.generic) else v


@dataclass
class Report:
    """What :func:`screen` returns: the ``jobs`` and one :class:`Outcome` per job, per-worker stats
    (``batches``, ``seconds`` busy, ``atom_steps``), the wall time and the database URL."""

    kind: str
    jobs: List[Job]
    outcomes: List[Outcome]
    workers: Dict[str, Dict[str, float]]
    seconds: float
    db: Optional[str]

    @property
    def done(self) -> int:
        return sum(o.status == "done" and not o.skipped for o in self.outcomes)

    @property
    def failed(self) -> int:
        return sum(o.status == "failed" for o in self.outcomes)

    @property
    def skipped(self) -> int:
        return sum(o.skipped for o in self.outcomes)

    def summary(self) -> str:
        lines = [f"{self.kind}: {len(self.outcomes)} inputs: {self.done} done, {self.failed} failed, "
                 f"{self.skipped} skipped (done before) in {self.seconds:.1f} s"
                 + (f"; results in {self.db}" if self.db else "")]
        for name, w in sorted(self.workers.items()):
            rate = w["atom_steps"] / w["seconds"] if w["seconds"] > 0 else 0.0
            lines.append(f"  worker {name}: {w['batches']} batches, {w['seconds']:.1f} s busy, "
                         f"{rate:,.0f} atom-steps/s")
        return "\n".join(lines)


def screen(client, kind, jobs: Sequence[Job], model="default", *, db: Optional[str] = None,
           batch_atoms: Optional[int] = None, progress: bool = True) -> Report:
    """Run ``jobs`` of ``kind`` (:class:`Relax`, :class:`Adsorption`, :class:`MD`, ...) with
    ``model`` (a :class:`ModelRef`, or a shipped name / ``.eqm`` path) on ``client``'s workers
    (a ``dask.distributed.Client``; ``None``: in this process), one row per job in ``db``.

    ``batch_atoms``: atoms per batch (default: sized for the workers' devices). Returns a
    :class:`Report`; with ``db`` the jobs it holds done are skipped and read back.
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    ref = model if isinstance(model, ModelRef) else ModelRef.of(model)
    if batch_atoms is not None:
        _check_count("batch_atoms", batch_atoms, 1)
    jobs = list(jobs)
    for job in jobs:
        job.key = job.key or job_key(kind, ref, job.item)
    store = ResultsDB(db) if db is not None else None
    outcomes: Dict[int, Outcome] = {}
    resolved: Dict[str, Outcome] = {}   # key -> outcome, for the jobs that need it
    todo: Dict[str, List[int]] = {}     # key -> indices of the jobs its computation serves
    held: Dict[int, Outcome] = {}       # results waiting for what they need
    workers: Dict[str, Dict[str, float]] = {}
    bar = tqdm(total=len(jobs), disable=not progress, unit="input", desc=kind.name)

    def record(i: int, outcome: Outcome) -> None:
        job = jobs[i]
        if job.finish is not None and outcome.status == "done":
            failed = [resolved[k] for k in job.needs if resolved[k].status != "done"]
            if failed:
                outcome = _failed(job.key, outcome.atoms, f"needs a result that failed: {failed[0].error}",
                                  worker=outcome.worker)
            else:
                outcome = replace(outcome, values={**outcome.values, **job.finish(outcome, resolved)})
        if store is not None:
            store.write(job, outcome, kind, ref)
        outcomes[i] = outcome
        bar.update(1)

    def arrive(i: int, outcome: Outcome) -> None:
        """Record ``outcome`` of job ``i`` now, or hold it until what it needs has arrived."""
        if all(k in resolved for k in jobs[i].needs):
            record(i, outcome)
        else:
            held[i] = outcome

    def resolve(key: str, outcome: Outcome) -> None:
        resolved[key] = outcome
        for i in [i for i, o in held.items() if all(k in resolved for k in jobs[i].needs)]:
            record(i, held.pop(i))

    def transaction():  # a batch's rows commit together: one commit per row would cost more than the row
        return store.transaction() if store is not None else contextlib.nullcontext()

    try:
        with transaction():
            for i, job in enumerate(jobs):
                row = store.done(job.key) if store is not None else None
                if row is not None:
                    previous = store.outcome(row)
                    if row.name != job.name and store.done(job.key, job.name) is None:
                        store.write(job, previous, kind, ref)  # the same input under another name: no new work
                    outcomes[i] = previous
                    resolve(job.key, previous)
                    bar.update(1)
                elif job.error:
                    failed = _failed(job.key, job.item, job.error)
                    record(i, failed)
                    resolve(job.key, failed)
                else:
                    todo.setdefault(job.key, []).append(i)
        payload = [(key, jobs[ids[0]].item) for key, ids in todo.items()]
        costs = [kind.cost(item) for _, item in payload]
        if payload:
            max_atoms = batch_atoms or _batch_atoms(client, ref, costs)
            batches = make_batches(payload, costs, max_atoms)
            stream = (_in_process(kind, ref, batches) if client is None
                      else _on_cluster(client, kind, ref, batches))
            for batch_outcomes, stats in stream:
                w = workers.setdefault(stats["worker"] or "(died)", {"batches": 0, "seconds": 0.0, "atom_steps": 0})
                w["batches"] += 1
                w["seconds"] += stats["seconds"]
                w["atom_steps"] += stats["atom_steps"]
                with transaction():
                    for outcome in batch_outcomes:
                        for i in todo[outcome.key]:
                            arrive(i, outcome)
                        resolve(outcome.key, outcome)
        if held:  # cannot happen: every needed key is a job of this run
            raise RuntimeError(f"{len(held)} results still wait for inputs that never arrived")
    finally:
        bar.close()
    return Report(kind=kind.name, jobs=jobs, outcomes=[outcomes[i] for i in range(len(jobs))], workers=workers,
                  seconds=time.perf_counter() - start, db=store.url if store else None)


# ----------------------------------------------------------------------------------------------
# the batch commands as Python calls
# ----------------------------------------------------------------------------------------------
def _jobs(structures, names) -> List[Job]:
    from eqcalc.atoms import to_ase

    structures = [to_ase(s) for s in structures]
    names = list(names) if names is not None else [f"structure{k}" for k in range(len(structures))]
    if len(names) != len(structures):
        raise InvalidOptionError(f"{len(names)} names for {len(structures)} structures; give one name per structure")
    return [Job(name=str(n), item=s) for n, s in zip(names, structures)]


def relax(client, structures, model="default", *, names=None, fmax: float = 0.05, max_steps: int = 500,
          cell: bool = False, optimizer: str = "fire", **options) -> Report:
    """Relax ``structures`` (ASE Atoms) on ``client``'s workers; ``options``: those of :func:`screen`
    (``db``, ``batch_atoms``, ``progress``). Rows: the relaxed structure with energy, forces
    (stress for bulk), ``converged``, ``steps``."""
    return screen(client, Relax(fmax, max_steps, cell, optimizer), _jobs(structures, names), model, **options)


def md(client, structures, integrator, steps: int, model="default", *, names=None,
       temperature_K: Optional[float] = None, seed: int = 0, log_interval: int = 10, **options) -> Report:
    """``steps`` of ``integrator`` on each of ``structures``, batched on ``client``'s workers (see
    :class:`MD`); ``options`` as in :func:`screen`."""
    kind = MD(integrator, steps, temperature_K, seed, log_interval)
    return screen(client, kind, _jobs(structures, names), model, **options)


def neb(client, reactions, model="default", *, names=None, n_images: int = 7, climb: bool = True,
        fmax: float = 0.03, **settings_and_options) -> Report:
    """Minimum energy paths of ``reactions`` (``(initial, final)`` pairs) on ``client``'s workers;
    further :class:`NEB` settings (``interpolation``, ``k``, ``optimizer``, ``max_steps``,
    ``relax_endpoints``) and :func:`screen` options (``db``, ``batch_atoms``, ``progress``) by name."""
    from eqcalc.atoms import to_ase

    fields = set(NEB.__dataclass_fields__)
    kind = NEB(n_images=n_images, climb=climb, fmax=fmax,
               **{k: v for k, v in settings_and_options.items() if k in fields})
    options = {k: v for k, v in settings_and_options.items() if k not in fields}
    pairs = [tuple(to_ase(a) for a in kind.structures(pair)) for pair in reactions]
    names = list(names) if names is not None else [f"reaction{k}" for k in range(len(pairs))]
    if len(names) != len(pairs):
        raise InvalidOptionError(f"{len(names)} names for {len(pairs)} reactions; give one name per reaction")
    return screen(client, kind, [Job(name=str(n), item=p) for n, p in zip(names, pairs)], model, **options)


def adsorption(client, slabs, adsorbates: Sequence[str], model="default", *, names=None, distance: float = 2.0,
               kinds: Optional[Sequence[str]] = None, fmax: float = 0.05, max_steps: int = 500,
               optimizer: str = "fire", **options) -> Report:
    """Adsorption energies of every adsorbate on every site of every slab, the relaxations spread
    over ``client``'s workers: the same numbers as :func:`eqcalc.adsorption.adsorption_energies`
    per slab. Rows: ``role`` ``placement`` (``adsorbate``, ``site``, ``E_ads_eV``, ``height_A``...),
    ``slab`` (each clean slab, relaxed once for all adsorbates), ``gas`` (each molecule once) and,
    for a slab whose sites cannot be found, ``sites`` with the error."""
    from eqcalc.workflows import adsorption as ads

    kind = Adsorption(fmax, max_steps, False, optimizer)
    ref = model if isinstance(model, ModelRef) else ModelRef.of(model)
    kinds = tuple(kinds or ads.SITE_KINDS)
    gas = {a: ads.gas_molecule(a) for a in adsorbates}  # a bad name is the user's option: raise now
    jobs = [Job(name=f"{a}(gas)", item=m, values={"role": "gas", "adsorbate": a}) for a, m in gas.items()]
    for slab_job in _jobs(slabs, names):
        slab = slab_job.item.copy()
        slab.info.pop("adsorbate_info", None)
        slab_key = job_key(kind, ref, slab)
        jobs.append(Job(name=slab_job.name, item=slab, key=slab_key, values={"role": "slab"}))
        for a in adsorbates:
            try:
                plan = ads.plan(slab, a, distance, kinds)
            except EqcalcError as e:
                jobs.append(Job(name=slab_job.name, item=slab, key=job_key(kind, ref, slab, f"sites:{a}"),
                                values={"role": "sites", "adsorbate": a}, error=_describe(e)))
                continue
            needs = (slab_key, job_key(kind, ref, plan.gas))
            for k, placement in enumerate(plan.placements):
                jobs.append(Job(name=slab_job.name, item=placement, needs=needs,
                                values={"role": "placement", "adsorbate": a, "site": plan.sites[k][0]},
                                finish=_site_row(plan, k, needs)))
    return screen(client, kind, jobs, ref, **options)


def _site_row(plan, k: int, needs: Tuple[str, str]) -> Callable:
    def finish(outcome: Outcome, resolved: Dict[str, Outcome]) -> Dict:
        v = outcome.values
        return plan.site_row(k, outcome.atoms, outcome.energy, resolved[needs[0]].energy,
                             resolved[needs[1]].energy, v["relax_fmax"], v["steps"], v["converged"])
    return finish


# ----------------------------------------------------------------------------------------------
# command line: --scheduler / --db / --batch-atoms on eqcalc relax, adsorption, md, neb
# ----------------------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    """The screening options of a batch command."""
    g = parser.add_argument_group("screening (many inputs on a Dask cluster, results in a database)")
    g.add_argument("--scheduler", metavar="ADDRESS", default=None,
                   help="Dask scheduler address (tcp://host:8786) or scheduler file: run the inputs in "
                        "batches on its workers")
    g.add_argument("--db", metavar="URL", default=None,
                   help="ASE database for the results, one row per input (a file name is SQLite, or "
                        "postgresql://...); a rerun skips what it holds done. Default with --scheduler: "
                        "OUTPUT_DIR/results.db")
    g.add_argument("--batch-atoms", type=int, default=None,
                   help=f"atoms per batch sent to a worker (default: {CPU_BATCH_ATOMS} on a CPU, "
                        f"{GPU_BATCH_ATOMS_PER_GIB} per GiB of GPU memory)")


def requested(args) -> bool:
    """Whether a command line asked for the screening path (``--scheduler`` or ``--db``)."""
    return bool(getattr(args, "scheduler", None) or getattr(args, "db", None))


@contextlib.contextmanager
def connect(address: Optional[str]):
    """A ``dask.distributed.Client`` for a scheduler address or scheduler file (``None``: no client)."""
    if address is None:
        yield None
        return
    try:
        from distributed import Client
    except ImportError as e:
        raise MissingDependencyError("--scheduler needs dask.distributed: pip install 'eqcalc[distributed]' "
                                     "(or pip install 'dask[distributed]')") from e
    try:
        client = (Client(scheduler_file=address, timeout="30s") if os.path.isfile(address)
                  else Client(address, timeout="30s"))
    except (OSError, TimeoutError) as e:
        raise InvalidOptionError(f"--scheduler {address!r}: cannot reach a Dask scheduler there ({_describe(e)}); "
                                 "start one (dask scheduler) and give its address, tcp://HOST:8786") from e
    try:
        yield client
    finally:
        client.close()


def _run_command(args, run: Callable, describe: Callable[[Report], List[str]],
                 ok: Callable[[Job, Outcome], bool] = lambda job, o: True) -> int:
    """Connect (or not), ``run(client, model_ref, db)``, print ``describe(report)``, the failures and
    the summary. Exit status 0 if every input is done and ``ok``, 1 if not, 130 on Ctrl-C."""
    ref = ModelRef.of(args.model, args.device, args.compile, args.dtype, getattr(args, "skin", 0.5))
    db = args.db or str(Path(args.output_dir) / "results.db")
    with connect(args.scheduler) as client:
        try:
            report = run(client, ref, db)
        except KeyboardInterrupt:
            print(f"interrupted: every finished input is in {db}; run the same command again to resume",
                  file=sys.stderr)
            return 130
    for line in describe(report):
        print(line)
    failed = [(job, o) for job, o in zip(report.jobs, report.outcomes) if o.status == "failed"]
    for job, o in failed[:20]:
        print(f"  FAILED {job.name}{' (' + job.values['role'] + ')' if 'role' in job.values else ''}: {o.error}")
    if len(failed) > 20:
        print(f"  ... and {len(failed) - 20} more: ase db {db} status=failed")
    print(report.summary())
    return 0 if all(o.status == "done" and ok(job, o) for job, o in zip(report.jobs, report.outcomes)) else 1


def relax_main(args) -> int:
    """``eqcalc relax INPUT... --scheduler/--db``: one row per input file."""
    from eqcalc.engine.drivers import read_structures

    kind = Relax(args.fmax, args.max_steps, args.cell, args.optimizer)
    jobs = [Job(name=p, item=s) for p, s in zip(args.inputs, read_structures(args.inputs))]

    def describe(report):
        return [f"  NOT converged: {job.name} (fmax {o.values['relax_fmax']:.4f} eV/Å after {o.values['steps']} steps)"
                for job, o in zip(report.jobs, report.outcomes) if o.status == "done" and not o.values["converged"]]
    return _run_command(args, lambda client, ref, db: screen(client, kind, jobs, ref, db=db,
                                                             batch_atoms=args.batch_atoms), describe,
                        ok=lambda job, o: o.values["converged"])


def md_main(args) -> int:
    """``eqcalc md INPUT... --scheduler/--db``: one row per input file (the last frame and the log)."""
    from eqcalc.engine import md as engine
    from eqcalc.engine.drivers import read_structures

    if args.restart or args.checkpoint_interval:
        raise InvalidOptionError("--restart and --checkpoint-interval belong to one batch on one machine; with "
                                 "--scheduler/--db a rerun resumes from the database instead (drop them)")
    integrator = engine.make_integrator(args.ensemble, args.timestep_fs, args.thermostat, args.temperature_K,
                                        args.friction_per_fs, args.tau_fs)
    kind = MD(integrator, args.steps, args.temperature_K, args.seed, args.interval)
    jobs = [Job(name=p, item=s) for p, s in zip(args.inputs, read_structures(args.inputs))]

    def describe(report):
        return [f"  {job.name:30s} T {o.values['temperature_K']:8.1f} K  E_pot {o.values['epot_eV']:12.4f} eV  "
                f"E_tot {o.values['etot_eV']:12.4f} eV" for job, o in zip(report.jobs, report.outcomes)
                if o.status == "done"][:20]
    return _run_command(args, lambda client, ref, db: screen(client, kind, jobs, ref, db=db,
                                                             batch_atoms=args.batch_atoms,
                                                             progress=not args.no_progress), describe)


def adsorption_main(args) -> int:
    """``eqcalc adsorption SLAB... --adsorbate A... --scheduler/--db``: one row per placement, clean
    slab and gas molecule; prints each slab's strongest site per adsorbate."""
    from eqcalc.engine.drivers import read_structures

    slabs = read_structures(args.slab)

    def describe(report):
        best: Dict[tuple, tuple] = {}
        for job, o in zip(report.jobs, report.outcomes):
            if job.values.get("role") == "placement" and o.status == "done":
                key = (job.name, job.values["adsorbate"])
                if key not in best or o.values["E_ads_eV"] < best[key][1]:
                    best[key] = (o.values["site"], o.values["E_ads_eV"])
        return ([f"{'slab':30s}{'adsorbate':>10s}{'best site':>14s}{'E_ads (eV)':>12s}"]
                + [f"{s:30s}{a:>10s}{site:>14s}{e:12.4f}" for (s, a), (site, e) in sorted(best.items())])
    return _run_command(args, lambda client, ref, db: adsorption(
        client, slabs, args.adsorbate, ref, names=args.slab, distance=args.distance, kinds=args.sites,
        fmax=args.fmax, max_steps=args.max_steps, optimizer=args.optimizer, db=db,
        batch_atoms=args.batch_atoms), describe, ok=lambda job, o: o.values.get("converged", True))


def neb_main(args) -> int:
    """``eqcalc neb INITIAL FINAL ... --scheduler/--db``: one row per reaction (name ``INITIAL -> FINAL``)."""
    from eqcalc.engine.drivers import read_pairs

    kind = NEB(n_images=args.images, climb=args.climb, fmax=args.fmax, interpolation=args.interpolation, k=args.k,
               optimizer=args.optimizer, max_steps=args.max_steps, relax_endpoints=not args.no_relax_endpoints,
               check_saddles=not args.no_saddle_check)
    jobs = [Job(name=f"{a} -> {b}", item=pair) for a, b, pair in
            zip(args.inputs[0::2], args.inputs[1::2], read_pairs(args.inputs))]

    def describe(report):
        return [f"  {job.name:40s} barrier {o.values['barrier_eV']:8.4f} eV  dE {o.values['reaction_energy_eV']:8.4f} eV  "
                f"{'converged' if o.values['converged'] else 'NOT converged'}; saddle {o.values['saddle_check']}"
                for job, o in zip(report.jobs, report.outcomes) if o.status == "done"][:20]
    return _run_command(args, lambda client, ref, db: screen(client, kind, jobs, ref, db=db,
                                                             batch_atoms=args.batch_atoms,
                                                             progress=not args.no_progress), describe,
                        ok=lambda job, o: o.values["converged"] and o.values.get("imaginary_modes") in (None, 1))
