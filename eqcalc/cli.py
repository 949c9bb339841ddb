"""The ``eqcalc`` command line: thin shells over library functions.

Every command has ``--help`` with an example; logs say what happened and how long it took.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

log = logging.getLogger("eqcalc")


# ---- option types: a bad number is an argparse error naming the option and what it must be --
def _number(kind, test, what):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value
    parse.__name__ = what  # argparse shows it in "invalid <name> value"
    return parse


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
nonnegative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: _finite(v) and v > 0, "a finite number > 0")
nonnegative_float = _number(float, lambda v: _finite(v) and v >= 0, "a finite number >= 0")


def _speed_structure(species):
    """About 100 atoms of the model's heaviest element with an ASE reference crystal, rattled."""
    from ase.build import bulk
    from ase.data import atomic_numbers

    for symbol in sorted(species, key=lambda s: -atomic_numbers[s]):
        try:
            atoms = bulk(symbol, cubic=True)
        except (ValueError, KeyError, RuntimeError):  # no reference crystal structure (H, N, O...)
            continue
        atoms = atoms.repeat([max(1, round((100 / len(atoms)) ** (1 / 3)))] * 3)
        atoms.rattle(0.05, seed=0)
        return atoms
    return None


def _info(args) -> int:
    from eqcalc import package

    pkg = package.read(package.resolve(args.model))
    m = pkg.metadata
    if args.json:
        print(json.dumps(m, indent=2, ensure_ascii=False))
        return 0
    training = dict(m.get("training") or {})
    data = training.pop("data", None) or {}
    metrics = training.pop("test_metrics", None) or {}
    print(f"model      {pkg.path}")
    print(f"arch       {m['architecture']}  ({m.get('n_parameters', '?')} parameters, {m['dtype']}"
          f", frame averaging {m.get('frame_averaging', 'none')})")
    print(f"species    {' '.join(m['species'])}")
    print(f"cutoff     {m['cutoff']} Å")
    print(f"forces     {', '.join(m['force_modes'])}; stress {'yes' if m.get('stress', True) else 'no'}")
    print(f"written by eqcalc {m['eqcalc_version']}, torch {m['torch_version']}, schema {m['schema_version']}")
    print(f"weights    sha256 {m['weights_sha256'][:16]}…")
    if data:
        print(f"data       {data.get('n_frames')} frames of {data.get('reference', '?')} "
              f"({data.get('file', '?')}), splits {data.get('splits')}, kinds {data.get('kinds')}")
    if metrics:
        print("test       " + ", ".join(f"{k} {v:.3g}" for k, v in metrics.items() if k != "loss"))
    for k, v in training.items():
        print(f"training   {k}: {v}")
    print("hyperparameters " + json.dumps(m["config"]))
    atoms = None if args.no_speed else _speed_structure(m["species"])
    if atoms is not None:
        from eqcalc.calculator import EquivariantCalculator
        from eqcalc.compile import best_time

        calc = EquivariantCalculator(args.model, compile="eager")
        atoms.calc = calc
        step = lambda: calc.calculate(atoms, ["energy", "forces", "stress"])  # noqa: E731
        seconds = best_time(step, repeats=5)
        print(f"speed      {seconds * 1e3:.1f} ms per energy+forces+stress step on "
              f"{atoms.get_chemical_formula()}, rattled crystal ({len(atoms) / seconds:,.0f} atom-steps/s; "
              f"{calc.model.device}, eager, {torch_threads()} threads, measured now)")
    return 0


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _export(args) -> int:
    import shutil
    from pathlib import Path

    import torch

    from eqcalc import compile as compiled
    from eqcalc.model import Model

    start = time.perf_counter()
    model = Model(args.model, device=args.device, forces=args.forces, compile="eager", dtype=args.dtype)
    out = Path(args.output or f"{Path(model.package.path).stem}.{args.format}.{'pt2' if args.format == 'aoti' else 'pt'}")
    probe = model.probe_inputs()
    if args.format == "torchscript":
        compiled.torchscript(model.wrapper).save(str(out))
    else:
        key = model.aoti_key()
        runner = compiled.aoti(model.wrapper, probe, key)
        error = compiled.max_relative_error(runner(*probe), model.wrapper(*probe))
        log.info("AOTInductor vs eager on the probe: max relative error %.2e", error)
        shutil.copyfile(compiled.aoti_path(key), out)
    meta = dict(model.metadata, export={
        "format": args.format, "device": str(model.device), "dtype": model.dtype, "forces": model.forces,
        "torch_version": torch.__version__,
        "inputs": "positions (n_atoms,3) f64, cell (n_systems,3,3) f64, species (n_atoms,) i64, "
                  "edge_index (2,n_edges) i64, shifts (n_edges,3) f64, system (n_atoms,) i64",
        "outputs": "energy (n_systems,) f64 eV, energies (n_atoms,), forces (n_atoms,3) eV/Å, "
                   "stress (n_systems,3,3) eV/Å^3"})
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    print(f"wrote {out} and {out.with_suffix('.json')} in {time.perf_counter() - start:.1f} s")
    return 0


def _convert(args) -> int:
    import os

    from eqcalc import package
    from potentials.convert import convert

    start = time.perf_counter()
    out = convert(args.source, args.output, head=args.head, nequip_python=args.nequip_python)
    meta = package.read(str(out)).metadata
    src = meta["source"]
    if "nequip_version" in src:
        what, origin = f"{src['model_builder']}", f"nequip {src['nequip_version']}"
    else:
        what, origin = f"{src['model_class']} (head {src['head']!r} of {src['heads']})", f"mace-torch {src['mace_version']}"
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s: {what}, {len(meta['species'])} species, "
          f"cutoff {meta['cutoff']} Å, {meta['dtype']}, {meta['n_parameters']:,} parameters; "
          f"{os.path.getsize(out) / 1e6:.1f} MB from {os.path.getsize(args.source) / 1e6:.1f} MB ({origin}, "
          f"sha256 {src['sha256'][:16]}…). Use it with EquivariantCalculator({str(out)!r})")
    return 0


def _bench(args) -> int:
    from eqcalc import bench

    bench.main(args)
    return 0


def _datagen(args) -> int:
    start = time.perf_counter()
    if args.reference == "xtb":
        from potentials.molecules import generate_molecules

        path = generate_molecules(args.output, args.n_structures, molecules=args.molecules or ("CH3CH2OH",),
                                  seed=args.seed, temperature_K=args.temperature_K, progress=args.progress)
        label = "GFN2-xTB"
    else:
        from potentials import data

        kwargs = {"elements": args.elements} if args.elements else {}
        path = data.generate(args.output, args.n_structures, seed=args.seed, progress=args.progress, **kwargs)
        label = "EMT"
    print(f"wrote {args.n_structures} {label}-labelled frames to {path} in {time.perf_counter() - start:.1f} s")
    return 0


def _train(args) -> int:
    from pathlib import Path

    from eqcalc.errors import InvalidOptionError
    from potentials.make_models import load_recipe, parse_overrides
    from potentials.train import train

    if not Path(args.config).is_file():
        raise InvalidOptionError(f"recipe {args.config!r} does not exist; see potentials/recipes/*.yaml for examples")
    config = load_recipe(args.config)
    if not isinstance(config, dict):
        raise InvalidOptionError(f"recipe {args.config!r} is not a mapping of training options (key: value)")
    config.update(parse_overrides(args.set))
    start = time.perf_counter()
    path = train(config)
    print(f"wrote {path} in {time.perf_counter() - start:.1f} s")
    return 0


EPILOGS = {
    "demo": "example:\n  eqcalc demo\n  eqcalc demo --steps 2000 --temperature-K 700 --output-dir run1",
    "info": "example:\n  eqcalc info default\n  eqcalc info my_model.eqm --json\n  eqcalc info schnet --no-speed",
    "export": "example:\n  eqcalc export default --format aoti -o painn.pt2\n"
              "  eqcalc export my_model.eqm --format torchscript --dtype float64",
    "convert": "example:\n  eqcalc convert 2023-12-03-mace-128-L1_epoch-199.model mace-mp0-medium.eqm\n"
               "  eqcalc convert multihead.model omat.eqm --head omat_pbe\n"
               "  eqcalc convert my_model.nequip.zip my_model.eqm\n"
               "  eqcalc convert outputs/last.ckpt my_model.eqm --nequip-python ~/nequip-env/bin/python\n"
               "nothing in the source file is run: it is read by a restricted reader that refuses "
               "anything but model data",
    "bench": "example:\n  eqcalc bench --what neighbors\n  eqcalc bench --what model --model painn.eqm --atoms 864",
    "datagen": "example:\n  eqcalc datagen emt.xyz --n-structures 200 --seed 0\n"
               "  eqcalc datagen cu.xyz --n-structures 50 --seed 1 --elements Cu C O\n"
               "  eqcalc datagen ethanol.xyz --reference xtb --molecules CH3CH2OH --n-structures 500",
    "train": "example:\n  eqcalc train potentials/recipes/schnet.yaml\n"
             "  eqcalc train my_recipe.yaml --set max_steps=100 --set output=my_model.eqm",
    "md": "example:\n  eqcalc md slab.extxyz bulk.extxyz --ensemble nvt --thermostat bussi --temperature-K 500 "
          "--timestep-fs 1 --steps 5000 --interval 50 --output-dir run1\n"
          "  eqcalc md run1/slab.extxyz --ensemble nve --steps 1000 --checkpoint-interval 100 --output-dir run2\n"
          "  eqcalc md slab.extxyz --steps 10000 --output-dir run2 --checkpoint-interval 100 --restart run2/checkpoint.pt\n"
          "  eqcalc md inputs/*.extxyz --steps 2000 --scheduler tcp://head:8786 --db md.db   # on a Dask cluster",
    "relax": "example:\n  eqcalc relax slab.extxyz co.xyz --fmax 0.02 --output-dir relaxed\n"
             "  eqcalc relax Cu.cif --cell --fmax 0.01 --optimizer lbfgs --output-dir relaxed\n"
             "  eqcalc relax inputs/*.extxyz --scheduler tcp://head:8786 --db results.db   # on a Dask cluster\n"
             "  eqcalc relax inputs/*.extxyz --db results.db   # this machine; a rerun skips what is done",
    "neb": "example:\n  eqcalc neb is.extxyz fs.extxyz --images 7 --fmax 0.03 --output-dir hop\n"
           "  eqcalc neb o_fcc.xyz o_hcp.xyz vac_a.xyz vac_b.xyz --images 9 --optimizer lbfgs --output-dir paths\n"
           "  eqcalc neb a.extxyz b.extxyz --no-relax-endpoints --interpolation linear --no-climb\n"
           "  eqcalc neb a_is.xyz a_fs.xyz b_is.xyz b_fs.xyz --scheduler tcp://head:8786 --db neb.db   # on a Dask cluster",
    "adsorption": "example:\n  eqcalc adsorption pt111.extxyz --adsorbate CO --fmax 0.05 --output-dir co_pt111\n"
                  "  eqcalc adsorption cu111.extxyz --adsorbate O --sites ontop hollow --distance 1.5\n"
                  "  eqcalc adsorption slabs/*.extxyz --adsorbate O OH CO --scheduler tcp://head:8786 --db ads.db",
    "vib": "example:\n  eqcalc vib o_pt111.extxyz co_pt111.extxyz --temperature-K 500 --output-dir vib\n"
           "  eqcalc vib slab_with_h.extxyz --indices 36 --dtype float64",
    "phonons": "example:\n  eqcalc phonons Cu_primitive.cif --supercell 4 4 4 --output-dir cu_phonons\n"
               "  eqcalc phonons Pt.extxyz --method hessian --dtype float64",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="eqcalc", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run trained equivariant interatomic potentials inside ASE.",
        epilog="example:\n  eqcalc demo\n  eqcalc info default\n  eqcalc bench --what neighbors")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name, help_):
        return sub.add_parser(name, help=help_, description=help_, epilog=EPILOGS[name],
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    from eqcalc.workflows import demo

    c = command("demo", "Pt(111)+CO: relax with the default model vs EMT, short NVT at 500 K, plot and summary")
    demo.add_arguments(c)
    c.set_defaults(func=demo.main)

    c = command("info", "print a model's card: architecture, species, cutoff, data, test metrics, speed")
    c.add_argument("model", help="shipped model name or .eqm path")
    c.add_argument("--json", action="store_true", help="print the full metadata as JSON")
    c.add_argument("--no-speed", action="store_true", help="skip timing a step on this machine")
    c.set_defaults(func=_info)

    c = command("export", "write a compiled model (AOTInductor .pt2 or TorchScript) plus its metadata JSON")
    c.add_argument("model", help="shipped model name or .eqm path")
    c.add_argument("--format", choices=["aoti", "torchscript"], default="aoti")
    c.add_argument("-o", "--output", help="output file (default: MODEL.FORMAT.pt2/.pt)")
    c.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    c.add_argument("--dtype", choices=["float32", "float64"], default=None, help="default: the model's own")
    c.add_argument("--forces", choices=["auto", "conservative", "direct"], default="auto")
    c.set_defaults(func=_export)

    c = command("convert", "convert a mace-torch .model file, a nequip .nequip.zip package or a nequip "
                           ".ckpt checkpoint into an eqcalc .eqm package (same numbers, no mace/nequip/e3nn "
                           "needed to run it)")
    c.add_argument("source", help="mace-torch .model file (torch.save of the model), nequip package "
                                  "(.nequip.zip from nequip-package build) or nequip training checkpoint (.ckpt)")
    c.add_argument("output", help="the .eqm package to write")
    c.add_argument("--head", default=None,
                   help="multi-head mace files: the head to keep (default: the only head, or 'default')")
    c.add_argument("--nequip-python", default=None,
                   help="checkpoints: python of an environment with nequip, which packages the checkpoint "
                        "first (default: $EQCALC_NEQUIP_PYTHON, else nequip-package on PATH)")
    c.set_defaults(func=_convert)

    c = command("bench", "time neighbor lists against vesin/matscipy/ASE, or a model's step in each compiled form")
    c.add_argument("--what", choices=["neighbors", "model"], default="neighbors")
    c.add_argument("--model", default=None, help="model for --what model (default: an untrained PaiNN)")
    c.add_argument("--atoms", type=positive_int, nargs="+", default=None, help="system sizes (Cu fcc supercells)")
    c.add_argument("--device", default="cpu")
    c.add_argument("--repeats", type=positive_int, default=7, help="best of this many calls after a warm-up")
    c.add_argument("--output-dir", default="benchmarks/results", help="where CSV and PNG go")
    c.set_defaults(func=_bench)

    c = command("datagen", "write reference frames to extxyz: EMT catalysts (slabs, adsorbates, bulk, gas) "
                           "or GFN2-xTB molecules from MD (needs the xtb extra)")
    c.add_argument("output", help="output .xyz file (extxyz)")
    c.add_argument("--n-structures", type=positive_int, required=True, help="number of frames to write (>= 1)")
    c.add_argument("--seed", type=nonnegative_int, default=0, help="same seed and arguments give an identical file")
    c.add_argument("--elements", nargs="+", default=None,
                   help="EMT: elements to use (default: Al Ni Cu Pd Ag Pt Au H C N O)")
    c.add_argument("--reference", choices=["emt", "xtb"], default="emt",
                   help="emt: catalyst domain (ASE EMT); xtb: organic molecules by GFN2-xTB MD (tblite)")
    c.add_argument("--molecules", nargs="+", default=None,
                   help="xtb: ASE g2 molecule names (default: CH3CH2OH)")
    c.add_argument("--temperature-K", type=positive_float, default=500.0, help="xtb: MD temperature (default 500)")
    c.add_argument("--progress", action="store_true", help="show a progress bar")
    c.set_defaults(func=_datagen)

    c = command("train", "train a model from a YAML recipe (see potentials/recipes) and write its .eqm package")
    c.add_argument("config", help="YAML training recipe (keys of potentials.train.DEFAULTS)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set max_steps=100")
    c.set_defaults(func=_train)

    from eqcalc.engine import drivers  # the engine's shells: eqcalc md, relax, adsorption

    c = command("md", "batched MD of all inputs on the device (NVE, or NVT with Langevin/Bussi/Nose-Hoover), "
                      "extxyz trajectories, log, checkpoints")
    drivers.add_md_arguments(c)
    c.set_defaults(func=drivers.md_main)

    c = command("relax", "relax all inputs as one batch (FIRE, FixAtoms, optional cell for bulk)")
    drivers.add_relax_arguments(c)
    c.set_defaults(func=drivers.relax_main)

    c = command("neb", "minimum energy paths and barriers (climbing-image NEB) of many reactions as one batch")
    drivers.add_neb_arguments(c)
    c.set_defaults(func=drivers.neb_main)

    from eqcalc.workflows import adsorption, phonons, vibrations

    c = command("adsorption", "adsorption energies of a molecule on every site of a slab, relaxed as one batch")
    adsorption.add_arguments(c)
    c.set_defaults(func=adsorption.main)

    c = command("vib", "harmonic vibrations of all inputs in one batch (autograd Hessian): frequencies, "
                       "ZPE, free energy, mode animations")
    vibrations.add_arguments(c)
    c.set_defaults(func=vibrations.main)

    c = command("phonons", "phonon band structure and DOS of a crystal with phonopy (needs the phonons extra)")
    phonons.add_arguments(c)
    c.set_defaults(func=phonons.main)
    return p


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse printed the usage error (exit 2) or --help (exit 0)
        return e.code
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    from eqcalc.errors import EqcalcError
    from eqcalc.memory import reuse_freed_memory

    reuse_freed_memory()  # this process is a simulation: large step temporaries reuse the heap
    start = time.perf_counter()
    try:
        code = args.func(args)
    except EqcalcError as e:
        print(f"eqcalc {args.command}: error: {e}", file=sys.stderr)
        return 2
    log.info("eqcalc %s finished in %.1f s", args.command, time.perf_counter() - start)
    return code


if __name__ == "__main__":
    sys.exit(main())
