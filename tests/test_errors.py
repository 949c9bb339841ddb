"""Every bad input gets a typed eqcalc error whose message names the input and the fix."""
import json
import os
import pickle
import zipfile

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk

import potentials
from eqcalc import EquivariantCalculator, errors, package
from tests.conftest import SPECIES


@pytest.fixture(scope="module")
def calc(package_path):
    return EquivariantCalculator(package_path("schnet"), compile="eager", device="cpu")


def energy(calc, atoms):
    atoms.calc = calc
    return atoms.get_potential_energy()


def test_empty_atoms(calc):
    with pytest.raises(errors.InvalidAtomsError, match="empty"):
        energy(calc, Atoms())


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_positions(calc, bad):
    a = bulk("Cu", "fcc", a=3.6, cubic=True)
    a.positions[1, 2] = bad
    with pytest.raises(errors.InvalidAtomsError, match=r"atoms \[1\].*NaN or inf"):
        energy(calc, a)


def test_non_finite_cell(calc):
    a = bulk("Cu", "fcc", a=3.6, cubic=True)
    a.cell[0, 0] = np.nan
    with pytest.raises(errors.InvalidAtomsError, match="cell contains NaN"):
        energy(calc, a)


def test_unknown_element_named_with_supported_list(calc):
    a = bulk("Cu", "fcc", a=3.6, cubic=True)
    a.symbols[0] = "Fe"
    with pytest.raises(errors.UnknownElementError, match=r"Fe not supported.*Cu, Pt, C, O, H"):
        energy(calc, a)


def test_periodic_direction_with_zero_cell(calc):
    a = Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 2.5]], pbc=True)
    with pytest.raises(errors.CellError, match="cell vector 0 is zero"):
        energy(calc, a)


def test_singular_periodic_cell(calc):
    a = Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 2.5]], cell=[[3, 0, 0], [6, 0, 0], [0, 0, 4]], pbc=True)
    with pytest.raises(errors.CellError, match="linearly dependent"):
        energy(calc, a)


def test_overlapping_atoms(calc):
    a = Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 0.01]])
    with pytest.raises(errors.InvalidAtomsError, match="overlap"):
        energy(calc, a)


def test_stress_of_molecule_is_not_available(calc):
    a = Atoms("CO", positions=[[0, 0, 0], [0, 0, 1.2]])
    a.calc = calc
    with pytest.raises(errors.PropertyNotAvailableError, match="no periodic direction"):
        a.get_stress()


def test_missing_model_file():
    with pytest.raises(errors.ModelFileError, match="does not exist"):
        EquivariantCalculator("/nonexistent/model.eqm")


def test_unknown_shipped_name():
    with pytest.raises(errors.ModelFileError, match="no model file or shipped model named"):
        EquivariantCalculator("no-such-model")


def rewritten(src, dst, meta=lambda m: m, weights=lambda w: w, resign=True) -> str:
    """Copy package ``src`` to ``dst`` with its metadata dict and weight bytes transformed;
    ``resign``: recompute the whole-file hash, as a careless tool would, so that the checks
    behind the hash are what is tested."""
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w") as out:
        new_meta, blob = meta(json.loads(z.read(package.METADATA))), weights(z.read(package.WEIGHTS))
        if resign and "sha256" in new_meta:
            new_meta["sha256"] = package.content_sha256(new_meta, blob)
        out.writestr(package.METADATA, json.dumps(new_meta))
        out.writestr(package.WEIGHTS, blob)
    return str(dst)


def test_truncated_model_file(package_path, tmp_path):
    blob = open(package_path("schnet"), "rb").read()
    bad = tmp_path / "truncated.eqm"
    bad.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(errors.ModelFileError, match="corrupt or truncated"):
        EquivariantCalculator(str(bad))


def test_modified_weights_fail_the_hash(package_path, tmp_path):
    bad = rewritten(package_path("schnet"), tmp_path / "tampered.eqm",
                    weights=lambda w: w[:-1] + bytes([w[-1] ^ 0xFF]))
    with pytest.raises(errors.ModelFileError, match="sha256"):
        EquivariantCalculator(bad)


def test_foreign_zip(tmp_path):
    bad = tmp_path / "foreign.eqm"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("hello.txt", "not a model")
    with pytest.raises(errors.ModelFileError, match="not an eqcalc model package"):
        EquivariantCalculator(str(bad))


def test_random_bytes(tmp_path):
    bad = tmp_path / "noise.eqm"
    bad.write_bytes(os.urandom(1000).replace(b"PK", b"pk").replace(b"\x80", b"\x00"))
    with pytest.raises(errors.ModelFileError):
        EquivariantCalculator(str(bad))


class _Exploit:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


@pytest.mark.parametrize("via_torch", [False, True])
def test_pickle_posing_as_model_never_executes(tmp_path, via_torch):
    sentinel = tmp_path / "pwned"
    bad = tmp_path / "model.eqm"
    if via_torch:  # torch.save writes a zip holding data.pkl
        import torch

        torch.save({"x": _Exploit(str(sentinel))}, bad)
    else:
        bad.write_bytes(pickle.dumps(_Exploit(str(sentinel))))
    with pytest.raises(errors.ModelFileError, match="never"):
        EquivariantCalculator(str(bad))
    assert not sentinel.exists()


def test_schema_from_the_future(package_path, tmp_path):
    future = rewritten(package_path("schnet"), tmp_path / "future.eqm",
                       meta=lambda m: {**m, "schema_version": package.SCHEMA_VERSION + 1})
    with pytest.raises(errors.ModelVersionError, match="upgrade eqcalc"):
        EquivariantCalculator(future)


def test_weights_of_another_architecture(package_path, tmp_path):
    painn = potentials.build("painn", species=SPECIES).config_dict()
    other = rewritten(package_path("schnet"), tmp_path / "mismatch.eqm",
                      meta=lambda m: {**m, "architecture": "painn", "config": painn})
    with pytest.raises(errors.ModelFileError, match="do not fit architecture"):
        EquivariantCalculator(other)


def test_cuda_not_available(package_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this check is about machines without CUDA")
    with pytest.raises(errors.DeviceError, match="CUDA is not available"):
        EquivariantCalculator(package_path("schnet"), device="cuda")


@pytest.mark.parametrize("option, value", [("forces", "magic"), ("compile", "fast"), ("dtype", "float16"),
                                           ("device", "tpu")])
def test_unknown_option_values(package_path, option, value):
    with pytest.raises(errors.InvalidOptionError, match=repr(value)):
        EquivariantCalculator(package_path("schnet"), **{option: value})


def test_direct_forces_without_head(package_path):
    with pytest.raises(errors.InvalidOptionError, match="offers"):
        EquivariantCalculator(package_path("schnet"), forces="direct")


def test_unknown_architecture_and_hyperparameter():
    with pytest.raises(errors.InvalidOptionError, match="nope"):
        potentials.build("nope", species=SPECIES)
    with pytest.raises(errors.InvalidOptionError, match="banana"):
        potentials.build("painn", species=SPECIES, banana=3)


def test_errors_share_one_base():
    for name in dir(errors):
        obj = getattr(errors, name)
        if isinstance(obj, type) and issubclass(obj, Exception) and obj.__module__ == errors.__name__:
            assert issubclass(obj, errors.EqcalcError)
