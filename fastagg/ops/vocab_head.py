"""KD loss and gradients through a model's output layer, chunked over the vocabulary.

For K students whose logits are a linear layer of their hidden states,

    z_k = h_k W_k^T + b_k          h_k [R, H], W_k [C, H], b_k [C]   (R = the teacher's rows)
    loss_k = T^2 / R * sum_r sum_c p[r, c] (log p[r, c] - log softmax(z_k[r] / T)[c])

``vocab_head_kd`` returns loss [K] and d loss_k / d h_k [K, R, H], and writes d loss_k / d W_k
and d loss_k / d b_k into given tensors (the flat gradient rows' views), without ever holding
the [K, R, C] logits: the vocabulary is taken ``chunk`` columns at a time, twice. The first sweep
builds each row's log-sum-exp and its sum of p * z; the second recomputes each chunk's logits,
turns them into their gradient T / R * (softmax(z / T) - p), and takes from it that chunk's
columns of dW and db (complete: no accumulation across chunks) and its share of dh. The price is
one more product (four instead of the three of forward + backward); what it saves is every pass
over the full logits and their gradient, which for a 32k vocabulary are most of the memory
traffic of a student (and on a CPU page faults: each pass's fresh [K, R, C] tensors).

Each sweep's elementwise work on a chunk is one kernel: Triton's on CUDA (fastagg.kernels.vocab_head),
the C++ extension's on a CPU (fastagg.cpu_cpp.head_stats / head_grad), so that a chunk's logits
are read once per sweep in the products' dtype; torch ops for float64 or without the extension.

Rows are split the other way by fastagg.kernels.fused_linear_kd (Liger-Kernel's scheme): chunks
of rows with whole vocabularies, dW accumulated over them. That suits hidden sizes in the
thousands; with the small hidden sizes of a server's proxy models (H = 128 for the bench's LM
against R = 512 rows) dW's accumulation would cost as much as the logits it avoids.
"""

from __future__ import annotations

import torch

# columns per chunk: what keeps a chunk's fp32 logits [K, R, chunk] within this many bytes. On a
# CPU a few MB (the bench's LM, K = 4: 256 columns, 1.2-1.3x faster than 1024 or 2048 in bf16 in
# a first version of torch ops; not re-tuned for the C++ kernels); on CUDA fewer, larger launches
# (six or so a chunk with the Triton kernels; the bench's LM, K = 16: 8 chunks), not yet timed there
CHUNK_BYTES = {"cpu": 2 << 20, "cuda": 128 << 20}


def chunk_columns(K, R, C, device, chunk_bytes=None):
    """Columns per chunk for K students' [R, C] logits on ``device`` (at least 64, at most C)."""
    budget = CHUNK_BYTES.get(torch.device(device).type, CHUNK_BYTES["cuda"]) if chunk_bytes is None else chunk_bytes
    return int(min(C, max(64, budget // (4 * K * R))))


def check_head_args(h, W, b, probs, dW, db):
    """Shapes and dtypes of vocab_head_kd's arguments; raises ValueError naming what disagrees."""
    if h.dim() != 3 or W.dim() != 3:
        raise ValueError(f"hidden states must be [K, R, H] and weights [K, C, H], got {tuple(h.shape)} and "
                         f"{tuple(W.shape)}")
    K, R, H = h.shape
    C = W.shape[1]
    if W.shape != (K, C, H):
        raise ValueError(f"weights {tuple(W.shape)} do not match hidden states {tuple(h.shape)}: want {(K, C, H)}")
    if probs.shape != (R, C):
        raise ValueError(f"teacher probabilities {tuple(probs.shape)} do not match the students' logits: "
                         f"want {(R, C)}")
    if dW.shape != (K, C, H):
        raise ValueError(f"dW must be {(K, C, H)}, got {tuple(dW.shape)}")
    if (b is None) != (db is None):
        raise ValueError("give db exactly when the layer has a bias")
    if b is not None and (b.shape != (K, C) or db.shape != (K, C)):
        raise ValueError(f"bias and db must be {(K, C)}, got {tuple(b.shape)} and {tuple(db.shape)}")
    return K, R, H, C


KERNELS = ("torch", "triton", "cpp")


def _kernels(kernels, h):
    """Which implementation runs the chunks' elementwise steps: ``kernels`` if given (one of
    KERNELS), else Triton on CUDA, the C++ extension on a CPU where it is built, torch ops for
    float64 (the kernels accumulate in fp32) or without the extension."""
    if kernels is not None:
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
        return kernels
    if h.dtype == torch.float64:
        return "torch"
    if h.is_cuda:
        return "triton"
    from .. import cpu_cpp

    return "cpp" if cpu_cpp.available()[0] else "torch"


def vocab_head_kd(h, W, b, probs, temperature, dW, db=None, compute_dtype=None, chunk=None, kernels=None):
    """(loss [K], dh [K, R, H]) of K students' KD losses through their output layers; dW [K, C, H]
    and db [K, C] (views of the flat gradient rows, any strides) receive the layer's gradients.
    ``compute_dtype``: the products' operand dtype (bf16 under the engine's bf16 precision, as
    autocast would give the layer; default h's); logits are read and the softmax taken in fp32
    (float64 for float64 inputs), the gradient rounded to the operand dtype for its products.
    ``chunk``: vocabulary columns per chunk (default: chunk_columns). ``kernels``: the chunks'
    elementwise steps as two kernels per chunk, "triton" (fastagg.kernels.vocab_head; default on
    CUDA) or "cpp" (the C++ extension; default on a CPU where it is built), or as "torch" ops
    (float64, or a CPU without the extension)."""
    K, R, H, C = check_head_args(h, W, b, probs, dW, db)
    impl = _kernels(kernels, h)
    if impl != "torch":
        return _vocab_head_kernels(h, W, b, probs, temperature, dW, db, compute_dtype, chunk, impl)
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    cd = compute_dtype or h.dtype
    cb = chunk or chunk_columns(K, R, C, h.device)
    T = float(temperature)
    hc = h.detach().to(cd)
    Wc = W.detach().to(cd)  # once: both sweeps read it (a chunk's strided cast twice cost ~5% on a CPU)
    # the bias rounded to the operand dtype, as autocast gives it to the layer, then added in acc
    bc = None if b is None else b.detach().to(cd).to(acc)[:, None, :]
    p = probs.to(acc)

    def scaled_logits(c0, c1):
        """(z / T in the accumulation dtype, the chunk's weights): the products in the operand
        dtype, the bias added as they widen (one pass; baddbmm first copies the bias into its
        output), then the scaling."""
        w = Wc[:, c0:c1]
        z = torch.bmm(hc, w.transpose(1, 2))
        z = z.to(acc) if bc is None else torch.add(z, bc[:, :, c0:c1])
        return z.mul_(1.0 / T), w

    lse = torch.full((K, R), -float("inf"), dtype=acc, device=h.device)
    pz = torch.zeros(K, R, dtype=torch.float64, device=h.device)  # sum_c p z / T per row
    plogp = torch.zeros(R, dtype=torch.float64, device=h.device)  # sum_c p log p per row (the teacher's part)
    for c0 in range(0, C, cb):
        c1 = min(C, c0 + cb)
        z, _ = scaled_logits(c0, c1)
        pc = p[:, c0:c1]
        pz += (z * pc).sum(-1)  # (an einsum went through permuting copies: 10% of a CPU pass)
        plogp += torch.xlogy(pc, pc).sum(-1)  # chunk by chunk, in the caches
        lse = torch.logaddexp(lse, torch.logsumexp(z, dim=-1))
    dh = torch.zeros(K, R, H, dtype=acc, device=h.device)
    for c0 in range(0, C, cb):
        c1 = min(C, c0 + cb)
        g, w = scaled_logits(c0, c1)
        g.sub_(lse[..., None]).exp_().sub_(p[:, c0:c1]).mul_(T / R)
        if db is not None:
            db[:, c0:c1] = g.sum(1)
        g = g.to(cd)
        dW[:, c0:c1] = torch.bmm(g.transpose(1, 2), hc)
        dh += torch.bmm(g, w)
    # sum_c p log q = sum_c p z / T - lse * sum_c p, row by row in float64 (p sums to 1 only
    # within rounding); the teacher's own part T^2 / R * sum p log p is the same for all K
    rows = plogp - (pz - lse.double() * p.sum(-1).double())
    loss = rows.sum(-1) * (T * T / R)
    return loss.to(acc), dh


def _vocab_head_kernels(h, W, b, probs, temperature, dW, db, compute_dtype, chunk, impl):
    """vocab_head_kd with each chunk's elementwise steps as one kernel per sweep, Triton's
    (fastagg.kernels.vocab_head) or the C++ extension's: the logits are the products' output in
    the operand dtype, read once by the first sweep's kernel and once by the second's, which
    writes the gradient over them. The C++ kernels add the bias themselves (in fp32, rounded to
    the operand dtype first as autocast gives it) and sum p z / T in double; Triton's take it in
    the product (baddbmm) and sum in fp32."""
    if impl == "triton":
        from ..kernels.vocab_head import head_grad, head_stats
    else:
        from .. import cpu_cpp
        from ..backends import BackendUnavailable
        from ..cpu_cpp import head_grad, head_stats

        if not cpu_cpp.available()[0]:
            raise BackendUnavailable(f"the head route's C++ kernels: {cpu_cpp.available()[1]}")

    K, R, H, C = h.shape[0], h.shape[1], h.shape[2], W.shape[1]
    cd = compute_dtype or h.dtype
    cb = chunk or chunk_columns(K, R, C, h.device)
    T = float(temperature)
    hc = h.detach().to(cd)
    Wc = W.detach().to(cd)  # once: both sweeps read it
    bc = None if b is None else b.detach().to(cd)
    bf = None if bc is None or impl == "triton" else bc.float()
    p = probs.float()
    if p.stride(-1) != 1:
        p = p.contiguous()
    m = torch.full((K, R), -float("inf"), dtype=torch.float32, device=h.device)
    s = torch.zeros_like(m)
    pz = torch.zeros(K, R, dtype=torch.float32 if impl == "triton" else torch.float64, device=h.device)
    plogp = torch.zeros(R, dtype=torch.float64, device=h.device)

    def logits(c0, c1):
        w = Wc[:, c0:c1].transpose(1, 2)
        if bc is None or impl != "triton":
            return torch.bmm(hc, w)
        return torch.baddbmm(bc[:, None, c0:c1], hc, w)

    def bias(c0, c1):
        return {} if bf is None else {"bias": bf[:, c0:c1]}

    for c0 in range(0, C, cb):
        c1 = min(C, c0 + cb)
        head_stats(logits(c0, c1), p[:, c0:c1], T, m, s, pz, **bias(c0, c1))
        if impl != "triton":  # on a CPU chunk by chunk, in the caches (the whole [R, C] at once page-faults)
            plogp += torch.xlogy(p[:, c0:c1], p[:, c0:c1]).sum(-1)
    if impl == "triton":
        plogp = torch.xlogy(p, p).sum(-1).double()
    lse = m + s.log()
    dh = torch.zeros(K, R, H, dtype=torch.float32, device=h.device)
    for c0 in range(0, C, cb):
        c1 = min(C, c0 + cb)
        g = logits(c0, c1)
        head_grad(g, p[:, c0:c1], T, lse, T / R, None if db is None else db[:, c0:c1], **bias(c0, c1))
        dW[:, c0:c1] = torch.bmm(g.transpose(1, 2), hc)
        dh += torch.bmm(g, Wc[:, c0:c1])
    rows = plogp - (pz.double() - lse.double() * p.sum(-1).double())
    return (rows.sum(-1) * (T * T / R)).float(), dh


def vocab_head_kd_reference(h, W, b, probs, temperature):
    """(loss [K], dh, dW, db) through the full [K, R, C] logits with autograd, in float64: the
    independent reference of the tests."""
    T = float(temperature)
    h = h.detach().double().requires_grad_(True)
    W = W.detach().double().requires_grad_(True)
    bb = None if b is None else b.detach().double().requires_grad_(True)
    z = torch.einsum("krh,kch->krc", h, W) + (0 if bb is None else bb[:, None, :])
    p = probs.double()
    loss = (torch.xlogy(p, p) - p * torch.log_softmax(z / T, -1)).sum((1, 2)) * (T * T / h.shape[1])
    grads = torch.autograd.grad(loss.sum(), [h, W] + ([bb] if bb is not None else []))
    return (loss.detach(), *grads) + ((None,) if bb is None else ())
