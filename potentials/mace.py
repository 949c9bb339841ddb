"""MACE: higher-order equivariant message passing (Batatia et al., NeurIPS 2022).

Each layer builds an *atomic basis* from the neighbors,
``A_i = W sum_j R_ij ⊗ Y(r̂_ij) ⊗ (W_up h_j) / avg_num_neighbors`` (a channel-wise tensor
product, one radial weight per path and channel, :class:`~potentials.o3.EdgeTensorProduct`), then
a *product basis* by the symmetric contraction of ``A_i`` with itself up to ``correlation``
factors (:class:`~potentials.o3.SymmetricContraction`, evaluated per atom), mixes it linearly and
adds a per-species self-connection of the old features. A readout per layer (linear for the
first layers, an MLP for the last) gives per-atom energies, summed over layers.

Layout: features ``(n_atoms, (L+1)^2, channels)`` with degrees ``0..hidden_l`` (natural parity:
``hidden_l = 1`` is mace-torch's ``32x0e + 32x1o``); the last layer keeps scalars only, as
mace-torch. The model is O(3)-invariant by construction (see :mod:`potentials.o3`).
"""
import dataclasses
import math
from typing import Dict, List, Tuple

import torch
from torch import Tensor

from eqcalc import keys
from eqcalc.errors import InvalidOptionError
from potentials import o3
from potentials.nn import Potential, edge_geometry, validate_config
from potentials.registry import register


def check_int(config, name: str, low: int, high: int = 1 << 30) -> None:
    value = getattr(config, name)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidOptionError(f"{name}={value!r} must be an integer in {low}..{high}")


def radial_mlp(sizes) -> torch.nn.Sequential:
    """e3nn-style radial network without biases: an input of zero (an edge at or beyond the
    cutoff, where the enveloped basis vanishes) gives exactly zero weights. Initialised like
    e3nn's FullyConnectedNet (unit-variance signals: weights N(0, 1/fan_in), the normalised
    SiLU's gain 1.679 folded into the next layer's weights) so that the angular terms of an
    untrained model are of order one."""
    layers = []
    for k in range(len(sizes) - 1):
        linear = torch.nn.Linear(sizes[k], sizes[k + 1], bias=False)
        gain = 1.0 if k == 0 else 1.679
        torch.nn.init.normal_(linear.weight, std=gain / math.sqrt(sizes[k]))
        layers.append(linear)
        if k < len(sizes) - 2:
            layers.append(torch.nn.SiLU())
    return torch.nn.Sequential(*layers)


class ScalarReadout(torch.nn.Module):
    """``(n, c)`` → ``(n,)``: ``x @ w + b`` written as a multiply and a sum, not a matmul with
    one output column. AOTInductor (torch 2.13, CPU, c >= 16) miscompiled the backward of such
    a matmul, fused into the layers around it, into a heap overflow."""

    def __init__(self, c: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(c).uniform_(-1.0 / math.sqrt(c), 1.0 / math.sqrt(c)))
        self.bias = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        return (x * self.weight).sum(-1) + self.bias


class MLPReadout(torch.nn.Module):
    """``(n, c)`` → ``(n,)``: Linear → SiLU → :class:`ScalarReadout` (mace-torch's last readout)."""

    def __init__(self, c: int, hidden: int):
        super().__init__()
        self.hidden = torch.nn.Linear(c, hidden)
        self.out = ScalarReadout(hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.nn.functional.silu(self.hidden(x)))


@dataclasses.dataclass(frozen=True)
class TensorProductConfig:
    """Hyperparameters shared by NequIP and MACE. ``cutoff`` in Å; ``channels`` per degree;
    ``max_ell`` the highest degree of the edge harmonics; ``hidden_l`` the highest degree of the
    hidden features (1: ``channels x 0e + channels x 1o``); ``num_radial`` Bessel functions;
    ``radial_mlp`` the width of the radial network's hidden layers; ``avg_num_neighbors`` divides
    the neighbor sums."""
    species: Tuple[str, ...]
    cutoff: float = 5.0
    channels: int = 8
    max_ell: int = 2
    hidden_l: int = 1
    num_interactions: int = 2
    num_radial: int = 8
    radial_basis: str = "bessel"
    envelope: str = "polynomial"
    radial_mlp: int = 64
    avg_num_neighbors: float = 20.0
    direct_forces: bool = False

    @property
    def features(self) -> int:  # the Potential base class embeds species into `features`
        return self.channels

    def __post_init__(self):
        validate_config(self)
        check_int(self, "channels", 1)
        check_int(self, "max_ell", 1, o3.LMAX)
        check_int(self, "hidden_l", 0, self.max_ell)
        check_int(self, "num_interactions", 1)
        check_int(self, "num_radial", 1)
        check_int(self, "radial_mlp", 1)
        if not (isinstance(self.avg_num_neighbors, (int, float)) and self.avg_num_neighbors > 0):
            raise InvalidOptionError(f"avg_num_neighbors={self.avg_num_neighbors!r} must be a positive number")
        object.__setattr__(self, "avg_num_neighbors", float(self.avg_num_neighbors))


@dataclasses.dataclass(frozen=True)
class MACEConfig(TensorProductConfig):
    """MACE hyperparameters (:class:`TensorProductConfig` plus ``correlation``, the body order of
    the symmetric contraction, 1..3); ``radial_mlp`` is the width of three hidden layers
    (mace-torch ``[64, 64, 64]``)."""
    correlation: int = 3

    def __post_init__(self):
        super().__post_init__()
        check_int(self, "correlation", 1, 3)


class MACELayer(torch.nn.Module):
    """Interaction (atomic basis A), product basis (symmetric contraction), self-connection and
    readout. ``forward(h (n, (l_in+1)^2, c), species, Y, edge_features, edge_index)`` →
    ``(h (n, (l_out+1)^2, c), energies (n,), A (n, (max_ell+1)^2, c))``."""

    def __init__(self, config: MACEConfig, l_in: int, l_out: int, last: bool):
        super().__init__()
        c, n_species, l_sh = config.channels, len(config.species), config.max_ell
        self.linear_up = o3.Linear(l_in, c, c)
        self.tp = o3.EdgeTensorProduct(l_in, l_sh, l_sh)
        self.n_paths, self.channels = len(self.tp.paths), c
        w = config.radial_mlp
        self.radial = radial_mlp([config.num_radial, w, w, w, self.n_paths * c])
        self.linear = o3.PathLinear(self.tp, c, [c] * (l_sh + 1))
        self.inv_avg = 1.0 / config.avg_num_neighbors
        self.skip = o3.SpeciesLinear(l_in, n_species, c, [c] * (l_out + 1))
        self.product = o3.SymmetricContraction(l_sh, l_out, config.correlation, n_species, c)
        self.linear_out = o3.Linear(l_out, c, c)
        self.readout = MLPReadout(c, 16) if last else ScalarReadout(c)

    def forward(self, h: Tensor, species: Tensor, Y: List[Tensor], edge_features: Tensor,
                edge_index: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        R = self.radial(edge_features).view(edge_features.shape[0], self.n_paths, self.channels)
        messages = self.tp(self.linear_up(h), Y, R, edge_index)
        A = torch.cat(self.linear(messages), dim=1) * self.inv_avg
        blocks = o3.add_blocks(self.linear_out.blocks(self.product(A, species)), self.skip(h, species))
        energies = self.readout(blocks[0].squeeze(1))
        return torch.cat(blocks, dim=1), energies, A


class TensorProductPotential(Potential):
    """Common part of NequIP and MACE: the edge harmonics and the enveloped radial features every
    layer reads, and the scalar species embedding the first layer starts from."""

    def __init__(self, config: TensorProductConfig):
        super().__init__(config)
        self.sh = o3.SphericalHarmonics(config.max_ell)

    def inputs(self, data: Dict[str, Tensor]) -> Tuple[Tensor, Tensor, List[Tensor], Tensor, Tensor]:
        """``(species, edge_index, Y, edge_features (n_edges, R), h (n_atoms, 1, channels))``."""
        species, edge_index = data[keys.SPECIES], data[keys.EDGE_INDEX]
        lengths, unit_vectors = edge_geometry(data[keys.EDGE_VECTORS])
        basis, envelope = self.radial(lengths)
        edge_features = basis * envelope.unsqueeze(1)  # exactly 0 at and beyond the cutoff
        h = self.embedding(species).unsqueeze(1)       # (n_atoms, 1, channels): scalars
        return species, edge_index, self.sh(unit_vectors), edge_features, h


@register("mace")
class MACE(TensorProductPotential):
    """MACE energy model. ``forward(data)`` → ``{"energies": (n_atoms,) eV}`` plus
    ``"forces": (n_atoms, 3) eV/Å`` when ``config.direct_forces``. Inputs per :mod:`eqcalc.keys`."""

    architecture = "mace"
    Config = MACEConfig

    def __init__(self, config: MACEConfig):
        super().__init__(config)
        L = config.num_interactions
        # Degrees in: scalars (embedding) for the first layer; out: scalars for the last.
        l_in = [0] + [config.hidden_l] * (L - 1)
        l_out = [config.hidden_l] * (L - 1) + [0]
        self.layers = torch.nn.ModuleList(
            [MACELayer(config, l_in[k], l_out[k], k == L - 1) for k in range(L)])
        self.force_head = o3.Degree1ForceHead(config.channels) if config.direct_forces else o3.NoForceHead()

    def forward(self, data: Dict[str, Tensor]) -> Dict[str, Tensor]:
        species, edge_index, Y, edge_features, h = self.inputs(data)
        energies = torch.zeros_like(h[:, 0, 0])
        A = h
        for layer in self.layers:
            h, e, A = layer(h, species, Y, edge_features, edge_index)
            energies = energies + e
        out: Dict[str, Tensor] = {keys.ENERGIES: self.scale_shift(energies, species)}
        return self.force_head(out, A)
