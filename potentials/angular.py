"""Building blocks shared by the angular architectures (DimeNet++, GemNet-T).

Angles enter through their cosine (a dot product of unit pair vectors) and Legendre polynomials
of it, never through ``arccos``/``atan2`` of a cross-product norm: both have unbounded
derivatives at collinear triplets, which every perfect crystal has. The energy stays a smooth
(C∞ away from the cutoff, C² at it) function of the positions.

Triplet indices come from :func:`eqcalc.triplets.triplets`: ``kj`` and ``ji`` ``(n_triplets,)``
(edge ``k→j`` feeding edge ``j→i``; edge ``e = (i, j)`` of the neighbor list is "``j→i``").
"""
import functools
import math
from typing import Dict, List, NamedTuple

import numpy as np
import torch
from torch import Tensor

from eqcalc import keys
from eqcalc.errors import InvalidOptionError
from eqcalc.triplets import triplets
from potentials.nn import Potential, edge_geometry, make_activation, scatter_sum


def check_sizes(config, may_be_zero=()) -> None:
    """Every integer hyperparameter of ``config`` is a positive size (those in ``may_be_zero``
    may be 0: layer counts); InvalidOptionError naming the field otherwise."""
    import dataclasses

    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.type is int or isinstance(value, int) and not isinstance(value, bool):
            low = 0 if f.name in may_be_zero else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise InvalidOptionError(f"{f.name}={value!r} must be an integer >= {low}")


def init_weights_(module: torch.nn.Module) -> None:
    """Orthogonal weights scaled to mean square 1/fan_in (GemNet's He-orthogonal init) and zero
    biases for every Linear in ``module``, in place; draws from the global RNG, so call it
    inside a seeded build."""
    for layer in module.modules():
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.orthogonal_(layer.weight)
            with torch.no_grad():
                layer.weight.mul_(1.0 / math.sqrt(float(layer.weight.pow(2).mean()) * layer.weight.shape[1]))
            if layer.bias is not None:
                torch.nn.init.zeros_(layer.bias)


def triplet_cosines(unit_vectors: Tensor, kj: Tensor, ji: Tensor) -> Tensor:
    """``cos`` of the angle at ``j`` between ``j→i`` and ``j→k`` ``(n_triplets,)``.

    ``unit_vectors`` ``(n_edges, 3)`` point from centre to neighbor (``r_ij / |r_ij|``), so the
    direction from ``j`` to ``i`` is ``-unit[ji]`` and from ``j`` to ``k`` is ``unit[kj]``.
    """
    return -(unit_vectors.index_select(0, kj) * unit_vectors.index_select(0, ji)).sum(1)


class LegendreHarmonics(torch.nn.Module):
    """Zonal spherical harmonics ``Y_l^0 = sqrt((2l+1)/4π) P_l(cos)``, l = 0..num_spherical-1,
    of cosines ``(n,)`` → ``(n, num_spherical)``: polynomials, smooth at cos = ±1."""

    def __init__(self, num_spherical: int):
        super().__init__()
        self.num_spherical = num_spherical
        self.norms = [math.sqrt((2 * l + 1) / (4 * math.pi)) for l in range(num_spherical)]

    def forward(self, cosines: Tensor) -> Tensor:
        p: List[Tensor] = [torch.ones_like(cosines), cosines]
        for l in range(1, self.num_spherical - 1):  # Bonnet: (l+1) P_{l+1} = (2l+1) x P_l - l P_{l-1}
            p.append(((2 * l + 1) * cosines * p[l] - l * p[l - 1]) / (l + 1))
        return torch.stack([p[l] * self.norms[l] for l in range(self.num_spherical)], dim=1)


@functools.lru_cache(maxsize=None)
def bessel_roots(num_spherical: int, num_radial: int) -> np.ndarray:
    """``z_ln``, the n-th positive root of the spherical Bessel function ``j_l``
    ``(num_spherical, num_radial)``; roots of ``j_l`` interlace those of ``j_{l-1}``."""
    from scipy.optimize import brentq
    from scipy.special import spherical_jn

    n_total = num_radial + num_spherical
    roots = [np.arange(1, n_total + 1) * math.pi]  # j_0 = sin(x)/x
    for l in range(1, num_spherical):
        prev = roots[-1]
        roots.append(np.array([brentq(lambda x: spherical_jn(l, x), prev[k], prev[k + 1])
                               for k in range(len(prev) - 1)]))
    return np.stack([r[:num_radial] for r in roots])


class SphericalBesselBasis(torch.nn.Module):
    """DimeNet's radial part ``sqrt(2) / |j_{l+1}(z_ln)| * j_l(z_ln d / c)`` of lengths
    ``(n_edges,)`` Å → ``(n_edges, num_spherical, num_radial)``; orthonormal on [0, c] (in d/c).

    Evaluated in float64 whatever the model dtype (cast back at the end): ``j_l`` for l up to 6
    is a difference of terms up to ~10^4 times larger than the result at short distances, which
    float32 would lose. Not zero beyond the cutoff: multiply by an envelope.
    """

    def __init__(self, cutoff: float, num_spherical: int, num_radial: int):
        super().__init__()
        from scipy.special import spherical_jn

        self.cutoff = float(cutoff)
        self.num_spherical = num_spherical
        roots = bessel_roots(num_spherical, num_radial)
        norms = np.sqrt(2.0) / np.abs(np.stack([spherical_jn(l + 1, roots[l]) for l in range(num_spherical)]))
        # Buffers (not saved with the weights): a float32 model holds them rounded to float32,
        # the same function in eager and compiled forms.
        self.register_buffer("roots", torch.tensor(roots, dtype=torch.float64), persistent=False)
        self.register_buffer("norms", torch.tensor(norms, dtype=torch.float64), persistent=False)

    def forward(self, lengths: Tensor) -> Tensor:
        d = lengths.to(torch.float64).unsqueeze(1) / self.cutoff
        x = d.unsqueeze(2) * self.roots.to(torch.float64)        # (n_edges, L, N)
        sin, cos = torch.sin(x), torch.cos(x)
        j: List[Tensor] = [sin / x, (sin / x - cos) / x]          # j_0, j_1 at every root's x
        for l in range(1, self.num_spherical - 1):                # j_{l+1} = (2l+1)/x j_l - j_{l-1}
            j.append((2 * l + 1) / x * j[l] - j[l - 1])
        out = torch.stack([j[l][:, l] for l in range(self.num_spherical)], dim=1) * self.norms.to(torch.float64)
        return out.to(lengths.dtype)


class Dense(torch.nn.Module):
    """``act(W x + b)``: the dense layer of DimeNet/GemNet."""

    def __init__(self, n_in: int, n_out: int, bias: bool = True, activation: str = "silu"):
        super().__init__()
        self.linear = torch.nn.Linear(n_in, n_out, bias=bias)
        self.activation = make_activation(activation)

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(self.linear(x))


class Residual(torch.nn.Module):
    """``(x + act(W2 act(W1 x))) * scale``: DimeNet's residual layer (scale 1) and GemNet's
    (scale 1/√2, which keeps the variance of a sum of two unit-variance terms at 1)."""

    def __init__(self, features: int, scale: float = 1.0):
        super().__init__()
        self.layers = torch.nn.Sequential(Dense(features, features), Dense(features, features))
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return (x + self.layers(x)) * self.scale


def residuals(features: int, count: int, scale: float = 1.0) -> torch.nn.Sequential:
    return torch.nn.Sequential(*[Residual(features, scale) for _ in range(count)])


class EdgeForceHead(torch.nn.Module):
    """Direct forces from edge embeddings ``m`` ``(n_edges, F)``: ``F_i = sum_j a_ji r̂_ij``
    ``(n_atoms, 3)`` eV/Å with ``a_ji = w · (MLP(m_ji) ⊙ W rbf_ji)``; ``rbf`` carries the
    envelope and ``W`` has no bias, so ``a`` is exactly 0 beyond the cutoff."""

    def __init__(self, features: int, num_radial: int):
        super().__init__()
        self.mlp = torch.nn.Sequential(Dense(features, features), Dense(features, features))
        self.radial = torch.nn.Linear(num_radial, features, bias=False)
        self.out = torch.nn.Linear(features, 1, bias=False)

    def forward(self, out: Dict[str, Tensor], s: Tensor, v: Tensor, edge_features: Tensor,
                unit_vectors: Tensor, edge_index: Tensor) -> Dict[str, Tensor]:
        """``s``: the edge embeddings; ``v`` unused (the signature of :class:`potentials.nn.NoForceHead`)."""
        a = self.out(self.mlp(s) * self.radial(edge_features))                # (n_edges, 1)
        out[keys.FORCES] = scatter_sum(a * unit_vectors, edge_index[0], out[keys.ENERGIES].shape[0])
        return out


class Geometry(NamedTuple):
    """What both angular architectures compute from the pair vectors (see
    :meth:`AngularPotential.geometry`)."""
    unit_vectors: Tensor   # (n_edges, 3), r_ij / |r_ij|
    rbf: Tensor            # (n_edges, num_radial), radial basis × envelope
    radial: Tensor         # (n_edges, num_spherical, num_radial), spherical Bessel basis × envelope
    angular: Tensor        # (n_triplets, num_spherical), Y_l^0 of the angle at j of each triplet
    kj: Tensor             # (n_triplets,), edge k→j
    ji: Tensor             # (n_triplets,), edge j→i
    reverse: Tensor        # (n_edges,), edge (j, i, -S) of edge (i, j, S)


class AngularPotential(Potential):
    """Common part of DimeNet++ and GemNet-T: pair geometry, the enveloped radial and spherical
    Bessel bases, the triplets and their angular basis, and the memory a triplet costs.
    Subclasses set ``triplet_features``, the width of their per-triplet tensors."""

    triplet_features: int = 0

    def __init__(self, config):
        super().__init__(config)
        self.spherical_bessel = SphericalBesselBasis(config.cutoff, config.num_spherical, config.num_radial)
        self.angular = LegendreHarmonics(config.num_spherical)

    def geometry(self, data: Dict[str, Tensor]) -> Geometry:
        """The :class:`Geometry` of a batch. Evaluated in float64 whatever the model dtype, then
        cast: it is per edge or per angle (cheap), and the bases amplify float32 rounding, of
        the lengths by ~ω d (the highest radial frequency) and of cosines near ±1 (collinear
        triplets, in every crystal) by P_6'(±1) = 21; this halves the float32 stress error."""
        dtype = data[keys.EDGE_VECTORS].dtype
        lengths, directions = edge_geometry(data[keys.EDGE_VECTORS].to(torch.float64))
        kj, ji, reverse = triplets(data[keys.EDGE_INDEX], data[keys.SHIFTS], data[keys.SPECIES].shape[0])
        basis, envelope = self.radial(lengths)
        rbf = basis * envelope.unsqueeze(1)
        radial = self.spherical_bessel(lengths) * envelope.view(-1, 1, 1)
        angular = self.angular(triplet_cosines(directions, kj, ji))
        return Geometry(directions.to(dtype), rbf.to(dtype), radial.to(dtype), angular.to(dtype), kj, ji, reverse)

    @torch.jit.unused
    def bytes_per_triplet(self) -> float:
        """Peak memory per triplet of an inference call with forces and stress, bytes: live
        tensors at the peak on dense Cu cells were (2.2-2.8) n W + 160 numbers for n interactions
        with per-triplet width W; rounded up here. :func:`eqcalc.triplets.plan` splits batches by it."""
        width = self.config.num_interactions * self.triplet_features
        return float(self.embedding.weight.element_size() * (250 + 3 * width))
