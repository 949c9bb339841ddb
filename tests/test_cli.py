"""The eqcalc command line: help with examples, model cards, export, bench, typed-error exits."""
import json

import numpy as np
import pytest
import torch
from ase.build import bulk

from eqcalc import EquivariantCalculator
from eqcalc.atoms import to_tensors
from eqcalc.cli import build_parser, main
from eqcalc.neighbors import compute_neighbors

COMMANDS = ["demo", "info", "export", "bench"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([command, "--help"])
    assert exit_.value.code == 0
    assert f"example:\n  eqcalc {command}" in capsys.readouterr().out


def test_info_prints_the_card_of_the_shipped_model(capsys):
    assert main(["info", "default"]) == 0
    out = capsys.readouterr().out
    assert "painn" in out and "cutoff     5.0 Å" in out and "forces_mae_meV_per_A" in out
    assert "frames of ASE EMT" in out  # the data the model was trained on
    speed = next(line for line in out.splitlines() if line.startswith("speed"))
    assert float(speed.split()[1]) > 0 and "atom-steps/s" in speed
    assert main(["info", "default", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["architecture"] == "painn"


def test_bad_model_exits_2_with_the_fix(capsys):
    assert main(["info", "/nonexistent.eqm"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_export_torchscript_runs_like_eager(package_path, tmp_path):
    path = package_path("schnet", "float64")
    out = tmp_path / "schnet.pt"
    assert main(["export", path, "--format", "torchscript", "--device", "cpu", "-o", str(out)]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["export"]["format"] == "torchscript" and meta["cutoff"] == 5.0
    exported = torch.jit.load(str(out))  # our own file, just written: trusted
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
    atoms.rattle(0.05, seed=0)
    t = to_tensors([atoms])
    edge_index, shifts = compute_neighbors(t.positions, t.cell, t.pbc, meta["cutoff"], t.system)
    species = torch.zeros_like(t.numbers)  # all Cu: species index of "Cu" is 0 in this package
    got = exported(t.positions, t.cell, species, edge_index, shifts.double(), t.system)
    ref = EquivariantCalculator(path, compile="eager").predict([atoms])[0]
    assert float(got["energy"][0]) == pytest.approx(ref["energy"], rel=1e-12)
    np.testing.assert_allclose(got["forces"].numpy(), ref["forces"], atol=1e-10)


def emt_co_on_pt111():
    """E_ads of CO on top of Pt(111) (3x3x4, bottom two layers fixed) relaxed with ASE's EMT and
    BFGS, built here as the demo describes it: the reference the demo's model is compared with."""
    from ase import Atoms
    from ase.build import add_adsorbate, fcc111
    from ase.constraints import FixAtoms

    from tests.reference import emt_relaxed as relaxed

    slab = fcc111("Pt", (3, 3, 4), vacuum=10.0)
    slab.set_constraint(FixAtoms(mask=slab.get_tags() >= 3))
    ads = slab.copy()
    add_adsorbate(ads, Atoms("CO", positions=[[0, 0, 0], [0, 0, 1.15]]), 1.85, "ontop")
    ads.set_constraint(FixAtoms(mask=ads.get_tags() >= 3))
    co = Atoms("CO", positions=[[0, 0, 0], [0, 0, 1.15]], cell=[12, 12, 12])
    co.center()
    ads = relaxed(ads)
    e_ads = ads.get_potential_energy() - relaxed(slab).get_potential_energy() - relaxed(co).get_potential_energy()
    top = ads.positions[:36][ads.get_tags()[:36] == 1, 2].mean()
    return e_ads, ads.positions[36, 2] - top


def test_demo_from_the_command_line(tmp_path, capsys):
    """``eqcalc demo`` as a user runs it (the command's own argument parsing and entry point):
    exits 0, prints the table, and its numbers hold up against EMT relaxed independently here
    (the model's E_ads within 0.03 eV and CO height within 0.03 Å of EMT; measured 0.003 eV and
    0.004 Å), with a trajectory of the NVT run."""
    import ase.io

    out = tmp_path / "demo"
    assert main(["demo", "--output-dir", str(out), "--steps", "10", "--device", "cpu"]) == 0
    stdout = capsys.readouterr().out
    result = json.loads((out / "summary.json").read_text())
    model, emt = result["model_result"], result["emt_result"]
    assert all(v for k, v in {**model, **emt}.items() if k.startswith("converged"))
    e_ads, height = emt_co_on_pt111()
    assert emt["E_ads_eV"] == pytest.approx(e_ads, abs=1e-3) and emt["height_A"] == pytest.approx(height, abs=1e-3)
    assert model["E_ads_eV"] == pytest.approx(e_ads, abs=0.03) and model["height_A"] == pytest.approx(height, abs=0.03)
    row = next(line for line in stdout.splitlines() if line.startswith("E_ads (eV)"))
    assert [float(x) for x in row.split()[2:]] == pytest.approx(
        [model["E_ads_eV"], emt["E_ads_eV"], model["E_ads_eV"] - emt["E_ads_eV"]], abs=1e-3)
    frames = ase.io.read(out / "md.extxyz", ":")
    assert len(frames) == 3 and all(len(f) == 38 for f in frames)  # steps 0, 5, 10
    fixed = frames[0].constraints[0].index
    assert len(fixed) == 18 and np.array_equal(frames[0].positions[fixed], frames[-1].positions[fixed])
    assert np.abs(frames[-1].positions - frames[0].positions).max() > 1e-3
    assert (out / "md.png").stat().st_size > 0


def test_bench_neighbors_writes_csv_and_png(tmp_path, capsys):
    assert main(["bench", "--what", "neighbors", "--atoms", "108", "--repeats", "1",
                 "--output-dir", str(tmp_path)]) == 0
    assert (tmp_path / "neighbors.csv").exists() and (tmp_path / "neighbors.png").exists()
    assert "ratio_to_vesin" in (tmp_path / "neighbors.csv").read_text()


def test_bench_model_times_every_compiled_form(package_path, tmp_path, capsys):
    """``eqcalc bench --what model``: one row per compiled form and size in model_step.csv (eager
    is the 1.0 reference), a PNG, and the table printed."""
    import csv

    path = package_path("schnet", "float32")  # its AOTInductor build is shared with the tests below
    assert main(["bench", "--what", "model", "--model", path, "--atoms", "32", "--device", "cpu",
                 "--output-dir", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "model_step.csv")))
    assert [(r["form"], int(r["atoms"])) for r in rows] == [("eager", 32), ("torchscript", 32), ("aoti", 32)]
    assert all(float(r["step_ms"]) > 0 for r in rows) and float(rows[0]["speedup_vs_eager"]) == 1.0
    for r in rows[1:]:
        assert float(r["speedup_vs_eager"]) == pytest.approx(float(rows[0]["step_ms"]) / float(r["step_ms"]), rel=0.02, abs=0.006)  # printed to 2 decimals
    assert (tmp_path / "model_step.png").stat().st_size > 0
    assert "speedup_vs_eager" in capsys.readouterr().out


def test_export_aoti_writes_a_loadable_package(package_path, tmp_path):
    path = package_path("schnet", "float32")
    out = tmp_path / "schnet.pt2"
    assert main(["export", path, "--format", "aoti", "--device", "cpu", "-o", str(out)]) == 0
    loaded = torch._inductor.aoti_load_package(str(out))
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 3))
    atoms.rattle(0.05, seed=1)
    t = to_tensors([atoms])
    edge_index, shifts = compute_neighbors(t.positions, t.cell, t.pbc, 5.0, t.system)
    got = loaded(t.positions, t.cell, torch.zeros_like(t.numbers), edge_index, shifts.double(), t.system)
    ref = EquivariantCalculator(path, compile="eager").predict([atoms])[0]
    np.testing.assert_allclose(got["forces"].numpy(), ref["forces"], atol=5e-5 * np.abs(ref["forces"]).max())
