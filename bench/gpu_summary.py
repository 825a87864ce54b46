"""The short table the device script prints last (the tool's reply carries the end of the output):
the issue's targets against what `fastagg bench` measured, from the JSON files given, complete or
cut short (a row stopped by its timeout says which figures it has).

    python bench/gpu_summary.py $OUT/gpu_bench_cnn.json $OUT/gpu_bench_rest.json
"""

import json
import sys

TARGETS = {"cnn": (15000, 3.0, 9.0), "resnet18": (1500, 2.8, None)}  # upd/s, x compiled bf16, x fp32 vmap


def _f(x, fmt="{:,.0f}"):
    return fmt.format(x) if isinstance(x, (int, float)) else "-"


def _mb(row, key):
    return "?" if row.get(key) is None else f"{row[key] / 1e6:,.0f}"


def _met(target, best_step, corr, compiled, vmap32):
    """"yes" only when the step and both ratios the issue names reach their targets."""
    if not target[0]:
        return "-"
    ratios = [(corr, compiled, target[1]), (corr, vmap32, target[2])]
    ok = isinstance(best_step, float) and best_step >= target[0] and all(
        isinstance(c, float) and isinstance(b, float) and c / b >= t for c, b, t in ratios if t)
    return "yes" if ok else "no"


def rows(res):
    for r in res.get("models", []):
        base = r.get("baseline_updates_per_s") or r.get("partial_correction_rates") or {}
        corr = r.get("correction_updates_per_s", base.get("engine"))
        compiled, vmap32 = base.get("compiled_vmap_bf16"), base.get("vmap_fp32")
        target = TARGETS.get(r["model"], (None, None, None))
        steps = ("step_updates_per_s", "step_updates_per_s_4_threads", "step_bf16_updates_per_s",
                 "step_device_updates_per_s", "step_device_updates_compute_stream_per_s",
                 "step_device_batched_per_s", "step_device_batched_compute_stream_per_s")
        best_step = max((r[k] for k in steps if isinstance(r.get(k), float)), default=None)
        state = " (failed)" if "error" in r else "" if r.get("complete", True) else " (cut short)"
        yield [r["model"] + state, r.get("K"),
               _f(r.get("step_updates_per_s")), _f(r.get("step_updates_per_s_4_threads")),
               _f(r.get("step_bf16_updates_per_s")),
               _f(r.get("step_device_updates_per_s")), _f(r.get("step_device_updates_compute_stream_per_s")),
               _f(r.get("step_device_batched_per_s")), _f(r.get("step_device_batched_compute_stream_per_s")),
               _f(corr),
               _f(corr / compiled if isinstance(corr, float) and isinstance(compiled, float) else None, "{:.2f}x"),
               _f(corr / vmap32 if isinstance(corr, float) and isinstance(vmap32, float) else None, "{:.2f}x"),
               "/".join(_f(t, "{:,}") if t and i == 0 else _f(t, "{}x") for i, t in enumerate(target) if t) or "-",
               _met(target, best_step, corr, compiled, vmap32),
               json.dumps(r.get("route", {}))[:60]]


def backend_lines(res):
    """A line per model with its figures by backend (fastagg.bench.by_backend), where it has them."""
    for r in res.get("models", []):
        if r.get("by_backend"):
            yield f"{r['model']} by backend: " + "; ".join(
                f"{b} step {_f(v.get('step_updates_per_s'))}/s, stage {_f(v.get('stage_ms_per_update'), '{:.3f}')}"
                f" ms, merge {_f(v.get('merge_ms'), '{:.2f}')} ms, KD loss {_f(v.get('kd_loss_grad_ms'), '{:.2f}')}"
                f" ms, diff {_f(v.get('max_rel_diff'), '{:.0e}')}" for b, v in r["by_backend"].items())


def route_lines(res):
    """A line per model and pass size: each route the engine timed, fastest first (ms per pass;
    a route that failed says so), so that the reply shows which route won and by how much."""
    for r in res.get("models", []):
        cut = {k: {route: t * 1e3 if isinstance(t, (int, float)) else t for route, t in v.items()}
               for k, v in (r.get("route_seconds") or {}).items()}  # a run stopped during the route choice
        for size, timings in (r.get("route_ms") or cut).items():
            timed = sorted((t, name) for name, t in timings.items() if isinstance(t, (int, float)))
            failed = [name for name, t in timings.items() if not isinstance(t, (int, float))]
            yield (f"{r['model']} routes, passes of {size}: " + ", ".join(f"{name} {t:.1f}" for t, name in timed)
                   + " ms" + (f"; failed: {', '.join(failed)}" if failed else ""))
        for route, why in (r.get("uncaptured") or {}).items():
            yield f"{r['model']} {route} ran uncaptured (its CUDA-graph capture failed): {why}"
        if r.get("teacher_uncaptured"):
            yield f"{r['model']} teacher ran eagerly (its CUDA-graph capture failed): {r['teacher_uncaptured']}"
        for w in r.get("shared_wgrad_ms") or []:  # the fused routes' chain weight gradient, each method
            yield f"{r['model']} chain weight gradient, dp {w['dp']} {w['dtype']}: " + _methods(w)
        for f in r.get("shared_fwd_ms") or []:  # and its forward, each kernel
            yield f"{r['model']} chain forward, w {f['w']} {f['dtype']}: " + _methods(f)
        for d in r.get("dense_conv_ms") or []:  # the dense ops' variants (data-gradient method, cuDNN search)
            yield (f"{r['model']} dense {d['op']}, x {d['x']} w {d['w']}: "
                   + ", ".join(f"{v} {ms:.2f}" for v, ms in d["ms"].items())
                   + f" ms; {d['chosen']} kept" + (f" ({d['timed']})" if d.get("timed") else "")
                   + _failed(d))
        for t in r.get("autotuned") or []:  # the config each Triton kernel's autotuner kept, per key
            yield f"{r['model']} autotuned {t['kernel']} {', '.join(t['key'])}: {t['config']}"
        if r.get("dense_conv_relayouts"):  # which activations reached the dense ops in another layout
            yield f"{r['model']} dense ops, copied into the students-last layout (calls, copies): " + ", ".join(
                f"{k} {v['calls']}/{v['copied']}" for k, v in r["dense_conv_relayouts"].items())


def _methods(row):
    """'name X ms, ..., chosen kept (how timed)' of a chain choice (its methods: the float entries
    of its row; how they were timed only in rows since the twenty-first session)."""
    timed = ", ".join(f"{k} {v:.2f} ms" for k, v in row.items() if isinstance(v, float))
    return f"{timed}, {row['chosen']} kept" + (f" ({row['timed']})" if row.get("timed") else "") + _failed(row)


def _failed(row):
    """'; failed: name (error), ...' for the methods of a choice that raised (since the
    twenty-second session), else ''."""
    failed = row.get("failed") or {}
    return "".join(f"; {name} failed ({why})" for name, why in failed.items())


def main(paths):
    head = ["model", "K", "step host", "4 threads", "step bf16 host", "step device", "device, compute stream",
            "device, submit_many", "submit_many, compute stream", "correction", "vs compiled bf16",
            "vs vmap fp32", "target", "met", "routes"]
    table, errors, notes = [head], [], []
    device = None
    for p in paths:
        try:
            with open(p) as f:
                res = json.load(f)
        except (OSError, ValueError) as exc:
            print(f"{p}: {exc}")
            continue
        device = device or f"{res.get('device')}, torch {res.get('torch')}, triton {res.get('triton')}"
        table += list(rows(res))
        notes += list(route_lines(res)) + list(backend_lines(res))
        errors += [f"{r['model']}: {r['error']}" for r in res.get("models", []) if "error" in r]
        for name, sweep in (res.get("sweep") or {}).items():  # the K sweep: rate and memory per K
            notes += [f"sweep {name} K={r['K']} chunk={r['chunk']}: " + (
                f"{r['updates_per_s']:.0f} upd/s, {r['ms']:.2f} ms, first call peak {_mb(r, 'first_call_peak_bytes')} "
                f"MB, held {_mb(r, 'held_bytes')} MB, pass peak {_mb(r, 'peak_bytes')} MB"
                f" + buffer {r['buffer_bytes'] / 1e6:.0f} MB, route {r.get('route')}" if r.get("updates_per_s")
                else str(r.get("error"))) for r in sweep]
        for name, k in (res.get("flush_k") or {}).items():
            notes.append(f"flush K ({name}): {k}")
    print(f"updates/s ({device}):")
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    for line in notes:
        print(line)
    for line in errors:
        print("failed:", line[:300])


if __name__ == "__main__":
    main(sys.argv[1:])
