"""The head route: KD through a model's output layer chunk by chunk over the vocabulary
(fastagg.ops.vocab_head), against float64 autograd through the full logits."""

import pytest
import torch

import fastagg
import fastagg.cpu_cpp
import fastagg.engine as engine_mod
import fastagg.ops.vocab_head as vh
from fastagg.engine import StudentGradEngine
from fastagg.flat import ParamSpec
from fastagg.ops.vocab_head import vocab_head_kd, vocab_head_kd_reference

from conftest import cpu_kernels, need_backend, rel_err, triton_kernels


# torch ops (float64 too); the Triton kernels (interpreter on a CPU), the C++ extension's and numba's,
# which take fp32 / bf16
@pytest.mark.parametrize("dtype,compute,tol,kernels", [(torch.float64, None, 1e-12, "torch")] + [
    (torch.float32, compute, tol, k) for compute, tol in ((None, 2e-5), (torch.bfloat16, 2e-2))
    for k in ("torch", "triton", "cpp", "numba")])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk", [10, 37, 64])  # tails of 7; one chunk exactly; one larger than C
def test_the_chunked_head_matches_float64_autograd(dtype, compute, tol, bias, chunk, kernels, rng, device):
    if kernels in ("cpp", "numba"):
        need_backend(kernels)
    kernels_on = kernels != "torch"
    # the Triton kernels on the test device: a GPU's (FASTAGG_TEST_DEVICE=cuda), else the interpreter's
    dev = device if kernels == "triton" else torch.device("cpu")
    # 37 rows: three of the kernels' 16-row blocks, the last with a tail; 300 columns with the
    # largest chunk: three of their 128-column blocks, the last with a tail
    K, R, H, C = 3, 37 if kernels_on else 7, 5, 300 if kernels_on and chunk == 64 else 37
    chunk = C if kernels_on and chunk == 64 else chunk
    h = torch.randn(K, R, H, generator=rng, dtype=dtype)
    W = torch.randn(K, C, H, generator=rng, dtype=dtype)
    b = torch.randn(K, C, generator=rng, dtype=dtype) if bias else None
    p = torch.softmax(2 * torch.randn(R, C, generator=rng, dtype=torch.float64), -1)
    p = p.to(dtype)
    # poisoned outputs, strided as the flat rows' views are: every element must be written
    dW = torch.full((K, C * H + 3), float("nan"), dtype=dtype)[:, 3:].view(K, C, H)
    db = torch.full((K, C + 1), float("nan"), dtype=dtype)[:, 1:] if bias else None
    on = [None if t is None else t.to(dev) for t in (h, W, b, p, dW, db)]
    loss, dh = vocab_head_kd(*on[:4], 3.0, *on[4:], compute_dtype=compute, chunk=chunk, kernels=kernels)
    dW, db = on[4].cpu(), None if db is None else on[5].cpu()
    loss, dh = loss.cpu(), dh.cpu()
    ref_loss, ref_dh, ref_dW, *ref_db = vocab_head_kd_reference(h, W, b, p, 3.0)
    assert rel_err(loss, ref_loss) < tol
    assert rel_err(dh, ref_dh) < tol
    assert rel_err(dW, ref_dW) < tol
    if bias:
        assert rel_err(db, ref_db[0]) < tol


def test_the_chunked_head_refuses_shapes_that_disagree():
    h, W, b, p = torch.zeros(2, 4, 3), torch.zeros(2, 9, 3), torch.zeros(2, 9), torch.zeros(4, 9)
    dW, db = torch.zeros(2, 9, 3), torch.zeros(2, 9)
    for args, words in [((h, W[:1], b, p, 3.0, dW, db), "do not match"),
                        ((h, W, b, p[:3], 3.0, dW, db), "teacher probabilities"),
                        ((h, W, b, p, 3.0, dW[:, :8], db), "dW must be"),
                        ((h, W, b, p, 3.0, dW, None), "exactly when"),
                        ((h, W, b[:, :8], p, 3.0, dW, db), "bias and db must be"),
                        ((h[0], W, b, p, 3.0, dW, db), "must be [K, R, H]")]:
        with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
            vocab_head_kd(*args)


class TinyLM(torch.nn.Module):
    """Embedding -> MLP -> layer norm -> output layer, logits for every position flattened to
    [B * S, vocab] after it (a view), as language models return them."""

    def __init__(self, vocab=300, d=12, tie=False, post=None, twice=False, tie_bias=False):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 2 * d), torch.nn.GELU(), torch.nn.Linear(2 * d, d))
        self.norm, self.out = torch.nn.LayerNorm(d), torch.nn.Linear(d, vocab)
        self.register_buffer("scale", torch.ones(d))  # a floating buffer: aggregated, no KD gradient
        if tie:  # GPT-2's: the output layer's weight is the embedding's
            self.out.weight = self.emb.weight
        self.gate = None
        if tie_bias:  # a vocabulary-wide gate on the input sharing the output layer's bias
            self.gate = torch.nn.Linear(d, vocab)
            self.gate.bias = self.out.bias
        self.post, self.twice = post, twice

    def forward(self, tokens):
        x = self.emb(tokens)
        if self.gate is not None:
            x = x * torch.sigmoid(self.gate(x)).mean(-1, keepdim=True)
        x = self.norm(x + self.mlp(x)) * self.scale
        z = self.out(x)
        if self.twice:  # the layer run once more (an auxiliary output, say)
            self.out(x.detach())
        z = z.flatten(0, -2)
        return z if self.post is None else self.post(z)


def _engine(model, proxy, conv, precision="fp32"):
    return StudentGradEngine(model, ParamSpec.from_module(model), proxy, 3.0, "torch", precision, conv=conv,
                             chunk=None)


def _students(model, K, rng, dtype=torch.float32):
    spec = ParamSpec.from_module(model)
    theta = spec.flatten(model.state_dict())
    return (theta + 0.05 * torch.randn(K, theta.numel(), generator=rng, dtype=theta.dtype)).to(dtype)


def _probs(model, proxy):
    with torch.no_grad():
        return torch.softmax(model(proxy).float() / 3.0, -1).to(torch.float64 if proxy.dtype == torch.float64
                                                                 else torch.float32)


@pytest.mark.parametrize("vocab", [300, 64])  # several chunks with a tail; one chunk
def test_the_head_route_equals_native_in_float64_and_fp32(vocab, rng, monkeypatch):
    monkeypatch.setattr(vh, "CHUNK_BYTES", {"cpu": 1, "cuda": 1})  # 64 columns a chunk: 300 = 4 * 64 + 44
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    model = TinyLM(vocab).double()
    tokens = torch.randint(0, vocab, (3, 5), generator=rng)
    students = _students(model, 4, rng, torch.float64)
    probs = _probs(model, tokens).double()
    got = {}
    for conv in ("native", "head"):
        eng = _engine(model, tokens, conv)
        out = torch.full_like(students, float("nan"))
        loss, _ = eng(students, probs, out=out)
        got[conv] = (loss, out)
    assert rel_err(got["head"][0], got["native"][0]) < 1e-12
    assert rel_err(got["head"][1], got["native"][1]) < 1e-12
    spec = ParamSpec.from_module(model)
    assert torch.equal(spec.unflatten(got["head"][1])["scale"], torch.zeros(4, 12, dtype=torch.float64))
    # fp32 against the float64 result
    model32 = model.float()
    eng = _engine(model32, tokens, "head")
    out = torch.empty(4, spec.numel)
    eng(students.float(), probs.float(), out=out)
    assert rel_err(out, got["native"][1]) < 1e-5


def test_the_head_route_in_bf16_is_within_the_stated_tolerance_of_fp32(rng):
    from test_correction import BF16_TOLERANCE

    model = TinyLM(3000, d=32)
    tokens = torch.randint(0, 3000, (4, 8), generator=rng)
    students, probs = _students(model, 3, rng), _probs(model, tokens)
    ref = torch.empty_like(students)
    _engine(model, tokens, "native")(students, probs, out=ref)
    out = torch.empty_like(students)
    _engine(model, tokens, "head", "bf16")(students, probs, out=out)
    assert 0 < rel_err(out, ref) < BF16_TOLERANCE


@pytest.mark.parametrize("case,words", [
    ("bias_tied", "shares its bias"), ("scaled", "not a linear layer's output"), ("twice", "runs 2 times"),
    ("log_softmax", "not a linear layer's output"), ("frozen", "not trained"), ("reshaped", "in order"),
])
def test_a_model_the_head_route_cannot_run_is_refused_with_the_reason(case, words, rng):
    kw = {"bias_tied": {"tie_bias": True}, "scaled": {"post": lambda z: 2 * z}, "twice": {"twice": True},
          "log_softmax": {"post": lambda z: z.log_softmax(-1)},
          # a view that names the vocabulary's size: the trunk's [rows, d] output cannot take it
          "reshaped": {"post": lambda z: z.reshape(-1, 300)}}.get(case, {})
    model = TinyLM(300, **kw)
    if case == "frozen":
        model.out.bias.requires_grad_(False)
    tokens = torch.randint(0, 300, (3, 5), generator=rng)
    with pytest.raises(ValueError, match=words):
        _engine(model, tokens, "head")
    # and auto leaves it out, at any vocabulary size
    eng = _engine(model, tokens, "auto")
    assert "head" not in eng._candidates(_students(model, 2, rng))
    assert words in eng.head_refused


def test_auto_times_the_head_route_from_a_vocabulary_of_head_min_classes(rng, monkeypatch):
    model = TinyLM(300)
    tokens = torch.randint(0, 300, (3, 5), generator=rng)
    students = _students(model, 2, rng)
    monkeypatch.setattr(engine_mod, "HEAD_MIN_CLASSES", 301)
    assert "head" not in _engine(model, tokens, "auto")._candidates(students)
    monkeypatch.setattr(engine_mod, "HEAD_MIN_CLASSES", 300)
    eng = _engine(model, tokens, "auto")
    assert eng._candidates(students) == ["native", "head"]
    out = torch.empty_like(students)
    eng(students, _probs(model, tokens), out=out)
    assert set(eng.route_timings[2]) == {"native", "head"}
    assert eng.routes[2] in ("native", "head")


def test_fedbuff_with_the_head_route_merges_as_with_native(rng):
    """Through the public API: a FedADT buffer of an LM corrected through the head route merges
    to the same global model as through native (float64), and the model's own training flags
    (dropout) are as they were."""
    model = TinyLM(300).double().train()
    tokens = torch.randint(0, 300, (3, 5), generator=rng)
    deltas = 0.05 * torch.randn(6, ParamSpec.from_module(model).numel, generator=rng, dtype=torch.float64)
    params, theta0 = [], ParamSpec.from_module(model).flatten(model.state_dict())
    for conv in ("native", "head"):
        corr = fastagg.KDCorrection(tokens, conv=conv, schedule=fastagg.schedules.constant(1.0), chunk=None)
        agg = fastagg.Aggregator(model, fastagg.FedBuff(3), correction=corr, backend="torch")
        for i, d in enumerate(deltas):
            agg.submit(d, base_version=max(0, agg.version - i % 2))
        params.append(agg.params - theta0)  # the two merges' sum of corrected updates
        assert agg.version == 2 and model.training
    assert rel_err(params[1], params[0]) < 1e-12


def test_conv_head_is_refused_for_a_model_without_an_output_layer(rng):
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh())  # logits squashed after the layer
    proxy = torch.randn(4, 6, generator=rng)
    with pytest.raises(ValueError, match="conv='head' cannot run this model"):
        fastagg.Aggregator(model, fastagg.FedBuff(2), correction=fastagg.KDCorrection(proxy, conv="head"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_the_head_route_replayed_as_a_cuda_graph_equals_native(rng):
    model = TinyLM(5000, d=32).cuda()
    tokens = torch.randint(0, 5000, (4, 16), generator=rng).cuda()
    students = _students(model, 8, rng).cuda()
    probs = _probs(model, tokens)
    ref = torch.empty_like(students)
    StudentGradEngine(model, ParamSpec.from_module(model), tokens, 3.0, "triton", "fp32", conv="native",
                      chunk=None)(students, probs, out=ref)
    eng = StudentGradEngine(model, ParamSpec.from_module(model), tokens, 3.0, "triton", "fp32", cuda_graphs=True,
                            conv="head", chunk=None)
    out = torch.empty_like(students)
    for _ in range(3):  # capture, then replays
        eng(students, probs, out=out)
    assert eng._graphs and rel_err(out, ref) < 1e-3  # TF32 in both routes' products


def test_the_compiled_head_route_equals_native(rng):
    """compiled_head: the trunk through torch.compile, its gradient by autograd of the compiled
    forward, the output layer's through the chunked op (float64: exact within rounding)."""
    model = TinyLM(300).double()
    tokens = torch.randint(0, 300, (3, 5), generator=rng)
    students = _students(model, 3, rng, torch.float64)
    probs = _probs(model, tokens).double()
    ref = torch.empty_like(students)
    ref_loss, _ = _engine(model, tokens, "native")(students, probs, out=ref)
    eng = StudentGradEngine(model, ParamSpec.from_module(model), tokens, 3.0, "torch", "fp32", conv="head",
                            chunk=None, compile=True)
    assert eng._candidates(students) == ["head", "compiled_head"]
    eng.only_routes = {"compiled_head"}
    out = torch.full_like(students, float("nan"))
    loss, _ = eng(students, probs, out=out)
    assert eng.routes[3] == "compiled_head"
    assert rel_err(loss, ref_loss) < 1e-12 and rel_err(out, ref) < 1e-12


@pytest.mark.parametrize("impl", ["triton", "cpp", "numba"])
def test_the_head_routes_kernels_equal_native(impl, rng, monkeypatch, device):
    """The engine's head route with the chunks' elementwise steps in the Triton kernels (as on
    CUDA; on a CPU through the interpreter), the C++ ones (a CPU's default where they are built)
    or numba's: fp32 gradients and losses equal native's."""
    if impl in ("cpp", "numba"):
        need_backend(impl)
    elif device.type == "cuda":  # this engine runs on the CPU: its Triton launches need the interpreter
        pytest.skip("the Triton kernels run on the GPU in test_the_chunked_head_matches_float64_autograd there")
    monkeypatch.setattr(vh, "CHUNK_BYTES", {"cpu": 1, "cuda": 1})  # 64 columns a chunk: 300 = 4 * 64 + 44
    calls = []
    mod = triton_kernels("vocab_head") if impl == "triton" else cpu_kernels(impl)
    for name in ("head_stats", "head_grad"):
        monkeypatch.setattr(mod, name, (lambda f, n: lambda *a, **k: (calls.append(n), f(*a, **k))[1])(getattr(mod, name),
                                                                                                        name))
    monkeypatch.setattr(vh, "_kernels", lambda kernels, h: impl)
    model = TinyLM(300)
    tokens = torch.randint(0, 300, (3, 5), generator=rng)
    students, probs = _students(model, 4, rng), _probs(model, tokens)
    ref = torch.empty_like(students)
    ref_loss, _ = _engine(model, tokens, "native")(students, probs, out=ref)
    out = torch.full_like(students, float("nan"))
    loss, _ = _engine(model, tokens, "head")(students, probs, out=out)
    assert calls.count("head_stats") == 5 and calls.count("head_grad") == 5
    assert rel_err(out, ref) < 1e-5
    # the loss (reported, not merged) from fp32 row sums and log-sum-exps, as the fused KD op's;
    # two fp32 evaluations of a KL this small (~2e-3 a row) differ by ~1e-7 of the log-sum-exp
    assert rel_err(loss, ref_loss) < 2e-4


def test_the_kernels_refuse_layouts_they_cannot_read(device):
    from fastagg.kernels.vocab_head import head_grad, head_stats

    z, p, acc = torch.zeros(2, 4, 6, device=device), torch.zeros(4, 6, device=device), torch.zeros(2, 4, device=device)
    with pytest.raises(ValueError, match="contiguous along c"):
        head_stats(z.transpose(1, 2), p, 3.0, acc, acc.clone(), acc.clone())
    with pytest.raises(ValueError, match="accumulators"):
        head_stats(z, p, 3.0, acc.double(), acc, acc)
    with pytest.raises(ValueError, match="lse"):
        head_grad(z, p, 3.0, acc[:1], 1.0)
    with pytest.raises(ValueError, match="db must be"):
        head_grad(z, p, 3.0, acc, 1.0, torch.zeros(6, 2, device=device).t())


@pytest.mark.parametrize("impl", ["cpp", "numba"])
def test_the_cpu_kernels_refuse_layouts_they_cannot_read(impl):
    mod = cpu_kernels(impl)
    head_grad, head_stats = mod.head_grad, mod.head_stats

    z, p, acc = torch.zeros(2, 4, 6), torch.zeros(4, 6), torch.zeros(2, 4)
    with pytest.raises(ValueError, match="contiguous along c"):
        head_stats(z.transpose(1, 2), p, 3.0, acc, acc.clone(), acc.double())
    with pytest.raises(ValueError, match="accumulators"):
        head_stats(z, p, 3.0, acc, acc.clone(), acc.clone())  # pz must be float64 here
    with pytest.raises(ValueError, match="bias must be"):
        head_stats(z, p, 3.0, acc, acc.clone(), acc.double(), bias=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="db must be"):
        head_grad(z, p, 3.0, acc, 1.0, torch.zeros(2, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="fp32 / bf16 / fp16"):
        head_grad(z.double(), p, 3.0, acc, 1.0)
    with pytest.raises(ValueError, match=r"must be \[K, R, c\]"):
        head_stats(z[0], p, 3.0, acc, acc.clone(), acc.double())


def _chunk_reference(z, b, p, T, lse=None):
    """The chunk kernels' results in float64 from z's stored values: (max, sum of exp(x - max),
    sum p x) per row of x = (z + b) / T; with lse, also the gradient T / R * (exp(x - lse) - p)."""
    x = (z.double() + (0 if b is None else b.double()[:, None, :])) / T
    p = p.double()
    m = x.amax(-1)
    stats = (m, torch.exp(x - m[..., None]).sum(-1), (x * p).sum(-1))
    if lse is None:
        return stats
    return stats, (torch.exp(x - lse.double()[..., None]) - p) * (T / z.shape[1])


@pytest.mark.parametrize("impl", ["cpp", "numba"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_the_cpu_chunk_kernels_equal_float64_in_each_dtype(impl, dtype, bias, rng):
    """head_stats over two chunks folded into the same rows, then head_grad over a chunk: against
    float64 from the same stored logits, on strided rows (the products' outputs are views), with
    tails of the numba kernels' 8-row and 128-column tasks; the gradient stored in z's dtype
    within one rounding, and db the sum of the values before rounding."""
    mod = cpu_kernels(impl)
    K, R, T = 3, 13, 3.0
    widths = (300, 77)
    p_full = torch.softmax(2 * torch.randn(R, sum(widths), generator=rng), -1)
    m, s = torch.full((K, R), -float("inf")), torch.zeros(K, R)
    pz = torch.zeros(K, R, dtype=torch.float64)
    chunks, c0 = [], 0
    for w in widths:
        z = (4 * torch.randn(K, R, w + 5, generator=rng)).to(dtype)[:, :, 5:]  # rows strided
        b = torch.randn(K, w, generator=rng) if bias else None
        p = p_full[:, c0:c0 + w]  # strided rows of the teacher's [R, C]
        mod.head_stats(z, p, T, m, s, pz, bias=b)
        chunks.append((z, b, p))
        c0 += w
    ref = [_chunk_reference(z, b, p, T) for z, b, p in chunks]
    ref_m = torch.maximum(ref[0][0], ref[1][0])
    ref_s = sum(r[1] * torch.exp(r[0] - ref_m) for r in ref)
    assert torch.allclose(m.double(), ref_m, rtol=1e-6, atol=0)
    assert torch.allclose(s.double(), ref_s, rtol=1e-5, atol=0)
    assert torch.allclose(pz, ref[0][2] + ref[1][2], rtol=1e-5, atol=1e-5)
    lse = (m.double() + s.double().log()).float()
    for z, b, p in chunks:
        _, g = _chunk_reference(z, b, p, T, lse)
        for with_db in (True, False):
            zz = torch.empty(K, R, z.shape[2] + 3, dtype=dtype)[:, :, 3:].copy_(z)  # written over, strided rows
            db = torch.full((K, z.shape[2] + 2), float("nan"))[:, 2:] if with_db else None
            mod.head_grad(zz, p, T, lse, T / R, db, bias=b)
            # rounded to nearest: within half a unit in the last place of z's dtype (truncation
            # is not), plus the fp32 arithmetic's error and half of fp16's subnormal spacing
            half_ulp = torch.finfo(dtype).eps / 2
            assert ((zz.double() - g).abs() <= (half_ulp + 2e-6) * g.abs() + 3e-8).all()
            if with_db:
                assert torch.allclose(db.double(), g.sum(1), rtol=1e-4, atol=1e-7)


def test_on_a_cpu_the_chunks_default_to_cpp_then_numba_then_torch_ops(rng, monkeypatch):
    """kernels=None: the C++ kernels where the extension is built, else numba's where numba is
    there, else torch ops; float64 always torch ops (the kernels accumulate in fp32). Each
    choice gives the float64 reference's gradients."""
    import fastagg.cpu_cpp as kc
    import fastagg.cpu_numba as kn

    calls = []
    for mod in (kc, kn):
        monkeypatch.setattr(mod, "head_stats", (lambda f, n: lambda *a, **k: (calls.append(n), f(*a, **k))[1])(
            mod.head_stats, mod.__name__.rsplit("_", 1)[1]))
    monkeypatch.setattr(vh, "_torch_head_stats", (lambda f: lambda *a, **k: (calls.append("torch"), f(*a, **k))[1])(
        vh._torch_head_stats))
    K, R, H, C = 2, 5, 4, 70
    h, W = torch.randn(K, R, H, generator=rng), torch.randn(K, C, H, generator=rng)
    p = torch.softmax(torch.randn(R, C, generator=rng), -1)
    ref = vocab_head_kd_reference(h, W, None, p, 3.0)
    expected = [name for name, mod in (("cpp", kc), ("numba", kn)) if mod.available()[0]] + ["torch"]
    for want in expected:
        calls.clear()
        dW = torch.empty(K, C, H)
        _, dh = vocab_head_kd(h, W, None, p, 3.0, dW, chunk=32)
        assert set(calls) == {want}
        assert rel_err(dh, ref[1]) < 2e-5 and rel_err(dW, ref[2]) < 2e-5
        monkeypatch.setattr({"cpp": kc, "numba": kn}.get(want, kc), "available", lambda: (False, "a test"))
    calls.clear()
    vocab_head_kd(h.double(), W.double(), None, p.double(), 3.0, torch.empty(K, C, H, dtype=torch.float64))
    assert set(calls) == {"torch"}


def test_an_unknown_kernels_choice_is_refused():
    h, W, p = torch.zeros(1, 2, 3), torch.zeros(1, 4, 3), torch.full((2, 4), 0.25)
    with pytest.raises(ValueError, match="kernels must be one of"):
        vocab_head_kd(h, W, None, p, 3.0, torch.zeros(1, 4, 3), kernels="cuda")


def test_the_head_routes_kernels_follow_the_engines_backend(rng, monkeypatch):
    """backend "cpp" / "numba": the chunks through that backend's kernels; "torch": torch ops, no
    kernel called; the C++ ones asked for where the extension is not there: BackendUnavailable
    with the reason."""
    import fastagg.cpu_cpp as kc
    import fastagg.cpu_numba as kn

    calls = []
    for mod in (kc, kn):
        monkeypatch.setattr(mod, "head_stats", (lambda f, n: lambda *a, **k: (calls.append(n), f(*a, **k))[1])(
            mod.head_stats, mod.__name__))
    model = TinyLM(300)
    tokens = torch.randint(0, 300, (3, 5), generator=rng)
    students, probs = _students(model, 2, rng), _probs(model, tokens)
    spec = ParamSpec.from_module(model)
    out = torch.empty_like(students)
    StudentGradEngine(model, spec, tokens, 3.0, "torch", "fp32", conv="head", chunk=None)(students, probs, out=out)
    assert calls == []
    for mod, backend in ((kc, "cpp"), (kn, "numba")):
        if mod.available()[0]:
            calls.clear()
            StudentGradEngine(model, spec, tokens, 3.0, backend, "fp32", conv="head", chunk=None)(students, probs,
                                                                                                out=out)
            assert calls and set(calls) == {mod.__name__}
    monkeypatch.setattr(kc, "available", lambda: (False, "not built here (a test)"))
    with pytest.raises(fastagg.backends.BackendUnavailable, match="not built here"):
        StudentGradEngine(model, spec, tokens, 3.0, "cpp", "fp32", conv="head", chunk=None)(students, probs, out=out)


def test_a_classifiers_last_layer_in_a_sequential_runs_the_head_route_too(rng):
    """Any model whose logits are a linear layer's output: nn.Sequential's last layer (named "2")
    is replaced in the trunk by position; float64 gradients equal native's."""
    from conftest import mlp

    model = mlp(d_in=6, hidden=9, classes=5, dtype=torch.float64)
    proxy = torch.randn(11, 6, generator=rng, dtype=torch.float64)
    students = _students(model, 3, rng, torch.float64)
    probs = _probs(model, proxy)
    eng = _engine(model, proxy, "head")
    assert eng.vocab_head()[1:3] == ("2.weight", "2.bias")
    out, ref = torch.empty_like(students), torch.empty_like(students)
    eng(students, probs, out=out)
    _engine(model, proxy, "native")(students, probs, out=ref)
    assert rel_err(out, ref) < 1e-12


@pytest.mark.parametrize("route", ["head", "compiled_head"])
def test_a_head_tied_to_the_embedding_gets_the_gradient_of_both_uses(route, rng):
    """GPT-2's tie: the output layer's weight is the embedding's, one tensor of the flat rows; the
    head routes give it the sum of the layer's gradient and the embedding's (float64, against
    native, whose functional_call ties them as the model does)."""
    model = TinyLM(300, tie=True).double()
    spec = ParamSpec.from_module(model)
    assert spec.aliases == (("out.weight", "emb.weight"),)
    tokens = torch.randint(0, 300, (3, 5), generator=rng)
    students = _students(model, 3, rng, torch.float64)
    probs = _probs(model, tokens)
    ref = torch.empty_like(students)
    ref_loss, _ = _engine(model, tokens, "native")(students, probs, out=ref)
    eng = StudentGradEngine(model, spec, tokens, 3.0, "torch", "fp32", conv="head", chunk=None,
                            compile=route == "compiled_head")
    eng.only_routes = {route}
    assert eng.vocab_head()[1] == "emb.weight"  # the layer's weight by the name the flat rows hold it under
    out = torch.full_like(students, float("nan"))
    loss, _ = eng(students, probs, out=out)
    assert eng.routes[3] == route
    assert rel_err(loss, ref_loss) < 1e-12 and rel_err(out, ref) < 1e-12
    emb = spec.unflatten(out)["emb.weight"]
    assert emb[:, tokens.unique()].abs().sum() < emb.abs().sum()  # the layer's part reaches rows no token used


@pytest.mark.parametrize("name", ["cpp", "numba"])
def test_cpu_head_kernels_refuse_memory_elsewhere(name):
    """The kernels take raw pointers: a chunk or statistics in a GPU's memory ("meta" stands in
    for it) are refused before a pointer is taken."""
    cpu_backend = cpu_kernels(name)
    z, p, acc = torch.zeros(2, 4, 6), torch.full((4, 6), 1 / 6), torch.zeros(2, 4)
    with pytest.raises(TypeError, match="CPU tensors, got one on meta"):
        cpu_backend.head_stats(z.to("meta"), p, 3.0, acc, acc.clone(), acc.double())
    with pytest.raises(TypeError, match="CPU tensors, got one on meta"):
        cpu_backend.head_grad(z, p, 3.0, acc.to("meta"), 1.0)
