"""Shared fixtures: one seeded, untrained package per (architecture, dtype), written once."""
import os

import pytest

SPECIES = ["Cu", "Pt", "C", "O", "H"]
#: Test hyperparameters per architecture (registry defaults otherwise, cutoff 5 Å). Angular
#: models cost per triplet, ~(neighbors)² per atom: at 3.5 Å the test cells still reach periodic
#: images of their own atoms with ~10x fewer triplets than at 5 Å, and one narrow interaction
#: block runs every term of the model (embedding, triplet interaction, outputs) at a fraction of
#: the default size's time, so the same checks stay affordable (tests, and AOTInductor compiles).
TEST_HYPER = {
    "dimenet": dict(cutoff=3.5, features=8, out_features=8, int_features=4, basis_features=4,
                    num_interactions=1, num_spherical=3, num_radial=4),
    "gemnet": dict(cutoff=3.5, features=8, edge_features=8, trip_features=4, bilinear_features=4,
                   rbf_features=4, cbf_features=4, num_interactions=1, num_spherical=3, num_radial=4),
}


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    # Compiled forms go to a per-run folder: tests never read a stale user cache.
    os.environ["EQCALC_CACHE"] = str(tmp_path_factory.mktemp("eqcalc-cache"))


@pytest.fixture(scope="session")
def package_path(tmp_path_factory):
    import potentials

    made = {}

    def get(arch: str, dtype: str = "float64", **hyper) -> str:
        hyper = dict(TEST_HYPER.get(arch, dict(cutoff=5.0)), **hyper)
        key = (arch, dtype, tuple(sorted(hyper.items())))
        if key not in made:
            model = potentials.build(arch, species=SPECIES, dtype=dtype, **hyper)
            path = tmp_path_factory.mktemp("models") / f"{arch}-{dtype}.eqm"
            made[key] = str(potentials.save(model, path))
        return made[key]

    return get
