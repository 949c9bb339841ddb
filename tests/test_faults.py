"""Faults a run meets in practice: a kill during a run, a full disk, a corrupt or unwritable
compiled-form cache, two runs into one folder, an exploding simulation. Each leaves readable
files, an intact last checkpoint and a typed error, and a restart continues exactly."""
import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from ase.build import bulk

from eqcalc import EquivariantCalculator, compile as compiled, errors, outputs
from eqcalc.cli import main
from eqcalc.engine import md
from eqcalc.engine.drivers import CHECKPOINT, load_checkpoint, run_md
from eqcalc.engine.relax import relax
from tests.md_potentials import MorsePotential

ROOT = Path(__file__).resolve().parents[1]


def cu(repeat=2, seed=0):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(repeat)
    atoms.rattle(0.05, seed=seed)
    return atoms


@pytest.fixture
def cu_file(tmp_path):
    path = tmp_path / "cu.extxyz"
    ase.io.write(path, cu())
    return path


@pytest.fixture(scope="module")
def tiny(package_path):
    return package_path("painn", "float64", features=8, num_interactions=2)


def md_args(inp, model, out, steps, *extra):
    return ["md", str(inp), "--model", str(model), "--compile", "eager", "--device", "cpu", "--steps", str(steps),
            "--interval", "2", "--checkpoint-interval", "10", "--temperature-K", "600", "--output-dir", str(out),
            "--no-progress", *extra]


def spawn(args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "eqcalc.cli", *args], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_for(condition, process, timeout=300):
    def holds():
        try:
            return condition()
        except Exception:  # a file read while the run appends to it: look again
            return False

    start = time.perf_counter()
    while not holds():
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.perf_counter() - start < timeout, "the run did not get there in time"
        time.sleep(0.05)


def steps_in(path):
    """Steps of the frames in ``path`` (none while a starting run has not written its first)."""
    return [f.info["step"] for f in ase.io.read(path, ":")] if path.exists() and path.stat().st_size else []


# ---- kill during a run --------------------------------------------------------------------------
def test_sigkill_mid_run_then_restart_continues_exactly(tmp_path, cu_file, tiny):
    """SIGKILL a live `eqcalc md`, add half a frame as a kill inside a write would leave, then
    --restart: the half frame and frames after the checkpoint are cut, the run continues, and
    its last frame equals an uninterrupted run's bit for bit."""
    run = tmp_path / "run"
    process = spawn(md_args(cu_file, tiny, run, 100000))
    wait_for(lambda: (run / CHECKPOINT).exists() and len(steps_in(run / "cu.extxyz")) > 8, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    with open(run / "cu.extxyz", "ab") as f:  # a frame cut mid-write
        f.write(b"32\nLattice=\"7.22 0 0 0 7.22 0 0 0 7.22\" step=99999 Properties=species:S:1:pos:R:3\nCu 0.1 0.")
    with open(run / "md.log", "a") as f:
        f.write("   99999  0.1")
    step = load_checkpoint(run / CHECKPOINT)[0].step
    target = step + 20
    assert main(md_args(cu_file, tiny, run, target, "--restart", str(run / CHECKPOINT))) == 0
    assert main(md_args(cu_file, tiny, tmp_path / "ref", target)) == 0
    assert steps_in(run / "cu.extxyz") == list(range(0, target + 1, 2))  # each frame once
    resumed, reference = ase.io.read(run / "cu.extxyz"), ase.io.read(tmp_path / "ref" / "cu.extxyz")
    np.testing.assert_array_equal(resumed.positions, reference.positions)
    np.testing.assert_array_equal(resumed.get_momenta(), reference.get_momenta())
    log = np.loadtxt(run / "md.log")
    assert log[:, 0].tolist() == list(range(0, target + 1, 2))


# ---- full disk -----------------------------------------------------------------------------------
@pytest.mark.parametrize("calls", [12, 15, 23])  # after the first checkpoint (step 4, call 11)
def test_full_disk_mid_frame_keeps_files_readable_and_restart_exact(tmp_path, calls):
    integrator = md.Langevin(2.0, 500.0)
    kwargs = dict(temperature_K=500, seed=3, interval=1, checkpoint_interval=4)
    reference = run_md([cu()], MorsePotential(), integrator, 16, **kwargs).state
    with outputs.simulated_full_disk(calls), pytest.raises(errors.OutputError, match="cut back to its last"):
        run_md([cu()], MorsePotential(), integrator, 16, output_dir=tmp_path, **kwargs)
    written = steps_in(tmp_path / "system0.extxyz")  # every frame left is complete
    assert written == list(range(len(written)))
    state, _, _ = load_checkpoint(tmp_path / CHECKPOINT)  # the last checkpoint is intact
    assert state.step % 4 == 0 and state.step <= written[-1] + 1
    resumed = run_md([cu()], MorsePotential(), integrator, 16, output_dir=tmp_path,
                     restart=tmp_path / CHECKPOINT, **kwargs).state
    assert torch.equal(resumed.positions, reference.positions)
    assert steps_in(tmp_path / "system0.extxyz") == list(range(17))


def test_full_disk_during_checkpoint_leaves_the_previous_one(tmp_path, monkeypatch):
    run_md([cu()], MorsePotential(), md.NVE(1.0), 4, temperature_K=300, checkpoint_interval=4, output_dir=tmp_path)

    def torch_save_then_enospc(obj, f):
        f.write(b"\x80\x02partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", torch_save_then_enospc)
    with pytest.raises(errors.OutputError, match="previous version is intact"):
        run_md([cu()], MorsePotential(), md.NVE(1.0), 12, checkpoint_interval=4, output_dir=tmp_path,
               restart=tmp_path / CHECKPOINT)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / CHECKPOINT)[0].step == 4
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# ---- restart checks ------------------------------------------------------------------------------
def test_restart_refuses_other_model_and_steps_not_beyond_the_checkpoint(tmp_path, package_path, tiny):
    other = package_path("schnet", "float64")
    run_md([cu(1)], md.ModelPotential(tiny), md.NVE(1.0), 4, temperature_K=300, checkpoint_interval=4,
           output_dir=tmp_path)
    with pytest.raises(errors.CheckpointError, match="another model"):
        run_md([cu(1)], md.ModelPotential(other), md.NVE(1.0), 8, output_dir=tmp_path, restart=tmp_path / CHECKPOINT)
    with pytest.raises(errors.InvalidOptionError, match="at or below the checkpoint's step 4"):
        run_md([cu(1)], md.ModelPotential(tiny), md.NVE(1.0), 4, output_dir=tmp_path, restart=tmp_path / CHECKPOINT)
    with pytest.raises(errors.CheckpointError, match="NVE"):
        run_md([cu(1)], md.ModelPotential(tiny), md.NVE(2.0), 8, output_dir=tmp_path, restart=tmp_path / CHECKPOINT)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(errors.CheckpointError, match="not an eqcalc MD checkpoint"):
        run_md([cu(1)], md.ModelPotential(tiny), md.NVE(1.0), 8, output_dir=tmp_path, restart=tmp_path / "bad.pt")


# ---- concurrent runs -----------------------------------------------------------------------------
def test_second_run_into_a_live_runs_folder_is_refused(tmp_path):
    with outputs.FolderLock(tmp_path):
        with pytest.raises(errors.RunFolderBusyError, match=f"pid {os.getpid()}"):
            run_md([cu(1)], MorsePotential(), md.NVE(1.0), 2, output_dir=tmp_path)
    run_md([cu(1)], MorsePotential(), md.NVE(1.0), 2, output_dir=tmp_path)  # free again


def test_concurrent_cli_runs_one_refused_then_a_killed_runs_folder_taken_over(tmp_path, cu_file, tiny, capsys):
    run = tmp_path / "run"
    first = spawn(md_args(cu_file, tiny, run, 100000))
    wait_for(lambda: len(steps_in(run / "cu.extxyz")) > 2, first)
    assert main(md_args(cu_file, tiny, run, 20)) == 2
    assert "in use by a run that is still going" in capsys.readouterr().err
    assert first.poll() is None  # the first run never noticed
    first.send_signal(signal.SIGKILL)
    first.wait()
    frames = steps_in(run / "cu.extxyz")  # still readable after the kill
    assert frames == list(range(0, 2 * len(frames), 2))
    assert main(md_args(cu_file, tiny, run, 20)) == 0  # the dead run's lock is taken over
    assert steps_in(run / "cu.extxyz") == list(range(0, 21, 2))


# ---- exploding simulations -----------------------------------------------------------------------
def test_exploding_md_stops_non_zero_with_files_intact(tmp_path, cu_file, capsys):
    """The issue's case: the shipped model with a 50 fs time step reached 3e6 K by step 5 and
    exited 0. Now: exit 2 naming the system and step, frames readable, checkpoint before it."""
    out = tmp_path / "run"
    args = ["md", str(cu_file), "--timestep-fs", "50", "--steps", "200", "--interval", "1",
            "--checkpoint-interval", "1", "--compile", "eager", "--device", "cpu", "--output-dir", str(out),
            "--no-progress", "--ensemble", "nve", "--temperature-K", "600"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cu: system 0 left physics at step" in err and "checkpoint of step" in err
    frames = ase.io.read(out / "cu.extxyz", ":")
    state = load_checkpoint(out / CHECKPOINT)[0]
    assert 0 < len(frames) < 200 and state.step <= frames[-1].info["step"]
    assert float(md.temperature(md.NVE(50.0).init(state, md.ModelPotential("default")))) < md.MAX_TEMPERATURE_K


def test_relax_never_returns_nan_fmax():
    class NaNStress(MorsePotential):
        calls = 0

        def __call__(self, state):
            out = super().__call__(state)
            NaNStress.calls += 1
            return dict(out, stress=out["stress"] * float("nan")) if NaNStress.calls > 3 else out

    atoms = cu(1)
    with pytest.raises(errors.UnstableSimulationError, match="system 0 .* step 3"):
        relax([atoms], NaNStress(), cell=True, fmax=1e-6)


def test_relax_refuses_overlapping_atoms(package_path):
    atoms = cu(1)
    atoms.positions[1] = atoms.positions[0] + [0, 0, 0.17]
    with pytest.raises(errors.InvalidAtomsError, match=r"atoms 0 \(Cu\) and 1 \(Cu\) overlap: 0.17 Å"):
        relax([atoms], md.ModelPotential(package_path("schnet")))


# ---- compiled-form cache ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def aoti_entry(package_path, tmp_path_factory):
    """A real AOTInductor cache entry (compiled once here) and a pristine copy of it."""
    cache = tmp_path_factory.mktemp("cache")
    path = package_path("schnet", "float32", features=8, num_interactions=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EQCALC_CACHE", str(cache))
        calc = EquivariantCalculator(path, compile="aoti", device="cpu")
    entry = Path(f"{calc.model.aoti_key()}.pt2")
    assert (cache / entry).exists()
    pristine = tmp_path_factory.mktemp("pristine")
    for p in cache.iterdir():
        shutil.copy(p, pristine / p.name)
    return path, entry, pristine


def cache_with(tmp_path, monkeypatch, pristine):
    cache = tmp_path / "cache"
    shutil.copytree(pristine, cache)
    monkeypatch.setenv("EQCALC_CACHE", str(cache))
    monkeypatch.setattr(compiled, "_FALLBACK", {})
    monkeypatch.setattr(compiled, "_CHOICES", {})
    return cache


def replayed_compile(monkeypatch, pristine, entry, before=lambda target: None):
    """``export_aoti`` replaced by a copy of the pristine entry and its record (what a compile
    would write, without its minute); returns the list of targets it was called with."""
    targets = []

    def export(wrapper, example, target):
        targets.append(target)
        before(target)
        shutil.copy(pristine / (entry.name + ".json"), target.with_name(target.name + ".json"))
        shutil.copy(pristine / entry.name, target)
        return target

    monkeypatch.setattr(compiled, "export_aoti", export)
    return targets


def energies(calc, atoms):
    atoms = atoms.copy()
    atoms.calc = calc
    return atoms.get_potential_energy(), atoms.get_forces()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "no record"])
def test_damaged_cache_entry_is_rebuilt_with_a_warning(tmp_path, monkeypatch, caplog, aoti_entry, damage):
    path, entry, pristine = aoti_entry
    cache = cache_with(tmp_path, monkeypatch, pristine)
    target = cache / entry
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 3])
    elif damage == "garbage":
        target.write_bytes(os.urandom(target.stat().st_size))
    else:
        (cache / (entry.name + ".json")).unlink()
    rebuilt = replayed_compile(monkeypatch, pristine, entry)
    with caplog.at_level(logging.WARNING, logger="eqcalc"):
        calc = EquivariantCalculator(path, compile="aoti", device="cpu")
    assert rebuilt == [target] and str(target) in caplog.text and "rebuilding it" in caplog.text
    e, f = energies(calc, cu(1))
    e0, f0 = energies(EquivariantCalculator(path, compile="eager", device="cpu"), cu(1))
    assert abs(e - e0) < 1e-4 and np.abs(f - f0).max() < 1e-4


def test_auto_skips_a_damaged_entry_without_compiling(tmp_path, monkeypatch, caplog, aoti_entry):
    path, entry, pristine = aoti_entry
    cache = cache_with(tmp_path, monkeypatch, pristine)
    (cache / entry).write_bytes(b"PK\x03\x04 truncated")
    monkeypatch.setattr(compiled, "export_aoti", lambda *a: pytest.fail("auto must not compile on a CPU"))
    with caplog.at_level(logging.WARNING, logger="eqcalc"):
        calc = EquivariantCalculator(path, compile="auto", device="cpu")
    assert calc.model.compile_kind in ("eager", "torchscript") and str(cache / entry) in caplog.text


def test_unwritable_cache_is_detected_before_compiling(tmp_path, monkeypatch, caplog, aoti_entry):
    path, entry, pristine = aoti_entry
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")  # unwritable even for root
    monkeypatch.setenv("EQCALC_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(compiled, "_FALLBACK", {})
    def warned_first(target):
        assert "cannot be written" in caplog.text  # warned before any compiling

    where = replayed_compile(monkeypatch, pristine, entry, warned_first)
    with caplog.at_level(logging.WARNING, logger="eqcalc"):
        calc = EquivariantCalculator(path, compile="aoti", device="cpu")
    assert calc.model.compile_kind == "aoti" and not str(where[0]).startswith(str(blocker))
    assert np.isfinite(energies(calc, cu(1))[0])


def test_auto_choice_is_recorded_and_shared(tmp_path, monkeypatch, package_path):
    """Two calculators of one model (e.g. two NEB images) get the same form, the second
    without timing; a damaged record is ignored, not fatal."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("EQCALC_CACHE", str(cache))
    monkeypatch.setattr(compiled, "_FALLBACK", {})
    monkeypatch.setattr(compiled, "_CHOICES", {})
    path = package_path("schnet", "float64")
    first = EquivariantCalculator(path, compile="auto", device="cpu")
    record = next(cache.glob("auto-*.json"))
    monkeypatch.setattr(compiled, "best_time", lambda *a, **k: pytest.fail("the recorded choice is not re-timed"))
    second = EquivariantCalculator(path, compile="auto", device="cpu")
    assert second.model.compile_kind == first.model.compile_kind
    monkeypatch.setattr(compiled, "_CHOICES", {})  # a new process on this machine reads the file
    assert EquivariantCalculator(path, compile="auto", device="cpu").model.compile_kind == first.model.compile_kind
    record.write_text("{not json")
    monkeypatch.undo()
    monkeypatch.setenv("EQCALC_CACHE", str(cache))
    monkeypatch.setattr(compiled, "_CHOICES", {})
    assert EquivariantCalculator(path, compile="auto", device="cpu").model.compile_kind in ("eager", "torchscript")
