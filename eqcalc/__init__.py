"""eqcalc: fast, trustworthy equivariant interatomic potentials inside ASE.

Data flow, one module per room: :mod:`eqcalc.atoms` (validate, to tensors) →
:mod:`eqcalc.neighbors` → model (:mod:`eqcalc.model`, packages in :mod:`eqcalc.package`,
compiled forms in :mod:`eqcalc.compile`) → :mod:`eqcalc.derivatives` →
:class:`EquivariantCalculator` results. Conventions live in :mod:`eqcalc.keys`.
"""
__version__ = "0.1.0"

from eqcalc.calculator import EquivariantCalculator  # noqa: E402
from eqcalc.errors import EqcalcError  # noqa: E402
from eqcalc.model import Model  # noqa: E402
from eqcalc.neighbors import neighbor_list  # noqa: E402

__all__ = ["EquivariantCalculator", "EqcalcError", "Model", "neighbor_list", "__version__"]
