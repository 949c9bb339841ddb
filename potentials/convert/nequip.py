"""nequip ``.nequip.zip`` packages → eqcalc's NequIP, with the same numbers.

A ``.nequip.zip`` is a ``torch.package``: the nequip and e3nn source it was built with, the
resolved hyperparameters as plain YAML (``<name>/model/config.yaml``), metadata
(``package_metadata.txt``) and the model as a pickle (``model/eager_model.pkl``) whose tensors
are ``.data/<key>.storage`` members. Loading it the normal way imports and runs the shipped
source. This converter reads the YAML with ``yaml.safe_load`` and the pickle with the restricted
reader of :mod:`potentials.convert.torch_pickle` (nequip, e3nn and torch.nn classes as inert
records; anything else refused, nothing imported or run), and maps every number onto eqcalc's one
NequIP (:mod:`potentials.nequip`) configured as nequip's ``NequIPGNNModel``:

* species in the file's ``type_names`` order; the type embedding is eqcalc's species embedding;
* nequip's Bessel basis ``sinc(n r / r_max) n`` times ``2 pi / r_max^2`` (its ``ApplyFactor``)
  is eqcalc's ``sqrt(2/r_max) sin(n pi r/r_max)/r`` times ``sqrt(2/r_max)``: folded into the
  first radial layer, as are the ``alpha`` scales of nequip's scalar MLPs;
* edge vectors point from centre to neighbour in both codes; e3nn's harmonics basis and 3j signs
  (:mod:`potentials.convert.e3nn`) and each path's stored weight are folded into the radial weights
  of that path; ``linear_2``'s input is the per-degree concatenation of the paths in nequip's
  enumeration order, remapped to eqcalc's path order;
* irreps are matched by (degree, parity): with ``parity: true`` eqcalc's layouts hold the same
  odd-parity blocks as nequip's layers (:func:`potentials.o3.reachable`), in eqcalc's block
  order; couplings use e3nn >= 0.5's 3j signs (``coupling_sign(..., "0.5")``), which differ from
  0.4.4's on some odd ``l1+l2+l3``; nequip's gate sets follow its Gate's ``irreps_gated`` order;
* ``per_edge_type_cutoff``: the model's own ``1/r_max`` table becomes ``edge_cutoffs``; the norm
  nonlinearity becomes ``gate="norm"``; per-irrep ``num_features`` become ``channels_per_degree``;
* the self-connection is e3nn's tensor product of the features with the type *embedding*
  (``node_attrs``): contracted with each species' embedding row it is a per-species linear map;
* ``E_i = scale[t_i] * readout(h_i) + shift[t_i]``.

Options eqcalc does not reproduce (see :data:`SUPPORTED`) are refused with
:class:`~eqcalc.errors.UnsupportedModelError` naming them; compiled ``.nequip.pt2``/``.pth`` files
are refused with the way out (convert the package).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from eqcalc.errors import EqcalcError, ModelFileError, UnsupportedModelError
from potentials import o3
from potentials.convert import e3nn
from potentials.convert.mace import sha256
from potentials.convert.torch_pickle import Allow, Record, TorchArchive, require_filled, walk
from potentials.nequip import NORMALIZED_SILU_GAIN, NORMALIZED_TANH_GAIN

log = logging.getLogger(__name__)

ALLOW = Allow(
    prefixes=("nequip.nn.", "e3nn.o3.", "e3nn.nn.", "e3nn.math.", "torch.nn.modules."),
    functions=("torch.nn.functional.silu", "torch.tanh", "torch.abs", "torch.float64", "torch.float32"),
    hints={"torch.fx": "the package holds a torch.fx graph (a compiled model); convert the eager package",
           "nequip.nn._tp_scatter_cueq": "the package was built with CuEquivariance kernels; "
                                         "package the checkpoint without them",
           "nequip.nn._tp_scatter_oeq": "the package was built with OpenEquivariance kernels; "
                                        "package the checkpoint without them"},
)

#: Model builders and hyperparameters this converter reproduces, with the values it accepts
#: (None: any value, mapped).
BUILDERS = ("nequip.model.NequIPGNNModel",)
SUPPORTED: Dict[str, Any] = {
    "_target_": None, "seed": None, "model_dtype": ("float64", "float32"), "type_names": None, "r_max": None,
    "num_layers": None, "l_max": (1, 2, 3), "parity": (False, True), "num_features": None,
    "type_embed_num_features": None, "radial_mlp_depth": None, "radial_mlp_width": None,
    "num_bessels": None, "bessel_trainable": (False,), "polynomial_cutoff_p": None,
    "avg_num_neighbors": None, "per_type_energy_scales": None, "per_type_energy_shifts": None,
    "per_type_energy_scales_trainable": None, "per_type_energy_shifts_trainable": None,
    "per_edge_type_cutoff": None, "pair_potential": None, "do_derivatives": (True,),
    "readout_mlp_hidden_layers_depth": (0, 1), "readout_mlp_hidden_layers_width": None,
    "readout_mlp_nonlinearity": None, "convnet_nonlinearity_type": ("gate", "norm"), "convnet_resnet": (False,),
    "convnet_sc": (True,), "learnable_shift": (False,), "categorical_graph_field_embed": (None,),
    "compile_mode": None,
}


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def _yaml(text: str) -> Dict[str, Any]:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ModelFileError(f"model/config.yaml of the package is not valid YAML ({e})") from e


def unsupported(path: str, what: str, fix: str = "") -> None:
    raise UnsupportedModelError(f"{path!r}: {what} is not supported by eqcalc's NequIP converter"
                                + (f"; {fix}" if fix else ""))


def check_options(path: str, opts: Dict[str, Any]) -> None:
    """:class:`UnsupportedModelError` naming the first of the model options ``opts`` (nequip's
    ``training_module.model`` mapping) that eqcalc does not reproduce."""
    target = opts.get("_target_")
    if target not in BUILDERS:
        unsupported(path, f"model builder {target!r}", f"supported: {', '.join(BUILDERS)}")
    unknown = sorted(k for k in opts if k not in SUPPORTED)
    if unknown:
        unsupported(path, f"model option(s) {unknown}")
    for key, allowed in SUPPORTED.items():
        if allowed is not None and key in opts and opts[key] not in allowed:
            unsupported(path, f"{key}={opts[key]!r}", f"supported values: {list(allowed)}")
    if int(opts.get("readout_mlp_hidden_layers_depth", 0)) and opts.get("readout_mlp_nonlinearity", "silu") != "silu":
        unsupported(path, f"readout_mlp_nonlinearity={opts['readout_mlp_nonlinearity']!r}", "silu is supported")
    pair = opts.get("pair_potential")
    if pair is not None:
        if not isinstance(pair, dict) or pair.get("_target_") != "nequip.nn.pair_potential.ZBL" \
                or pair.get("units") != "metal":
            unsupported(path, f"pair_potential={pair!r}", "the ZBL pair potential in metal units is supported")
        if [str(x) for x in pair.get("chemical_species", [])] != [str(t) for t in opts.get("type_names", [])]:
            unsupported(path, "ZBL chemical_species that differ from type_names")


class Package:
    """An opened ``.nequip.zip``: its config, metadata and the eager model's record tree."""

    def __init__(self, path: str):
        self.path = path
        self.archive = TorchArchive(path)
        names = self.archive.names
        configs = [n for n in names if n.endswith("/model/config.yaml") and n.count("/") == 2]
        if len(configs) != 1:
            raise ModelFileError(f"{path!r} is a zip but not a nequip package (no <name>/model/config.yaml); "
                                 "convert the .nequip.zip written by nequip-package build")
        self.prefix = configs[0].split("/", 1)[0]
        self.config = _yaml(self.archive.read(configs[0], 1 << 20).decode("utf-8"))
        meta = f"{self.prefix}/model/package_metadata.txt"
        self.metadata = _yaml(self.archive.read(meta, 1 << 20).decode("utf-8")) if meta in names else {}

    def load_model(self) -> Record:
        """The eager model's record tree (read after the config has been checked, so that an
        unsupported option is named before anything of the pickle is looked at)."""
        eager = f"{self.prefix}/model/eager_model.pkl"
        if eager not in self.archive.names:
            raise ModelFileError(f"{self.path!r} has no eager model (model/eager_model.pkl)")
        return self.archive.load(ALLOW, eager, storage_member=lambda key: f"{self.prefix}/.data/{key}.storage")

    def model_options(self) -> Dict[str, Any]:
        try:
            model = self.config["training_module"]["model"]
        except (KeyError, TypeError) as e:
            raise ModelFileError(f"{self.path!r}: model/config.yaml has no training_module.model") from e
        if not isinstance(model, dict):
            raise ModelFileError(f"{self.path!r}: training_module.model is not a mapping")
        return model


class Reader:
    """Maps one package onto eqcalc's NequIP."""

    def __init__(self, package: Package):
        self.package, self.path = package, package.path
        self.used: set = set()
        self.func: Optional[Record] = None

    def load(self) -> None:
        root = self.package.load_model()
        try:
            self.func = root.child("sole_model").child("model").child("func")
        except (ModelFileError, AttributeError) as e:
            raise ModelFileError(f"{self.path!r}: the eager model is not a nequip GraphModel "
                                 "(sole_model.model.func)") from e

    def refuse(self, what: str, fix: str = "") -> None:
        unsupported(self.path, what, fix)

    def tensor(self, module: Record, key: str) -> torch.Tensor:
        t = module.tensor(key)
        self.used.add(id(t))
        return t

    # ---- hyperparameters ------------------------------------------------------------------
    def config(self) -> Dict[str, Any]:
        opts = self.package.model_options()
        check_options(self.path, opts)
        l_max = int(opts.get("l_max", 1))
        features = opts.get("num_features", 32)
        features = [features] * (l_max + 1) if isinstance(features, int) else list(features)
        # Fewer channels in some degrees: eqcalc pads every degree to the largest count with
        # channels whose weights are all zero (they stay exactly zero).
        c = int(max(features))
        types = [str(t) for t in opts["type_names"]]
        avg = opts.get("avg_num_neighbors")
        if avg is None:
            self.refuse("avg_num_neighbors=None")
        per_species: Tuple[float, ...] = ()
        if isinstance(avg, dict):
            if set(avg) != set(types):
                raise ModelFileError(f"{self.path!r}: avg_num_neighbors has types {sorted(avg)}, model {types}")
            per_species = tuple(float(avg[t]) for t in types)
            avg = float(np.mean(per_species))
        num_layers = int(opts.get("num_layers", 4))
        readout_depth = int(opts.get("readout_mlp_hidden_layers_depth", 0))
        pair = opts.get("pair_potential")
        return dict(
            species=types, cutoff=float(opts["r_max"]), channels=c, max_ell=l_max, hidden_l=l_max,
            num_interactions=num_layers, num_radial=int(opts.get("num_bessels", 8)), radial_basis="bessel",
            envelope="polynomial", envelope_p=int(opts.get("polynomial_cutoff_p", 6)),
            radial_mlp=int(opts.get("radial_mlp_width", 128)), radial_depth=int(opts.get("radial_mlp_depth", 1)),
            avg_num_neighbors=float(avg), avg_num_neighbors_per_species=per_species,
            embedding_channels=int(opts.get("type_embed_num_features") or features[0]), residual=False,
            first_self_connection=False, last_scalars_only=True,
            readout="mlp" if readout_depth else "linear",
            readout_hidden=int(opts.get("readout_mlp_hidden_layers_width") or features[0]),
            pair_repulsion="zbl_lammps" if pair else "none",
            pair_envelope_p=int(float(pair.get("polynomial_cutoff_p", 6))) if pair else 6,
            parity=bool(opts.get("parity", True)),
            channels_per_degree=tuple(int(f) for f in features) if min(features) < c else (),
            gate="norm" if opts.get("convnet_nonlinearity_type", "gate") == "norm" else "normalized_silu",
            edge_cutoffs=self.edge_cutoffs(float(opts["r_max"]), len(types)),
        )

    def edge_cutoffs(self, r_max: float, n_types: int) -> Tuple[Tuple[float, ...], ...]:
        """Per type-pair cutoffs ``[centre][neighbour]`` from the model's own ``1/r_max`` table
        (nequip resolves the config's partial dict into it); ``()`` for one global cutoff."""
        recip = _np(self.tensor(self.func.child("edge_norm"), "_rmax_recip")).reshape(-1)
        if recip.size == 1:
            if abs(recip[0] * r_max - 1.0) > 1e-12:
                raise ModelFileError(f"{self.path!r}: the model's cutoff differs from the config's r_max")
            return ()
        if recip.size != n_types * n_types:
            raise ModelFileError(f"{self.path!r}: {recip.size} per-edge-type cutoffs for {n_types} types")
        return tuple(tuple(float(1.0 / x) for x in row) for row in recip.reshape(n_types, n_types))

    # ---- weights --------------------------------------------------------------------------
    def linear(self, record: Record) -> List[Tuple[int, int, np.ndarray]]:
        self.tensor(record, "weight")
        return e3nn.linear_blocks(record)

    def blocks_of(self, irreps, layout: List[o3.Irrep], what: str) -> List[int]:
        """eqcalc block index of each irrep of nequip's ``irreps`` (one irrep per (l, parity))."""
        irs = [(l, p) for _, l, p in irreps]
        if sorted(irs) != sorted(layout):
            self.refuse(f"{what} irreps {e3nn.irreps_str(irreps)} (eqcalc's NequIP builds {layout})")
        return [layout.index(ir) for ir in irs]

    def per_block(self, record: Record, layout: List[o3.Irrep], c_in: int) -> np.ndarray:
        """An e3nn Linear irreps → same irreps (one irrep per (l, parity)) as eqcalc's
        ``o3.Linear`` weight ``(blocks, c_in, c_in)`` in eqcalc's block order, zero-padded to
        ``c_in`` channels (eqcalc divides by sqrt(c_in) in the forward)."""
        where = self.blocks_of(e3nn.parse_irreps(record.attr("irreps_in")), layout, record.kind)
        blocks = self.linear(record)
        if sorted((i, o) for i, o, _ in blocks) != [(i, i) for i in range(len(where))]:
            self.refuse(f"{record.kind} mixing irreps {[(i, o) for i, o, _ in blocks]}")
        out = np.zeros((len(layout), c_in, c_in))
        for i, _, w in blocks:
            out[where[i], :w.shape[0], :w.shape[1]] = w * np.sqrt(c_in)
        return out

    def output_columns(self, irreps_out, gated, layout: List[o3.Irrep], C: int) -> Dict[int, np.ndarray]:
        """eqcalc block → eqcalc column of each of nequip's output channels of that (l, parity).
        nequip's 0e channels are the scalars, then one gate set per gated irrep in the order of
        its Gate's ``irreps_gated``; eqcalc's gate sets follow its layout's l > 0 blocks."""
        muls = {(l, p): m for m, l, p in irreps_out}
        eq_gated = [b for b in layout if b[0] > 0]
        cols = {layout.index(ir): np.arange(m) for ir, m in muls.items() if ir != (0, 1)}
        gates = [np.arange(m) + (1 + eq_gated.index((l, p))) * C for m, l, p in gated]
        scalars = muls[(0, 1)] - sum(len(g) for g in gates)
        cols[0] = np.concatenate([np.arange(scalars)] + gates)
        return cols

    def scalar_mlp(self, record: Record) -> List[np.ndarray]:
        """nequip's ScalarMLPFunction (no bias) → per layer ``(in, out)`` weights times alpha."""
        if record.attr("bias"):
            self.refuse("scalar MLPs with biases")
        layers = [m for _, m in sorted(record.child("mlp").modules.items(), key=lambda kv: int(kv[0]))]
        weights, acts = [], []
        for m in layers:
            if m.name == "ScalarLinearLayer":
                alpha = float(_np(self.tensor(m, "alpha")))
                weights.append(_np(self.tensor(m, "weight")) * alpha)
            elif m.name == "SiLU":
                acts.append(m.name)
            else:
                self.refuse(f"scalar MLP layer {m.kind}")
        if len(acts) != len(weights) - 1:
            self.refuse("a scalar MLP without SiLU between its layers")
        return weights

    def layer(self, k: int, model, config: Dict[str, Any], put) -> None:
        layer = self.func.child(f"layer{k}_convnet")
        conv = layer.child("conv")
        ours = model.convolutions[k]
        p = f"convolutions.{k}."
        C_in, C = ours.channels, config["channels"]   # eqcalc's (padded) channel counts
        lay_in, lay_out = model.layouts[k], model.layouts[k + 1]
        put(p + "linear_in.weight", self.per_block(conv.child("linear_1"), lay_in, C_in))
        # Tensor product: instructions (k1, l2, k3) (eqcalc's blocks) in nequip's enumeration order.
        tp = conv.child("tp_scatter").child("tp")
        irreps1 = e3nn.parse_irreps(tp.attr("irreps_in1"))
        irreps_mid = e3nn.parse_irreps(tp.attr("irreps_out"))
        in_block = self.blocks_of(irreps1, lay_in, "layer input")
        theirs = []   # ((k1, l2, k3), path weight, channels)
        for i1, i2, i_out, mode, has_weight, path_weight, _shape in e3nn.instructions(tp):
            if mode != "uvu" or not has_weight:
                self.refuse(f"tensor-product instruction mode {mode!r}")
            _, l3, p3 = irreps_mid[i_out]
            if (l3, p3) not in lay_out:
                self.refuse(f"tensor-product output {l3}{'e' if p3 > 0 else 'o'} (eqcalc builds {lay_out})")
            theirs.append(((in_block[i1], int(i2), lay_out.index((l3, p3))), float(path_weight), irreps1[i1][0]))
        if sorted(t for t, _, _ in theirs) != sorted(ours.tp.paths):
            self.refuse(f"tensor-product paths {[t for t, _, _ in theirs]} (eqcalc builds {ours.tp.paths})")
        slot = {t: n for n, (t, _, _) in enumerate(theirs)}
        offsets = np.cumsum([0] + [m for _, _, m in theirs])
        # Radial MLP: nequip's last layer gives, per instruction, one weight per input channel.
        weights = self.scalar_mlp(conv.child("edge_mlp"))
        if len(weights) != config["radial_depth"] + 1:
            self.refuse(f"radial MLP with {len(weights) - 1} hidden layers where the config says "
                        f"{config['radial_depth']}")
        factor = float(self.func.child("factor").attr("factor"))
        r_max = config["cutoff"]
        # nequip's basis sinc(n x) n * factor = factor r_max/pi * sin(n pi r/r_max)/r; eqcalc's is
        # sqrt(2/r_max) sin(n pi r/r_max)/r.
        weights[0] = weights[0] * (factor * r_max / np.pi / np.sqrt(2.0 / r_max))
        last = weights[-1]
        widths = ours.tp.path_widths                       # channels of each of eqcalc's paths
        at = np.cumsum([0] + widths)
        mapped = np.zeros((last.shape[0], at[-1]))
        for q, (k1, l2, k3) in enumerate(ours.tp.paths):
            n = slot[(k1, l2, k3)]
            _, path_weight, mul = theirs[n]
            l1, l3 = lay_in[k1][0], lay_out[k3][0]
            sign = e3nn.coupling_sign(l1, l2, l3, "0.5")   # odd l1+l2+l3 (parity) differ from 0.4.4
            mapped[:, at[q]:at[q] + mul] = last[:, offsets[n]:offsets[n + 1]] * path_weight * sign / np.sqrt(2 * l3 + 1)
        weights[-1] = mapped
        for j, w in enumerate(weights):
            put(p + f"radial.{2 * j}.weight", w.T)
        # linear_2: its input per (l, parity) is that irrep's paths, concatenated in nequip's order.
        linear_2 = conv.child("linear_2")
        self.tensor(linear_2, "weight")
        mid_in = e3nn.parse_irreps(linear_2.attr("irreps_in"))
        out_irreps = e3nn.parse_irreps(linear_2.attr("irreps_out"))
        gate = layer.child("equivariant_nonlin")
        gated = self.nonlinearity(k, gate, config)
        cols = self.output_columns(out_irreps, gated, lay_out, C)
        lin_blocks = {(i_in, i_out): w for i_in, i_out, w in e3nn.linear_blocks(linear_2)}
        for l, mix in enumerate(ours.linear_out.mixes):   # l: eqcalc's output block
            ir = lay_out[l]
            i_in = next(i for i, (_, li, pi) in enumerate(mid_in) if (li, pi) == ir)
            i_out = next(i for i, (_, lo, po) in enumerate(out_irreps) if (lo, po) == ir)
            w = lin_blocks[(i_in, i_out)]                      # (sum of path channels, out channels)
            order = [n for n, (t, _, _) in enumerate(theirs) if t[2] == l]
            start = {n: sum(theirs[m][2] for m in order[:order.index(n)]) for n in order}
            rows = np.zeros((sum(widths[q] for q in mix.paths), mix.weight.shape[1]))
            row_at = np.cumsum([0] + [widths[q] for q in mix.paths])
            for r, q in enumerate(mix.paths):
                n = slot[ours.tp.paths[q]]
                mul = theirs[n][2]
                rows[np.ix_(row_at[r] + np.arange(mul), cols[l])] = w[start[n]:start[n] + mul]
            put(p + f"linear_out.mixes.{l}.weight", rows)
        # Self-connection: features ⊗ type embedding (node_attrs) → one linear map per species.
        if isinstance(conv.modules.get("sc"), Record):
            sc = conv.child("sc")
            flat = _np(self.tensor(sc, "weight")).reshape(-1)
            emb = _np(self.func.child("type_embed").child("embed_module").tensor("weight"))  # (types, e)
            irr_in = e3nn.parse_irreps(sc.attr("irreps_in1"))
            irr_out = e3nn.parse_irreps(sc.attr("irreps_out"))
            sc_cols = self.output_columns(irr_out, gated, lay_out, C)
            start = 0
            for i1, i2, i_out, mode, has_weight, path_weight, shape in e3nn.instructions(sc):
                n = int(np.prod(shape))
                _, l, p_in = irr_in[i1]
                # e3nn's 3j symbol of l x 0 -> l is the identity / sqrt(2l+1)
                w = flat[start:start + n].reshape(shape) * (float(path_weight) / np.sqrt(2 * l + 1))  # (u, v, w)
                start += n
                if tuple(irr_out[i_out][1:]) != (l, p_in) or mode != "uvw":
                    self.refuse(f"self-connection instruction {(i1, i2, i_out, mode)}")
                block = lay_out.index((l, p_in))   # the same index in lay_in: the layouts share a prefix
                mix = ours.self_connection.mixes[block]
                per_species = np.einsum("uvw,sv->suw", w, emb)                # (species, u, w)
                full = np.zeros((emb.shape[0], C_in, mix.weight.shape[1]))
                full[:, :w.shape[0], sc_cols[block]] = per_species
                put(p + f"self_connection.mixes.{block}.weight", full.reshape(-1, full.shape[2]))
        elif k > 0:
            self.refuse(f"layer {k} without a self-connection")
    def nonlinearity(self, k: int, gate: Record, config: Dict[str, Any]) -> list:
        """Checks layer ``k``'s nonlinearity against eqcalc's; the gated irreps in nequip's order
        (``[]`` for the norm nonlinearity)."""
        if config["gate"] == "norm":
            f = gate.attr("scalar_nonlinearity")
            if gate.name != "NormActivation" or getattr(f, "qualname", "") != "torch.nn.functional.silu" \
                    or gate.attr("normalize") is not True or gate.attr("bias") or gate.attr("epsilon") != 1e-8:
                self.refuse(f"layer {k} nonlinearity {gate.kind} ({getattr(f, 'qualname', f)!r}, "
                            f"epsilon {gate.attr('epsilon')})", "nequip's norm nonlinearity with SiLU is supported")
            return []
        if gate.name != "Gate":
            self.refuse(f"nonlinearity {gate.kind}", "gate and norm nonlinearities are supported")
        # e3nn's normalised SiLU on even scalars and gates, normalised tanh on odd scalars.
        expected = {1: ("torch.nn.functional.silu", NORMALIZED_SILU_GAIN), -1: ("torch.tanh", NORMALIZED_TANH_GAIN)}
        for part in ("act_scalars", "act_gates"):
            irreps = e3nn.parse_irreps(gate.child(part).attr("irreps_in"))
            acts = gate.child(part).child("acts").modules
            if len(acts) != len(irreps):
                self.refuse(f"layer {k} {part} with {len(acts)} activations for {e3nn.irreps_str(irreps)}")
            for (_, _, parity), (_, act) in zip(irreps, sorted(acts.items(), key=lambda kv: int(kv[0]))):
                f = act.attr("f")
                name, gain = expected[parity]
                if getattr(f, "qualname", "") != name or abs(e3nn.normalize2mom_constant(act) - gain) > 1e-12:
                    self.refuse(f"layer {k} nonlinearity {getattr(f, 'qualname', f)!r} (scale {act.attr('cst')}) "
                                f"on {'even' if parity > 0 else 'odd'} scalars",
                                "nequip's default gates (SiLU, tanh on odd scalars) are supported")
        return e3nn.parse_irreps(gate.attr("irreps_gated"))

    def fill(self, model, config: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        state = dict(initial)
        n_species = len(config["species"])

        def put(name: str, value) -> None:
            target = state[name]
            state[name] = torch.as_tensor(np.array(value, dtype=np.float64), dtype=target.dtype).reshape(target.shape)

        f = self.func
        put("embedding.weight", _np(self.tensor(f.child("type_embed").child("embed_module"), "weight")))
        bessel = f.child("bessel_encode")
        n = _np(self.tensor(bessel, "bessel_weights")).reshape(-1)
        if not np.allclose(n, np.arange(1, n.size + 1), rtol=0, atol=1e-12):
            self.refuse("trained Bessel frequencies")
        if float(bessel.child("cutoff").attr("p")) != config["envelope_p"]:
            raise ModelFileError(f"{self.path!r}: cutoff p differs from the config's polynomial_cutoff_p")
        for k in range(config["num_interactions"]):
            self.layer(k, model, config, put)
        readout = self.scalar_mlp(f.child("per_atom_energy_readout").child("mlp_module"))
        C = config["channels"]
        first = np.zeros((C, readout[0].shape[1]))
        first[:readout[0].shape[0]] = readout[0]                  # padded scalar channels read nothing
        if len(readout) == 1:
            put("readout.weight", first.reshape(-1))
            put("readout.bias", 0.0)
        elif len(readout) == 2 and config["readout"] == "mlp":
            put("readout.hidden.weight", first.T)
            put("readout.hidden.bias", np.zeros(first.shape[1]))
            put("readout.out.weight", readout[1].reshape(-1))
            put("readout.out.bias", 0.0)
        else:
            self.refuse(f"a readout MLP with {len(readout) - 1} hidden layers")
        ss = f.child("per_type_energy_scale_shift")
        scales = _np(self.tensor(ss, "scales")).reshape(-1) if ss.attr("has_scales") else np.ones(1)
        shifts = _np(self.tensor(ss, "shifts")).reshape(-1) if ss.attr("has_shifts") else np.zeros(1)
        put("scale_shift.scale", np.broadcast_to(scales, (n_species,)))
        put("scale_shift.shift", np.broadcast_to(shifts, (n_species,)))
        pair = f.modules.get("pair_potential")
        if (pair is not None) != (config["pair_repulsion"] != "none"):
            raise ModelFileError(f"{self.path!r}: the pair potential of the model and of its config differ")
        if pair is not None:
            z = _np(self.tensor(pair, "atomic_numbers")).reshape(-1)
            if not np.array_equal(z, model.species_z.double().numpy()):
                self.refuse(f"ZBL atomic numbers {z.tolist()} that differ from the types' elements")
            if abs(float(_np(self.tensor(pair, "_qqr2exesquare"))) - 0.5 * 14.399645) > 1e-9 or \
                    float(pair.child("cutoff").attr("p")) != config["pair_envelope_p"]:
                self.refuse("a ZBL with other constants than nequip's metal-units ZBL")
        self.check_all_used()
        require_filled(self.path, model, state, initial)
        return state

    def check_all_used(self) -> None:
        for path, module in walk(self.func):
            for key, t in module.tensors.items():
                if id(t) in self.used or t.numel() == 0 or key in ("output_mask", "norm_const", "_empty"):
                    continue
                self.refuse(f"tensor {path}.{key} {tuple(t.shape)} has no place in eqcalc's NequIP")


def read(path: str | Path, progress: bool = True):
    """Read a ``.nequip.zip`` → ``(model, source_metadata)`` without running anything in it."""
    import potentials

    path = str(path)
    start = time.perf_counter()
    package = Package(path)
    try:
        reader = Reader(package)
        reader.load()
        config = reader.config()
        dtype = reader.package.model_options().get("model_dtype", "float32")
        model = potentials.build("nequip", dtype=dtype, **config)
        state = reader.fill(model, config)
        model.load_state_dict(state, strict=True)
    except EqcalcError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, RuntimeError) as e:
        raise ModelFileError(f"{path!r} does not have the structure of a nequip NequIPGNNModel package "
                             f"({type(e).__name__}: {e})") from e
    finally:
        package.archive.close()
    versions = (package.metadata or {}).get("versions", {}) if isinstance(package.metadata, dict) else {}
    source = {
        "format": "nequip package (.nequip.zip, torch.package)",
        "file": Path(path).name,
        "sha256": sha256(path),
        "nequip_version": str(versions.get("nequip", "unknown")),
        "e3nn_version": str(versions.get("e3nn", "unknown")),
        "model_builder": package.model_options().get("_target_"),
        "dtype": dtype,
        "conventions": {
            "edge_vector": "neighbour minus centre in both",
            "harmonics": "e3nn 'component' basis (y polar) rotated onto eqcalc's",
            "wigner_3j": "e3nn >= 0.5 signs (Condon-Shortley)",
            "bessel": "nequip's sinc basis times 2 pi / r_max^2 folded into the first radial layer",
            "energy": "scale[type] * readout + shift[type]",
        },
        "conversion_seconds": round(time.perf_counter() - start, 3),
    }
    log.info("converted %s (%d parameters) in %.1f s", path, sum(p.numel() for p in model.parameters()),
             source["conversion_seconds"])
    return model, source
