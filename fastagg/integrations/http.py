"""fastagg behind plain HTTP: the standard library's ``http.server``, no web framework.

The server process embeds the aggregator and serves it on threads; a client needs only HTTP
and the wire format (safetensors bytes, see fastagg.wire):

    server = Server(agg, host="0.0.0.0", port=8080)   # serves from a background thread at once
    ...                                                # the process goes on: evaluation, checkpoints
    server.close()

    client = Client("http://server:8080")
    version, params = client.pull()
    receipt = client.submit(delta, base_version=version, num_samples=64, client_id="c17")

Endpoints:

    GET  /model    200: the model as wire bytes (its version in the safetensors metadata and in
                   the X-Fastagg-Version header), encoded once per change of the parameters
    GET  /version  200: JSON {"version": v}, a cheap poll
    GET  /stats    200: JSON, ``agg.stats()`` and, under "http", the responses by status code
    POST /update   body: one update payload (``fastagg.encode_update``).
                   200: JSON, the receipt. 400: JSON {"reason", "error"}, a rejected update
                   (``agg.stats()["rejected"]`` counts it by reason, nothing else changed).
                   413: Content-Length over ``max_body``; the body is not read. 411: no
                   Content-Length. 500: the aggregator failed ({"reason": "internal"}).
    any            401: no valid token (``token=``). 503 with Retry-After: a DistributedAggregator
                   rank that holds ``local_capacity`` updates ("buffer_full"), ``max_connections``
                   connections open ("busy"), or the server closing ("closing").

Requests run concurrently (``submit`` is thread-safe), one thread per connection and at most
``max_connections`` of them; the request whose update fills the buffer returns after the merge.
A connection silent for ``timeout`` seconds is dropped, so a client that stalls mid-body does
not hold a thread. ``close()`` waits for the requests in flight. ``Client.submit`` raises, on a
400, 413 or 503 "buffer_full", the ``fastagg.errors`` class of the rejection with the server's
message; on 401 ``PermissionError``; a server unreachable, busy (after ``busy_retries`` tries)
or closing raises an ``OSError`` (urllib's ``URLError``, ``ServerBusyError``, ``ConnectionError``).

``token``: every request must carry ``Authorization: Bearer <token>`` (compared in constant
time; otherwise 401, the body unread, nothing reaches the aggregator); ``Client(url, token=...)``
sends it. No TLS: the token and the model travel in the clear, so put the server behind a proxy
that terminates TLS. Bound ``max_body`` to what the model's updates need (default 8·P bytes +
1 MiB: float64 deltas fit).
"""

from __future__ import annotations

import collections
import contextlib
import hmac
import json
import logging
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .. import errors, wire
from ..aggregator import Receipt

log = logging.getLogger("fastagg.http")

VERSION_HEADER = "X-Fastagg-Version"


class Server:
    """Serve ``agg`` over HTTP on ``host:port`` (port 0: any free port; ``url`` says which)
    from a background thread, until ``close()``."""

    def __init__(self, agg, host: str = "127.0.0.1", port: int = 0, *, max_body: int | None = None,
                 timeout: float = 30.0, max_connections: int = 256, token: str | None = None):
        self.aggregator = agg
        self._token = None if token is None else token.encode()
        self.max_body = int(max_body) if max_body is not None else 8 * agg.spec.numel + (1 << 20)
        # "200", "400", ... by status code; "timeout" / "incomplete": a body that never arrived whole
        self.responses: collections.Counter = collections.Counter()
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)  # notified when the last request in flight ends
        self._in_flight, self._closing = 0, False
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        if not timeout > 0:  # 0 would make every socket non-blocking, NaN every wait undefined
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if self.max_body < 1:
            raise ValueError(f"max_body must be >= 1 byte, got {max_body}")
        handler = type("Handler", (_Handler,), {"state": self, "timeout": float(timeout)})
        self.httpd = _ThreadingServer((host, port), handler, self, int(max_connections))
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.1,), name="fastagg-http",
                                        daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def close(self, wait: float = 60.0) -> None:
        """Stop taking requests, release the port, and wait (at most ``wait`` seconds) for the
        requests in flight to finish: a process may exit after close() without cutting a client
        off mid-answer or leaving a thread inside the aggregator. A request that arrives later on
        a kept-alive connection gets 503."""
        with self._lock:
            self._closing = True
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join()
        with self._lock:
            if not self._done.wait_for(lambda: self._in_flight == 0, timeout=wait):
                log.warning("closed with %d requests still in flight after %.0f s", self._in_flight, wait)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _begin(self) -> bool:
        with self._lock:
            if self._closing:
                return False
            self._in_flight += 1
            return True

    def _end(self):
        with self._lock:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._done.notify_all()

    def _count(self, what):
        with self._lock:
            self.responses[str(what)] += 1


class _ThreadingServer(ThreadingHTTPServer):
    """A thread per connection, at most ``max_connections`` at once: one more is answered 503
    (reason "busy", Retry-After) from the accepting thread and closed unread, so that a flood of
    connections cannot start unbounded threads (a client still sending a body may see the
    connection reset instead of the 503)."""

    daemon_threads = True

    def __init__(self, address, handler, state, max_connections):
        self.state, self.max_connections = state, max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self.state._count(503)
            body = json.dumps({"reason": "busy", "error": f"the server holds max_connections="
                               f"{self.max_connections} connections; try again"}).encode()
            head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                    f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n").encode()
            with contextlib.suppress(OSError):  # a client already gone needs no answer
                request.sendall(head + body)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address):  # socketserver prints a traceback to stderr
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):  # a client that went away
            log.info("connection from %s ended: %r", client_address, exc)
        else:
            log.exception("error serving %s", client_address)


class _Handler(BaseHTTPRequestHandler):
    state: Server  # set on the subclass each Server makes
    protocol_version = "HTTP/1.1"  # keep-alive: every response carries its Content-Length
    disable_nagle_algorithm = True  # headers and body are two writes: without TCP_NODELAY the second
    # waits for the client's delayed ACK (~40 ms per request on a keep-alive connection)

    def do_GET(self):
        self._serve(self._get)

    def do_POST(self):
        self._serve(self._post)

    def _serve(self, handle):
        if not self._authorized():
            self.close_connection = True  # a POST's body stays unread
            return self._error(401, "unauthorized", "a valid 'Authorization: Bearer <token>' header is required",
                               {"WWW-Authenticate": "Bearer"})
        if not self.state._begin():
            self.close_connection = True
            return self._error(503, "closing", "the server is shutting down")
        try:
            handle()
        finally:
            self.state._end()

    def _authorized(self) -> bool:
        want = self.state._token
        if want is None:
            return True
        got = self.headers.get("Authorization", "")
        scheme, _, value = got.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), want)

    def _get(self):
        agg = self.state.aggregator
        if self.path == "/model":
            body = agg.pull_bytes()
            version = wire.read_metadata(body)["version"]
            return self._send(200, body, "application/octet-stream", {VERSION_HEADER: version})
        if self.path == "/version":
            return self._json(200, {"version": agg.version})
        if self.path == "/stats":
            with self.state._lock:
                http = dict(sorted(self.state.responses.items()))
            return self._json(200, {**agg.stats(), "http": http})
        if self.path == "/update":
            return self._error(405, "method", "POST an update to /update", {"Allow": "POST"})
        return self._error(404, "not_found", f"no endpoint {self.path!r}: GET /model, /version, /stats; POST /update")

    def _post(self):
        if self.path != "/update":
            if self.path in ("/model", "/version", "/stats"):
                return self._error(405, "method", f"GET {self.path}", {"Allow": "GET"})
            return self._error(404, "not_found", f"no endpoint {self.path!r}: POST updates to /update")
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True  # the body's end is unknown: nothing more on this connection
            return self._error(411, "length_required", "an update needs a Content-Length header")
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            return self._error(400, "bad_length", f"Content-Length {length!r} is not a byte count")
        if n > self.state.max_body:
            self.close_connection = True  # the body stays unread
            return self._error(413, errors.PayloadTooLargeError.reason,
                               f"the update is {n} bytes; this server takes at most {self.state.max_body}")
        try:
            body = self.rfile.read(n)
        except (TimeoutError, ConnectionError) as exc:
            self.close_connection = True
            self.state._count("timeout")
            log.info("dropped a connection while reading an update: %s", exc)
            return
        if len(body) < n:  # the client closed the connection mid-body: nobody to answer, nothing to count
            self.close_connection = True
            self.state._count("incomplete")
            return
        try:
            receipt = self.state.aggregator.submit(body)
        except errors.BufferFullError as exc:  # a DistributedAggregator rank that is full: retry later
            return self._error(503, exc.reason, str(exc), {"Retry-After": 1})
        except errors.InvalidUpdate as exc:
            return self._error(400, exc.reason, str(exc))
        except Exception as exc:  # the aggregator's own failure, not the client's: say so, keep serving
            log.exception("submit failed")
            return self._error(500, "internal", f"{type(exc).__name__}: {exc}")
        return self._json(200, asdict(receipt))

    def _error(self, code, reason, message, headers=None):
        return self._json(code, {"reason": reason, "error": message}, headers)

    def _json(self, code, obj, headers=None):
        body = json.dumps(obj, default=str).encode()
        return self._send(code, body, "application/json", headers)

    def _send(self, code, body, ctype, headers=None):
        self.state._count(code)  # before the client can read the answer
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):  # http.server writes every request to stderr; log it instead
        log.debug("%s - " + fmt, self.address_string(), *args)


class ServerBusyError(ConnectionError):
    """The server held ``max_connections`` connections and refused this one unread (HTTP 503)."""


_ERRORS = {cls.reason: cls for cls in vars(errors).values()
           if isinstance(cls, type) and issubclass(cls, errors.InvalidUpdate)}


class Client:
    """The client side of ``Server``: pull the model, submit deltas as wire bytes. A request
    refused because the server holds ``max_connections`` connections ("busy": it read nothing)
    is sent again up to ``busy_retries`` times, 0.05 s after the first refusal and twice as
    long after each next one."""

    def __init__(self, url: str, timeout: float = 60.0, token: str | None = None, busy_retries: int = 5):
        self.url, self.timeout, self.token = url.rstrip("/"), float(timeout), token
        self.busy_retries = int(busy_retries)

    def pull(self) -> tuple[int, dict]:
        """(version, {name: tensor}) of the current global model."""
        return wire.decode_model(self._request("GET", "/model"))

    def version(self) -> int:
        return json.loads(self._request("GET", "/version"))["version"]

    def stats(self) -> dict:
        return json.loads(self._request("GET", "/stats"))

    def submit(self, delta, *, base_version: int, num_samples: int = 1, client_id=None, dtype=None) -> Receipt:
        """Send a delta {name: tensor or numpy array} computed on ``base_version`` (``dtype``: send
        it in, e.g., bf16). Returns the server's receipt; raises the ``fastagg.errors`` class of a
        rejection."""
        payload = wire.encode_update(delta, base_version=base_version, num_samples=num_samples,
                                     client_id=client_id, dtype=dtype)
        return Receipt(**json.loads(self._request("POST", "/update", payload)))

    def _request(self, method, path, body=None) -> bytes:
        for attempt in range(self.busy_retries + 1):
            try:
                return self._send(method, path, body)
            except ServerBusyError:
                if attempt == self.busy_retries:
                    raise
                time.sleep(0.05 * 2 ** attempt)
        raise AssertionError("unreachable")

    def _send(self, method, path, body) -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if self.token is not None:
            req.add_header("Authorization", f"Bearer {self.token}")
        if body is not None:
            req.add_header("Content-Type", "application/octet-stream")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                info = json.loads(raw)
                reason, message = info["reason"], info["error"]
            except (ValueError, KeyError, TypeError):
                raise exc from None
            cls = _ERRORS.get(reason)
            if cls is not None and exc.code in (400, 413, 503):
                raise cls(message) from None
            if reason == "busy":
                raise ServerBusyError(f"{method} {path}: HTTP {exc.code}: {message}") from None
            if reason == "closing":  # the server's state, not the request's
                raise ConnectionError(f"{method} {path}: HTTP {exc.code}: {message}") from None
            if exc.code == 401:
                raise PermissionError(f"{method} {path}: HTTP 401: {message}") from None
            raise RuntimeError(f"{method} {path}: HTTP {exc.code} ({reason}): {message}") from None
