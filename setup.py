from setuptools import Extension, setup

# The CPU cell list is plain C loaded with ctypes (no Python or torch headers): it builds in
# seconds. optional=True: without a C compiler the install still succeeds and the torch
# neighbor search serves alone.
setup(ext_modules=[Extension("eqcalc._native._celllist", sources=["eqcalc/_native/celllist.c"],
                             extra_compile_args=["-O3"], optional=True)])
