"""Names, shapes, scopes and units of every field in a graph batch, stated once.

CONVENTIONS
-----------
Units inside eqcalc: energy eV, length Å, mass amu, time ASE units. Convert only at the edges
(command line, file I/O) and name units in argument names (``temperature_K``, ``timestep_fs``).

Cell rows are lattice vectors (ASE). A batch holds ``n_systems`` systems; atoms of system ``s``
are the atoms with ``system == s`` and are stored contiguously, systems in order.

Pair vector of edge ``e`` with ``i, j = edge_index[:, e]``::

    r_ij = positions[j] - positions[i] + shifts[e] @ cell[system[i]]

``edge_index[0]`` is the centre atom ``i``, ``edge_index[1]`` the neighbor ``j``. Lists are full
(both ``i→j`` and ``j→i`` are present) and hold every pair within the cutoff: no caps.

Stress: ``σ = (1/V) ∂E/∂ε`` for a symmetric strain ε applied to positions and cell, eV/Å³, with
ASE's sign (a compressed crystal has negative diagonal stress, pressure ``P = -tr σ / 3``).
``V = |det cell|``. Systems with no periodic direction have no stress. ASE's Voigt order is
``xx, yy, zz, yz, xz, xy``.

Positions and cells are float64 until they enter the model; the model runs in its own dtype;
energies are summed in float64. eqcalc never changes torch's global default dtype.
"""

# ---- inputs: scope "atom" ----------------------------------------------------------------
POSITIONS = "positions"          # (n_atoms, 3) float, Å
NUMBERS = "numbers"              # (n_atoms,) int64, atomic numbers Z
SPECIES = "species"              # (n_atoms,) int64, index into the model's species list
SYSTEM = "system"                # (n_atoms,) int64, index of the system each atom belongs to
# ---- inputs: scope "system" --------------------------------------------------------------
CELL = "cell"                    # (n_systems, 3, 3) float, Å, rows are lattice vectors
PBC = "pbc"                      # (n_systems, 3) bool
# ---- inputs: scope "edge" ----------------------------------------------------------------
EDGE_INDEX = "edge_index"        # (2, n_edges) int64, [0] centre i, [1] neighbor j
SHIFTS = "shifts"                # (n_edges, 3) float (integer values), cell shifts S
EDGE_VECTORS = "edge_vectors"    # (n_edges, 3) float, Å, r_ij as defined above
# ---- outputs -----------------------------------------------------------------------------
ENERGIES = "energies"            # (n_atoms,) float, eV, per-atom energies (scope atom)
ENERGY = "energy"                # (n_systems,) float64, eV, total energy per system
FORCES = "forces"                # (n_atoms, 3) float, eV/Å
STRESS = "stress"                # (n_systems, 3, 3) float, eV/Å³, full tensor (Voigt at the ASE edge)

ATOM_KEYS = (POSITIONS, NUMBERS, SPECIES, SYSTEM, ENERGIES, FORCES)
EDGE_KEYS = (EDGE_INDEX, SHIFTS, EDGE_VECTORS)
SYSTEM_KEYS = (CELL, PBC, ENERGY, STRESS)
