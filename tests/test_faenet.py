"""FAENet (potentials.faenet): element features, config, exact derivatives of the frame-averaged
energy, fp32 symmetry through the calculator, the Eq. 9 training term, and the shipped model."""
import os

import numpy as np
import pytest
import torch

import potentials
from eqcalc import EquivariantCalculator, keys
from eqcalc.errors import InvalidOptionError
from potentials import faenet
from potentials import testing as T

SPECIES = ["Cu", "Pt", "C", "O", "H"]
SMALL = dict(hidden_channels=12, num_filters=12, num_gaussians=8, num_interactions=2, pg_hidden_channels=4,
             force_head_hidden_channels=8, direct_forces=True)
STRUCTS = T.structures(SPECIES, seed=5)
SHIPPED = os.path.join(os.path.dirname(potentials.__file__), "models", "faenet.eqm")


def test_period_and_group():
    table = {1: (1, 1), 2: (1, 18), 6: (2, 14), 8: (2, 16), 13: (3, 13), 29: (4, 11), 46: (5, 10),
             57: (6, 0), 78: (6, 10), 79: (6, 11), 86: (6, 18), 89: (7, 0), 92: (7, 0)}
    for z, expected in table.items():
        assert faenet.period_and_group(z) == expected, z


def test_config_is_validated_and_hyperparameters_follow_table_7():
    fields = {f.name for f in faenet.FAENetConfig.__dataclass_fields__.values()}
    assert {"hidden_channels", "num_filters", "num_gaussians", "num_interactions", "pg_hidden_channels",
            "force_head_hidden_channels"} <= fields
    with pytest.raises(InvalidOptionError, match="num_filters"):
        potentials.build("faenet", ["Cu"], num_filters=0)
    with pytest.raises(InvalidOptionError, match="norm"):
        potentials.build("faenet", ["Cu"], norm="batch")
    with pytest.raises(InvalidOptionError, match="force_head"):
        potentials.build("faenet", ["Cu"], direct_forces=True, force_head="gemnet")


@pytest.fixture(scope="module")
def full_path(tmp_path_factory):
    def get(dtype):
        model = potentials.build("faenet", SPECIES, dtype=dtype, frame_averaging="full", **SMALL)
        return str(potentials.save(model, tmp_path_factory.mktemp("fae") / f"full-{dtype}.eqm"))
    return get


def test_conservative_forces_and_stress_are_derivatives_of_the_averaged_energy(full_path):
    calc = EquivariantCalculator(full_path("float64"), compile="eager", device="cpu")
    for name in ("bulk", "slab", "small_triclinic"):
        assert T.check_forces_fd(calc, STRUCTS[name]) < 1e-6, name
        assert T.check_stress_fd(calc, STRUCTS[name]) < 1e-6, name


def test_full_fa_symmetry_in_float32(full_path):
    """Issue figure: full FA energy <= 1e-5 relative and forces <= 1e-4 in fp32 over 100 O(3).
    (Direct forces of an untrained head nearly cancel over the 8 frames, so their relative error
    is meaningless; the trained shipped model checks them below.)"""
    calc = EquivariantCalculator(full_path("float32"), compile="eager", device="cpu")
    worst = T.check_symmetry(calc, STRUCTS["slab"], n=100)
    assert worst["energy"] <= 1e-5 and worst["forces"] <= 1e-4, worst


@pytest.mark.parametrize("head", ["mlp", "pair"])
def test_direct_force_heads_are_equivariant_under_full_fa(tmp_path, head):
    """Both heads, rotated back and averaged over the 8 frames, give O(3)-equivariant forces."""
    model = potentials.build("faenet", SPECIES, dtype="float64", frame_averaging="full",
                             **dict(SMALL, force_head=head))
    calc = EquivariantCalculator(str(potentials.save(model, tmp_path / f"{head}.eqm")), compile="eager",
                                 device="cpu", forces="direct")
    worst = T.check_symmetry(calc, STRUCTS["slab"], n=10)
    assert worst["energy"] < 1e-10 and worst["forces"] < 1e-9, worst
    assert np.abs(calc.predict([STRUCTS["slab"]])[0]["forces"]).max() > 1e-6  # not trivially zero


def test_graph_norm_option_builds_and_normalises_per_system():
    model = potentials.build("faenet", ["Cu"], dtype="float64", norm="graph", frame_averaging="none", **SMALL)
    norms = [m for m in model.modules() if isinstance(m, faenet.GraphNorm)]
    assert len(norms) == SMALL["num_interactions"]
    h = torch.randn(5, 12, dtype=torch.float64)
    system = torch.tensor([0, 0, 0, 1, 1])
    out = norms[0](h, system, torch.tensor([[3.0], [2.0]], dtype=torch.float64))
    assert torch.allclose(out[:3].mean(0), torch.zeros(12, dtype=torch.float64), atol=1e-12)


def test_energy_gradient_consistency_term_is_eq9():
    from potentials.train import Frame, _forward, _loss, collate, make_wrapper
    from ase.calculators.emt import EMT

    atoms = STRUCTS["bulk"].copy()
    atoms.set_chemical_symbols(["Cu"] * len(atoms))
    atoms.calc = EMT()
    atoms.info["energy"] = atoms.get_potential_energy()
    atoms.arrays["forces"] = atoms.get_forces()
    model = potentials.build("faenet", ["Cu"], dtype="float64", frame_averaging="full", **SMALL)
    batch = collate([Frame(atoms, {29: 0})], 5.0)
    out = _forward(make_wrapper(model, "direct", create_graph=True), batch)
    gap = ((out[keys.FORCES] - out["forces_conservative"]) ** 2).mean()
    assert gap > 0  # an untrained head is not the gradient
    with_term = _loss(out, batch, (1.0, 1.0, 0.0, 2.0))
    without = _loss(out, batch, (1.0, 1.0, 0.0, 0.0))
    assert torch.allclose(with_term["total"] - without["total"], 2.0 * gap)
    (grad,) = torch.autograd.grad(with_term["energy_grad"], [model.model.force_head.mlp[0].weight])
    assert grad.abs().sum() > 0
    # conservative_forces_weight puts the force labels on -dE/dr as well: the energy's weights
    # get a gradient from it, the head's none.
    labels = _loss(out, batch, (1.0, 1.0, 0.0, 0.0, 3.0))
    cons_err = ((out["forces_conservative"] - batch["forces_ref"]) ** 2).mean()
    assert torch.allclose(labels["total"] - without["total"], 3.0 * cons_err)
    head, energy = model.model.force_head.mlp[0].weight, model.model.energy[0].weight
    g_head, g_energy = torch.autograd.grad(labels["conservative_forces"], [head, energy], allow_unused=True)
    assert (g_head is None or g_head.abs().sum() == 0) and g_energy.abs().sum() > 0


@pytest.mark.parametrize("option", ["energy_grad_weight", "conservative_forces_weight"])
def test_training_rejects_direct_force_terms_without_direct_mode(tmp_path, option):
    from potentials.train import train

    with pytest.raises(InvalidOptionError, match="force_mode: direct"):
        train({"architecture": "faenet", option: 1.0, "work_dir": str(tmp_path)})


@pytest.mark.skipif(not os.path.exists(SHIPPED), reason="the shipped faenet model is built by make_models")
def test_shipped_model_serves_both_force_modes_with_exact_symmetry():
    cons = EquivariantCalculator("faenet", compile="eager", device="cpu", dtype="float64")
    direct = EquivariantCalculator("faenet", compile="eager", device="cpu", dtype="float64", forces="direct")
    assert cons.metadata["frame_averaging"] == "stochastic"
    assert set(cons.metadata["force_modes"]) == {"conservative", "direct"}
    slab = STRUCTS["slab"]
    slab.set_chemical_symbols(["Cu"] * (len(slab) - 2) + ["C", "O"])
    assert T.check_forces_fd(cons, slab) < 1e-6
    assert max(T.check_symmetry(direct, slab, n=10).values()) < 1e-10
    a, b = cons.predict([slab])[0], direct.predict([slab])[0]
    assert abs(a["energy"] - b["energy"]) < 1e-12 and np.isfinite(b["forces"]).all()
    fp32 = EquivariantCalculator("faenet", compile="eager", device="cpu", forces="direct")
    worst = T.check_symmetry(fp32, slab, n=100)
    assert worst["energy"] <= 1e-5 and worst["forces"] <= 1e-4, worst
