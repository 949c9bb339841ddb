"""Worst errors of the physics test library per architecture and dtype → physics.csv.

    .venv/bin/python benchmarks/physics_report.py [--output-dir benchmarks/results]

The same checks as tests/test_physics.py, reported as numbers (the issue's closing figures).
"""
import argparse
import csv
import tempfile
import time
from pathlib import Path

import potentials
from potentials import testing as T
from eqcalc import EquivariantCalculator

SPECIES = ["Cu", "Pt", "C", "O", "H"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="benchmarks/results")
    out = Path(p.parse_args().output_dir)
    out.mkdir(parents=True, exist_ok=True)
    structs = T.structures(SPECIES)
    rows = []
    models = []
    for arch in potentials.architectures():  # untrained, with a direct force head
        path = Path(tempfile.mkdtemp()) / f"{arch}.eqm"
        potentials.save(potentials.build(arch, species=SPECIES, cutoff=5.0, dtype="float64", direct_forces=True), path)
        models.append((f"{arch} (untrained)", path))
    models += [("shipped default", "default"), ("shipped schnet", "schnet"), ("shipped faenet", "faenet")]
    for arch, path in models:
        ref = EquivariantCalculator(path, compile="eager", dtype="float64")
        has_head = "direct" in ref.metadata["force_modes"]
        for dtype in ("float64", "float32"):
            start = time.perf_counter()
            calc = EquivariantCalculator(path, compile="eager", dtype=dtype)
            sym = [T.check_symmetry(calc, structs[k], n=100) for k in ("bulk", "slab", "cluster")]
            sym_direct = [T.check_symmetry(EquivariantCalculator(path, compile="eager", dtype=dtype, forces="direct"),
                                           structs[k], n=100) for k in ("bulk", "slab", "cluster")] if has_head else []
            row = {
                "architecture": arch, "dtype": dtype,
                "fd_forces": max(T.check_forces_fd(calc, a, reference=ref) for a in structs.values()),
                "fd_stress": max(T.check_stress_fd(calc, structs[k], reference=ref)
                                 for k in ("bulk", "small_triclinic", "slab")),
                "O3_energy": max(s["energy"] for s in sym),
                "O3_forces": max(s["forces"] for s in sym),
                "O3_stress": max(s["stress"] for s in sym),
                "O3_direct_forces": max((s["forces"] for s in sym_direct), default="n/a"),
                "extensivity": T.check_extensive(calc, structs["small_triclinic"]),
                "batch_vs_single": T.check_batch(calc, list(structs.values())),
                "wrapped_vs_unwrapped": max(T.check_wrapping(calc, structs[k]) for k in ("slab", "small_triclinic")),
                "force_beyond_cutoff": T.check_cutoff(calc, SPECIES)["force_beyond"],
                **second_order(calc, ref, structs),
            }
            rows.append({k: (f"{v:.2e}" if isinstance(v, float) else v) for k, v in row.items()})
            print(rows[-1], f"({time.perf_counter() - start:.0f} s)", flush=True)
    with open(out / "physics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out / 'physics.csv'}")


def second_order(calc, ref, structs) -> dict:
    """Linear response at symmetric sites (perfect fcc/bcc/hcp Cu, O in a Cu(111) hollow; the
    evaluation in float64 on the same weights), Hessian vs FD and its identities; or the reason
    the model has no second derivatives."""
    limit = T.second_order_limit(calc)
    if limit is not None:
        return {"linear_response_spread": "n/a", "hessian_fd": "n/a", "hessian_asymmetry": "n/a",
                "acoustic_sum": "n/a", "second_order": limit.split(":")[1].split(".")[0].strip()}
    sites = T.symmetric_sites(["Cu"])
    spread = max(T.check_linear_response(ref, a, i, d)["spread"] for a, i, d in sites.values())
    ident = [T.check_hessian_identities(calc, structs[k]) for k in ("slab", "cluster")]
    return {"linear_response_spread": spread,
            "hessian_fd": max(T.check_hessian_fd(calc, structs[k], reference=ref) for k in ("slab", "cluster")),
            "hessian_asymmetry": max(r["symmetry"] for r in ident),
            "acoustic_sum": max(r["acoustic_sum"] for r in ident), "second_order": "yes"}


if __name__ == "__main__":
    main()
