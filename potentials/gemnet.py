"""GemNet-T: geometric message passing with triplets (Gasteiger, Becker, Günnemann, NeurIPS 2021).

Directed-edge embeddings ``m`` ``(n_edges, F_edge)`` and atom embeddings ``h`` ``(n_atoms,
F_atom)``. Each interaction block (paper Fig. 4, "T-MP" path):

* triplet interaction: the messages of the edges ``k→j`` into ``j`` are weighted by a 2D basis
  of the angle at ``j`` and the length of the edge being updated, contracted with the *efficient
  bilinear layer* (the radial part depends only on that edge, so it is applied after the sum
  over ``k``), and written symmetrically to both directions of the edge (``j→i`` and ``i→j``);
* atom self-interaction: ``h_i`` is updated from its incoming edges and residual layers;
* the edge embedding is refreshed from ``[h_i, h_j, m_ji]``.

Residual sums are scaled by 1/√2 and the outputs of sums over neighbors by *scaling factors*
(:class:`ScaleFactor`), fitted once on training data so every block starts with unit variance
(:meth:`GemNetT.calibrate`, run by :func:`potentials.train.train`). Output blocks after the
embedding and after every interaction give per-atom energies and, with ``direct_forces``, edge
force magnitudes along the pair directions; both are summed over blocks.

The angle enters as its cosine and every edge term carries an enveloped radial basis without
bias: exactly 0 beyond the cutoff, C² at it. Distances and angles only: O(3)-invariant energy,
O(3)-equivariant direct forces.
"""
import dataclasses
import math
from typing import Callable, Dict, List, Tuple

import torch
from torch import Tensor

from eqcalc import keys
from potentials.angular import AngularPotential, Dense, check_sizes, init_weights_, residuals
from potentials.nn import scatter_sum, validate_config
from potentials.registry import register

@dataclasses.dataclass(frozen=True)
class GemNetConfig:
    """GemNet-T hyperparameters (paper: features 128 for atoms and edges, trip_features 64,
    rbf/cbf_features 16, bilinear_features 64, num_interactions 4; smaller defaults here for
    CPU). ``cutoff`` in Å."""
    species: Tuple[str, ...]
    cutoff: float = 5.0
    features: int = 64            # atom embeddings
    edge_features: int = 64
    trip_features: int = 32
    rbf_features: int = 16
    cbf_features: int = 16
    bilinear_features: int = 32
    num_interactions: int = 3
    num_spherical: int = 7
    num_radial: int = 6
    num_before_skip: int = 1
    num_after_skip: int = 1
    num_concat: int = 1
    num_atom: int = 2
    radial_basis: str = "bessel"
    envelope: str = "polynomial"
    direct_forces: bool = False

    def __post_init__(self):
        validate_config(self)
        check_sizes(self, may_be_zero=("num_before_skip", "num_after_skip", "num_concat", "num_atom"))


class ScaleFactor(torch.nn.Module):
    """``y * scale``: GemNet's scaling factor. ``scale`` (a buffer, saved with the weights) is
    fitted by :meth:`GemNetT.calibrate` so that ``y`` has the mean square of ``reference``."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.ones(()))

    def forward(self, y: Tensor, reference: Tensor) -> Tensor:
        return y * self.scale


class EfficientBilinear(torch.nn.Module):
    """``out_ji = W ⋅ (sum_l R_l(d_ji) ⊗ sum_k Y_l(α_kji) x_kj)`` ``(n_edges, bilinear_features)``.

    ``R`` ``(n_edges, cbf_features, L)`` is the enveloped spherical Bessel basis of the updated
    edge down-projected per degree; the sum over ``k`` runs once per degree ``l`` (index_add of
    ``(n_triplets, trip_features)``), never materialising ``(n_triplets, L, ...)``.
    """

    def __init__(self, c: GemNetConfig):
        super().__init__()
        self.num_spherical = c.num_spherical
        self.radial = torch.nn.Parameter(torch.empty(c.num_spherical, c.num_radial, c.cbf_features))
        self.weight = torch.nn.Linear(c.cbf_features * c.trip_features, c.bilinear_features, bias=False)
        torch.nn.init.xavier_uniform_(self.radial.view(-1, c.cbf_features))

    def forward(self, x_kj: Tensor, radial: Tensor, angular: Tensor, kj: Tensor, ji: Tensor) -> Tensor:
        """``x_kj`` ``(n_edges, T)``, ``radial`` ``(n_edges, L, N)``, ``angular`` ``(n_triplets, L)``."""
        n_edges = radial.shape[0]
        gathered = x_kj.index_select(0, kj)                                    # (n_triplets, T)
        # One (n_triplets,) column per degree via unbind: slicing columns instead would cost a
        # full-size zero fill per degree in the backward pass.
        summed = torch.stack([scatter_sum(gathered * y.unsqueeze(1), ji, n_edges)
                              for y in angular.unbind(1)], dim=1)                # (n_edges, L, T)
        r = torch.einsum("eln,lnc->ecl", radial, self.radial)                  # (n_edges, C, L)
        return self.weight(torch.bmm(r, summed).flatten(1))


class TripletInteraction(torch.nn.Module):
    """Messages ``k→j`` with the angle at ``j``, to both directions of each edge ``j→i``."""

    def __init__(self, c: GemNetConfig):
        super().__init__()
        self.kj = Dense(c.edge_features, c.edge_features)
        self.rbf = torch.nn.Linear(c.rbf_features, c.edge_features, bias=False)
        self.scale_rbf = ScaleFactor()
        self.down = Dense(c.edge_features, c.trip_features, bias=False)
        self.bilinear = EfficientBilinear(c)
        self.scale_cbf = ScaleFactor()
        self.up_ji = Dense(c.bilinear_features, c.edge_features, bias=False)
        self.up_ij = Dense(c.bilinear_features, c.edge_features, bias=False)

    def forward(self, m: Tensor, rbf3: Tensor, radial: Tensor, angular: Tensor, kj: Tensor, ji: Tensor,
                reverse: Tensor) -> Tensor:
        x = self.kj(m)
        x = self.down(self.scale_rbf(x * self.rbf(rbf3), x))
        y = self.scale_cbf(self.bilinear(x, radial, angular, kj, ji), x)
        # Symmetric update: the sum over k→j reaches j→i and, swapped, i→j.
        return (self.up_ji(y) + self.up_ij(y).index_select(0, reverse)) * math.sqrt(0.5)


class AtomUpdate(torch.nn.Module):
    """``h_i' = Res(act(W sum_j m_ji ⊙ W_rbf e_ji))``: atom self-interaction from incoming edges."""

    def __init__(self, c: GemNetConfig, n_out: int):
        super().__init__()
        self.rbf = torch.nn.Linear(c.rbf_features, c.edge_features, bias=False)
        self.scale_sum = ScaleFactor()
        self.dense = Dense(c.edge_features, n_out)
        self.residuals = residuals(n_out, c.num_atom, math.sqrt(0.5))

    def forward(self, m: Tensor, rbf: Tensor, centre: Tensor, n_atoms: int) -> Tensor:
        x = scatter_sum(m * self.rbf(rbf), centre, n_atoms)
        return self.residuals(self.dense(self.scale_sum(x, m)))


class EdgeEmbedding(torch.nn.Module):
    """``m_ji = act(W [h_i, h_j, x_ji])``."""

    def __init__(self, atom_features: int, edge_in: int, edge_out: int):
        super().__init__()
        self.dense = Dense(2 * atom_features + edge_in, edge_out)

    def forward(self, h: Tensor, x: Tensor, edge_index: Tensor) -> Tensor:
        h_i, h_j = h.index_select(0, edge_index[0]), h.index_select(0, edge_index[1])
        return self.dense(torch.cat([h_i, h_j, x], dim=1))


class Interaction(torch.nn.Module):
    """One GemNet-T interaction block: triplet interaction, edge update with skip, atom
    self-interaction, edge embedding refreshed from the atoms (paper Fig. 4)."""

    def __init__(self, c: GemNetConfig):
        super().__init__()
        F = c.edge_features
        self.skip_ji = Dense(F, F)
        self.triplet = TripletInteraction(c)
        self.before_skip = residuals(F, c.num_before_skip, math.sqrt(0.5))
        self.after_skip = residuals(F, c.num_after_skip, math.sqrt(0.5))
        self.atom_update = AtomUpdate(c, c.features)
        self.concat = EdgeEmbedding(c.features, F, F)
        self.residual_m = residuals(F, c.num_concat, math.sqrt(0.5))

    def forward(self, h: Tensor, m: Tensor, rbf3: Tensor, rbf_h: Tensor, radial: Tensor, angular: Tensor,
                kj: Tensor, ji: Tensor, reverse: Tensor, edge_index: Tensor) -> Tuple[Tensor, Tensor]:
        x = (self.skip_ji(m) + self.triplet(m, rbf3, radial, angular, kj, ji, reverse)) * math.sqrt(0.5)
        m = self.after_skip((m + self.before_skip(x)) * math.sqrt(0.5))
        h = (h + self.atom_update(m, rbf_h, edge_index[0], h.shape[0])) * math.sqrt(0.5)
        m = (m + self.residual_m(self.concat(h, m, edge_index))) * math.sqrt(0.5)
        return h, m


class ForceOutput(torch.nn.Module):
    """Direct-force part of an output block: edge force magnitudes ``(n_edges,)`` eV/Å,
    ``w · scale(MLP(m) ⊙ W_rbf e)``, 0 beyond the cutoff."""

    def __init__(self, c: GemNetConfig):
        super().__init__()
        F = c.edge_features
        self.mlp = torch.nn.Sequential(Dense(F, F), residuals(F, c.num_atom, math.sqrt(0.5)))
        self.rbf = torch.nn.Linear(c.rbf_features, F, bias=False)
        self.scale_rbf = ScaleFactor()
        self.out = torch.nn.Linear(F, 1, bias=False)

    def forward(self, m: Tensor, rbf: Tensor) -> Tensor:
        x = self.mlp(m)
        return self.out(self.scale_rbf(x * self.rbf(rbf), x)).squeeze(1)


class NoForceOutput(torch.nn.Module):
    """Output block of a model without direct forces: zero magnitudes."""

    def forward(self, m: Tensor, rbf: Tensor) -> Tensor:
        return torch.zeros_like(m[:, 0])


class Output(torch.nn.Module):
    """Output block: per-atom energies ``(n_atoms,)`` from the incoming edges (an
    :class:`AtomUpdate` and a linear map) and edge force magnitudes ``(n_edges,)``."""

    def __init__(self, c: GemNetConfig):
        super().__init__()
        self.energy = AtomUpdate(c, c.features)
        self.energy_out = torch.nn.Linear(c.features, 1, bias=False)
        self.forces = ForceOutput(c) if c.direct_forces else NoForceOutput()

    def forward(self, m: Tensor, rbf: Tensor, centre: Tensor, n_atoms: int) -> Tuple[Tensor, Tensor]:
        energies = self.energy_out(self.energy(m, rbf, centre, n_atoms)).squeeze(1)
        return energies, self.forces(m, rbf)


class EdgeForces(torch.nn.Module):
    """Direct forces ``F_i = sum_j f_ji r̂_ij`` ``(n_atoms, 3)`` eV/Å from magnitudes ``(n_edges,)``."""

    def forward(self, out: Dict[str, Tensor], magnitudes: Tensor, unit_vectors: Tensor,
                centre: Tensor) -> Dict[str, Tensor]:
        out[keys.FORCES] = scatter_sum(magnitudes.unsqueeze(1) * unit_vectors, centre, out[keys.ENERGIES].shape[0])
        return out


class NoEdgeForces(torch.nn.Module):
    def forward(self, out: Dict[str, Tensor], magnitudes: Tensor, unit_vectors: Tensor,
                centre: Tensor) -> Dict[str, Tensor]:
        return out


@register("gemnet")
class GemNetT(AngularPotential):
    """GemNet-T energy model. ``forward(data)`` → ``{"energies": (n_atoms,) eV}`` plus
    ``"forces": (n_atoms, 3) eV/Å`` when ``config.direct_forces``. Inputs per :mod:`eqcalc.keys`
    (``shifts`` tell periodic images apart when forming triplets)."""

    architecture = "gemnet"
    Config = GemNetConfig

    def __init__(self, config: GemNetConfig):
        super().__init__(config)
        c = config
        self.triplet_features = c.trip_features
        # Radial down-projections shared by all blocks (orange in the paper's Fig. 4).
        self.rbf_edge = torch.nn.Linear(c.num_radial, c.edge_features, bias=False)
        self.rbf3 = torch.nn.Linear(c.num_radial, c.rbf_features, bias=False)
        self.rbf_h = torch.nn.Linear(c.num_radial, c.rbf_features, bias=False)
        self.rbf_out = torch.nn.Linear(c.num_radial, c.rbf_features, bias=False)
        self.embed_edges = EdgeEmbedding(c.features, c.edge_features, c.edge_features)
        self.interactions = torch.nn.ModuleList([Interaction(c) for _ in range(c.num_interactions)])
        self.first_output = Output(c)   # on the embeddings, before any interaction
        self.outputs = torch.nn.ModuleList([Output(c) for _ in range(c.num_interactions)])
        self.force_head = EdgeForces() if c.direct_forces else NoEdgeForces()
        init_weights_(self)

    def forward(self, data: Dict[str, Tensor]) -> Dict[str, Tensor]:
        species, edge_index = data[keys.SPECIES], data[keys.EDGE_INDEX]
        n_atoms, centre = species.shape[0], edge_index[0]
        g = self.geometry(data)
        rbf, radial, angular, kj, ji, reverse = g.rbf, g.radial, g.angular, g.kj, g.ji, g.reverse
        rbf3, rbf_h, rbf_out = self.rbf3(rbf), self.rbf_h(rbf), self.rbf_out(rbf)
        h = self.embedding(species)
        m = self.embed_edges(h, self.rbf_edge(rbf), edge_index)
        energies, magnitudes = self.first_output(m, rbf_out, centre, n_atoms)
        for interaction, output in zip(self.interactions, self.outputs):
            h, m = interaction(h, m, rbf3, rbf_h, radial, angular, kj, ji, reverse, edge_index)
            e, f = output(m, rbf_out, centre, n_atoms)
            energies, magnitudes = energies + e, magnitudes + f
        out: Dict[str, Tensor] = {keys.ENERGIES: self.scale_shift(energies, species)}
        return self.force_head(out, magnitudes, g.unit_vectors, centre)

    @torch.jit.unused
    def calibrate(self, run: Callable[[], object], n_batches: int = 1) -> Dict[str, float]:
        """Fit the scaling factors, in order, so that each scaled sum has the mean square of
        its reference (GemNet's variance-preserving initialisation). ``run()`` evaluates the
        model on the calibration batches once. Returns ``{name: scale}``."""
        fitted: Dict[str, float] = {}
        for name, factor in self.named_modules():
            if not isinstance(factor, ScaleFactor):
                continue
            stats: List[Tuple[float, float]] = []

            def hook(module, inputs, output, stats=stats):
                y, reference = inputs
                stats.append((float(reference.detach().pow(2).mean()), float(y.detach().pow(2).mean())))

            handle = factor.register_forward_hook(hook)
            try:
                for _ in range(n_batches):
                    run()
            finally:
                handle.remove()
            ref, out = sum(s[0] for s in stats), sum(s[1] for s in stats)
            if out > 0 and ref > 0:
                factor.scale.fill_(math.sqrt(ref / out))
            fitted[name] = float(factor.scale)
        return fitted
