"""Builds the optional C++ CPU kernels (csrc/) as fastagg._cpu.

The extension needs only pybind11 and a C++17 compiler (no torch headers). Without OpenMP it is
built single-threaded; without a compiler the package still installs, with a one-line warning,
and fastagg uses its numba or torch kernels (``fastagg info`` says which and why).
"""

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    def build_extension(self, ext):
        flags = ext.extra_compile_args[:]
        try:
            super().build_extension(ext)
            return
        except Exception as exc:  # retry without OpenMP (e.g. clang without libomp)
            first = exc
        ext.extra_compile_args = [f for f in flags if "openmp" not in f]
        ext.extra_link_args = [f for f in ext.extra_link_args if "openmp" not in f]
        try:
            super().build_extension(ext)
            print("fastagg: WARNING: built the C++ kernels without OpenMP (single-threaded)", file=sys.stderr)
        except Exception as exc:
            print(f"fastagg: WARNING: C++ kernels not built (the C++ compiler failed: {type(exc).__name__}); "
                  "numba or torch kernels will be used", file=sys.stderr)
            del first

    def run(self):
        try:
            super().run()
        except Exception as exc:
            print(f"fastagg: WARNING: C++ kernels not built ({exc}); numba or torch kernels will be used", file=sys.stderr)


def extensions():
    if os.environ.get("FASTAGG_NO_CPP") == "1":
        return []
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError:
        print("fastagg: WARNING: pybind11 missing, C++ kernels not built", file=sys.stderr)
        return []
    native = [] if os.environ.get("FASTAGG_PORTABLE") == "1" else ["-march=native"]
    return [Pybind11Extension("fastagg._cpu", ["csrc/fastagg_cpu.cpp"], cxx_std=17,
                              extra_compile_args=["-O3", "-fopenmp", "-fno-math-errno", *native],
                              extra_link_args=["-fopenmp"])]


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
