"""``eqcalc datagen`` and ``eqcalc train``: help with examples, data with labels, a loadable model."""
import subprocess
import sys

import numpy as np
import pytest
from ase.build import fcc111

from eqcalc import EquivariantCalculator
from eqcalc.cli import build_parser, main
from potentials.data import labels, read_dataset

ELEMENTS = ["Pt", "C", "O"]


@pytest.mark.parametrize("command", ["datagen", "train"])
def test_help_shows_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([command, "--help"])
    assert exit_.value.code == 0
    assert f"example:\n  eqcalc {command}" in capsys.readouterr().out


def test_import_eqcalc_cli_does_not_import_potentials():
    code = "import eqcalc, eqcalc.cli, sys; eqcalc.cli.build_parser(); assert 'potentials' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture(scope="module")
def datafile(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli-data") / "emt.xyz"
    assert main(["datagen", str(path), "--n-structures", "16", "--seed", "3", "--elements", *ELEMENTS]) == 0
    return path


def test_datagen_writes_labelled_frames(datafile):
    frames = read_dataset(datafile)
    assert len(frames) == 16
    assert {s for a in frames for s in a.get_chemical_symbols()} <= set(ELEMENTS)
    for a in frames:
        lab = labels(a)
        assert np.isfinite(lab["energy"]) and lab["forces"].shape == (len(a), 3)
        assert a.info["split"] in ("train", "val", "test")
    assert {a.info["split"] for a in frames} >= {"train", "val"}


def test_datagen_unknown_element_exits_2(tmp_path, capsys):
    assert main(["datagen", str(tmp_path / "x.xyz"), "--n-structures", "2", "--elements", "Xx"]) == 2
    assert "Xx" in capsys.readouterr().err


def test_train_writes_a_loadable_model(datafile, tmp_path, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        "# tiny recipe for the test\n"
        "architecture: painn\n"
        "model:\n  features: 8\n  num_interactions: 1\n  num_radial: 8\n"
        f"data: {datafile}\n"
        "batch_size: 4\nmax_steps: 50\nwarmup_steps: 2\nval_every: 4\nlr: 0.005\nseed: 1\n"
        "progress: false\nplots: false\npatience: 100\n"
        f"work_dir: {tmp_path / 'run'}\noutput: {tmp_path / 'unused.eqm'}\n")
    out = tmp_path / "tiny.eqm"
    assert main(["train", str(recipe), "--set", "max_steps=6", "--set", f"output={out}"]) == 0
    assert str(out) in capsys.readouterr().out
    calc = EquivariantCalculator(str(out), device="cpu", compile="eager")
    assert calc.metadata["architecture"] == "painn"
    assert calc.metadata["training"]["steps"] == 6
    atoms = fcc111("Pt", size=(2, 2, 3), vacuum=6.0)
    atoms.calc = calc
    assert np.isfinite(atoms.get_potential_energy())
    assert np.isfinite(atoms.get_forces()).all()


def test_make_models_regenerates_a_shipped_model_from_its_recipe(datafile, tmp_path, capsys):
    """``python -m potentials.make_models default`` (its ``main``) with tiny overrides trains the
    recipe's own architecture and hyperparameters and writes a package the calculator loads;
    every shipped model has a recipe."""
    import json

    from eqcalc import package
    from potentials import make_models

    recipes = {p.stem for p in (package.shipped_dir().parent / "recipes").glob("*.yaml")}
    assert recipes == {p.stem for p in package.shipped_dir().glob("*.eqm")}
    out = tmp_path / "default.eqm"
    sets = [f"data={datafile}", "max_steps=3", "val_every=3", "warmup_steps=1", f"work_dir={tmp_path / 'run'}",
            f"output={out}", "adsorption_check=false", "plots=false", "progress=false"]
    assert make_models.main(["default", *[x for item in sets for x in ("--set", item)]]) == 0
    assert f"default: wrote {out}" in capsys.readouterr().out
    meta = package.read(out).metadata
    assert meta["architecture"] == "painn" and meta["dtype"] == "float32"
    assert (meta["config"]["features"], meta["config"]["num_interactions"]) == (48, 3)  # from the recipe
    assert meta["training"]["steps"] == 3 and meta["training"]["recipe"]["lr"] == 0.003
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert meta["training"]["test_metrics"]["forces_mae_meV_per_A"] == pytest.approx(
        metrics["test_forces_mae_meV_per_A"], abs=1e-3)
    atoms = fcc111("Pt", size=(2, 2, 3), vacuum=6.0)
    atoms.calc = EquivariantCalculator(str(out), device="cpu", compile="eager")
    assert np.isfinite(atoms.get_forces()).all()


def test_train_bad_recipe_exits_2(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("max_steps: 2\nnot_an_option: 1\n")
    assert main(["train", str(recipe)]) == 2
    assert "not_an_option" in capsys.readouterr().err
    assert main(["train", str(recipe), "--set", "oops"]) == 2
