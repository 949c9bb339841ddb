"""Architectures (SchNet, PaiNN, ...) for eqcalc, their registry, and model packages.

``potentials.build("painn", species=["Cu", "O"], cutoff=5.0)`` gives a seeded, untrained model;
``potentials.convert("mace.model", "mace.eqm")`` converts a mace-torch model.
"""
from potentials.registry import ARCHITECTURES, architectures, build, from_config, register
from potentials import schnet, painn, faenet  # noqa: F401  (importing registers them)
from potentials import mace, nequip  # noqa: F401  (tensor-product architectures)
from potentials import dimenet, gemnet  # noqa: F401  (angular architectures)

from potentials.package import load, save
from potentials import convert  # callable: potentials.convert(source, output, head=None)

__all__ = ["ARCHITECTURES", "architectures", "build", "from_config", "register", "save", "load", "convert"]
