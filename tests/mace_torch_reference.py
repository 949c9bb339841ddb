"""Reference data for the mace-torch converter, made by mace-torch itself.

Runs inside the separate mace-torch virtualenv (``benchmarks/mace_env.sh``; never in eqcalc's
environment). For every variant below it builds a seeded random-weight model with mace-torch's
own classes, saves it with ``torch.save`` (the ``.model`` files users have), and evaluates it
with mace-torch's ``MACECalculator`` on the test structures. Writes ``OUT/<variant>.model`` and
``OUT/reference.json`` (structures, energies, per-atom energies, forces, 3x3 stress and the
volume mace-torch divided by; e3nn's
Wigner 3j symbols and harmonics for the convention tests).

    $(bash benchmarks/mace_env.sh | tail -1) tests/mace_torch_reference.py OUT [--variants a b ...]

The process sets torch's default dtype to the model's (as mace-torch's own scripts do): the
ZBL prefactor of mace-torch is computed in the default dtype, so a float64 model evaluated
under a float32 default would round it to float32.
"""
import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

torch.serialization.add_safe_globals([slice])  # e3nn 0.4.4 loads its own constants.pt

SMALL = [29, 1, 8, 6]  # Cu, H, O, C: deliberately not sorted
# Variant → constructor options (on top of BASE) and the head to evaluate.
BASE = dict(r_max=4.5, num_bessel=6, num_polynomial_cutoff=5, max_ell=3, num_interactions=2,
            hidden_irreps="8x0e+8x1o", MLP_irreps="16x0e", avg_num_neighbors=9.0,
            atomic_numbers=SMALL, correlation=3, radial_MLP=[16, 16, 16],
            first="RealAgnosticResidualInteractionBlock", interaction="RealAgnosticResidualInteractionBlock",
            cls="ScaleShiftMACE", dtype="float64", heads=None, head=None)
VARIANTS = {
    # MACE-MP-0's blocks: residual first interaction, ScaleShiftMACE
    "mp0_like": dict(),
    "mp0_like_float32": dict(dtype="float32"),
    # plain MACE with a non-residual first interaction, L = 2 hidden features, correlation 2,
    # element-agnostic product weights
    "plain_first_l2": dict(cls="MACE", first="RealAgnosticInteractionBlock", hidden_irreps="8x0e+8x1o+8x2e",
                           max_ell=2, correlation=2, use_agnostic_product=True),
    # MPA-0 / MP-0b2+: density-normalised blocks, ZBL, Agnesi transform
    "density_zbl_agnesi": dict(first="RealAgnosticDensityInteractionBlock",
                               interaction="RealAgnosticDensityResidualInteractionBlock",
                               pair_repulsion=True, distance_transform="Agnesi", max_ell=2),
    # residual density blocks throughout, Soft transform, ZBL, scalar hidden features, correlation 1
    "density_residual_soft_l0": dict(first="RealAgnosticDensityResidualInteractionBlock",
                                     interaction="RealAgnosticDensityResidualInteractionBlock",
                                     pair_repulsion=True, distance_transform="Soft",
                                     hidden_irreps="8x0e", correlation=1),
    # plain MACE with ZBL (not scaled) and three layers
    "plain_zbl_3layers": dict(cls="MACE", first="RealAgnosticInteractionBlock", num_interactions=3,
                              pair_repulsion=True, max_ell=2),
    # two heads; the second is converted and evaluated
    "two_heads": dict(heads=["pbe", "r2scan"], head="r2scan", max_ell=2),
    # MACE-MP-0 medium: 128x0e+128x1o, max_ell 3, correlation 3, 2 layers, r_max 6, 89 elements
    "mp0_medium": dict(r_max=6.0, num_bessel=10, hidden_irreps="128x0e+128x1o", radial_MLP=[64, 64, 64],
                       atomic_numbers=list(range(1, 90)), avg_num_neighbors=61.96),
}
BIG = {"mp0_medium"}


def structures(variant: str):
    """The test structures (ASE Atoms) with elements the variant covers, keyed by name."""
    from ase import Atoms
    from ase.build import add_adsorbate, fcc111, molecule

    r_max = {**BASE, **VARIANTS[variant]}["r_max"]
    rng = np.random.default_rng(3)
    out = {}
    # triclinic bulk with four elements
    cell = np.array([[4.1, 0.0, 0.0], [0.9, 3.9, 0.0], [-0.6, 0.7, 4.3]])
    frac = np.array([[0.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.5, 0.0, 0.5], [0.0, 0.5, 0.5],
                     [0.25, 0.3, 0.2], [0.7, 0.75, 0.8], [0.3, 0.8, 0.6]])
    bulk = Atoms("Cu4OCH", scaled_positions=frac, cell=cell, pbc=True)
    bulk.positions += rng.normal(scale=0.05, size=bulk.positions.shape)
    out["triclinic_bulk"] = bulk
    # (T, T, F) slab with adsorbates
    slab = fcc111("Cu", size=(2, 2, 3), a=3.6, vacuum=6.0)
    add_adsorbate(slab, molecule("CO"), 1.9, "ontop", mol_index=1)  # C down, O up
    add_adsorbate(slab, "H", 1.0, "fcc")
    slab.pbc = (True, True, False)
    slab.positions += rng.normal(scale=0.03, size=slab.positions.shape)
    out["slab_adsorbates"] = slab
    if variant in BIG:
        return out
    out["molecule"] = molecule("CH3OH")
    out["molecule"].positions += rng.normal(scale=0.03, size=out["molecule"].positions.shape)
    small = Atoms("CuO", scaled_positions=[[0, 0, 0], [0.45, 0.55, 0.5]],
                  cell=[[2.6, 0.0, 0.0], [0.4, 2.8, 0.0], [0.3, -0.2, 2.9]], pbc=True)
    out["cell_below_cutoff"] = small
    out["isolated_atom"] = Atoms("O", positions=[[0.0, 0.0, 0.0]])
    direction = np.array([0.3, 0.2, 1.0]) / np.linalg.norm([0.3, 0.2, 1.0])
    out["dimer_near_cutoff"] = Atoms("CuO", positions=[[0, 0, 0], 0.99 * r_max * direction])
    out["dimer_short"] = Atoms("CH", positions=[[0, 0, 0], [0.35, 0.3, 0.45]])
    return out


def build(variant: str):
    from e3nn import o3
    from mace import modules

    o = {**BASE, **VARIANTS[variant]}
    dtype = getattr(torch, o["dtype"])
    torch.set_default_dtype(dtype)
    torch.manual_seed(sum(map(ord, variant)))
    zs = o["atomic_numbers"]
    heads = o["heads"] or ["Default"]
    rng = np.random.default_rng(5)
    e0 = rng.uniform(-5.0, -1.0, size=(len(heads), len(zs)))
    kwargs = dict(
        r_max=o["r_max"], num_bessel=o["num_bessel"], num_polynomial_cutoff=o["num_polynomial_cutoff"],
        max_ell=o["max_ell"], interaction_cls=getattr(modules, o["interaction"]),
        interaction_cls_first=getattr(modules, o["first"]), num_interactions=o["num_interactions"],
        num_elements=len(zs), hidden_irreps=o3.Irreps(o["hidden_irreps"]),
        MLP_irreps=o3.Irreps(o["MLP_irreps"]), atomic_energies=e0 if o["heads"] else e0[0],
        avg_num_neighbors=o["avg_num_neighbors"], atomic_numbers=zs, correlation=o["correlation"],
        gate=torch.nn.functional.silu, radial_MLP=o["radial_MLP"],
        pair_repulsion=o.get("pair_repulsion", False), distance_transform=o.get("distance_transform", "None"),
        use_agnostic_product=o.get("use_agnostic_product", False))
    if o["heads"]:
        kwargs["heads"] = heads
    if o["cls"] == "ScaleShiftMACE":
        scale = list(rng.uniform(0.5, 1.5, size=len(heads)))
        shift = list(rng.uniform(-0.2, 0.2, size=len(heads)))
        model = modules.ScaleShiftMACE(atomic_inter_scale=scale if o["heads"] else scale[0],
                                       atomic_inter_shift=shift if o["heads"] else shift[0], **kwargs)
    else:
        model = modules.MACE(**kwargs)
    # Random weights of unit scale everywhere (untrained inits leave some paths tiny).
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.numel() > 0:
                p.copy_(torch.randn_like(p) * (0.5 if p.ndim > 1 or p.numel() > 1 else 0.1) + p * 0.5)
    return model, o


def evaluate(model, o, atoms_by_name):
    from mace.calculators import MACECalculator

    calc = MACECalculator(models=model, device="cpu", default_dtype=o["dtype"], head=o["head"])
    out = {}
    for name, atoms in atoms_by_name.items():
        atoms = atoms.copy()
        atoms.calc = calc
        start = time.perf_counter()
        energy = atoms.get_potential_energy()
        row = {"energy": float(energy), "energies": calc.results["energies"].tolist(),
               "forces": atoms.get_forces().tolist(), "seconds": time.perf_counter() - start}
        if atoms.pbc.any():
            from ase.stress import voigt_6_to_full_3x3_stress

            row["stress"] = voigt_6_to_full_3x3_stress(calc.results["stress"]).tolist()
            # mace-torch divides by the volume of its own cell, which replaces every open
            # direction by a long fake vector: record it, the virials are what must agree.
            cell = calc._atoms_to_batch(atoms)["cell"].view(3, 3).double()
            row["stress_volume"] = float(torch.linalg.det(cell).abs())
        out[name] = row
    return out


def conventions():
    from e3nn import o3

    w3j = {}
    for l1 in range(4):
        for l2 in range(4):
            for l3 in range(abs(l1 - l2), min(l1 + l2, 3) + 1):
                w3j[f"{l1},{l2},{l3}"] = o3.wigner_3j(l1, l2, l3, dtype=torch.float64).tolist()
    rng = np.random.default_rng(11)
    vectors = rng.normal(size=(20, 3))
    sh = o3.spherical_harmonics(list(range(4)), torch.tensor(vectors), normalize=True, normalization="component")
    return {"wigner_3j": w3j, "harmonics": {"vectors": vectors.tolist(), "values": sh.tolist()}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    args = parser.parse_args()
    import mace

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"mace_version": mace.__version__, "torch_version": torch.__version__,
              "conventions": conventions(), "variants": {}}
    for variant in args.variants:
        start = time.perf_counter()
        model, o = build(variant)
        path = out / f"{variant}.model"
        torch.save(model, path)
        atoms_by_name = structures(variant)
        result["variants"][variant] = {
            "file": path.name, "dtype": o["dtype"], "head": o["head"],
            "n_parameters": sum(p.numel() for p in model.parameters()),
            "structures": {name: {"numbers": a.numbers.tolist(), "positions": a.positions.tolist(),
                                  "cell": a.cell.array.tolist(), "pbc": a.pbc.tolist()}
                           for name, a in atoms_by_name.items()},
            "results": evaluate(model, o, atoms_by_name),
            # what torch.load gives, to check the restricted reader's tensors bit for bit
            "tensor_sha256": {k: hashlib.sha256(v.detach().contiguous().numpy().tobytes()).hexdigest()
                              for k, v in model.state_dict().items()},
        }
        print(f"{variant}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    torch.set_default_dtype(torch.float64)
    (out / "reference.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
