"""eqcalc: fast, trustworthy equivariant interatomic potentials inside ASE.

Three layers, one room per file:

* the runtime, flat in this package: :mod:`eqcalc.atoms` (validate, to tensors) →
  :mod:`eqcalc.neighbors` → model (:mod:`eqcalc.model`, packages in :mod:`eqcalc.package`,
  compiled forms in :mod:`eqcalc.compile`) → :mod:`eqcalc.derivatives` →
  :class:`EquivariantCalculator` results. Conventions live in :mod:`eqcalc.keys`.
* the engine, :mod:`eqcalc.engine`: batched MD, relaxation, NEB and their drivers.
* the workflows, :mod:`eqcalc.workflows`: adsorption, vibrations, phonons, the demo.

Engine and workflow modules are also importable by their short names (``from eqcalc import md``,
``from eqcalc.neb import neb``): the names users and the design notes know.
"""
__version__ = "0.1.0"

import importlib
import importlib.abc
import importlib.util
import sys

_SHORT_NAMES = {
    **{f"eqcalc.{m}": f"eqcalc.engine.{m}" for m in ("md", "relax", "drivers", "neb")},
    **{f"eqcalc.{m}": f"eqcalc.workflows.{m}"
       for m in ("adsorption", "demo", "vibrations", "phonons", "distributed")},
}


class _ShortNames(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import eqcalc.md`` gives the very module object ``eqcalc.engine.md`` (no copy, no shim
    file): the import system re-reads ``sys.modules`` after ``exec_module``."""

    def find_spec(self, name, path=None, target=None):
        if name in _SHORT_NAMES and importlib.util.find_spec(_SHORT_NAMES[name]) is not None:
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        sys.modules[module.__name__] = importlib.import_module(_SHORT_NAMES[module.__name__])


if not any(isinstance(f, _ShortNames) for f in sys.meta_path):
    sys.meta_path.append(_ShortNames())

from eqcalc.calculator import EquivariantCalculator  # noqa: E402
from eqcalc.errors import EqcalcError  # noqa: E402
from eqcalc.model import Model  # noqa: E402
from eqcalc.neighbors import neighbor_list  # noqa: E402

__all__ = ["EquivariantCalculator", "EqcalcError", "Model", "neighbor_list", "__version__"]
