"""SchNet: continuous-filter convolutional network (Schütt et al., NeurIPS 2017; JCP 2018).

Atom embeddings ``h`` ``(n_atoms, F)`` are refined by interaction blocks whose continuous-filter
convolutions weight neighbor features by a filter network of the pair distance. Only distances
enter, so the per-atom energy is invariant under rotations, reflections and translations.
"""
import dataclasses
from typing import Dict, Tuple

import torch
from torch import Tensor

from eqcalc import keys
from potentials.nn import (NoForceHead, PairForceHead, Potential, edge_geometry, mlp, scatter_sum,
                           validate_config, xavier_init_)
from potentials.registry import register


@dataclasses.dataclass(frozen=True)
class SchNetConfig:
    """SchNet hyperparameters. ``cutoff`` in Å."""
    species: Tuple[str, ...]
    cutoff: float = 5.0
    features: int = 64
    num_interactions: int = 3
    num_radial: int = 25
    radial_basis: str = "gaussian"
    envelope: str = "cosine"
    direct_forces: bool = False

    def __post_init__(self):
        validate_config(self)


class Interaction(torch.nn.Module):
    """SchNet interaction block: ``h_i += f2out(sum_j in2f(h)_j * W_ij)``, residual."""

    def __init__(self, features: int, num_radial: int):
        super().__init__()
        self.in2f = torch.nn.Linear(features, features, bias=False)
        self.filter = mlp([num_radial, features, features], activation="ssp")
        self.f2out = mlp([features, features, features], activation="ssp")

    def forward(self, h: Tensor, basis: Tensor, envelope: Tensor, edge_index: Tensor) -> Tensor:
        """``basis`` ``(n_edges, R)``, ``envelope`` ``(n_edges, 1)``; returns new ``h`` ``(n_atoms, F)``."""
        filters = self.filter(basis) * envelope    # envelope last: zero beyond the cutoff
        messages = self.in2f(h).index_select(0, edge_index[1]) * filters
        return h + self.f2out(scatter_sum(messages, edge_index[0], h.shape[0]))


@register("schnet")
class SchNet(Potential):
    """SchNet energy model. ``forward(data)`` → ``{"energies": (n_atoms,) eV}`` plus
    ``"forces": (n_atoms, 3) eV/Å`` when ``config.direct_forces``. Inputs per :mod:`eqcalc.keys`."""

    architecture = "schnet"
    Config = SchNetConfig

    def __init__(self, config: SchNetConfig):
        super().__init__(config)
        F, L = config.features, config.num_interactions
        self.interactions = torch.nn.ModuleList([Interaction(F, config.num_radial) for _ in range(L)])
        self.readout = mlp([F, F // 2, 1], activation="ssp")
        self.force_head = PairForceHead(F, config.num_radial) if config.direct_forces else NoForceHead()
        # PyTorch's default Linear init leaves an untrained SchNet almost flat (forces ~3 meV/Å);
        # Glorot weights give derivatives of useful size.
        xavier_init_(self)

    def forward(self, data: Dict[str, Tensor]) -> Dict[str, Tensor]:
        species, edge_index = data[keys.SPECIES], data[keys.EDGE_INDEX]
        lengths, unit_vectors = edge_geometry(data[keys.EDGE_VECTORS])
        basis, envelope = self.radial(lengths)
        envelope = envelope.unsqueeze(1)
        h = self.embedding(species)
        for interaction in self.interactions:
            h = interaction(h, basis, envelope, edge_index)
        energies = self.scale_shift(self.readout(h).squeeze(1), species)
        out: Dict[str, Tensor] = {keys.ENERGIES: energies}
        # SchNet has no vector features: h stands in for them and the head ignores it.
        return self.force_head(out, h, h, basis * envelope, unit_vectors, edge_index)
