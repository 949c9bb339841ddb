"""PaiNN: polarizable atom interaction neural network (Schütt, Unke, Gastegger, ICML 2021).

Scalar features ``s`` ``(n_atoms, F)`` and vector features ``v`` ``(n_atoms, 3, F)`` exchange
information in alternating message (eq. 7-8) and update (eq. 9-11) blocks. Vectors only ever
enter linearly, multiplied by invariants, or through norms and dot products, so the per-atom
energy is O(3)-invariant and the direct forces O(3)-equivariant.
"""
import dataclasses
from typing import ClassVar, Dict, Tuple

import torch
from torch import Tensor

from eqcalc import keys
from eqcalc.errors import check_choice
from potentials.nn import (NoForceHead, Potential, edge_geometry, mlp,
                           scatter_sum, validate_config)
from potentials.registry import register


@dataclasses.dataclass(frozen=True)
class PaiNNConfig:
    """PaiNN hyperparameters. ``cutoff`` in Å."""
    species: Tuple[str, ...]
    cutoff: float = 5.0
    features: int = 64
    num_interactions: int = 3
    num_radial: int = 20
    radial_basis: str = "bessel"
    envelope: str = "polynomial"
    direct_forces: bool = False
    #: "smooth" (:class:`SmoothNorm`) or "sqrt" (the paper's |V v|, :class:`SqrtNorm`, which has a
    #: cusp at symmetric sites; kept so files written before the fix compute what they did).
    vector_norm: str = "smooth"

    #: Values of fields that model files written before the field existed had implicitly.
    FILE_DEFAULTS: ClassVar[Dict[str, str]] = {"vector_norm": "sqrt"}

    def __post_init__(self):
        validate_config(self)
        check_choice("vector_norm", self.vector_norm, tuple(VECTOR_NORMS))


class Message(torch.nn.Module):
    """PaiNN message block: ``ds_i = sum_j phi_s(s_j) W_s(r_ij)`` and
    ``dv_i = sum_j v_j phi_vv(s_j) W_vv(r_ij) + r̂_ij phi_vs(s_j) W_vs(r_ij)``.

    ``first``: the block sees ``v = 0`` (all vectors start at zero), so the ``v_j`` term is
    skipped there; it is a constant of the architecture, not a test on data.
    """

    def __init__(self, features: int, first: bool):
        super().__init__()
        self.features = features
        self.first = first
        self.phi = mlp([features, features, 3 * features])

    def forward(self, s: Tensor, v: Tensor, edge_features: Tensor, filter_weight: Tensor,
                unit_vectors: Tensor, edge_index: Tensor) -> Tuple[Tensor, Tensor]:
        """``edge_features`` ``(n_edges, R)`` carry the envelope, ``filter_weight`` ``(3F, R)``
        gives ``W = (W_s, W_vv, W_vs)``; returns ``(ds (n_atoms, F), dv (n_atoms, 3, F))``."""
        F = self.features
        n_atoms = s.shape[0]
        i, j = edge_index[0], edge_index[1]
        phi = self.phi(s)
        # Each gate phi(s_j) * W(r_ij) built as its own contiguous (n_edges, F) tensor: slicing
        # one (n_edges, 3F) product instead makes every later broadcast and backward ~3x slower.
        ds = self.gate(phi[:, :F], filter_weight[:F], edge_features, j)
        gate_vs = self.gate(phi[:, 2 * F:], filter_weight[2 * F:], edge_features, j)
        dv = unit_vectors.unsqueeze(2) * gate_vs.unsqueeze(1)                 # (n_edges, 3, F)
        if not self.first:
            gate_vv = self.gate(phi[:, F:2 * F], filter_weight[F:2 * F], edge_features, j)
            v_j = v.reshape(n_atoms, 3 * F).index_select(0, j).reshape(-1, 3, F)
            dv = torch.addcmul(dv, v_j, gate_vv.unsqueeze(1))
        return scatter_sum(ds, i, n_atoms), scatter_sum(dv, i, n_atoms)

    @staticmethod
    def gate(phi: Tensor, weight: Tensor, edge_features: Tensor, j: Tensor) -> Tensor:
        return phi.contiguous().index_select(0, j) * torch.nn.functional.linear(edge_features, weight)


class SmoothNorm(torch.nn.Module):
    """``sqrt(1 + |w|^2) - 1`` over the spatial axis of ``w`` ``(n_atoms, 3, F)``: grows like the
    norm ``|w|`` for large vectors, like ``|w|^2 / 2`` for small ones, and is infinitely
    differentiable everywhere.

    At an atom on an inversion centre ``w = 0`` by symmetry, and a displacement ``u`` makes
    ``w ~ u``. The paper's ``|w|`` (or ``sqrt(|w|^2 + eps)``) then puts a cusp in the energy at
    every such site: forces that do not vanish linearly, a perfect crystal that is a maximum,
    imaginary phonons. A function of ``|w|^2`` keeps the energy smooth there.
    """

    smooth = True

    def forward(self, w: Tensor) -> Tensor:
        return torch.sqrt(1.0 + torch.sum(w * w, dim=1)) - 1.0


class SqrtNorm(torch.nn.Module):
    """The paper's ``|w|``, as ``sqrt(|w|^2 + 1e-8)`` so it is differentiable at ``w = 0``: a cusp
    of width 1e-4 at every symmetric site (see :class:`SmoothNorm`). Only for model files that
    were trained with it."""

    smooth = False

    def forward(self, w: Tensor) -> Tensor:
        return torch.sqrt(torch.sum(w * w, dim=1) + 1e-8)


VECTOR_NORMS = {"smooth": SmoothNorm, "sqrt": SqrtNorm}


class Update(torch.nn.Module):
    """PaiNN update block: ``dv = a_vv U v``, ``ds = a_ss + a_sv <U v, V v>`` with
    ``(a_vv, a_sv, a_ss) = MLP(s, ‖V v‖)``, where ``‖·‖`` is :class:`SmoothNorm` (the paper's
    ``|V v|`` has a cusp at ``V v = 0``)."""

    def __init__(self, features: int, norm: torch.nn.Module):
        super().__init__()
        self.features = features
        self.uv = torch.nn.Linear(features, 2 * features, bias=False)  # U and V in one matmul
        self.norm = norm
        self.mlp = mlp([2 * features, features, 3 * features])

    def forward(self, s: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        F = self.features
        uv = self.uv(v)
        u, w = uv[..., :F], uv[..., F:]
        a = self.mlp(torch.cat([s, self.norm(w)], dim=1))
        a_vv, a_sv, a_ss = torch.split(a, F, dim=1)
        return a_ss + a_sv * torch.sum(u * w, dim=1), a_vv.unsqueeze(1) * u


class Interaction(torch.nn.Module):
    """One PaiNN layer: message, then update, each a residual step on ``(s, v)``."""

    def __init__(self, features: int, first: bool, norm: torch.nn.Module):
        super().__init__()
        self.message = Message(features, first)
        self.update = Update(features, norm)

    def forward(self, s: Tensor, v: Tensor, edge_features: Tensor, filter_weight: Tensor,
                unit_vectors: Tensor, edge_index: Tensor) -> Tuple[Tensor, Tensor]:
        ds, dv = self.message(s, v, edge_features, filter_weight, unit_vectors, edge_index)
        s, v = s + ds, v + dv
        ds, dv = self.update(s, v)
        return s + ds, v + dv


class VectorForceHead(torch.nn.Module):
    """Direct forces ``(n_atoms, 3)`` eV/Å: a linear map of ``v`` gated by an MLP of ``s``."""

    def __init__(self, features: int):
        super().__init__()
        self.vector = torch.nn.Linear(features, features, bias=False)
        self.gate = mlp([features, features, features])

    def forward(self, out: Dict[str, Tensor], s: Tensor, v: Tensor, edge_features: Tensor,
                unit_vectors: Tensor, edge_index: Tensor) -> Dict[str, Tensor]:
        out[keys.FORCES] = torch.sum(self.vector(v) * self.gate(s).unsqueeze(1), dim=2)
        return out


@register("painn")
class PaiNN(Potential):
    """PaiNN energy model. ``forward(data)`` → ``{"energies": (n_atoms,) eV}`` plus
    ``"forces": (n_atoms, 3) eV/Å`` when ``config.direct_forces``. Inputs per :mod:`eqcalc.keys`."""

    architecture = "painn"
    Config = PaiNNConfig

    def __init__(self, config: PaiNNConfig):
        super().__init__(config)
        F, L = config.features, config.num_interactions
        # The filters W(r_ij) of all layers in one weight matrix, applied to [basis * envelope,
        # envelope]: the last column acts as the bias of W, times the envelope like the rest.
        self.filters = torch.nn.Linear(config.num_radial + 1, L * 3 * F, bias=False)
        norm = VECTOR_NORMS[config.vector_norm]
        self.interactions = torch.nn.ModuleList([Interaction(F, k == 0, norm()) for k in range(L)])
        #: twice continuously differentiable everywhere (second derivatives are meaningful)
        self.smooth = norm.smooth
        self.not_smooth_because = (
            "this PaiNN file was trained with the paper's vector norm |V v|, which has a cusp at "
            "every atom on a symmetric site (the force there does not vanish linearly); retrain it "
            "with this eqcalc (vector_norm='smooth')")
        self.readout = mlp([F, F // 2, 1])
        self.force_head = VectorForceHead(F) if config.direct_forces else NoForceHead()

    def forward(self, data: Dict[str, Tensor]) -> Dict[str, Tensor]:
        species, edge_index = data[keys.SPECIES], data[keys.EDGE_INDEX]
        lengths, unit_vectors = edge_geometry(data[keys.EDGE_VECTORS])
        basis, envelope = self.radial(lengths)
        # Every edge feature carries the envelope: edges at or beyond the cutoff give exactly 0.
        edge_features = torch.cat([basis, torch.ones_like(lengths).unsqueeze(1)], 1) * envelope.unsqueeze(1)
        s = self.embedding(species)
        v = torch.zeros(s.shape[0], 3, self.features, dtype=s.dtype, device=s.device)
        width = 3 * self.features
        for k, interaction in enumerate(self.interactions):
            # Layer k uses rows of the one filter weight; slicing an (n_edges, L*3F) product
            # instead would cost a full-size zero fill per layer in the backward pass.
            weight = self.filters.weight[k * width:(k + 1) * width]
            s, v = interaction(s, v, edge_features, weight, unit_vectors, edge_index)
        energies = self.scale_shift(self.readout(s).squeeze(1), species)
        out: Dict[str, Tensor] = {keys.ENERGIES: energies}
        return self.force_head(out, s, v, edge_features, unit_vectors, edge_index)
