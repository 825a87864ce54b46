"""Every Triton kernel compiles for a Hopper GPU (sm_90) on this GPU-less machine: Triton's
compiler and bundled ptxas take each one to a cubin, per dtype the library launches it with
(bench/compile_sm90.py; the interpreter that runs the other kernel tests never compiles them)."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)


def test_every_triton_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's own default; set to keep its warning quiet
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "compile_sm90.py"), "--quick"],
                          env=env, capture_output=True, text=True, timeout=1200)
    report = proc.stdout + proc.stderr[-4000:]
    assert proc.returncode == 0, report
    assert "FAIL" not in proc.stdout and "kernels compiled for sm_90" in proc.stdout, report
