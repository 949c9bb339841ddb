"""Short-range physics from covalent radii: ZBL nuclear repulsion and distance transforms.

Both are mace-torch's forms (``pair_repulsion=True``, ``distance_transform="Agnesi"|"Soft"``),
written so that a converted model gives the same numbers. Per-species constants (atomic
number, covalent radius from :data:`ase.data.covalent_radii`) are buffers: a converted model
carries the values of its source file. Pair quantities only depend on the two species and the
length, so the edge direction convention does not matter here.
"""
from typing import Optional, Sequence

import torch
from torch import Tensor

from eqcalc.errors import check_choice
from potentials.nn import polynomial_envelope

TRANSFORMS = ("none", "agnesi", "soft")
REPULSIONS = ("none", "zbl")  # mace-torch's forms (nequip's ZBL is LammpsZBL below)


def _radii(species_z: Sequence[int]) -> Tensor:
    from ase.data import covalent_radii

    return torch.tensor([float(covalent_radii[z]) for z in species_z], dtype=torch.float64)


def _pair(values: Tensor, species: Tensor, edge_index: Tensor):
    """Per-species ``values`` of both atoms of every edge, ``((n_edges,), (n_edges,))``."""
    return values[species[edge_index[0]]], values[species[edge_index[1]]]


class NoTransform(torch.nn.Module):
    """The radial basis sees the plain length ``(n_edges,)`` Å."""

    def forward(self, lengths: Tensor, species: Tensor, edge_index: Tensor) -> Tensor:
        return lengths


class AgnesiTransform(torch.nn.Module):
    """Agnesi distance transform (ACEpotentials.jl; mace-torch's ``AgnesiTransform``):
    ``1 / (1 + a y^q / (1 + y^(q-p)))`` with ``y = d / r0``, ``r0`` the mean covalent radius
    of the pair. Lengths ``(n_edges,)`` Å → transformed ``(n_edges,)`` (dimensionless)."""

    def __init__(self, species_z: Sequence[int], q: float = 0.9183, p: float = 4.5791, a: float = 1.0805):
        super().__init__()
        self.register_buffer("q", torch.tensor(q, dtype=torch.float64))
        self.register_buffer("p", torch.tensor(p, dtype=torch.float64))
        self.register_buffer("a", torch.tensor(a, dtype=torch.float64))
        self.register_buffer("radii", _radii(species_z))

    def forward(self, lengths: Tensor, species: Tensor, edge_index: Tensor) -> Tensor:
        ri, rj = _pair(self.radii, species, edge_index)
        y = lengths / (0.5 * (ri + rj))
        return 1.0 / (1.0 + self.a * torch.pow(y, self.q) / (1.0 + torch.pow(y, self.q - self.p)))


class SoftTransform(torch.nn.Module):
    """mace-torch's ``SoftTransform``: ``p0 + (d - p0) (1 + tanh(alpha' (d - m))) / 2`` with
    ``r0`` the sum of covalent radii, ``p0 = 3 r0 / 4``, ``p1 = 4 r0 / 3``, ``m = (p0 + p1) / 2``,
    ``alpha' = alpha / (p1 - p0)``: about ``p0`` at short range, ``d`` beyond ``r0``. Å → Å."""

    def __init__(self, species_z: Sequence[int], alpha: float = 4.0):
        super().__init__()
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float64))
        self.register_buffer("radii", _radii(species_z))

    def forward(self, lengths: Tensor, species: Tensor, edge_index: Tensor) -> Tensor:
        ri, rj = _pair(self.radii, species, edge_index)
        r0 = ri + rj
        p0, p1 = 0.75 * r0, (4.0 / 3.0) * r0
        m = 0.5 * (p0 + p1)
        alpha = self.alpha / (p1 - p0)
        s = 0.5 * (1.0 + torch.tanh(alpha * (lengths - m)))
        return p0 + (lengths - p0) * s


class PairCutoffs(torch.nn.Module):
    """Per species-pair cutoffs (nequip's ``per_edge_type_cutoff``): edge lengths ``(n_edges,)``
    Å rescaled by ``r_max / cutoffs[species of centre, species of neighbour]``, so that a radial
    basis and envelope built for ``r_max`` vanish at each pair's own cutoff."""

    def __init__(self, cutoffs: Sequence[Sequence[float]], r_max: float):
        super().__init__()
        c = torch.tensor(cutoffs, dtype=torch.float64)
        self.n_species = c.shape[0]
        self.register_buffer("scale", (r_max / c).reshape(-1), persistent=False)

    def forward(self, lengths: Tensor, species: Tensor, edge_index: Tensor) -> Tensor:
        pair = species.index_select(0, edge_index[0]) * self.n_species + species.index_select(0, edge_index[1])
        return lengths * self.scale.to(lengths.dtype).index_select(0, pair)


def make_transform(name: str, species_z: Sequence[int]) -> torch.nn.Module:
    check_choice("distance_transform", name, TRANSFORMS)
    return {"none": NoTransform, "agnesi": AgnesiTransform, "soft": SoftTransform}[name](
        *([] if name == "none" else [species_z]))


class NoRepulsion(torch.nn.Module):
    """No pair term: zero per-atom energies ``(n_atoms,)``."""

    def forward(self, lengths: Tensor, species: Tensor, edge_index: Tensor) -> Tensor:
        return torch.zeros(species.shape[0], dtype=lengths.dtype, device=lengths.device)


class ZBL(torch.nn.Module):
    """Ziegler-Biersack-Littmark screened nuclear repulsion (mace-torch's ``ZBLBasis``), per atom:

    ``E_i = 1/2 sum_j 14.3996 Z_i Z_j / d phi(d / a) f_p(d / (R_i + R_j))`` eV, with
    ``phi(x) = sum_k c_k exp(-b_k x)``, ``a = 0.529 a_pre / (Z_i^a_exp + Z_j^a_exp)`` Å, ``R`` the
    covalent radii and ``f_p`` the polynomial envelope of order ``p``. 14.3996 eV Å = e²/(4 pi eps0).
    ``forward(lengths (n_edges,) Å, species (n_atoms,), edge_index (2, n_edges))`` → ``(n_atoms,)``.
    """

    def __init__(self, species_z: Sequence[int], p: int = 6):
        super().__init__()
        self.p = float(p)
        self.register_buffer("z", torch.tensor([float(z) for z in species_z], dtype=torch.float64))
        self.register_buffer("radii", _radii(species_z))
        self.register_buffer("c", torch.tensor([0.1818, 0.5099, 0.2802, 0.02817], dtype=torch.float64))
        self.register_buffer("a_exp", torch.tensor(0.300, dtype=torch.float64))
        self.register_buffer("a_prefactor", torch.tensor(0.4543, dtype=torch.float64))

    def forward(self, lengths: Tensor, species: Tensor, edge_index: Tensor) -> Tensor:
        zi, zj = _pair(self.z, species, edge_index)
        ri, rj = _pair(self.radii, species, edge_index)
        a = self.a_prefactor * 0.529 / (torch.pow(zi, self.a_exp) + torch.pow(zj, self.a_exp))
        x = lengths / a
        c = self.c
        phi = c[0] * torch.exp(-3.2 * x) + c[1] * torch.exp(-0.9423 * x) \
            + c[2] * torch.exp(-0.4028 * x) + c[3] * torch.exp(-0.2016 * x)
        pair = (14.3996 * zi * zj) / lengths * phi
        pair = 0.5 * pair * polynomial_envelope(lengths / (ri + rj), self.p)
        return torch.zeros(species.shape[0], dtype=pair.dtype, device=pair.device).index_add(0, edge_index[0], pair)


class LammpsZBL(torch.nn.Module):
    """ZBL with LAMMPS' constants (``pair_zbl``; nequip's ``ZBL`` pair potential), per atom:

    ``E_i = 1/2 sum_j q Z_i Z_j / d phi(d (Z_i^0.23 + Z_j^0.23) / 0.4685) f_p(d / r_ij)`` eV,
    ``q = 14.399645`` eV Å (LAMMPS metal units' e²/(4 pi eps0)), ``phi(x) = sum_k c_k exp(d_k x)``,
    ``f_p`` the polynomial envelope of order ``p`` of the model's own cutoff ``r_ij`` (not covalent
    radii): ``cutoff``, or each pair's own when ``envelope_lengths`` is the model's
    :class:`PairCutoffs` (the lengths its radial features see), as nequip's envelope sees its
    per-edge-type normalised length.
    ``forward(lengths (n_edges,) Å, species (n_atoms,), edge_index (2, n_edges))`` → ``(n_atoms,)``.
    """

    def __init__(self, species_z: Sequence[int], cutoff: float, p: int = 6,
                 envelope_lengths: Optional[torch.nn.Module] = None):
        super().__init__()
        self.p, self.cutoff = float(p), float(cutoff)
        self.register_buffer("z", torch.tensor([float(z) for z in species_z], dtype=torch.float64))
        self.qqr2e = 14.399645
        self.envelope_lengths = envelope_lengths if envelope_lengths is not None else NoTransform()

    def forward(self, lengths: Tensor, species: Tensor, edge_index: Tensor) -> Tensor:
        zi, zj = _pair(self.z, species, edge_index)
        x = (torch.pow(zi, 0.23) + torch.pow(zj, 0.23)) * lengths / 0.46850
        phi = 0.02817 * torch.exp(-0.20162 * x) + 0.28022 * torch.exp(-0.40290 * x) \
            + 0.50986 * torch.exp(-0.94229 * x) + 0.18175 * torch.exp(-3.19980 * x)
        pair = (self.qqr2e * 0.5) * (zi * zj / lengths) * phi
        envelope = polynomial_envelope(self.envelope_lengths(lengths, species, edge_index) / self.cutoff, self.p)
        return torch.zeros(species.shape[0], dtype=pair.dtype, device=pair.device).index_add(0, edge_index[0],
                                                                                            pair * envelope)


def make_repulsion(name: str, species_z: Sequence[int], p: int) -> torch.nn.Module:
    check_choice("pair_repulsion", name, REPULSIONS)
    return ZBL(species_z, p) if name == "zbl" else NoRepulsion()

