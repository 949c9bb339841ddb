"""NequIP: E(3)-equivariant interatomic potentials (Batzner et al., Nat. Commun. 2022).

Features ``h`` ``(n_atoms, (hidden_l+1)^2, channels)`` (natural parity, degrees 0..hidden_l;
with ``parity``, also the odd-parity blocks 0o, 1e, 2o, 3e that the couplings reach,
:func:`potentials.o3.reachable`) are refined by convolutions: a self-interaction (linear per
block), the tensor product of neighbor features with the spherical harmonics of the edge
direction, weighted per path and channel by a radial MLP of a Bessel basis times a smooth
polynomial cutoff, summed over neighbors, mixed linearly, plus a per-species self-connection;
then a gated nonlinearity (SiLU on scalars, sigmoid gates on l > 0; or the norm nonlinearity)
and a residual update where the shapes agree. Two linear layers read out per-atom energies from
the scalars.
"""
import dataclasses
import math
from typing import Any, ClassVar, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from eqcalc import keys
from eqcalc.errors import InvalidOptionError, check_choice
from potentials import o3, short_range
from potentials.mace import (MLPReadout, NoSelfConnection, ScalarReadout, TensorProductConfig, TensorProductPotential,
                             check_int, radial_mlp)
from potentials.registry import register


#: e3nn's second-moment normalisation of SiLU (Monte-Carlo, 1e6 samples, seed 0): what nequip's
#: gates multiply SiLU by. Not the exact integral (1.67653): converted models need this number.
NORMALIZED_SILU_GAIN = 1.6791767923989418
#: The same for tanh (nequip's activation of odd scalars, 0o).
NORMALIZED_TANH_GAIN = 1.5937334472592695


@dataclasses.dataclass(frozen=True)
class NequIPConfig(TensorProductConfig):
    """NequIP hyperparameters (:class:`~potentials.mace.TensorProductConfig`) plus the options
    that reproduce nequip's own ``NequIPGNNModel`` (defaults: eqcalc's original NequIP):

    * ``radial_depth``: hidden layers of width ``radial_mlp`` in the radial network (nequip 1);
    * ``embedding_channels``: width of the species embedding the first layer reads (0: ``channels``);
    * ``residual``: add the input features to a layer's output where the shapes agree (nequip: no);
    * ``first_self_connection``: the first layer has a per-species self-connection (nequip: no);
    * ``last_scalars_only``: the last layer outputs scalars only (nequip: yes);
    * ``gate``: ``"sigmoid"`` (SiLU scalars, sigmoid gates), ``"normalized_silu"`` (nequip:
      e3nn's normalised SiLU on both) or ``"norm"`` (no gates: every block scaled by
      ``SiLU(|x|)/|x|``, nequip's ``convnet_nonlinearity_type: norm``);
    * ``readout``: ``"two_layer"`` (two linear layers), ``"linear"`` (nequip's one layer) or
      ``"mlp"`` (Linear → SiLU → linear, ``readout_hidden`` wide: nequip's readout MLP);
    * ``pair_repulsion``: ``"none"`` or ``"zbl_lammps"`` (nequip's ZBL: LAMMPS constants,
      polynomial envelope of order ``pair_envelope_p`` in ``d / cutoff``, or in ``d`` over the
      pair's own cutoff with ``edge_cutoffs``), added after the scale/shift;
    * ``avg_num_neighbors_per_species``: per-species neighbor counts (nequip's per-type
      ``avg_num_neighbors``); a neighbor's features are divided by the square root of its
      species' count before the sum (empty: ``avg_num_neighbors`` for every species);
    * ``edge_cutoffs``: per species-pair cutoffs ``[centre][neighbour]`` Å, each <= ``cutoff``
      (nequip's ``per_edge_type_cutoff``; empty: ``cutoff`` for every pair);
    * ``channels_per_degree``: channels of each degree ``0..hidden_l`` (each <= ``channels``) that
      the edge tensor products read (nequip's per-irrep ``num_features``: the edge work skips the
      zero padding up to ``channels``; empty: all ``channels``);
    * ``parity``: hidden features of both parities per degree (nequip's ``parity: true``), odd
      scalars through tanh (normalised with ``gate="normalized_silu"``).
    """
    num_interactions: int = 3
    radial_depth: int = 2
    embedding_channels: int = 0
    residual: bool = True
    first_self_connection: bool = True
    last_scalars_only: bool = False
    gate: str = "sigmoid"
    readout: str = "two_layer"
    readout_hidden: int = 16
    pair_repulsion: str = "none"
    pair_envelope_p: int = 6
    avg_num_neighbors_per_species: Tuple[float, ...] = ()
    parity: bool = False
    edge_cutoffs: Tuple[Tuple[float, ...], ...] = ()
    channels_per_degree: Tuple[int, ...] = ()

    FILE_DEFAULTS: ClassVar[Dict[str, Any]] = {
        **TensorProductConfig.FILE_DEFAULTS, "radial_depth": 2, "embedding_channels": 0, "residual": True,
        "first_self_connection": True, "last_scalars_only": False, "gate": "sigmoid",
        "readout": "two_layer", "readout_hidden": 16, "pair_repulsion": "none",
        "pair_envelope_p": 6, "avg_num_neighbors_per_species": (), "parity": False,
        "edge_cutoffs": (), "channels_per_degree": ()}

    @property
    def features(self) -> int:  # width of the species embedding
        return self.embedding_channels or self.channels

    def __post_init__(self):
        super().__post_init__()
        check_int(self, "radial_depth", 1)
        check_int(self, "embedding_channels", 0)
        check_choice("gate", self.gate, ("sigmoid", "normalized_silu", "norm"))
        check_choice("readout", self.readout, ("two_layer", "linear", "mlp"))
        check_int(self, "readout_hidden", 1)
        check_choice("pair_repulsion", self.pair_repulsion, ("none", "zbl_lammps"))
        check_int(self, "pair_envelope_p", 1)
        pairs = tuple(tuple(float(x) for x in row) for row in self.edge_cutoffs)
        n = len(self.species)
        if pairs and (len(pairs) != n or any(len(r) != n for r in pairs)
                      or not all(0 < x <= self.cutoff for r in pairs for x in r)):
            raise InvalidOptionError(f"edge_cutoffs={pairs!r} needs {n}x{n} cutoffs in (0, cutoff={self.cutoff}], "
                                     "or none")
        object.__setattr__(self, "edge_cutoffs", pairs)
        widths = tuple(int(w) for w in self.channels_per_degree)
        if widths and (len(widths) != self.hidden_l + 1 or not all(1 <= w <= self.channels for w in widths)):
            raise InvalidOptionError(f"channels_per_degree={widths!r} needs hidden_l + 1 = {self.hidden_l + 1} "
                                     f"counts in 1..channels={self.channels}, or none")
        object.__setattr__(self, "channels_per_degree", widths)
        if not isinstance(self.parity, bool):
            raise InvalidOptionError(f"parity={self.parity!r} must be true or false")
        per_species = tuple(float(x) for x in self.avg_num_neighbors_per_species)
        if per_species and (len(per_species) != len(self.species) or min(per_species) <= 0):
            raise InvalidOptionError(
                f"avg_num_neighbors_per_species={per_species!r} needs one positive number per species "
                f"({len(self.species)}), or none")
        object.__setattr__(self, "avg_num_neighbors_per_species", per_species)
        if self.direct_forces and (self.hidden_l < 1 or self.last_scalars_only):
            raise InvalidOptionError("direct_forces needs vector features: set hidden_l >= 1 and "
                                     "last_scalars_only=False")


class Convolution(torch.nn.Module):
    """One NequIP interaction: ``h (n, components of blocks_in, c_in)`` → ``(n, components of
    blocks_out, c)`` (layouts of :mod:`potentials.o3`)."""

    def __init__(self, config: NequIPConfig, blocks_in: List[o3.Irrep], blocks_out: List[o3.Irrep], c_in: int,
                 self_connection: bool):
        super().__init__()
        c, n_species = config.channels, len(config.species)
        self.linear_in = o3.Linear(blocks_in, c_in, c_in)
        widths = ([c_in] if blocks_in == [(0, 1)] else
                  [config.channels_per_degree[l] if config.channels_per_degree else c_in for l, _ in blocks_in])
        self.tp = o3.EdgeTensorProduct(blocks_in, config.max_ell, blocks_out, widths)
        self.channels = c_in
        self.radial = radial_mlp([config.num_radial] + [config.radial_mlp] * config.radial_depth
                                 + [sum(self.tp.path_widths)])
        # Even scalars carry the features and one gate per channel for every block of l > 0.
        gated = sum(1 for l, _ in blocks_out if l > 0) if config.gate != "norm" else 0
        widths = [c * (1 + gated)] + [c] * (len(blocks_out) - 1)
        self.linear_out = o3.PathLinear(self.tp, c_in, widths)
        self.self_connection = (o3.SpeciesLinear(blocks_in, n_species, c_in, widths) if self_connection
                                else NoSelfConnection())
        if config.gate == "norm":
            self.gate = o3.NormActivation(o3.ScaledSiLU())
        elif config.gate == "normalized_silu":
            act = o3.ScaledSiLU(NORMALIZED_SILU_GAIN)
            self.gate = o3.Gate(blocks_out, c, act, act, o3.ScaledTanh(NORMALIZED_TANH_GAIN))
        else:
            self.gate = o3.Gate(blocks_out, c)
        # 1/sqrt(avg_num_neighbors) of each neighbor's species: the sum over neighbors is linear,
        # so scaling a neighbor's features before it is the same as scaling the sum after.
        counts = config.avg_num_neighbors_per_species or (config.avg_num_neighbors,) * n_species
        # float64 here: a float32 default would round it before a float64 model ever sees it.
        norm = torch.tensor([1.0 / math.sqrt(x) for x in counts], dtype=torch.float64).view(-1, 1, 1)
        self.register_buffer("norm", norm, persistent=False)
        self.residual = config.residual and blocks_in == blocks_out and c_in == c

    def forward(self, h: Tensor, species: Tensor, Y: List[Tensor], edge_features: Tensor,
                edge_index: Tensor, pair: Optional[Tensor]) -> Tensor:
        R = self.radial(edge_features)   # (n_edges or n_pairs, sum of path widths), path-major
        x = self.linear_in(h) * self.norm.to(h.dtype).index_select(0, species)
        mixed = self.linear_out(self.tp(x, Y, R, edge_index, pair))
        update = self.gate(o3.add_blocks(mixed, self.self_connection(h, species)))
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
        c_in = [config.features] + [c] * (L - 1)
        self.layouts = self.feature_layouts(config)
        self.convolutions = torch.nn.ModuleList(
            [Convolution(config, self.layouts[k], self.layouts[k + 1], c_in[k], k > 0 or config.first_self_connection)
             for k in range(L)])
        if config.readout == "linear":  # nequip's ScalarMLP of depth 0
            self.readout = ScalarReadout(c)
        elif config.readout == "mlp":
            self.readout = MLPReadout(c, config.readout_hidden)
        else:  # two linear layers (the original NequIP's conv_to_output_hidden, output_hidden_to_scalar)
            self.readout = torch.nn.Sequential(torch.nn.Linear(c, max(c // 2, 1)), ScalarReadout(max(c // 2, 1)))
        if config.edge_cutoffs:
            self.radial_lengths = short_range.PairCutoffs(config.edge_cutoffs, config.cutoff)
            self.symmetric_radial = all(a == b for a, b in zip(config.edge_cutoffs, zip(*config.edge_cutoffs)))
        # nequip's ZBL envelope sees the same per-edge-type lengths as the radial features
        self.pair_repulsion = (short_range.LammpsZBL(self.species_z.tolist(), config.cutoff, config.pair_envelope_p,
                                                     self.radial_lengths)
                               if config.pair_repulsion == "zbl_lammps" else short_range.NoRepulsion())
        self.force_head = o3.Degree1ForceHead(c) if config.direct_forces else o3.NoForceHead()

    @staticmethod
    def feature_layouts(config: NequIPConfig) -> List[List[o3.Irrep]]:
        """Layouts of the species embedding (0e) and of every layer's output: the blocks of
        degree <= ``hidden_l`` (both parities with ``parity``) that the couplings reach; the
        last layer's only 0e with ``last_scalars_only``."""
        hidden = [(l, p) for l in range(config.hidden_l + 1)
                  for p in ((1, -1) if config.parity else ((-1) ** l,))]
        out = [[(0, 1)]]
        for k in range(config.num_interactions):
            last = k == config.num_interactions - 1 and config.last_scalars_only
            out.append(o3.reachable(out[-1], config.max_ell, [(0, 1)] if last else hidden))
        return out

    def forward(self, data: Dict[str, Tensor]) -> Dict[str, Tensor]:
        species, edge_index, Y, edge_features, h, lengths, pair = self.inputs(data)
        for convolution in self.convolutions:
            h = convolution(h, species, Y, edge_features, edge_index, pair)
        energies = self.scale_shift(self.readout(h[:, 0]), species)
        # nequip adds its pair potential after the scale/shift (zeros without one)
        out: Dict[str, Tensor] = {keys.ENERGIES: energies + self.pair_repulsion(lengths, species, edge_index)}
        return self.force_head(out, h)
