"""Eager vs TorchScript vs AOTInductor (forces and stress inside the compiled graph)."""
import pytest

import potentials
from potentials import testing as T
from eqcalc import EquivariantCalculator
from tests.conftest import SPECIES

STRUCTS = T.structures(SPECIES, seed=3)


@pytest.mark.parametrize("kind", ["torchscript", "aoti"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("arch", potentials.architectures())
def test_compiled_matches_eager(package_path, arch, dtype, kind):
    path = package_path(arch, dtype)
    eager = EquivariantCalculator(path, compile="eager", device="cpu")
    compiled = EquivariantCalculator(path, compile=kind, device="cpu")
    assert compiled.model.compile_kind == kind
    # New sizes and a 3-system batch: dynamic atom, edge and system counts.
    err = T.check_compiled(compiled, eager, list(STRUCTS.values()))
    assert err <= T.TOLERANCES[dtype]["compiled"], err
    single = T.check_compiled(compiled, eager, [STRUCTS["slab"]])
    assert single <= T.TOLERANCES[dtype]["compiled"], single
