"""NequIP: E(3)-equivariant interatomic potentials (Batzner et al., Nat. Commun. 2022).

Features ``h`` ``(n_atoms, (hidden_l+1)^2, channels)`` (natural parity, degrees 0..hidden_l)
are refined by convolutions: a self-interaction (linear per degree), the tensor product of
neighbor features with the spherical harmonics of the edge direction, weighted per path and
channel by a radial MLP of a Bessel basis times a smooth polynomial cutoff, summed over
neighbors, mixed linearly, plus a per-species self-connection; then a gated nonlinearity
(SiLU on scalars, sigmoid gates on l > 0) and a residual update where the shapes agree. Two
linear layers read out per-atom energies from the scalars.
"""
import dataclasses
import math
from typing import Dict, List

import torch
from torch import Tensor

from eqcalc import keys
from eqcalc.errors import InvalidOptionError
from potentials import o3
from potentials.mace import ScalarReadout, TensorProductConfig, TensorProductPotential, radial_mlp
from potentials.registry import register


@dataclasses.dataclass(frozen=True)
class NequIPConfig(TensorProductConfig):
    """NequIP hyperparameters (:class:`~potentials.mace.TensorProductConfig`); ``radial_mlp`` is
    the width of the radial network's two hidden layers, three layers by default (NequIP's)."""
    num_interactions: int = 3

    def __post_init__(self):
        super().__post_init__()
        if self.direct_forces and self.hidden_l < 1:
            raise InvalidOptionError("direct_forces needs vector features: set hidden_l >= 1")


class Convolution(torch.nn.Module):
    """One NequIP interaction: ``h (n, (l_in+1)^2, c)`` → ``(n, (l_out+1)^2, c)``."""

    def __init__(self, config: NequIPConfig, l_in: int, l_out: int):
        super().__init__()
        c, n_species = config.channels, len(config.species)
        self.linear_in = o3.Linear(l_in, c, c)
        self.tp = o3.EdgeTensorProduct(l_in, config.max_ell, l_out)
        self.n_paths, self.channels = len(self.tp.paths), c
        w = config.radial_mlp
        self.radial = radial_mlp([config.num_radial, w, w, self.n_paths * c])
        # Scalars carry the features and one gate per channel for every degree l > 0.
        widths = [c * (1 + l_out)] + [c] * l_out
        self.linear_out = o3.PathLinear(self.tp, c, widths)
        self.self_connection = o3.SpeciesLinear(l_in, n_species, c, widths)
        self.gate = o3.Gate(l_out, c)
        self.norm = 1.0 / math.sqrt(config.avg_num_neighbors)
        self.residual = l_in == l_out

    def forward(self, h: Tensor, species: Tensor, Y: List[Tensor], edge_features: Tensor,
                edge_index: Tensor) -> Tensor:
        R = self.radial(edge_features).view(edge_features.shape[0], self.n_paths, self.channels)
        messages = self.tp(self.linear_in(h), Y, R, edge_index)
        mixed = [m * self.norm for m in self.linear_out(messages)]
        skip = self.self_connection(h, species)
        update = self.gate(o3.add_blocks(mixed, skip))
        return h + update if self.residual else update


@register("nequip")
class NequIP(TensorProductPotential):
    """NequIP energy model. ``forward(data)`` → ``{"energies": (n_atoms,) eV}`` plus
    ``"forces": (n_atoms, 3) eV/Å`` when ``config.direct_forces``. Inputs per :mod:`eqcalc.keys`."""

    architecture = "nequip"
    Config = NequIPConfig

    def __init__(self, config: NequIPConfig):
        super().__init__(config)
        L, c = config.num_interactions, config.channels
        l_in = [0] + [config.hidden_l] * (L - 1)
        self.convolutions = torch.nn.ModuleList(
            [Convolution(config, l_in[k], config.hidden_l) for k in range(L)])
        # Two linear layers (NequIP's conv_to_output_hidden, output_hidden_to_scalar).
        self.readout = torch.nn.Sequential(torch.nn.Linear(c, max(c // 2, 1)), ScalarReadout(max(c // 2, 1)))
        self.force_head = o3.Degree1ForceHead(c) if config.direct_forces else o3.NoForceHead()

    def forward(self, data: Dict[str, Tensor]) -> Dict[str, Tensor]:
        species, edge_index, Y, edge_features, h, _ = self.inputs(data)
        for convolution in self.convolutions:
            h = convolution(h, species, Y, edge_features, edge_index)
        energies = self.readout(h[:, 0])
        out: Dict[str, Tensor] = {keys.ENERGIES: self.scale_shift(energies, species)}
        return self.force_head(out, h)
