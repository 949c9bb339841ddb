"""Reference data for the NequIP converter, made by nequip itself.

Runs inside the separate nequip virtualenv (``benchmarks/nequip_env.sh``; never in eqcalc's
environment). For every variant below it writes a small EMT data set, trains a NequIPGNNModel
briefly with ``nequip-train`` (float64), packages the checkpoint with ``nequip-package build``
(the ``.nequip.zip`` files users have) and evaluates the package with nequip's own ASE
calculator on the test structures. Both tools run through their console-script functions in
this one process (one interpreter and one import of torch/lightning/nequip for all variants,
instead of two processes per variant). Writes ``OUT/<variant>.nequip.zip``, ``OUT/<variant>.ckpt``
and ``OUT/reference.json`` (structures, energies, forces, 3x3 stress; e3nn's ``wigner_3j`` for
degrees <= 3).

    build/nequip-env/bin/python tests/nequip_reference.py OUT [--variants a b ...]
"""
import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

SPECIES = ["Cu", "Au", "Ni"]  # deliberately not sorted by Z
BASE = dict(l_max=1, parity=False, num_layers=2, num_features=8, radial_mlp_depth=1, radial_mlp_width=16,
            num_bessels=8, polynomial_cutoff_p=6, type_embed_num_features=None)
VARIANTS = {
    # the smallest NequIP: natural parity, l_max 1
    "basic": dict(),
    # l_max 2 with per-irrep counts, per-type avg_num_neighbors, per-type scales and shifts,
    # a deeper radial MLP and a type embedding width of its own
    "per_type_l2": dict(l_max=2, num_layers=3, num_features=[8, 6, 4], radial_mlp_depth=2,
                        type_embed_num_features=5, per_type=True),
    # l_max 3, ZBL pair potential, polynomial p = 5, readout MLP with a hidden layer
    "zbl_l3": dict(l_max=3, num_layers=3, num_features=[8, 4, 4, 2], polynomial_cutoff_p=5, zbl=True,
                   readout_mlp_hidden_layers_depth=1, readout_mlp_hidden_layers_width=6),
    # parity (odd-parity features 0o, 1e, 2o, 3e) with 4 layers so that they reach the energy:
    # l_max 1; l_max 2 with per-irrep counts and per-type normalisation; l_max 3 (odd
    # l1+l2+l3 couplings whose e3nn >= 0.5 signs differ from 0.4.4: (1,2,2), (1,3,3), (2,3,2)).
    # Odd features are products of products of neighbour sums: with the data's ~18 neighbours as
    # avg_num_neighbors they move forces by only ~1e-9 relative; small normalisations make them
    # matter (~1e-5..1e-3), so that the 1e-10 comparison covers them.
    "parity_4layers": dict(parity=True, num_layers=4, avg_num_neighbors=1.0),
    "parity_l2": dict(parity=True, l_max=2, num_layers=4, num_features=[8, 6, 4], per_type=True,
                      avg_num_neighbors={"Cu": 1.5, "Au": 2.0, "Ni": 0.75}),
    "parity_l3": dict(parity=True, l_max=3, num_layers=4, num_features=[6, 4, 4, 2], avg_num_neighbors=1.0),
    # the norm nonlinearity (with parity: odd scalars too)
    "norm_parity": dict(parity=True, num_layers=4, convnet_nonlinearity_type="norm", avg_num_neighbors=1.0),
    # per-edge-type cutoffs (asymmetric: Au-centred Cu edges 3.8, Cu-centred ones 3.6) with the
    # ZBL pair potential, whose envelope then ends at each edge type's own cutoff
    "edge_cutoffs": dict(per_edge_type_cutoff={"Cu": 3.6, "Au": {"Cu": 3.8, "Au": 4.0, "Ni": 3.5}, "Ni": 3.9},
                         zbl=True),
    # not converted (refused by name): residual updates
    "resnet": dict(num_layers=3, convnet_resnet=True),
}
R_MAX = 4.0


def structures():
    """The test systems: triclinic bulk (3 species), a (T,T,F) slab, a molecule, a small cell."""
    from ase import Atoms
    from ase.build import bulk, fcc111

    rng = np.random.default_rng(3)
    out = {}
    b = bulk("Cu", "fcc", a=3.7).repeat((2, 2, 2))
    b.set_cell(b.cell[:] + rng.normal(scale=0.15, size=(3, 3)), scale_atoms=True)
    b.positions += rng.normal(scale=0.1, size=b.positions.shape)
    b.symbols[[1, 4, 6]] = "Au"
    b.symbols[[2, 5]] = "Ni"
    out["triclinic_bulk"] = b
    s = fcc111("Cu", size=(2, 2, 3), vacuum=5.0, a=3.7)
    s.symbols[[0, 7]] = "Ni"
    s.positions += rng.normal(scale=0.08, size=s.positions.shape)
    s.append("Au")
    s.positions[-1] = s.positions[-2] + [0.3, 0.2, 2.1]
    out["slab"] = s
    m = Atoms("CuAu2Ni", positions=[[0, 0, 0], [2.3, 0.1, 0.2], [-0.4, 2.4, 0.3], [0.5, -0.3, 2.2]])
    out["molecule"] = m
    small = Atoms("CuAu", cell=[[2.6, 0.1, 0.0], [0.3, 2.5, 0.2], [0.1, -0.2, 2.7]],
                  scaled_positions=[[0, 0, 0], [0.45, 0.52, 0.48]], pbc=True)
    out["small_cell"] = small
    return out


def training_data(path: Path, n: int = 8):
    """EMT frames of random Cu/Au/Ni fcc cells with energies, forces and stresses."""
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    rng = np.random.default_rng(0)
    frames = []
    for _ in range(n):
        a = bulk("Cu", "fcc", a=3.7, cubic=True).repeat((2, 1, 1))
        a.symbols = list(rng.choice(SPECIES, size=len(a)))
        a.positions += rng.normal(scale=0.1, size=a.positions.shape)
        a.calc = EMT()
        e, f, s = a.get_potential_energy(), a.get_forces(), a.get_stress()
        a.calc = SinglePointCalculator(a, energy=e, forces=f, stress=s)
        frames.append(a)
    write(str(path), frames, format="extxyz")


def config(variant: str, opts: dict, data_file: Path) -> str:
    import yaml

    model = dict(_target_="nequip.model.NequIPGNNModel", seed=1, model_dtype="float64", type_names=SPECIES,
                 r_max=R_MAX, l_max=opts["l_max"], parity=opts["parity"], num_layers=opts["num_layers"],
                 num_features=opts["num_features"], radial_mlp_depth=opts["radial_mlp_depth"],
                 radial_mlp_width=opts["radial_mlp_width"], num_bessels=opts["num_bessels"],
                 polynomial_cutoff_p=opts["polynomial_cutoff_p"],
                 avg_num_neighbors="${training_data_stats:num_neighbors_mean}",
                 per_type_energy_shifts="${training_data_stats:per_atom_energy_mean}",
                 per_type_energy_scales="${training_data_stats:forces_rms}")
    if opts.get("per_type"):
        model["avg_num_neighbors"] = {"Cu": 7.5, "Au": 11.0, "Ni": 9.25}
        model["per_type_energy_scales"] = {"Cu": 0.7, "Au": 1.3, "Ni": 0.9}
        model["per_type_energy_shifts"] = {"Cu": -1.5, "Au": 0.25, "Ni": 2.0}
    if opts.get("avg_num_neighbors") is not None:
        model["avg_num_neighbors"] = opts["avg_num_neighbors"]
    for key in ("type_embed_num_features", "readout_mlp_hidden_layers_depth", "readout_mlp_hidden_layers_width",
                "per_edge_type_cutoff", "convnet_nonlinearity_type", "convnet_resnet"):
        if opts.get(key) is not None:
            model[key] = opts[key]
    if opts.get("zbl"):
        model["pair_potential"] = dict(_target_="nequip.nn.pair_potential.ZBL", units="metal",
                                       chemical_species=SPECIES)
    loader = dict(_target_="torch.utils.data.DataLoader", batch_size=2)
    cfg = dict(
        run=["train"],
        data=dict(_target_="nequip.data.datamodule.ASEDataModule", seed=1,
                  split_dataset=dict(file_path=str(data_file), train=6, val=2),
                  transforms=[dict(_target_="nequip.data.transforms.ChemicalSpeciesToAtomTypeMapper",
                                   model_type_names=SPECIES,
                                   chemical_species_to_atom_type_map={s: s for s in SPECIES}),
                              dict(_target_="nequip.data.transforms.NeighborListTransform", r_max=R_MAX)],
                  train_dataloader=loader, val_dataloader=loader,
                  stats_manager=dict(_target_="nequip.data.CommonDataStatisticsManager", type_names=SPECIES)),
        trainer=dict(_target_="lightning.Trainer", max_epochs=1, logger=False, enable_progress_bar=False,
                     callbacks=[dict(_target_="lightning.pytorch.callbacks.ModelCheckpoint",
                                     dirpath="${hydra:runtime.output_dir}", filename="last", save_last=False)]),
        training_module=dict(
            _target_="nequip.train.EMALightningModule",
            loss=dict(_target_="nequip.train.EnergyForceStressLoss", per_atom_energy=True,
                      coeffs=dict(total_energy=1.0, forces=1.0, stress=1.0)),
            val_metrics=dict(_target_="nequip.train.EnergyForceStressMetrics",
                             coeffs=dict(total_energy_mae=1.0, forces_mae=1.0, stress_mae=1.0)),
            optimizer=dict(_target_="torch.optim.Adam", lr=0.05),
            model=model),
        global_options=dict(allow_tf32=False),
    )
    return yaml.safe_dump(cfg, sort_keys=False)


def nequip_train(folder: Path) -> Path:
    """``nequip-train -cp FOLDER -cn config`` in this process: nequip's own hydra entry point
    (the console script's function), without paying a fresh interpreter and imports per variant."""
    from hydra.core.global_hydra import GlobalHydra
    from nequip.scripts import train
    from omegaconf import OmegaConf

    argv = sys.argv
    sys.argv = ["nequip-train", "-cp", str(folder), "-cn", "config", f"hydra.run.dir={folder}/run"]
    try:
        train.main()
    finally:
        sys.argv = argv
        # what a fresh process would not have: hydra's global state and nequip's per-run resolver
        GlobalHydra.instance().clear()
        OmegaConf.clear_resolver("training_data_stats")
    return folder / "run" / "last.ckpt"


def nequip_package(ckpt: Path, package: Path):
    """``nequip-package build CKPT PACKAGE`` (default packaging mode) in this process."""
    from nequip.scripts import package as nequip_package_cli

    nequip_package_cli.main(["build", str(ckpt), str(package)])


def evaluate(package: Path, systems) -> dict:
    from nequip.integrations.ase import NequIPCalculator

    calc = NequIPCalculator._from_saved_model(str(package), device="cpu")
    out = {}
    for name, atoms in systems.items():
        a = atoms.copy()
        a.calc = calc
        e = a.get_potential_energy()
        f = a.get_forces()
        s = a.get_stress(voigt=False) if a.pbc.all() else None
        out[name] = dict(energy=float(e), forces=f.tolist(), stress=None if s is None else s.tolist())
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    work.mkdir(exist_ok=True)
    data = work / "train.xyz"
    training_data(data)
    systems = structures()
    import nequip
    import e3nn.o3
    import torch
    ref = dict(versions=dict(nequip=nequip.__version__, e3nn=e3nn.__version__, torch=torch.__version__),
               structures={k: dict(numbers=a.numbers.tolist(), positions=a.positions.tolist(),
                                   cell=a.cell[:].tolist(), pbc=a.pbc.tolist()) for k, a in systems.items()},
               variants={})
    for variant in args.variants:
        start = time.time()
        opts = {**BASE, **VARIANTS[variant]}
        folder = work / variant
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        (folder / "config.yaml").write_text(config(variant, opts, data))
        ckpt = nequip_train(folder)
        trained = time.time()
        shutil.copy(ckpt, out / f"{variant}.ckpt")
        package = out / f"{variant}.nequip.zip"
        nequip_package(ckpt, package)
        packaged = time.time()
        ref["variants"][variant] = dict(file=package.name, checkpoint=f"{variant}.ckpt", options=opts,
                                        results=evaluate(package, systems))
        print(f"{variant}: train {trained - start:.1f} s, package {packaged - trained:.1f} s, "
              f"evaluate {time.time() - packaged:.1f} s", flush=True)
    # e3nn's coupling coefficients (the convention converted weights are folded with)
    ref["wigner_3j"] = {f"{l1},{l2},{l3}": e3nn.o3.wigner_3j(l1, l2, l3, dtype=torch.float64).tolist()
                        for l1 in range(4) for l2 in range(4) for l3 in range(abs(l1 - l2), min(l1 + l2, 3) + 1)}
    (out / "reference.json").write_text(json.dumps(ref))


if __name__ == "__main__":
    main()
