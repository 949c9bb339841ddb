"""Fault census: every fault and bad input of issue 13's classes, run, classified, counted.

    PYTHONPATH=. .venv/bin/python benchmarks/fault_census.py [--output-dir benchmarks/results] [--quick]

Each case runs in this process under a time limit and is classified by what happened:

* ``typed error``: an ``EqcalcError`` (for the command line: exit code 2, no traceback) whose
  message names what the case says it must (the field, file, atom, system, option);
* ``correct``: a case that must work did, with the result checked (energies equal to the ASE
  path, a restart identical to the uninterrupted run, files readable, ...);
* ``unclear message``: typed, but the message does not name what it must;
* ``crash``: any other exception or a traceback; ``hang``: over the time limit;
* ``silent wrong``: no error where one was due, or a wrong result.

Writes ``faults.csv`` (one row per case) and prints the summary table of the README section
"Faults and bad input". ``--quick`` skips the AOTInductor compiles (cache cases) and the
subprocess kills.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import errno
import io
import json
import logging
import os
import shutil
import signal
import tempfile
import time
import zipfile
from collections import Counter, defaultdict
from pathlib import Path

import ase.io
import numpy as np
import torch
from ase import Atoms
from ase.build import bulk, fcc111, molecule

import potentials
from eqcalc import EquivariantCalculator, compile as compiled, errors, outputs, package
from eqcalc.cli import main as cli_main
from eqcalc.engine import md
from eqcalc.engine.drivers import CHECKPOINT, load_checkpoint, run_md
from eqcalc.engine.relax import relax
from eqcalc.neighbors import compute_neighbors, neighbor_list
from tests.test_faults import md_args, spawn, steps_in, wait_for  # the fault suite's process helpers

LIMIT_S = 300  # s; a legitimate case takes at most ~60 s on a busy 2-core machine
OUTCOMES = ("typed error", "correct", "unclear message", "crash", "hang", "silent wrong")
CASES = []


class SilentWrong(Exception):
    """A case that gave no error where one was due, or a wrong result."""


def case(cls, name, expect="error", mention=()):
    """Register ``fn`` as a case: ``expect="error"`` must raise a typed error naming every string
    of ``mention`` (``"a|b"``: either); ``expect="ok"`` must return True (a checked result)."""
    def register(fn):
        CASES.append((cls, name, expect, (mention,) if isinstance(mention, str) else tuple(mention), fn))
        return fn
    return register


def run_case(expect, mention, fn):
    """``(outcome, error type, message)``."""
    def alarm(*_):
        raise TimeoutError
    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(LIMIT_S)
    try:
        result = fn()
    except TimeoutError:
        return "hang", "", f"over {LIMIT_S} s"
    except SilentWrong as e:
        return "silent wrong", "", str(e)
    except (errors.EqcalcError, CliError) as e:
        message = str(e)
        if expect == "ok":
            return "crash", type(e).__name__, message
        missing = [m for m in mention if not any(alt.lower() in message.lower() for alt in m.split("|"))]
        return ("unclear message" if missing else "typed error"), type(e).__name__, message
    except Exception as e:  # noqa: BLE001 - the census counts these
        return "crash", type(e).__name__, str(e)
    finally:
        signal.alarm(0)
    if expect == "error":
        return "silent wrong", "", f"no error (returned {str(result)[:80]})"
    return ("correct" if result is True else "silent wrong"), "", "" if result is True else str(result)[:200]


# ---- helpers ------------------------------------------------------------------------------------
class CliError(Exception):
    """The command line refused with exit code 2 and no traceback (the message is its stderr)."""


def cli(*argv):
    """Run ``eqcalc ARGV`` in this process: 0 → True; 2 without a traceback → CliError; else crash."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli_main([str(a) for a in argv])
        except SystemExit as e:  # argparse: usage error
            code = e.code
    text = err.getvalue()
    if "Traceback" in text:
        raise RuntimeError(text[-500:])
    if code == 2:
        raise CliError(text.strip())
    if code != 0:
        raise SilentWrong(f"exit code {code}: {text[-200:]}")
    return True


def expect_equal(a, b, what, tol=0.0):
    if not np.allclose(a, b, rtol=0, atol=tol):
        raise SilentWrong(f"{what}: {a} != {b}")
    return True


WORK = Path(tempfile.mkdtemp(prefix="eqcalc-census-"))
SPECIES = ["Cu", "Pt", "C", "O", "H"]


def tiny_model(name="tiny", arch="painn", dtype="float64", **hyper) -> str:
    path = WORK / f"{name}.eqm"
    if not path.exists():
        hyper = hyper or dict(features=8, num_interactions=2)
        model = potentials.build(arch, species=SPECIES, cutoff=5.0, dtype=dtype, **hyper)
        potentials.save(model, path)
    return str(path)


_CALCS = {}


def calc(model=None):
    key = model or "tiny"
    if key not in _CALCS:
        _CALCS[key] = EquivariantCalculator(model or tiny_model(), compile="eager", device="cpu")
    return _CALCS[key]


def energy(atoms, model=None):
    atoms = atoms.copy() if hasattr(atoms, "copy") and isinstance(atoms, Atoms) else atoms
    c = calc(model)
    if isinstance(atoms, Atoms):
        atoms.calc = c
        return atoms.get_potential_energy()
    return c.get_potential_energy(atoms)


def cu(repeat=2, seed=0, a=3.61):
    atoms = bulk("Cu", "fcc", a=a, cubic=True).repeat(repeat)
    atoms.rattle(0.05, seed=seed)
    return atoms


def folder(name) -> Path:
    path = WORK / name
    if path.exists():
        shutil.rmtree(path)
    return path


def write_input(atoms, name="in.extxyz") -> Path:
    path = WORK / name
    ase.io.write(path, atoms)
    return path


# ---- structures through the calculator ------------------------------------------------------------
def structure_cases():
    cls = "structures (API)"
    case(cls, "empty Atoms", mention="empty")(lambda: energy(Atoms()))
    for k in range(4):
        for bad in (np.nan, np.inf):
            def fn(k=k, bad=bad):
                a = cu(1)
                a.positions[k, k % 3] = bad
                return energy(a)
            case(cls, f"{bad} position of atom {k}", mention=f"[{k}]")(fn)
    for bad in (np.nan, np.inf):
        def fn(bad=bad):
            a = cu(1)
            a.cell[1, 1] = bad
            return energy(a)
        case(cls, f"{bad} in the cell", mention="cell")(fn)
    for axis in range(3):
        def fn(axis=axis):
            a = cu(1)
            cell = a.cell.array.copy()
            cell[axis] = 0
            a.set_cell(cell)
            return energy(a)
        case(cls, f"zero periodic cell vector {axis}", mention=f"{axis}")(fn)
    case(cls, "singular cell", mention="linearly dependent")(
        lambda: energy(Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 2.5]], cell=[[3, 0, 0], [6, 0, 0], [0, 0, 4]], pbc=True)))
    for h in (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7):
        # thinner than cutoff/1000: refused as flat; at 1e-2 Å an atom overlaps its own image; at
        # 1e-7 Å the cell is numerically singular
        case(cls, f"flat periodic cell, height {h:g} Å", mention=("direction 2|own periodic image|singular",))(
            lambda h=h: energy(Atoms("Cu2", positions=[[0, 0, 0], [1.3, 1.3, 0]], cell=[[10, 0, 0], [0, 10, 0], [0, 0, h]],
                                     pbc=True)))
    pairs = [("Cu", "Cu"), ("Pt", "O"), ("C", "O"), ("H", "H"), ("O", "H"), ("Cu", "H")]
    from ase.data import atomic_numbers, covalent_radii
    for a_, b_ in pairs:
        bond = covalent_radii[atomic_numbers[a_]] + covalent_radii[atomic_numbers[b_]]
        for frac in (0.0, 0.05, 0.2, 0.3):
            case(cls, f"overlapping {a_}-{b_} at {frac:g} x covalent", mention=(a_, b_, "overlap"))(
                lambda a_=a_, b_=b_, d=frac * bond: energy(Atoms(a_ + b_, positions=[[5, 5, 5], [5, 5, 5 + d]],
                                                                 cell=[10, 10, 10])))
    for z in (0, -6, 119, 130, 1000):
        def fn(z=z):
            a = Atoms("Cu2", positions=[[0, 0, 0], [2.5, 0, 0]])
            a.arrays["numbers"] = np.array([29, z])
            return energy(a)
        case(cls, f"atomic number {z}", mention=str(z))(fn)
    for symbol in ("Fe", "U", "He"):
        def fn(symbol=symbol):
            a = cu(1)
            a.symbols[0] = symbol
            return energy(a)
        case(cls, f"element {symbol} unknown to the model", mention=symbol)(fn)
    case(cls, "stress of a molecule", mention="periodic")(lambda: _stress_of(molecule("CO")))
    case(cls, "not a structure (a list)", mention="ase.Atoms")(lambda: calc().get_potential_energy([[0, 0, 0]]))

    def pymatgen_then_ase():
        from pymatgen.io.ase import AseAtomsAdaptor
        atoms = cu(1)
        e_pmg = calc().get_potential_energy(AseAtomsAdaptor.get_structure(atoms))
        c = calc()
        c.calculate(AseAtomsAdaptor.get_structure(atoms), ["energy"])
        e_ase = energy(atoms)
        return expect_equal(e_pmg, e_ase, "pymatgen vs ASE energy", 1e-10)
    case(cls, "pymatgen Structure, then ASE Atoms", expect="ok")(pymatgen_then_ase)

    def todict():
        d = calc().todict()
        need = {"model", "weights_sha256", "dtype", "device", "forces", "compile"}
        return True if need <= set(d) and d["weights_sha256"] == calc().metadata["weights_sha256"] \
            else f"todict() lacks {need - set(d)}"
    case(cls, "calc.todict() records what produced the numbers", expect="ok")(todict)


def _stress_of(atoms):
    atoms.calc = calc()
    return atoms.get_stress()


# ---- neighbor search ------------------------------------------------------------------------------
def neighbor_cases():
    cls = "neighbor search"
    rng = np.random.default_rng(0)
    for k in range(10):
        def fn(k=k):
            systems = [cu(1, seed=k), cu(1, seed=k + 100, a=3.7)]
            pos = np.concatenate([a.positions for a in systems])
            system = np.repeat([0, 1], [4, 4])
            perm = np.random.default_rng(k).permutation(8)
            ei, S = compute_neighbors(torch.tensor(pos[perm]), torch.tensor(np.stack([a.cell.array for a in systems])),
                                      torch.ones(2, 3, dtype=torch.bool), 4.0, torch.tensor(system[perm]))
            got = {(perm[i], perm[j], tuple(s)) for i, j, s in zip(ei[0].tolist(), ei[1].tolist(), S.tolist())}
            want = set()
            for off, a in zip((0, 4), systems):
                i, j, s = neighbor_list("ijS", a, 4.0)
                want |= {(i_ + off, j_ + off, tuple(s_)) for i_, j_, s_ in zip(i.tolist(), j.tolist(), s.tolist())}
            return True if got == want else SilentWrong("edges differ from per-system lists")
        case(cls, f"unsorted system vector, permutation {k}", expect="ok")(fn)
    for bad in (-1, 2, 7):
        case(cls, f"system value {bad} outside the batch", mention="system")(
            lambda bad=bad: compute_neighbors(torch.zeros(3, 3, dtype=torch.float64) + torch.arange(3.0)[:, None],
                                              torch.zeros(2, 3, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.bool),
                                              3.0, torch.tensor([0, 1, bad])))
    for cutoff in (True, float("nan"), -1.0, 0.0, float("inf"), "five"):
        case(cls, f"cutoff {cutoff!r}", mention="cutoff")(lambda cutoff=cutoff: neighbor_list("ij", cu(1), cutoff))
    for h in (5e-3, 1e-4, 1e-6):
        case(cls, f"flat cell {h:g} Å with many atoms", mention="thick")(
            lambda h=h: neighbor_list("ij", Atoms("Cu20", positions=rng.uniform(0, 8, (20, 3)) * [1, 1, h],
                                                  cell=[[8, 0, 0], [0, 8, 0], [3.0, 2.0, h]], pbc=True), 6.0))
    case(cls, "quantities 'xyz'", mention="quantities")(lambda: neighbor_list("xyz", cu(1), 3.0))


# ---- model files ------------------------------------------------------------------------------------
def _members(blob):
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        return json.loads(z.read(package.METADATA)), z.read(package.WEIGHTS)


def _pack(meta, weights, resign=True, method=zipfile.ZIP_STORED):
    meta = dict(meta)
    if resign and "sha256" in meta:
        meta["sha256"] = package.content_sha256(meta, weights)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=method) as z:
        z.writestr(package.METADATA, json.dumps(meta))
        z.writestr(package.WEIGHTS, weights)
    return out.getvalue()


def _evaluate(path):
    a = cu(1)
    a.symbols[1] = "O"
    a.calc = EquivariantCalculator(str(path), compile="eager", device="cpu")
    return a.get_potential_energy(), a.get_forces()


def model_file_cases(quick):
    cls = "model files"
    valid_path = tiny_model("trained-looking")
    valid = Path(valid_path).read_bytes()
    reference = _evaluate(valid_path)

    def same_or_refused(blob, what):
        try:
            path = WORK / "mutant.eqm"
            path.write_bytes(blob)
            e, f = _evaluate(path)
        except errors.ModelFileError:
            raise
        if e != reference[0] or not np.array_equal(f, reference[1]):
            raise SilentWrong(f"{what} loaded with other numbers ({e} vs {reference[0]})")
        return True

    rng = np.random.default_rng(13)
    n_flip = 40 if quick else 120
    for k, offset in enumerate(rng.integers(0, len(valid), n_flip)):
        def fn(offset=int(offset)):
            blob = bytearray(valid)
            blob[offset] ^= int(rng.integers(1, 256))
            return same_or_refused(bytes(blob), f"byte {offset} flipped")
        # a flip of a harmless byte (zip timestamp, JSON whitespace) loads with identical numbers
        CASES.append((cls, f"byte {int(offset)} flipped", "either", (), fn))
    for length in sorted(set(rng.integers(0, len(valid), 30 if not quick else 10).tolist())):
        case(cls, f"truncated to {length} bytes", mention="eqm")(lambda length=length: same_or_refused(valid[:length], "truncated"))
    meta, weights = _members(valid)
    mutations = {
        "cutoff true": ("cutoff", True), "cutoff '5'": ("cutoff", "5"), "cutoff -4": ("cutoff", -4.0),
        "cutoff 1e6": ("cutoff", 1e6), "cutoff null": ("cutoff", None), "cutoff 4.5 (config 5.0)": ("cutoff", 4.5),
        "species reordered": ("species", ["O", "Cu", "Pt", "C", "H"]), "species duplicate": ("species", ["Cu", "Cu", "C", "O", "H"]),
        "species as a string": ("species", "CuPtCOH"), "species unknown symbol": ("species", ["Cu", "Xx", "C", "O", "H"]),
        "schema_version -1": ("schema_version", -1), "schema_version true": ("schema_version", True),
        "schema_version 99": ("schema_version", 99), "dtype float16": ("dtype", "float16"),
        "force_modes magic": ("force_modes", ["magic"]), "force_modes direct without head": ("force_modes", ["conservative", "direct"]),
        "units kcal/mol": ("units", {"energy": "kcal/mol", "length": "Å", "forces": "eV/Å", "stress": "eV/Å^3"}),
        "n_parameters 12": ("n_parameters", 12), "architecture unknown": ("architecture", "nope"),
        "architecture schnet": ("architecture", "schnet"), "format other": ("format", "other"),
        "frame_averaging sideways": ("frame_averaging", "sideways"), "weights_sha256 short": ("weights_sha256", "abc"),
        "config.features 8.0": ("config.features", 8.0), "config.features 9": ("config.features", 9),
        "config.banana": ("config.banana", 1), "config.envelope": ("config.envelope", "nope"),
        "config.cutoff true": ("config.cutoff", True), "config.num_radial -3": ("config.num_radial", -3),
    }
    for label, (field, value) in mutations.items():
        for resign in (False, True):
            def fn(field=field, value=value, resign=resign):
                m = json.loads(json.dumps(meta))
                target, key = (m["config"], field[7:]) if field.startswith("config.") else (m, field)
                target[key] = value
                return same_or_refused(_pack(m, weights, resign), field)
            name = field.replace("_version", " version") if field == "schema_version" else field
            # an edit is refused by the schema check naming the field, or (where the value is
            # valid) by the whole-file hash
            case(cls, f"{label} ({'re-signed' if resign else 'as edited'})",
                 mention=(f"{name}|{field.split('.')[0]}" + ("" if resign else "|sha256"),))(fn)

    def v1(m):
        m = dict(m)
        m.pop("sha256")
        m["schema_version"] = 1
        return m
    for label, (field, value) in list(mutations.items())[:12]:
        def fn(field=field, value=value):
            m = v1(json.loads(json.dumps(meta)))
            m[field] = value
            return same_or_refused(_pack(m, weights, False), field)
        case(cls, f"{label} (schema 1 file)", mention=(field if field != "schema_version" else "schema",))(fn)
    case(cls, "schema 1 file loads with the same numbers", expect="ok")(
        lambda: same_or_refused(_pack(v1(meta), weights, False), "schema 1"))

    def species_both():
        m = json.loads(json.dumps(meta))
        m["species"] = m["config"]["species"] = ["O", "Cu", "Pt", "C", "H"]
        return same_or_refused(_pack(m, weights), "species reordered everywhere")
    case(cls, "species reordered in metadata and config (re-signed)", mention="species_z")(species_both)

    from safetensors.torch import load, save

    def retyped(convert, label):
        def fn():
            w = {k: convert(v) if v.is_floating_point() else v for k, v in load(weights).items()}
            blob = save(w)
            m = dict(meta, weights_sha256=package.weights_sha256(blob))
            return same_or_refused(_pack(m, blob), label)
        return fn
    case(cls, "integer-typed weights", mention="int32")(retyped(lambda v: (v * 100).to(torch.int32), "int"))
    case(cls, "float32 weights in a float64 file", mention="float32")(retyped(lambda v: v.float(), "f32"))
    case(cls, "NaN weights", mention="NaN")(retyped(lambda v: v * float("nan"), "nan"))

    def bomb():
        path = WORK / "bomb.eqm"
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
            with z.open(package.METADATA, "w", force_zip64=True) as f:
                for _ in range(128):
                    f.write(b" " * (1 << 24))
            z.writestr(package.WEIGHTS, weights)
        start = time.perf_counter()
        try:
            package.read(path)
        finally:
            if time.perf_counter() - start > 1.0:
                raise SilentWrong("took over a second: the member was unpacked")
    case(cls, "zip bomb: metadata of 2 GiB", mention="2147483648")(bomb)
    case(cls, "weights compressed 1000:1", mention="compressed")(
        lambda: same_or_refused(_pack(meta, bytes(8 << 20), False, zipfile.ZIP_DEFLATED), "ratio"))

    def duplicate_member():
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as z, contextlib.suppress(UserWarning):
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                z.writestr(package.METADATA, json.dumps(meta))
                z.writestr(package.WEIGHTS, weights)
                z.writestr(package.METADATA, json.dumps(dict(meta, cutoff=1.0)))
        return same_or_refused(out.getvalue(), "duplicate member")
    case(cls, "two metadata.json members", mention="appears 2 times")(duplicate_member)
    for text, label in ((b'{"format": "eqcalc-model", "cutoff": NaN}', "NaN"), (b"{", "JSON"),
                        (b'{"format":"eqcalc-model","cutoff":4,"cutoff":1}', "duplicate"), (b"\xff\xfe", "JSON")):
        case(cls, f"metadata {text[:30]!r}", mention=label)(lambda text=text: same_or_refused(_raw(text, weights), "json"))
    case(cls, "a pickle posing as a model", mention="never")(lambda: same_or_refused(b"\x80\x04\x95" + b"x" * 100, "pickle"))
    case(cls, "a foreign zip", mention="not an eqcalc model")(lambda: same_or_refused(_zip_with("hello.txt"), "zip"))
    case(cls, "a missing file", mention="does not exist")(lambda: _evaluate(WORK / "missing.eqm"))
    case(cls, "a folder instead of a file", mention="eqm")(lambda: _evaluate(_dir("model.eqm")))
    case(cls, "an empty file", mention="eqm")(lambda: same_or_refused(b"", "empty"))


def _raw(text, weights):
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr(package.METADATA, text)
        z.writestr(package.WEIGHTS, weights)
    return out.getvalue()


def _zip_with(name):
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr(name, "not a model")
    return out.getvalue()


def _dir(name):
    path = WORK / name
    path.mkdir(exist_ok=True)
    return path


# ---- MD and relaxation ------------------------------------------------------------------------------
def simulation_cases():
    cls = "MD blow-ups"
    inp = write_input(cu(2), "cu.extxyz")
    for ts, ensemble in ((50, "nve"), (50, "nvt"), (100, "nve"), (100, "nvt"), (200, "nve")):
        def fn(ts=ts, ensemble=ensemble):
            out = folder(f"blow-{ts}-{ensemble}")
            try:
                cli("md", inp, "--timestep-fs", ts, "--steps", 300, "--ensemble", ensemble, "--checkpoint-interval", 1,
                    "--interval", 1, "--output-dir", out, "--no-progress", "--compile", "eager", "--device", "cpu")
            finally:
                if (out / "cu.extxyz").exists():
                    ase.io.read(out / "cu.extxyz", ":")  # still readable
            return "ran all steps"
        case(cls, f"eqcalc md --timestep-fs {ts} ({ensemble})", mention=("cu", "step", "left physics"))(fn)

    def state_with(change):
        def fn():
            a = cu(1)
            change(a)
            return run_md([a], md.ModelPotential(tiny_model()), md.NVE(1.0), 5)
        return fn
    case(cls, "NaN momenta", mention="momenta")(state_with(lambda a: a.set_momenta(np.full((4, 3), np.nan))))
    case(cls, "zero masses", mention="mass")(state_with(lambda a: a.set_masses([0, 63.5, 63.5, 63.5])))
    case(cls, "negative mass", mention="mass")(state_with(lambda a: a.set_masses([-1, 63.5, 63.5, 63.5])))
    case(cls, "momenta of 1e8 K", mention="temperature")(state_with(lambda a: a.set_momenta(np.full((4, 3), 3e3))))

    class Exploding:
        def __init__(self, when, factor):
            self.inner, self.when, self.factor, self.calls = md.ModelPotential(tiny_model()), when, factor, 0
            self.model, self.species = self.inner.model, self.inner.species

        def reset(self):
            self.inner.reset()

        def __call__(self, state):
            out = self.inner(state)
            self.calls += 1
            return dict(out, forces=out["forces"] * self.factor) if self.calls > self.when else out
    for when, factor in ((1, float("nan")), (3, float("inf")), (5, 1e6), (2, -1e5)):
        case(cls, f"model forces x {factor} after {when} calls", mention=("system0", "step"))(
            lambda when=when, factor=factor: run_md([cu(1)], Exploding(when, factor), md.Langevin(1.0, 300.0), 20,
                                                    temperature_K=300, output_dir=folder(f"explode-{when}")))

    cls = "relaxation"
    case(cls, "two Cu atoms 0.17 Å apart", mention=("atoms 0 (Cu) and 1 (Cu)", "0.17"))(
        lambda: relax([_moved(cu(1), 1, 0, 0.17)], md.ModelPotential(tiny_model())))

    class NaNStress(Exploding):
        def __call__(self, state):
            out = self.inner(state)
            self.calls += 1
            return dict(out, stress=out["stress"] * float("nan")) if self.calls > self.when else out
    for when in (1, 4):
        case(cls, f"NaN stress after {when} evaluations (cell relaxation)", mention=("system 0", "step"))(
            lambda when=when: relax([cu(1)], NaNStress(when, 1), cell=True, fmax=1e-8))
    for fmax in (float("nan"), -1.0, 0.0):
        case(cls, f"fmax {fmax}", mention="fmax")(lambda fmax=fmax: relax([cu(1)], md.ModelPotential(tiny_model()), fmax=fmax))

    def pmg_relax():
        from pymatgen.io.ase import AseAtomsAdaptor
        pot = md.ModelPotential(tiny_model())
        a = cu(1)
        r1 = relax([AseAtomsAdaptor.get_structure(a)], pot, max_steps=5)
        r2 = relax([a], pot, max_steps=5)
        return expect_equal(r1.energy, r2.energy, "pymatgen vs ASE relax", 1e-9)
    case(cls, "pymatgen Structure relaxed", expect="ok")(pmg_relax)

    def pmg_md():
        from pymatgen.io.ase import AseAtomsAdaptor
        pot = md.ModelPotential(tiny_model())
        a = cu(1)
        r1 = run_md([AseAtomsAdaptor.get_structure(a)], pot, md.NVE(1.0), 5, temperature_K=300)
        r2 = run_md([a], pot, md.NVE(1.0), 5, temperature_K=300)
        return expect_equal(r1.state.positions.numpy(), r2.state.positions.numpy(), "pymatgen vs ASE MD", 1e-9)
    case(cls, "pymatgen Structure in run_md", expect="ok")(pmg_md)


def _moved(atoms, index, other, distance):
    atoms.positions[index] = atoms.positions[other] + [0, 0, distance]
    return atoms


# ---- run folders ------------------------------------------------------------------------------------
def run_folder_cases(quick):
    cls = "run folders"
    integrator = md.Langevin(2.0, 500.0)
    kwargs = dict(temperature_K=500, seed=3, interval=1, checkpoint_interval=4)
    pot = md.ModelPotential(tiny_model())
    reference = run_md([cu(1)], pot, integrator, 16, **kwargs).state.positions

    for calls in (12, 14, 17, 20, 25, 30):
        def fn(calls=calls):
            out = folder(f"disk-{calls}")
            try:
                with outputs.simulated_full_disk(calls):
                    run_md([cu(1)], pot, integrator, 16, output_dir=out, **kwargs)
                return "no error on a full disk"
            except errors.OutputError as e:
                frames = ase.io.read(out / "system0.extxyz", ":")
                steps = [f.info["step"] for f in frames]
                if steps != list(range(len(steps))):
                    raise SilentWrong(f"frames after the failure: {steps}")
                resumed = run_md([cu(1)], pot, integrator, 16, output_dir=out, restart=out / CHECKPOINT, **kwargs)
                if not torch.equal(resumed.state.positions, reference):
                    raise SilentWrong("restart after a full disk differs from the uninterrupted run")
                raise e
        case(cls, f"disk full at write {calls + 1} (mid-frame), then restart", mention="cut back")(fn)

    def checkpoint_enospc():
        out = folder("ckpt-enospc")
        run_md([cu(1)], pot, md.NVE(1.0), 4, temperature_K=300, checkpoint_interval=4, output_dir=out)
        real = torch.save

        def bad(obj, f):
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        torch.save = bad
        try:
            run_md([cu(1)], pot, md.NVE(1.0), 12, checkpoint_interval=4, output_dir=out, restart=out / CHECKPOINT)
        finally:
            torch.save = real
            if load_checkpoint(out / CHECKPOINT)[0].step != 4:
                raise SilentWrong("the previous checkpoint was damaged")
    case(cls, "disk full while writing a checkpoint", mention="intact")(checkpoint_enospc)

    def half_frame(extra):
        def fn():
            out = folder("half-frame")
            run_md([cu(1)], pot, integrator, 8, output_dir=out, **kwargs)
            with open(out / "system0.extxyz", "ab") as f:
                f.write(extra)
            run_md([cu(1)], pot, integrator, 16, output_dir=out, restart=out / CHECKPOINT, **kwargs)
            steps = [f.info["step"] for f in ase.io.read(out / "system0.extxyz", ":")]
            return True if steps == list(range(17)) else f"frames {steps}"
        return fn
    for label, extra in (("half a frame", b"4\nLattice=\"3 0 0 0 3 0 0 0 3\" step=9 Properties=species:S:1:pos:R:3\nCu 0.1 "),
                         ("a count line only", b"4\n"), ("binary garbage", os.urandom(300)),
                         ("a frame of a later step", b"1\nstep=99\nCu 0 0 0\n")):
        case(cls, f"restart repairs {label} at the end", expect="ok")(half_frame(extra))

    def restart_with(potential, integrator_, steps, path=None):
        def fn():
            out = folder("restart-check")
            run_md([cu(1)], pot, md.NVE(1.0), 4, temperature_K=300, checkpoint_interval=4, output_dir=out)
            return run_md([cu(1)], potential(), integrator_, steps, output_dir=out, restart=path or out / CHECKPOINT)
        return fn
    case(cls, "restart with another model", mention="another model")(
        restart_with(lambda: md.ModelPotential(tiny_model("other", "schnet", features=8, num_interactions=1)), md.NVE(1.0), 8))
    case(cls, "restart with another timestep", mention="timestep")(restart_with(lambda: pot, md.NVE(2.0), 8))
    case(cls, "restart with --steps at the checkpoint step", mention="at or below")(restart_with(lambda: pot, md.NVE(1.0), 4))
    case(cls, "restart with --steps below the checkpoint step", mention="at or below")(restart_with(lambda: pot, md.NVE(1.0), 2))
    case(cls, "restart from a missing checkpoint", mention="does not exist")(
        restart_with(lambda: pot, md.NVE(1.0), 8, WORK / "none.pt"))
    bad = WORK / "bad.pt"
    bad.write_bytes(os.urandom(1000))
    case(cls, "restart from a corrupt checkpoint", mention="not an eqcalc MD checkpoint")(
        restart_with(lambda: pot, md.NVE(1.0), 8, bad))

    def other_inputs():
        out = folder("restart-inputs")
        run_md([cu(1)], pot, md.NVE(1.0), 4, temperature_K=300, checkpoint_interval=4, output_dir=out)
        return run_md([cu(2)], pot, md.NVE(1.0), 8, output_dir=out, restart=out / CHECKPOINT)
    case(cls, "restart with other input structures", mention="other structures")(other_inputs)

    def locked():
        out = folder("locked")
        with outputs.FolderLock(out):
            return run_md([cu(1)], pot, md.NVE(1.0), 2, output_dir=out)
    case(cls, "second run into a live run's folder (in process)", mention="in use")(locked)

    if not quick:
        inp = write_input(cu(2), "cu.extxyz")
        model = tiny_model()
        for k in range(3):
            case(cls, f"SIGKILL mid-run {k}, then --restart", expect="ok")(lambda k=k: _kill_and_restart(inp, model, k))
        case(cls, "two eqcalc md into one folder (processes)", mention="in use")(lambda: _concurrent(inp, model))

    def unwritable(where):
        def fn():
            return cli("md", write_input(cu(1)), "--steps", 2, "--output-dir", where, "--compile", "eager")
        return fn
    blocker = WORK / "a-file"
    blocker.write_text("x")
    case(cls, "output dir below a file", mention="cannot be written")(unwritable(blocker / "run"))
    case(cls, "output dir is a file", mention="cannot be written")(unwritable(blocker))
    case(cls, "output dir in /proc", mention="cannot be written")(unwritable("/proc/eqcalc-run"))


def _kill_and_restart(inp, model, k):
    run = folder(f"kill-{k}")
    p = spawn(md_args(inp, model, run, 100000))
    wait_for(lambda: (run / CHECKPOINT).exists() and len(steps_in(run / "cu.extxyz")) > 6 + 4 * k, p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    step = load_checkpoint(run / CHECKPOINT)[0].step
    cli(*md_args(inp, model, run, step + 20, "--restart", run / CHECKPOINT))
    cli(*md_args(inp, model, folder(f"kill-ref-{k}"), step + 20))
    got, ref = ase.io.read(run / "cu.extxyz"), ase.io.read(WORK / f"kill-ref-{k}" / "cu.extxyz")
    if steps_in(run / "cu.extxyz") != list(range(0, step + 21, 2)) or not np.array_equal(got.positions, ref.positions):
        raise SilentWrong("the restarted run differs from the uninterrupted one")
    return True


def _concurrent(inp, model):
    run = folder("concurrent")
    p = spawn(md_args(inp, model, run, 100000))
    try:
        wait_for(lambda: len(steps_in(run / "cu.extxyz")) > 2, p)
        cli(*md_args(inp, model, run, 20))
        return "the second run was not refused"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()


# ---- compiled-form cache ------------------------------------------------------------------------------
def cache_cases(quick):
    cls = "compiled-form cache"
    model = tiny_model("aoti-model", "schnet", "float32", features=8, num_interactions=1)
    cache = WORK / "cache"
    pristine = WORK / "pristine"

    def with_cache(env_dir):
        os.environ["EQCALC_CACHE"] = str(env_dir)
        compiled._FALLBACK.clear()
        compiled._CHOICES.clear()

    def check(kind):
        c = EquivariantCalculator(model, compile=kind, device="cpu")
        e = _energy_with(c)
        e0 = _energy_with(EquivariantCalculator(model, compile="eager", device="cpu"))
        return expect_equal(e, e0, f"{kind} vs eager energy", 1e-4)

    def damaged(damage, kind):
        def fn():
            shutil.rmtree(cache, ignore_errors=True)
            shutil.copytree(pristine, cache)
            with_cache(cache)
            entry = next(cache.glob("*.pt2"))
            if damage == "truncated":
                entry.write_bytes(entry.read_bytes()[:1000])
            elif damage == "garbage":
                entry.write_bytes(os.urandom(entry.stat().st_size))
            elif damage == "record missing":
                Path(str(entry) + ".json").unlink()
            elif damage == "record garbage":
                Path(str(entry) + ".json").write_text("{")
            logs = io.StringIO()
            handler = logging.StreamHandler(logs)
            logger = logging.getLogger("eqcalc")
            logger.addHandler(handler)
            logger.setLevel(logging.WARNING)
            try:
                ok = check(kind)
            finally:
                logger.removeHandler(handler)
                logger.setLevel(logging.NOTSET)
            if str(entry) not in logs.getvalue():
                raise SilentWrong("no warning naming the damaged entry")
            return ok
        return fn

    if quick:
        return
    with_cache(cache)
    EquivariantCalculator(model, compile="aoti", device="cpu")
    shutil.copytree(cache, pristine)
    for damage in ("truncated", "garbage", "record missing", "record garbage"):
        case(cls, f"{damage} entry, compile='auto' (skipped, no compile)", expect="ok")(damaged(damage, "auto"))
    case(cls, "truncated entry, compile='aoti' (rebuilt)", expect="ok")(damaged("truncated", "aoti"))

    def unwritable():
        blocker = WORK / "cache-blocker"
        blocker.write_text("x")
        with_cache(blocker / "cache")
        return check("aoti")
    case(cls, "unwritable cache folder, compile='aoti' (temporary folder)", expect="ok")(unwritable)

    def auto_twice():
        with_cache(WORK / "auto-cache")
        kinds = {EquivariantCalculator(model, compile="auto", device="cpu").model.compile_kind for _ in range(3)}
        return True if len(kinds) == 1 else f"forms {kinds}"
    case(cls, "three calculators with compile='auto' agree", expect="ok")(auto_twice)


def _energy_with(c):
    a = cu(1)
    a.calc = c
    return a.get_potential_energy()


# ---- command line and data readers ------------------------------------------------------------------
def cli_cases():
    cls = "command line options"
    inp = write_input(cu(1), "cu1.extxyz")
    slab = fcc111("Cu", (2, 2, 3), vacuum=6.0)
    slab.info.pop("adsorbate_info", None)
    slab_file = write_input(slab, "slab.extxyz")
    bulk_file = write_input(cu(2), "bulk.extxyz")
    garbage = WORK / "garbage.extxyz"
    garbage.write_bytes(os.urandom(500))
    recipe = WORK / "recipe.yaml"
    recipe.write_text("architecture: schnet\nmax_steps: 2\ndata: missing.xyz\n")
    tiny = tiny_model()
    md_ = ["md", inp, "--model", tiny, "--compile", "eager", "--no-progress", "--output-dir", WORK / "cli-md"]
    bad = [
        (["bench", "--atoms", "-5"], "--atoms"), (["bench", "--atoms", "0"], "--atoms"), (["bench", "--repeats", "0"], "--repeats"),
        (["datagen", WORK / "d.xyz", "--n-structures", "0"], "--n-structures"),
        (["datagen", WORK / "d.xyz", "--n-structures", "-3"], "--n-structures"),
        (["datagen", WORK / "d.xyz", "--n-structures", "2", "--elements", "Xx"], "Xx"),
        (["train", recipe, "--set", "lr=-1"], "lr"), (["train", recipe, "--set", "lr=nan"], "lr"),
        (["train", recipe, "--set", "batch_size=0"], "batch_size"), (["train", recipe, "--set", "max_steps=-2"], "max_steps"),
        (["train", recipe, "--set", "ema_decay=1.5"], "ema_decay"), (["train", recipe, "--set", "banana=1"], "banana"),
        (["train", recipe, "--set", "output=/proc/x.eqm"], "cannot be written"),
        (["train", WORK / "missing.yaml"], "missing.yaml"),
        ([*md_, "--steps", "-1"], "--steps"), ([*md_, "--timestep-fs", "nan"], "--timestep-fs"),
        ([*md_, "--timestep-fs", "0"], "--timestep-fs"), ([*md_, "--temperature-K", "-5"], "--temperature-K"),
        ([*md_, "--interval", "0"], "--interval"), ([*md_, "--checkpoint-interval", "0"], "--checkpoint-interval"),
        ([*md_, "--skin", "-1"], "--skin"), ([*md_, "--friction-per-fs", "inf"], "--friction-per-fs"),
        ([*md_, "--thermostat", "berendsen"], "thermostat"), ([*md_, "--ensemble", "npt"], "--ensemble"),
        ([*md_, "--device", "tpu"], "tpu"), ([*md_, "--compile", "fast"], "fast"), ([*md_, "--model", "nope"], "nope"),
        ([*md_, "--restart", WORK / "none.pt", "--steps", "5"], "none.pt"),
        (["md", WORK / "missing.xyz"], "missing.xyz"), (["md", garbage, "--model", tiny], "garbage"),
        (["relax", inp, "--model", tiny, "--fmax", "0"], "--fmax"), (["relax", inp, "--model", tiny, "--max-steps", "-1"], "--max-steps"),
        (["relax", inp, "--model", tiny, "--optimizer", "bfgs"], "optimizer"), (["relax", garbage, "--model", tiny], "garbage"),
        (["adsorption", bulk_file, "--adsorbate", "O", "--model", tiny], "vacuum"),
        (["adsorption", slab_file, "--adsorbate", "Xyz", "--model", tiny], "Xyz"),
        (["adsorption", slab_file, "--adsorbate", "O", "--distance", "nan", "--model", tiny], "--distance"),
        (["adsorption", slab_file, "--adsorbate", "O", "--sites", "everywhere", "--model", tiny], "everywhere"),
        (["info", WORK / "missing.eqm"], "missing.eqm"), (["info", garbage], "garbage"),
        (["export", WORK / "missing.eqm"], "missing.eqm"),
    ]
    for argv, mention in bad:
        label = " ".join(str(a) for a in argv if not str(a).startswith(str(WORK)))
        case(cls, f"eqcalc {label}"[:90], mention=mention)(lambda argv=argv: cli(*argv))

    cls = "data readers"
    from potentials.data import read_dataset
    from eqcalc.engine.drivers import read_structures
    empty = WORK / "empty.xyz"
    empty.write_text("")
    nolabels = WORK / "nolabels.extxyz"
    ase.io.write(nolabels, cu(1))
    nan_forces = WORK / "nan.extxyz"
    from ase.calculators.singlepoint import SinglePointCalculator
    a = cu(1)
    a.calc = SinglePointCalculator(a, energy=1.0, forces=np.full((4, 3), np.nan))
    ase.io.write(nan_forces, a)
    not_db = WORK / "x.db"
    not_db.write_bytes(os.urandom(300))
    for path, mention in ((garbage, "garbage"), (empty, "empty"), (nolabels, "missing"), (nan_forces, "NaN"),
                          (not_db, "database"), (WORK / "none.xyz", "does not exist")):
        case(cls, f"read_dataset({path.name})", mention=mention)(lambda path=path: read_dataset(path))
    for path in (garbage, empty, WORK / "none.xyz", WORK):
        case(cls, f"read_structures({path.name})", mention=path.name)(lambda path=path: read_structures([str(path)]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="benchmarks/results")
    parser.add_argument("--quick", action="store_true", help="no AOTInductor compiles, no subprocess kills")
    parser.add_argument("--only", default=None, help="run only the fault class containing this text")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    os.environ.setdefault("EQCALC_CACHE", str(WORK / "session-cache"))
    for make in (structure_cases, neighbor_cases, lambda: model_file_cases(args.quick), simulation_cases,
                 lambda: run_folder_cases(args.quick), lambda: cache_cases(args.quick), cli_cases):
        make()
    if args.only:
        CASES[:] = [c for c in CASES if args.only in c[0]]
    rows = []
    start = time.perf_counter()
    from tqdm.auto import tqdm
    for cls, name, expect, mention, fn in tqdm(CASES, desc="fault cases"):
        t0 = time.perf_counter()
        outcome, kind, message = run_case(expect if expect != "either" else "error", mention, fn)
        if expect == "either" and outcome == "silent wrong" and message.startswith("no error (returned True"):
            outcome = "correct"  # a harmless byte: loaded with identical numbers
        rows.append({"class": cls, "case": name, "expect": expect, "outcome": outcome, "error": kind,
                     "seconds": round(time.perf_counter() - t0, 2), "message": message.replace("\n", " ")[:300]})
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "faults.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = defaultdict(Counter)
    for r in rows:
        table[r["class"]][r["outcome"]] += 1
    print(f"\n{len(rows)} cases in {time.perf_counter() - start:.0f} s -> {out / 'faults.csv'}\n")
    print("| fault class | cases | " + " | ".join(OUTCOMES) + " |")
    print("|---|---|" + "---|" * len(OUTCOMES))
    for cls, counts in table.items():
        print(f"| {cls} | {sum(counts.values())} | " + " | ".join(str(counts[o]) for o in OUTCOMES) + " |")
    total = Counter(r["outcome"] for r in rows)
    print(f"| **all** | {len(rows)} | " + " | ".join(str(total[o]) for o in OUTCOMES) + " |")
    for r in rows:
        if r["outcome"] not in ("typed error", "correct"):
            print(f"  {r['outcome']}: {r['class']} / {r['case']}: {r['error']} {r['message'][:200]}")
    shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
