"""Regenerate the shipped models from their recipes.

    nice -n 15 python -m potentials.make_models            # every recipe (default, schnet)
    nice -n 15 python -m potentials.make_models default    # one recipe
    python -m potentials.make_models default --set max_steps=50 --set output=/tmp/m.eqm

Run from the repository root. Each recipe ``potentials/recipes/NAME.yaml`` is a training
config (see :mod:`potentials.train`); the EMT reference data is generated on first use
(``generate:`` in the recipe) into ``build/potentials/`` and shared by the recipes.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Dict

RECIPES = Path(__file__).resolve().parent / "recipes"


def _scalar(text: str) -> Any:
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1].strip()
        return [_scalar(x) for x in inner.split(",")] if inner else []
    if text in ("null", "~", ""):
        return None
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip("'\"")


def load_recipe(path: str | Path) -> Dict[str, Any]:
    """Read a recipe: PyYAML when installed, else the YAML subset the recipes use
    (``key: value`` with nested mappings by indentation, ``[a, b]`` flow lists and block lists
    of mappings, ``- key: value`` items)."""
    text = Path(path).read_text()
    try:
        import yaml
    except ImportError:
        yaml = None
    if yaml is not None:
        return yaml.safe_load(text)
    root: Dict[str, Any] = {}
    stack = [(-1, root, None, None)]  # (indent, mapping, its owner, its key in the owner)
    for raw in text.splitlines():
        line = raw.split(" #")[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        body = line.strip()
        while stack[-1][0] >= indent:
            stack.pop()
        if body.startswith("- "):
            # A list item: the mapping opened for its key becomes a list, the item a new mapping.
            _, _, owner, key = stack[-1]
            if not isinstance(owner[key], list):
                owner[key] = []
            owner[key].append({})
            stack.append((indent, owner[key][-1], None, None))
            body, indent = body[2:].strip(), indent + 2
        key, _, value = body.partition(":")
        parent = stack[-1][1]
        if value.strip() == "":
            parent[key] = {}
            stack.append((indent, parent[key], parent, key))
        else:
            parent[key] = _scalar(value)
    return root


def parse_overrides(items) -> Dict[str, Any]:
    """``["key=value", ...]`` (``--set`` arguments) as a dict, values parsed like recipe scalars."""
    overrides: Dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            from eqcalc.errors import InvalidOptionError
            raise InvalidOptionError(f"--set {item!r}: expected KEY=VALUE, e.g. --set max_steps=100")
        overrides[key.strip()] = _scalar(value)
    return overrides


def make(name: str, overrides: Dict[str, Any] | None = None) -> Path:
    """Train recipe ``name`` and write its model; returns the model path."""
    from potentials.train import train

    config = load_recipe(RECIPES / f"{name}.yaml")
    config.update(overrides or {})
    check = bool(config.pop("adsorption_check", False))
    start = time.perf_counter()
    path = train(config)
    if check:
        add_adsorption_check(path)
    metrics = json.loads((Path(config["work_dir"]) / "metrics.json").read_text())
    print(f"{name}: wrote {path} in {time.perf_counter() - start:.0f} s; test energy MAE "
          f"{metrics['test_energy_mae_meV_per_atom']:.1f} meV/atom, force MAE "
          f"{metrics['test_forces_mae_meV_per_A']:.0f} meV/Å, stress MAE "
          f"{metrics['test_stress_mae_meV_per_A3']:.2f} meV/Å³ ({metrics['steps']} steps)")
    return path


def add_adsorption_check(path: Path) -> Dict[str, Any]:
    """Run :mod:`potentials.adsorption_check` on the model at ``path`` and store its summary
    in the package's ``training["adsorption_vs_emt"]`` (shown by ``eqcalc info``)."""
    import potentials
    from eqcalc import EquivariantCalculator, package
    from eqcalc.model import Model
    from potentials import adsorption_check

    model = Model(str(path), compile="eager")
    rows = adsorption_check.run_cases(lambda: EquivariantCalculator(model))
    result = adsorption_check.summary(rows)
    training = dict(package.read(path).metadata.get("training") or {})
    training["adsorption_vs_emt"] = result
    potentials.save(potentials.load(path), path, training=training)
    print(f"adsorption vs EMT: {result}")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="*", help="recipe names (default: all in potentials/recipes)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. --set max_steps=100")
    args = parser.parse_args(argv)
    names = args.recipes or sorted(p.stem for p in RECIPES.glob("*.yaml"))
    overrides = parse_overrides(args.set)
    for name in names:
        make(name, overrides)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
