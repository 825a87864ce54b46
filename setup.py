"""Builds the optional C++ CPU kernels (csrc/) as fastagg._cpu.

One C++ file per fused op (merge, kd_loss, vocab_head, stage) and bindings.cpp, the only one that
includes pybind11. The extension needs only pybind11 and a C++17 compiler (no torch headers).
Without OpenMP it is built single-threaded; without a compiler the package still installs, with a
one-line warning, and fastagg uses its numba or torch kernels (``fastagg info`` says which and why).
"""

import glob
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    def build_extension(self, ext):
        attempts = [(ext.extra_compile_args, ext.extra_link_args, None),  # with OpenMP
                    ([f for f in ext.extra_compile_args if "openmp" not in f],
                     [f for f in ext.extra_link_args if "openmp" not in f],
                     "fastagg: WARNING: built the C++ kernels without OpenMP (single-threaded)")]
        for compile_args, link_args, warning in attempts:
            ext.extra_compile_args, ext.extra_link_args = compile_args, link_args
            try:
                super().build_extension(ext)
            except Exception as exc:  # compiler missing or failing: the package still installs
                error = exc
                continue
            if warning:
                print(warning, file=sys.stderr)
            return
        print(f"fastagg: WARNING: C++ kernels not built (the C++ compiler failed: {type(error).__name__}); "
              "numba or torch kernels will be used", file=sys.stderr)

    def run(self):
        try:
            super().run()
        except Exception as exc:
            print(f"fastagg: WARNING: C++ kernels not built ({exc}); numba or torch kernels will be used", file=sys.stderr)


def extensions():
    if os.environ.get("FASTAGG_NO_CPP") == "1":
        return []
    try:
        from pybind11.setup_helpers import ParallelCompile, Pybind11Extension
    except ImportError:
        print("fastagg: WARNING: pybind11 missing, C++ kernels not built", file=sys.stderr)
        return []
    ParallelCompile("FASTAGG_BUILD_JOBS").install()  # the op files compile side by side (all cores unless set)
    native = [] if os.environ.get("FASTAGG_PORTABLE") == "1" else ["-march=native"]
    return [Pybind11Extension("fastagg._cpu", sorted(glob.glob("csrc/*.cpp")), depends=["csrc/fastagg_cpu.h"],
                              cxx_std=17, extra_compile_args=["-O3", "-fopenmp", "-fno-math-errno", *native],
                              extra_link_args=["-fopenmp"])]


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
