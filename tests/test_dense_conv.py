"""The dense routes: K students' convolutions as K dense ones (fastagg.ops.dense_conv), inside
torch.compile's vmap, gradients by torch.autograd; against float64 references and native."""

import importlib
from pathlib import Path

import pytest
import torch
from torch.func import vmap

from fastagg.engine import StudentGradEngine
from fastagg.ops import dense_conv
from fastagg.ops.grouped_conv import grouped_conv2d_reference

from test_shared_conv import _ChainThenSmooth, _TwoChains, _engine_case, _no_tf32

GEOMETRIES = [  # (K, N, C, H, W, Co, R, S, stride, padding, bias)
    (3, 2, 5, 9, 7, 4, 3, 3, (1, 1), (1, 1), True),
    (2, 3, 3, 10, 11, 6, 5, 3, (2, 1), (2, 0), False),
    (5, 1, 1, 4, 6, 2, 1, 2, (1, 3), (0, 1), True),
    (2, 2, 3, 7, 6, 5, 5, 3, (1, 1), (2, 0), True),  # stride 1: the data gradient as a forward conv
    (2, 2, 2, 5, 5, 3, 1, 2, (1, 1), (1, 1), False),  # stride 1, padding past R - 1: convolution_backward's
]


# the rows kernels compute in fp32 (bf16 and fp32 operands): their ways in fp32 only
@pytest.mark.parametrize("dtype, way", [(dt, way) for dt in (torch.float64, torch.float32)
                                        for way in ("auto", "grouped", "rows", "rows dgrad")
                                        if dt == torch.float32 or not way.startswith("rows")],
                         ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "x".join(map(str, g[:8])))
def test_dense_grouped_conv_and_its_gradients_equal_the_grouped_reference(geometry, dtype, way, rng, device,
                                                                          monkeypatch):
    """Forward, and the gradients of input, weight and bias, against float64 autograd of the
    grouped convolution (F.conv2d with groups=K), the batched op and the per-student op under
    vmap; the output stored students-last ([K, N, Ho, Wo, Co]: each student's slice a contiguous
    channels-last tensor). On CUDA the students go round the side streams. ``way``: what auto
    times and keeps, the "grouped" way alone (one grouped convolution, operands copied into its
    layout and the results out of it), the forward and the weight gradient by the rows kernels
    alone (Triton; fp32 and bf16 only), whichever way the data gradient takes, or all three by
    them (the data gradient's only with stride 1; convolution_backward's otherwise)."""
    if way.startswith("rows"):
        pytest.importorskip("triton")
        monkeypatch.setattr(dense_conv, "ROWS_KERNELS", True)
        monkeypatch.setattr(dense_conv, "choices", {})  # not a choice made for the shape by another test
        from fastagg.kernels import grouped_conv as kernels
        calls = {"conv_backward_weight_rows": [], "conv_backward_data_rows": [], "conv_forward_rows": []}
        for name, seen in calls.items():
            real = getattr(kernels, name)
            monkeypatch.setattr(kernels, name,
                                lambda *a, _real=real, _seen=seen, **k: _seen.append(1) or _real(*a, **k))
    monkeypatch.setattr(dense_conv, "DGRAD", "auto" if way == "rows" else way)
    K, N, C, H, W, CO, R, S, stride, padding, bias = geometry
    x = torch.randn(K, N, C, H, W, generator=rng, dtype=torch.float64)
    w = torch.randn(K, CO, C, R, S, generator=rng, dtype=torch.float64)
    b = torch.randn(K, CO, generator=rng, dtype=torch.float64) if bias else None
    ins = [t for t in (x, w, b) if t is not None]
    ref_in = [t.clone().requires_grad_() for t in ins]
    y_ref = grouped_conv2d_reference(ref_in[0], ref_in[1], ref_in[2] if bias else None, stride, padding)
    dy = torch.randn(y_ref.shape, generator=rng, dtype=torch.float64)
    g_ref = torch.autograd.grad(y_ref, ref_in, dy)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for how in ("batched", "vmap"):
        got_in = [t.to(device, dtype).requires_grad_() for t in ins]
        xg, wg = got_in[0], got_in[1]
        bg = got_in[2] if bias else None
        with _no_tf32():
            if how == "batched":
                y = dense_conv.dense_grouped_conv(xg, wg, bg, list(stride), list(padding))
            else:
                y = vmap(lambda a, c, d: dense_conv.dense_conv2d(a, c, d, stride, padding),
                         in_dims=(0, 0, 0 if bias else None))(xg, wg, bg)
            g = torch.autograd.grad(y, got_in, dy.to(device, dtype))
        torch.testing.assert_close(y.double().cpu(), y_ref.detach(), **tol)
        for name, a, r in zip("xwb", g, g_ref):
            torch.testing.assert_close(a.double().cpu(), r, **tol, msg=lambda m: f"{how} d{name}: {m}")
        if how == "batched":
            assert y.permute(0, 1, 3, 4, 2).is_contiguous()
    if way.startswith("rows"):  # the weight gradient came from the kernel (cuDNN's was not asked for), at
        # each variant's timed runs and the kept one's, in both the batched op and the vmap'd one
        chosen = [rec["chosen"] for key, rec in dense_conv.choices.items() if key[0] == "backward"]
        assert all(c.endswith(dense_conv.ROWS_WGRAD) for c in chosen)
        assert len(calls["conv_backward_weight_rows"]) >= 2 and len(calls["conv_forward_rows"]) >= 2
        if way == "rows dgrad":  # and the data gradient too, where the stride is 1
            assert (len(calls["conv_backward_data_rows"]) >= 2) == (tuple(stride) == (1, 1))


def _spy_backward_masks(monkeypatch):
    """The list of output masks that convolution_backward is called with from now on."""
    importlib.import_module("torch._dynamo")  # the op's first call imports it; its imports walk the aten ops
    masks, real = [], torch.ops.aten.convolution_backward

    class Spy:
        def __call__(self, *a):
            masks.append(tuple(a[-1]))
            return real(*a)

    monkeypatch.setattr(torch.ops.aten, "convolution_backward", Spy())
    return masks


def test_the_rows_weight_gradient_is_a_candidate_on_cuda_and_where_forced(monkeypatch):
    """ROWS_KERNELS: "auto" offers the rows kernels' ways for fp32/bf16/fp16 inputs on CUDA only
    (on a CPU Triton runs only in the interpreter), after cuDNN's ways; True offers only them,
    anywhere (the tests' interpreter); False never; float64 never (the kernels accumulate in fp32).
    The data gradient's ("rows dgrad") where the op says it applies (stride 1), forced by DGRAD."""
    pytest.importorskip("triton")
    cpu = torch.empty(1)
    cuda_like = type("CudaTensor", (), {"is_cuda": True})()
    monkeypatch.setattr(dense_conv, "DGRAD", "auto")
    monkeypatch.setattr(dense_conv, "GROUPED", True)
    for setting, on_cuda, on_cpu in (("auto", True, False), (True, True, True), (False, False, False)):
        monkeypatch.setattr(dense_conv, "ROWS_KERNELS", setting)
        assert dense_conv._rows_here(cuda_like, torch.bfloat16) is on_cuda
        assert dense_conv._rows_here(cpu, torch.float32) is on_cpu and not dense_conv._rows_here(cpu, torch.float64)
    monkeypatch.setattr(dense_conv, "ROWS_KERNELS", "auto")
    wg, cpu_ = dense_conv.ROWS_WGRAD, torch.device("cpu")
    ways = [v[0] for v in dense_conv._variants(cpu_, True, rows=True)]
    assert ways == ["forward", "backward", "forward" + wg, "backward" + wg, "grouped"]
    ways = [v[0] for v in dense_conv._variants(cpu_, True, rows=True, drows=True)]
    assert ways == ["forward", "backward", "rows dgrad"] + [w + wg for w in ways[:3]] + ["grouped"]
    monkeypatch.setattr(dense_conv, "ROWS_KERNELS", True)
    assert [v[0] for v in dense_conv._variants(cpu_, False, rows=True)] == ["backward" + wg]
    monkeypatch.setattr(dense_conv, "DGRAD", "rows dgrad")
    for drows, want in ((True, "rows dgrad"), (False, "backward")):  # not applicable: per student
        assert dense_conv._variants(cpu_, False, rows=True, drows=drows) == [(want + wg, None)]


def test_dense_backward_computes_only_the_gradients_asked_for(rng, device, monkeypatch):
    """A frozen input (no gradient wanted) is not computed: convolution_backward is asked for
    the weight's gradient only, and autograd gets None for the input. With stride 1 the input's
    gradient, when wanted, comes from a forward convolution instead (convolution_backward still
    only for the weight's); with stride 2 from convolution_backward."""
    monkeypatch.setattr(dense_conv, "DGRAD", "forward")  # the method fixed (test_auto_... times both)
    monkeypatch.setattr(dense_conv, "CUDNN_BENCHMARK", False)
    monkeypatch.setattr(dense_conv, "ROWS_KERNELS", False)  # cuDNN's weight gradient: the masks say so
    x = torch.randn(2, 3, 4, 6, 6, generator=rng).to(device)
    w = torch.randn(2, 5, 4, 3, 3, generator=rng).to(device).requires_grad_()
    masks = _spy_backward_masks(monkeypatch)
    y = dense_conv.dense_grouped_conv(x, w, None, [1, 1], [1, 1])
    (gw,) = torch.autograd.grad(y.sum(), [w])
    assert masks == [(False, True, False)] * 2
    ref = torch.autograd.grad(grouped_conv2d_reference(x, w, None, (1, 1), (1, 1)).sum(), [w])[0]
    torch.testing.assert_close(gw, ref, rtol=1e-4, atol=1e-4)
    # the input's gradient with stride 1: a forward convolution (not convolution_backward's); stride 2: its
    for stride, want in (((1, 1), (False, True, False)), ((2, 1), (True, True, False))):
        masks.clear()
        xg = x.clone().requires_grad_()
        y = dense_conv.dense_grouped_conv(xg, w, None, list(stride), [1, 1])
        gx, gw = torch.autograd.grad(y.square().sum(), [xg, w])
        assert masks == [want] * 2
        refs = torch.autograd.grad(grouped_conv2d_reference(xg, w, None, stride, (1, 1)).square().sum(), [xg, w])
        for got, r in zip((gx, gw), refs):
            torch.testing.assert_close(got, r, rtol=1e-4, atol=1e-4)


def test_auto_times_each_variant_once_per_shape_and_runs_the_fastest(rng, device, monkeypatch):
    """DGRAD = "auto" (and on CUDA CUDNN_BENCHMARK = "auto"): the first backward of a stride-1
    shape times every (data-gradient method, cuDNN search) pair, records them in ``choices`` and
    keeps the fastest; the forward likewise times the search on CUDA only (one variant on a CPU:
    nothing timed, nothing recorded). Every timed run writes the same gradients (float64 against
    the grouped reference), later calls of the shape time nothing and run the recorded variant
    (the data gradient by convolution_backward only when "backward" was kept), and a new shape is
    timed anew. (The grouped way left out: test_auto_times_the_grouped_way_too.)"""
    monkeypatch.setattr(dense_conv, "choices", {})
    monkeypatch.setattr(dense_conv, "DGRAD", "auto")
    monkeypatch.setattr(dense_conv, "CUDNN_BENCHMARK", "auto")
    monkeypatch.setattr(dense_conv, "GROUPED", False)
    cuda = device.type == "cuda"
    runs = []
    each = dense_conv._each_student
    monkeypatch.setattr(dense_conv, "_each_student", lambda K, dev, body: runs.append(K) or each(K, dev, body))
    cases = []  # inputs and float64 references first: the spy below stands in for the aten op
    for K, H in ((3, 7), (3, 7), (2, 5)):
        x = torch.randn(K, 2, 4, H, 6, generator=rng, dtype=torch.float64).requires_grad_()
        w = torch.randn(K, 5, 4, 3, 3, generator=rng, dtype=torch.float64).requires_grad_()
        dy = torch.randn(K, 2, 5, H, 6, generator=rng, dtype=torch.float64)
        cases.append((K, H, x, w, dy,
                      torch.autograd.grad(grouped_conv2d_reference(x, w, None, (1, 1), (1, 1)), (x, w), dy)))
    masks = _spy_backward_masks(monkeypatch)
    n_bwd = 4 if cuda else 2
    timed_runs = ((2 * 3 + 1) if cuda else 1) + n_bwd * 3 + 1  # each variant once + twice timed, then the kept
    for i, (K, H, x, w, dy, refs) in enumerate(cases):
        runs.clear(), masks.clear()
        before = len(dense_conv.choices)
        xd, wd = x.detach().to(device).requires_grad_(), w.detach().to(device).requires_grad_()
        y = dense_conv.dense_grouped_conv(xd, wd, None, [1, 1], [1, 1])
        got = torch.autograd.grad(y, (xd, wd), dy.to(device))
        for g, r in zip(got, refs):
            torch.testing.assert_close(g.cpu(), r, rtol=1e-10, atol=1e-10)
        if i == 1:  # the shape seen before: nothing timed, each op run once
            assert (len(dense_conv.choices) - before, len(runs)) == (0, 2)
        else:
            assert (len(dense_conv.choices) - before, len(runs)) == ((2 if cuda else 1), timed_runs)
        key = ("backward", (K, 2, 4, H, 6), (K, 5, 4, 3, 3), torch.float64, (1, 1), (1, 1), xd.device,
               dense_conv.STREAMS, True, True)  # xd's device: cuda:0, where the fixture says cuda
        rec = dense_conv.choices[key]
        assert len(rec["ms"]) == n_bwd and rec["chosen"] == min(rec["ms"], key=rec["ms"].get)
        assert ("forward", *key[1:7], dense_conv.STREAMS) in dense_conv.choices or not cuda
        kept_forward = rec["variant"][0] == "forward"
        assert masks[-K:] == [(False, True, False) if kept_forward else (True, True, False)] * K


def test_auto_times_the_grouped_way_too(rng, device, monkeypatch):
    """With GROUPED on, auto's records for a shape hold the grouped way (each cuDNN search setting
    on CUDA) beside the per-student ones, for the forward (which then has a choice on a CPU too)
    and the backward; with it off, none; whichever is kept, the gradients equal float64's."""
    monkeypatch.setattr(dense_conv, "DGRAD", "auto")
    monkeypatch.setattr(dense_conv, "CUDNN_BENCHMARK", "auto")
    searches = [", cudnn heuristics", ", cudnn search"] if device.type == "cuda" else [""]
    x = torch.randn(3, 2, 4, 6, 5, generator=rng, dtype=torch.float64)
    w = torch.randn(3, 5, 4, 3, 3, generator=rng, dtype=torch.float64)
    dy = torch.randn(3, 2, 5, 6, 5, generator=rng, dtype=torch.float64)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    refs = torch.autograd.grad(grouped_conv2d_reference(xr, wr, None, (1, 1), (1, 1)), (xr, wr), dy)
    for grouped in (True, False):
        monkeypatch.setattr(dense_conv, "choices", {})
        monkeypatch.setattr(dense_conv, "GROUPED", grouped)
        xd, wd = x.to(device).requires_grad_(), w.to(device).requires_grad_()
        y = dense_conv.dense_grouped_conv(xd, wd, None, [1, 1], [1, 1])
        for g, r in zip(torch.autograd.grad(y, (xd, wd), dy.to(device)), refs):
            torch.testing.assert_close(g.cpu(), r, rtol=1e-10, atol=1e-10)
        recs = {key[0]: rec for key, rec in dense_conv.choices.items()}
        assert {name for name in recs["backward"]["ms"] if name.startswith("grouped")} == (
            {"grouped" + s for s in searches} if grouped else set())
        if grouped:
            assert set(recs["forward"]["ms"]) == {way + s for way in ("backward", "grouped") for s in searches}
        else:
            assert ("forward" in recs) == (device.type == "cuda")


def test_time_each_warms_up_times_the_median_and_counts_out_of_memory_as_slowest(monkeypatch):
    """fastagg.ops.timing.time_each (the dense ops' and the shared chain's choices): each method
    run once untimed, all of them first, then reps times each, the median kept; one that runs out
    of device memory is infinitely slow and run no more; on a CPU by the host clock."""
    from fastagg.ops import timing

    clock, calls = iter([0.0, 0.001, 1.0, 1.005, 2.0, 2.003]), []  # ms per timed run: 1, 5, 3
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))

    def run(m):
        calls.append(m)
        if m == "oom":
            raise torch.cuda.OutOfMemoryError("no room")

    how = {}
    ms = timing.time_each(["fast", "oom"], run, torch.device("cpu"), reps=3, how=how)
    assert calls == ["fast", "oom"] + ["fast"] * 3
    assert ms["fast"] == pytest.approx(3.0) and ms["oom"] == float("inf") and how == {"timed": "host clock"}


def test_a_way_that_fails_is_left_out_of_the_choice_and_the_gradients_stay_right(rng, device, monkeypatch):
    """The dense ops' choice with one way broken (the grouped one raising, as a kernel a card cannot
    build would): the op still runs, by a way that works, its gradients equal float64's, and the
    shape's records name the broken way under "failed" with its error, timed as infinitely slow."""
    monkeypatch.setattr(dense_conv, "DGRAD", "auto")
    monkeypatch.setattr(dense_conv, "GROUPED", True)
    monkeypatch.setattr(dense_conv, "choices", {})

    def broken(*args, **kwargs):
        raise RuntimeError("grouped way unavailable here")

    monkeypatch.setattr(dense_conv, "_grouped_backward", broken)
    x = torch.randn(3, 2, 4, 6, 5, generator=rng, dtype=torch.float64)
    w = torch.randn(3, 5, 4, 3, 3, generator=rng, dtype=torch.float64)
    dy = torch.randn(3, 2, 5, 6, 5, generator=rng, dtype=torch.float64)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    refs = torch.autograd.grad(grouped_conv2d_reference(xr, wr, None, (1, 1), (1, 1)), (xr, wr), dy)
    xd, wd = x.to(device).requires_grad_(), w.to(device).requires_grad_()
    y = dense_conv.dense_grouped_conv(xd, wd, None, [1, 1], [1, 1])
    with pytest.warns(RuntimeWarning, match="grouped way unavailable here"):
        got = torch.autograd.grad(y, (xd, wd), dy.to(device))
    for g, r in zip(got, refs):
        torch.testing.assert_close(g.cpu(), r, rtol=1e-10, atol=1e-10)
    rec = next(rec for key, rec in dense_conv.choices.items() if key[0] == "backward")
    failed = {name for name in rec["ms"] if name.startswith("grouped")}
    assert failed and set(rec["failed"]) == failed
    assert all(rec["ms"][n] == float("inf") and "grouped way unavailable here" in rec["failed"][n] for n in failed)
    assert not rec["chosen"].startswith("grouped")


def test_time_each_leaves_out_a_method_that_fails_and_raises_only_when_all_do():
    """A method whose warm-up raises (a kernel the card's compiler cannot build) is timed as
    infinitely slow, run no more, warned about and named in ``how["failed"]`` with its error;
    the others are timed as usual. When every method fails, the first error is raised."""
    from fastagg.ops import timing

    calls = []

    def run(m):
        calls.append(m)
        if m[0] == "broken":
            raise RuntimeError(f"out of resources: shared memory ({m[1]})")

    how = {}
    with pytest.warns(RuntimeWarning, match="broken, 1 failed and is left out"):
        ms = timing.time_each([("broken", 1), ("fine", 2)], run, torch.device("cpu"), reps=3, how=how,
                              name=lambda m: f"{m[0]}, {m[1]}")
    assert calls == [("broken", 1), ("fine", 2)] + [("fine", 2)] * 3
    assert ms[("broken", 1)] == float("inf") and 0 <= ms[("fine", 2)] < float("inf")
    assert min(ms, key=ms.get) == ("fine", 2)
    assert how["failed"] == {"broken, 1": "RuntimeError: out of resources: shared memory (1)"}
    how = {}
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match=r"shared memory \(1\)"):
        timing.time_each([("broken", 1), ("broken", 2)], run, torch.device("cpu"), how=how)
    how = {}
    timing.time_each(["fine"], lambda m: None, torch.device("cpu"), how=how)
    assert "failed" not in how


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs")
def test_time_each_times_captured_graphs_on_a_gpu_and_says_when_it_cannot():
    """On CUDA the methods are timed as replays of a CUDA graph of each (their device time, not the
    host's launches), ``how`` says so, and the output a run writes is still right afterwards. One
    method that cannot be captured (it synchronises) has every method timed uncaptured instead,
    and ``how`` says so and why."""
    from fastagg.ops import timing

    dev = torch.device("cuda")
    x = torch.randn(1 << 20, device=dev)
    out = torch.empty_like(x)

    def run(m):
        if m == "host_bound":  # 200 launches
            for _ in range(200):
                out.add_(0.0)
        elif m == "big":  # one launch of real device work
            torch.mul(x, 2.0, out=out)
            for _ in range(30):
                out.mul_(1.0)
        else:  # "sync": cannot be captured
            out.copy_(x)
            torch.cuda.synchronize()

    how = {}
    ms = timing.time_each(["host_bound", "big"], run, dev, reps=3, how=how)
    assert how == {"timed": "CUDA graph replays"} and set(ms) == {"host_bound", "big"}
    assert all(0 < t < float("inf") for t in ms.values())
    out.zero_()
    run("big")
    torch.testing.assert_close(out, 2 * x)
    how = {}
    ms = timing.time_each(["big", "sync"], run, dev, reps=3, how=how)
    assert how["timed"].startswith("uncaptured launches (capture failed: ") and set(ms) == {"big", "sync"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA graph capture")
def test_nothing_is_timed_while_a_cuda_graph_is_captured(rng, monkeypatch):
    """A shape first met inside a capture (its choice forgotten after the eager warm-up that
    made cuDNN's plans) runs the first variant, times and records nothing (no synchronisation
    inside the capture), and the replay equals the reference."""
    monkeypatch.setattr(dense_conv, "DGRAD", "auto")
    monkeypatch.setattr(dense_conv, "CUDNN_BENCHMARK", "auto")
    x = torch.randn(2, 2, 4, 7, 6, generator=rng).cuda().requires_grad_()
    w = torch.randn(2, 5, 4, 3, 3, generator=rng).cuda().requires_grad_()
    dy = torch.randn(2, 2, 5, 7, 6, generator=rng).cuda()
    got = []

    def step():
        y = dense_conv.dense_grouped_conv(x, w, None, [1, 1], [1, 1])
        got[:] = [y, *torch.autograd.grad(y, (x, w), dy)]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), _no_tf32():
        step()  # eager: timed and recorded
    torch.cuda.current_stream().wait_stream(side)
    monkeypatch.setattr(dense_conv, "choices", {})
    graph = torch.cuda.CUDAGraph()
    with _no_tf32(), torch.cuda.graph(graph):
        step()
    assert dense_conv.choices == {}
    graph.replay()
    torch.cuda.synchronize()
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y_ref = grouped_conv2d_reference(xr, wr, None, (1, 1), (1, 1))
    refs = [y_ref, *torch.autograd.grad(y_ref, (xr, wr), dy.double())]
    for a, r in zip(got, refs):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-4)


def test_relayouts_counts_the_activations_that_came_in_another_layout(rng, device, monkeypatch):
    """``relayouts`` (the bench's diagnosis of copies a pass makes): an input stored [K, N, C, H,
    W] is copied into the students-last layout once, in the forward, whose copy the backward
    reads (it used to make its own); one already stored [K, N, H, W, C] is not copied; the op's
    own output, as dy, is not either. The gradients equal float64 autograd of the grouped
    reference either way."""
    monkeypatch.setattr(dense_conv, "relayouts", {})
    w = torch.randn(2, 5, 4, 3, 3, generator=rng, dtype=torch.float64).to(device).requires_grad_()
    x = torch.randn(2, 3, 4, 6, 6, generator=rng, dtype=torch.float64).to(device)
    for xin, copied in ((x.clone(), 1), (dense_conv._students_last(x), 0)):
        xin.requires_grad_()
        y = dense_conv.dense_grouped_conv(xin, w, None, [1, 1], [1, 1])
        dy = dense_conv._students_last(torch.randn(y.shape, generator=rng, dtype=torch.float64).to(device))
        got = torch.autograd.grad(y, (xin, w), dy)
        assert {k: v[1] for k, v in dense_conv.relayouts.items()} == {
            "forward x": copied, "backward x": 0, "backward dy": 0}
        dense_conv.relayouts.clear()
        xr, wr = x.detach().cpu().requires_grad_(), w.detach().cpu().requires_grad_()
        refs = torch.autograd.grad(grouped_conv2d_reference(xr, wr, None, (1, 1), (1, 1)), (xr, wr), dy.cpu())
        for g, r in zip(got, refs):
            torch.testing.assert_close(g.double().cpu(), r, rtol=1e-10, atol=1e-10)


def test_compiled_routes_key_torch_compile_s_caches_by_fastagg_s_sources(rng, monkeypatch):
    """A compiled route's pass (where torch.compile compiles, forward and backward) runs with
    fastagg's source hash in torch.compile's cache-key tag, after a tag of the user's own, which
    is back as it was afterwards; the hash follows the sources (a stale cache on disk once gave
    the dense op's old one-output code to its new two-output form, and crashed)."""
    cfg = pytest.importorskip("torch.compiler.config")
    if not hasattr(cfg, "cache_key_tag"):
        pytest.skip("this torch has no cache-key tag")
    from fastagg import engine as engine_mod

    tag = engine_mod._source_tag()
    assert tag.startswith("fastagg-") and len(tag) == len("fastagg-") + 16
    model, spec, proxy, students, probs = _engine_case(_ChainThenSmooth, 4, 14, 2, rng, torch.device("cpu"))
    eng = _dense_engine(model, spec, proxy, "compiled_dense", 2)
    seen = []
    real = eng._compiled_route_step
    monkeypatch.setattr(eng, "_compiled_route_step", lambda *a: seen.append(cfg.cache_key_tag) or real(*a))
    # the config's own patch, not monkeypatch: pytest 9.2's undo deletes a module attribute that is
    # not in the module's __dict__, which hides the setting from inductor for the rest of the process
    with cfg.patch(cache_key_tag="mine"):
        loss, g = eng(students, probs)
        assert seen == [f"mine|{tag}"] and cfg.cache_key_tag == "mine" and torch.isfinite(g).all()
        with engine_mod._cache_tag():  # nested: added once
            with engine_mod._cache_tag():
                assert cfg.cache_key_tag == f"mine|{tag}"
    engine_mod._source_tag.cache_clear()
    try:
        src = Path(engine_mod.__file__).resolve().parent / "ops" / "dense_conv.py"
        real_read = Path.read_bytes
        monkeypatch.setattr(Path, "read_bytes", lambda p: real_read(p) + (b"#" if p == src else b""))
        assert engine_mod._source_tag() != tag
    finally:
        monkeypatch.undo()
        engine_mod._source_tag.cache_clear()
    assert engine_mod._source_tag() == tag


def test_the_routes_bias_is_added_outside_the_per_student_op(rng, monkeypatch):
    """Under vmap, dense_conv2d hands the op no bias and adds it itself (inductor fuses that add
    with its neighbours; inside the op it was one add kernel per student): same values and
    gradients as the op with the bias."""
    seen = []
    real = dense_conv.dense_grouped_conv
    monkeypatch.setattr(dense_conv, "dense_grouped_conv", lambda x, w, b, *a: seen.append(b) or real(x, w, b, *a))
    x = torch.randn(3, 2, 4, 7, 6, generator=rng, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, 4, 3, 3, generator=rng, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 5, generator=rng, dtype=torch.float64, requires_grad=True)
    y = vmap(lambda a, c, d: dense_conv.dense_conv2d(a, c, d, (1, 2), (1, 0)))(x, w, b)
    assert seen == [None]
    ref = grouped_conv2d_reference(x, w, b, (1, 2), (1, 0))
    dy = torch.randn(ref.shape, generator=rng, dtype=torch.float64)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(torch.autograd.grad(y, (x, w, b), dy), torch.autograd.grad(ref, (x, w, b), dy)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuDNN's out= form runs on CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cudnn_writes_each_students_output_in_place(dtype, rng):
    """On CUDA each student's forward is cuDNN's out= form into its channels-last slice of the
    [K, N, Ho, Wo, Co] output (no copy): every element written (the output poisoned first), and
    equal to F.conv2d's (TF32 off; bf16 within a rounding). One input channel (its layout
    ambiguous, so cuDNN might describe the output as NCHW) goes through F.conv2d and a copy."""
    for C in (5, 1):
        K, N, H, W, CO = 3, 2, 9, 8, 6
        x = torch.randn(K, N, C, H, W, generator=rng).to("cuda", dtype)
        w = torch.randn(K, CO, C, 3, 3, generator=rng).to("cuda", dtype)
        xs, ws = dense_conv._students_last(x), dense_conv._students_last(w)
        out = dense_conv._empty_students_last(K, N, CO, 5, 8, x)  # (9 + 2 - 3) // 2 + 1 rows, 8 columns
        out.fill_(float("nan"))
        with _no_tf32():
            for k in range(K):
                dense_conv._conv_into(out[k], xs[k], ws[k], [2, 1], [1, 1])
                ref = torch.nn.functional.conv2d(x[k], w[k], None, (2, 1), (1, 1))
                tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
                torch.testing.assert_close(out[k].float(), ref.float(), **tol)
        assert not out.isnan().any() and out.permute(0, 1, 3, 4, 2).is_contiguous()


def _dense_engine(model, spec, proxy, route, K, **kw):
    eng = StudentGradEngine(model, spec, proxy, 3.0, conv="gemm_fused", chunk=None, compile=True, **kw)
    eng.routes[K] = route
    return eng


@pytest.mark.parametrize("route, chain", [("compiled_dense", "auto"), ("compiled_fused_dense", "auto"),
                                          ("compiled_fused_dense", "columns")])
@pytest.mark.parametrize("net", [_ChainThenSmooth, _TwoChains], ids=["smooth_tail", "two_chains"])
def test_dense_routes_equal_native(net, route, chain, rng, device, monkeypatch):
    """The dense routes (compiled vmap, each convolution on a per-student input as K dense ones,
    gradients by torch.autograd; compiled_fused_dense with the shared chain through the kernels):
    fp32 KD losses and gradients equal native's (TF32 off) over three passes of new students,
    with one compiled graph for all three (no recompilation per pass) and the dense op called
    once per pass for each per-student convolution (one in smooth_tail, one in two_chains, the
    second chain's, which stays in the model). In bf16 (smooth tail only, as test_shared_conv's
    split routes) within 1e-2 of the same compiled route without the dense ops (compiled,
    compiled_fused; draws on the CPU: 0.28-0.39% over 5 each; both routes were up to 1.5% from
    the eager bf16 routes, which round after every op where inductor does not). ``chain``: the
    shared chain's methods (auto: the CPU's defaults, or the columns kernels for both, whose
    forward stores per student for the dense op after it)."""
    pytest.importorskip("triton")
    from torch._dynamo.utils import counters
    from fastagg.kernels import shared_conv as kern

    if chain == "columns":
        monkeypatch.setattr(kern, "FWD", "columns")
        monkeypatch.setattr(kern, "WGRAD", "columns")

    calls = []
    each = dense_conv._each_student
    monkeypatch.setattr(dense_conv, "_each_student", lambda K, dev, body: calls.append(K) or each(K, dev, body))
    monkeypatch.setattr(dense_conv, "DGRAD", "forward")  # nothing timed: each call of the op runs once
    monkeypatch.setattr(dense_conv, "CUDNN_BENCHMARK", False)
    monkeypatch.setattr(dense_conv, "relayouts", {})
    smooth = net is _ChainThenSmooth
    model, spec, proxy, students, probs = _engine_case(net, 6, 14 if smooth else 12, 3, rng, device)
    eng = _dense_engine(model, spec, proxy, route, 3)
    assert eng.per_student_convs() == 1
    graphs = counters["stats"]["unique_graphs"]
    with _no_tf32():
        for i in range(3):
            s = students + 0.02 * i * torch.randn(students.shape, generator=rng).to(device)
            loss0, g0 = StudentGradEngine(model, spec, proxy, 3.0, conv="native", chunk=None)(s, probs)
            loss1, g1 = eng(s, probs)
            torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
            assert float((g1 - g0).norm() / g0.norm()) < 1e-5, i
    assert counters["stats"]["unique_graphs"] - graphs == 1
    assert calls == [3, 3] * 3  # forward and backward of the one per-student convolution, each pass
    if route == "compiled_fused_dense" and smooth:  # c2 reads the chain's output as the kernel stored it
        assert dense_conv.relayouts["forward x"] == [3, 0]
    if smooth:  # bf16, on the last pass's students, against the same route without the dense ops
        plain = {"compiled_dense": "compiled", "compiled_fused_dense": "compiled_fused"}[route]
        _, g_plain = _dense_engine(model, spec, proxy, plain, 3, precision="bf16")(s, probs)
        _, g_bf = _dense_engine(model, spec, proxy, route, 3, precision="bf16")(s, probs)
        assert float((g_bf - g_plain).norm() / g_plain.norm()) < 1e-2
        assert 0 < float((g_bf - g0).norm() / g0.norm()) < 0.2  # bf16 ran, and is no garbage


def test_per_student_convs_and_the_bench_s_route_filter(rng, monkeypatch):
    """per_student_convs counts the convolutions that read a per-student input (what the dense
    routes run as K dense ones; auto on CUDA times them only where there is one), not one that
    reads the proxy batch. ``only_routes`` (fastagg bench --routes) keeps the candidates named,
    in their order, or the first candidate when none is named."""
    from fastagg.flat import ParamSpec

    model, spec, proxy, students, _ = _engine_case(_ChainThenSmooth, 4, 14, 2, rng, "cpu")
    import fastagg.engine as engine_mod

    forwards = []  # counted once per engine: the forward that finds the shared layers runs once
    real = engine_mod.shared_input_convs
    monkeypatch.setattr(engine_mod, "shared_input_convs", lambda *a: forwards.append(1) or real(*a))
    counted = StudentGradEngine(model, spec, proxy, 3.0)
    assert counted.per_student_convs() == 1 and counted.per_student_convs() == 1 and forwards == [1]
    only_first = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 12 * 12, 7))
    assert StudentGradEngine(only_first, ParamSpec.from_module(only_first), proxy, 3.0).per_student_convs() == 0
    eng = StudentGradEngine(model, spec, proxy, 3.0, compile=True)
    assert eng._candidates(students) == ["loop", "compiled"]  # a CPU's, for a model with convolutions
    eng.only_routes = {"compiled", "native", "nonsense"}
    assert eng._candidates(students) == ["compiled"]
    eng.only_routes = {"nonsense"}
    assert eng._candidates(students) == ["loop"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="auto's GPU candidates")
def test_dense_routes_are_auto_candidates_on_cuda(rng):
    model, spec, proxy, students, _ = _engine_case(_ChainThenSmooth, 4, 14, 2, rng, "cuda")
    cands = StudentGradEngine(model, spec, proxy, 3.0, compile=True)._candidates(students)
    assert {"compiled_dense", "compiled_fused_dense"} <= set(cands)
    eng = StudentGradEngine(model, spec, proxy, 3.0, compile=True)
    eng.only_routes = {"compiled_dense", "native"}
    assert eng._candidates(students) == ["native", "compiled_dense"]


@pytest.mark.parametrize("route", ["compiled_dense", "compiled"])
def test_a_compiled_route_whose_capture_fails_runs_uncaptured_and_says_so(route, rng, monkeypatch):
    """With CUDA graphs on, the compiled routes are captured (the dense ones since the sixteenth
    session, the others since the twentieth). A capture that fails is recorded in ``uncaptured``
    with its reason, warned about, and the route runs uncaptured from then on, with native's
    gradients; running out of memory is raised, not hidden. (On the CPU, with the capture
    replaced by a failing one.)"""
    model, spec, proxy, students, probs = _engine_case(_ChainThenSmooth, 5, 14, 2, rng, "cpu")
    eng = _dense_engine(model, spec, proxy, route, 2)
    eng.cuda_graphs = True  # as on CUDA
    tries = []

    def failing_capture(*a):
        tries.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(eng, "_replay", failing_capture)
    with pytest.warns(RuntimeWarning, match=f"the {route} route could not be captured"):
        loss1, g1 = eng(students, probs)
    eng(students, probs)
    assert tries == [1] and "not permitted" in eng.uncaptured[route]
    loss0, g0 = StudentGradEngine(model, spec, proxy, 3.0, conv="native", chunk=None)(students, probs)
    assert float((g1 - g0).norm() / g0.norm()) < 1e-5
    eng.uncaptured.clear()

    def oom(*a):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(eng, "_replay", oom)
    with pytest.raises(torch.OutOfMemoryError):
        eng(students, probs)
    assert eng.uncaptured == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("route", ["compiled_dense", "compiled_fused_dense", "compiled", "compiled_fused"])
def test_compiled_routes_replayed_as_cuda_graphs_equal_native(route, rng):
    """On a GPU with CUDA graphs on, a compiled route is captured once (the compiled forward and
    backward; the dense ops' side streams) and a replay on new students gives native's fp32
    gradients (TF32 off)."""
    model, spec, proxy, students, probs = _engine_case(_ChainThenSmooth, 16, 14, 8, rng, "cuda")
    with _no_tf32():
        eng = _dense_engine(model, spec, proxy, route, 8, cuda_graphs=True)
        eng(students, probs)  # compile, capture
        assert eng.uncaptured == {} and list(eng._graphs) == [(8, tuple(probs.shape), route, False)]
        students = students + 0.05 * torch.randn(students.shape, generator=rng).cuda()
        loss1, g1 = eng(students, probs)
        loss0, g0 = StudentGradEngine(model, spec, proxy, 3.0, conv="native", chunk=None)(students, probs)
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    assert float((g1 - g0).norm() / g0.norm()) < 1e-5
