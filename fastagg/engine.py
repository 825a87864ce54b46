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
   students and the teacher copied into static buffers (the step has fixed shapes).

Convolutions (``conv=``): vmap's own batching rule makes the K students' convolutions one
grouped convolution (``"native"``, cuDNN on a GPU). ``"triton"`` routes the model's plain
``nn.Conv2d`` layers through fastagg's grouped implicit-GEMM kernels (fastagg.ops.grouped_conv),
``"torch"`` through the plain-PyTorch reference of the same route (tests). ``"auto"`` (default)
times native and triton once per K on a CUDA device and keeps the faster (``conv_timings``);
elsewhere it is native.

``chunk``: at most this many students per pass (memory grows linearly with K; the gradients of
a larger buffer are computed chunk by chunk into the same [K, P] output). ``None``: all K in one
pass, except for a model with convolutions on a CPU, where one student per pass is faster
(`fastagg bench --device cpu`: batching multiplies the working set out of the caches, and the
CPU is compute-bound either way; batching does pay there for linear layers and transformers).
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch.func import functional_call, vjp, vmap

from .ops.grouped_conv import routable_convs, route_convs
from .ops.kd_loss import kd_loss_grad

CONV_CHOICES = ("auto", "native", "triton", "torch")


def _has_convs(model):
    return any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in model.modules())


class StudentGradEngine:
    def __init__(self, model, spec, proxy, temperature, backend="torch", precision="fp32", cuda_graphs=False,
                 conv="auto", chunk=None):
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        if conv not in CONV_CHOICES:
            raise ValueError(f"conv must be one of {CONV_CHOICES}, got {conv!r}")
        if chunk is not None and int(chunk) < 1:
            raise ValueError(f"chunk must be None or >= 1, got {chunk!r}")
        self.model, self.spec, self.proxy = model, spec, proxy
        self.temperature, self.backend, self.precision = float(temperature), backend, precision
        self.cuda_graphs = bool(cuda_graphs) and proxy.device.type == "cuda"
        if chunk is None and proxy.device.type == "cpu" and _has_convs(model):
            chunk = 1
        self.conv, self.chunk = conv, None if chunk is None else int(chunk)
        self.conv_choice: dict = {}  # K -> the conv route used for a pass of K students
        self.conv_timings: dict = {}  # K -> {route: seconds} measured by conv="auto"
        self.routed_convs = 0  # convolutions that ran through fastagg's grouped op (counted when traced)
        self._graphs: dict = {}
        self._zeros: dict = {}

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.proxy.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _forward(self, params, x):
        return functional_call(self.model, params, (x,))

    def _route(self, K):
        route = self.conv_choice.get(K, self.conv)
        if route in ("native", "auto"):
            return contextlib.nullcontext()
        return route_convs(self.model, route)

    def _step(self, students, probs, out):
        spec, K = self.spec, students.shape[0]
        views = spec.unflatten(students)
        trainable = {n: views[n] for n, tr in zip(spec.names, spec.trainable) if tr}
        frozen = {n: views[n] for n, tr in zip(spec.names, spec.trainable) if not tr}
        x = self.proxy

        def batched(p):
            return vmap(lambda pp, bb: self._forward({**pp, **bb}, x), in_dims=(0, 0))(p, frozen)

        with self._autocast():
            with self._route(K) as routed:
                logits, pullback = vjp(batched, trainable)
            self.routed_convs += getattr(routed, "calls", 0)
            N, C = probs.shape
            loss, glogits = kd_loss_grad(logits.reshape(K * N, C), probs, self.temperature, self.backend)
            (grads,) = pullback(glogits.view_as(logits).to(logits.dtype))
        parts = []
        for name, shape, off, n in spec.items():
            if name in grads:
                parts.append(grads[name].reshape(K, n).to(out.dtype))
            else:  # a floating buffer: no KD gradient
                key = (K, n, out.dtype, out.device)
                if key not in self._zeros:
                    self._zeros[key] = torch.zeros(K, n, dtype=out.dtype, device=out.device)
                parts.append(self._zeros[key])
        torch.cat(parts, dim=1, out=out)
        return loss

    def __call__(self, students, teacher_probs, out=None):
        """(loss [K], grads [K, P]) for students [K, P]; ``out`` receives the gradients."""
        was_training = self.model.training
        self.model.eval()
        try:
            out = torch.empty_like(students) if out is None else out
            K = students.shape[0]
            step = self.chunk or K
            losses = [self._pass(students[i:i + step].detach(), teacher_probs, out[i:i + step])
                      for i in range(0, K, step)]
            return (losses[0] if len(losses) == 1 else torch.cat(losses)), out
        finally:
            self.model.train(was_training)

    def _pass(self, students, probs, out):
        K = students.shape[0]
        if self.conv == "auto" and K not in self.conv_choice:
            self.conv_choice[K] = self._pick_conv(students, probs, out)
        if self.cuda_graphs:
            return self._replay(students, probs, out)
        return self._step(students, probs, out)

    def _pick_conv(self, students, probs, out):
        """conv="auto": native unless this is a CUDA device, the model has convolutions the
        kernels cover, and the triton route measures faster for this K."""
        K = students.shape[0]
        if self.proxy.device.type != "cuda" or students.dtype == torch.float64:
            return "native"
        if not routable_convs(self.model):
            return "native"
        times = {}
        for route in ("native", "triton"):
            self.conv_choice[K] = route
            self._step(students, probs, out)  # warm-up: cuDNN / Triton autotuning
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(3):
                self._step(students, probs, out)
            torch.cuda.synchronize()
            times[route] = (time.perf_counter() - t) / 3
        self.conv_timings[K] = times
        return min(times, key=times.get)

    def _replay(self, students, probs, out):
        K = students.shape[0]
        key = (K, tuple(probs.shape))
        if key not in self._graphs:
            s_static = students.detach().clone()
            p_static = probs.clone()
            g_static = torch.empty_like(students)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the capture (lazy init, autotuning)
                for _ in range(2):
                    self._step(s_static, p_static, g_static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                loss_static = self._step(s_static, p_static, g_static)
            self._graphs[key] = (graph, s_static, p_static, g_static, loss_static)
        graph, s_static, p_static, g_static, loss_static = self._graphs[key]
        s_static.copy_(students)
        p_static.copy_(probs)
        graph.replay()
        out.copy_(g_static)
        return loss_static.clone()
