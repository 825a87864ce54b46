"""The GPU aggregator's staged path, run on a CPU.

On a GPU, a host update is staged into a pinned row, copied from there into its delta row on an
ingest stream, and the next buffer fills the other of two delta buffers while this one is
corrected and merged (fastagg.aggregator._Ingest). Two waits keep that right: staging into a row
waits for that row's last copy to have left it, and the merge (and a checkpoint) waits for the
buffer's copies to have landed. On a GPU a missing wait shows only now and then, when a copy
happens to be slow. Here ``LateIngest`` stands in for ``_Ingest`` on a CPU: its copies are
queued and run late, each at a random moment between being queued and the wait that needs it
(as a GPU's complete on their own), so a missing wait gives a wrong model.

Checked: the random operation sequences of test_random_operations against their float64
reference; threads and checkpoints against a replay; the row rotation of one submitting thread
(also on CUDA, through the real class); and, to show that the stand-in sees such a fault, an
aggregator whose staging does not wait for the row's last copy ends with another model. The
DistributedAggregator's ranks run through the stand-in in test_distributed.py (``kd_staged``).
Not modelled: a copy into a delta buffer waiting for the merge that last read it (the stand-in's
merges run at once), device-resident updates, CUDA graphs.
"""

from __future__ import annotations

import collections
import random
import threading

import pytest
import torch

import fastagg
import fastagg.aggregator as fa
import test_concurrency_checkpoint as cc
import test_random_operations as ro

from conftest import mlp, need_backend

GPU_INGEST = fa._Ingest  # the class the stand-in replaces; put back to make a plain CPU aggregator


class _Done:
    """Stand-in for a CUDA event: ``synchronize`` runs the copies queued up to it."""

    def __init__(self, ingest, number):
        self.ingest, self.number = ingest, number

    def synchronize(self):
        self.ingest.run_to(self.number)


class LateIngest:
    """fastagg.aggregator._Ingest on a CPU, its copies late. ``waits``: False makes the events'
    ``synchronize`` do nothing (a staging that does not wait for the row's copy)."""

    rng = random.Random(0)
    waits = True
    made: list = []
    most_queued = 0  # the most copies queued at once, over the test: late copies really happened

    @staticmethod
    def used_on(device):
        return True

    @staticmethod
    def pinned(rows, numel, dtype):
        return torch.full((rows, numel), float("nan"), dtype=dtype)  # a copy read before staging shows

    def __init__(self, device):
        self.lock = threading.Lock()
        self.queue = collections.deque()
        self.queued = self.ran = 0
        LateIngest.made.append(self)

    def run_to(self, number):
        with self.lock:
            self._run(number)

    def _run(self, number):  # under self.lock
        while self.ran < number:
            self.queue.popleft()()
            self.ran += 1

    def _drift(self):
        """Some of the queued copies complete now, on their own."""
        with self.lock:
            if LateIngest.rng.random() < 0.3:
                self._run(self.ran + LateIngest.rng.randint(0, len(self.queue)))

    def copy(self, dst, src, after=None):
        # ``after``: the merge that last read ``dst``'s buffer; merges run at once here
        self._drift()
        with self.lock:
            self.queue.append(lambda: dst.copy_(src))  # reads the staging row when it runs, as DMA does
            self.queued += 1
            number = self.queued
            LateIngest.most_queued = max(LateIngest.most_queued, len(self.queue))
        return _Done(self, number) if LateIngest.waits else _Done(self, 0)

    def join(self):
        self.run_to(self.queued)

    def mark(self):
        self._drift()
        return _Done(self, 0)


@pytest.fixture
def late(monkeypatch, rng):
    """Every Aggregator made in the test takes the staged path, its copies late."""
    monkeypatch.setattr(fa, "_Ingest", LateIngest)
    monkeypatch.setattr(LateIngest, "rng", random.Random(int(torch.randint(0, 2**31, (1,), generator=rng))))
    monkeypatch.setattr(LateIngest, "made", [])
    monkeypatch.setattr(LateIngest, "most_queued", 0)
    return LateIngest


def _copies(late):
    return sum(i.queued for i in late.made)


@pytest.mark.parametrize("rule", sorted(ro.RULES))
def test_random_operations_on_the_staged_path_match_the_reference(rule, rng, late):
    """test_random_operations' sequences (faults, flushes, checkpoints, rollbacks, set_global)
    through pinned rows and late copies, float64, against the float64 reference server."""
    ro._run(rule, "applied", rng)
    assert _copies(late) > 20 and late.most_queued >= min(2, ro.RULES[rule].capacity)  # FedAsync(0.6): 1


@pytest.mark.parametrize("rule, backend, delta_dtype", [
    ("fedbuff_kd", "cpp", torch.bfloat16), ("fedasync_batch3", "cpp", None), ("fedbuff_momentum", "numba", None),
    ("fedasync_batch3_kd", "cpp", torch.float16)])
def test_random_operations_on_the_staged_path_in_float32_and_16_bit_rows(rule, backend, delta_dtype, rng, late):
    need_backend(backend)
    ro._run(rule, "applied", rng, backend=backend, delta_dtype=delta_dtype, dtype=torch.float32)
    assert _copies(late) > 20 and late.most_queued >= 2


@pytest.mark.parametrize("rule", [fastagg.FedBuff(5, momentum=0.5, server_lr=0.7), fastagg.FedAsync(0.6, batch_size=3)],
                         ids=["fedbuff", "fedasync"])
def test_threads_and_checkpoints_on_the_staged_path_replay_exactly(rule, rng, late):
    """test_concurrency_checkpoint's six submitting threads and a checkpointer, through pinned
    rows and late copies: every checkpoint, restored and fed the later updates, ends where the
    threaded aggregator ended, bit for bit."""
    cc.test_checkpoints_taken_during_concurrent_submits_each_continue_to_the_final_model(rule, rng)
    assert _copies(late) >= 300


def test_sixteen_threads_on_the_staged_path_lose_nothing(late):
    cc.test_sixteen_threads_lose_nothing_and_replay_matches()
    assert _copies(late) >= 16 * 400


@pytest.mark.parametrize("where", ["stand_in", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the real pinned rows and stream need a CUDA device"))])
@pytest.mark.parametrize("rule, rows", [(fastagg.FedBuff(4), 4), (fastagg.FedAsync(0.5), 2)], ids=["fedbuff", "fedasync"])
def test_one_thread_goes_round_the_staging_rows(where, rule, rows, rng, monkeypatch, request):
    """A pinned row is free again once its copy to the device is enqueued; staging into the same
    row at the next submit would wait for that copy. One submitting thread must go round the
    rows (any ``rows`` consecutive submits into as many rows: FedBuff(4) has four, FedAsync's
    batch of one two), and the model must equal a CPU aggregator's: bit for bit through the
    stand-in (the same values reach the same merge), to rounding on a GPU (its merge)."""
    model = mlp(d_in=6, hidden=64, classes=5)
    if where == "stand_in":
        request.getfixturevalue("late")
        staged = fastagg.Aggregator(model, rule)
        monkeypatch.setattr(fa, "_Ingest", GPU_INGEST)
    else:
        staged = fastagg.Aggregator(model, rule, device="cuda")
    plain = fastagg.Aggregator(model, rule, backend=staged.backend if where == "stand_in" else "auto")
    assert staged._staging is not None and plain._staging is None
    used, write = [], staged._write_row
    row_bytes = staged._staging.stride(0) * staged._staging.element_size()

    def spy(update, row, threads=1):
        used.append((row.data_ptr() - staged._staging.data_ptr()) // row_bytes)
        return write(update, row, threads)

    monkeypatch.setattr(staged, "_write_row", spy)
    for _ in range(14):
        d = torch.randn(staged.spec.numel, generator=rng)
        staged.submit(d, base_version=staged.version)
        plain.submit(d, base_version=plain.version)
    assert all(len(set(used[i:i + rows])) == rows for i in range(len(used) - rows + 1)), used
    staged.flush(), plain.flush()
    assert staged.version == plain.version == (4 if rows == 4 else 14)
    if where == "stand_in":
        assert torch.equal(staged.params, plain.params)
    else:
        assert torch.allclose(staged.params.cpu(), plain.params, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("waits", [True, False], ids=["waits", "does_not_wait"])
def test_staging_into_a_row_waits_for_its_last_copy(waits, rng, late, monkeypatch):
    """FedBuff(4): updates A, B, C go to rows 3, 2, 1 and their copies stay queued (no copy
    completes on its own here); a rejected update takes row 0 and gives it back, which puts A's
    row first in turn again; D is staged into it before the merge. Staging must wait for A's
    copy first. With the wait the model equals a CPU aggregator's; without it (the events'
    synchronize doing nothing) A's copy reads D, and the model is another: the stand-in sees it."""
    monkeypatch.setattr(late, "waits", waits)
    monkeypatch.setattr(late, "_drift", lambda self: None)
    model = mlp(d_in=6, hidden=16, classes=5)
    staged = fastagg.Aggregator(model, fastagg.FedBuff(4), max_update_norm=50.0)
    monkeypatch.setattr(fa, "_Ingest", GPU_INGEST)
    plain = fastagg.Aggregator(model, fastagg.FedBuff(4), max_update_norm=50.0)
    P = staged.spec.numel
    A, B, C, D = (torch.randn(P, generator=rng) for _ in range(4))
    for agg in (staged, plain):
        for i, d in enumerate((A, B, C)):
            agg.submit(d, base_version=0, client_id=i)
        with pytest.raises(fastagg.errors.UpdateNormError):
            agg.submit(1e3 * A, base_version=0, client_id="x")
    assert staged._free_rows[0] == 3 and staged._row_copied[3] is not None and late.made[0].ran == 0
    for agg in (staged, plain):
        assert agg.submit(D, base_version=0, client_id=3).status == "merged"
    assert torch.equal(staged.params, plain.params) == waits
