"""The batched engine: many systems advance as one batch on the device.

:mod:`~eqcalc.engine.md` holds the state dataclass and pure ``init``/``step`` integrators,
:mod:`~eqcalc.engine.relax` the batched optimizers, :mod:`~eqcalc.engine.drivers` the loops that
write trajectories, logs and checkpoints. Each is also importable by its short name
(``eqcalc.md``, ``eqcalc.relax``, ``eqcalc.drivers``).
"""
