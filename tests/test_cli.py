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


def test_bench_neighbors_writes_csv_and_png(tmp_path, capsys):
    assert main(["bench", "--what", "neighbors", "--atoms", "108", "--repeats", "1",
                 "--output-dir", str(tmp_path)]) == 0
    assert (tmp_path / "neighbors.csv").exists() and (tmp_path / "neighbors.png").exists()
    assert "ratio_to_vesin" in (tmp_path / "neighbors.csv").read_text()


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
