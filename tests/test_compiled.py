"""Eager vs TorchScript vs AOTInductor (forces and stress inside the compiled graph)."""
import logging

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


def test_auto_skips_uncached_aoti_on_cpu_and_uses_it_once_cached(package_path, tmp_path, monkeypatch, caplog):
    """README: on a CPU "auto" considers AOTInductor only once it is cached; then it times all
    three forms and uses the cached build (never compiling again)."""
    from eqcalc import compile as compiled

    path = package_path("schnet", "float32")
    session_cache = compiled.cache_dir()
    monkeypatch.setenv("EQCALC_CACHE", str(tmp_path))  # an empty cache
    monkeypatch.setattr(compiled, "_CHOICES", {})  # and no choice recorded by an earlier test
    fresh = EquivariantCalculator(path, compile="auto", device="cpu")
    assert set(fresh.model.compile_timings) == {"eager", "torchscript"}
    assert [p.name for p in tmp_path.iterdir()] == [f"auto-{fresh.model.aoti_key()}.json"]  # nothing built
    monkeypatch.setenv("EQCALC_CACHE", str(session_cache))
    EquivariantCalculator(path, compile="aoti", device="cpu")  # builds the cache entry (or reuses it)

    def no_compiling(*args):
        raise AssertionError("auto compiled AOTInductor again instead of loading the cache")

    monkeypatch.setattr(compiled, "export_aoti", no_compiling)
    with caplog.at_level(logging.WARNING):
        again = EquivariantCalculator(path, compile="auto", device="cpu")
    assert set(again.model.compile_timings) == {"eager", "torchscript", "aoti"}
    # the scalar build is on purpose: torch's "could cause some issues" notice is not shown
    assert not [r for r in caplog.records if "Device information mismatch" in r.getMessage()]
    err = T.check_compiled(again, EquivariantCalculator(path, compile="eager"), [STRUCTS["bulk"]])
    assert err <= T.TOLERANCES["float32"]["compiled"]


def test_aoti_cache_key_covers_weights_forces_device_dtype_and_versions(package_path, monkeypatch):
    """README: the AOTInductor build is cached keyed by weights hash, device, dtype and versions."""
    import torch

    import eqcalc
    from eqcalc import compile as compiled
    from eqcalc.model import Model

    base = ("a" * 64, "conservative", True, torch.device("cpu"), "float32")
    key = compiled.cache_key(*base)
    assert compiled.cache_key(*base) == key
    for k, other in enumerate(("b" * 64, "direct", False, torch.device("cuda:0"), "float64")):
        assert compiled.cache_key(*(base[:k] + (other,) + base[k + 1:])) != key, k
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    assert compiled.cache_key(*base) != key
    monkeypatch.undo()
    monkeypatch.setattr(eqcalc, "__version__", "99.0")
    assert compiled.cache_key(*base) != key
    monkeypatch.undo()
    a, b = (Model(package_path("schnet", "float32"), device="cpu", compile="eager", dtype=d)
            for d in ("float32", "float64"))
    assert a.aoti_key() != b.aoti_key()
    assert Model(package_path("painn", "float32"), device="cpu", compile="eager").aoti_key() != a.aoti_key()
    assert Model(package_path("schnet", "float32"), device="cpu", compile="eager").aoti_key() == a.aoti_key()
    assert compiled.aoti_path(a.aoti_key()).parent == compiled.cache_dir()


def test_auto_drops_a_form_that_disagrees_with_eager(package_path, tmp_path, monkeypatch, caplog):
    """A compiled form that differs from eager on the probe is never used: "auto" leaves it out
    (with a warning), an explicit request raises CompileError."""
    from eqcalc import compile as compiled
    from eqcalc.errors import CompileError

    monkeypatch.setenv("EQCALC_CACHE", str(tmp_path))
    monkeypatch.setattr(compiled, "_CHOICES", {})  # no choice recorded by an earlier test
    real = compiled.torchscript

    def off_by_1e3(wrapper):
        scripted = real(wrapper)

        def run(*inputs):
            out = dict(scripted(*inputs))
            out["forces"] = out["forces"] * (1 + 1e-3)
            return out
        return run

    monkeypatch.setattr(compiled, "torchscript", off_by_1e3)
    path = package_path("schnet", "float64")
    calc = EquivariantCalculator(path, compile="auto", device="cpu")
    assert calc.model.compile_kind == "eager" and set(calc.model.compile_timings) == {"eager"}
    assert "torchscript form differs from eager" in caplog.text
    with pytest.raises(CompileError, match="differs from eager"):
        EquivariantCalculator(path, compile="torchscript", device="cpu")


@pytest.mark.parametrize("times,expected", [((0.2, 0.1), "torchscript"), ((0.1, 0.2), "eager")])
def test_auto_uses_the_fastest_checked_form(package_path, tmp_path, monkeypatch, times, expected):
    from eqcalc import compile as compiled

    monkeypatch.setenv("EQCALC_CACHE", str(tmp_path))
    monkeypatch.setattr(compiled, "_CHOICES", {})  # no choice recorded by an earlier test
    clock = iter(times)  # timed in the order eager, torchscript

    def best_time(fn, **kwargs):
        fn()
        return next(clock)

    monkeypatch.setattr(compiled, "best_time", best_time)
    calc = EquivariantCalculator(package_path("schnet", "float64"), compile="auto", device="cpu")
    assert calc.model.compile_timings == {"eager": times[0], "torchscript": times[1]}
    assert calc.model.compile_kind == expected
    assert (calc.model.runner is calc.model.wrapper) == (expected == "eager")


def test_agreement_check_sees_any_output_off_by_more_than_the_dtype_tolerance(package_path):
    """The check that admits a compiled form (compile.max_relative_error against
    compile.tolerance): TorchScript's energy, forces and stress of a real model agree with
    eager's within the float64 tolerance, and a relative error of 1e-8 in any one of them
    (1e-3 in float32: 20x the float32 tolerance) is refused, whichever output it is in."""
    import numpy as np
    import torch

    from eqcalc import compile as compiled

    path = package_path("schnet", "float64")
    structures = [STRUCTS["slab"], STRUCTS["bulk"]]
    eager = EquivariantCalculator(path, compile="eager", device="cpu").predict(structures)
    script = EquivariantCalculator(path, compile="torchscript", device="cpu").predict(structures)

    def tensors(results):
        return {k: torch.as_tensor(np.concatenate([np.atleast_1d(r[k]).ravel() for r in results]))
                for k in ("energy", "forces", "stress")}

    reference = tensors(eager)
    assert compiled.max_relative_error(tensors(script), reference) <= compiled.tolerance(torch.float64)
    for dtype, error in ((torch.float64, 1e-8), (torch.float32, 1e-3)):
        assert compiled.tolerance(dtype) * 10 < error
        for key in reference:
            off = {k: v.clone() for k, v in reference.items()}
            worst = int(off[key].abs().argmax())
            off[key][worst] += error * float(reference[key].abs().max())
            assert compiled.max_relative_error(off, reference) > compiled.tolerance(dtype), (key, dtype)
