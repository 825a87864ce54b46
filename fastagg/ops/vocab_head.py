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
the C++ extension's or numba's on a CPU (fastagg.cpu_cpp / cpu_numba .head_stats / head_grad), so
that a chunk's logits are read once per sweep in the products' dtype; torch ops for float64 or
where neither CPU backend is there.

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


KERNELS = ("torch", "triton", "cpp", "numba")


def _kernels(kernels, h):
    """Which implementation runs the chunks' elementwise steps: ``kernels`` if given (one of
    KERNELS), else Triton on CUDA; on a CPU the C++ extension where it is built, else numba's
    kernels where numba is installed, else torch ops; torch ops for float64 (the kernels
    accumulate in fp32)."""
    if kernels is not None:
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
        return kernels
    if h.dtype == torch.float64:
        return "torch"
    if h.is_cuda:
        return "triton"
    from .. import cpu_cpp, cpu_numba

    return "cpp" if cpu_cpp.available()[0] else "numba" if cpu_numba.available()[0] else "torch"


def vocab_head_kd(h, W, b, probs, temperature, dW, db=None, compute_dtype=None, chunk=None, kernels=None):
    """(loss [K], dh [K, R, H]) of K students' KD losses through their output layers; dW [K, C, H]
    and db [K, C] (views of the flat gradient rows, any strides) receive the layer's gradients.
    ``compute_dtype``: the products' operand dtype (bf16 under the engine's bf16 precision, as
    autocast would give the layer; default h's); logits are read and the softmax taken in fp32
    (float64 for float64 inputs), the gradient rounded to the operand dtype for its products.
    ``chunk``: vocabulary columns per chunk (default: chunk_columns). ``kernels``: the chunks'
    elementwise steps as two kernels per chunk, "triton" (fastagg.kernels.vocab_head; default on
    CUDA), "cpp" (the C++ extension; default on a CPU where it is built) or "numba" (the CPU's
    default without it), or as "torch" ops (float64, or a CPU without either)."""
    K, R, H, C = check_head_args(h, W, b, probs, dW, db)
    impl = _kernels(kernels, h)
    if impl == "triton":
        from ..kernels.vocab_head import head_grad, head_stats
    elif impl in ("cpp", "numba"):
        from .. import cpu_cpp, cpu_numba
        from ..backends import BackendUnavailable

        mod = {"cpp": cpu_cpp, "numba": cpu_numba}[impl]
        ok, why = mod.available()
        if not ok:
            raise BackendUnavailable(f"the head route's {impl} kernels: {why}")
        head_grad, head_stats = mod.head_grad, mod.head_stats
    else:
        head_grad, head_stats = _torch_head_grad, _torch_head_stats
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    cd = compute_dtype or h.dtype
    cb = chunk or chunk_columns(K, R, C, h.device)
    T = float(temperature)
    hc = h.detach().to(cd)
    Wc = W.detach().to(cd)  # once: both sweeps read it (a chunk's strided cast twice cost ~5% on a CPU)
    bc = None if b is None else b.detach().to(cd)  # rounded to the operand dtype, as autocast gives it
    # Triton's take the bias in the product (baddbmm); the others add it as they widen the logits
    # (baddbmm on a CPU first copies the bias into its output: one more pass)
    bw = None if bc is None or impl == "triton" else bc.to(acc)
    p = probs.to(acc)
    if p.stride(-1) != 1:
        p = p.contiguous()
    # the rows' running max, sum of exp(z / T - max) and sum p z / T (in double but for Triton's)
    m = torch.full((K, R), -float("inf"), dtype=acc, device=h.device)
    s = torch.zeros_like(m)
    pz = torch.zeros(K, R, dtype=torch.float32 if impl == "triton" else torch.float64, device=h.device)
    plogp = torch.zeros(R, dtype=torch.float64, device=h.device)  # sum_c p log p (the teacher's part)

    def logits(c0, c1):
        w = Wc[:, c0:c1].transpose(1, 2)
        return torch.bmm(hc, w) if bc is None or bw is not None else torch.baddbmm(bc[:, None, c0:c1], hc, w)

    def bias(c0, c1):
        return {} if bw is None else {"bias": bw[:, c0:c1]}

    for c0 in range(0, C, cb):
        c1 = min(C, c0 + cb)
        head_stats(logits(c0, c1), p[:, c0:c1], T, m, s, pz, **bias(c0, c1))
        if impl != "triton":  # on a CPU chunk by chunk, in the caches (the whole [R, C] at once page-faults)
            plogp += torch.xlogy(p[:, c0:c1], p[:, c0:c1]).sum(-1)
    if impl == "triton":
        plogp = torch.xlogy(p, p).sum(-1).double()
    lse = m + s.log()
    dh = torch.zeros(K, R, H, dtype=acc, device=h.device)
    for c0 in range(0, C, cb):
        c1 = min(C, c0 + cb)
        g = logits(c0, c1)
        head_grad(g, p[:, c0:c1], T, lse, T / R, None if db is None else db[:, c0:c1], **bias(c0, c1))
        dW[:, c0:c1] = torch.bmm(g.transpose(1, 2), hc)
        dh += torch.bmm(g, Wc[:, c0:c1])
    # sum_c p log q = sum_c p z / T - lse * sum_c p, row by row in float64 (p sums to 1 only
    # within rounding); the teacher's own part T^2 / R * sum p log p is the same for all K
    rows = plogp - (pz.double() - lse.double() * p.sum(-1).double())
    return (rows.sum(-1) * (T * T / R)).to(acc), dh


def _torch_head_stats(z, p, temperature, m, s, pz, bias=None):
    """The first sweep's step as torch ops (float64; a CPU without the C++ extension or numba):
    the contract of fastagg.cpu_cpp.head_stats, the accumulators m and s in p's dtype."""
    x = z.to(p.dtype) if bias is None else torch.add(z, bias[:, None, :])
    x = x.mul_(1.0 / float(temperature))
    pz += (x * p).sum(-1)  # (an einsum went through permuting copies: 10% of a CPU pass)
    m_new = torch.maximum(m, x.amax(-1))
    s.mul_(torch.exp(m - m_new)).add_(torch.exp(x - m_new[..., None]).sum(-1))
    m.copy_(m_new)


def _torch_head_grad(z, p, temperature, lse, scale, db=None, bias=None):
    """The second sweep's step as torch ops: the contract of fastagg.cpu_cpp.head_grad (the
    gradient widened to p's dtype, db summed there, then written over z in z's dtype)."""
    g = z.to(p.dtype) if bias is None else torch.add(z, bias[:, None, :])
    g.mul_(1.0 / float(temperature)).sub_(lse[..., None]).exp_().sub_(p).mul_(scale)
    if db is not None:
        db.copy_(g.sum(1))
    z.copy_(g)


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
