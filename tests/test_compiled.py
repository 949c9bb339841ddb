"""Eager vs TorchScript vs AOTInductor (forces and stress inside the compiled graph)."""
import pytest

import potentials
from potentials import testing as T
from eqcalc import EquivariantCalculator
from tests.conftest import SPECIES

STRUCTS = T.structures(SPECIES, seed=3)


#: Every architecture in both dtypes through both compiled forms, except that the angular models
#: (triplet graphs: an AOTInductor build costs ~45 s of CPU, like MACE's) build AOTInductor once,
#: in float32, where their float64 geometry is cast inside the compiled graph; their TorchScript
#: form is checked in both dtypes.
CASES = [(arch, dtype, kind) for arch in potentials.architectures() for dtype in ("float64", "float32")
         for kind in ("torchscript", "aoti")
         if not (kind == "aoti" and dtype == "float64" and arch in ("dimenet", "gemnet"))]


@pytest.mark.parametrize("arch,dtype,kind", CASES, ids=["-".join(c) for c in CASES])
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


def test_auto_picks_a_checked_form_and_uses_cached_aoti(package_path):
    path = package_path("schnet", "float32")
    calc = EquivariantCalculator(path, compile="auto", device="cpu")
    assert calc.model.compile_kind in calc.model.compile_timings
    EquivariantCalculator(path, compile="aoti", device="cpu")  # builds the cache entry (or reuses it)
    again = EquivariantCalculator(path, compile="auto", device="cpu")
    assert set(again.model.compile_timings) == {"eager", "torchscript", "aoti"}
    err = T.check_compiled(again, EquivariantCalculator(path, compile="eager"), [STRUCTS["bulk"]])
    assert err <= T.TOLERANCES["float32"]["compiled"]
