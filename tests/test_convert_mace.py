"""``potentials.convert`` / ``eqcalc convert`` against mace-torch itself.

mace-torch lives in its own virtualenv (it pins e3nn 0.4.4): the session fixture gets it from
``benchmarks/mace_env.sh`` (PyPI only, every version pinned; created once in the reference cache,
``$EQCALC_REFERENCE_CACHE`` or ``~/.cache/eqcalc-reference``, and reused by fresh clones) and runs
``tests/mace_torch_reference.py`` there once, caching its ``.model`` files and reference results
next to the venv under ``mace-reference/<hash of the script and mace version>``. From scratch this takes
about 3 minutes (venv ~1.5 min with a warm pip cache, reference run ~1 min); cached, nothing.
Nothing from mace, e3nn or the files is imported or run in this process.
"""
import hashlib
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms

import potentials
from eqcalc import EquivariantCalculator, package
from eqcalc.errors import ModelFileError, UnsafeModelError, UnsupportedModelError
from potentials import testing as T
from potentials.convert import convert, e3nn
from potentials.convert.torch_pickle import Allow, Limits, TorchArchive

from tests.reference import run_reference as _run

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "mace_torch_reference.py"
TOLERANCE = {"float64": 1e-10, "float32": 1e-5}
SMALL_VARIANTS = ["mp0_like", "mp0_like_float32", "plain_first_l2", "density_zbl_agnesi",
                  "density_residual_soft_l0", "plain_zbl_3layers", "two_heads"]


@pytest.fixture(scope="session")
def mace_reference():
    """``(folder, reference dict)``: mace-torch's models and results (see the module doc)."""
    python = _run(["bash", ROOT / "benchmarks" / "mace_env.sh"], "creating the mace-torch virtualenv")
    python = Path(python.strip().splitlines()[-1])
    version = _run([python, "-c", "import mace; print(mace.__version__)"], "importing mace-torch").strip()
    key = hashlib.sha256(SCRIPT.read_bytes() + version.encode()).hexdigest()[:16]
    out = python.parents[2] / "mace-reference" / key  # <reference cache>/mace-env-.../bin/python
    out.parent.mkdir(parents=True, exist_ok=True)
    if not (out / "reference.json").exists():
        tmp = out.with_name(key + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        _run([python, SCRIPT, tmp], "mace-torch reference run")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return out, json.loads((out / "reference.json").read_text())


@pytest.fixture(scope="session")
def converted(mace_reference, tmp_path_factory):
    """Variant → path of its converted ``.eqm`` (converted once per session)."""
    folder, ref = mace_reference
    made = {}

    def get(variant):
        if variant not in made:
            v = ref["variants"][variant]
            out = tmp_path_factory.mktemp("converted") / f"{variant}.eqm"
            made[variant] = str(convert(folder / v["file"], out, head=v["head"]))
        return made[variant]

    return get


def atoms_of(s):
    return Atoms(numbers=s["numbers"], positions=s["positions"], cell=s["cell"], pbc=s["pbc"])


def assert_matches(calc, variant_ref, dtype):
    """Energy, per-atom energies, forces and virial (stress x the volume each code divides by)
    of every structure within ``TOLERANCE[dtype]`` of mace-torch, relative to the largest
    reference value (at least 1 in float32, where the forces of the near-cutoff dimer are
    ~1e-8 eV/Å and only rounding is left of them)."""
    tol, floor = TOLERANCE[dtype], (1.0 if dtype == "float32" else 1e-6)
    names = list(variant_ref["structures"])
    results = calc.predict([atoms_of(variant_ref["structures"][n]) for n in names])
    worst = {}
    for name, ours in zip(names, results):
        theirs = variant_ref["results"][name]
        atoms = atoms_of(variant_ref["structures"][name])

        def rel(a, b):
            a, b = np.asarray(a, float), np.asarray(b, float)
            return float(np.abs(a - b).max() / max(np.abs(b).max(), floor))

        errors = {"energy": abs(ours["energy"] - theirs["energy"]) / max(1.0, abs(theirs["energy"])),
                  "energies": rel(ours["energies"], theirs["energies"]),
                  "forces": rel(ours["forces"], theirs["forces"])}
        if "stress" in theirs:
            errors["virial"] = rel(T._voigt_to_full(ours["stress"]) * abs(atoms.cell.volume),
                                   np.array(theirs["stress"]) * theirs["stress_volume"])
        worst[name] = errors
        assert max(errors.values()) <= tol, (name, errors)
    return worst


@pytest.mark.parametrize("variant", SMALL_VARIANTS)
def test_converted_model_matches_mace_torch(mace_reference, converted, variant):
    """Every variant foundation models use, on bulk, slab, molecule, small cell, isolated atom
    and two dimers: E, per-atom E, F, stress to 1e-10 (float64) / 1e-5 (float32)."""
    _, ref = mace_reference
    v = ref["variants"][variant]
    calc = EquivariantCalculator(converted(variant), compile="eager", device="cpu")
    assert calc.metadata["dtype"] == v["dtype"]
    assert_matches(calc, v, v["dtype"])


def test_mp0_medium_sized_model_converts_and_matches(mace_reference, converted):
    folder, ref = mace_reference
    v = ref["variants"]["mp0_medium"]
    assert v["n_parameters"] == 4_688_656  # the MACE-MP-0 medium configuration
    path = converted("mp0_medium")
    meta = package.read(path).metadata
    assert meta["source"]["n_parameters_source"] == 4_688_656
    assert len(meta["species"]) == 89 and meta["cutoff"] == 6.0
    assert_matches(EquivariantCalculator(path, compile="eager", device="cpu"), v, "float64")


def test_metadata_records_the_source_and_conversion_is_deterministic(mace_reference, converted, tmp_path):
    folder, ref = mace_reference
    v = ref["variants"]["two_heads"]
    source = folder / v["file"]
    meta = package.read(converted("two_heads")).metadata  # the whole-file checks of schema 2
    assert meta["schema_version"] == package.SCHEMA_VERSION and len(meta["sha256"]) == 64
    src = meta["source"]
    assert src["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert src["mace_version"] == "unknown"  # mace-torch 0.3.x stores no version in the module
    assert (src["head"], src["heads"], src["model_class"]) == ("r2scan", ["pbe", "r2scan"], "ScaleShiftMACE")
    assert set(src["conventions"]) >= {"edge_vector", "harmonics", "wigner_3j", "symmetric_contraction", "energy"}
    again = package.read(convert(source, tmp_path / "again.eqm", head="r2scan")).metadata
    assert again["weights_sha256"] == meta["weights_sha256"]
    # Another head is another model; no head given and none called "default": refused.
    other = EquivariantCalculator(str(convert(source, tmp_path / "pbe.eqm", head="pbe")), compile="eager")
    ours = EquivariantCalculator(converted("two_heads"), compile="eager")
    bulk = atoms_of(v["structures"]["triclinic_bulk"])
    assert abs(other.predict([bulk])[0]["energy"] - ours.predict([bulk])[0]["energy"]) > 1e-3
    with pytest.raises(UnsupportedModelError, match="--head"):
        convert(source, tmp_path / "x.eqm")
    with pytest.raises(UnsupportedModelError, match="no head 'hse'"):
        convert(source, tmp_path / "x.eqm", head="hse")


def test_e3nn_conventions_match_e3nn(mace_reference):
    """The written-down harmonics and 3j signs equal e3nn 0.4.4's, for every triple l <= 3."""
    conv = mace_reference[1]["conventions"]
    for key, value in conv["wigner_3j"].items():
        l1, l2, l3 = map(int, key.split(","))
        np.testing.assert_allclose(e3nn.wigner_3j(l1, l2, l3), np.array(value), rtol=0, atol=1e-12, err_msg=key)
    vectors = np.array(conv["harmonics"]["vectors"])
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    np.testing.assert_allclose(e3nn.harmonics(unit, 3), np.array(conv["harmonics"]["values"]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("variant", ["density_zbl_agnesi", "density_residual_soft_l0"])
def test_converted_models_pass_the_physics_library(converted, variant):
    """ZBL, distance transforms, density normalisation, plain first layer and L = 0 features:
    forces and stress are derivatives of the energy, and O(3) symmetry holds."""
    calc = EquivariantCalculator(converted(variant), compile="eager", device="cpu")
    species = calc.metadata["species"]
    structures = T.structures(species, seed=1)
    tol = T.TOLERANCES["float64"]
    for name in ("bulk", "small_triclinic", "slab", "cluster"):
        assert T.check_forces_fd(calc, structures[name]) <= tol["fd_forces"], name
    for name in ("bulk", "slab"):
        assert T.check_stress_fd(calc, structures[name]) <= tol["fd_stress"], name
    worst = T.check_symmetry(calc, structures["slab"], n=10)
    assert max(worst.values()) <= tol["symmetry"], worst


@pytest.mark.parametrize("variant", ["density_zbl_agnesi", "density_residual_soft_l0"])
def test_converted_models_have_exact_second_derivatives(converted, variant):
    """mace-torch's MACE is smooth (SiLU, polynomial envelopes, ZBL, Agnesi/Soft transforms,
    tanh density): the converted Hessian equals finite differences of the forces, is symmetric
    with zero acoustic sums, and at symmetric sites the force grows linearly with the
    displacement, with the Hessian's diagonal as slope."""
    calc = EquivariantCalculator(converted(variant), compile="eager", device="cpu")
    assert T.second_order_limit(calc) is None
    tol = T.TOLERANCES["float64"]
    structures = T.structures(calc.metadata["species"], seed=1)
    for name in ("small_triclinic", "cluster"):
        # h = 2e-4 Å: the envelope's third derivative jumps at the cutoff (C2 there, like every
        # DimeNet envelope) and a pair of small_triclinic sits 1.1e-3 Å beyond r_max = 4.5 Å,
        # inside the default stencil (±2e-3 Å), which then measures that jump, not the Hessian.
        assert T.check_hessian_fd(calc, structures[name], h=2e-4) <= tol["fd_hessian"], name
        r = T.check_hessian_identities(calc, structures[name])
        assert r["symmetry"] <= tol["hessian_symmetry"] and r["acoustic_sum"] <= tol["acoustic_sum"], (name, r)
    sites = T.symmetric_sites(["Cu"], adsorbate="O")
    for site in ("fcc", "adsorbate_hollow"):
        atoms, index, direction = sites[site]
        r = T.check_linear_response(calc, atoms, index, direction, hessian_calc=calc)
        assert r["force_at_site"] < 1e-9, (site, r)
        assert r["spread"] <= tol["linear_response"] and r["hessian"] <= 1e-5, (site, r)


@pytest.mark.parametrize("kind", ["torchscript", "aoti"])
def test_converted_model_compiles(converted, kind):
    path = converted("density_zbl_agnesi")
    eager = EquivariantCalculator(path, compile="eager", device="cpu")
    compiled = EquivariantCalculator(path, compile=kind, device="cpu")
    assert compiled.model.compile_kind == kind
    systems = list(T.structures(eager.metadata["species"], seed=2).values())
    assert T.check_compiled(compiled, eager, systems) <= T.TOLERANCES["float64"]["compiled"]


def test_cli_convert(mace_reference, tmp_path):
    folder, ref = mace_reference
    from eqcalc.cli import build_parser, main

    help_text = build_parser()._subparsers._group_actions[0].choices["convert"].format_help()
    assert "example:" in help_text and "eqcalc convert" in help_text
    out = tmp_path / "cli.eqm"
    assert main(["convert", str(folder / "plain_first_l2.model"), str(out)]) == 0
    assert package.read(str(out)).metadata["source"]["model_class"] == "MACE"
    assert main(["convert", str(folder / "two_heads.model"), str(tmp_path / "h.eqm")]) == 2  # no head


# ---- files that must be refused -----------------------------------------------------------
def torch_zip(path: Path, data_pkl: bytes, prefix: str = "archive") -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr(f"{prefix}/data.pkl", data_pkl)
        z.writestr(f"{prefix}/byteorder", "little")
        z.writestr(f"{prefix}/version", "3\n")
    return path


class _Payload:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("how", ["os.system", "eval", "inside_ordered_dict"])
def test_malicious_model_is_refused_and_never_runs(tmp_path, how):
    marker = tmp_path / "pwned"
    command = f"touch {marker}"
    payload = {"os.system": _Payload(os.system, command),
               "eval": _Payload(eval, f"__import__('os').system({command!r})"),
               "inside_ordered_dict": __import__("collections").OrderedDict(
                   [("model", _Payload(os.system, command))])}[how]
    data = pickle.dumps(payload, protocol=2)
    pickle.loads(data)  # a normal unpickler runs it: the file is a real attack
    assert marker.exists()
    marker.unlink()
    path = torch_zip(tmp_path / "evil.model", data)
    with pytest.raises(UnsafeModelError, match="system|eval"):
        convert(path, tmp_path / "out.eqm")
    assert not marker.exists() and not (tmp_path / "out.eqm").exists()


def test_unaccepted_opcodes_limits_and_foreign_layouts_are_refused(mace_reference, tmp_path):
    folder, _ = mace_reference
    # Protocol 0/1 INST runs the class with arguments: refused before unpickling.
    inst = b"\x80\x02(X\x07\x00\x00\x00touch xios\nsystem\n."
    with pytest.raises(UnsafeModelError, match="opcode INST"):
        convert(torch_zip(tmp_path / "inst.model", inst), tmp_path / "o.eqm")
    # cuequivariance layout: the way out is named.
    cueq = b"\x80\x02ccuequivariance_torch.operations\nSymmetricContraction\nq\x00)\x81q\x01."
    with pytest.raises(UnsafeModelError, match="mace_cueq_to_e3nn"):
        convert(torch_zip(tmp_path / "cueq.model", cueq), tmp_path / "o.eqm")
    # An unknown mace block in an otherwise genuine file (same-length class name).
    genuine = zipfile.ZipFile(folder / "mp0_like.model")
    pkl_name = next(n for n in genuine.namelist() if n.endswith("data.pkl"))
    edited = tmp_path / "edited.model"
    with zipfile.ZipFile(edited, "w", compression=zipfile.ZIP_STORED) as z:
        for info in genuine.infolist():
            blob = genuine.read(info.filename)
            if info.filename == pkl_name:
                blob = blob.replace(b"RealAgnosticResidualInteractionBlock", b"RealAgnosticResidualInteractionBlocX")
            z.writestr(info, blob)
    with pytest.raises(UnsafeModelError, match="RealAgnosticResidualInteractionBlocX"):
        convert(edited, tmp_path / "o.eqm")
    # Size limits are checked before anything is read.
    with pytest.raises(UnsafeModelError, match="limit"):
        TorchArchive(folder / "mp0_like.model", Limits(member_bytes=1000))
    with pytest.raises(UnsafeModelError, match="limit"):
        TorchArchive(folder / "mp0_like.model", Limits(pickle_bytes=1000)).load(Allow())
    # Not a torch.save zip at all.
    (tmp_path / "plain.model").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ModelFileError, match="not a zip"):
        convert(tmp_path / "plain.model", tmp_path / "o.eqm")


@pytest.mark.parametrize("variant", ["mp0_like", "mp0_like_float32"])
def test_reader_rebuilds_every_tensor_bit_for_bit(mace_reference, variant):
    """Without torch.load, the restricted reader gives every tensor of the state dict (values,
    dtype, shape, strides, offsets into shared storages) exactly as mace-torch has it."""
    folder, ref = mace_reference
    from potentials.convert.mace import ALLOW
    from potentials.convert.torch_pickle import state_dict

    # (e3nn's Wigner 3j buffers of its generated tensor-product code sit inside TorchScript
    # bytes, which are never loaded: the converter recomputes them, see test_e3nn_conventions.)
    expected = {k: v for k, v in ref["variants"][variant]["tensor_sha256"].items() if "._compiled_main" not in k}
    with TorchArchive(folder / ref["variants"][variant]["file"]) as archive:
        tensors = state_dict(archive.load(ALLOW))
    assert set(tensors) == set(expected)
    for key, t in tensors.items():
        assert hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest() == expected[key], key


def test_mace_files_written_before_the_mace_torch_options_load_unchanged(tmp_path):
    """A package whose config predates the new MACE fields (envelope order, radial depth,
    readout width, first interaction, normalisation, transform, pair term) loads with the
    behaviour it was written with (FILE_DEFAULTS), giving identical numbers."""
    from potentials.mace import MACEConfig
    from potentials.package import metadata_of

    model = potentials.build("mace", species=["Cu", "O"], dtype="float64", channels=4)
    new = potentials.save(model, tmp_path / "new.eqm")
    meta = metadata_of(model)
    meta["config"] = {k: v for k, v in meta["config"].items() if k not in MACEConfig.FILE_DEFAULTS}
    assert "envelope_p" not in meta["config"] and "pair_repulsion" not in meta["config"]
    old = package.write(tmp_path / "old.eqm", meta, model.state_dict())
    structure = T.structures(["Cu", "O"])["bulk"]
    a = EquivariantCalculator(str(new), compile="eager").predict([structure])[0]
    b = EquivariantCalculator(str(old), compile="eager").predict([structure])[0]
    assert a["energy"] == b["energy"] and np.array_equal(a["forces"], b["forces"])
    assert potentials.load(old).config == model.config
