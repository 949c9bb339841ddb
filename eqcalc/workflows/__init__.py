"""Workflows built on the runtime and the engine: what a catalysis user runs end to end.

Each is also importable by its short name (``eqcalc.adsorption``, ``eqcalc.demo``, ...).
"""
