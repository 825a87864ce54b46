"""The engine's work rows: the students and gradients buffers that the aggregator fills and passes,
which a pass captured as a CUDA graph uses as its own input and output (no copy in or out)."""
import pytest
import torch

import fastagg
from fastagg.engine import StudentGradEngine
from fastagg.flat import ParamSpec

from conftest import mlp
from test_shared_conv import _ChainThenSmooth, _engine_case, _no_tf32


def test_work_rows_are_shared_grown_and_recognised(rng):
    model = mlp(d_in=5, hidden=24, classes=7)
    spec = ParamSpec.from_module(model)
    eng = StudentGradEngine(model, spec, torch.randn(30, 5, generator=rng), 3.0)
    s, g = eng.work_rows(6, torch.float32)
    assert s.shape == g.shape == (6, spec.numel) and s.data_ptr() != g.data_ptr()
    s2, g2 = eng.work_rows(3, torch.float32)  # fewer: the same rows
    assert (s2.data_ptr(), g2.data_ptr()) == (s.data_ptr(), g.data_ptr()) and s2.shape[0] == 3
    assert eng._owned(s2, g2) and eng._owned(s, g)
    assert not eng._owned(g, s)  # swapped
    assert not eng._owned(s[1:], g[1:])  # not the first rows
    assert not eng._owned(s.clone(), g) and not eng._owned(s, torch.empty_like(g))
    s3, g3 = eng.work_rows(9, torch.float32)  # more: grown, the old rows no longer the engine's
    assert s3.shape[0] == 9 and eng._owned(s3, g3) and not eng._owned(s, g)
    s4, g4 = eng.work_rows(2, torch.float64)  # another dtype: rows of that dtype
    assert s4.dtype == g4.dtype == torch.float64 and eng._owned(s4, g4) and not eng._owned(s3[:2], g3[:2])


def test_the_aggregator_corrects_in_the_engine_s_work_rows(rng, monkeypatch):
    """A FedADT merge gathers its students into the engine's work rows and has the gradients
    written to the second of them; the merge equals the same submits through a correction whose
    engine is handed copies (plain buffers of their own)."""
    model = mlp(d_in=5, hidden=24, classes=7)
    proxy = torch.randn(30, 5, generator=rng)
    aggs = [fastagg.Aggregator(model, fastagg.FedBuff(3), backend="torch",
                               correction=fastagg.KDCorrection(proxy, steps=1, conv="native", chunk=None))
            for _ in range(2)]
    seen = []
    call = StudentGradEngine.__call__

    def spy(self, students, probs, out=None):
        if self is aggs[0].correction.engine:  # as it runs: on its work rows
            seen.append(self._owned(students, out))
            return call(self, students, probs, out)
        g = torch.empty_like(students)  # the other: on copies of its own
        loss, _ = call(self, students.clone(), probs, g)
        out.copy_(g)
        return loss, out

    monkeypatch.setattr(StudentGradEngine, "__call__", spy)
    for i in range(9):
        d = 0.05 * torch.randn(aggs[0].spec.numel, generator=rng)
        for agg in aggs:
            agg.submit(d, base_version=max(0, agg.version - 1))
    assert seen == [True, True] and aggs[0].stats()["corrected"] == 6  # buffers 2 and 3, stale by one
    torch.testing.assert_close(aggs[0].params, aggs[1].params, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("chunk", [None, 4], ids=["one-pass", "chunks-of-4"])
def test_a_pass_on_the_work_rows_replays_in_place_and_others_still_copy(chunk, rng):
    """On a GPU with CUDA graphs, a pass over the whole work rows is captured on those rows (its
    static input and output are them: nothing copied); passes of other tensors, and the passes of
    a call split into chunks, are captured on copies, so no pass overwrites another's gradients.
    Every call gives native's uncaptured fp32 gradients (TF32 off), whatever came before it."""
    model, spec, proxy, students, probs = _engine_case(_ChainThenSmooth, 12, 14, 8, rng, "cuda")
    with _no_tf32():
        eng = StudentGradEngine(model, spec, proxy, 3.0, conv="native", chunk=chunk, cuda_graphs=True)
        ref = StudentGradEngine(model, spec, proxy, 3.0, conv="native", chunk=None)
        s, g = eng.work_rows(8, torch.float32)
        for i in range(4):  # work rows, other tensors, work rows, other tensors: fresh students each time
            x = students + 0.05 * torch.randn(students.shape, generator=rng).cuda()
            own = i % 2 == 0
            if own:
                s.copy_(x)
                g.fill_(float("nan"))
                loss, grads = eng(s, probs, out=g)
                assert grads.data_ptr() == g.data_ptr()
            else:
                loss, grads = eng(x, probs)
            loss0, g0 = ref(x, probs)
            torch.testing.assert_close(loss, loss0, rtol=1e-5, atol=1e-6)
            assert float((grads - g0).norm() / g0.norm()) < 1e-5
    keys = sorted(eng._graphs, key=str)
    if chunk is None:
        assert [k[3] for k in keys] == [False, True]
        graph, s_static, _, g_static, _ = eng._graphs[(8, tuple(probs.shape), "native", True)]
        assert s_static.data_ptr() == s.data_ptr() and g_static.data_ptr() == g.data_ptr()
    else:  # chunks never capture on the work rows
        assert [k[:1] + k[3:] for k in keys] == [(4, False)]
