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
"""

from __future__ import annotations

import contextlib

import torch
from torch.func import functional_call, vjp, vmap

from .ops.kd_loss import kd_loss_grad


class StudentGradEngine:
    def __init__(self, model, spec, proxy, temperature, backend="torch", precision="fp32", cuda_graphs=False):
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        self.model, self.spec, self.proxy = model, spec, proxy
        self.temperature, self.backend, self.precision = float(temperature), backend, precision
        self.cuda_graphs = bool(cuda_graphs) and proxy.device.type == "cuda"
        self._graphs: dict = {}
        self._zeros: dict = {}

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.proxy.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _forward(self, params, x):
        return functional_call(self.model, params, (x,))

    def _step(self, students, probs, out):
        spec, K = self.spec, students.shape[0]
        views = spec.unflatten(students)
        trainable = {n: views[n] for n, tr in zip(spec.names, spec.trainable) if tr}
        frozen = {n: views[n] for n, tr in zip(spec.names, spec.trainable) if not tr}
        x = self.proxy

        def batched(p):
            return vmap(lambda pp, bb: self._forward({**pp, **bb}, x), in_dims=(0, 0))(p, frozen)

        with self._autocast():
            logits, pullback = vjp(batched, trainable)
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
            if self.cuda_graphs:
                return self._replay(students, teacher_probs, out)
            out = torch.empty_like(students) if out is None else out
            loss = self._step(students.detach(), teacher_probs, out)
            return loss, out
        finally:
            self.model.train(was_training)

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
        if out is None:
            return loss_static.clone(), g_static.clone()
        out.copy_(g_static)
        return loss_static.clone(), out
