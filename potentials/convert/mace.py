"""mace-torch ``.model`` files → eqcalc's MACE, with the same numbers.

A ``.model`` is ``torch.save`` of the whole mace-torch module. It is read by
:mod:`potentials.convert.torch_pickle` with the allow-list below (mace, e3nn and torch.nn
classes as inert records; nothing is imported or run), and every number is mapped onto eqcalc's
one MACE implementation (:mod:`potentials.mace`), configured to compute what mace-torch
computes:

* species in the file's ``atomic_numbers`` order (the one-hot order of the file);
* edge vectors: mace's point from neighbour to centre, eqcalc's from centre to neighbour, so
  harmonics of odd degree change sign: folded into the radial weights of those paths;
* e3nn's harmonics basis and 3j signs (:mod:`potentials.convert.e3nn`): each tensor-product path
  gets the sign relating e3nn's coupling to eqcalc's, folded into its radial weights;
* path weights of e3nn ``Linear``/tensor products, ``1/sqrt(fan_in)`` of e3nn's
  ``FullyConnectedNet`` and the normalised SiLU constant are folded into the weights;
* the symmetric contraction: the file's own coupling tensors (``U_matrix_nu``, which depend
  on how and in which dtype the file was built) are rotated into eqcalc's basis and expressed
  in eqcalc's coupling basis by least squares (refused unless the fit is exact to rounding),
  which maps mace's product weights onto eqcalc's;
* energies: ``E_i = E0[z_i] + scale * (ZBL_i + sum of readouts_i) + shift`` (ScaleShiftMACE;
  plain MACE: scale 1, shift 0): eqcalc's per-species scale/shift holds ``scale`` and
  ``shift + E0``. Multi-head files: one head's readout columns, E0, scale and shift.

Blocks not covered (other interaction classes, cuequivariance layouts, odd-parity hidden
features, embeddings of charges/spins, ...) are refused with :class:`UnsupportedModelError`
naming the block and the way out. Every tensor of the file is either mapped or known to carry
nothing (masks, empty biases, derived buffers); anything else is refused too.
"""
from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple

import numpy as np
import torch

from eqcalc.errors import ModelFileError, UnsupportedModelError
from potentials import o3
from potentials.convert import e3nn
from potentials.convert.torch_pickle import Allow, Record, TorchArchive, require_filled, walk

log = logging.getLogger("eqcalc.convert")

CUEQ_HINT = ("this file is in cuequivariance layout; convert it back to e3nn layout with "
             "mace-torch's own tool (`python -m mace.cli.convert_cueq_e3nn FILE.model`, i.e. "
             "mace_cueq_to_e3nn) and convert the result")
INTERACTIONS = {  # mace-torch class → (residual, normalization)
    "RealAgnosticResidualInteractionBlock": (True, "average"),
    "RealAgnosticInteractionBlock": (False, "average"),
    "RealAgnosticDensityResidualInteractionBlock": (True, "density"),
    "RealAgnosticDensityInteractionBlock": (False, "density"),
}
TRANSFORMS = {"AgnesiTransform": "agnesi", "SoftTransform": "soft"}

ALLOW = Allow(
    records=[
        *(f"mace.modules.models.{n}" for n in ("MACE", "ScaleShiftMACE")),
        *(f"mace.modules.blocks.{n}" for n in (
            "LinearNodeEmbeddingBlock", "LinearReadoutBlock", "NonLinearReadoutBlock",
            "AtomicEnergiesBlock", "RadialEmbeddingBlock", "EquivariantProductBasisBlock",
            "ScaleShiftBlock", *INTERACTIONS)),
        *(f"mace.modules.radial.{n}" for n in (
            "BesselBasis", "PolynomialCutoff", "ZBLBasis", "AgnesiTransform", "SoftTransform")),
        "mace.modules.irreps_tools.reshape_irreps",
        # accelerator settings recorded with the model: accepted when switched off (checked)
        "mace.modules.wrapper_ops.CuEquivarianceConfig", "mace.modules.wrapper_ops.OEQConfig",
        "mace.modules.symmetric_contraction.SymmetricContraction",
        "mace.modules.symmetric_contraction.Contraction",
        "e3nn.o3._irreps.Irreps", "e3nn.o3._irreps.Irrep", "e3nn.o3._irreps._MulIr",
        "e3nn.o3._linear.Linear", "e3nn.o3._linear.Instruction",
        "e3nn.o3._tensor_product._tensor_product.TensorProduct",
        "e3nn.o3._tensor_product._sub.FullyConnectedTensorProduct",
        "e3nn.o3._tensor_product._instruction.Instruction",
        "e3nn.o3._spherical_harmonics.SphericalHarmonics",
        "e3nn.nn._fc.FullyConnectedNet", "e3nn.nn._fc._Layer", "e3nn.nn._activation.Activation",
        "e3nn.math._normalize_activation.normalize2mom",
        "torch.nn.modules.container.ModuleList", "torch.nn.modules.container.ParameterList",
        "torch.nn.modules.container.Sequential",
        # opt_einsum graphs of mace's contractions: kept as inert records, never rebuilt (mace
        # and torch.fx would execute their stored Python source).
        "torch.fx.graph_module.reduce_graph_module", "torch.fx._symbolic_trace.Tracer",
    ],
    functions=["torch.nn.functional.silu"],
    hints={
        "cuequivariance": CUEQ_HINT,
        "mace.modules": "this mace-torch block is not supported by the converter (supported: "
                        "MACE and ScaleShiftMACE with RealAgnostic[Density][Residual]InteractionBlock)",
        "mace.": "this file holds more than a MACE model (e.g. a training checkpoint or a "
                 "LAMMPS/compiled wrapper); save the model itself with torch.save(model, path)",
        "torch.jit": "this is a TorchScript file; convert the .model file mace-torch wrote instead",
        "__torch__": "this is a TorchScript (compiled, e.g. LAMMPS) model; convert the .model file "
                     "mace-torch wrote instead",
    },
)

# Tensors of the file that carry no information beyond the config (or are empty by design).
# (_w3j_* buffers are e3nn's Wigner 3j symbols: recomputed, see potentials.convert.e3nn.)
DERIVED = ("output_mask", "weights_0_zeroed", "weights_1_zeroed", "weights_2_zeroed", "weights_max_zeroed",
           "num_interactions")


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


class Reader:
    """Walks the records of one mace-torch model and fills an eqcalc MACE's state dict."""

    def __init__(self, root: Record, path: str, head: Optional[str]):
        self.root, self.path = root, path
        self.used: Set[int] = set()  # ids of the file's tensors that were mapped
        self.dtype = torch.float64    # of the file's weights (set by read)
        self.check_supported()
        self.heads = [str(h) for h in (root.attr("heads") or ["Default"])]
        self.head = self.choose_head(head)
        self.h = self.heads.index(self.head)

    # ---- what the file is ----------------------------------------------------------------
    def refuse(self, what: str, fix: str = "") -> None:
        raise UnsupportedModelError(f"{self.path!r}: {what}; {fix or 'this variant cannot be converted exactly'}")

    def check_supported(self) -> None:
        root = self.root
        if root.name not in ("MACE", "ScaleShiftMACE"):
            self.refuse(f"model class {root.kind}", "only MACE and ScaleShiftMACE energy models are supported")
        for path, module in walk(root):
            cueq = module.attr("cueq_config")
            if cueq is not None and not (isinstance(cueq, Record) and not (cueq.attr("enabled") or False)):
                self.refuse(f"block {path or '<root>'} is in cuequivariance layout", CUEQ_HINT)
            oeq = module.attr("oeq_config")
            if oeq is not None and not (isinstance(oeq, Record) and not (oeq.attr("enabled") or False)):
                self.refuse(f"block {path} uses openequivariance kernels",
                            "convert the model back to e3nn with mace-torch before converting")
        flags = {"use_so3": "SO(3) (parity-free) harmonics", "use_last_readout_only": "a last-layer-only readout",
                 "lammps_mliap": "a LAMMPS ML-IAP wrapper"}
        for flag, what in flags.items():
            if root.attr(flag):
                self.refuse(f"{flag}=True ({what})")
        if root.attr("apply_cutoff", True) is not True:
            self.refuse("apply_cutoff=False (envelope applied after the radial MLP)")
        for name in ("joint_embedding", "embedding_readout"):
            if root.has(name):
                self.refuse(f"block {name} (embeddings of charge, spin or other system features)")

    def choose_head(self, head: Optional[str]) -> str:
        if head is not None:
            if head not in self.heads:
                raise UnsupportedModelError(
                    f"{self.path!r} has no head {head!r}; choose one of {self.heads} with --head")
            return head
        if len(self.heads) == 1:
            return self.heads[0]
        default = [h for h in self.heads if h.lower() == "default"]
        if not default:
            raise UnsupportedModelError(
                f"{self.path!r} has {len(self.heads)} heads {self.heads} and none is 'default'; "
                "choose one with --head NAME (potentials.convert(..., head=NAME))")
        return default[0]

    def tensor(self, module: Record, key: str) -> torch.Tensor:
        t = module.tensor(key)
        self.used.add(id(t))
        return t

    def value(self, module: Record, key: str) -> float:
        return float(self.tensor(module, key).reshape(-1)[0])

    # ---- config --------------------------------------------------------------------------
    def config(self) -> Dict[str, Any]:
        root = self.root
        zs = [int(z) for z in self.tensor(root, "atomic_numbers").tolist()]
        from ase.data import chemical_symbols

        species = [chemical_symbols[z] for z in zs]
        cutoff = self.value(root, "r_max")
        radial = root.child("radial_embedding")
        bessel = radial.child("bessel_fn")
        if bessel.name != "BesselBasis":
            self.refuse(f"radial basis {bessel.kind}", "only the Bessel basis is supported")
        num_radial = self.tensor(bessel, "bessel_weights").numel()
        p = int(self.value(radial.child("cutoff_fn"), "p"))
        transform = "none"
        if radial.has("distance_transform"):
            transform = TRANSFORMS.get(radial.child("distance_transform").name)
            if transform is None:
                self.refuse(f"distance transform {radial.child('distance_transform').kind}")
        sh = [l for _, l, _ in e3nn.parse_irreps(root.child("spherical_harmonics").attr("irreps_out"))]
        max_ell = max(sh)
        if sh != list(range(max_ell + 1)) or max_ell > o3.LMAX:
            self.refuse(f"spherical harmonics of degrees {sh}", f"degrees 0..L with L <= {o3.LMAX} are supported")
        interactions = list(root.child("interactions").modules.values())
        if len(interactions) < 2:
            self.refuse(f"{len(interactions)} interaction", "mace-torch models with at least 2 interactions are supported")
        kinds = [INTERACTIONS.get(b.name) for b in interactions]
        for b, kind in zip(interactions, kinds):
            if kind is None:
                self.refuse(f"interaction block {b.kind}",
                            f"supported blocks: {', '.join(INTERACTIONS)}")
        if any(not residual for residual, _ in kinds[1:]):
            self.refuse("a non-residual interaction after the first one")
        if len({norm for _, norm in kinds}) != 1:
            self.refuse("density-normalised and average-normalised interactions mixed in one model")
        hidden = e3nn.parse_irreps(interactions[0].attr("hidden_irreps"))
        channels = hidden[0][0]
        natural = [(channels, l, (-1) ** l) for l in range(len(hidden))]
        if hidden != natural:
            self.refuse(f"hidden irreps {e3nn.irreps_str(hidden)}",
                        "supported: equal multiplicities of 0e, 1o, 2e, ... (natural parity)")
        radial_mlp = list(interactions[0].attr("radial_MLP"))
        if len(set(radial_mlp)) != 1:
            self.refuse(f"radial MLP {radial_mlp}", "hidden layers of one width are supported")
        products = list(root.child("products").modules.values())
        outs = [e3nn.parse_irreps(p.child("linear").attr("irreps_out")) for p in products]
        if outs[-1] != [(channels, 0, 1)] or any(o != hidden for o in outs[:-1]):
            self.refuse(f"product outputs {[e3nn.irreps_str(o) for o in outs]}",
                        "supported: hidden irreps on every layer but the last, scalars on the last "
                        "(keep_last_layer_irreps=False)")
        correlations = {int(c.attr("correlation")) for prod in root.child("products").modules.values()
                        for c in prod.child("symmetric_contractions").child("contractions").modules.values()}
        if len(correlations) != 1:
            self.refuse(f"correlation orders {sorted(correlations)} per layer", "one correlation order is supported")
        readout = list(root.child("readouts").modules.values())[-1]
        if readout.name != "NonLinearReadoutBlock":
            self.refuse(f"last readout {readout.kind}")
        mlp = e3nn.parse_irreps(readout.attr("hidden_irreps"))
        acts = list(readout.child("non_linearity").child("acts").modules.values())
        if len(mlp) != 1 or mlp[0][1:] != (0, 1) or len(acts) != 1 or getattr(acts[0].attr("f"), "qualname", None) \
                != "torch.nn.functional.silu":
            self.refuse(f"readout MLP {e3nn.irreps_str(mlp)} with activation {acts}", "a SiLU-gated scalar MLP is supported")
        avg = [float(b.attr("avg_num_neighbors")) for b in interactions]
        if len(set(avg)) != 1:
            self.refuse(f"different avg_num_neighbors per layer {avg}")
        if root.attr("pair_repulsion"):
            zbl_p = int(self.value(root.child("pair_repulsion_fn"), "p"))
            if zbl_p != p:
                self.refuse(f"ZBL envelope order {zbl_p} differs from the radial envelope order {p}")
        return dict(
            species=species, cutoff=cutoff, channels=channels, max_ell=max_ell,
            hidden_l=max(l for _, l, _ in hidden), num_interactions=len(interactions),
            num_radial=num_radial, envelope_p=p, radial_mlp=radial_mlp[0], radial_depth=len(radial_mlp),
            avg_num_neighbors=avg[0], correlation=correlations.pop(),
            readout_hidden=mlp[0][0] // len(self.heads),
            first_interaction="residual" if kinds[0][0] else "plain", normalization=kinds[0][1],
            distance_transform=transform, pair_repulsion="zbl" if root.attr("pair_repulsion") else "none")

    # ---- weights -------------------------------------------------------------------------
    def linear(self, record: Record) -> List[Tuple[int, int, np.ndarray]]:
        self.tensor(record, "weight")
        if "bias" in record.tensors:
            self.used.add(id(record.tensors["bias"]))
        return e3nn.linear_blocks(record)

    def per_degree_linear(self, record: Record, c_in: int) -> np.ndarray:
        """An e3nn Linear between irreps with one block per degree → eqcalc ``o3.Linear``
        weights ``(L+1, c_in, c_out)`` (eqcalc multiplies by ``1/sqrt(c_in)`` itself)."""
        irreps_in = e3nn.parse_irreps(record.attr("irreps_in"))
        blocks = self.linear(record)
        out = np.zeros((len(blocks),) + blocks[0][2].shape)
        for i_in, i_out, w in blocks:
            l_in, l_out = irreps_in[i_in][1], e3nn.parse_irreps(record.attr("irreps_out"))[i_out][1]
            if l_in != l_out:
                self.refuse(f"linear {record.kind} mixes degree {l_in} into {l_out}")
            out[l_in] = w * np.sqrt(c_in)
        return out

    def species_tp(self, record: Record, n_species: int, lmax: int) -> List[np.ndarray]:
        """mace's ``skip_tp`` (features ⊗ one-hot species, 'uvw') → eqcalc ``SpeciesLinear``
        weights per degree ``(n_species * c_in, c_out)``, row ``species * c_in + channel``."""
        self.tensor(record, "weight")
        flat = _np(record.tensor("weight")).reshape(-1)
        irreps1 = e3nn.parse_irreps(record.attr("irreps_in1"))
        irreps_out = e3nn.parse_irreps(record.attr("irreps_out"))
        out: List[Optional[np.ndarray]] = [None] * (lmax + 1)
        start = 0
        for i1, i2, i_out, mode, has_weight, path_weight, shape in e3nn.instructions(record):
            n = int(np.prod(shape))
            w = flat[start:start + n].reshape(shape)  # (c_in, n_species, c_out)
            start += n
            l, l_out = irreps1[i1][1], irreps_out[i_out][1]
            if mode != "uvw" or l != l_out or shape[1] != n_species or l > lmax:
                self.refuse(f"self-connection path {irreps1[i1]} -> {irreps_out[i_out]} ({mode})")
            # e3nn: path_weight * (3j of l x 0 -> l = identity / sqrt(2l+1)), same sign in any basis
            out[l] = (np.transpose(w, (1, 0, 2)).reshape(n_species * shape[0], shape[2])
                      * float(path_weight) / np.sqrt(2 * l + 1))
        if any(o is None for o in out):
            self.refuse(f"self-connection {record.kind} lacks a degree (has {[o is not None for o in out]})")
        return out

    def radial_mlp(self, record: Record) -> List[np.ndarray]:
        """e3nn ``FullyConnectedNet`` → eqcalc ``nn.Linear`` weights ``(out, in)``: the
        ``1/sqrt(fan_in)`` and the previous layer's activation constant folded in."""
        layers = [m for m in record.modules.values()]
        out, gain = [], 1.0
        for layer in layers:
            w = _np(self.tensor(layer, "weight"))
            if float(layer.attr("var_in", 1)) != 1.0 or float(layer.attr("var_out", 1)) != 1.0:
                self.refuse(f"radial network layer with variance scaling {layer.attr('var_in')}, {layer.attr('var_out')}")
            out.append((w * gain / np.sqrt(w.shape[0])).T)
            act = layer.modules.get("act")
            if isinstance(act, Record):
                if getattr(act.attr("f"), "qualname", None) != "torch.nn.functional.silu":
                    self.refuse(f"radial activation {act.attr('f')}", "SiLU is supported")
                gain = e3nn.normalize2mom_constant(act)
            else:
                gain = 1.0
        return out

    def layer(self, k: int, model, config: Dict[str, Any], state: Dict[str, torch.Tensor]) -> None:
        root, c = self.root, config["channels"]
        block = root.child("interactions").child(str(k))
        product = root.child("products").child(str(k))
        ours = model.layers[k]
        prefix = f"layers.{k}."
        n_species = len(config["species"])
        l_sh = config["max_ell"]

        def put(name: str, value: np.ndarray) -> None:
            target = state[prefix + name]
            if tuple(target.shape) != tuple(value.shape):
                raise ModelFileError(f"{self.path!r}: {prefix + name} has shape {tuple(value.shape)}, "
                                     f"expected {tuple(target.shape)}")
            state[prefix + name] = torch.as_tensor(value, dtype=target.dtype)

        put("linear_up.weight", self.per_degree_linear(block.child("linear_up"), c))
        # Tensor product: mace instruction j → eqcalc path (l1, l2, l3); factor per path.
        tp = block.child("conv_tp")
        irreps1 = e3nn.parse_irreps(tp.attr("irreps_in1"))
        irreps2 = e3nn.parse_irreps(tp.attr("irreps_in2"))
        irreps_mid = e3nn.parse_irreps(tp.attr("irreps_out"))
        slot_path: Dict[int, int] = {}
        mlp = self.radial_mlp(block.child("conv_tp_weights"))
        last = mlp[-1]  # (n_instructions * c, width)
        new_last = np.zeros_like(last)
        start = 0
        paths = ours.tp.paths
        for i1, i2, i_out, mode, has_weight, path_weight, shape in e3nn.instructions(tp):
            l1, l2, l3 = irreps1[i1][1], irreps2[i2][1], irreps_mid[i_out][1]
            if mode != "uvu" or not has_weight or tuple(shape) != (c, 1):
                self.refuse(f"tensor-product instruction {mode} {shape}")
            if (l1, l2, l3) not in paths:
                self.refuse(f"tensor-product path {l1} x {l2} -> {l3}")
            p = paths.index((l1, l2, l3))
            # e3nn: path_weight * w3j; eqcalc: sqrt(2 l3 + 1) * CG. Edge direction: (-1)^l2.
            factor = float(path_weight) / np.sqrt(2 * l3 + 1) * e3nn.coupling_sign(l1, l2, l3) * (-1) ** l2
            new_last[p * c:(p + 1) * c] = last[start:start + c] * factor
            slot_path[i_out] = p
            start += c
        if start != last.shape[0] or len(slot_path) != len(paths):
            self.refuse(f"tensor product with {len(slot_path)} paths, eqcalc has {len(paths)}")
        mlp[-1] = new_last
        linears = [i for i, m in enumerate(ours.radial) if isinstance(m, torch.nn.Linear)]
        if len(linears) != len(mlp):
            self.refuse(f"radial network of {len(mlp)} layers, config has {len(linears)}")
        for i, w in zip(linears, mlp):
            put(f"radial.{i}.weight", w)
        # Linear after the messages: per output degree, rows in eqcalc's path order.
        rows: Dict[int, np.ndarray] = {}
        for i_in, i_out, w in self.linear(block.child("linear")):
            rows[slot_path[i_in]] = w
        for l, mix in enumerate(ours.linear.mixes):
            put(f"linear.mixes.{l}.weight", np.concatenate([rows[p] for p in mix.paths], axis=0))
        if config["normalization"] == "density":
            (w,) = self.radial_mlp(block.child("density_fn"))
            put("normalize.weight", w[0])
        residual = INTERACTIONS[block.name][0]
        skip = self.species_tp(block.child("skip_tp"), n_species,
                               ours.skip.lmax if residual else l_sh)
        for l, w in enumerate(skip):
            put(f"{'skip' if residual else 'species_mix.mix'}.mixes.{l}.weight", w)
        if bool(product.attr("use_sc")) != residual:
            self.refuse(f"product block {k} with use_sc={product.attr('use_sc')} after a "
                        f"{'residual' if residual else 'plain'} interaction")
        self.product(product, ours.product, prefix + "product.", state, n_species, l_sh)
        put("linear_out.weight", self.per_degree_linear(product.child("linear"), c))

    def product(self, record: Record, ours: o3.SymmetricContraction, prefix: str,
                state: Dict[str, torch.Tensor], n_species: int, l_A: int) -> None:
        """mace's symmetric contraction → eqcalc's: per output degree L and order nu, the
        file's coupling tensors ``U`` in eqcalc's basis, folded onto monomials, expressed in
        eqcalc's basis of the same space; mace's weights ``[species, K, c]`` mapped through."""
        contractions = list(record.child("symmetric_contractions").child("contractions").modules.values())
        targets = e3nn.parse_irreps(record.child("symmetric_contractions").attr("irreps_out"))
        coupling = [l for _, l, _ in e3nn.parse_irreps(record.child("symmetric_contractions").attr("irreps_in"))]
        if coupling != list(range(l_A + 1)):
            self.refuse(f"product basis over degrees {coupling}")
        agnostic = bool(record.attr("use_agnostic_product"))
        weights = {}
        for (_, L, _), contraction in zip(targets, contractions):
            nu_max = int(contraction.attr("correlation"))
            per_nu = {nu_max: self.tensor(contraction, "weights_max")}
            lower = contraction.child("weights").tensors
            for j in range(nu_max - 1):
                per_nu[nu_max - 1 - j] = lower[str(j)]
                self.used.add(id(lower[str(j)]))
            for nu, w in per_nu.items():
                U = _np(self.tensor(contraction, f"U_matrix_{nu}"))
                if L == 0:
                    U = U[None]
                coef = self.coupling_map(U, l_A, nu, L)           # (K, P)
                w = _np(w)                                          # (species or 1, K, c)
                if agnostic:
                    w = np.broadcast_to(w, (n_species,) + w.shape[1:])
                weights[(nu, L)] = np.einsum("zkc,kp->zpc", w, coef)
        for parity_index, term_index, nu, L, first, n in ours.layout:
            key = f"{prefix}parities.{parity_index}.terms.{term_index}.weight"
            target = state[key].clone()
            target[:, first:first + n] = torch.as_tensor(weights.pop((nu, L)), dtype=target.dtype)
            state[key] = target
        leftover = {k: float(np.abs(v).max()) for k, v in weights.items() if np.abs(v).max() > 0}
        if leftover:
            self.refuse(f"product weights for (nu, L) {sorted(leftover)} that eqcalc's basis does not have")

    def coupling_map(self, U: np.ndarray, l_A: int, nu: int, L: int) -> np.ndarray:
        """Coefficients ``(K, P)``: mace's coupling ``U[M, i_1..i_nu, k]`` (e3nn basis) equals
        ``sum_p coef[k, p] U_eqcalc[p]`` as polynomials of the atomic basis."""
        ls = [l for l in range(l_A + 1)]
        d = o3.dim(l_A)
        K = U.shape[-1]
        if U.shape != (2 * L + 1,) + (d,) * nu + (K,):
            self.refuse(f"coupling tensor of shape {U.shape} for L={L}, nu={nu}, degrees 0..{l_A}")
        U = e3nn.to_eqcalc(U, [[L]] + [ls] * nu)
        monos, basis = o3.symmetric_coupling(l_A, nu, L)  # (Q, nu), (P, 2L+1, Q)
        # Fold mace's tensors onto all sorted monomials (sum over index orders), then compare
        # on eqcalc's monomials; anything outside them must vanish.
        flat = U.reshape(2 * L + 1, d ** nu, K)
        index = {}
        for idx in np.ndindex(*(d,) * nu):
            index.setdefault(tuple(sorted(idx)), []).append(np.ravel_multi_index(idx, (d,) * nu))
        keys = list(index)
        folded = np.stack([flat[:, index[key], :].sum(axis=1) for key in keys], axis=1)  # (M, Qall, K)
        where = {key: q for q, key in enumerate(keys)}
        ours = np.zeros((basis.shape[0], 2 * L + 1, len(keys)))
        for q, mono in enumerate(monos.tolist()):
            ours[:, :, where[tuple(mono)]] = basis[:, :, q]
        A = ours.reshape(basis.shape[0], -1).T                 # (M*Qall, P)
        B = folded.reshape(-1, K)                              # (M*Qall, K)
        coef, *_ = np.linalg.lstsq(A, B, rcond=None)           # (P, K)
        residual = np.abs(A @ coef - B).max() if B.size else 0.0
        scale = max(np.abs(B).max() if B.size else 0.0, 1e-300)
        tolerance = 1e-5 if self.dtype == torch.float32 else 1e-9
        if residual > tolerance * scale:
            self.refuse(f"coupling tensors (L={L}, nu={nu}) outside eqcalc's basis (residual {residual / scale:.1e})")
        return coef.T

    def fill(self, model, config: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        root = self.root
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        state = dict(initial)
        n_species = len(config["species"])

        def put(name: str, value) -> None:
            target = state[name]
            value = torch.as_tensor(np.asarray(value), dtype=target.dtype).reshape(target.shape)
            state[name] = value

        node = root.child("node_embedding").child("linear")
        ((_, _, w),) = self.linear(node)  # (n_species, channels) times its path weight
        put("embedding.weight", w)
        radial = root.child("radial_embedding")
        bessel = radial.child("bessel_fn")
        put("radial.basis.frequencies", _np(self.tensor(bessel, "bessel_weights")))
        for module, key, ours in ((bessel, "prefactor", model.radial.basis.prefactor),
                                  (bessel, "r_max", config["cutoff"]),
                                  (radial.child("cutoff_fn"), "r_max", config["cutoff"])):
            if abs(self.value(module, key) - ours) > 1e-6 * abs(ours):
                self.refuse(f"{module.kind}.{key} = {self.value(module, key)} inconsistent with r_max")
        zs = model.species_z.tolist()
        if config["distance_transform"] != "none":
            transform = radial.child("distance_transform")
            for key in ("q", "p", "a", "alpha"):
                if key in transform.tensors:
                    put(f"distance_transform.{key}", _np(self.tensor(transform, key)))
            put("distance_transform.radii", _np(self.tensor(transform, "covalent_radii"))[zs])
        if config["pair_repulsion"] == "zbl":
            zbl = root.child("pair_repulsion_fn")
            for key in ("c", "a_exp", "a_prefactor"):
                put(f"pair_repulsion.{key}", _np(self.tensor(zbl, key)))
            put("pair_repulsion.radii", _np(self.tensor(zbl, "covalent_radii"))[zs])
        for k in range(config["num_interactions"]):
            self.layer(k, model, config, state)
        # Readouts: the chosen head's column; the last one an MLP on that head's hidden block.
        readouts = list(root.child("readouts").modules.values())
        for k, readout in enumerate(readouts[:-1]):
            ((_, _, w),) = self.linear(readout.child("linear"))   # (c, heads)
            put(f"layers.{k}.readout.weight", w[:, self.h])
            put(f"layers.{k}.readout.bias", 0.0)  # e3nn readouts have no bias
        last = readouts[-1]
        ((_, _, w1),) = self.linear(last.child("linear_1"))       # (c, heads * hidden)
        ((_, _, w2),) = self.linear(last.child("linear_2"))       # (heads * hidden, heads)
        hidden = config["readout_hidden"]
        block = slice(self.h * hidden, (self.h + 1) * hidden)
        gain = e3nn.normalize2mom_constant(last.child("non_linearity").child("acts").child("0"))
        L = config["num_interactions"] - 1
        put(f"layers.{L}.readout.hidden.weight", w1[:, block].T)
        put(f"layers.{L}.readout.hidden.bias", np.zeros(hidden))
        put(f"layers.{L}.readout.out.weight", w2[block, self.h] * gain)
        put(f"layers.{L}.readout.out.bias", 0.0)
        # Energies: E0 + scale * (pair + readouts) + shift, per species.
        e0 = np.atleast_2d(_np(self.tensor(root.child("atomic_energies_fn"), "atomic_energies")))
        if e0.shape != (len(self.heads), n_species):
            self.refuse(f"atomic energies of shape {e0.shape} for {len(self.heads)} heads and {n_species} species")
        scale, shift = 1.0, 0.0
        if root.name == "ScaleShiftMACE":
            block_ss = root.child("scale_shift")
            scale = float(np.atleast_1d(_np(self.tensor(block_ss, "scale")))[self.h])
            shift = float(np.atleast_1d(_np(self.tensor(block_ss, "shift")))[self.h])
        put("scale_shift.scale", np.full(n_species, scale))
        put("scale_shift.shift", shift + e0[self.h])
        self.check_all_used()
        require_filled(self.path, model, state, initial)
        return state

    def check_all_used(self) -> None:
        for path, module in walk(self.root):
            for key, t in module.tensors.items():
                if id(t) in self.used or key in DERIVED or key.startswith("_w3j_") or t.numel() == 0:
                    continue
                self.refuse(f"tensor {path}.{key} {tuple(t.shape)} has no place in eqcalc's MACE")


def mace_version(root: Record) -> str:
    """The mace-torch version recorded in the pickled module, if any ("unknown" otherwise)."""
    for key in ("__mace_version__", "mace_version", "__version__", "version"):
        value = root.attr(key)
        if isinstance(value, str):
            return value
    return "unknown"


def read(path: str | Path, head: Optional[str] = None, progress: bool = True):
    """Read a mace-torch ``.model`` file → ``(model, source_metadata)`` without running it."""
    import potentials

    path = str(path)
    start = time.perf_counter()
    with TorchArchive(path) as archive:
        root = archive.load(ALLOW)
    if not isinstance(root, Record):
        raise ModelFileError(f"{path!r} holds a {type(root).__name__}, not a mace-torch model "
                             "(a state_dict or a checkpoint?); convert the file torch.save(model) wrote")
    try:
        reader = Reader(root, path, head)
        config = reader.config()
        dtype = reader.tensor(root.child("node_embedding").child("linear"), "weight").dtype
        if dtype not in (torch.float32, torch.float64):
            reader.refuse(f"weights in {dtype}", "float32 and float64 files are supported")
        reader.dtype = dtype
        model = potentials.build("mace", dtype=str(dtype).replace("torch.", ""), **config)
        state = reader.fill(model, config)
        model.load_state_dict(state, strict=True)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, RuntimeError) as e:
        if isinstance(e, ModelFileError):
            raise
        # Records of allowed classes arranged in a way mace-torch never writes (or damaged).
        raise ModelFileError(f"{path!r} does not have the structure of a mace-torch model "
                             f"({type(e).__name__}: {e})") from e
    source = {
        "format": "mace-torch .model (torch.save of the module)",
        "file": Path(path).name,
        "sha256": sha256(path),
        "mace_version": mace_version(root),
        "model_class": root.name,
        "interaction_blocks": [b.name for b in root.child("interactions").modules.values()],
        "heads": reader.heads,
        "head": reader.head,
        "dtype": str(dtype).replace("torch.", ""),
        "n_parameters_source": int(sum(t.numel() for p, m in walk(root)
                                       for k, t in (m._dict().get("_parameters") or {}).items()
                                       if t is not None)),
        "conventions": {
            "edge_vector": "mace: centre minus neighbour; eqcalc: neighbour minus centre (odd-l "
                           "harmonics folded into the radial weights)",
            "harmonics": "e3nn 'component' basis (y polar) rotated onto eqcalc's",
            "wigner_3j": "e3nn 0.4.4 signs",
            "symmetric_contraction": "file's U matrices projected onto eqcalc's coupling basis",
            "energy": "E0 + scale * (ZBL + readouts) + shift" if root.name == "ScaleShiftMACE"
                      else "E0 + ZBL + readouts",
        },
        "conversion_seconds": round(time.perf_counter() - start, 3),
    }
    log.info("converted %s (%s, head %s, %d parameters) in %.1f s", path, root.name, reader.head,
             sum(p.numel() for p in model.parameters()), source["conversion_seconds"])
    return model, source
