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

The variants of mace-torch's foundation models are options of this one implementation (see
:class:`MACEConfig`): a plain (non-residual) first interaction, density-normalised neighbor sums,
Agnesi/Soft distance transforms, ZBL repulsion, the envelope order, radial depth and readout
width. With them, :mod:`potentials.convert.mace` reproduces mace-torch files exactly.
"""
import dataclasses
import math
from typing import Any, ClassVar, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from eqcalc import keys
from eqcalc.errors import InvalidOptionError, check_choice
from eqcalc.neighbors import edge_pairs
from potentials import fused, o3, short_range
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
    the neighbor sums; ``envelope_p`` the order of the polynomial envelope."""
    species: Tuple[str, ...]
    cutoff: float = 5.0
    channels: int = 8
    max_ell: int = 2
    hidden_l: int = 1
    num_interactions: int = 2
    num_radial: int = 8
    radial_basis: str = "bessel"
    envelope: str = "polynomial"
    envelope_p: int = 6
    radial_mlp: int = 64
    avg_num_neighbors: float = 20.0
    direct_forces: bool = False

    #: Values of fields that model files written before the field existed had implicitly.
    FILE_DEFAULTS: ClassVar[Dict[str, Any]] = {"envelope_p": 6}

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
        check_int(self, "envelope_p", 1)
        if not (isinstance(self.avg_num_neighbors, (int, float)) and self.avg_num_neighbors > 0):
            raise InvalidOptionError(f"avg_num_neighbors={self.avg_num_neighbors!r} must be a positive number")
        object.__setattr__(self, "avg_num_neighbors", float(self.avg_num_neighbors))


@dataclasses.dataclass(frozen=True)
class MACEConfig(TensorProductConfig):
    """MACE hyperparameters: :class:`TensorProductConfig` plus

    * ``correlation``: body order of the symmetric contraction, 1..3;
    * ``radial_mlp``/``radial_depth``: width and number of hidden layers of the radial network
      (mace-torch ``[64, 64, 64]``); ``readout_hidden``: width of the last layer's MLP readout
      (mace-torch ``MLP_irreps = 16x0e``);
    * ``first_interaction``: ``"residual"`` (the first layer has a per-species self-connection
      of the embedding, mace-torch's ``RealAgnosticResidualInteractionBlock``) or ``"plain"``
      (its atomic basis is mixed per species instead and no self-connection is added:
      ``RealAgnosticInteractionBlock``);
    * ``normalization``: neighbor sums divided by ``avg_num_neighbors`` (``"average"``) or by
      ``1 + sum_j tanh((w · R_ij)^2)``, a learned smooth neighbor count (``"density"``,
      mace-torch's ``RealAgnosticDensity*`` blocks);
    * ``distance_transform``: ``"none" | "agnesi" | "soft"``, applied to the radial basis'
      argument only (see :mod:`potentials.short_range`);
    * ``pair_repulsion``: ``"none" | "zbl"``, added to the per-atom energies before the
      scale/shift (as mace-torch's ``ScaleShiftMACE``).
    """
    correlation: int = 3
    radial_depth: int = 3
    readout_hidden: int = 16
    first_interaction: str = "residual"
    normalization: str = "average"
    distance_transform: str = "none"
    pair_repulsion: str = "none"

    FILE_DEFAULTS: ClassVar[Dict[str, Any]] = {
        **TensorProductConfig.FILE_DEFAULTS, "radial_depth": 3, "readout_hidden": 16,
        "first_interaction": "residual", "normalization": "average", "distance_transform": "none",
        "pair_repulsion": "none"}

    def __post_init__(self):
        super().__post_init__()
        check_int(self, "correlation", 1, 3)
        check_int(self, "radial_depth", 1)
        check_int(self, "readout_hidden", 1)
        check_choice("first_interaction", self.first_interaction, ("residual", "plain"))
        check_choice("normalization", self.normalization, ("average", "density"))
        check_choice("distance_transform", self.distance_transform, short_range.TRANSFORMS)
        check_choice("pair_repulsion", self.pair_repulsion, short_range.REPULSIONS)


class AverageNormalization(torch.nn.Module):
    """Neighbor sums ``(n_atoms, components, c)`` divided by a fixed ``avg_num_neighbors``."""

    def __init__(self, avg_num_neighbors: float):
        super().__init__()
        self.inv_avg = 1.0 / avg_num_neighbors

    def forward(self, A: Tensor, edge_features: Tensor, edge_index: Tensor, pair: Optional[Tensor]) -> Tensor:
        return A * self.inv_avg


class DensityNormalization(torch.nn.Module):
    """Neighbor sums divided by ``1 + sum_j tanh((w · R_ij)^2)``: a smooth, learned count of
    the neighbors, each weighted by its (enveloped) radial features ``R_ij`` ``(n_edges, R)``."""

    def __init__(self, num_radial: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(num_radial) / math.sqrt(num_radial))

    def forward(self, A: Tensor, edge_features: Tensor, edge_index: Tensor, pair: Optional[Tensor]) -> Tensor:
        per_edge = o3.per_edge(torch.tanh(torch.matmul(edge_features, self.weight) ** 2), pair)
        density = torch.zeros(A.shape[0], dtype=A.dtype, device=A.device).index_add(0, edge_index[0], per_edge)
        return A / (density + 1.0).view(-1, 1, 1)


class SpeciesMixed(torch.nn.Module):
    """The atomic basis mixed per species, ``(n_atoms, (l+1)^2, c)`` → same shape (the first
    layer of mace-torch's plain MACE)."""

    def __init__(self, l: int, n_species: int, c: int):
        super().__init__()
        self.mix = o3.SpeciesLinear(l, n_species, c, [c] * (l + 1))

    def forward(self, A: Tensor, species: Tensor) -> Tensor:
        return torch.cat(self.mix(A, species), dim=1)


class Unmixed(torch.nn.Module):
    def forward(self, A: Tensor, species: Tensor) -> Tensor:
        return A


class NoSelfConnection(torch.nn.Module):
    def forward(self, h: Tensor, species: Tensor) -> List[Tensor]:
        return []


class MACELayer(torch.nn.Module):
    """Interaction (atomic basis A), product basis (symmetric contraction), self-connection and
    readout. ``forward(h (n, (l_in+1)^2, c), species, Y, edge_features, edge_index, pair)`` →
    ``(h (n, (l_out+1)^2, c), energies (n,), A (n, (max_ell+1)^2, c))``."""

    def __init__(self, config: MACEConfig, l_in: int, l_out: int, last: bool, first: bool):
        super().__init__()
        c, n_species, l_sh = config.channels, len(config.species), config.max_ell
        self.linear_up = o3.Linear(l_in, c, c)
        self.tp = o3.EdgeTensorProduct(l_in, l_sh, l_sh)
        self.n_paths, self.channels = len(self.tp.paths), c
        hidden = [config.radial_mlp] * config.radial_depth
        self.radial = radial_mlp([config.num_radial] + hidden + [self.n_paths * c])
        self.linear = o3.PathLinear(self.tp, c, [c] * (l_sh + 1))
        self.normalize = (DensityNormalization(config.num_radial) if config.normalization == "density"
                          else AverageNormalization(config.avg_num_neighbors))
        plain = first and config.first_interaction == "plain"
        self.species_mix = SpeciesMixed(l_sh, n_species, c) if plain else Unmixed()
        self.skip = NoSelfConnection() if plain else o3.SpeciesLinear(l_in, n_species, c, [c] * (l_out + 1))
        self.product = o3.SymmetricContraction(l_sh, l_out, config.correlation, n_species, c)
        self.linear_out = o3.Linear(l_out, c, c)
        self.readout = MLPReadout(c, config.readout_hidden) if last else ScalarReadout(c)

    def forward(self, h: Tensor, species: Tensor, Y: List[Tensor], edge_features: Tensor,
                edge_index: Tensor, pair: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        R = self.radial(edge_features).view(-1, self.n_paths, self.channels)  # per edge or per pair
        messages = self.tp(self.linear_up(h), Y, R, edge_index, pair)
        A = self.normalize(torch.cat(self.linear(messages), dim=1), edge_features, edge_index, pair)
        A = self.species_mix(A, species)
        blocks = o3.add_blocks(self.linear_out.blocks(self.product(A, species)), self.skip(h, species))
        energies = self.readout(blocks[0].squeeze(1))
        return torch.cat(blocks, dim=1), energies, A


class TensorProductPotential(Potential):
    """Common part of NequIP and MACE: the edge harmonics and the enveloped radial features every
    layer reads, and the scalar species embedding the first layer starts from."""

    def __init__(self, config: TensorProductConfig):
        super().__init__(config)
        self.sh = o3.SphericalHarmonics(config.max_ell)
        self.distance_transform: torch.nn.Module = short_range.NoTransform()
        # lengths as the radial features see them (basis and envelope; NequIP's per-pair cutoffs)
        self.radial_lengths: torch.nn.Module = short_range.NoTransform()
        # the radial features of edge i->j equal those of j->i (see inputs)
        self.symmetric_radial = True

    def inputs(self, data: Dict[str, Tensor]
               ) -> Tuple[Tensor, Tensor, List[Tensor], Tensor, Tensor, Tensor, Optional[Tensor]]:
        """``(species, edge_index, Y, edge_features (n_rows, R), h (n_atoms, 1, channels), lengths
        (n_edges,) Å, pair)``. With ``pair`` (eager runs of a model whose radial features are
        symmetric in the two species, given the shifts), the features are made once per
        unordered pair of edges (:func:`eqcalc.neighbors.edge_pairs`; ``n_rows`` pairs) and
        anything computed from them is taken per edge through ``pair`` (``(n_edges,)``, each
        edge's row): the radial networks, the largest matmuls of a step, do half the work.
        Without it (``None``; TorchScript, tracing), ``n_rows`` is the number of edges."""
        species, edge_index = data[keys.SPECIES], data[keys.EDGE_INDEX]
        lengths, unit_vectors = edge_geometry(data[keys.EDGE_VECTORS])
        pair: Optional[Tensor] = None
        rows, row_lengths = edge_index, lengths
        if not torch.jit.is_scripting() and keys.SHIFTS in data and self._pairs_usable(lengths):
            first, pair = edge_pairs(edge_index, data[keys.SHIFTS], species.shape[0])
            rows, row_lengths = edge_index.index_select(1, first), lengths.index_select(0, first)
        radial = self.radial_lengths(row_lengths, species, rows)
        basis = self.radial.basis(self.distance_transform(radial, species, rows))
        # The envelope sees the true length (per-pair rescaled), not the distance transform:
        # exactly 0 at and beyond the cutoff.
        edge_features = basis * self.radial.envelope(radial).unsqueeze(1)
        h = self.embedding(species).unsqueeze(1)       # (n_atoms, 1, channels): scalars
        return species, edge_index, self.sh(unit_vectors), edge_features, h, lengths, pair

    @torch.jit.unused
    def _pairs_usable(self, lengths: Tensor) -> bool:
        return self.symmetric_radial and not fused.traced(lengths)


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
            [MACELayer(config, l_in[k], l_out[k], k == L - 1, k == 0) for k in range(L)])
        species_z = self.species_z.tolist()
        self.distance_transform = short_range.make_transform(config.distance_transform, species_z)
        self.pair_repulsion = short_range.make_repulsion(config.pair_repulsion, species_z, config.envelope_p)
        self.force_head = o3.Degree1ForceHead(config.channels) if config.direct_forces else o3.NoForceHead()

    def forward(self, data: Dict[str, Tensor]) -> Dict[str, Tensor]:
        species, edge_index, Y, edge_features, h, lengths, pair = self.inputs(data)
        energies = self.pair_repulsion(lengths, species, edge_index)  # zeros without a pair term
        A = h
        for layer in self.layers:
            h, e, A = layer(h, species, Y, edge_features, edge_index, pair)
            energies = energies + e
        out: Dict[str, Tensor] = {keys.ENERGIES: self.scale_shift(energies, species)}
        return self.force_head(out, A)
