"""Builds the native re-ranking kernel (csrc/) with pybind11; it is required, not optional."""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ext = Pybind11Extension(
    "retrieval._kernel",
    sources=["csrc/kernel.cpp", "csrc/kernel_generic.cpp", "csrc/kernel_avx2.cpp", "csrc/kernel_avx512.cpp"],
    cxx_std=17,
    # Portable baseline: the AVX2/AVX-512 paths are compiled per function with target
    # attributes and chosen at run time, so the wheel runs on any x86-64.
    extra_compile_args=["-O3", "-fopenmp"],
    extra_link_args=["-fopenmp"],
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
