"""Shared building blocks of the architectures in :mod:`potentials`.

Everything here is TorchScript-scriptable and traceable by ``make_fx(tracing_mode="symbolic")``:
no data-dependent Python control flow, no ``.item()``. Shapes follow :mod:`eqcalc.keys`;
lengths are in Å, energies in eV.
"""
import math
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor

from eqcalc import keys
from eqcalc.errors import InvalidOptionError, UnknownElementError, check_choice

ENVELOPES = ("polynomial", "cosine")
RADIAL_BASES = ("bessel", "gaussian")


# ---- species -------------------------------------------------------------------------------
def atomic_numbers(species: Sequence[str]) -> List[int]:
    """Atomic numbers of chemical symbols; raises UnknownElementError naming a bad symbol."""
    from ase.data import atomic_numbers as table

    out = []
    for symbol in species:
        z = table.get(symbol, 0) if isinstance(symbol, str) else 0
        if z == 0:  # 0 is ASE's dummy "X": not a trainable element either
            raise UnknownElementError(
                f"species contains {symbol!r}, which is not a chemical symbol; "
                "use symbols such as 'H', 'C', 'Cu' (case-sensitive)")
        out.append(z)
    if len(set(out)) != len(out):
        raise InvalidOptionError(f"species={list(species)!r} lists an element twice; list each once")
    if len(out) == 0:
        raise InvalidOptionError("species is empty; list the chemical symbols the model covers")
    return out


# ---- geometry -------------------------------------------------------------------------------
def edge_geometry(vectors: Tensor) -> Tuple[Tensor, Tensor]:
    """Lengths ``(n_edges,)`` Å and unit vectors ``(n_edges, 3)`` of pair vectors ``(n_edges, 3)``.

    The clamp only guards the gradient of sqrt at zero length (which never occurs for real
    edges); any edge longer than 1e-6 Å is untouched.
    """
    lengths = torch.sqrt(torch.sum(vectors * vectors, dim=1).clamp_min(1e-12))
    return lengths, vectors / lengths.unsqueeze(1)


def scatter_sum(src: Tensor, index: Tensor, dim_size: int) -> Tensor:
    """Sum rows of ``src`` ``(n, ...)`` into ``(dim_size, ...)`` bins given by ``index`` ``(n,)``.

    scatter_add, not index_add: autograd's index_add keeps ``src`` alive for the backward pass
    (it only needs its shape), which for triplet sums was most of the peak memory.
    """
    size = list(src.shape)
    size[0] = dim_size
    shape = [-1] + [1] * (src.dim() - 1)
    return torch.zeros(size, dtype=src.dtype, device=src.device).scatter_add(
        0, index.view(shape).expand_as(src), src)


# ---- cutoff envelopes -------------------------------------------------------------------------
def polynomial_envelope(x: Tensor, p: float) -> Tensor:
    """``1 - (p+1)(p+2)/2 x^p + p(p+2) x^(p+1) - p(p+1)/2 x^(p+2)`` for ``x < 1``, else 0."""
    xp = torch.pow(x, p)
    env = 1.0 - 0.5 * (p + 1.0) * (p + 2.0) * xp + p * (p + 2.0) * xp * x \
        - 0.5 * p * (p + 1.0) * xp * x * x
    return torch.where(x < 1.0, env, torch.zeros_like(env))


class PolynomialCutoff(torch.nn.Module):
    """DimeNet envelope :func:`polynomial_envelope` of ``x = d/cutoff``.

    Value and first derivative vanish at ``d = cutoff`` (and the second for p >= 2); exactly 0
    beyond, so edges from a skin neighbor list contribute nothing. ``p`` 6 by default (mace-torch
    models use 5).
    """

    def __init__(self, cutoff: float, p: int = 6):
        super().__init__()
        self.cutoff = float(cutoff)
        self.p = float(p)

    def forward(self, lengths: Tensor) -> Tensor:
        """Envelope ``(n_edges,)`` of lengths ``(n_edges,)`` Å."""
        return polynomial_envelope(lengths / self.cutoff, self.p)


class CosineCutoff(torch.nn.Module):
    """Behler/SchNetPack envelope ``(cos(pi d / cutoff) + 1) / 2``; 0 with zero slope at the cutoff."""

    def __init__(self, cutoff: float):
        super().__init__()
        self.cutoff = float(cutoff)

    def forward(self, lengths: Tensor) -> Tensor:
        """Envelope ``(n_edges,)`` of lengths ``(n_edges,)`` Å."""
        env = 0.5 * (torch.cos(lengths * (math.pi / self.cutoff)) + 1.0)
        return torch.where(lengths < self.cutoff, env, torch.zeros_like(env))


def make_envelope(name: str, cutoff: float, p: int = 6) -> torch.nn.Module:
    check_choice("envelope", name, ENVELOPES)
    return PolynomialCutoff(cutoff, p) if name == "polynomial" else CosineCutoff(cutoff)


# ---- radial bases -----------------------------------------------------------------------------
class BesselBasis(torch.nn.Module):
    """DimeNet/NequIP sine basis ``sqrt(2/c) sin(n pi d / c) / d``, n = 1..num_radial, d in Å.

    Output ``(n_edges, num_radial)``. Not zero beyond the cutoff by itself: always multiply by an
    envelope.
    """

    def __init__(self, cutoff: float, num_radial: int):
        super().__init__()
        self.prefactor = math.sqrt(2.0 / cutoff)
        self.register_buffer(
            "frequencies", torch.arange(1, num_radial + 1, dtype=torch.float64) * (math.pi / cutoff))

    def forward(self, lengths: Tensor) -> Tensor:
        d = lengths.unsqueeze(1)
        return self.prefactor * torch.sin(d * self.frequencies) / d


class GaussianBasis(torch.nn.Module):
    """SchNet Gaussians ``exp(-(d - mu_k)^2 / (2 w^2))``, centres mu_k evenly on [0, cutoff] Å,
    width w = spacing (SchNetPack). Output ``(n_edges, num_radial)``."""

    def __init__(self, cutoff: float, num_radial: int):
        super().__init__()
        self.register_buffer("centers", torch.linspace(0.0, cutoff, num_radial, dtype=torch.float64))
        width = cutoff / max(num_radial - 1, 1)
        self.coefficient = -0.5 / width ** 2

    def forward(self, lengths: Tensor) -> Tensor:
        diff = lengths.unsqueeze(1) - self.centers
        return torch.exp(self.coefficient * diff * diff)


def make_radial_basis(name: str, cutoff: float, num_radial: int) -> torch.nn.Module:
    check_choice("radial_basis", name, RADIAL_BASES)
    return BesselBasis(cutoff, num_radial) if name == "bessel" else GaussianBasis(cutoff, num_radial)


class RadialEmbedding(torch.nn.Module):
    """Radial basis ``(n_edges, num_radial)`` and envelope ``(n_edges,)`` of lengths ``(n_edges,)`` Å.

    Multiply whatever an edge contributes by the envelope (last, after any bias) so that it is
    exactly 0, with zero slope, for d >= cutoff.
    """

    def __init__(self, basis: str, envelope: str, cutoff: float, num_radial: int, p: int = 6):
        super().__init__()
        self.basis = make_radial_basis(basis, cutoff, num_radial)
        self.envelope = make_envelope(envelope, cutoff, p)

    def forward(self, lengths: Tensor) -> Tuple[Tensor, Tensor]:
        return self.basis(lengths), self.envelope(lengths)


# ---- dense layers -----------------------------------------------------------------------------
class ShiftedSoftplus(torch.nn.Module):
    """``softplus(x) - log 2`` (SchNet): smooth, zero at zero."""

    def __init__(self):
        super().__init__()
        self.shift = math.log(2.0)

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.softplus(x) - self.shift


def make_activation(name: str) -> torch.nn.Module:
    check_choice("activation", name, ("silu", "ssp"))
    return torch.nn.SiLU() if name == "silu" else ShiftedSoftplus()


def mlp(sizes: Sequence[int], activation: str = "silu", bias_last: bool = True) -> torch.nn.Sequential:
    """Linear layers with ``activation`` between them (none after the last)."""
    layers: List[torch.nn.Module] = []
    for k in range(len(sizes) - 1):
        last = k == len(sizes) - 2
        layers.append(torch.nn.Linear(sizes[k], sizes[k + 1], bias=bias_last or not last))
        if not last:
            layers.append(make_activation(activation))
    return torch.nn.Sequential(*layers)


def xavier_init_(module: torch.nn.Module) -> None:
    """Glorot-uniform weights and zero biases for every Linear in ``module`` (SchNetPack's
    Dense init), in place; uses the global RNG, so call it inside a seeded build."""
    for layer in module.modules():
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                torch.nn.init.zeros_(layer.bias)


class ScaleShift(torch.nn.Module):
    """Per-atom energy ``scale[species] * e + shift[species]`` eV; scale init 1, shift init 0,
    both learnable so training can fit reference energies."""

    def __init__(self, n_species: int):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(n_species))
        self.shift = torch.nn.Parameter(torch.zeros(n_species))

    def forward(self, energies: Tensor, species: Tensor) -> Tensor:
        return energies * self.scale[species] + self.shift[species]


class NoForceHead(torch.nn.Module):
    """Force head of a model without direct forces: passes the outputs through."""

    def forward(self, out: Dict[str, Tensor], s: Tensor, v: Tensor, edge_features: Tensor,
                unit_vectors: Tensor, edge_index: Tensor) -> Dict[str, Tensor]:
        return out


class PairForceHead(torch.nn.Module):
    """Direct forces ``F_i = sum_j a(h_i, h_j, d_ij) r̂_ij`` ``(n_atoms, 3)`` eV/Å.

    ``a = w · (ssp(A h_i + B h_j) ⊙ C e_ij)`` with ``e_ij`` the enveloped radial basis, so ``a``
    is exactly 0 beyond the cutoff and goes there smoothly.
    """

    def __init__(self, features: int, num_radial: int):
        super().__init__()
        self.features = features
        self.atoms = torch.nn.Linear(features, 2 * features)          # A and B in one matmul
        self.radial = torch.nn.Linear(num_radial, features, bias=False)
        self.activation = ShiftedSoftplus()
        self.out = torch.nn.Linear(features, 1, bias=False)

    def forward(self, out: Dict[str, Tensor], s: Tensor, v: Tensor, edge_features: Tensor,
                unit_vectors: Tensor, edge_index: Tensor) -> Dict[str, Tensor]:
        F = self.features
        ab = self.atoms(s)
        pair = ab[:, :F].index_select(0, edge_index[0]) + ab[:, F:].index_select(0, edge_index[1])
        a = self.out(self.activation(pair) * self.radial(edge_features))      # (n_edges, 1)
        out[keys.FORCES] = scatter_sum(a * unit_vectors, edge_index[0], s.shape[0])
        return out


# ---- model base -------------------------------------------------------------------------------
class Potential(torch.nn.Module):
    """Common part of every architecture: config, cutoff, ``species_z`` buffer, energy scale/shift,
    species embedding ``(n_species, features)`` and radial embedding.

    Subclasses set ``architecture`` and a frozen dataclass ``Config``.
    """

    architecture = ""
    # The dataclass config is plain Python metadata, not part of the scripted graph.
    __jit_ignored_attributes__ = ["config"]

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.cutoff = float(config.cutoff)
        self.register_buffer("species_z", torch.tensor(atomic_numbers(config.species), dtype=torch.int64))
        self.scale_shift = ScaleShift(len(config.species))
        # Every architecture here starts from a species embedding and a radial basis × envelope.
        self.features = config.features
        self.embedding = torch.nn.Embedding(len(config.species), config.features)
        self.radial = RadialEmbedding(config.radial_basis, config.envelope, config.cutoff,
                                      config.num_radial, getattr(config, "envelope_p", 6))

    def config_dict(self) -> Dict:
        """JSON-able hyperparameters; ``type(self).Config(**d)`` rebuilds ``self.config``."""
        import dataclasses

        d = dataclasses.asdict(self.config)
        d["species"] = list(d["species"])
        return d

    @torch.jit.unused
    def extra_repr(self) -> str:
        return f"species={list(self.config.species)}, cutoff={self.cutoff}"


def validate_config(config) -> None:
    """Common checks of a Config: species known and unique, cutoff positive, sizes positive."""
    import dataclasses

    object.__setattr__(config, "species", tuple(config.species))
    atomic_numbers(config.species)
    if not (isinstance(config.cutoff, (int, float)) and not isinstance(config.cutoff, bool)
            and math.isfinite(config.cutoff) and config.cutoff > 0):
        raise InvalidOptionError(f"cutoff={config.cutoff!r} must be a positive number of Å")
    object.__setattr__(config, "cutoff", float(config.cutoff))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in ("features", "num_interactions", "num_radial") and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise InvalidOptionError(f"{f.name}={value!r} must be a positive integer")
    if hasattr(config, "envelope"):
        check_choice("envelope", config.envelope, ENVELOPES)
    if hasattr(config, "radial_basis"):
        check_choice("radial_basis", config.radial_basis, RADIAL_BASES)
