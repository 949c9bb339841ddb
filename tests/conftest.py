"""Shared fixtures: one seeded, untrained package per (architecture, dtype), written once."""
import os

import pytest

SPECIES = ["Cu", "Pt", "C", "O", "H"]
#: Test cutoff per architecture (Å; 5.0 otherwise). Angular models cost per triplet, ~(neighbors)²
#: per atom: at 3.5 Å the test cells still reach periodic images of their own atoms, with ~10x
#: fewer triplets than at 5 Å, so the same checks stay affordable.
CUTOFFS = {"dimenet": 3.5, "gemnet": 3.5}


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    # Compiled forms go to a per-run folder: tests never read a stale user cache.
    os.environ["EQCALC_CACHE"] = str(tmp_path_factory.mktemp("eqcalc-cache"))


@pytest.fixture(scope="session")
def package_path(tmp_path_factory):
    import potentials

    made = {}

    def get(arch: str, dtype: str = "float64", **hyper) -> str:
        hyper.setdefault("cutoff", CUTOFFS.get(arch, 5.0))
        key = (arch, dtype, tuple(sorted(hyper.items())))
        if key not in made:
            model = potentials.build(arch, species=SPECIES, dtype=dtype, **hyper)
            path = tmp_path_factory.mktemp("models") / f"{arch}-{dtype}.eqm"
            made[key] = str(potentials.save(model, path))
        return made[key]

    return get
