"""Quick unit tests of the architectures in potentials/ (shapes, seeding, envelopes, scripting).

The full physics test library (invariance, smoothness, derivatives) lives elsewhere.
"""
import json

import numpy as np
import pytest
import torch

import potentials
from eqcalc import keys
from eqcalc.errors import InvalidOptionError, UnknownElementError
from potentials import nn as pnn
from potentials import registry

ARCHS = ["schnet", "painn"]


def cu_graph(repeat=2, cutoff=5.0, dtype=torch.float64, rattle=0.05, seed=1):
    from ase.build import bulk
    from ase.neighborlist import neighbor_list

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(repeat)
    atoms.rattle(rattle, seed=seed)
    i, j, S = neighbor_list("ijS", atoms, cutoff)
    positions = torch.tensor(atoms.positions, dtype=torch.float64, requires_grad=True)
    cell = torch.tensor(atoms.cell.array, dtype=torch.float64)
    edge_index = torch.tensor(np.stack([i, j]), dtype=torch.int64)
    vectors = positions[edge_index[1]] - positions[edge_index[0]] + torch.tensor(S, dtype=torch.float64) @ cell
    n = len(atoms)
    data = {
        keys.SPECIES: torch.tensor([k % 2 for k in range(n)], dtype=torch.int64),
        keys.EDGE_INDEX: edge_index,
        keys.EDGE_VECTORS: vectors.to(dtype),
        keys.SYSTEM: torch.zeros(n, dtype=torch.int64),
        keys.POSITIONS: positions.detach().to(dtype),
        keys.CELL: cell.unsqueeze(0).to(dtype),
    }
    return positions, data


def test_registry_lists_architectures():
    assert set(ARCHS) <= set(potentials.architectures())
    for name in ARCHS:
        assert potentials.ARCHITECTURES[name].architecture == name


def test_bad_names_and_options():
    with pytest.raises(InvalidOptionError, match="painn"):
        potentials.build("nosuchnet", ["Cu"])
    with pytest.raises(InvalidOptionError, match="features"):
        potentials.build("painn", ["Cu"], featurez=3)
    with pytest.raises(InvalidOptionError, match="polynomial"):
        potentials.build("painn", ["Cu"], envelope="square")
    with pytest.raises(InvalidOptionError):
        potentials.build("painn", ["Cu"], dtype="float16")
    with pytest.raises(UnknownElementError, match="Xx"):
        potentials.build("schnet", ["Cu", "Xx"])


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("direct", [False, True])
def test_shapes_dtype_and_magnitude(name, direct):
    model = potentials.build(name, ["Cu", "Pt"], direct_forces=direct)
    assert model.cutoff == 5.0
    assert model.species_z.tolist() == [29, 78]
    assert next(model.parameters()).dtype == torch.float32
    positions, data = cu_graph(dtype=torch.float32)
    out = model(data)
    assert out[keys.ENERGIES].shape == (32,) and out[keys.ENERGIES].dtype == torch.float32
    assert (keys.FORCES in out) == direct
    if direct:
        assert out[keys.FORCES].shape == (32, 3)
        assert out[keys.FORCES].abs().max() > 1e-3
    forces = -torch.autograd.grad(out[keys.ENERGIES].sum(), positions)[0]
    assert torch.isfinite(forces).all()
    rms = forces.pow(2).mean().sqrt().item()
    assert 1e-2 < rms < 10.0, rms


@pytest.mark.parametrize("name", ARCHS)
def test_seed_determinism_and_global_state(name):
    state = torch.random.get_rng_state()
    default = torch.get_default_dtype()
    a = potentials.build(name, ["Cu"], seed=3)
    b = potentials.build(name, ["Cu"], seed=3)
    c = potentials.build(name, ["Cu"], seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.get_default_dtype() == default
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("envelope", ["polynomial", "cosine"])
def test_envelope_zero_at_and_beyond_cutoff(envelope):
    env = pnn.make_envelope(envelope, 5.0).double()
    d = torch.tensor([0.5, 4.999999, 5.0, 5.3, 50.0], dtype=torch.float64, requires_grad=True)
    value = env(d)
    (grad,) = torch.autograd.grad(value.sum(), d)
    assert value[2:].eq(0).all() and grad[2:].eq(0).all()
    assert abs(value[1].item()) < 1e-9 and abs(grad[1].item()) < 1e-6
    assert 0 < value[0].item() <= 1


@pytest.mark.parametrize("name", ARCHS)
def test_skin_edges_contribute_nothing(name):
    model = potentials.build(name, ["Cu", "Pt"], dtype="float64", direct_forces=True)
    _, data = cu_graph(cutoff=5.0)
    _, data_skin = cu_graph(cutoff=6.0)
    assert data_skin[keys.EDGE_INDEX].shape[1] > data[keys.EDGE_INDEX].shape[1]
    a, b = model(data), model(data_skin)
    torch.testing.assert_close(a[keys.ENERGIES], b[keys.ENERGIES], rtol=0, atol=1e-13)
    torch.testing.assert_close(a[keys.FORCES], b[keys.FORCES], rtol=0, atol=1e-13)


@pytest.mark.parametrize("name", ARCHS)
def test_rotation_reflection_invariance(name):
    model = potentials.build(name, ["Cu", "Pt"], dtype="float64", direct_forces=True)
    _, data = cu_graph()
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    if torch.det(q) > 0:
        q = -q  # include a reflection
    rotated = dict(data, **{keys.EDGE_VECTORS: data[keys.EDGE_VECTORS] @ q.T})
    a, b = model(data), model(rotated)
    e = a[keys.ENERGIES]
    assert ((b[keys.ENERGIES] - e).abs().max() / e.abs().max()).item() < 1e-12
    torch.testing.assert_close(b[keys.FORCES], a[keys.FORCES] @ q.T, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("direct", [False, True])
def test_torchscript_and_make_fx(name, direct):
    from torch.fx.experimental.proxy_tensor import make_fx

    model = potentials.build(name, ["Cu", "Pt"], dtype="float64", direct_forces=direct)
    _, data = cu_graph()
    reference = model(data)
    scripted = torch.jit.script(model)
    for key, value in scripted(data).items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=1e-12)

    def f(species, edge_index, vectors):
        return model({keys.SPECIES: species, keys.EDGE_INDEX: edge_index, keys.EDGE_VECTORS: vectors})

    args = (data[keys.SPECIES], data[keys.EDGE_INDEX], data[keys.EDGE_VECTORS])
    graph = make_fx(f, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*args)
    # A different size must run through the same symbolic graph.
    _, data3 = cu_graph(repeat=3)
    traced = graph(data3[keys.SPECIES], data3[keys.EDGE_INDEX], data3[keys.EDGE_VECTORS])
    torch.testing.assert_close(traced[keys.ENERGIES], model(data3)[keys.ENERGIES], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ARCHS)
def test_config_round_trip(name):
    model = potentials.build(name, ["Cu", "O"], cutoff=4.5, features=16, num_interactions=2,
                             direct_forces=True, dtype="float64", seed=7)
    d = json.loads(json.dumps(model.config_dict()))
    assert type(model).Config(**d) == model.config
    again = potentials.from_config(name, d, "float64")
    again.load_state_dict(model.state_dict())
    _, data = cu_graph()
    data[keys.SPECIES] = torch.zeros_like(data[keys.SPECIES])
    torch.testing.assert_close(again(data)[keys.ENERGIES], model(data)[keys.ENERGIES], rtol=0, atol=0)
    with pytest.raises(InvalidOptionError, match="bogus"):
        registry.from_config(name, dict(d, bogus=1), "float32")


def test_scatter_sum():
    src = torch.arange(12.0).reshape(4, 3)
    out = pnn.scatter_sum(src, torch.tensor([0, 2, 0, 2]), 3)
    torch.testing.assert_close(out, torch.tensor([[6.0, 8, 10], [0, 0, 0], [12, 14, 16]]))
