"""``potentials.convert`` / ``eqcalc convert`` against nequip itself (``.nequip.zip`` packages).

nequip lives in its own virtualenv (e3nn >= 0.6): the session fixture creates it with
``benchmarks/nequip_env.sh`` under ``build/nequip-env`` (PyPI only; reused when present; it reads
this venv's torch and common packages, never the reverse) and runs ``tests/nequip_reference.py``
there once (brief ``nequip-train`` runs, ``nequip-package build``, nequip's ASE calculator, all in
one process), caching packages and results under
``build/nequip-reference/<hash of the script, nequip and torch versions>``. Nothing from nequip,
e3nn or the packages is imported or run in this process.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms

from eqcalc import EquivariantCalculator, package
from eqcalc.errors import ModelFileError, UnsafeModelError, UnsupportedModelError
from potentials import testing as T
from potentials.convert import convert

from tests.reference import run_reference as _run

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "nequip_reference.py"
ENV = Path(os.environ.get("EQCALC_NEQUIP_ENV", ROOT / "build" / "nequip-env"))
SUPPORTED = ["basic", "per_type_l2", "zbl_l3", "parity_4layers", "parity_l2", "parity_l3", "norm_parity",
             "edge_cutoffs"]
REFUSED = {"resnet": "convnet_resnet"}


@pytest.fixture(scope="session")
def nequip_reference():
    """``(folder, reference dict)``: nequip's packages and results (see the module doc)."""
    python = ENV / "bin" / "python"
    check = [python, "-c", "import nequip, e3nn, torch; print(nequip.__version__, torch.__version__)"]
    if not python.exists() or subprocess.run([str(c) for c in check], capture_output=True).returncode != 0:
        # shares this venv's torch (read-only, see the script): ~45 s instead of ~2 min and 1.3 GB
        _run(["bash", ROOT / "benchmarks" / "nequip_env.sh", ENV, sys.executable],
             "creating the nequip virtualenv")
    version = _run(check, "importing nequip").strip()
    key = hashlib.sha256(SCRIPT.read_bytes() + version.encode()).hexdigest()[:16]
    out = ROOT / "build" / "nequip-reference" / key
    if not (out / "reference.json").exists():
        tmp = out.with_name(key + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        _run([python, SCRIPT, tmp], "nequip reference run")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return out, json.loads((out / "reference.json").read_text())


def rewritten(source: Path, out: Path, member: str, edit) -> Path:
    """A copy of the package ``source`` whose member ending in ``member`` is ``edit(bytes)``."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(out, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item)
            zout.writestr(item, edit(data) if item.filename.endswith(member) else data)
    return out


def atoms_of(s):
    return Atoms(numbers=s["numbers"], positions=s["positions"], cell=s["cell"], pbc=s["pbc"])


@pytest.mark.parametrize("variant", SUPPORTED)
def test_converted_package_matches_nequip(nequip_reference, variant, tmp_path):
    folder, ref = nequip_reference
    v = ref["variants"][variant]
    calc = EquivariantCalculator(str(convert(folder / v["file"], tmp_path / "m.eqm")), dtype="float64",
                                 compile="eager")
    for name, s in ref["structures"].items():
        atoms = atoms_of(s)
        atoms.calc = calc
        r = v["results"][name]
        e, f = atoms.get_potential_energy(), atoms.get_forces()
        assert abs(e - r["energy"]) / max(1.0, abs(r["energy"])) < 1e-10, (name, e, r["energy"])
        np.testing.assert_allclose(f, r["forces"], rtol=0, atol=1e-10 * np.abs(r["forces"]).max(), err_msg=name)
        if r["stress"] is not None:
            st = atoms.get_stress(voigt=False)
            np.testing.assert_allclose(st, r["stress"], rtol=0, atol=1e-10 * np.abs(r["stress"]).max(),
                                       err_msg=name)


@pytest.fixture(scope="session")
def converted(nequip_reference, tmp_path_factory):
    folder, ref = nequip_reference
    made = {}

    def get(variant):
        if variant not in made:
            out = tmp_path_factory.mktemp("nequip") / f"{variant}.eqm"
            made[variant] = str(convert(folder / ref["variants"][variant]["file"], out))
        return made[variant]

    return get


def test_converted_model_passes_the_physics_library(converted):
    """Padded per-degree channels, per-type normalisation, l_max 2: forces and stress are
    derivatives of the energy and O(3) symmetry holds in eqcalc's own machinery."""
    calc = EquivariantCalculator(converted("per_type_l2"), compile="eager", device="cpu")
    structures = T.structures(calc.metadata["species"])
    tol = T.TOLERANCES["float64"]
    for name in ("bulk", "small_triclinic", "cluster"):
        assert T.check_forces_fd(calc, structures[name]) <= tol["fd_forces"], name
    assert T.check_stress_fd(calc, structures["bulk"]) <= tol["fd_stress"]
    worst = T.check_symmetry(calc, structures["slab"], n=6)
    assert max(worst.values()) <= tol["symmetry"], worst


@pytest.mark.parametrize("variant", ["parity_4layers", "parity_l2", "parity_l3", "norm_parity"])
def test_odd_parity_features_matter(nequip_reference, converted, variant):
    """The parity comparisons above cover the odd-parity blocks (0o, 1e, 2o, 3e): silencing
    them moves the forces on the triclinic bulk by far more than the 1e-10 comparison bound."""
    import torch

    _, ref = nequip_reference
    calc = EquivariantCalculator(converted(variant), compile="eager", device="cpu")
    bulk = atoms_of(ref["structures"]["triclinic_bulk"])
    f0 = calc.get_forces(bulk.copy())
    model = calc.model.wrapper.model                       # the eager NequIP the calculator runs
    odd = [[k for k, (l, p) in enumerate(layout) if p != (-1) ** l] for layout in model.layouts[:-1]]
    assert any(odd[2:]), model.layouts                     # layers 2, 3 read odd blocks
    with torch.no_grad():
        for conv, blocks in zip(model.convolutions, odd):
            for k in blocks:
                conv.linear_in.weight[k] = 0.0
    calc.reset()
    assert np.abs(calc.get_forces(bulk.copy()) - f0).max() > 1e-6 * np.abs(f0).max()


def test_parity_model_is_o3_invariant(converted):
    calc = EquivariantCalculator(converted("parity_l3"), compile="eager", device="cpu")
    worst = T.check_symmetry(calc, T.structures(calc.metadata["species"])["slab"], n=4)
    assert max(worst.values()) <= T.TOLERANCES["float64"]["symmetry"], worst


def test_e3nn_coupling_conventions_match_e3nn(nequip_reference):
    """eqcalc's statement of e3nn >= 0.5's Wigner 3j (Condon-Shortley) equals the installed
    e3nn's for every coupling of degrees <= 3, and differs in sign from 0.4.4's (mace-torch)
    exactly on some odd l1+l2+l3 couplings, the ones only parity models use."""
    from potentials.convert import e3nn

    _, ref = nequip_reference
    flipped = []
    for key, value in ref["wigner_3j"].items():
        l1, l2, l3 = map(int, key.split(","))
        np.testing.assert_allclose(e3nn.wigner_3j_cs(l1, l2, l3), np.array(value), rtol=0, atol=1e-14, err_msg=key)
        if e3nn.coupling_sign(l1, l2, l3, "0.5") != e3nn.coupling_sign(l1, l2, l3, "0.4"):
            flipped.append((l1, l2, l3))
    assert flipped and all(sum(t) % 2 for t in flipped), flipped


def test_converted_model_compiles_to_torchscript(converted):
    path = converted("zbl_l3")
    eager = EquivariantCalculator(path, compile="eager", device="cpu")
    compiled = EquivariantCalculator(path, compile="torchscript", device="cpu")
    assert compiled.model.compile_kind == "torchscript"
    systems = list(T.structures(eager.metadata["species"], seed=2).values())
    assert T.check_compiled(compiled, eager, systems) <= T.TOLERANCES["float64"]["compiled"]


def test_metadata_records_the_source_and_the_cli_converts(nequip_reference, converted, tmp_path):
    folder, ref = nequip_reference
    from eqcalc.cli import build_parser, main

    source = package.read(converted("basic")).metadata["source"]
    assert source["nequip_version"] == ref["versions"]["nequip"]
    assert source["e3nn_version"] == ref["versions"]["e3nn"]
    assert len(source["sha256"]) == 64 and source["file"] == "basic.nequip.zip"
    help_text = build_parser()._subparsers._group_actions[0].choices["convert"].format_help()
    assert ".nequip.zip" in help_text
    out = tmp_path / "cli.eqm"
    assert main(["convert", str(folder / "zbl_l3.nequip.zip"), str(out)]) == 0
    assert package.read(str(out)).metadata["config"]["pair_repulsion"] == "zbl_lammps"
    assert main(["convert", str(folder / "resnet.nequip.zip"), str(tmp_path / "p.eqm")]) != 0
    assert not (tmp_path / "p.eqm").exists()


@pytest.mark.parametrize("variant", sorted(REFUSED))
def test_unsupported_options_are_refused_by_name(nequip_reference, variant, tmp_path):
    folder, ref = nequip_reference
    with pytest.raises(UnsupportedModelError, match=REFUSED[variant]):
        convert(folder / ref["variants"][variant]["file"], tmp_path / "m.eqm")
    assert not (tmp_path / "m.eqm").exists()


def test_compiled_nequip_files_are_refused(tmp_path):
    for name in ("model.nequip.pt2", "model.nequip.pth"):
        (tmp_path / name).write_bytes(b"PK\x03\x04")
        with pytest.raises(UnsupportedModelError, match="convert the .nequip.zip package"):
            convert(tmp_path / name, tmp_path / "m.eqm")


def test_package_with_an_unknown_global_is_refused_and_never_runs(nequip_reference, tmp_path):
    """The eager model's pickle is rewritten to call os.system: refused by name, nothing runs."""
    folder, ref = nequip_reference
    source = folder / ref["variants"]["basic"]["file"]
    marker = tmp_path / "ran"
    cmd = f"touch {marker}".encode()
    bad = rewritten(source, tmp_path / "bad.nequip.zip", "model/eager_model.pkl",
                    lambda _: b"\x80\x02cos\nsystem\nq\x00X" + len(cmd).to_bytes(4, "little") + cmd + b"\x85R.")
    with pytest.raises(UnsafeModelError, match="os.system"):
        convert(bad, tmp_path / "m.eqm")
    assert not marker.exists()


def test_getattr_is_resolved_only_for_allow_listed_torch_functions(nequip_reference, tmp_path):
    """torch.tanh pickles as getattr(torch._C._VariableFunctionsClass, "tanh") (parity packages):
    exactly that is read, as a reference. getattr for any other name, or calling the result, is
    refused and nothing runs."""
    folder, ref = nequip_reference
    source = folder / ref["variants"]["basic"]["file"]

    def pickled(name: bytes, call: bool) -> bytes:
        return (b"\x80\x02cbuiltins\ngetattr\nctorch._C\n_VariableFunctionsClass\nX" + len(name).to_bytes(4, "little")
                + name + b"\x86R" + (b"X\x04\x00\x00\x00/tmp\x85R" if call else b"") + b".")

    for name, call, match in ((b"load", False, "getattr"), (b"tanh", True, "calls torch.tanh")):
        bad = rewritten(source, tmp_path / f"{name.decode()}.nequip.zip", "model/eager_model.pkl",
                        lambda _: pickled(name, call))
        with pytest.raises(UnsafeModelError, match=match):
            convert(bad, tmp_path / "m.eqm")
        assert not (tmp_path / "m.eqm").exists()


def test_damaged_config_is_a_model_file_error(nequip_reference, tmp_path):
    folder, ref = nequip_reference
    source = folder / ref["variants"]["basic"]["file"]
    bad = rewritten(source, tmp_path / "bad.nequip.zip", "model/config.yaml", lambda _: b"training_module: [unclosed")
    with pytest.raises(ModelFileError):
        convert(bad, tmp_path / "m.eqm")


# ---- checkpoints: packaged by nequip (its own interpreter) from a plain-data copy, then converted ----

def fake_nequip(tmp_path) -> tuple:
    """An 'interpreter' that only records that it was started: proves nequip never ran."""
    marker = tmp_path / "nequip-ran"
    script = tmp_path / "fake-python"
    script.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    script.chmod(0o755)
    return str(script), marker


def checkpoint_with(source: Path, out: Path, edit) -> Path:
    """A copy of the checkpoint ``source`` (read with the restricted reader) after ``edit(dict)``."""
    import torch
    from potentials.convert.torch_pickle import Allow, TorchArchive

    with TorchArchive(source) as archive:
        ckpt = archive.load(Allow())
    edit(ckpt)
    torch.save(ckpt, str(out))
    return out


def test_checkpoint_converts_to_the_numbers_of_nequip(nequip_reference, tmp_path):
    # the run's training data is gone (the reference was built in a folder since renamed): the
    # route packages without it
    folder, ref = nequip_reference
    v = ref["variants"]["edge_cutoffs"]
    # a relative interpreter path, as users type it (the packager runs in a temporary folder)
    python = os.path.relpath(ENV / "bin" / "python")
    out = convert(folder / v["checkpoint"], tmp_path / "ckpt.eqm", nequip_python=python)
    source = package.read(str(out)).metadata["source"]
    assert "checkpoint" in source["format"] and source["file"] == v["checkpoint"]
    calc = EquivariantCalculator(str(out), dtype="float64", compile="eager", device="cpu")
    for name, want in v["results"].items():
        atoms = atoms_of(ref["structures"][name])
        atoms.calc = calc
        np.testing.assert_allclose(atoms.get_potential_energy(), want["energy"], rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(atoms.get_forces(), want["forces"], rtol=1e-10, atol=1e-10)


def test_checkpoint_route_refuses_before_nequip_runs(nequip_reference, tmp_path):
    folder, ref = nequip_reference
    python, marker = fake_nequip(tmp_path)
    basic = folder / ref["variants"]["basic"]["checkpoint"]

    def target(name):
        def edit(ckpt):
            ckpt["hyper_parameters"]["info_dict"]["training_module"]["_target_"] = name
        return edit

    # hydra would call these: a function, and an attribute of an allowed module that is a module
    for name in ("builtins.exec", "nequip.train.os"):
        bad = checkpoint_with(basic, tmp_path / "target.ckpt", target(name))
        with pytest.raises(UnsafeModelError, match=name.replace(".", r"\.")):
            convert(bad, tmp_path / "m.eqm", nequip_python=python)
    # a pickle that asks for a global
    bad = tmp_path / "global.ckpt"
    with zipfile.ZipFile(basic) as zin, zipfile.ZipFile(bad, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item)
            zout.writestr(item, b"\x80\x02cposix\nsystem\nX\x04\x00\x00\x00true\x85R." if item.filename.endswith("data.pkl") else data)
    with pytest.raises(UnsafeModelError, match="posix"):
        convert(bad, tmp_path / "m.eqm", nequip_python=python)
    # an option eqcalc does not reproduce
    with pytest.raises(UnsupportedModelError, match="convnet_resnet"):
        convert(folder / ref["variants"]["resnet"]["checkpoint"], tmp_path / "m.eqm", nequip_python=python)
    assert not marker.exists() and not (tmp_path / "m.eqm").exists()
    # a good checkpoint does reach the (fake) packager, whose failure is reported with its exit code
    with pytest.raises(ModelFileError, match="exit code 1"):
        convert(basic, tmp_path / "m.eqm", nequip_python=python)
    assert marker.exists()


def test_checkpoint_without_nequip_says_how_to_get_it(nequip_reference, tmp_path, monkeypatch):
    from eqcalc.errors import MissingDependencyError

    folder, ref = nequip_reference
    monkeypatch.delenv("EQCALC_NEQUIP_PYTHON", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MissingDependencyError, match="--nequip-python"):
        convert(folder / ref["variants"]["basic"]["checkpoint"], tmp_path / "m.eqm")
