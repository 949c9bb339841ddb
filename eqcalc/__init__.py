"""eqcalc: fast, trustworthy equivariant interatomic potentials inside ASE."""
__version__ = "0.1.0"
