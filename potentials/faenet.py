"""FAENet: frame averaging equivariant GNN (Duval et al., ICML 2023), registered as ``"faenet"``.

FAENet itself has no symmetry constraint: it reads the pair vectors ``r_ij`` ``(n_edges, 3)``
directly. Symmetry comes from the data through frame averaging (:mod:`potentials.frames`):
``potentials.build("faenet", ...)`` wraps it in stochastic frame averaging by default (one random
frame per structure per training step; the exact 8-frame E(3) average at evaluation), and any
other ``frame_averaging=`` mode can be chosen.

Blocks, as in the paper (section 4; names of Table 7) and its reference package:

* embedding: ``h_i = MLP([emb(Z_i), emb_period, emb_group, phys(Z_i)])``, the physical properties
  (:func:`physical_properties`) a fixed, stored table;
* edge embedding (Eq. 7): ``e_ij = MLP([W_r r_ij, W_d rbf(|r_ij|)])``, ``num_filters`` wide;
* interaction (Eq. 8): filter ``W_ij = act(Lin([e_ij, h_i, h_j])) * envelope(d_ij)`` learned from
  the edge and both endpoints, message ``sum_j act(Lin_down h_j) * W_ij``, then GraphNorm, up-scale,
  and a skip connection ``h <- h + block(h)``;
* jumping connections: the embeddings after every block are concatenated and mixed;
* energy head (learned weighted average): ``e_i = alpha(h_i) * MLP(h_i)``, summed per system
  (unnormalised weights, as the reference code, so that energies stay extensive);
* direct force head (``force_head``): ``"mlp"``, the paper's ``F_i = MLP(h_i)`` ``(n_atoms, 3)``
  in the frame, rotated back by the wrapper; or ``"pair"``, ``F_i = sum_j a(h_i, h_j, d_ij) r̂_ij``
  (:class:`potentials.nn.PairForceHead`), equivariant by itself. On the EMT data the MLP head did
  not learn at all in 800 steps (val 455 -> 455 meV/Å, the zero predictor, while the conservative
  forces of the same model went 456 -> 308), so the shipped model uses ``"pair"``.

The envelope on the filter (not in the paper, whose graph is cut hard) makes energies and forces go
smoothly to zero at the cutoff. GraphNorm normalises over each system's atoms, so per-atom
energies depend on the whole system (as frame averaging does too): isolated fragments inside one
system are not exactly additive.
"""
import dataclasses
import functools
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor

from eqcalc import keys
from eqcalc.errors import InvalidOptionError, check_choice
from potentials.nn import (GaussianBasis, NoForceHead, PairForceHead, PolynomialCutoff, Potential,
                           ScaleShift, atomic_numbers, edge_geometry, mlp, scatter_sum, validate_config)
from potentials.registry import register


@dataclasses.dataclass(frozen=True)
class FAENetConfig:
    """FAENet hyperparameters, named after the paper's Table 7 (its OC20-S2EF column in brackets;
    the defaults here are small so that the physics tests stay fast). ``cutoff`` in Å.

    ``hidden_channels`` [256] atom embedding width; ``num_filters`` [480] edge/filter width;
    ``num_gaussians`` [136] radial basis size; ``num_interactions`` [7] interaction blocks;
    ``pg_hidden_channels`` [64] period & group embedding channels; ``force_head_hidden_channels``
    [256] hidden width of the ``"mlp"`` direct force head (built when ``direct_forces``);
    ``force_head`` ``"mlp"`` (the paper's) or ``"pair"`` (see the module docstring). ``norm``
    ``"graph"`` (the paper's GraphNorm after each message passing) or ``"none"`` (default: on the EMT
    data GraphNorm stopped the forces from learning -- val force MAE 334 -> 338 meV/Å in 300 steps,
    vs 334 -> 292 without -- and it makes per-atom energies depend on the whole system).
    """
    species: Tuple[str, ...]
    cutoff: float = 5.0
    hidden_channels: int = 32
    num_filters: int = 32
    num_gaussians: int = 16
    num_interactions: int = 2
    pg_hidden_channels: int = 8
    force_head_hidden_channels: int = 32
    norm: str = "none"
    direct_forces: bool = False
    force_head: str = "mlp"

    def __post_init__(self):
        validate_config(self)
        check_choice("norm", self.norm, NORMS)
        check_choice("force_head", self.force_head, FORCE_HEADS)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type is int or f.type == "int":
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise InvalidOptionError(f"{f.name}={value!r} must be a positive integer")


NORMS = ("graph", "none")
FORCE_HEADS = ("mlp", "pair")


# ---- element data ---------------------------------------------------------------------------------
_PERIOD_ENDS = (2, 10, 18, 36, 54, 86, 118)


def period_and_group(z: int) -> Tuple[int, int]:
    """Period (1-7) and IUPAC group (1-18; 0 for lanthanides and actinides) of atomic number ``z``."""
    period = next(k + 1 for k, end in enumerate(_PERIOD_ENDS) if z <= end)
    start = ([0] + list(_PERIOD_ENDS))[period - 1]
    pos = z - start  # 1-based position in the period
    if period == 1:
        return period, 1 if pos == 1 else 18
    if period <= 3:
        return period, pos if pos <= 2 else pos + 10
    if period <= 5:
        return period, pos
    if pos <= 2:
        return period, pos
    if pos <= 16:  # La..Yb / Ac..No (the f block)
        return period, 0
    return period, pos - 14


#: The fixed physical properties (paper appendix B.1, from pymatgen's element data), with the
#: scale each is divided by.
PROPERTIES = (("X", 4.0), ("atomic_radius", 2.0), ("van_der_waals_radius", 2.5),
              ("metallic_radius", 2.0), ("molar_volume", 20.0), ("electron_affinity", 3.0),
              ("ionization_energy_1", 15.0), ("ionization_energy_2", 30.0),
              ("covalent_radius", 2.0), ("mass", 200.0))


@functools.lru_cache(maxsize=None)
def physical_properties(symbol: str) -> Tuple[float, ...]:
    """The scaled :data:`PROPERTIES` of an element; a property without data (or without pymatgen,
    which is only imported here) is 0. Models store this table with their weights, so loading a
    model never needs pymatgen."""
    import warnings

    from ase.data import atomic_masses, atomic_numbers as numbers, covalent_radii

    z = numbers[symbol]
    values = {"covalent_radius": float(covalent_radii[z]), "mass": float(atomic_masses[z])}
    try:
        from pymatgen.core.periodic_table import Element

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            e = Element(symbol)
            ionisation = list(e.ionization_energies) + [None, None]
            raw = {"X": e.X, "atomic_radius": e.atomic_radius, "van_der_waals_radius": e.van_der_waals_radius,
                   "metallic_radius": e.metallic_radius, "molar_volume": e.molar_volume,
                   "electron_affinity": e.electron_affinity, "ionization_energy_1": ionisation[0],
                   "ionization_energy_2": ionisation[1]}
        for k, v in raw.items():
            try:
                values[k] = float(v)
            except (TypeError, ValueError):
                pass
    except ImportError:
        pass
    out = []
    for name, scale in PROPERTIES:
        v = values.get(name, 0.0)
        out.append(v / scale if v == v else 0.0)  # NaN (no data) -> 0
    return tuple(out)


# ---- blocks ---------------------------------------------------------------------------------------
class GraphNorm(torch.nn.Module):
    """GraphNorm (Cai et al. 2021) over the atoms of each system:
    ``gamma * (h - alpha * mean) / sqrt(var + eps) + beta``, ``var`` of ``h - alpha * mean``."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(channels))
        self.bias = torch.nn.Parameter(torch.zeros(channels))
        self.mean_scale = torch.nn.Parameter(torch.ones(channels))
        self.eps = eps

    def forward(self, h: Tensor, system: Tensor, count: Tensor) -> Tensor:
        """``h`` ``(n_atoms, C)``, ``system`` ``(n_atoms,)``, ``count`` ``(n_systems, 1)`` atoms per system."""
        mean = scatter_sum(h, system, count.shape[0]) / count
        centred = h - self.mean_scale * mean[system]
        var = scatter_sum(centred * centred, system, count.shape[0]) / count
        return self.weight * centred / torch.sqrt(var + self.eps)[system] + self.bias


class Embedding(torch.nn.Module):
    """Atom embedding ``(n_atoms, hidden)`` from species, period, group and physical properties."""

    def __init__(self, species: Sequence[str], hidden: int, pg_hidden: int):
        super().__init__()
        z = atomic_numbers(species)
        pg = [period_and_group(x) for x in z]
        self.register_buffer("period", torch.tensor([p for p, _ in pg], dtype=torch.int64))
        self.register_buffer("group", torch.tensor([g for _, g in pg], dtype=torch.int64))
        self.register_buffer("properties", torch.tensor([physical_properties(s) for s in species]))
        self.atom = torch.nn.Embedding(len(species), hidden)
        self.period_embedding = torch.nn.Embedding(8, pg_hidden)
        self.group_embedding = torch.nn.Embedding(19, pg_hidden)
        self.mlp = mlp([hidden + 2 * pg_hidden + len(PROPERTIES), hidden, hidden])

    def forward(self, species: Tensor) -> Tensor:
        h = torch.cat([self.atom(species), self.period_embedding(self.period[species]),
                       self.group_embedding(self.group[species]), self.properties[species]], 1)
        return torch.nn.functional.silu(self.mlp(h))


class EdgeEmbedding(torch.nn.Module):
    """Paper Eq. 7: ``e_ij = act(W_2 act([W_r r_ij, W_d rbf(d_ij)]))`` ``(n_edges, num_filters)``."""

    def __init__(self, num_gaussians: int, num_filters: int):
        super().__init__()
        self.vector = torch.nn.Linear(3, num_filters // 2)
        self.distance = torch.nn.Linear(num_gaussians, num_filters - num_filters // 2)
        self.mix = torch.nn.Linear(num_filters, num_filters)

    def forward(self, vectors: Tensor, basis: Tensor) -> Tensor:
        e = torch.nn.functional.silu(torch.cat([self.vector(vectors), self.distance(basis)], 1))
        return torch.nn.functional.silu(self.mix(e))


class MLPForceHead(torch.nn.Module):
    """The paper's direct force head ``F_i = MLP(h_i)`` ``(n_atoms, 3)`` eV/Å (in the frame)."""

    def __init__(self, hidden: int, head_hidden: int):
        super().__init__()
        self.mlp = mlp([hidden, head_hidden, 3])

    def forward(self, out: Dict[str, Tensor], s: Tensor, v: Tensor, edge_features: Tensor,
                unit_vectors: Tensor, edge_index: Tensor) -> Dict[str, Tensor]:
        out[keys.FORCES] = self.mlp(s)
        return out


class NoNorm(torch.nn.Module):
    """``norm="none"``: the identity, with GraphNorm's signature."""

    def forward(self, h: Tensor, system: Tensor, count: Tensor) -> Tensor:
        return h


class Interaction(torch.nn.Module):
    """Paper Eq. 8: filter from the edge and both endpoints, message, GraphNorm, up-scale."""

    def __init__(self, hidden: int, num_filters: int, norm: str = "graph"):
        super().__init__()
        self.filter = torch.nn.Linear(num_filters + 2 * hidden, num_filters)
        self.down = torch.nn.Linear(hidden, num_filters)
        self.up = torch.nn.Linear(num_filters, hidden)
        self.norm = GraphNorm(num_filters) if norm == "graph" else NoNorm()

    def forward(self, h: Tensor, e: Tensor, envelope: Tensor, edge_index: Tensor, system: Tensor,
                count: Tensor) -> Tensor:
        """Returns the update ``(n_atoms, hidden)`` (the caller adds it: skip connection)."""
        i, j = edge_index[0], edge_index[1]
        act = torch.nn.functional.silu
        # Envelope last: every message is exactly 0 at and beyond the cutoff, with zero slope.
        w = act(self.filter(torch.cat([e, h.index_select(0, i), h.index_select(0, j)], 1))) * envelope
        m = scatter_sum(act(self.down(h)).index_select(0, j) * w, i, h.shape[0])
        return act(self.up(act(self.norm(m, system, count))))


@register("faenet")
class FAENet(torch.nn.Module):
    """FAENet energy model. ``forward(data)`` → ``{"energies": (n_atoms,) eV}`` plus ``"forces"``
    ``(n_atoms, 3)`` eV/Å when ``config.direct_forces``. Inputs per :mod:`eqcalc.keys`; it reads
    species, edge_index, edge_vectors, system and the number of systems (``cell.shape[0]``)."""

    architecture = "faenet"
    Config = FAENetConfig
    default_frame_averaging = "stochastic"
    __jit_ignored_attributes__ = ["config"]

    def __init__(self, config: FAENetConfig):
        super().__init__()
        self.config = config
        self.cutoff = float(config.cutoff)
        H, F, L = config.hidden_channels, config.num_filters, config.num_interactions
        self.register_buffer("species_z", torch.tensor(atomic_numbers(config.species), dtype=torch.int64))
        self.embedding = Embedding(config.species, H, config.pg_hidden_channels)
        self.basis = GaussianBasis(config.cutoff, config.num_gaussians)
        self.envelope = PolynomialCutoff(config.cutoff)
        self.edge_embedding = EdgeEmbedding(config.num_gaussians, F)
        self.interactions = torch.nn.ModuleList([Interaction(H, F, config.norm) for _ in range(L)])
        self.jump = torch.nn.Linear((L + 1) * H, H)          # jumping connections, concatenated
        self.energy = mlp([H, H // 2, 1])
        self.importance = torch.nn.Linear(H, 1)              # alpha_i of the weighted average
        self.scale_shift = ScaleShift(len(config.species))
        heads = {"mlp": lambda: MLPForceHead(H, config.force_head_hidden_channels),
                 "pair": lambda: PairForceHead(H, config.num_gaussians)}
        self.force_head = heads[config.force_head]() if config.direct_forces else NoForceHead()

    # Not a Potential (no species embedding or radial basis of its own): shares only these.
    config_dict = Potential.config_dict

    def forward(self, data: Dict[str, Tensor]) -> Dict[str, Tensor]:
        species, edge_index, system = data[keys.SPECIES], data[keys.EDGE_INDEX], data[keys.SYSTEM]
        vectors = data[keys.EDGE_VECTORS]
        lengths, unit_vectors = edge_geometry(vectors)
        envelope = self.envelope(lengths).unsqueeze(1)
        ones = torch.ones_like(species, dtype=vectors.dtype).unsqueeze(1)
        count = scatter_sum(ones, system, data[keys.CELL].shape[0]).clamp_min(1.0)
        h = self.embedding(species)
        basis = self.basis(lengths)
        e = self.edge_embedding(vectors, basis)
        jumps: List[Tensor] = [h]
        for interaction in self.interactions:
            h = h + interaction(h, e, envelope, edge_index, system, count)   # skip connection
            jumps.append(h)
        h = torch.nn.functional.silu(self.jump(torch.cat(jumps, 1)))
        energies = self.scale_shift((self.importance(h) * self.energy(h)).squeeze(1), species)
        out: Dict[str, Tensor] = {keys.ENERGIES: energies}
        return self.force_head(out, h, h, basis * envelope, unit_vectors, edge_index)

    extra_repr = Potential.extra_repr
