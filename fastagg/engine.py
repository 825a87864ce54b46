"""The batched correction engine: KD gradients of K students at once, at the hardware's pace.

One call computes, for K stacked students [K, P] (fp32 master parameters), the per-client KD
loss and its gradient, written into one flat [K, P] buffer that the fused merge reads:

1. forward: ``torch.func.vmap`` of the model over the students' parameters (views of the
   [K, P] tensor, no copies), under bf16 autocast when ``precision="bf16"`` (matmuls in bf16
   with fp32 accumulation, parameters and gradients in fp32);
2. the fused KD loss + logit gradient over the [K*N, C] logits (the op of fastagg.ops.kd_loss,
   Triton on CUDA);
3. one vjp back through the vmap'd forward, and a single ``torch.cat(..., out=)`` of the
   per-tensor gradients into the flat buffer;
4. on CUDA with ``cuda_graphs=True``, steps 1-3 are captured once per K and replayed, with the
   students and the teacher copied into static buffers (the step has fixed shapes); students
   gathered into the engine's work rows (``work_rows``, as the aggregator does) are the graph's
   input, and its gradients land in the second rows, with no copy either way.

Convolutions (``conv=``): vmap's own batching rule makes the K students' convolutions one
grouped convolution (``"native"``, cuDNN on a GPU). ``"triton"`` routes the model's plain
``nn.Conv2d`` layers through fastagg's grouped implicit-GEMM kernels (fastagg.ops.grouped_conv),
``"triton_cl"`` the same with channels-last activations between them, ``"triton_fused"`` the
same as triton, and each conv -> relu -> 2x2 max-pool chain of the model (found by torch.fx)
as one op whose kernel does relu and pooling in its epilogue; ``"torch"`` and ``"torch_fused"``
through the plain-PyTorch references of those routes (tests). ``"gemm"``: native, except that
a layer whose input every student shares (the first, on the proxy batch: under vmap one dense
convolution with K * Co output channels over 3 input channels, which cuDNN ran at ~11 TFLOP/s
on the H100) runs as cuBLAS products over the unfolded input (fastagg.ops.shared_conv).
``"gemm_fused"``: gemm, and a conv -> relu -> 2x2 max-pool chain on the shared input runs as one
op through fastagg.kernels.shared_conv (pooled in the forward's epilogue; the weight gradient
built from the pooled gradient, never writing the convolution's full-size output).
``"loop"``: no vmap, the students one at a time through the model's own layers with plain
autograd (on CUDA each student's convolutions are cuDNN's dense ones, and with ``cuda_graphs``
a pass of K students is captured as one graph). ``"loop_fused"``: the chains that read the proxy
batch through fastagg.kernels.shared_conv for all K students at once, the rest of the model
student by student as in loop (in float64 the chains run as the model has them, as on
gemm_fused: the kernels accumulate in fp32). ``"loop_cl"``, ``"loop_fused_cl"`` (CUDA only): the
same with the students' activations channels-last. ``"native_cl"`` (CUDA only): native
with the proxy batch channels-last, the layout cuDNN's bf16 kernels use (vmap's grouped
convolutions keep it: two of them on a channels-last input gave [K, N, Co, H, W] stored as
[N, H, W, K, Co] with torch 2.13 on the CPU). ``"auto"`` (default) times native, native_cl, gemm,
gemm_fused, loop_fused and loop_fused_cl (where a chain reads the proxy batch) and loop_cl once
per pass size on a CUDA device and keeps the fastest (triton, triton_fused, triton_cl and loop
lost to native on the GPUs that timed them, so they run only when named); on a CPU it is loop
for a model with convolutions (one student per pass there, see ``chunk``) and native otherwise.
native_cl, compiled_cl and compiled_fused_cl run the model under vmap on channels-last
activations, which functorch cannot do for some layers (a batch norm on CUDA): for such a
model auto leaves them out and ``conv="native_cl"`` is refused (``channels_last_vmap``).

``"head"`` (any model whose logits are one ``nn.Linear``'s output with only views after it; see
``vocab_head``): vmap's forward of the model up to that layer's input, then the KD loss and the
layer's gradients chunk by chunk over the vocabulary (fastagg.ops.vocab_head: each chunk's
elementwise steps are two Triton kernels on CUDA, two C++ or numba ones on a CPU), so that a language
model's [K, N, C] logits are never held, then one vjp of the rest; a candidate of auto from
HEAD_MIN_CLASSES classes (and ``"compiled_head"``, the rest through torch.compile, with
``compile=True``).

``compile=True`` adds candidates: ``torch.compile`` of the whole per-pass function (vmap of
grad of a plain-op KD loss, which inductor fuses; the fused KD kernel is not used there), with
vmap's convolutions (``"compiled"``; ``"compiled_cl"`` on CUDA: on the channels-last proxy
batch) and, for a model with convolutions on CUDA, with the layers
that read the proxy batch as one matrix product per student over its unfolded columns
(``"compiled_gemm"``, fastagg.ops.shared_conv.conv2d_as_product; plain ops, because dynamo
traces a vmap'd body with unbatched tensors and cannot trace an autograd.Function's own vmap
rule — torch 2.13: "You tried to vmap over ApplyTemplate, but it does not have vmap support" —
so the eager gemm route's op cannot run there), and, where a conv -> relu -> 2x2 max-pool chain
reads the proxy batch, with that chain cut out of the model (``"compiled_fused"``: the chain runs
through fastagg.kernels.shared_conv outside vmap, forward before and weight gradient after the
compiled vmap(grad) of the rest, which also returns the gradient of the chain's pooled output;
``split_model``; ``"compiled_fused_cl"``, CUDA only: the same with the chains' pooled outputs
stored channels-last), and, where a convolution reads a per-student input, with that layer as K
dense convolutions (``"compiled_dense"``, and after the shared chains ``"compiled_fused_dense"``:
fastagg.ops.dense_conv's torch.library ops, the students round side streams on CUDA; the
gradient by torch.autograd of the compiled forward, which those ops need: _dense_step). The
candidates are timed once per pass size and
the fastest kept: ``routes`` says which ran, ``route_timings`` what each measured. Compilation
takes seconds to a minute at the first pass of each size, so it is opt-in.

``chunk``: at most this many students per pass (memory grows linearly with K; the gradients of
a larger buffer are computed chunk by chunk into the same [K, P] output); ``None``: all K in one
pass. ``"auto"`` (default): the first buffer of each size K times passes of K and of 256, 64
and 16 students (those below K), per student, and keeps the fastest; a size that runs out of
memory is recorded and left out (``chunks`` says what was chosen, ``chunk_timings`` what each
size measured). Batching pays up to a point: beyond it the working set leaves the caches
(`fastagg bench --device cpu`, the LM: 282 updates/s in passes of 64 against 189 in one pass of
256). A model with convolutions on a CPU runs one student per pass without timing: batched
grouped convolutions were 2-3x slower there at every size measured.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib
import time
import types
import warnings
from pathlib import Path

import torch
from torch.func import functional_call, grad_and_value, vjp, vmap

from .ops.grouped_conv import (cast_operands, conv_relu_pool_chains, fuse_conv_relu_pool, routable_convs,
                               route_convs)
from .ops.shared_conv import _out_hw, conv2d_as_product, shared_input_convs
from .ops.streams import round_streams
from .ops.kd_loss import kd_loss_grad
from .ops.vocab_head import vocab_head_kd


def _product_forward(module, device_type, x, w, b):
    """A Conv2d's forward as conv2d_as_product, its operands in the autocast dtype when on."""
    if torch.is_autocast_enabled(device_type) and x.dtype != torch.float64:
        x, w, b = cast_operands(torch.get_autocast_dtype(device_type), x, w, b)
    return conv2d_as_product(x, w, b, module.stride, module.padding)


CONV_CHOICES = ("auto", "native", "native_cl", "loop", "loop_cl", "loop_fused", "loop_fused_cl", "gemm", "gemm_fused",
                "triton", "triton_cl", "triton_fused", "torch", "torch_fused", "head")
# the head route is a candidate of auto from this many classes (an LM's vocabulary; below it the
# logits are small next to the rest of a student)
HEAD_MIN_CLASSES = 2048
CUDA_ONLY = ("native_cl", "loop_cl", "loop_fused_cl")  # channels-last for cuDNN (see StudentGradEngine.__init__)
CUDA_ONLY_ROUTES = CUDA_ONLY + ("compiled_cl", "compiled_fused_cl")  # the compiled ones: candidates of auto on CUDA
# the routes that run the model (or its rest after the chains) under vmap on channels-last activations:
# only for a model that vmap can run so (see StudentGradEngine.channels_last_vmap)
VMAP_CL_ROUTES = ("native_cl", "compiled_cl", "compiled_fused_cl")
# compiled routes with K dense convolutions per layer on a per-student input (_dense_step): any
# device, candidates of auto on CUDA with compile=True
DENSE_ROUTES = ("compiled_dense", "compiled_fused_dense")
# every route a pass can take: the conv choices, and the compiled routes (compile=True)
ROUTE_NAMES = tuple(c for c in CONV_CHOICES if c != "auto") + (
    "compiled", "compiled_cl", "compiled_gemm", "compiled_fused", "compiled_fused_cl", "compiled_head") + DENSE_ROUTES


def _own_code(method):
    """The bound ``method`` as a new function with its own code object. Dynamo keeps compiled
    graphs per code object and, past ``recompile_limit`` (8) of them, runs the function eagerly
    with only a logged warning: engines and routes sharing one code object (one graph per pass
    size, layout and engine) reached that in one process, so a "compiled" route could run eager
    unseen. Inductor's graph cache still shares the compiled kernels between the copies."""
    fn = method.__func__
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    own.__kwdefaults__ = fn.__kwdefaults__
    return types.MethodType(own, method.__self__)


@functools.lru_cache(maxsize=None)
def _source_tag():
    """A hash of fastagg's Python sources (the package, its ops and kernels)."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha1()
    files = [*root.glob("*.py"), *root.glob("ops/*.py"), *root.glob("kernels/*.py")]
    for f in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        h.update(f.read_bytes())
    return "fastagg-" + h.hexdigest()[:16]


@contextlib.contextmanager
def _cache_tag():
    """Within the block, torch.compile's cache keys carry _source_tag() (added to any tag the user
    set). Inductor's caches on disk key a compiled graph by what dynamo traced, and the ops' vmap
    rules and autograd formulas called from it are not in that: after fastagg's ops changed (the
    nineteenth session gave the dense op a second output), a cache filled by the older version
    handed back code that called an op no longer there. A torch without the setting: no tag.
    The setting is set and restored by hand: the config's own ``patch`` cost 117 us a pass here
    (the twenty-first session, this project's CPU), 1.5% of a small `lm` pass; this costs ~5."""
    cfg = getattr(torch.compiler, "config", None)
    old = getattr(cfg, "cache_key_tag", None)
    if old is None or _source_tag() in old:
        yield
        return
    cfg.cache_key_tag = f"{old}|{_source_tag()}" if old else _source_tag()
    try:
        yield
    finally:
        cfg.cache_key_tag = old


def check_options(precision, conv, chunk):
    """The engine's options, checked where they are given (KDCorrection) and where they are used."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    if conv not in CONV_CHOICES:
        raise ValueError(f"conv must be one of {CONV_CHOICES}, got {conv!r}")
    if chunk is not None and chunk != "auto" and (isinstance(chunk, str) or int(chunk) < 1):
        raise ValueError(f"chunk must be 'auto', None or an int >= 1, got {chunk!r}")


def _seconds(fn, reps, sync):
    """Seconds per call of ``fn`` (already warmed up) over ``reps`` calls, the device synchronised."""
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t) / reps


def _has_convs(model):
    return any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in model.modules())


class StudentGradEngine:
    LOOP_STREAMS = 4  # the loop routes' side streams on CUDA (1: the current stream only)

    def __init__(self, model, spec, proxy, temperature, backend="torch", precision="fp32", cuda_graphs=False,
                 conv="auto", chunk="auto", compile=False):
        check_options(precision, conv, chunk)
        self.model, self.spec, self.proxy = model, spec, proxy
        self.temperature, self.backend, self.precision = float(temperature), backend, precision
        self.cuda_graphs = bool(cuda_graphs) and proxy.device.type == "cuda"
        if chunk == "auto" and proxy.device.type == "cpu" and _has_convs(model):
            chunk = 1
        if conv in CUDA_ONLY and proxy.device.type != "cuda":
            # channels-last is for cuDNN; on a CPU (torch 2.13.0+cpu) a soak of random small models
            # through the loop ones crashed the process (a segfault in a later vmap'd convolution)
            raise ValueError(f"conv={conv!r} runs on CUDA only (channels-last activations for cuDNN); on a CPU "
                             f"use {conv.removesuffix('_cl')!r}")
        self.conv, self.compile = conv, bool(compile)
        self._cl_vmap = ()  # channels_last_vmap's answer, once asked
        self._cl_proxy = None  # the proxy batch channels-last (loop_cl), made at first use
        if conv == "native_cl" and proxy.device.type == "cuda" and self.channels_last_vmap() is not None:
            raise ValueError(f"conv='native_cl' cannot run this model: {self.channels_last_vmap()}; use 'native' "
                             "(or 'loop_cl', which runs each student without vmap)")
        self._head = None  # vocab_head's answer, once asked
        if conv == "head" and self.vocab_head() is None:
            raise ValueError(f"conv='head' cannot run this model: {self.head_refused}")
        self.chunk = chunk if chunk in (None, "auto") else int(chunk)
        self.chunks: dict = {}  # buffer size K -> students per pass (chunk="auto")
        self.chunk_timings: dict = {}  # K -> {students per pass: seconds per student, or why not}
        self.routes: dict = {}  # pass size -> the route that runs it (a CONV_CHOICES route or "compiled")
        self.route_timings: dict = {}  # pass size -> {route: seconds}, where several were timed
        self.uncaptured: dict = {}  # a compiled route whose CUDA-graph capture failed -> why (see _run)
        self.routed_convs = 0  # convolutions that ran through fastagg's grouped op (counted when traced)
        self._compiled: dict = {}  # route -> its torch.compile'd pass
        self._fused = self._product = self._split_net = self._per_student = None
        self.product_convs = 0  # layers the compiled_gemm route runs as products
        self._graphs: dict = {}
        self._rows = None  # (students, gradients): the working rows of work_rows
        self._zeros: dict = {}
        self._streams = None  # the loop routes' side streams (CUDA), made at first use
        self.only_routes = None  # a set: auto times only these of its candidates (fastagg bench --routes)

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.proxy.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _forward(self, params, x, net=None):
        return functional_call(self.model if net is None else net, params, (x,))

    def fused_model(self):
        """(the model with its conv -> relu -> 2x2 max-pool chains fused, how many): the net of the
        ``*_fused`` routes (fastagg.ops.grouped_conv.fuse_conv_relu_pool)."""
        if self._fused is None:
            self._fused = fuse_conv_relu_pool(self.model)
        return self._fused

    def shared_chains(self):
        """How many of the model's conv -> relu -> 2x2 max-pool chains read the proxy batch itself
        (with an even-sized convolution output): the ones the ``gemm_fused`` and ``compiled_fused``
        routes run through fastagg.kernels.shared_conv."""
        return len(self.split_model()[1])

    def _split(self, students):
        """Views of the stacked students [K, P]: ({trainable name: [K, ...]}, {buffer name: [K, ...]})."""
        views, spec = self.spec.unflatten(students), self.spec
        return ({n: views[n] for n, tr in zip(spec.names, spec.trainable) if tr},
                {n: views[n] for n, tr in zip(spec.names, spec.trainable) if not tr})

    def _step(self, students, probs, out):
        K = students.shape[0]
        route = self.routes[K]
        if route in CUDA_ONLY_ROUTES and students.device.type != "cuda":  # see __init__
            raise ValueError(f"the {route} route runs on CUDA only (channels-last for cuDNN); on a CPU use "
                             f"{route.removesuffix('_cl')}")
        if route.startswith("compiled"):
            return self._compiled_step(students, probs, out, route)
        if route == "head":
            return self._head_step(students, probs, out)
        if route in ("loop", "loop_cl"):
            return self._loop_step(students, probs, out, route == "loop_cl")
        if route in ("loop_fused", "loop_fused_cl"):  # float64: the chains as the model has them, as
            if students.dtype == torch.float64:     # on gemm_fused (the kernels accumulate in fp32)
                return self._loop_step(students, probs, out, route == "loop_fused_cl")
            return self._loop_fused_step(students, probs, out, route == "loop_fused_cl")
        trainable, frozen = self._split(students)
        x = self._proxy_cl() if route == "native_cl" else self.proxy
        net = (self.fused_model()[0] or self.model) if route.endswith("_fused") else self.model

        def batched(p):
            return vmap(lambda pp, bb: self._forward({**pp, **bb}, x, net), in_dims=(0, 0))(p, frozen)

        with self._autocast():
            plain = route in ("native", "native_cl") and self.precision == "fp32"  # bf16: the convs' operands cast
            with (contextlib.nullcontext() if plain
                  else route_convs(self.model, "native" if route == "native_cl" else route)) as routed:
                logits, pullback = vjp(batched, trainable)
            self.routed_convs += getattr(routed, "calls", 0)
            N, C = probs.shape
            loss, glogits = kd_loss_grad(logits.reshape(K * N, C), probs, self.temperature, self.backend)
            (grads,) = pullback(glogits.view_as(logits).to(logits.dtype))
        torch.cat(self._flat_parts(grads, K, out.dtype, out.device), dim=1, out=out)
        return loss

    def _loop_step(self, students, probs, out, channels_last=False):
        """The ``loop`` route: the students one at a time through the model's own layers, with
        plain autograd (no vmap: dense convolutions), the fused KD op on each one's logits, and
        each one's gradients written into its row of ``out``. On a CPU a model with convolutions
        runs one student per pass, where vmap's batching rule (a grouped convolution of one group)
        only costs: the loop was 1.04-1.46x faster there (bench/bench_loop_route.py). On CUDA a
        pass of K students is captured as one graph with ``cuda_graphs`` on, and cuDNN runs each
        student's convolutions as dense ones instead of vmap's grouped ones. ``loop_cl``: the same
        with a 4-D proxy batch channels-last, so that every activation after it is too (cuDNN's
        bf16 kernels work in that layout; NCHW operands may cost it transposes)."""
        x = self._proxy_cl() if channels_last else self.proxy
        return self._loop(students, probs, self.model, lambda k: (x,), out, lambda k, g: None)

    def channels_last_vmap(self):
        """None when vmap can run the model on channels-last activations, as the VMAP_CL_ROUTES do;
        else why not. functorch does not batch some layout queries: a CUDA batch norm asks whether
        its input is channels-last contiguous, and vmap(vjp) raises NYI there (torch 2.11, an H100;
        the CPU's batch norm does not ask). So a model with a batch norm layer is refused outright,
        and any other is run once, forward and backward as the routes run it, on one or two
        channels-last proxy samples; one that fails on the plain proxy too is not the layout's
        fault (None: the route's own error says what is wrong)."""
        if self._cl_vmap != ():
            return self._cl_vmap
        self._cl_vmap = None
        norm = next((m for m in self.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)), None)
        if norm is not None:
            self._cl_vmap = (f"it has a {type(norm).__name__}, and vmap cannot run a CUDA batch norm on channels-last "
                             "activations (NYI)")
        elif self.proxy.dim() == 4:
            trainable = {n: p.detach()[None] for n, p in self.model.named_parameters() if p.requires_grad}
            frozen = {n: t.detach()[None] for n, t in [*self.model.named_parameters(), *self.model.named_buffers()]
                      if n not in trainable}

            def failure(x):  # what running the model so on x raises, or None
                def batched(p):
                    return vmap(lambda pp, bb: self._forward({**pp, **bb}, x), in_dims=(0, 0))(p, frozen)
                try:
                    logits, pullback = vjp(batched, trainable)
                    pullback(torch.ones_like(logits))
                except Exception as exc:  # noqa: BLE001 - returned, and judged below
                    return exc
                return None

            exc = failure(self._proxy_cl()[:2])
            if isinstance(exc, RuntimeError) and failure(self.proxy[:2]) is None:  # the layout's fault only
                self._cl_vmap = f"vmap cannot run it on channels-last activations ({exc})"[:300]
        return self._cl_vmap

    def _proxy_cl(self):
        """The proxy batch channels-last (4-D; other inputs as they are), made once."""
        if self._cl_proxy is None:
            x = self.proxy
            self._cl_proxy = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
        return self._cl_proxy

    def _loop(self, students, probs, net, inputs, out, take):
        """Each student k of the pass through ``_loop_student`` on ``inputs(k)``, ``take(k, the
        inputs' gradients)`` after it; the losses [K]. On CUDA the students go round
        ``LOOP_STREAMS`` side streams forked from the current one and joined back at the end, so
        that one student's small kernels (the dense layers' GEMMs of a few tiles, the elementwise
        ops) overlap another's; what outlives a student (out, the losses, take's buffers) is
        allocated on the current stream, a student's temporaries on its side stream."""
        K = students.shape[0]
        losses = torch.empty(K, dtype=torch.float64 if students.dtype == torch.float64 else torch.float32,
                             device=students.device)  # the KD op's loss dtype

        def one(k):
            loss, g = self._loop_student(students[k], probs, net, inputs(k), out[k])
            take(k, g)
            losses[k:k + 1].copy_(loss)

        round_streams(K, self._loop_streams(students.device), one, students.device)
        return losses

    def _loop_streams(self, device):
        """The loop routes' side streams, made once (none on a CPU)."""
        if device.type != "cuda" or self.LOOP_STREAMS < 2:
            return []
        if self._streams is None:
            self._streams = [torch.cuda.Stream(device) for _ in range(self.LOOP_STREAMS)]
        return self._streams

    def _loop_student(self, student, probs, net, inputs, row):
        """One student of the loop routes: its forward through ``net`` on ``inputs`` with plain
        autograd, the fused KD op on its logits, and its gradients written into ``row`` (zeros for
        buffers and for parameters the logits do not use: _flat_parts). Returns (loss [1], the
        gradients of the inputs that require grad)."""
        spec, (N, C) = self.spec, probs.shape
        names = [n for n, tr in zip(spec.names, spec.trainable) if tr]
        params = {n: v.detach().requires_grad_(tr) for (n, v), tr in zip(spec.unflatten(student).items(),
                                                                          spec.trainable)}
        with self._autocast():
            z = functional_call(net, params, inputs)
        loss, gz = kd_loss_grad(z.detach().reshape(N, C), probs, self.temperature, self.backend)
        wrt = [t for t in inputs if t.requires_grad]
        grads = torch.autograd.grad(z, [params[n] for n in names] + wrt, gz.view_as(z).to(z.dtype),
                                    allow_unused=True)
        # one launch into the row (not one copy per tensor: under a CUDA graph each launch is a node)
        found = {n: g[None] for n, g in zip(names, grads) if g is not None}
        torch.cat(self._flat_parts(found, 1, row.dtype, row.device), dim=1, out=row[None])
        return loss, grads[len(names):]

    def _loop_fused_step(self, students, probs, out, channels_last=False):
        """The ``loop_fused`` route: the chains on the proxy batch through
        fastagg.kernels.shared_conv for all K students at once (as compiled_fused), the rest of
        the model student by student with plain autograd (as loop), each student's gradient of
        its chains' pooled outputs gathered for one weight-gradient launch per chain.
        ``loop_fused_cl``: the chains' pooled outputs stored channels-last, and each student's
        handed to the rest in that layout."""
        fwd = self._chains_forward(students, channels_last)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        rest = self.split_model()[0]
        # the pooled outputs' gradients, [K, N, Co, h, w]: student k's is contiguous
        gys = [torch.empty_like(y.movedim(1, 0), memory_format=torch.contiguous_format) for y in fwd["ys"]]

        def take(k, gy):
            for dst, g in zip(gys, gy):
                dst[k].copy_(g)

        def inputs(k):  # student k's pooled outputs: strided slices, copied once into the layout
            return (self.proxy, *[y[:, k].detach().contiguous(memory_format=fmt).requires_grad_() for y in fwd["ys"]])

        losses = self._loop(students, probs, rest, inputs, out, take)
        views = self.spec.unflatten(out)
        for name, g in self._chains_wgrad(fwd, gys).items():  # + what a tied use in the rest gave
            views[name].add_(g.to(out.dtype))
        return losses

    def _chains_forward(self, students, channels_last=False, per_student=False):
        """The forward of the shared chains (split_model) for all K students in one launch each:
        {"ys": the pooled outputs [N, K, Co, h, w] (views of [N, K*Co, h, w], stored channels-last
        if ``channels_last``; with ``per_student`` stored [K, N, h, w, Co], the layout of the dense
        ops' inputs), and what _chains_wgrad needs}."""
        kern = importlib.import_module("fastagg.kernels.shared_conv")
        chains = self.split_model()[1]
        if not chains:
            raise ValueError(f"the {self.routes.get(students.shape[0])} route needs a conv -> relu -> 2x2 max-pool "
                             "chain that reads the proxy batch; this model has none (shared_chains() == 0)")
        K = students.shape[0]
        trainable, frozen = self._split(students)
        dtype = torch.bfloat16 if self.precision == "bf16" else students.dtype
        x = self.proxy.to(dtype)
        views = {**trainable, **frozen}  # a chain's weight or bias may be frozen (requires_grad=False)
        ys, saved = [], []
        for ch in chains:
            w = views[ch["weight"]]  # [K, Co, C, R, S]
            b = views[ch["bias"]] if ch["bias"] else None
            CO = w.shape[1]
            wk = w.reshape(K * CO, *w.shape[2:]).to(dtype)
            keep = {}  # the forward's window columns of x, if its method built them: the wgrad's to reuse
            y, code = kern.shared_conv_relu_pool_forward(x, wk, None if b is None else b.reshape(K * CO),
                                                         ch["stride"], ch["padding"], channels_last,
                                                         students=K if per_student else None, keep=keep)
            ys.append(y if per_student else y.view(y.shape[0], K, CO, *y.shape[2:]))  # [N, K, Co, h, w]: no copy
            saved.append((wk.shape, code, w.shape, keep.get("columns")))
        names = {ch["weight"] for ch in chains} | {ch["bias"] for ch in chains if ch["bias"]}
        return {"ys": ys, "kern": kern, "chains": chains, "x": x, "saved": saved, "names": names,
                "trainable": trainable, "frozen": frozen}

    @staticmethod
    def _chains_wgrad(fwd, gys):
        """{chain parameter name: its KD gradient [K, ...]} from the pooled outputs' gradients gys
        ([K, N, Co, h, w] each), for the trainable ones."""
        grads, trainable = {}, fwd["trainable"]
        for ch, gy, (wk_shape, code, w_shape, columns) in zip(fwd["chains"], gys, fwd["saved"]):
            need_b = ch["bias"] in trainable
            if ch["weight"] not in trainable and not need_b:
                continue  # a frozen chain: no gradient to compute
            dw, db = fwd["kern"].shared_conv_relu_pool_wgrad(fwd["x"], gy.movedim(0, 1).to(fwd["x"].dtype), code,
                                                             wk_shape, ch["stride"], ch["padding"], bias=need_b,
                                                             columns=columns)
            for name, g, shape in ((ch["weight"], dw, w_shape), (ch["bias"], db, w_shape[:2])):
                if name in trainable:
                    grads[name] = g.view(shape) + grads[name] if name in grads else g.view(shape)
        return grads

    def _flat_parts(self, grads, K, dtype, device):
        parts = []
        for name, shape, off, n in self.spec.items():
            if name in grads:
                parts.append(grads[name].reshape(K, n).to(dtype))
            else:  # a floating buffer: no KD gradient
                key = (K, n, dtype, device)
                if key not in self._zeros:
                    self._zeros[key] = torch.zeros(K, n, dtype=dtype, device=device)
                parts.append(self._zeros[key])
        return parts

    def _compiled_step(self, students, probs, out, route="compiled"):
        with _cache_tag():  # compiles (forward and backward) happen inside the calls below
            return self._compiled_route_step(students, probs, out, route)

    def _compiled_route_step(self, students, probs, out, route):
        if route in DENSE_ROUTES:
            return self._dense_step(students, probs, out, route)
        if route in ("compiled_fused", "compiled_fused_cl"):
            return self._compiled_fused_step(students, probs, out, route)
        if route == "compiled_head":
            return self._head_step(students, probs, out, compiled=True)
        if route not in self._compiled:
            # one static graph per shape (dynamo's automatic dynamic shapes, after a second shape,
            # failed inside vmap(grad)), under a code object of this engine and route (_own_code)
            self._compiled[route] = torch.compile(_own_code(self._plain_flat_grads), dynamic=False)
        net = self.product_model() if route == "compiled_gemm" else None
        x = self._proxy_cl() if route == "compiled_cl" else self.proxy
        cast = self.precision == "bf16" and routable_convs(self.model)  # bf16 convolutions under vmap too
        with route_convs(self.model, "native") if cast and net is None else contextlib.nullcontext():
            return self._compiled[route](students, probs, net, x, out)

    def split_model(self):
        """(rest, chains) for the ``compiled_fused`` route: the model's conv -> relu -> 2x2
        max-pool chains that read the proxy batch itself and whose convolution output is
        even-sized, cut out of it (each a dict of its weight and bias names, stride and padding),
        and ``rest``, a torch.fx copy of the model (its other layers as they were) whose forward
        takes (x, the chains' pooled outputs) in their place; (None, []) without such a chain."""
        if self._split_net is None:
            gm, found = conv_relu_pool_chains(self.model)
            rest, chains = None, []
            if found:
                graph = gm.graph
                x = next(n for n in graph.nodes if n.op == "placeholder")
                last = x
                for conv_node, relu, pool, conv in found:
                    HO, WO = _out_hw(self.proxy, *conv.kernel_size, conv.stride, conv.padding)
                    if conv_node.args[0] is not x or HO % 2 or WO % 2 or HO < 2 or WO < 2:
                        continue
                    with graph.inserting_after(last):
                        last = graph.placeholder(f"_shared_chain_{len(chains)}")
                    pool.replace_all_uses_with(last)
                    for n in (pool, relu, conv_node):
                        graph.erase_node(n)
                    chains.append({"weight": f"{conv_node.target}.weight",
                                   "bias": None if conv.bias is None else f"{conv_node.target}.bias",
                                   "stride": tuple(conv.stride), "padding": tuple(conv.padding)})
                if chains:
                    graph.lint()
                    gm.recompile()
                    rest = gm
            self._split_net = (rest, chains)
        return self._split_net

    def _compiled_fused_step(self, students, probs, out, route="compiled_fused"):
        """The ``compiled_fused`` route: the chains on the proxy batch through
        fastagg.kernels.shared_conv outside vmap (forward: one launch for all K students; weight
        gradient from the pooled gradient that the rest returns), the rest of the model and the
        KD loss as torch.compile of vmap(grad) over the students, as the compiled route.
        ``compiled_fused_cl`` (CUDA): the chains' pooled outputs stored channels-last, so that the
        rest's first convolution, vmap's grouped one over [N, K*Co, h, w], reads them in the
        layout cuDNN's bf16 kernels use (in compiled_fused it transposed them first)."""
        fwd = self._chains_forward(students, route == "compiled_fused_cl")
        rest = self.split_model()[0]
        rest_params = {n: v for n, v in fwd["trainable"].items() if n not in fwd["names"]}
        if route not in self._compiled:
            self._compiled[route] = torch.compile(_own_code(self._split_grads), dynamic=False)  # as above
        cast = self.precision == "bf16" and routable_convs(self.model)  # bf16 convolutions under vmap too
        with route_convs(self.model, "native") if cast else contextlib.nullcontext():
            loss, grads, gys = self._compiled[route](rest_params, fwd["frozen"], tuple(fwd["ys"]), probs, rest)
        grads = dict(grads)
        for name, g in self._chains_wgrad(fwd, gys).items():  # a parameter the rest also reads
            grads[name] = g + grads[name] if name in grads else g       # (tied) adds its share
        torch.cat(self._flat_parts(grads, students.shape[0], out.dtype, out.device), dim=1, out=out)
        return loss

    def _dense_step(self, students, probs, out, route):
        """The ``compiled_dense`` route: compiled's vmap over the students, except that each
        convolution whose input differs per student runs as K dense convolutions
        (fastagg.ops.dense_conv: torch.library ops, opaque to inductor, the students spread over
        side streams on CUDA), and the gradient is ``torch.autograd.grad`` of the compiled
        forward's losses (inductor's compiled backward) instead of vmap(grad), which those ops
        cannot run under. ``compiled_fused_dense``: the same for the rest of the model after its
        shared chains, which run through fastagg.kernels.shared_conv as on compiled_fused (their
        pooled outputs stored per student, each student's block channels-last: the layout the
        dense convolutions read)."""
        fused = route == "compiled_fused_dense"
        # the chains' pooled outputs stored as the dense convolutions after them read their input
        # (on the H100 in the twentieth session that input was copied into it at every pass: a
        # 537 MB copy for `cnn`, K = 128)
        fwd = self._chains_forward(students, per_student=True) if fused else None
        if route not in self._compiled:
            self._compiled[route] = torch.compile(_own_code(self._dense_losses), dynamic=False)  # as above
        s = students.detach().requires_grad_()
        ys = tuple(y.detach().requires_grad_() for y in fwd["ys"]) if fused else ()
        x = self.proxy
        with route_convs(self.model, "dense"):
            loss = self._compiled[route](s, probs, x, tuple(sorted(fwd["names"])) if fused else (), ys)
        grads = torch.autograd.grad(loss.sum(), (s, *ys))
        out.copy_(grads[0])
        if fused:
            views = self.spec.unflatten(out)
            gys = [g.movedim(1, 0) for g in grads[1:]]  # [K, N, Co, h, w] views
            for name, g in self._chains_wgrad(fwd, gys).items():  # + what a tied use in the rest gave
                views[name].add_(g.to(out.dtype))
        return loss.detach()

    def _kd_parts(self, probs):
        """(the teacher's part of every student's KD loss, pt): T^2 / B * sum pt log pt, the same
        for all students, computed once per pass instead of once per student inside vmap (for the
        LM a log of 16M teacher probabilities a student; no gain measured on the CPU, where the
        LM's pass took the same time either way), and the teacher's probabilities in the
        accumulation dtype. Each student's loss is that plus _kd_cross of its logits."""
        acc = torch.float64 if probs.dtype == torch.float64 else torch.float32
        pt = probs.to(acc)
        return (self.temperature ** 2 / pt.shape[0]) * torch.xlogy(pt, pt).sum(), pt

    def _kd_cross(self, z, pt):
        """A student's part of its KD loss from its logits z [B, C]: -T^2 / B * sum pt log q."""
        T = self.temperature
        return -(T * T / z.shape[0]) * (pt * torch.log_softmax(z.to(pt.dtype) / T, dim=-1)).sum()

    def vocab_head(self):
        """(trunk, weight name, bias name or None, {trunk's tensor name: flat name}) when the
        model's logits are the output of one ``nn.Linear`` (its vocabulary head) with only views
        after it, else None (``head_refused`` says why): what the ``head`` route needs. ``trunk``
        is a copy of the model with that layer replaced by an identity, so that it returns the
        layer's input rows in the logits' order. Found once, from a forward of the model on the
        proxy batch: the layer whose output holds the model's output in its own memory, used once,
        with trainable weights; and the trunk's output checked to be exactly that layer's input,
        row for row. A weight tied to the embedding (GPT-2's) is the flat rows' one tensor, named
        as the spec holds it: the trunk's embedding reads it, and its gradient is the two uses'."""
        if self._head is None:
            self._head = self._find_vocab_head()
        return self._head[0]

    @property
    def head_refused(self):
        self.vocab_head()
        return self._head[1]

    def _find_vocab_head(self):
        names = {id(m): n for n, m in self.model.named_modules()}
        seen, hooks = {}, []

        def record(m, inp, out):
            seen.setdefault(id(m), []).append((inp[0], out))

        for m in self.model.modules():
            if isinstance(m, torch.nn.Linear):
                hooks.append(m.register_forward_hook(record))
        training = [m for m in self.model.modules() if m.training]
        self.model.eval()  # as the passes run it (dropout off)
        try:
            with torch.no_grad():
                y = self.model(self.proxy)
        except Exception as exc:  # noqa: BLE001 - the model's own error, said
            return None, f"the model's forward on the proxy batch failed: {type(exc).__name__}: {exc}"
        finally:
            for hk in hooks:
                hk.remove()
            for m in training:
                m.training = True
        if not isinstance(y, torch.Tensor) or y.dim() != 2 or not y.is_contiguous():
            return None, "the model's output is not one contiguous [rows, classes] tensor"
        head = [i for i, calls in seen.items() if any(o.is_contiguous() and o.numel() == y.numel()
                                                       and o.data_ptr() == y.data_ptr() for _, o in calls)]
        if not head:
            return None, "the model's logits are not a linear layer's output (or something other than a view follows it)"
        name = names[head[0]]
        module = self.model.get_submodule(name)
        if len(seen[head[0]]) != 1:
            return None, f"the output layer {name!r} runs {len(seen[head[0]])} times in a forward"
        canon = dict(self.spec.aliases).get  # a tied name -> the name its tensor is held under
        w, b = canon(f"{name}.weight", f"{name}.weight"), (None if module.bias is None else f"{name}.bias")
        trainable = {n for n, tr in zip(self.spec.names, self.spec.trainable) if tr}
        if b is not None and any(b in pair for pair in self.spec.aliases):
            return None, f"the output layer {name!r} shares its bias with another layer"
        if not {w, b} - {None} <= trainable:
            return None, f"the output layer {name!r} has weights that are not trained"
        trunk = copy.deepcopy(self.model).eval()
        parent, _, leaf = name.rpartition(".")
        setattr(trunk.get_submodule(parent) if parent else trunk, leaf, torch.nn.Identity())
        # the trunk's tensors by the names it knows them by, one name each, against the flat rows'
        # names; a weight tied to the output layer's (an embedding) stays in the trunk, under its
        # own name, and its gradient there is added to the layer's
        trunk_names = {}
        for n, t in trunk.state_dict(keep_vars=True).items():
            if torch.is_floating_point(t) and canon(n, n) not in trunk_names.values():
                trunk_names[n] = canon(n, n)
        h = seen[head[0]][0][0]
        try:
            with torch.no_grad():
                t = trunk(self.proxy)
        except Exception:  # noqa: BLE001 - e.g. a reshape after the layer that names the vocabulary's size
            t = None
        if not (isinstance(t, torch.Tensor) and t.shape == (y.shape[0], module.in_features)
                and torch.equal(t, h.reshape(-1, module.in_features))):
            return None, f"what follows the output layer {name!r} does not keep its rows in order for its input"
        return (trunk, w, b, trunk_names), None

    def _head_step(self, students, probs, out, compiled=False):
        """The ``head`` route: vmap's forward of the trunk (vocab_head) to the output layer's input,
        then the KD loss and the layer's gradients chunk by chunk over the vocabulary
        (fastagg.ops.vocab_head: the [K, N, C] logits never held), the layer's weight gradients
        written into their rows of ``out`` there, and one vjp of the trunk with the input's
        gradient. Under bf16 the layer's products take bf16 operands, as autocast gives them.
        ``compiled_head`` (``compiled``): the trunk's forward through torch.compile and its
        gradient by torch.autograd of it (inductor's backward), as on the dense routes."""
        trunk, wname, bname, trunk_names = self.vocab_head()
        views = self.spec.unflatten(out)
        W = self.spec.unflatten(students)[wname]
        b = self.spec.unflatten(students)[bname] if bname else None
        tied = wname in trunk_names.values()  # the embedding's weight: its trunk gradient is added
        if compiled:
            if "compiled_head" not in self._compiled:
                self._compiled["compiled_head"] = torch.compile(_own_code(self._trunk_hidden), dynamic=False)
            s = students.detach().requires_grad_()
            h = self._compiled["compiled_head"](s, self.proxy)  # (_compiled_step holds _cache_tag)
        else:
            trainable, frozen = self._trunk_params(students)
            x = self.proxy

            def batched(p):
                return vmap(lambda pp, bb: functional_call(trunk, {**pp, **bb}, (x,)), in_dims=(0, 0))(p, frozen)

            with self._autocast():
                h, pullback = vjp(batched, trainable)
        cd = torch.bfloat16 if self.precision == "bf16" and h.dtype == torch.float32 else h.dtype
        # the chunks' kernels follow the engine's backend (Triton's, the C++ extension's or numba's,
        # torch ops for "torch"); "auto", and float64, take what vocab_head picks
        kernels = self.backend if self.backend != "auto" and h.dtype != torch.float64 else None
        loss, dh = vocab_head_kd(h, W, b, probs, self.temperature, views[wname], views[bname] if bname else None,
                                 compute_dtype=cd, kernels=kernels)
        if compiled:
            (g,) = torch.autograd.grad(h, s, dh.to(h.dtype))
            for lo, hi in self._outside_head():  # the trunk's gradients; zeros at its buffers
                out[:, lo:hi].copy_(g[:, lo:hi])
            if tied:
                views[wname].add_(self.spec.unflatten(g)[wname])
            return loss
        with self._autocast():
            (grads,) = pullback(dh.to(h.dtype))
        grads = {trunk_names[n]: v for n, v in grads.items()}  # by the flat rows' names
        for name, _, _, _ in self.spec.items():
            if name == wname and tied:
                views[name].add_(grads[name])
            elif name in grads:
                views[name].copy_(grads[name])
            elif name not in (wname, bname):  # a floating buffer: no KD gradient
                views[name].zero_()
        return loss

    def _trunk_params(self, students):
        """({trunk's name: view [K, ...]} of its trained tensors, the same of its floating
        buffers): the flat rows as the trunk (vocab_head) names them."""
        trunk_names = self.vocab_head()[3]
        views = self.spec.unflatten(students)
        trained = {n for n, tr in zip(self.spec.names, self.spec.trainable) if tr}
        return ({n: views[c] for n, c in trunk_names.items() if c in trained},
                {n: views[c] for n, c in trunk_names.items() if c not in trained})

    def _outside_head(self):
        """The column ranges of the flat rows outside the output layer's weight and bias."""
        _, wname, bname, _ = self.vocab_head()
        cuts = sorted((off, off + n) for name, _, off, n in self.spec.items() if name in (wname, bname))
        edges, lo = [], 0
        for a, b in cuts:
            if a > lo:
                edges.append((lo, a))
            lo = b
        return edges + ([(lo, self.spec.numel)] if lo < self.spec.numel else [])

    def _trunk_hidden(self, s, x):
        """The trunk's outputs [K, N, H] (the output layer's inputs) of the students ``s`` [K, P]
        (requires grad), with plain ops: what torch.compile traces on the compiled_head route."""
        trunk = self.vocab_head()[0]
        trainable, frozen = self._trunk_params(s)
        frozen = {n: v.detach() for n, v in frozen.items()}  # buffers: no KD gradient

        def hidden(p, b):
            with self._autocast():
                return functional_call(trunk, {**p, **b}, (x,))

        return vmap(hidden, in_dims=(0, 0))(trainable, frozen)

    def _dense_losses(self, s, probs, x, chain_names, ys):
        """The students' KD losses [K] from their parameters ``s`` [K, P] (requires grad), with plain
        ops and the dense convolutions' ops: what torch.compile traces on the dense routes. With
        ``ys`` (the shared chains' pooled outputs, [N, K, Co, h, w]), the rest of the model after
        them (split_model), without the chains' parameters ``chain_names``."""
        trainable, frozen = self._split(s)
        trainable = {n: v for n, v in trainable.items() if n not in chain_names}
        frozen = {n: v.detach() for n, v in frozen.items() if n not in chain_names}  # buffers: no KD gradient
        net = self.split_model()[0] if ys else self.model
        teacher, pt = self._kd_parts(probs)

        def loss_k(p, b, *yy):
            with self._autocast():
                z = functional_call(net, {**p, **b}, (x, *yy))
            return self._kd_cross(z, pt)

        return teacher + vmap(loss_k, in_dims=(0, 0) + (1,) * len(ys))(trainable, frozen, *ys)

    def _split_grads(self, params, frozen, ys, probs, rest):
        """(loss [K], {name: grad [K, ...]}, the pooled outputs' gradients [K, N, Co, h, w]) of the
        model after its shared chains, with plain ops only: what torch.compile traces."""
        x = self.proxy
        teacher, pt = self._kd_parts(probs)

        def loss_k(p, b, yy):
            with self._autocast():
                z = functional_call(rest, {**p, **b}, (x, *yy))
            return self._kd_cross(z, pt)

        (grads, gys), loss = vmap(grad_and_value(loss_k, argnums=(0, 2)), in_dims=(0, 0, 1))(params, frozen, ys)
        return teacher + loss, grads, gys

    def product_model(self):
        """A copy of the model whose layers on the proxy batch run as one matrix product
        (fastagg.ops.shared_conv.conv2d_as_product, plain ops), the others as vmap's
        convolutions with bf16 operands under bf16: the net of the ``compiled_gemm`` route."""
        if self._product is None:
            net = copy.deepcopy(self.model)
            names = {id(m) for m in shared_input_convs(self.model, self.proxy)}
            dev = self.proxy.device.type
            for src, m in zip(self.model.modules(), net.modules()):
                if isinstance(m, torch.nn.Conv2d) and id(src) in names:
                    m._conv_forward = functools.partial(_product_forward, m, dev)
                    self.product_convs += 1
            self._product = net
        return self._product

    def _plain_flat_grads(self, students, probs, net=None, x=None, out=None):
        """(loss [K], flat gradients [K, P]) with plain ops only: what torch.compile traces (on
        ``net`` when given: product_model; on ``x`` when given, else the proxy batch). ``out``:
        the loss only is returned, the gradients written into ``out`` by the traced code itself
        (inductor can then have the concatenation write there, with no [K, P] copy after it)."""
        x = self.proxy if x is None else x
        trainable, frozen = self._split(students)
        teacher, pt = self._kd_parts(probs)

        def loss_k(p, b):
            with self._autocast():
                z = self._forward({**p, **b}, x, net)
            return self._kd_cross(z, pt)

        grads, loss = vmap(grad_and_value(loss_k), in_dims=(0, 0))(trainable, frozen)
        parts = self._flat_parts(grads, students.shape[0], students.dtype, students.device)
        if out is None:
            return teacher + loss, torch.cat(parts, dim=1)
        torch.cat([p.to(out.dtype) for p in parts], dim=1, out=out)
        return teacher + loss

    def work_rows(self, n, dtype):
        """Rows [n, P] for students and [n, P] for their gradients that a pass captured as a CUDA
        graph reads and writes in place: a caller that gathers its students into the first and
        passes the second as ``out`` (the aggregator does) saves the copy into the graph's input
        and the one out of its output (for `cnn`'s 128 students, 566 MB each). Every caller of
        this engine gets the same rows (grown when one asks for more), and every call may write
        them: a caller keeps nothing there across calls. Reused, not allocated per buffer: on a
        CPU each fresh [K, P] allocation is page-faulted anew."""
        rows = self._rows
        if rows is None or rows[0].shape[0] < n or rows[0].dtype != dtype:
            shape = (n, self.spec.numel)
            device = self.proxy.device
            rows = self._rows = (torch.empty(shape, dtype=dtype, device=device),
                                 torch.empty(shape, dtype=dtype, device=device))
        return rows[0][:n], rows[1][:n]

    def _owned(self, students, out):
        """Whether students and out are the first rows of this engine's work rows (students of the
        first, out of the second)."""
        if self._rows is None or not (students.is_contiguous() and out.is_contiguous()):
            return False
        return all(t.data_ptr() == r.data_ptr() and t.dtype == r.dtype for t, r in zip((students, out), self._rows))

    def __call__(self, students, teacher_probs, out=None):
        """(loss [K], grads [K, P]) for students [K, P]; ``out`` receives the gradients."""
        # eval mode for the passes, and after them each module's own mode as it was (eval() only
        # where some module is training: eval() and train() walk every module, 75 us a call for the
        # LM on this CPU, where this check takes 8)
        training = [m for m in self.model.modules() if m.training]
        if training:
            self.model.eval()
        try:
            out = torch.empty_like(students) if out is None else out
            K = students.shape[0]
            own = self._owned(students, out)
            step = self._students_per_pass(students, teacher_probs, out, own)
            own = own and step >= K  # a pass of the whole work rows: its captured graph may adopt them
            loss = None
            for i in range(0, K, step):
                part = self._pass(students[i:i + step].detach(), teacher_probs, out[i:i + step], own)
                if step >= K:
                    return part, out
                # each pass's losses go into one [K] tensor, and the pass's own tensor is freed:
                # a list of K small tensors kept alive would each split a hole that a pass's
                # temporaries left in the CPU heap, so that every pass took fresh memory (one
                # student per pass, 1024 of them: 4 GB of peak for a 1.1M-parameter CNN)
                loss = part.new_empty(K) if loss is None else loss
                loss[i:i + step].copy_(part)
            return loss, out
        finally:
            for m in training:
                m.training = True

    def _students_per_pass(self, students, probs, out, own=False):
        K = students.shape[0]
        if self.chunk is None:
            return K
        if self.chunk != "auto":
            return min(self.chunk, K)
        if K not in self.chunks:
            self.chunks[K] = self._pick_chunk(students, probs, out, own)
        return self.chunks[K]

    def _pick_chunk(self, students, probs, out, own=False):
        """Students per pass for buffers of K: the fastest per student of K, 256, 64 and 16 (those
        below K), each timed over two passes after one that chooses its route (and captures)."""
        K = students.shape[0]
        sizes = [K] + [c for c in (256, 64, 16) if c < K]
        if len(sizes) == 1:
            return K
        cuda = students.is_cuda
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        per, failed = {}, {}
        for c in sizes:
            s, g = students[:c].detach(), out[:c]
            try:
                self._pass(s, probs, g, own and c == K)
                sync()
                per[c] = _seconds(lambda: self._pass(s, probs, g, own and c == K), 2, sync) / c
            except torch.OutOfMemoryError:
                failed[c] = "out of memory"
                self.routes.pop(c, None)
                self.route_timings.pop(c, None)
                self._graphs = {key: v for key, v in self._graphs.items() if key[0] != c}
                if cuda:
                    torch.cuda.empty_cache()
        if not per:
            raise torch.OutOfMemoryError(f"fastagg engine: no pass size of {sizes} fits for K = {K}")
        self.chunk_timings[K] = {**per, **failed}
        best = min(per, key=per.get)
        keep = {n for k, c in {**self.chunks, K: best}.items() for n in (c, k % c) if n}
        self._graphs = {key: v for key, v in self._graphs.items() if key[0] in keep}
        return best

    def _pass(self, students, probs, out, own=False):
        """One pass (see _run); ``own``: students and out are the whole of a call's work rows."""
        K = students.shape[0]
        if K not in self.routes:
            self.routes[K] = self._pick_route(students, probs, out, own)
        return self._run(students, probs, out, own)

    def _run(self, students, probs, out, own=False):
        """One pass through the route set in ``routes``, the way passes of this size run: captured
        once and replayed with CUDA graphs on. The compiled routes too (until the twentieth
        session only the dense ones, whose K dense convolutions per layer are launches from Python):
        on the H100 the uncaptured compiled pass of `lm`'s 16 students took 6.85 ms when timed
        alone and 5.3 back to back, the difference being the host launching its kernels. A
        compiled route whose capture fails runs uncaptured from then on, with a warning, and
        ``uncaptured`` says why."""
        route = self.routes[students.shape[0]]
        if not (self.cuda_graphs and route not in self.uncaptured):
            return self._step(students, probs, out)
        if not route.startswith("compiled"):
            return self._replay(students, probs, out, own)
        try:
            return self._replay(students, probs, out, own)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - said, recorded, and the route still runs
            self.uncaptured[route] = f"{type(exc).__name__}: {exc}"[:300]
            warnings.warn(f"fastagg engine: the {route} route could not be captured as a CUDA graph and runs "
                          f"uncaptured ({self.uncaptured[route]})", RuntimeWarning, stacklevel=3)
            if students.is_cuda:
                torch.cuda.synchronize()
            return self._step(students, probs, out)

    def _candidates(self, students):
        routes = self._all_candidates(students)
        if self.only_routes is not None:  # fastagg bench --routes: a device run's time is short
            routes = [r for r in routes if r in self.only_routes] or routes[:1]
        return routes

    def _all_candidates(self, students):
        cuda = self.proxy.device.type == "cuda" and students.dtype != torch.float64
        convs = cuda and bool(routable_convs(self.model))
        if self.conv == "auto" and self.proxy.device.type == "cpu" and _has_convs(self.model):
            # one student per pass on a CPU (see __init__): the loop, without vmap, was 1.04-1.46x
            # faster than vmap's one-group convolutions for every model measured there (a fixed
            # choice, not a timed one, so that a CPU run's numbers do not depend on its timings)
            return ["loop"] + (["compiled"] if self.compile else [])
        if self.conv != "auto":
            routes = [self.conv]
            f64 = students.dtype == torch.float64
            compiled = [{"gemm": "compiled_gemm", "gemm_fused": "compiled_fused", "loop_fused": "compiled_fused",
                         "loop_fused_cl": "compiled_fused_cl", "native_cl": "compiled_cl",
                         "head": "compiled_head"}.get(self.conv, "compiled")
                        if not f64 or self.conv == "head" else "compiled"]  # head: float64 throughout
        else:
            # Routes measured slower than native on every card that timed them stay out (they can
            # be named): triton and triton_fused (H100, seventh session: 2-9x native for `cnn` and
            # ResNet-18), triton_cl (1.3-2.3x there, 1.4x on the H200 in the fifteenth), loop (the
            # H200: 72 ms a pass of 128 `cnn` students against native's 69 and loop_cl's 60).
            # The loop routes: each student's convolutions as cuDNN's dense ones; with CUDA graphs
            # a pass of K students is one replay, so the loop's launches cost the host nothing
            shared = convs and self.product_model() is not None and self.product_convs > 0  # a layer on the proxy
            chains = convs and self.shared_chains() > 0
            # The _cl routes hand cuDNN channels-last activations: on the H200 (fifteenth session)
            # a sixth of a compiled pass's kernel time was layout transposes for ResNet-18 (29 of
            # 178 ms), a fifth for `cnn` (8.6 of 42)
            # (the order only matters for a run stopped midway: the routes untimed on a GPU first)
            routes = (["native"] + (["native_cl"] if convs else []) + (["loop_fused_cl"] if chains else [])
                      + (["loop_cl"] if convs else []) + (["gemm_fused", "loop_fused"] if chains else [])
                      + (["gemm"] if shared else []))
            # dense: a convolution on a per-student input (the second layer on): K dense ones
            dense = convs and self.per_student_convs() > 0
            compiled = (["compiled"] + (["compiled_fused_dense"] if chains and dense else [])
                        + (["compiled_dense"] if dense else [])
                        + (["compiled_fused_cl"] if chains else []) + (["compiled_cl"] if convs else [])
                        + (["compiled_fused"] if chains else []) + (["compiled_gemm"] if shared else []))
        # (looked for only where some linear layer is that wide: finding it costs a forward and a
        # copy of the model, which a CNN or ResNet would pay for nothing)
        wide = any(isinstance(m, torch.nn.Linear) and m.out_features >= HEAD_MIN_CLASSES for m in self.model.modules())
        head = self.vocab_head() if self.conv == "auto" and wide else None
        if head is not None and self.spec.shapes[self.spec.names.index(head[1])][0] >= HEAD_MIN_CLASSES:
            routes = routes + ["head"]  # an LM: its vocabulary's logits never held
            compiled = compiled + ["compiled_head"]
        routes = routes + (compiled if self.compile else [])
        if any(r in VMAP_CL_ROUTES for r in routes) and self.channels_last_vmap() is not None:
            routes = [r for r in routes if r not in VMAP_CL_ROUTES]  # never empty: native_cl is refused in __init__
        return routes

    def per_student_convs(self):
        """How many of the model's plain Conv2d layers read a per-student input (not the proxy
        batch itself): what the dense routes run as K dense convolutions each. Counted once (a
        forward of the model on the proxy batch finds the shared ones)."""
        if self._per_student is None:
            shared = {id(m) for m in shared_input_convs(self.model, self.proxy)}
            self._per_student = sum(1 for m in routable_convs(self.model) if id(m) not in shared)
        return self._per_student

    def _pick_route(self, students, probs, out, own=False):
        """The route for passes of this size: the only candidate, or the fastest of them measured
        here as they will run (one warm-up pass each, for autotuning, compilation and the graph
        capture, then three timed); each loser's captured graph is freed as soon as it has lost."""
        K = students.shape[0]
        routes = self._candidates(students)
        if len(routes) == 1:
            return routes[0]
        sync = torch.cuda.synchronize if students.is_cuda else (lambda: None)
        times = {}
        timings = self.route_timings[K] = {}  # filled route by route: a run stopped midway keeps them
        for route in routes:
            self.routes[K] = route
            try:
                self._run(students, probs, out, own)
                sync()
            except Exception as exc:  # e.g. a model torch.compile cannot trace: say so, time the others
                if route == routes[0]:
                    raise
                timings[route] = f"failed: {type(exc).__name__}: {exc}"[:300]
                warnings.warn(f"fastagg engine: the {route} route failed for passes of {K} students and is "
                              f"left out ({timings[route]})", RuntimeWarning, stacklevel=4)
                continue
            timings[route] = times[route] = _seconds(lambda: self._run(students, probs, out, own), 3, sync)
            self._keep_graph(K, min(times, key=times.get))  # at most two captured candidates held at once
        best = min(times, key=times.get)
        self._keep_graph(K, best)
        return best

    def _keep_graph(self, K, route):
        """Free the captured graphs of passes of K students except ``route``'s."""
        self._graphs = {key: g for key, g in self._graphs.items() if key[0] != K or key[2] == route}

    def _replay(self, students, probs, out, own=False):
        """Replay the pass's CUDA graph (captured at its first call). ``own`` (the pass is the whole
        of the engine's work rows, see work_rows): the graph's input and output are those rows, so
        nothing is copied in or out; a graph of the same size for any other tensors is captured on
        copies of its own (never on the work rows, which the other passes of a call still use)."""
        K = students.shape[0]
        key = (K, tuple(probs.shape), self.routes[K], own)
        if key not in self._graphs:
            s_static = students.detach() if own else students.detach().clone()
            p_static = probs.clone()
            g_static = out if own else torch.empty_like(students)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the capture (lazy init, autotuning)
                for _ in range(2):
                    self._step(s_static, p_static, g_static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the capture forbids unsafe CUDA calls on this thread only. In the
            # default global mode a server thread staging a host update meanwhile (outside the
            # aggregator's lock, which this merge holds) would have its Event.synchronize on the
            # staging row's last copy refused, and that call would also invalidate this capture
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                loss_static = self._step(s_static, p_static, g_static)
            self._graphs[key] = (graph, s_static, p_static, g_static, loss_static)
        graph, s_static, p_static, g_static, loss_static = self._graphs[key]
        if not _same_tensor(s_static, students):
            s_static.copy_(students)
        p_static.copy_(probs)
        graph.replay()
        if not _same_tensor(g_static, out):
            out.copy_(g_static)
        return loss_static.clone()


def _same_tensor(a, b):
    """Whether a and b are one tensor's memory, read the same way."""
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)
