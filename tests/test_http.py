"""The HTTP server and client (fastagg.integrations.http) against direct calls of the aggregator."""

import contextlib
import http.client
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
import torch

import fastagg
from fastagg import errors
from fastagg.integrations.http import Client, Server, ServerBusyError

from conftest import mlp


def _agg(**kw):
    kw.setdefault("rule", fastagg.FedBuff(4, server_lr=0.8))
    kw.setdefault("max_staleness", 6)
    return fastagg.Aggregator(mlp(), kw.pop("rule"), staleness=fastagg.staleness.polynomial(0.5),
                              max_update_norm=50.0, **kw)


def _delta(agg, gen, scale=0.05):
    return {k: scale * torch.randn(v.shape, generator=gen) for k, v in agg.pull()[1].items()}


def _connect(server):
    u = urllib.parse.urlsplit(server.url)
    return http.client.HTTPConnection(u.hostname, u.port, timeout=10)


def _raw(server, method, path, body=None, headers=None):
    """(status, headers, body) of one request, sent as given (no client-side checks)."""
    conn = _connect(server)
    try:
        conn.putrequest(method, path)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        conn.endheaders()
        if body:
            conn.send(body)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def _state(agg):
    st = agg.stats()
    st.pop("rejected"), st.pop("rejected_total")
    return agg.params.clone(), agg.version, st


def test_updates_over_http_equal_direct_submits(rng, device):
    """Stale, bf16 and fp32 updates through the server give the same model, version, receipts and
    statistics as the same updates submitted directly, with the KD correction on."""
    proxy = torch.randn(12, 6, generator=rng).to(device)  # on a GPU: pinned staging, Triton merge and KD
    served = _agg(correction=fastagg.KDCorrection(proxy, steps=2), device=device)
    direct = _agg(correction=fastagg.KDCorrection(proxy, steps=2), device=device)
    with Server(served) as server:
        client = Client(server.url)
        for i in range(11):
            version, params = client.pull()
            assert version == served.version
            assert all(torch.equal(params[k], v.cpu()) for k, v in served.pull()[1].items())
            base = max(0, version - i % 3)  # up to two versions stale
            delta = _delta(served, rng)
            dtype = torch.bfloat16 if i % 2 else None
            r = client.submit(delta, base_version=base, num_samples=5 + i, client_id=f"c{i}", dtype=dtype)
            d = direct.submit(fastagg.encode_update(delta, base_version=base, num_samples=5 + i,
                                                    client_id=f"c{i}", dtype=dtype))
            assert r == d
        assert torch.equal(served.params, direct.params) and served.version == direct.version == 2
        stats = client.stats()
        assert stats["http"] == {"200": 11 + 11}  # pulls and submits (not this request: read before it)
        assert stats["accepted"] == 11 and stats["corrected"] == direct.stats()["corrected"] > 0
        assert client.version() == 2


REJECTED = {"non_finite": errors.NonFiniteUpdateError, "future_version": errors.FutureVersionError,
            "duplicate": errors.DuplicateUpdateError, "keys": errors.UpdateKeysError,
            "too_stale": errors.StaleUpdateError, "bad_argument": errors.BadArgumentError}


@pytest.mark.parametrize("case", ["malformed", *REJECTED])
def test_rejection_raises_the_servers_error_and_changes_nothing(case, rng):
    agg = _agg()
    with Server(agg) as server:
        client = Client(server.url)
        for i in range(29):  # seven merges, one update buffered
            client.submit(_delta(agg, rng), base_version=agg.version, client_id=f"w{i}")
        before = _state(agg)
        good = _delta(agg, rng)
        if case == "malformed":
            status, _, body = _raw(server, "POST", "/update", b"\x08\x00\x00\x00\x00\x00\x00\x00{}{}{}",
                                   {"Content-Length": "14"})
            assert status == 400 and b'"malformed"' in body
        else:
            kw = {"base_version": agg.version, "client_id": "new"}
            if case == "non_finite":
                good[next(iter(good))][0] = float("nan")
            elif case == "future_version":
                kw["base_version"] = agg.version + 1
            elif case == "duplicate":
                kw.update(base_version=1, client_id="w5")
            elif case == "keys":
                good.pop(next(iter(good)))
            elif case == "too_stale":
                kw["base_version"] = 0  # staleness 7 > max_staleness 6
            elif case == "bad_argument":
                kw["base_version"] = -1
            with pytest.raises(REJECTED[case]) as info:
                client.submit(good, **kw)
            assert str(info.value)  # the server's message travels
        after = _state(agg)
        assert torch.equal(before[0], after[0]) and before[1:] == after[1:]
        assert agg.stats()["rejected"] == {case: 1}
        assert client.stats()["http"]["400"] == 1


def test_transport_errors_leave_the_aggregator_alone(rng):
    agg = _agg()
    with Server(agg, max_body=4096) as server:
        client = Client(server.url)
        client.submit(_delta(agg, rng), base_version=0)
        before = _state(agg)
        big = {k: torch.zeros(v.shape[0] * 40, *v.shape[1:]) for k, v in agg.pull()[1].items()}
        with pytest.raises(errors.PayloadTooLargeError, match="at most 4096"):
            client.submit(big, base_version=0)
        status, headers, _ = _raw(server, "POST", "/update", b"", {"Content-Length": str(1 << 40)})
        assert status == 413 and headers.get("Connection") == "close"
        assert _raw(server, "POST", "/update")[0] == 411  # no Content-Length
        assert _raw(server, "POST", "/update", None, {"Content-Length": "-3"})[0] == 400
        assert _raw(server, "GET", "/update")[0] == 405
        assert _raw(server, "POST", "/model", None, {"Content-Length": "0"})[0] == 405
        assert _raw(server, "GET", "/nothing")[0] == 404
        after = _state(agg)
        assert torch.equal(before[0], after[0]) and before[1:] == after[1:]
        assert agg.stats()["rejected"] == {}
        assert client.stats()["http"] == {"200": 1, "400": 1, "404": 1, "405": 2, "411": 1, "413": 2}


def test_a_client_that_stops_mid_body_is_dropped(rng):
    agg = _agg()
    with Server(agg, timeout=0.3) as server:
        conn = _connect(server)
        conn.putrequest("POST", "/update")
        conn.putheader("Content-Length", "1000")
        conn.endheaders()
        conn.send(b"x" * 10)  # and nothing more
        with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
            conn.getresponse()
        conn.close()
        with socket.create_connection(server.httpd.server_address[:2], timeout=10) as sock:  # closes mid-body
            sock.sendall(b"POST /update HTTP/1.1\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(100) == b""  # no answer: the connection is closed
        Client(server.url).submit(_delta(agg, rng), base_version=0)  # still serving
        assert server.responses["timeout"] == 1 and server.responses["incomplete"] == 1
        assert agg.stats()["accepted"] == 1 and agg.stats()["rejected_total"] == 0


def test_concurrent_clients_lose_nothing_and_replay_matches(device):
    threads, per_thread = 8, 15
    # no staleness bound: how stale an update gets depends on the thread schedule
    agg = _agg(rule=fastagg.FedBuff(5, server_lr=0.5), max_staleness=None, device=device)
    log, lock = {}, threading.Lock()
    with Server(agg) as server:
        def worker(w):
            client, g = Client(server.url), torch.Generator().manual_seed(500 + w)
            for i in range(per_thread):
                version, _ = client.pull()
                delta = _delta(agg, g, 0.01)
                r = client.submit(delta, base_version=version, client_id=f"{w}-{i}")
                with lock:
                    log[r.seq] = (delta, version, f"{w}-{i}")

        ts = [threading.Thread(target=worker, args=(w,)) for w in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    n = threads * per_thread
    assert sorted(log) == list(range(n)) and agg.stats()["merged"] == n and agg.version == n // 5
    replay = _agg(rule=fastagg.FedBuff(5, server_lr=0.5), max_staleness=None, device=device)
    for seq in range(n):
        delta, version, cid = log[seq]
        replay.submit(delta, base_version=version, client_id=cid)
    assert torch.equal(replay.params, agg.params)


def test_example_server_and_clients_in_two_processes_learn():
    """examples/http/http_fedadt.py: the server in one process, its clients in another."""
    example = Path(__file__).resolve().parents[1] / "examples" / "http" / "http_fedadt.py"
    server = subprocess.Popen([sys.executable, str(example), "--serve", "--updates", "320", "--token", "t0k"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = server.stdout.readline()
        url = re.fullmatch(r"serving on (http://\S+)\n", first)
        assert url, first + server.stderr.read()
        clients = subprocess.run([sys.executable, str(example), "--connect", url.group(1), "--token", "t0k"],
                                 capture_output=True, text=True, timeout=240)
        out, err = server.communicate(timeout=60)
    finally:
        server.kill()
    assert server.returncode == 0 and clients.returncode == 0, err[-3000:] + clients.stderr[-3000:]
    acc = [float(a) for a in re.findall(r"test accuracy (\d\.\d+)", out)]
    assert len(acc) >= 3 and acc[-1] >= 0.6 and acc[-1] > acc[0] + 0.2, out
    merged = re.search(r"merged (\d+) updates \((\d+) corrected\), mean staleness (\S+), rejected 0", out)
    assert merged and int(merged.group(1)) >= 320 and int(merged.group(2)) > 0 and float(merged.group(3)) > 0, out


def test_a_full_rank_answers_503_and_a_failing_aggregator_500(rng):
    """The two answers that are not the client's fault: back-pressure (the BufferFullError of a
    DistributedAggregator rank, here from an aggregator that holds at most two updates) and a
    failure inside the aggregator (a KD correction whose proxy does not fit the model)."""

    class TwoAtATime(fastagg.Aggregator):
        def submit(self, update, *a, **kw):
            if len(self._pending) >= 2:
                raise errors.BufferFullError("this rank holds 2 updates; send it again after the next step")
            return super().submit(update, *a, **kw)

    agg = TwoAtATime(mlp(), fastagg.FedBuff(4))
    with Server(agg) as server:
        client = Client(server.url)
        for i in range(2):
            client.submit(_delta(agg, rng), base_version=0, client_id=i)
        with pytest.raises(errors.BufferFullError, match="after the next step"):
            client.submit(_delta(agg, rng), base_version=0, client_id=2)
        assert agg.stats()["buffered"] == 2 and server.responses["503"] == 1

    broken = _agg(correction=fastagg.KDCorrection(torch.randn(5, 6)))
    for i in range(4):
        broken.submit(_delta(broken, rng), base_version=0, client_id=f"fresh{i}")  # version 1

    def correct(*args, **kwargs):  # as an out-of-memory in the correction would
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    broken.correction.correct = correct
    with Server(broken) as server:
        client = Client(server.url)
        for i in range(3):
            client.submit(_delta(broken, rng), base_version=0, client_id=i)  # stale: to be corrected
        with pytest.raises(RuntimeError, match=r"HTTP 500 \(internal\): OutOfMemoryError: .*injected"):
            client.submit(_delta(broken, rng), base_version=0, client_id=3)  # fills the buffer
        assert server.responses["500"] == 1
        st = broken.stats()  # the failed merge undid that submit: send it again once fixed
        assert st["accepted"] == 7 and st["buffered"] == 3 and st["merge_failures"] == 1
        assert client.version() == broken.version  # still serving


def test_the_model_payload_is_encoded_once_per_change_of_the_parameters(rng):
    """GET /model serves ``pull_bytes``: one payload per change of the parameters (merge,
    set_global, load_state_dict), never a stale one."""
    agg = _agg()

    def check(payload):
        version, tensors = fastagg.wire.decode_model(payload)
        want_version, want = agg.pull()
        assert version == want_version and all(torch.equal(tensors[k], v) for k, v in want.items())

    first = agg.pull_bytes()
    check(first)
    for i in range(3):  # buffered, not merged: the parameters stay
        agg.submit(_delta(agg, rng), base_version=0, client_id=i)
        assert agg.pull_bytes() is first
    state = agg.state_dict()
    agg.submit(_delta(agg, rng), base_version=0, client_id=3)  # merges: version 1
    merged = agg.pull_bytes()
    assert merged is not first and agg.pull_bytes() is merged
    check(merged)
    agg.set_global(torch.randn(agg.spec.numel, generator=rng))  # same version, other parameters
    check(agg.pull_bytes())
    agg.load_state_dict(state)
    restored = agg.pull_bytes()
    check(restored)
    assert restored == first  # version 0's parameters again, encoded anew


def test_close_waits_for_the_requests_in_flight(rng):
    """close() returns after the submit in flight has answered; a later request on a kept-alive
    connection gets 503 (the client raises ConnectionError) and reaches nothing."""
    entered, release = threading.Event(), threading.Event()

    class Slow(fastagg.Aggregator):
        def submit(self, update, *a, **kw):
            entered.set()
            release.wait(10)
            return super().submit(update, *a, **kw)

    agg = Slow(mlp(), fastagg.FedBuff(4))
    server = Server(agg)
    idle = _connect(server)  # kept alive across close()
    idle.request("GET", "/version")
    assert idle.getresponse().read() == b'{"version": 0}'
    answers = []
    sender = threading.Thread(target=lambda: answers.append(
        Client(server.url).submit(_delta(agg, rng), base_version=0, client_id="slow")))
    sender.start()
    assert entered.wait(10)
    closer = threading.Thread(target=server.close)
    closer.start()
    closer.join(0.3)
    assert closer.is_alive() and not answers  # close() waits for the submit in flight
    release.set()
    closer.join(10)
    sender.join(10)
    assert not closer.is_alive() and answers[0].status == "buffered" and agg.stats()["accepted"] == 1
    idle.request("GET", "/version")
    resp = idle.getresponse()
    assert resp.status == 503 and b"shutting down" in resp.read()
    idle.close()
    with pytest.raises(OSError, match="refused"):  # urllib's URLError: the port is closed
        Client(server.url).version()


def test_connections_beyond_the_bound_are_answered_busy(rng):
    agg = _agg()
    with Server(agg, max_connections=2, timeout=5) as server:
        held = []
        for _ in range(2):  # two kept-alive connections hold both handler threads
            conn = _connect(server)
            conn.request("GET", "/version")
            assert conn.getresponse().read() == b'{"version": 0}'
            held.append(conn)
        impatient = Client(server.url, busy_retries=0)
        with pytest.raises(ServerBusyError, match="503: the server holds max_connections=2"):
            impatient.version()
        with pytest.raises(OSError):  # the 503, or a reset if the socket closed under the body being sent
            impatient.submit(_delta(agg, rng), base_version=0)
        assert agg.stats()["accepted"] == 0 and agg.stats()["rejected_total"] == 0
        assert server.responses["503"] == 2
        threading.Timer(0.2, held.pop().close).start()  # frees one thread, and with it a slot
        assert Client(server.url).version() == 0  # refused, then sent again until the slot is free
        assert server.responses["503"] >= 3
        held.pop().close()
    with pytest.raises(ValueError, match="max_connections"):
        Server(agg, max_connections=0)


def test_pulls_during_concurrent_merges_always_match_their_version():
    """Model payloads pulled while other threads submit and merge: each one names a version no
    older than the one current at the call, and holds exactly that version's parameters (the
    cache never outlives a merge)."""
    agg = _agg(rule=fastagg.FedBuff(3), max_staleness=None)
    log, pulled, lock = {}, [], threading.Lock()
    stop = threading.Event()

    start = threading.Barrier(5)

    def submitter(w):
        g = torch.Generator().manual_seed(w)
        start.wait()
        for i in range(40):
            time.sleep(0.001)  # let the pulls interleave with the merges
            version, _ = agg.pull(flat=True)
            delta = 0.01 * torch.randn(agg.spec.numel, generator=g)
            r = agg.submit(delta, base_version=version, client_id=(w, i))
            with lock:
                log[r.seq] = (delta, version, (w, i))

    def puller():
        start.wait()
        while not stop.is_set():
            with agg._lock:  # the committed version: a merge holds the lock until it commits
                current = agg.version
            version, tensors = fastagg.wire.decode_model(agg.pull_bytes())
            pulled.append((current, version, agg.spec.flatten(tensors)))

    subs = [threading.Thread(target=submitter, args=(w,)) for w in range(3)]
    pulls = [threading.Thread(target=puller) for _ in range(2)]
    for t in subs + pulls:
        t.start()
    for t in subs:
        t.join()
    stop.set()
    for t in pulls:
        t.join()
    replay = _agg(rule=fastagg.FedBuff(3), max_staleness=None)
    at = {0: replay.params.clone()}
    for seq in range(len(log)):
        delta, version, cid = log[seq]
        replay.submit(delta, base_version=version, client_id=cid)
        at[replay.version] = replay.params.clone()
    assert torch.equal(replay.params, agg.params) and agg.version == 40
    assert len({v for _, v, _ in pulled}) > 5  # the pulls saw many versions
    for current, version, params in pulled:
        assert version >= current, (current, version)  # never a version older than the one at the call
        assert torch.equal(params, at[version]), version


def test_a_payload_encoded_across_a_merge_is_not_cached(rng, monkeypatch):
    """pull_bytes encodes outside the lock: a merge that lands meanwhile must not leave the old
    version's payload cached as the current one (made deterministic by merging from inside the
    encoder)."""
    agg = _agg()
    for i in range(3):
        agg.submit(_delta(agg, rng), base_version=0, client_id=i)
    encode = fastagg.wire.encode_model

    def encode_then_merge(state, version):
        payload = encode(state, version)
        monkeypatch.setattr(fastagg.wire, "encode_model", encode)
        agg.submit(_delta(agg, rng), base_version=0, client_id=3)  # fills the buffer: version 1
        return payload

    monkeypatch.setattr(fastagg.wire, "encode_model", encode_then_merge)
    assert fastagg.wire.decode_model(agg.pull_bytes())[0] == 0  # current when it was called
    version, tensors = fastagg.wire.decode_model(agg.pull_bytes())
    assert version == agg.version == 1 and torch.equal(agg.spec.flatten(tensors), agg.params)


def test_a_token_keeps_out_requests_without_it(rng):
    agg = _agg()
    with Server(agg, token="s3cret") as server:
        good = Client(server.url, token="s3cret")
        good.submit(_delta(agg, rng), base_version=0, client_id="ok")
        before = _state(agg)
        for client in (Client(server.url), Client(server.url, token="s3cre"), Client(server.url, token="s3cret2")):
            with pytest.raises(PermissionError, match="401"):
                client.submit(_delta(agg, rng), base_version=0, client_id="intruder")
            with pytest.raises(PermissionError):
                client.pull()
        status, headers, _ = _raw(server, "GET", "/stats", None, {"Authorization": "Basic s3cret"})
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
        after = _state(agg)
        assert torch.equal(before[0], after[0]) and before[1:] == after[1:] and agg.stats()["rejected_total"] == 0
        assert good.pull()[0] == 0 and good.stats()["http"]["401"] == 7


def test_a_pull_does_not_wait_for_a_merge_in_progress(rng):
    """While a merge (here its KD correction) runs, the model already encoded is served at once:
    the version before the merge; after it, the new one."""
    agg = _agg(correction=fastagg.KDCorrection(torch.randn(8, 6, generator=rng)))
    for i in range(4):
        agg.submit(_delta(agg, rng), base_version=0, client_id=i)  # version 1; next ones are corrected
    before = agg.pull_bytes()
    inside, release = threading.Event(), threading.Event()
    correct = agg.correction.correct

    def slow(*args, **kwargs):
        inside.set()
        release.wait(10)
        return correct(*args, **kwargs)

    agg.correction.correct = slow
    for i in range(3):
        agg.submit(_delta(agg, rng), base_version=0, client_id=f"s{i}")
    merging = threading.Thread(target=agg.submit, args=(_delta(agg, rng),), kwargs={"base_version": 0})
    merging.start()
    try:
        assert inside.wait(10)
        got = []
        puller = threading.Thread(target=lambda: got.append(agg.pull_bytes()))
        puller.start()
        puller.join(5)
        assert got and got[0] is before  # served while the merge holds the lock
    finally:
        release.set()
        merging.join(10)
    version, _ = fastagg.wire.decode_model(agg.pull_bytes())
    assert version == agg.version == 2


def test_garbage_on_the_wire_changes_nothing(rng):
    """Random bytes, bad request lines, oversized headers, bad lengths, cut payloads and payloads
    whose header length is corrupted: the server answers or drops each, keeps serving, and nothing
    reaches the model."""
    import random

    agg = _agg()
    r = random.Random(int(torch.randint(0, 2**31, (1,), generator=rng)))
    good = fastagg.encode_update({k: 0.01 * torch.ones_like(v) for k, v in agg.pull()[1].items()}, base_version=0)
    before = agg.params.clone()
    with Server(agg, timeout=0.5, max_body=len(good) + 64) as server:
        for _ in range(80):
            kind = r.randrange(4)
            if kind == 0:
                data = bytes(r.randrange(256) for _ in range(r.randint(0, 300)))
            elif kind == 1:
                length = r.choice(["abc", "-1", "99999999999999999999", "10", ""])
                head = f"POST /update HTTP/1.1\r\nContent-Length: {length}\r\n\r\n".encode()
                data = head + good[:r.randrange(len(good))]
            elif kind == 2:
                data = b"GET /model HTTP/1.1\r\nX: " + b"a" * r.randint(0, 70000) + b"\r\n\r\n"
            else:
                body = bytearray(good)
                body[r.randrange(8)] ^= 1 << r.randrange(8)  # the header's length: no longer a payload
                data = f"POST /update HTTP/1.1\r\nContent-Length: {len(body)}\r\n\r\n".encode() + bytes(body)
            with contextlib.suppress(OSError), socket.create_connection(server.httpd.server_address[:2], 5) as sock:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(65536):
                    pass
        assert Client(server.url).version() == 0
    assert torch.equal(agg.params, before) and agg.stats()["accepted"] == 0


@pytest.mark.parametrize("kw, words", [(dict(max_connections=0), "max_connections"), (dict(timeout=0), "timeout"),
                                       (dict(timeout=float("nan")), "timeout"), (dict(max_body=0), "max_body")])
def test_server_settings_that_would_refuse_every_request_are_refused(kw, words):
    with pytest.raises(ValueError, match=words):
        Server(_agg(), **kw)
