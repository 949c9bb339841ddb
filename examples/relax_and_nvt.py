"""Relax O on Pt(111) and run NVT at 500 K with the shipped default model.

    .venv/bin/python examples/relax_and_nvt.py
"""
from ase import units
from ase.build import add_adsorbate, fcc111
from ase.constraints import FixAtoms
from ase.md.langevin import Langevin
from ase.optimize import BFGS

from eqcalc import EquivariantCalculator

slab = fcc111("Pt", (3, 3, 4), vacuum=8.0)
add_adsorbate(slab, "O", 1.5, "fcc")
slab.set_constraint(FixAtoms(indices=[a.index for a in slab if a.tag >= 3]))  # bottom two layers
slab.calc = EquivariantCalculator("default")
BFGS(slab).run(fmax=0.05)
md = Langevin(slab, 1 * units.fs, temperature_K=500, friction=0.02 / units.fs, fixcm=False)
md.attach(lambda: print(f"T = {slab.get_temperature():6.1f} K  E = {slab.get_total_energy():.4f} eV"), interval=50)
md.run(500)
print("stress (eV/Å³):", slab.get_stress())
