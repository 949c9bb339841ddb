"""eqcalc.distributed on a LocalCluster (2 worker processes, 1 thread each): results equal the
single-machine engine, one complete database row per input, reruns compute nothing, a killed worker
loses nothing, a bad input fails alone, and nothing imports dask unless --scheduler is given."""
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import ase.db
import ase.io
import dask
import numpy as np
import pytest
from ase.build import bulk, fcc100, fcc111, molecule
from ase.constraints import FixAtoms
from distributed import Client, LocalCluster

from eqcalc.cli import main
from eqcalc.engine import md
from eqcalc.engine.drivers import run_md
from eqcalc.engine.neb import neb
from eqcalc.engine.relax import relax
from eqcalc.errors import ModelFileError
from eqcalc.model import Model
from eqcalc.workflows import adsorption as ads
from eqcalc.workflows import distributed as dist

RELAX = dict(fmax=0.02, max_steps=12)  # an untrained model: a fixed number of FIRE steps, the same path


@pytest.fixture(scope="module")
def model_path(package_path):
    return package_path("painn", "float64", features=8, num_interactions=2)


@pytest.fixture(scope="module")
def ref(model_path):
    return dist.ModelRef.of(model_path, device="cpu", dtype="float64")


@pytest.fixture(scope="module")
def potential(model_path):
    return md.ModelPotential(Model(model_path, device="cpu", compile="eager", dtype="float64"))


@pytest.fixture(scope="module")
def cluster():
    # one death allowed per batch: a batch that kills its worker twice is split (test below)
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                          silence_logs=50) as c:
            yield c


@pytest.fixture(scope="module")
def client(cluster):
    with Client(cluster) as c:
        yield c


def hops(n):
    """``n`` small reactions: O hopping fcc → hcp on Pt(111) 2x2x3 and Cu(111) 2x2x3 (bottom layer fixed)."""
    from ase.build import add_adsorbate

    pairs = []
    for k in range(n):
        ends = []
        for site in ("fcc", "hcp"):
            s = fcc111(("Pt", "Cu")[k % 2], (2, 2, 3), vacuum=5.0)
            add_adsorbate(s, "O", 1.3 + 0.05 * k, site)
            s.info.pop("adsorbate_info", None)
            s.set_constraint(FixAtoms(mask=s.get_tags() == 3))
            ends.append(s)
        pairs.append(tuple(ends))
    return pairs


def small_structures(n):
    """``n`` rattled small systems: Cu/Pt bulk, Pt(111) slabs with a fixed layer, CO, H2O."""
    out = []
    for k in range(n):
        kind = k % 4
        if kind == 0:
            a = bulk("Cu" if k % 8 else "Pt", "fcc", a=3.7 if k % 8 else 3.95, cubic=True)
        elif kind == 1:
            a = fcc111("Pt", (1, 1, 3), vacuum=4.0)
            a.info.pop("adsorbate_info", None)
            a.set_constraint(FixAtoms(mask=a.get_tags() == 3))
        elif kind == 2:
            a = molecule("CO")
            a.center(vacuum=3.0)
        else:
            a = molecule("H2O")
            a.center(vacuum=3.0)
        a.rattle(0.05, seed=k)
        out.append(a)
    return out


def rows(db_path):
    return list(ase.db.connect(str(db_path)).select())


def test_cluster_relax_equals_one_local_batch_fills_the_db_and_a_rerun_computes_nothing(
        client, cluster, ref, potential, tmp_path):
    structures = small_structures(200)
    names = [f"s{k:03d}.extxyz" for k in range(200)]
    db = tmp_path / "relax.db"
    report = dist.relax(client, structures, ref, names=names, db=str(db), progress=False, **RELAX)
    local = relax(structures, potential, **RELAX)

    assert (report.done, report.failed, report.skipped) == (200, 0, 0)
    assert set(report.workers) == set(cluster.scheduler_info["workers"])  # both workers computed
    n_atoms = np.array([len(a) for a in structures])
    energy = np.array([o.energy for o in report.outcomes])
    assert np.abs(energy - local.energy).max() / n_atoms.min() <= 1e-6  # eV/atom
    assert [o.values["steps"] for o in report.outcomes] == local.steps

    table = {r.name: r for r in rows(db)}
    assert len(table) == 200 and sorted(table) == names
    assert len({r.job_key for r in table.values()}) == 200
    for name, start, relaxed, e in zip(names, structures, local.structures, local.energy):
        r = table[name]
        assert r.status == "done" and r.kind == "relax" and r.model_sha256 == ref.sha256 and r.dtype == "float64"
        assert r.wall_s > 0 and r.worker in report.workers and r.batch_size >= 1
        assert r.energy == pytest.approx(e, abs=1e-6 * len(start))
        np.testing.assert_allclose(r.positions, relaxed.positions, atol=1e-8)
        np.testing.assert_allclose(r.forces, relaxed.get_forces(), atol=1e-6)
        assert len(r.constraints) == len(start.constraints)  # FixAtoms kept

    # each worker loaded the model once and kept it for all its batches
    assert sum(w["batches"] for w in report.workers.values()) > 2
    kept = client.run(lambda: [key[0] for key in dist._MODELS])
    assert all(models == [ref.sha256] for models in kept.values())

    again = dist.relax(client, structures, ref, names=names, db=str(db), progress=False, **RELAX)
    assert (again.done, again.failed, again.skipped) == (0, 0, 200) and again.workers == {}
    assert len(rows(db)) == 200
    np.testing.assert_allclose([o.energy for o in again.outcomes], energy, atol=1e-10)


def test_bad_inputs_fail_alone_with_their_reason(client, ref, potential, tmp_path):
    good = small_structures(8)
    iron = bulk("Fe", "bcc", a=2.87)               # an element the model does not know
    overlap = molecule("CO")                        # passes the input checks, fails in the model
    overlap.center(vacuum=3.0)
    overlap.positions[1] = overlap.positions[0] + [0.0, 0.0, 0.05]
    inputs = good[:3] + [iron] + good[3:6] + [overlap] + good[6:]
    names = [f"in{k}" for k in range(len(inputs))]
    db = tmp_path / "bad.db"
    report = dist.relax(client, inputs, ref, names=names, db=str(db), batch_atoms=10 ** 6, progress=False, **RELAX)

    assert (report.done, report.failed) == (8, 2)
    table = {r.name: r for r in rows(db)}
    assert table["in3"].status == "failed" and "Fe" in table["in3"].error and "UnknownElementError" in table["in3"].error
    assert table["in7"].status == "failed" and "overlap" in table["in7"].error
    local = relax(good, potential, **RELAX)
    done = [table[n] for n in names if n not in ("in3", "in7")]
    assert all(r.status == "done" for r in done)
    np.testing.assert_allclose([r.energy for r in done], local.energy, atol=1e-8)

    again = dist.relax(client, inputs, ref, names=names, db=str(db), progress=False, **RELAX)
    assert (again.done, again.failed, again.skipped) == (0, 2, 8)  # the failed ones are retried, the rest kept
    assert len(rows(db)) == 10  # retried rows overwritten, not duplicated


def test_a_worker_with_other_weights_stops_the_run(ref):
    wrong = dist.ModelRef(**{**ref.__dict__, "sha256": "0" * 64})
    with pytest.raises(ModelFileError, match="other weights"):
        dist.relax(None, small_structures(1), wrong, progress=False, **RELAX)


@dataclass(frozen=True)
class DyingRelax(dist.Relax):
    """Relax that kills its worker process the first time it runs (a marker file remembers)."""

    marker: str = ""

    def run(self, items, potential, keys):
        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        return super().run(items, potential, keys)


@dataclass(frozen=True)
class CrashingRelax(dist.Relax):
    """Relax whose worker process dies whenever its batch holds an input marked ``info['crash']``."""

    def run(self, items, potential, keys):
        if any(a.info.get("crash") for a in items):
            os._exit(1)
        return super().run(items, potential, keys)


def test_a_killed_worker_loses_no_result_and_writes_none_twice(client, ref, potential, tmp_path):
    structures = small_structures(24)
    marker = tmp_path / "killed-once"
    kind = DyingRelax(marker=str(marker), **RELAX)
    jobs = [dist.Job(name=f"k{k}", item=a) for k, a in enumerate(structures)]
    db = tmp_path / "killed.db"
    report = dist.screen(client, kind, jobs, ref, db=str(db), batch_atoms=30, progress=False)
    assert marker.exists()  # a worker did die
    assert (report.done, report.failed) == (24, 0)
    table = rows(db)
    assert sorted(r.name for r in table) == sorted(j.name for j in jobs)  # all there, none twice
    local = relax(structures, potential, **RELAX)
    by_name = {r.name: r.energy for r in table}
    np.testing.assert_allclose([by_name[f"k{k}"] for k in range(24)], local.energy, atol=1e-8)


def test_an_input_that_kills_every_worker_is_isolated_and_recorded(client, ref, tmp_path):
    structures = small_structures(2)
    structures[1].info["crash"] = True  # its batch kills 2 workers, is split, then it alone kills 2
    jobs = [dist.Job(name=f"c{k}", item=a) for k, a in enumerate(structures)]
    report = dist.screen(client, CrashingRelax(**RELAX), jobs, ref, db=str(tmp_path / "crash.db"),
                         batch_atoms=10 ** 6, progress=False)
    assert [o.status for o in report.outcomes] == ["done", "failed"]
    assert "KilledWorker" in report.outcomes[1].error
    assert [r.status for r in rows(tmp_path / "crash.db")] == ["done", "failed"]


def test_inputs_that_waited_on_a_crashing_worker_are_not_blamed(ref, potential, tmp_path):
    # one worker that takes every task at once: the inputs waiting behind the crashing one are on
    # the worker it kills, twice, and the scheduler counts both deaths against them too
    structures = small_structures(4)
    structures[0].info["crash"] = True
    jobs = [dist.Job(name=f"w{k}", item=a) for k, a in enumerate(structures)]
    with dask.config.set({"distributed.scheduler.allowed-failures": 1,
                          "distributed.scheduler.worker-saturation": "inf"}):
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                          silence_logs=50) as cluster, Client(cluster) as one:
            report = dist.screen(one, CrashingRelax(**RELAX), jobs, ref, db=str(tmp_path / "wait.db"),
                                 batch_atoms=1, progress=False)
    assert [o.status for o in report.outcomes] == ["failed", "done", "done", "done"]
    local = relax(structures[1:], potential, **RELAX)
    np.testing.assert_allclose([o.energy for o in report.outcomes[1:]], local.energy, atol=1e-8)


def test_adsorption_on_the_cluster_equals_the_single_machine_table(client, ref, potential, tmp_path):
    pt = fcc111("Pt", (2, 2, 3), vacuum=6.0)
    cu = fcc100("Cu", (2, 2, 3), vacuum=6.0)
    slabs = []
    for slab in (pt, cu):
        slab.info.pop("adsorbate_info", None)
        slab.set_constraint(FixAtoms(mask=slab.get_tags() == 3))
        slabs.append(slab)
    db = tmp_path / "ads.db"
    settings = dict(fmax=0.02, max_steps=8)
    report = dist.adsorption(client, slabs, ["O", "CO"], ref, names=["pt.extxyz", "cu.extxyz"], db=str(db),
                             progress=False, batch_atoms=60, **settings)
    assert report.failed == 0
    table = rows(db)
    n_sites = 0
    for name, slab in zip(["pt.extxyz", "cu.extxyz"], slabs):
        for adsorbate in ("O", "CO"):
            single = ads.adsorption_energies(slab, adsorbate, potential, **settings)
            mine = {r.site: r for r in table if r.role == "placement" and r.name == name and r.adsorbate == adsorbate}
            assert set(mine) == {row["site"] for row in single.rows}
            for row in single.rows:
                r = mine[row["site"]]
                assert r.E_ads_eV == pytest.approx(row["E_ads_eV"], abs=1e-8)
                assert r.height_A == pytest.approx(row["height_A"], abs=1e-8)
                assert r.steps == row["steps"] and r.status == "done"
            n_sites += len(single.rows)
    roles = [r.role for r in table]
    assert roles.count("placement") == n_sites and roles.count("slab") == 2 and roles.count("gas") == 2

    again = dist.adsorption(client, slabs, ["O", "CO"], ref, names=["pt.extxyz", "cu.extxyz"], db=str(db),
                            progress=False, **settings)
    assert again.done == 0 and again.skipped == len(table) and len(rows(db)) == len(table)


def test_nve_on_the_cluster_equals_one_local_batch(client, ref, potential, tmp_path):
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    structures = small_structures(8)
    for k, a in enumerate(structures):
        MaxwellBoltzmannDistribution(a, temperature_K=300, rng=np.random.default_rng(k))
    integrator = md.NVE(1.0)
    report = dist.md(client, structures, integrator, 20, ref, db=str(tmp_path / "md.db"), log_interval=5,
                     batch_atoms=12, progress=False)
    local = run_md(structures, potential, integrator, 20, interval=5)
    final = md.to_atoms(local.state, structures)
    assert report.done == 8 and sum(w["batches"] for w in report.workers.values()) >= 2
    for s, (o, atoms) in enumerate(zip(report.outcomes, final)):
        np.testing.assert_allclose(o.atoms.positions, atoms.positions, atol=1e-10)
        np.testing.assert_allclose(o.atoms.get_momenta(), atoms.get_momenta(), atol=1e-10)
        np.testing.assert_allclose(o.data["etot_eV"], local.log["etot_eV"][:, s], atol=1e-10)
    for r in rows(tmp_path / "md.db"):
        assert r.data["step"].tolist() == [0, 5, 10, 15, 20] and r.momenta.any()


def test_neb_on_the_cluster_equals_one_local_batch(client, ref, potential, tmp_path):
    pairs = hops(4)
    settings = dict(n_images=5, fmax=0.05, max_steps=6, relax_endpoints=False, check_saddles=False)
    report = dist.neb(client, pairs, ref, names=[f"hop{k}" for k in range(4)], db=str(tmp_path / "neb.db"),
                      batch_atoms=70, progress=False, **settings)  # 13 atoms x 5 images: one band a batch
    local = neb(pairs, potential, **settings)
    assert report.done == 4 and sum(w["batches"] for w in report.workers.values()) == 4
    table = {r.name: r for r in rows(tmp_path / "neb.db")}
    for k, (o, band) in enumerate(zip(report.outcomes, local)):
        assert o.values["barrier_eV"] == pytest.approx(band.barrier, abs=1e-8)
        np.testing.assert_allclose(o.data["energies"], band.energies, atol=1e-8)
        np.testing.assert_allclose(o.data["positions"], [a.positions for a in band.images], atol=1e-8)
        r = table[f"hop{k}"]
        assert r.kind == "neb" and r.status == "done" and r.steps == band.steps
        assert r.energy == pytest.approx(band.energies[band.climbing_image], abs=1e-8)  # the row is the climbing image
        assert r.reaction_energy_eV == pytest.approx(band.reaction_energy, abs=1e-8)


def test_the_commands_with_scheduler(cluster, model_path, tmp_path, capsys):
    files = []
    for k, a in enumerate(small_structures(3)):
        files.append(str(tmp_path / f"in{k}.extxyz"))
        ase.io.write(files[-1], a)
    common = ["--model", model_path, "--dtype", "float64", "--device", "cpu", "--scheduler", cluster.scheduler_address]
    db = tmp_path / "cli.db"
    assert main(["relax", *files, "--fmax", "10", *common, "--db", str(db)]) == 0  # fmax 10: converged
    assert sorted(r.name for r in rows(db)) == files
    assert "3 inputs: 3 done, 0 failed, 0 skipped" in capsys.readouterr().out
    # a bad option is the user's, said once before any work, not recorded as 3 failed inputs
    assert main(["relax", *files, "--fmax", "-1", *common, "--db", str(tmp_path / "none.db")]) == 2
    err = capsys.readouterr().err
    assert "--fmax" in err and "-1" in err and "> 0" in err and not (tmp_path / "none.db").exists()

    slab = fcc111("Pt", (2, 2, 3), vacuum=6.0)
    slab.info.pop("adsorbate_info", None)
    ase.io.write(tmp_path / "pt.extxyz", slab)
    out = tmp_path / "ads"
    code = main(["adsorption", str(tmp_path / "pt.extxyz"), "--adsorbate", "O", "H", "--fmax", "10", *common,
                 "--output-dir", str(out)])
    assert code == 0 and "best site" in capsys.readouterr().out
    table = rows(out / "results.db")  # the default database with --scheduler
    assert {r.role for r in table} == {"placement", "slab", "gas"}
    assert {r.adsorbate for r in table if r.role == "placement"} == {"O", "H"}

    code = main(["md", *files, "--ensemble", "nve", "--steps", "4", "--interval", "2", *common,
                 "--output-dir", str(tmp_path / "md"), "--no-progress"])
    assert code == 0 and len(rows(tmp_path / "md" / "results.db")) == 3

    ends = []
    for k, pair in enumerate(hops(2)):
        for end, atoms in zip(("is", "fs"), pair):
            ends.append(str(tmp_path / f"hop{k}_{end}.extxyz"))
            ase.io.write(ends[-1], atoms)
    code = main(["neb", *ends, "--images", "5", "--fmax", "10", "--no-saddle-check", *common,
                 "--output-dir", str(tmp_path / "neb"), "--no-progress"])
    assert code == 0
    assert sorted(r.name for r in rows(tmp_path / "neb" / "results.db")) == [f"{a} -> {b}" for a, b in zip(ends[::2], ends[1::2])]


def _run(code, cwd):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_without_scheduler_nothing_imports_dask(model_path, tmp_path):
    ase.io.write(tmp_path / "co.xyz", small_structures(3)[2])
    code = f"""
import sys
import eqcalc, eqcalc.distributed
from eqcalc.cli import main
args = ["{tmp_path / 'co.xyz'}", "--model", "{model_path}", "--device", "cpu", "--max-steps", "2"]
main(["relax", *args, "--output-dir", "{tmp_path / 'plain'}"])
main(["relax", *args, "--db", "{tmp_path / 'local.db'}"])
assert not any(m == "dask" or m.startswith(("dask.", "distributed")) for m in sys.modules), sys.modules.keys()
print("no dask")
"""
    result = _run(code, tmp_path)
    assert result.returncode == 0 and "no dask" in result.stdout, result.stderr
    assert (tmp_path / "plain" / "co.extxyz").exists() and len(rows(tmp_path / "local.db")) == 1


def test_ctrl_c_leaves_a_consistent_db_and_a_rerun_resumes(model_path, ref, tmp_path):
    structures = small_structures(120)  # ~10 s of work: the interrupt lands inside it
    files = []
    for k, a in enumerate(structures):
        files.append(str(tmp_path / f"i{k:03d}.extxyz"))
        ase.io.write(files[-1], a)
    db = tmp_path / "resume.db"
    argv = ["relax", *files, "--model", model_path, "--dtype", "float64", "--device", "cpu", "--max-steps", "12",
            "--fmax", "0.02", "--db", str(db), "--batch-atoms", "1"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    # SIGINT back to its default in the child: Python started with SIGINT ignored (inherited; in the
    # full suite something before this test leaves it ignored) never raises KeyboardInterrupt
    proc = subprocess.Popen([sys.executable, "-m", "eqcalc.cli", *argv], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if db.exists() and len(rows(db)) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err  # interrupted mid-run, said so
    assert "run the same command again to resume" in err
    before = rows(db)
    assert 2 <= len(before) < 120 and all(r.status == "done" for r in before)
    assert len({r.name for r in before}) == len(before)

    from eqcalc.engine.drivers import read_structures

    report = dist.relax(None, read_structures(files), ref, names=files, db=str(db), progress=False, **RELAX)
    assert report.skipped == len(before) and report.done == 120 - len(before)
    after = rows(db)
    assert sorted(r.name for r in after) == files
