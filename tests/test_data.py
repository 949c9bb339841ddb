"""EMT reference data: labels present and finite, deterministic splits, label-checking reader."""
import ase.io
import numpy as np
import pytest
from ase.build import molecule
from ase.calculators.singlepoint import SinglePointCalculator

from eqcalc.errors import EqcalcError, InvalidAtomsError
from potentials import data


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "emt.xyz"
    data.generate(path, 16, seed=3)
    return path


def test_generated_frames_have_finite_labels(small):
    frames = data.read_dataset(small)
    assert len(frames) == 16
    for atoms in frames:
        assert np.isfinite(atoms.get_potential_energy())
        forces = atoms.get_forces()
        assert forces.shape == (len(atoms), 3) and np.all(np.isfinite(forces))
        assert atoms.info["split"] in data.SPLITS
        if atoms.pbc.all():
            assert np.all(np.isfinite(atoms.get_stress()))
        else:
            assert "stress" not in data.labels(atoms)
    assert {s for a in frames for s in a.get_chemical_symbols()} <= set(data.ELEMENTS)


def test_generation_and_split_are_deterministic(small, tmp_path):
    again = data.generate(tmp_path / "again.xyz", 16, seed=3)
    assert again.read_text() == small.read_text()
    splits = [a.info["split"] for a in data.read_dataset(small)]
    assert set(splits) <= set(data.SPLITS) and "train" in splits
    # frames of one starting structure (one MD trajectory) never straddle splits
    frames = data.read_dataset(small)
    by_group = {}
    for a in frames:
        by_group.setdefault(a.info["group"], set()).add(a.info["split"])
    assert all(len(s) == 1 for s in by_group.values())


def _write(path, frames):
    ase.io.write(path, frames, format="extxyz")
    return path


def _co(energy=-1.0, forces=True):
    atoms = molecule("CO")
    results = {"energy": energy}
    if forces:
        results["forces"] = np.zeros((2, 3))
    atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms


def test_reader_refuses_missing_forces(tmp_path):
    path = _write(tmp_path / "missing.xyz", [_co(), _co(forces=False)])
    with pytest.raises(InvalidAtomsError) as info:
        data.read_dataset(path)
    message = str(info.value)
    assert "missing.xyz" in message and "frame 1" in message and "'forces'" in message
    assert isinstance(info.value, EqcalcError)
    # energy-only training does not need forces
    assert len(data.read_dataset(path, require=("energy",))) == 2


def test_reader_refuses_nan_energy(tmp_path):
    path = _write(tmp_path / "nan.xyz", [_co(), _co(), _co(energy=float("nan"))])
    with pytest.raises(data.DataLabelError) as info:
        data.read_dataset(path)
    message = str(info.value)
    assert "nan.xyz" in message and "frame 2" in message and "'energy'" in message
    with pytest.raises(data.DataLabelError, match="frame 2"):
        data.read_dataset(path, require=("energy",))


# ---- ASE database (.db) files ------------------------------------------------------------------
def _write_db(path, frames, **key_value_pairs):
    import ase.db

    with ase.db.connect(path, append=False) as db:
        for atoms in frames:
            db.write(atoms, **key_value_pairs)
    return path


def test_db_reader_matches_extxyz(small, tmp_path):
    frames = data.read_dataset(small)
    db = tmp_path / "emt.db"
    import ase.db

    with ase.db.connect(db) as con:
        for atoms in frames:
            con.write(atoms, split=atoms.info["split"], group=int(atoms.info["group"]), kind=atoms.info["kind"])
    again = data.read_dataset(db)
    assert len(again) == len(frames)
    for a, b in zip(frames, again):
        assert a.get_chemical_symbols() == b.get_chemical_symbols()
        np.testing.assert_allclose(a.positions, b.positions)
        assert b.info["split"] == a.info["split"] and b.info["group"] == a.info["group"]
        la, lb = data.labels(a), data.labels(b)
        assert sorted(la) == sorted(lb)
        for key in la:
            np.testing.assert_allclose(la[key], lb[key])
    assert len(data.read_dataset(db, index="2:5")) == 3


def test_db_reader_refuses_missing_forces_naming_the_row(tmp_path):
    path = _write_db(tmp_path / "missing.db", [_co(), _co(forces=False)])
    with pytest.raises(data.DataLabelError) as info:
        data.read_dataset(path)
    message = str(info.value)
    assert "missing.db" in message and "row 2" in message and "'forces'" in message
    # energy-only training does not need forces; rows without a split get one
    frames = data.read_dataset(path, require=("energy",))
    assert len(frames) == 2 and all(f.info["split"] in data.SPLITS for f in frames)


def test_db_reader_refuses_nonfinite_and_missing_energy(tmp_path):
    path = _write_db(tmp_path / "inf.db", [_co(), _co(), _co(energy=float("inf"))])
    with pytest.raises(data.DataLabelError, match=r"inf\.db: row 3: label 'energy'"):
        data.read_dataset(path, require=("energy",))
    bare = molecule("CO")
    path = _write_db(tmp_path / "bare.db", [_co(), bare])
    with pytest.raises(data.DataLabelError, match=r"bare\.db: row 2: label 'energy' is missing"):
        data.read_dataset(path)


def test_db_reader_refuses_a_file_that_is_not_a_database(tmp_path):
    path = tmp_path / "junk.db"
    path.write_text("this is not sqlite\n" * 10)
    with pytest.raises(data.DataLabelError, match="junk.db"):
        data.read_dataset(path)


def test_near_minimum_frames_sit_close_to_emt_minima(tmp_path):
    """Each relaxed structure gives three small displacements inside one basin: relaxing their
    mean with EMT again finds a minimum below every frame, each frame's EMT forces point back to
    it (F·u < 0) and no atom is further than 0.4 Å from it; the file is deterministic."""
    from ase.calculators.emt import EMT
    from ase.optimize import BFGS

    path = data.generate_near_minima(tmp_path / "m.xyz", 6, seed=2, elements=("Cu", "O", "H"))
    frames = data.read_dataset(path)
    assert len(frames) == 6 and {f.info["kind"] for f in frames} == {"near-minimum"}
    groups = {}
    for f in frames:
        groups.setdefault(f.info["group"], []).append(f)
    assert sorted(len(g) for g in groups.values()) == [3, 3]
    for g in groups.values():
        minimum = g[0].copy()
        minimum.positions = np.mean([f.positions for f in g], axis=0)
        minimum.calc = EMT()
        BFGS(minimum, logfile=None).run(fmax=1e-3, steps=300)
        e_min = minimum.get_potential_energy()
        for f in g:
            u = f.positions - minimum.positions
            assert np.abs(u).max() < 0.4, f.info["site"]
            assert data.labels(f)["energy"] > e_min
            assert np.sum(data.labels(f)["forces"] * u) < 0, f.info["site"]
    assert data.generate_near_minima(tmp_path / "again.xyz", 6, seed=2,
                                     elements=("Cu", "O", "H")).read_text() == path.read_text()


def test_path_frames_cross_a_barrier_and_never_draw_a_held_out_hop(tmp_path):
    """Each hop gives its interior NEB images plus a rattled top image; the images climb a real
    barrier (the highest EMT energy above the lowest by > 10 meV) and the moving atom travels
    between two sites; labels are EMT's; the two held-out Cu chemistries are never drawn."""
    from ase.calculators.emt import EMT

    path = data.generate_paths(tmp_path / "p.xyz", 3, seed=3, elements=("Cu", "O"), n_images=3)
    frames = data.read_dataset(path)
    assert {f.info["kind"] for f in frames} == {"path"} and len(frames) == 3 * 4
    assert not {f.info["site"] for f in frames} & {"hop-100-Cu-O", "vacancy-Cu-Cu"}
    for group in sorted({f.info["group"] for f in frames}):
        band = [f for f in frames if f.info["group"] == group][:3]
        energies = [data.labels(f)["energy"] for f in band]
        assert max(energies) - min(energies) > 0.01, band[0].info["site"]
        travel = np.linalg.norm(band[-1].positions - band[0].positions, axis=1).max()
        assert 0.3 < travel < 3.0, band[0].info["site"]
    check = frames[1].copy()
    check.calc = EMT()
    assert abs(check.get_potential_energy() - data.labels(frames[1])["energy"]) < 1e-9
    assert data.generate_paths(tmp_path / "again.xyz", 3, seed=3, elements=("Cu", "O"),
                               n_images=3).read_text() == path.read_text()
