"""The physics test library (potentials.testing) over every registered architecture."""
import pytest

import potentials
from potentials import testing as T
from eqcalc import EquivariantCalculator
from tests.conftest import SPECIES

ARCHS = potentials.architectures()
DTYPES = ["float64", "float32"]
STRUCTS = T.structures(SPECIES)


@pytest.fixture(scope="module")
def calcs(package_path):
    cache = {}

    def get(arch, dtype, forces="conservative"):
        key = (arch, dtype, forces)
        if key not in cache:
            path = package_path(arch, "float64", direct_forces=True)
            cache[key] = EquivariantCalculator(path, compile="eager", dtype=dtype, forces=forces, device="cpu")
        return cache[key]

    return get


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", ["bulk", "small_triclinic", "slab", "cluster"])
def test_forces_match_finite_differences(calcs, arch, dtype, name):
    err = T.check_forces_fd(calcs(arch, dtype), STRUCTS[name], reference=calcs(arch, "float64"))
    assert err <= T.TOLERANCES[dtype]["fd_forces"], err


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", ["bulk", "small_triclinic", "slab"])
def test_stress_matches_finite_strain(calcs, arch, dtype, name):
    err = T.check_stress_fd(calcs(arch, dtype), STRUCTS[name], reference=calcs(arch, "float64"))
    assert err <= T.TOLERANCES[dtype]["fd_stress"], err


@pytest.mark.parametrize("forces", ["conservative", "direct"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_invariance_and_equivariance_under_O3_translation_permutation(calcs, arch, dtype, forces):
    tol = T.tolerance(calcs(arch, dtype).metadata, dtype, "symmetry", forces)
    for name in ("bulk", "slab", "cluster"):
        worst = T.check_symmetry(calcs(arch, dtype, forces), STRUCTS[name], n=100 if name == "bulk" else 20)
        assert max(worst.values()) <= tol, (name, worst)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_supercell_is_extensive(calcs, arch, dtype):
    tol = T.tolerance(calcs(arch, dtype).metadata, dtype, "consistency")
    assert T.check_extensive(calcs(arch, dtype), STRUCTS["small_triclinic"]) <= tol


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_batch_equals_single(calcs, arch, dtype):
    assert T.check_batch(calcs(arch, dtype), list(STRUCTS.values())) <= T.TOLERANCES[dtype]["consistency"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_wrapped_equals_unwrapped(calcs, arch, dtype):
    assert T.check_wrapping(calcs(arch, dtype), STRUCTS["slab"]) <= T.TOLERANCES[dtype]["consistency"]
    assert T.check_wrapping(calcs(arch, dtype), STRUCTS["small_triclinic"]) <= T.TOLERANCES[dtype]["consistency"]


@pytest.mark.parametrize("arch", ARCHS)
def test_forces_vanish_at_and_beyond_cutoff(calcs, arch):
    r = T.check_cutoff(calcs(arch, "float64"), SPECIES)
    assert r["force_beyond"] == 0.0
    assert r["energy_beyond"] <= 1e-12
    # Continuous forces at the cutoff: F ~ (rc - r)^p with p >= 1 for both envelopes.
    assert 0 < r["force_inside_1e-4"] <= 0.2 * r["force_inside_1e-3"]
    assert r["force_inside_1e-3"] <= 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_direct_forces_differ_from_conservative_but_stress_agrees(calcs, arch):
    """One package serves both modes: direct forces come from the head, stress from the energy."""
    a = calcs(arch, "float64", "conservative").predict([STRUCTS["bulk"]])[0]
    b = calcs(arch, "float64", "direct").predict([STRUCTS["bulk"]])[0]
    assert abs(a["energy"] - b["energy"]) < 1e-12
    assert T._rel(b["stress"], a["stress"]) < 1e-12
    assert T._rel(b["forces"], a["forces"]) > 1e-3  # an untrained head is not the gradient


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["default", "schnet"])
def test_shipped_models_pass_the_physics_checks(name, dtype):
    calc = EquivariantCalculator(name, compile="eager", dtype=dtype, device="cpu")
    ref = EquivariantCalculator(name, compile="eager", dtype="float64", device="cpu")
    tol = T.TOLERANCES[dtype]
    for key in ("bulk", "slab", "small_triclinic"):
        assert T.check_forces_fd(calc, STRUCTS[key], reference=ref) <= tol["fd_forces"], key
        assert T.check_stress_fd(calc, STRUCTS[key], reference=ref) <= tol["fd_stress"], key
    assert max(T.check_symmetry(calc, STRUCTS["slab"], n=100).values()) <= tol["symmetry"]
    assert T.check_batch(calc, list(STRUCTS.values())) <= tol["consistency"]
