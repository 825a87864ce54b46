"""FedADT: correct stale updates by knowledge distillation from the latest global model.

Teacher: the global model theta_t on the proxy inputs X, p_T = softmax(f(theta_t, X) / T),
cached once per version (``teacher_forwards`` counts the forwards).

Student: ``"client"`` theta_s = theta_tau + delta (needs the version store), ``"applied"``
theta_s = theta_t + delta.

KD loss: L(theta_s) = T^2 * mean_x KL(p_T(x) || softmax(f(theta_s, x) / T)); g = dL/dtheta_s.
Correction of one update with weight lam = lambda(t) * c(s):
  step="absolute": each of ``steps`` steps moves the student by  eta * lam * g
  step="relative": each step moves it by  rho * lam * ||delta|| / steps  along  g / ||g||
and the corrected update is delta' = delta - (sum of the steps). fastagg returns the sum as
``rows`` [K, P] and a per-client ``scale`` [K] with delta' = delta - scale * rows, so that a
one-step correction's scale folds into the merge coefficients.

The K students of a buffer are corrected together by fastagg.engine: one vmap'd forward over
their stacked parameters (optionally bf16 autocast and CUDA graphs), the fused KD loss+gradient
op on the [K*N, C] logits, and one vjp back into a flat [K, P] gradient buffer.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch
from torch.func import functional_call

from . import schedules as _schedules
from . import staleness as _staleness
from .engine import StudentGradEngine, check_options
from .ops.merge import to_device


class Teacher:
    """The global model of one version on the proxy inputs: ``probs`` p_T [N, C], and two
    statistics that schedules may ask for, ``confidence`` ((mean max p_T - 1/C) / (1 - 1/C),
    at least 0) and ``accuracy`` (on labelled proxy data, else None). Each may be given as a
    0-d tensor: it is read to the host when first asked for, so that a schedule which never
    asks (``constant``, the warm-ups) never makes the host wait for the device."""

    def __init__(self, version: int, probs: torch.Tensor, confidence, accuracy=None):
        self.version, self.probs = version, probs
        self._confidence, self._accuracy = confidence, accuracy

    @property
    def confidence(self) -> float:
        if isinstance(self._confidence, torch.Tensor):
            self._confidence = max(float(self._confidence), 0.0)
        return self._confidence

    @property
    def accuracy(self) -> float | None:
        if isinstance(self._accuracy, torch.Tensor):
            self._accuracy = float(self._accuracy)
        return self._accuracy


class KDCorrection:
    """Configuration and engine of the KD correction. Pass it to ``Aggregator(correction=...)``.

    Defaults were chosen by the experiments in docs/results.md (see README).
    """

    def __init__(self, proxy, *, temperature=3.0, schedule="teacher_confidence", step="relative",
                 eta=0.05, rho=1.0, steps=5, student="client", min_staleness=1,
                 staleness_factor="grows", factor_staleness=None, proxy_labels=None, precision="fp32",
                 cuda_graphs=False, conv="auto", chunk="auto", compile=False):
        if proxy is None:
            raise ValueError("KD correction needs unlabeled proxy inputs: pass proxy=<tensor [N, ...]> "
                             "(e.g. a small held-out slice of the training distribution)")
        proxy = torch.as_tensor(proxy)
        if proxy.dim() < 1 or proxy.shape[0] == 0:
            raise ValueError(f"proxy must be a non-empty batch of inputs, got shape {tuple(proxy.shape)}")
        if step not in ("absolute", "relative"):
            raise ValueError(f"step must be 'absolute' or 'relative', got {step!r}")
        if student not in ("client", "applied"):
            raise ValueError(f"student must be 'client' or 'applied', got {student!r}")
        if staleness_factor not in ("none", "grows"):
            raise ValueError(f"staleness_factor must be 'none' or 'grows', got {staleness_factor!r}")
        for name, value, low in (("temperature", temperature, "> 0"), ("eta", eta, ">= 0"), ("rho", rho, ">= 0")):
            if not (isinstance(value, numbers.Real) and math.isfinite(value) and
                    (value > 0 if low == "> 0" else value >= 0)):
                raise ValueError(f"{name} must be a finite number {low}, got {value!r}")
        for name, value, least in (("steps", steps, 1), ("min_staleness", min_staleness, 0)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        check_options(precision, conv, chunk)
        self.proxy = proxy
        self.proxy_labels = None if proxy_labels is None else torch.as_tensor(proxy_labels)
        self.temperature = float(temperature)
        self.schedule = _schedules.resolve(schedule)
        if getattr(self.schedule, "needs_labels", False) and self.proxy_labels is None:
            raise ValueError("the teacher_accuracy schedule needs proxy_labels=")
        self.step, self.eta, self.rho, self.steps = step, float(eta), float(rho), int(steps)
        self.student = student
        self.min_staleness = int(min_staleness)
        self.staleness_factor = staleness_factor
        self.factor_staleness = _staleness.resolve(factor_staleness or _staleness.polynomial(0.5))
        self.precision, self.cuda_graphs = precision, cuda_graphs
        self.conv, self.chunk, self.compile = conv, chunk, compile
        self.teacher_forwards = 0
        self._teacher: Teacher | None = None
        self._teacher_graph = None  # (graph, static theta, its outputs): the teacher's forward captured
        self.teacher_uncaptured = None  # why the teacher's forward could not be captured (then eager)
        self.model = self.spec = None
        self.backend = "torch"

    # -- binding ---------------------------------------------------------------------------
    def bind(self, model, spec, device, dtype, backend="torch"):
        self.model, self.spec, self.backend = model, spec, backend
        self.proxy = self.proxy.to(device=device, dtype=dtype if self.proxy.is_floating_point() else None)
        self.engine = StudentGradEngine(model, spec, self.proxy, self.temperature, backend, self.precision,
                                        self.cuda_graphs, self.conv, self.chunk, self.compile)
        if self.proxy_labels is not None:
            self.proxy_labels = self.proxy_labels.to(device)

    def check_fits(self, theta: torch.Tensor):
        """The teacher's forward once, now: a proxy that does not fit the model (or a model that
        does not return [N, C] logits) fails at construction with what was wrong, not at the
        first merge."""
        try:
            with torch.no_grad():
                logits = self._forward(self.spec.unflatten(theta), self.proxy)
        except Exception as exc:
            raise ValueError(f"the proxy inputs (shape {tuple(self.proxy.shape)}, {self.proxy.dtype}) do not fit "
                             f"the model: {type(exc).__name__}: {exc}") from exc
        if logits.dim() != 2:
            raise ValueError(f"the model must return logits of shape [N, classes] on the proxy inputs; "
                             f"it returned shape {tuple(logits.shape)}")

    def _forward(self, params: dict, x):
        was_training = self.model.training
        self.model.eval()
        try:
            return functional_call(self.model, params, (x,))
        finally:
            self.model.train(was_training)

    # -- teacher ---------------------------------------------------------------------------
    def teacher(self, theta: torch.Tensor, version: int) -> Teacher:
        if self._teacher is not None and self._teacher.version == version:
            return self._teacher
        graphed = self.cuda_graphs and theta.is_cuda and self.teacher_uncaptured is None
        probs, conf, accuracy = self._teacher_replayed(theta) if graphed else self._teacher_outputs(theta)
        self.teacher_forwards += 1
        self._teacher = Teacher(version, probs, conf, accuracy)
        return self._teacher

    def _teacher_outputs(self, theta):
        """(probs, conf, accuracy or None) of the global model ``theta`` on the proxy inputs."""
        with torch.no_grad():
            logits = self._forward(self.spec.unflatten(theta), self.proxy)
            acc = torch.float64 if theta.dtype == torch.float64 else torch.float32
            probs = torch.softmax(logits.to(acc) / self.temperature, dim=-1)
            C = probs.shape[-1]
            conf = (probs.max(dim=-1).values.mean() - 1.0 / C) / (1.0 - 1.0 / C)  # on the device, read if asked
            accuracy = None
            if self.proxy_labels is not None:
                accuracy = (logits.argmax(-1) == self.proxy_labels).float().mean()
        return probs, conf, accuracy

    def _teacher_replayed(self, theta):
        """_teacher_outputs as the replay of a CUDA graph captured at the first call (cuda_graphs):
        the forward's launches cost the host nothing then. On the H100 (twentieth session) the
        eager teacher took 2.8 ms a version for `lm` against its correction's 6.85 ms a buffer,
        3.8 for ResNet-18 and 0.64 for `cnn`, mostly host launches by our reading (not profiled).
        theta is copied into the graph's input; the outputs are copied out, so that a Teacher kept
        by a caller never changes under it. A forward that cannot be captured runs eagerly from
        then on, with a warning, and ``teacher_uncaptured`` says why."""
        g = self._teacher_graph
        same = g is not None and (g[1].shape, g[1].dtype, g[1].device) == (theta.shape, theta.dtype, theta.device)
        if not same:
            static = theta.detach().clone()
            try:
                side = torch.cuda.Stream(theta.device)
                side.wait_stream(torch.cuda.current_stream(theta.device))
                with torch.cuda.stream(side):  # warm-up outside the capture (lazy initialisation)
                    self._teacher_outputs(static)
                torch.cuda.current_stream(theta.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                # thread_local: as the engine's captures (a server thread staging meanwhile is not refused)
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    outs = self._teacher_outputs(static)
            except Exception as exc:  # noqa: BLE001 - said, recorded, and the teacher still runs
                self.teacher_uncaptured = f"{type(exc).__name__}: {exc}"[:300]
                warnings.warn("fastagg: the teacher's forward could not be captured as a CUDA graph and runs "
                              f"eagerly ({self.teacher_uncaptured})", RuntimeWarning, stacklevel=3)
                return self._teacher_outputs(theta)
            g = self._teacher_graph = (graph, static, outs)
        graph, static, outs = g
        static.copy_(theta)
        graph.replay()
        return tuple(None if t is None else t.clone() for t in outs)

    def invalidate(self):
        self._teacher = None

    def weight(self, version: int, teacher: Teacher, staleness: int) -> float:
        """lambda_i = lambda(t) * c(s_i); 0 below ``min_staleness``."""
        if staleness < self.min_staleness:
            return 0.0
        c = 1.0 if self.staleness_factor == "none" else 1.0 - float(self.factor_staleness(staleness))
        lam = float(self.schedule(version, teacher))
        if not (math.isfinite(lam) and lam >= 0):  # a user's schedule: refused here, the merge changes nothing
            raise ValueError(f"the lambda schedule {self.schedule!r} gave {lam} at version {version}: it must be "
                             "a finite number >= 0")
        if not 0 <= c <= 1:  # NaN fails this too
            raise ValueError(f"the staleness factor's function {self.factor_staleness!r} gave the weight {1 - c} at "
                             f"staleness {staleness}: it must be a number in [0, 1]")
        return lam * c

    # -- gradients -------------------------------------------------------------------------
    def student_grads(self, students: torch.Tensor, teacher: Teacher, out=None):
        """KD loss [K] and gradient [K, P] (zeros for buffers) of K stacked students [K, P],
        computed together by the batched engine (fastagg.engine); ``out`` receives the gradients."""
        return self.engine(students, teacher.probs, out=out)

    def correct(self, students: torch.Tensor, deltas: torch.Tensor, weights, teacher: Teacher,
                grad_fn=None, out=None, delta_norms=None):
        """Correction rows [K, P] and scale [K] such that delta' = delta - scale[:, None] * rows.
        ``out`` [K, P]: where the engine writes each step's gradients (with one step, the rows).
        ``delta_norms``: the deltas' L2 norms when known (the aggregator measures them at ingest),
        else they are computed here (step="relative" only)."""
        grad_fn = grad_fn or (lambda s: self.student_grads(s, teacher, out=out)[1])
        lam = to_device(weights, students.dtype, students.device)
        if self.step == "absolute":
            dnorm = None
        elif delta_norms is not None:
            dnorm = to_device(delta_norms, students.dtype, students.device)
        else:  # accumulated in the students' dtype: a bf16 delta's norm is not rounded to bf16
            dnorm = deltas.norm(dim=1, dtype=students.dtype)
        if self.steps == 1:
            g = grad_fn(students)
            if self.step == "absolute":
                scale = self.eta * lam
            else:
                gnorm = g.norm(dim=1)
                scale = torch.where(gnorm > 0, self.rho * lam * dnorm / gnorm.clamp_min(1e-30), torch.zeros_like(gnorm))
            return g, scale
        total = torch.zeros_like(students)
        s = students.clone()
        for _ in range(self.steps):  # in place: no [K, P] temporaries per step
            g = grad_fn(s)
            if self.step == "absolute":
                coef = (self.eta * lam)[:, None]
            else:
                gnorm = g.norm(dim=1, keepdim=True)
                coef = torch.where(gnorm > 0, (self.rho * lam * dnorm / self.steps)[:, None] / gnorm.clamp_min(1e-30),
                                   torch.zeros_like(gnorm))
            total.addcmul_(coef, g)
            s.addcmul_(coef, g, value=-1.0)
        return total, torch.ones_like(lam)

    def correct_loop(self, students, deltas, weights, teacher):
        """Test oracle: the same correction, client by client, with plain autograd of the
        explicit formula T^2 * mean KL(p_T || softmax(z / T))."""
        rows, scales = [], []
        for k in range(students.shape[0]):
            r, sc = self.correct(students[k:k + 1], deltas[k:k + 1], [float(weights[k])], teacher,
                                 grad_fn=lambda s: self._loop_grad(s, teacher))
            rows.append(r)
            scales.append(sc)
        return torch.cat(rows), torch.cat(scales)

    def _loop_grad(self, students, teacher):
        out = torch.zeros_like(students)
        T = self.temperature
        for k in range(students.shape[0]):
            params = {n: t.detach().clone().requires_grad_(tr) for (n, t), tr
                      in zip(self.spec.unflatten(students[k]).items(), self.spec.trainable)}
            z = self._forward(params, self.proxy)
            p = teacher.probs.to(z.dtype)
            loss = T * T * (torch.xlogy(p, p) - p * torch.log_softmax(z / T, dim=-1)).sum(-1).mean()
            names = [n for n, tr in zip(self.spec.names, self.spec.trainable) if tr]
            grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
            gd = dict(zip(names, grads))
            for name, shape, off, n in self.spec.items():
                if gd.get(name) is not None:  # else a buffer, or a parameter the logits do not use: zeros
                    out[k, off:off + n] = gd[name].reshape(-1)
        return out
