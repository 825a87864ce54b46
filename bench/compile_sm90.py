"""Compile every fastagg Triton kernel for a Hopper GPU (sm_90: H100 / H200) on a machine without
one: Triton's own compiler and its bundled ptxas take each kernel to a cubin, for each autotune
config and each dtype the library launches it with. This catches what the interpreter cannot —
code that only a GPU build compiles (constexpr branches, dtype handling, layouts, shared memory
that does not fit) — before a device session spends its minutes on it. Each line also gives the
cubin's registers per thread and its stack (spilled registers, bytes per thread; from the bundled
cuobjdump), the one performance figure a machine without a GPU can read, and how many of its
loads are pipelined into shared memory (cp.async; compiled with the alignment a launch of fresh
tensors gives the pointers, ``hints``).

    python bench/compile_sm90.py            # prints one line per kernel, exits 1 on a failure
    python bench/compile_sm90.py --quick    # the first autotune config and 3x3 convolutions only (CI)

Runs without TRITON_INTERPRET (under the interpreter ``triton.jit`` gives no compilable kernel).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET", "0") != "0":
    sys.exit("compile_sm90: unset TRITON_INTERPRET (the interpreter's kernels cannot be compiled)")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, compile  # noqa: E402

from fastagg.kernels import grouped_conv as gc  # noqa: E402
from fastagg.kernels import kd_loss, merge  # noqa: E402
from fastagg.kernels import shared_conv as sc  # noqa: E402
from fastagg.kernels import vocab_head as vh  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
FLOATS = {"c0", "inv_T", "grad_scale", "scale"}  # the kernels' fp32 scalars; every other plain argument is an integer


# Integer arguments that the runtime specialises as multiples of 16 for the bench's models (Triton
# does so for every integer argument not in do_not_specialize whose value is one): the per-student
# strides and output channels of the rows gradients (`cnn`: 256 * 16 * 16 * 32, 64), and the columns kernels'
# row length (`cnn`: 96) and pooled sizes (16 x 16 windows, 32 channels a student).
DIV16 = {"_conv_wgrad_rows": ("sdk", "sxk", "swk", "swo", "swr", "CO"), "_conv_rows": ("sxk", "swk", "syk", "CO"),
         "_shared_fwd_relu_pool_columns": ("CRSP", "PHO", "PWO", "CO"),
         "_shared_wgrad_relu_pool_columns": ("CRSP", "PHO", "PWO", "CO"),
         # the head route's chunks (`lm`: 16 students, 512 rows, chunks of 4,096 of 32,000 columns)
         "_head_stats_kernel": ("zs_k", "zs_r", "ps_r", "R", "NC"),
         "_head_grad_kernel": ("zs_k", "zs_r", "ps_r", "dbs_k", "R", "NC")}


def hints(fn, pointers):
    """The divisibility attributes a launch gives ``fn``: every pointer 16-byte aligned (a fresh
    tensor's storage is; Triton specialises on it), and the integers in DIV16. Without them the
    compiler knows no alignment, so it neither vectorises a load nor pipelines it into shared
    memory (cp.async): until the twenty-second session this script compiled without them, and its
    registers, spills and shared memory were those of scalar, unpipelined kernels."""
    names = list(fn.arg_names)
    div = [n for n in names if n in pointers or n in DIV16.get(fn.__name__, ())]
    return {(names.index(n),): [["tt.divisibility", 16]] for n in div}


def signature(fn, pointers, constexprs, int_type="i32"):
    """Triton signature of ``fn``: pointer arguments typed by ``pointers``, constexprs named."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = "*" + pointers[name]
        else:
            sig[name] = "fp32" if name in FLOATS else int_type
    return sig


def cases(quick=False):
    """(label, JITFunction, pointer dtypes, constexprs, num_warps, num_stages, integer type)."""
    conv = {"3x3": dict(SH=1, SW=1, PH=1, PW=1, R=3, S=3), "1x1/2": dict(SH=2, SW=2, PH=0, PW=0, R=1, S=1)}
    if quick:
        del conv["1x1/2"]
    for dt, tf32 in (("fp32", True), ("fp32", False), ("bf16", False)):
        for geo, c in conv.items():
            for tuner, extra, ptrs in (
                    (gc._conv_fwd, {"HAS_BIAS": True, "OFF64": False}, dict(x_ptr=dt, w_ptr=dt, b_ptr=dt, y_ptr=dt)),
                    (gc._conv_fwd_relu_pool, {"HAS_BIAS": True, "OFF64": False},
                     dict(x_ptr=dt, w_ptr=dt, b_ptr=dt, y_ptr=dt, code_ptr="i8")),
                    (gc._conv_dgrad, {"OFF64": False}, dict(dy_ptr=dt, w_ptr=dt, dx_ptr=dt)),
                    (gc._conv_wgrad, {"SPLIT": 1}, dict(dy_ptr=dt, x_ptr=dt, dw_ptr="fp32")),
                    (gc._conv_wgrad, {"SPLIT": 4}, dict(dy_ptr=dt, x_ptr=dt, dw_ptr="fp32"))):
                for cfg in tuner.configs[:1] if quick else tuner.configs:
                    consts = {**c, **extra, "TF32": tf32, **cfg.kwargs}
                    label = f"{tuner.fn.__name__} {dt}{' tf32' if tf32 else ''} {geo} {extra} {cfg.kwargs}"
                    yield label, tuner.fn, ptrs, consts, cfg.num_warps, cfg.num_stages, "i32"
    # the chain on the shared proxy batch (cnn's first layer: 5x5, padding 2)
    chain = {"5x5": dict(SH=1, SW=1, PH=2, PW=2, R=5, S=5), "3x3": conv["3x3"]}
    if quick:
        del chain["3x3"]
    for dt, tf32 in (("fp32", True), ("bf16", False)):
        for geo, c in chain.items():
            for tuner, extra, ptrs in (
                    (sc._shared_fwd_relu_pool, {"HAS_BIAS": True, "OFF64": False},
                     dict(x_ptr=dt, w_ptr=dt, b_ptr="fp32", y_ptr=dt, code_ptr="i8")),
                    (sc._shared_wgrad_relu_pool, {"HAS_BIAS": True, "SPLIT": 8, "OFF64": False},
                     dict(x_ptr=dt, dp_ptr=dt, code_ptr="i8", dw_ptr="fp32", db_ptr="fp32"))):
                for cfg in tuner.configs[:1] if quick else tuner.configs:
                    consts = {**c, **extra, "TF32": tf32, **cfg.kwargs}
                    label = f"{tuner.fn.__name__} {dt}{' tf32' if tf32 else ''} {geo} {extra} {cfg.kwargs}"
                    yield label, tuner.fn, ptrs, consts, cfg.num_warps, cfg.num_stages, "i32"
    # the chain's resident forward (eighteenth session): its configs' own BM, BN, JT; KA + KB = 64 + 16
    # for 5x5 on 3 channels (C*R*S = 75), 16 + 16 for 3x3 on 3 (27)
    for dt, tf32 in (("fp32", True), ("bf16", False)):
        for geo, c in chain.items():
            ka, kb = sc.resident_chunks(3 * c["R"] * c["S"])
            tuner = sc._shared_fwd_relu_pool_resident
            for off64 in (False, True):
                for cfg in tuner.configs[:1] if quick or off64 else tuner.configs:
                    consts = {**c, "HAS_BIAS": True, "OFF64": off64, "TF32": tf32, "KA": ka, "KB": kb, **cfg.kwargs}
                    label = f"{tuner.fn.__name__} {dt}{' tf32' if tf32 else ''} {geo} OFF64={off64} {cfg.kwargs}"
                    yield (label, tuner.fn, dict(x_ptr=dt, w_ptr=dt, b_ptr="fp32", y_ptr=dt, code_ptr="i8"), consts,
                           cfg.num_warps, cfg.num_stages, "i64" if off64 else "i32")
        yield (f"_unpool_chain {dt}", sc._unpool_chain, dict(dp_ptr=dt, code_ptr="i8", dz_ptr=dt, db_ptr="fp32"),
               {"HAS_BIAS": True, "OFF64": False, "BP": 32, "BJ": 64}, 4, 3, "i32")
    # the chain's columns kernels (twenty-first session): no taps or strides as constexprs (the
    # window columns carry the geometry), so one set per dtype
    for dt, tf32 in (("fp32", True), ("bf16", False)):
        for tuner, extra, ptrs in (
                (sc._shared_fwd_relu_pool_columns, {},
                 dict(cols_ptr=dt, w_ptr=dt, b_ptr="fp32", y_ptr=dt, code_ptr="i8")),
                (sc._shared_wgrad_relu_pool_columns, {"SPLIT": 8},
                 dict(cols_ptr=dt, dp_ptr=dt, code_ptr="i8", dw_ptr="fp32", db_ptr="fp32"))):
            for off64 in (False, True):
                for cfg in tuner.configs[:1] if quick or off64 else tuner.configs:
                    consts = {**extra, "HAS_BIAS": True, "OFF64": off64, "TF32": tf32, **cfg.kwargs}
                    label = f"{tuner.fn.__name__} {dt}{' tf32' if tf32 else ''} OFF64={off64} {cfg.kwargs}"
                    yield label, tuner.fn, ptrs, consts, cfg.num_warps, cfg.num_stages, "i64" if off64 else "i32"
    # the dense routes' gradients over rows of taps (twenty-second session): channels and taps are
    # constexprs, so one build per layer: cnn's second layer (5x5 on 32 channels) and ResNet-18's
    # 3x3 on 64 (stride 1) and 128 (stride 2)
    rows = {"5x5 C=32": dict(C=32, R=5, S=5, SH=1, SW=1, PH=2, PW=2),
            "3x3 C=64": dict(C=64, R=3, S=3, SH=1, SW=1, PH=1, PW=1),
            "3x3/2 C=128": dict(C=128, R=3, S=3, SH=2, SW=2, PH=1, PW=1)}
    if quick:
        rows = {"5x5 C=32": rows["5x5 C=32"]}
    for dt, tf32, out in (("bf16", False, "bf16"), ("fp32", True, "fp32")):
        for geo, c in rows.items():
            for split in (1, 4):
                dw = "fp32" if split > 1 else out
                for cfg in gc._conv_wgrad_rows.configs[:1] if quick else gc._conv_wgrad_rows.configs:
                    consts = {**c, "SPLIT": split, "TF32": tf32, **cfg.kwargs}
                    label = f"_conv_wgrad_rows {dt}{' tf32' if tf32 else ''} {geo} SPLIT={split} {cfg.kwargs}"
                    yield (label, gc._conv_wgrad_rows.fn, dict(dy_ptr=dt, x_ptr=dt, dw_ptr=dw), consts,
                           cfg.num_warps, cfg.num_stages, "i32")
            # the forward by rows (and the stride-1 data gradient, a forward of dy: its C is the
            # layer's output channels, `cnn`'s 64 and ResNet-18's 64 and 128 among these)
            for cfg in gc._conv_rows.configs[:1] if quick else gc._conv_rows.configs:
                consts = {**c, "TF32": tf32, **cfg.kwargs}
                label = f"_conv_rows {dt}{' tf32' if tf32 else ''} {geo} {cfg.kwargs}"
                yield (label, gc._conv_rows.fn, dict(x_ptr=dt, w_ptr=dt, y_ptr=dt), consts,
                       cfg.num_warps, cfg.num_stages, "i32")
    # 64-bit offsets within a student (OFF64), sizes and strides past 2^31 arriving as i64
    for tuner, ptrs in ((gc._conv_fwd, dict(x_ptr="bf16", w_ptr="bf16", b_ptr="bf16", y_ptr="bf16")),
                        (gc._conv_dgrad, dict(dy_ptr="bf16", w_ptr="bf16", dx_ptr="bf16"))):
        cfg = tuner.configs[0]
        for int_type in ("i32", "i64"):
            yield (f"{tuner.fn.__name__} bf16 3x3 OFF64 {int_type} sizes", tuner.fn, ptrs,
                   {**conv["3x3"], "TF32": False, "OFF64": True, **cfg.kwargs,
                    **({"HAS_BIAS": False} if tuner is gc._conv_fwd else {})},
                   cfg.num_warps, cfg.num_stages, int_type)
    for tuner, ptrs, extra in ((sc._shared_fwd_relu_pool,
                                dict(x_ptr="bf16", w_ptr="bf16", b_ptr="fp32", y_ptr="bf16", code_ptr="i8"), {}),
                               (sc._shared_wgrad_relu_pool,
                                dict(x_ptr="bf16", dp_ptr="bf16", code_ptr="i8", dw_ptr="fp32", db_ptr="fp32"),
                                {"SPLIT": 8})):
        cfg = tuner.configs[0]
        yield (f"{tuner.fn.__name__} bf16 5x5 OFF64 i64 sizes", tuner.fn, ptrs,
               {**chain["5x5"], **extra, "HAS_BIAS": True, "TF32": False, "OFF64": True, **cfg.kwargs},
               cfg.num_warps, cfg.num_stages, "i64")
    for dt in ("fp32", "bf16"):
        yield (f"_unpool_relu {dt}", gc._unpool_relu, dict(dp_ptr=dt, code_ptr="i8", dy_ptr=dt), {"BLOCK": 1024},
               4, 3, "i32")
    for dt in ("fp32", "bf16", "fp16"):
        rows = {f"{g}_{p}": t for g in "abc" for p, t in (("ptr", dt), ("coef", "fp32"), ("idx", "i64"))}
        yield (f"_merge_kernel rows {dt}", merge._merge_kernel, {"theta_ptr": "fp32", "out_ptr": "fp32", **rows},
               {"A_IDX": False, "B_IDX": True, "C_IDX": False, "BLOCK": 4096, "UNROLL": 4}, 4, 3, "i32")
        kd_ptrs = {"z_ptr": dt, "t_ptr": "fp32", "g_ptr": dt, "loss_ptr": "fp32"}
        for teacher_logits in (False, True):
            yield (f"_kd_kernel {dt} teacher_logits={teacher_logits}", kd_loss._kd_kernel, kd_ptrs,
                   {"TEACHER_LOGITS": teacher_logits, "BLOCK_C": 4096}, 8, 3, "i32")
        yield (f"_kd_small_kernel {dt}", kd_loss._kd_small_kernel, kd_ptrs, {"BLOCK_M": 16, "BLOCK_C": 128}, 4, 3,
               "i32")
    # the LM's head route (twenty-third session): a chunk's logits in the products' dtype
    for dt in ("fp32", "bf16"):
        blocks = {"BLOCK_R": vh.BLOCK_R, "BLOCK_C": vh.BLOCK_C}
        yield (f"_head_stats_kernel {dt}", vh._head_stats_kernel,
               {"z_ptr": dt, "p_ptr": "fp32", "m_ptr": "fp32", "s_ptr": "fp32", "pz_ptr": "fp32"}, blocks, 4, 3, "i32")
        for has_db in (True, False):
            yield (f"_head_grad_kernel {dt} HAS_DB={has_db}", vh._head_grad_kernel,
                   {"z_ptr": dt, "p_ptr": "fp32", "lse_ptr": "fp32", "db_ptr": "fp32"}, {"HAS_DB": has_db, **blocks},
                   4, 3, "i32")


CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resources(cubin: bytes) -> str:
    """'REG r STACK s' of a cubin (registers per thread, stack bytes per thread), or '' if the
    bundled cuobjdump is not there."""
    if not os.path.exists(CUOBJDUMP):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return f"REG {m[1]} STACK {m[2]}" if m else ""


def main(argv=None):
    quick = "--quick" in (sys.argv[1:] if argv is None else argv)
    failures, n, t0 = [], 0, time.perf_counter()
    for label, fn, ptrs, consts, warps, stages, int_type in cases(quick):
        n += 1
        try:
            src = ASTSource(fn=fn, signature=signature(fn, ptrs, consts, int_type), constexprs=consts,
                            attrs=hints(fn, ptrs))
            k = compile(src, target=TARGET, options={"num_warps": warps, "num_stages": stages})
            print(f"ok    {label}: {len(k.asm['cubin'])} B cubin, {k.metadata.shared} B shared, "
                  f"{resources(k.asm['cubin'])}, {k.asm['ptx'].count('cp.async.cg')} cp.async")
        except Exception as exc:  # report every kernel, not the first failure only
            failures.append(label)
            print(f"FAIL  {label}: {type(exc).__name__}: {str(exc)[:2000]}")
    print(f"{n - len(failures)}/{n} kernels compiled for sm_90 in {time.perf_counter() - t0:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
