from setuptools import Extension, setup

# The CPU cell list and edge tensor product are plain C loaded with ctypes (no Python or torch
# headers): they build in seconds. optional=True: without a C compiler the install still
# succeeds and the torch neighbor search and tensor product serve alone.
setup(ext_modules=[Extension("eqcalc._native._celllist", sources=["eqcalc/_native/celllist.c"],
                             extra_compile_args=["-O3"], optional=True),
                   Extension("eqcalc._native._tensor_product", sources=["eqcalc/_native/tensor_product.c"],
                             depends=["eqcalc/_native/tensor_product_body.h"],
                             extra_compile_args=["-O3", "-pthread", "-fopenmp-simd"], extra_link_args=["-pthread"], optional=True)])
