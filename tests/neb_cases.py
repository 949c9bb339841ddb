"""Reactions on catalysts for NEB tests and benchmarks: small slabs (bottom layer fixed) and bulk.

Each builder returns ``(initial, final)`` ASE Atoms with the same atoms in the same order,
unrelaxed; all elements are EMT's (and the shipped ``default`` model's).
"""
from ase.build import bulk, fcc100, fcc111

from potentials.data import hop_end_points, vacancy_end_points


def _slab(surface, metal, size, ads, height, site_a, site_b, **offsets):
    return hop_end_points(surface, metal, size, ads, height, (site_a, site_b),
                          (offsets.get("offset_a", (0, 0)), offsets.get("offset_b", (0, 0))))


def o_pt111():
    """O hop fcc → hcp on Pt(111) 3x3x3 (28 atoms)."""
    return _slab(fcc111, "Pt", (3, 3, 3), "O", 1.2, "fcc", "hcp")


def o_cu100():
    """O hop hollow → neighbouring hollow on Cu(100) 3x3x3 (28 atoms)."""
    return _slab(fcc100, "Cu", (3, 3, 3), "O", 0.9, "hollow", "hollow", offset_b=(1, 0))


def au_al100():
    """Au adatom hop hollow → hollow on Al(100) 3x3x3 (28 atoms; the ASE tutorial's system)."""
    return _slab(fcc100, "Al", (3, 3, 3), "Au", 1.7, "hollow", "hollow", offset_b=(1, 0))


def cu_vacancy():
    """A Cu atom hops into a nearest-neighbour vacancy in fcc Cu 2x2x2 (31 atoms, fully periodic)."""
    return vacancy_end_points(bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2)), 0)


def n_pd111_across_boundary():
    """N hop fcc → neighbouring hcp on Pd(111) 3x3x3 where the hcp site lies outside the cell and is
    stored wrapped to the far side: the end points differ by a lattice vector for that atom (a
    1.6 Å hop only with the minimum image)."""
    initial, final = _slab(fcc111, "Pd", (3, 3, 3), "N", 1.1, "fcc", "hcp", offset_b=(-1, 0))
    final.wrap()  # the N atom jumps to the other side of the cell; the path is one short hop
    return initial, final


REACTIONS = {"O/Pt(111) fcc-hcp": o_pt111, "O/Cu(100) hollow-hollow": o_cu100,
             "Au/Al(100) adatom hop": au_al100, "Cu vacancy hop": cu_vacancy,
             "N/Pd(111) across the cell boundary": n_pd111_across_boundary}
