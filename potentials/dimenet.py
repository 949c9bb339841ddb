"""DimeNet++: directional message passing (Gasteiger et al., ICLR 2020; DimeNet++, NeurIPS-W 2020).

Embeddings ``m_ji`` ``(n_edges, F)`` live on directed edges ``j→i``. Each interaction updates
``m_ji`` from the messages ``m_kj`` arriving at ``j``, weighted by a 2D basis of the distance
``d_kj`` and the angle ``α_kji`` at ``j``: spherical Bessel functions ``j_l(z_ln d_kj / c)``
times zonal harmonics ``Y_l^0(α)`` (the "SBF"). DimeNet++ makes this cheap by projecting the
messages down to ``int_features`` before the triplet product and back up after it, and the SBF
to ``basis_features``. Output blocks turn edge embeddings into per-atom energies after every
interaction; their sum is the atom's energy. Distances and angles only: O(3)-invariant.

Every edge term is multiplied by an enveloped radial basis (no bias), so edges at or beyond the
cutoff contribute exactly 0 and the energy is C² there.
"""
import dataclasses
from typing import Dict, Tuple

import torch
from torch import Tensor

from eqcalc import keys
from potentials.angular import AngularPotential, Dense, EdgeForceHead, check_sizes, init_weights_, residuals
from potentials.nn import NoForceHead, scatter_sum, validate_config
from potentials.registry import register


@dataclasses.dataclass(frozen=True)
class DimeNetConfig:
    """DimeNet++ hyperparameters (paper: features 128, out_features 256, int_features 64,
    basis_features 8, num_interactions 4; smaller defaults here for CPU). ``cutoff`` in Å."""
    species: Tuple[str, ...]
    cutoff: float = 5.0
    features: int = 64
    out_features: int = 64
    int_features: int = 32
    basis_features: int = 8
    num_interactions: int = 3
    num_spherical: int = 7
    num_radial: int = 6
    num_before_skip: int = 1
    num_after_skip: int = 2
    num_output_layers: int = 2
    radial_basis: str = "bessel"
    envelope: str = "polynomial"
    direct_forces: bool = False

    def __post_init__(self):
        validate_config(self)
        check_sizes(self, may_be_zero=("num_before_skip", "num_after_skip", "num_output_layers"))


class Embedding(torch.nn.Module):
    """``m_ji = act(W [h_i, h_j, act(W_rbf e_ji)])``: the first edge embeddings."""

    def __init__(self, features: int, num_radial: int):
        super().__init__()
        self.rbf = Dense(num_radial, features)
        self.edge = Dense(3 * features, features)

    def forward(self, h: Tensor, rbf: Tensor, edge_index: Tensor) -> Tensor:
        h_i, h_j = h.index_select(0, edge_index[0]), h.index_select(0, edge_index[1])
        return self.edge(torch.cat([h_i, h_j, self.rbf(rbf)], dim=1))


class Interaction(torch.nn.Module):
    """DimeNet++ interaction: ``m_ji += ...(act(W_ji m_ji) + up(sum_k down(act(W_kj m_kj) ⊙
    W_rbf e_kj)[kj] ⊙ W_sbf a_kji))``, with residual layers before and after the skip."""

    def __init__(self, c: DimeNetConfig):
        super().__init__()
        F, I, B = c.features, c.int_features, c.basis_features
        self.ji = Dense(F, F)
        self.kj = Dense(F, F)
        self.rbf = torch.nn.Sequential(torch.nn.Linear(c.num_radial, B, bias=False), torch.nn.Linear(B, F, bias=False))
        self.sbf = torch.nn.Sequential(torch.nn.Linear(c.num_spherical * c.num_radial, B, bias=False),
                                       torch.nn.Linear(B, I, bias=False))
        self.down = Dense(F, I, bias=False)
        self.up = Dense(I, F, bias=False)
        self.before_skip = residuals(F, c.num_before_skip)
        self.skip = Dense(F, F)
        self.after_skip = residuals(F, c.num_after_skip)

    def forward(self, m: Tensor, rbf: Tensor, sbf: Tensor, kj: Tensor, ji: Tensor) -> Tensor:
        x_kj = self.down(self.kj(m) * self.rbf(rbf))                         # (n_edges, I)
        triplet = x_kj.index_select(0, kj) * self.sbf(sbf)                   # (n_triplets, I)
        x = self.ji(m) + self.up(scatter_sum(triplet, ji, m.shape[0]))
        return self.after_skip(m + self.skip(self.before_skip(x)))


class Output(torch.nn.Module):
    """Per-atom output ``E_i = w · MLP(W_up sum_j (W_rbf e_ji) ⊙ m_ji)`` ``(n_atoms,)``."""

    def __init__(self, c: DimeNetConfig):
        super().__init__()
        self.rbf = torch.nn.Linear(c.num_radial, c.features, bias=False)
        self.up = torch.nn.Linear(c.features, c.out_features, bias=False)
        self.mlp = torch.nn.Sequential(*[Dense(c.out_features, c.out_features) for _ in range(c.num_output_layers)])
        self.out = torch.nn.Linear(c.out_features, 1, bias=False)

    def forward(self, m: Tensor, rbf: Tensor, centre: Tensor, n_atoms: int) -> Tensor:
        x = scatter_sum(self.rbf(rbf) * m, centre, n_atoms)
        return self.out(self.mlp(self.up(x))).squeeze(1)


@register("dimenet")
class DimeNetPP(AngularPotential):
    """DimeNet++ energy model. ``forward(data)`` → ``{"energies": (n_atoms,) eV}`` plus
    ``"forces": (n_atoms, 3) eV/Å`` when ``config.direct_forces``. Inputs per :mod:`eqcalc.keys`
    (``shifts`` tell periodic images apart when forming triplets)."""

    architecture = "dimenet"
    Config = DimeNetConfig

    def __init__(self, config: DimeNetConfig):
        super().__init__(config)
        self.triplet_features = config.int_features
        self.embed_edges = Embedding(config.features, config.num_radial)
        self.interactions = torch.nn.ModuleList([Interaction(config) for _ in range(config.num_interactions)])
        self.first_output = Output(config)   # on the embeddings, before any interaction
        self.outputs = torch.nn.ModuleList([Output(config) for _ in range(config.num_interactions)])
        self.force_head = EdgeForceHead(config.features, config.num_radial) if config.direct_forces else NoForceHead()
        init_weights_(self)

    def forward(self, data: Dict[str, Tensor]) -> Dict[str, Tensor]:
        species, edge_index = data[keys.SPECIES], data[keys.EDGE_INDEX]
        n_atoms = species.shape[0]
        g = self.geometry(data)
        rbf, kj, ji = g.rbf, g.kj, g.ji
        # The SBF a_kji: spherical Bessel functions of d_kj times Y_l^0 of the angle at j.
        sbf = (g.radial.index_select(0, kj) * g.angular.unsqueeze(2)).flatten(1)
        m = self.embed_edges(self.embedding(species), rbf, edge_index)
        energies = self.first_output(m, rbf, edge_index[0], n_atoms)
        for interaction, output in zip(self.interactions, self.outputs):
            m = interaction(m, rbf, sbf, kj, ji)
            energies = energies + output(m, rbf, edge_index[0], n_atoms)
        out: Dict[str, Tensor] = {keys.ENERGIES: self.scale_shift(energies, species)}
        return self.force_head(out, m, m, rbf, g.unit_vectors, edge_index)
