"""Frame averaging (Puny et al. 2022; FAENet, Duval et al. 2023, Eq. 2-5): E(3) symmetry through
the data, for any registered architecture.

``FrameAveraging(model, mode)`` wraps an energy model (``forward(data) -> {"energies", ["forces"]}``,
see :mod:`eqcalc.keys`). Per system it builds a frame ``U`` ``(3, 3)`` (columns = principal axes),
expresses the geometry in that frame, runs the wrapped model once for every frame of the mode --
all frames stacked into ONE batched forward (edge indices offset per frame) -- and averages:

* per-atom energies: ``e_i = (1/K) sum_k e_i(X U_k)`` (invariant);
* direct forces, rotated back: ``F_i = (1/K) sum_k F_i(X U_k) U_k^T`` (equivariant).

Conservative forces and stress are then the exact autograd derivatives of this averaged energy
(through the frame too) taken by :class:`eqcalc.derivatives.ForceStressModel`.

Modes (``frame_averaging=`` of :func:`potentials.build`):

``"full"``        the 8 sign combinations ``U diag(±1, ±1, ±1)``: invariant under E(3) (rotations,
                  reflections, translations).
``"se3"``         the 4 of them with ``det = +1``: invariant under SE(3) (rotations), not reflections.
``"2d"``          slabs with a fixed z axis (adsorbate above the surface): PCA of the in-plane
                  (x, y) components only, z kept; 4 frames ``diag(±1, ±1, 1)``: invariant under
                  rotations about z and vertical mirror planes (and translations), not general O(3).
``"stochastic"``  training (``model.train()``): ONE of the 8 full frames per system, drawn afresh at
                  every forward (SFA, paper Eq. 5), treated as data (no gradient through the PCA,
                  as in the paper's pre-processing): ``potentials.train`` sets the draw from its
                  own seeded generator (:meth:`FrameAveraging.choose_frames`); without a draw the
                  global torch RNG is used, like dropout. Evaluation (``model.eval()``, every
                  calculator and compiled form): the "full" average, so inference is deterministic,
                  exactly E(3)-invariant and conservative.
``"none"``        no wrapper (``wrap`` returns the model itself).

The geometry a frame sees: pair vectors ``r_ij U`` (the cell is transformed with the positions,
``cell U``, while the integer cell shifts stay as they are, so ``r_ij = x_j - x_i + S cell`` maps to
``r_ij U``: paper Eq. 4), centred positions ``(x - c) U`` and ``cell U``.

Where the frame comes from (``source``):

``"edges"`` (default) the envelope-weighted second moment of the pair vectors within the cutoff,
    ``C = sum_e w_e r_e r_e^T / sum_e w_e``. For an isolated system with an infinite cutoff this is
    exactly the paper's PCA of centred positions (``sum_ij (x_j - x_i)(x_j - x_i)^T =
    2N sum_i (x_i - c)(x_i - c)^T``); restricted to the cutoff it is also defined for periodic
    systems: unchanged when atoms are wrapped into the cell, identical for a supercell (so the
    energy stays extensive), translation-invariant, and continuous when pairs cross the cutoff.
``"positions"`` the paper's Eq. 2 literally: covariance of the centred positions of each system.
    For periodic systems it changes when an atom is wrapped across the cell and for a supercell
    (both measured in tests/test_frames.py): use it for molecules only.

Eigenvectors: a fixed number of cyclic Jacobi sweeps in plain tensor ops, in float64 whatever the
model dtype (deterministic, differentiable, TorchScript- and AOTInductor-exportable; no
``torch.linalg.eigh``). Columns are sorted by descending eigenvalue (ties: stable order).

Sign rule: none is needed. Every averaged mode contains all sign combinations of the axes, so the
sign the solver returns for an eigenvector never matters (se3 fixes ``det = +1`` by flipping the
third axis with ``det U``).

Degeneracy rule (CH4, benzene, perfect cubic crystals: equal eigenvalues, the principal axes are not
defined): a Jacobi rotation in the (p, q) plane is skipped (angle 0, zero gradient) when the 2x2
block it would diagonalise has ``sqrt((a_qq - a_pp)^2 + 4 a_pq^2) <= degeneracy_tol * trace``
(``degeneracy_tol = 1e-9``). Inside a degenerate eigenspace the frame is therefore whatever the
input axes give (the lab axes for an exactly isotropic ``C``): deterministic, never NaN, with
bounded derivatives -- but no longer rotation-equivariant, so there the averaged energy is only as
invariant as the wrapped model is by itself. Near-degenerate but distinct eigenvalues are
resolved exactly; there the frame (and the conservative forces, through ``dU/dx ~ 1/gap``) are
sensitive, and where two eigenvalues cross (e.g. in MD) the sorted axes swap, which makes the
frame-averaged energy jump by the wrapped model's own non-invariance. tests/test_frames.py and
benchmarks/faenet_compare.py measure both effects.

Locality: the frame depends on every pair of a system, so a frame-averaged potential is not
strictly local (a displacement changes the energy of far atoms through the frame); isolated
fragments in one system are not exactly additive.
"""
from __future__ import annotations

import itertools
from typing import Dict, List, Optional

import torch
from torch import Tensor

from eqcalc import keys
from eqcalc.errors import InvalidOptionError, check_choice

MODES = ("full", "se3", "2d", "stochastic", "none")
SOURCES = ("edges", "positions")

#: sign vectors of the frames of each averaged mode (applied to the columns of U)
_FULL = [list(s) for s in itertools.product((1.0, -1.0), repeat=3)]
_SE3 = [s for s in _FULL if s[0] * s[1] * s[2] > 0]
_2D = [[a, b, 1.0] for a, b in itertools.product((1.0, -1.0), repeat=2)]
SIGNS = {"full": _FULL, "se3": _SE3, "2d": _2D, "stochastic": _FULL}


# ---- eigenvectors ------------------------------------------------------------------------------
def jacobi_eigh(a: Tensor, sweeps: int = 8, degeneracy_tol: float = 1e-9):
    """Eigen-decomposition of symmetric ``a`` ``(B, 3, 3)`` by cyclic Jacobi rotations.

    Returns ``(eigenvalues (B, 3), eigenvectors (B, 3, 3))`` with eigenvectors as columns, sorted by
    descending eigenvalue. Rotations whose 2x2 block is degenerate to ``degeneracy_tol * trace`` are
    skipped (module docstring: degeneracy rule). 8 sweeps reach float64 round-off for 3x3.
    """
    b = a.shape[0]
    v = torch.eye(3, dtype=a.dtype, device=a.device).expand(b, 3, 3)
    scale = torch.diagonal(a, dim1=1, dim2=2).abs().sum(1).clamp_min(1e-30)
    threshold = (degeneracy_tol * scale) ** 2
    eye = torch.eye(3, dtype=a.dtype, device=a.device)
    for _ in range(sweeps):
        for p, q in ((0, 1), (0, 2), (1, 2)):
            app, aqq, apq = a[:, p, p], a[:, q, q], a[:, p, q]
            d = aqq - app
            sign = torch.where(d >= 0, torch.ones_like(d), -torch.ones_like(d))
            y, x = 2.0 * apq * sign, d.abs()
            ok = x * x + y * y > threshold
            # Substitute (1, 0) where skipped: atan2's gradient at (0, 0) is NaN even if unused.
            theta = torch.where(ok, 0.5 * torch.atan2(torch.where(ok, y, torch.zeros_like(y)),
                                                      torch.where(ok, x, torch.ones_like(x))),
                                torch.zeros_like(x))  # |theta| <= pi/4: the small rotation
            c, s = torch.cos(theta), torch.sin(theta)
            g = eye.repeat(b, 1, 1)
            g[:, p, p] = c
            g[:, q, q] = c
            g[:, p, q] = s
            g[:, q, p] = -s
            a = g.transpose(1, 2) @ a @ g
            v = v @ g
    values = torch.diagonal(a, dim1=1, dim2=2)
    order = torch.sort(values, dim=1, descending=True, stable=True)[1]
    values = torch.gather(values, 1, order)
    vectors = torch.gather(v, 2, order.unsqueeze(1).expand(b, 3, 3))
    return values, vectors


def _scatter_add(src: Tensor, index: Tensor, size: int) -> Tensor:
    shape = list(src.shape)
    shape[0] = size
    return torch.zeros(shape, dtype=src.dtype, device=src.device).index_add(0, index, src)


def second_moment(data: Dict[str, Tensor], source: str, cutoff: float) -> Tensor:
    """The symmetric ``(n_systems, 3, 3)`` float64 tensor whose eigenvectors are the frame axes
    (``cutoff`` Å: the polynomial envelope that weights the pairs)."""
    n_systems = data[keys.CELL].shape[0]
    system = data[keys.SYSTEM]
    if source == "positions":
        x = data[keys.POSITIONS].to(torch.float64)
        count = _scatter_add(torch.ones_like(x[:, 0]), system, n_systems).clamp_min(1.0)
        centred = x - (_scatter_add(x, system, n_systems) / count.unsqueeze(1))[system]
        outer = centred.unsqueeze(2) * centred.unsqueeze(1)
        return _scatter_add(outer, system, n_systems) / count.view(-1, 1, 1)
    r = data[keys.EDGE_VECTORS].to(torch.float64)
    x = torch.sqrt((r * r).sum(1).clamp_min(1e-24)) / cutoff
    # DimeNet polynomial envelope (p = 6): a pair's weight goes smoothly to 0 at the cutoff.
    x6 = x ** 6
    w = torch.where(x < 1.0, 1.0 - 28.0 * x6 + 48.0 * x6 * x - 21.0 * x6 * x * x, torch.zeros_like(x))
    edge_system = system[data[keys.EDGE_INDEX][0]]
    outer = (w.view(-1, 1, 1) * r.unsqueeze(2)) * r.unsqueeze(1)
    total = _scatter_add(w, edge_system, n_systems).clamp_min(1e-30)
    return _scatter_add(outer, edge_system, n_systems) / total.view(-1, 1, 1)


def principal_axes(moment: Tensor, mode: str, degeneracy_tol: float = 1e-9) -> Tensor:
    """Frame ``U`` ``(n_systems, 3, 3)`` (columns = axes) of second moments ``(n_systems, 3, 3)``.

    ``"2d"``: z stays the third axis; the in-plane axes come from the (x, y) block only.
    """
    if mode == "2d":
        zero = torch.zeros_like(moment[:, 0, 0])
        inplane = moment.clone()
        inplane[:, 0, 2] = zero
        inplane[:, 2, 0] = zero
        inplane[:, 1, 2] = zero
        inplane[:, 2, 1] = zero
        # Below every in-plane eigenvalue (those are >= 0): z sorts last and is never rotated.
        inplane[:, 2, 2] = -1.0 - moment[:, 0, 0].abs() - moment[:, 1, 1].abs()
        moment = inplane
    return jacobi_eigh(moment, degeneracy_tol=degeneracy_tol)[1]


# ---- the wrapper --------------------------------------------------------------------------------
class FrameAveraging(torch.nn.Module):
    """Frame-averaged energy model (module docstring). ``forward(data)`` like the wrapped model.

    Delegates ``architecture``, ``config``, ``config_dict()`` and ``cutoff`` to the wrapped model,
    so :func:`potentials.save` stores the same hyperparameters plus ``frame_averaging`` (and
    ``frame_source`` when not the default) in the metadata.
    """

    __jit_ignored_attributes__ = ["config"]
    #: No Hessian: the energy switches frames where eigenvalues of the frame's second moment
    #: cross (cubic and other symmetric cells), so it is not twice differentiable there.
    smooth = False
    not_smooth_because = (
        "frame averaging switches frames where eigenvalues of the pair-vector second moment "
        "cross (symmetric cells, degenerate sites), so the energy is not twice differentiable there")

    def __init__(self, model: torch.nn.Module, mode: str = "full", source: str = "edges",
                 degeneracy_tol: float = 1e-9):
        super().__init__()
        check_choice("frame_averaging", mode, MODES[:-1])
        check_choice("frame_source", source, SOURCES)
        self.model = model
        self.frame_averaging = mode
        self.frame_source = source
        self.degeneracy_tol = float(degeneracy_tol)
        self.architecture = model.architecture
        self.config = model.config
        self.cutoff = float(model.cutoff)
        self.stochastic = mode == "stochastic"
        self.source = source
        self.axes_mode = mode
        dtype = next(model.parameters()).dtype
        self.register_buffer("signs", torch.tensor(SIGNS[mode], dtype=torch.float64), persistent=False)
        # The SFA draw for the next training forward: (n_systems,) indices into ``signs``.
        self.register_buffer("frame_choice", torch.zeros(0, dtype=torch.int64), persistent=False)
        self.register_buffer("dtype_probe", torch.zeros(0, dtype=dtype), persistent=False)

    def config_dict(self) -> Dict:
        return self.model.config_dict()

    @torch.jit.unused
    def choose_frames(self, n_systems: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """Draw the stochastic frame of each system for the next training forward (one of the 8
        sign combinations, uniformly), from ``generator``; returns the draw ``(n_systems,)``."""
        choice = torch.randint(0, len(SIGNS["full"]), (n_systems,), generator=generator)
        self.frame_choice = choice.to(self.signs.device)
        return choice

    def frames(self, data: Dict[str, Tensor]) -> Tensor:
        """The frames ``(n_systems, K, 3, 3)`` float64 this forward averages over."""
        moment = second_moment(data, self.source, self.cutoff)
        u = principal_axes(moment, self.axes_mode, self.degeneracy_tol)
        n_systems = u.shape[0]
        if self.axes_mode == "se3":
            det = torch.linalg.cross(u[:, :, 0], u[:, :, 1], dim=-1).mul(u[:, :, 2]).sum(-1)
            flip = torch.where(det < 0, -torch.ones_like(det), torch.ones_like(det))
            u = torch.cat([u[:, :, :2], u[:, :, 2:] * flip.view(-1, 1, 1)], 2)
        table = self.signs.to(torch.float64)  # a model-wide .to(float32) must not round the signs
        if self.stochastic and self.training:
            choice = self.frame_choice
            if choice.shape[0] != n_systems:  # no draw from the trainer: draw here, like dropout
                choice = torch.randint(0, self.signs.shape[0], (n_systems,), device=u.device)
            signs = table[choice].unsqueeze(1)                           # (n_systems, 1, 3)
            # The drawn frame is data, as in the paper (PCA is pre-processing): no gradient
            # through it. Through a single frame of a not-yet-invariant model, dE/dU dU/dx
            # (~ 1/eigenvalue gap) made training forces and stress explode (loss spikes ~1e5).
            u = u.detach()
        else:
            signs = table.unsqueeze(0).expand(n_systems, -1, -1)        # (n_systems, K, 3)
        return u.unsqueeze(1) * signs.unsqueeze(2)

    def forward(self, data: Dict[str, Tensor]) -> Dict[str, Tensor]:
        frames = self.frames(data)                                       # (S, K, 3, 3) float64
        k = frames.shape[1]
        dtype = self.dtype_probe.dtype
        system, edge_index = data[keys.SYSTEM], data[keys.EDGE_INDEX]
        n_atoms, n_systems = system.shape[0], frames.shape[0]
        # (E, K, 3): r_ij U_k, component c = sum_d r_d U[d, c]; then frames stacked: (K*E, 3).
        r = data[keys.EDGE_VECTORS].to(torch.float64)
        edge_frames = frames[system[edge_index[0]]]
        vectors = (r.view(-1, 1, 3, 1) * edge_frames).sum(2).transpose(0, 1).reshape(-1, 3)
        x = data[keys.POSITIONS].to(torch.float64)
        count = _scatter_add(torch.ones_like(x[:, 0]), system, n_systems).clamp_min(1.0)
        centred = x - (_scatter_add(x, system, n_systems) / count.unsqueeze(1))[system]
        atom_frames = frames[system]                                     # (N, K, 3, 3)
        positions = (centred.view(-1, 1, 3, 1) * atom_frames).sum(2).transpose(0, 1).reshape(-1, 3)
        cell = (data[keys.CELL].to(torch.float64).unsqueeze(1) @ frames).transpose(0, 1).reshape(-1, 3, 3)
        offsets = torch.arange(k, device=system.device, dtype=system.dtype)
        stacked: Dict[str, Tensor] = {
            keys.EDGE_VECTORS: vectors.to(dtype),
            keys.POSITIONS: positions.to(dtype),
            keys.CELL: cell.to(dtype),
            keys.SPECIES: data[keys.SPECIES].repeat(k),
            keys.SYSTEM: (system.unsqueeze(0) + n_systems * offsets.unsqueeze(1)).reshape(-1),
            # Row by row, not reshape(2, -1) or unbind: in a symbolic trace of a 2-system probe the
            # size 2 of edge_index and n_systems share one symbol, which those would pin to 2.
            keys.EDGE_INDEX: torch.stack([(edge_index[0].unsqueeze(0) + n_atoms * offsets.unsqueeze(1)).reshape(-1),
                                          (edge_index[1].unsqueeze(0) + n_atoms * offsets.unsqueeze(1)).reshape(-1)]),
        }
        out = self.model(stacked)
        result: Dict[str, Tensor] = {keys.ENERGIES: out[keys.ENERGIES].view(k, n_atoms).mean(0)}
        if keys.FORCES in out:
            f = out[keys.FORCES].view(k, n_atoms, 3).transpose(0, 1).to(torch.float64)  # (N, K, 3)
            # Back to the input axes: F = F' U^T, i.e. F_d = sum_c F'_c U[d, c]; then mean over frames.
            back = (f.unsqueeze(2) * atom_frames).sum(3).mean(1)
            result[keys.FORCES] = back.to(out[keys.FORCES].dtype)
        return result

    @torch.jit.unused
    def extra_repr(self) -> str:
        return f"frame_averaging={self.frame_averaging!r}, source={self.frame_source!r}"


def wrap(model: torch.nn.Module, mode: str = "none", source: str = "edges") -> torch.nn.Module:
    """``model`` itself for ``mode="none"``, else ``FrameAveraging(model, mode, source)``."""
    check_choice("frame_averaging", mode, MODES)
    check_choice("frame_source", source, SOURCES)
    if mode == "none":
        if source != "edges":
            raise InvalidOptionError(f"frame_source={source!r} needs frame averaging; "
                                     "set frame_averaging to one of " + ", ".join(MODES[:-1]))
        return model
    return FrameAveraging(model, mode, source)


def frame_choices(models: List[torch.nn.Module]) -> List[FrameAveraging]:
    """The stochastic frame-averaging wrappers among ``models`` (and their submodules)."""
    return [m for model in models for m in model.modules()
            if isinstance(m, FrameAveraging) and m.stochastic]
