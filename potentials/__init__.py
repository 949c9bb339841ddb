"""Architectures (SchNet, PaiNN, ...) for eqcalc, their registry, and model packages.

``potentials.build("painn", species=["Cu", "O"], cutoff=5.0)`` gives a seeded, untrained model.
"""
from potentials.registry import ARCHITECTURES, architectures, build, from_config, register
from potentials import schnet, painn, faenet  # noqa: F401  (importing registers them)
from potentials import mace, nequip  # noqa: F401  (tensor-product architectures)
from potentials import dimenet, gemnet  # noqa: F401  (angular architectures)

from potentials.package import load, save

__all__ = ["ARCHITECTURES", "architectures", "build", "from_config", "register", "save", "load"]
