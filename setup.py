from setuptools import Extension, setup

# The CPU cell list and edge tensor product are plain C loaded with ctypes (no Python or torch
# headers): they build in seconds. The tensor product's OpenMP (libgomp.so.1) is the copy torch
# loads: one thread pool. optional=True: without a C compiler the install still
# succeeds and the torch neighbor search and tensor product serve alone.
setup(ext_modules=[Extension("eqcalc._native._celllist", sources=["eqcalc/_native/celllist.c"],
                             extra_compile_args=["-O3"], optional=True),
                   *[Extension(f"eqcalc._native._tensor_product{suffix}", sources=["eqcalc/_native/tensor_product.c"],
                               depends=["eqcalc/_native/tensor_product_body.h"],
                               extra_compile_args=["-O3", "-fopenmp", *flags], extra_link_args=["-fopenmp"],
                               optional=True)
                     # baseline, and AVX2 + FMA for the CPUs that have them (eqcalc._native picks)
                     for suffix, flags in (("", []), ("_avx2", ["-mavx2", "-mfma"]))]])
