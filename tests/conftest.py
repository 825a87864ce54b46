import importlib
import importlib.util
import os

# One suite for every device: FASTAGG_TEST_DEVICE=cuda runs the kernel tests on the GPU (the
# device check script does); by default they run on the CPU, the Triton kernels through the
# interpreter, which must be chosen before triton is imported anywhere (torch imports it lazily).
DEVICE = os.environ.get("FASTAGG_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

# every address a kernel touches must lie inside one of its tensors (interpreter_bounds.py); without
# Triton no Triton kernel runs either
if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None:
    from interpreter_bounds import install

    install()


def mlp(d_in=6, hidden=9, classes=5, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.Tanh(),
                               torch.nn.Linear(hidden, classes)).to(dtype)


class TinyCNN(torch.nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 3, padding=1)
        self.fc = torch.nn.Linear(3 * 5 * 5, classes)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def cnn(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return TinyCNN().to(dtype)


def need_backend(name):
    """Skip where a CPU backend is not available — except the C++ one where CI requires it — and
    on the device run (FASTAGG_TEST_DEVICE=cuda), whose minutes are for the GPU's kernels: the CPU
    backends' cases (numba compiling in every worker, mostly) are CI's."""
    if DEVICE == "cuda" and name in ("cpp", "numba"):
        pytest.skip(f"the {name} backend's cases run in CI, not on the device run")
    from fastagg import backends
    ok, why = backends.available()[name]
    if not ok:
        if name == "cpp" and os.environ.get("FASTAGG_REQUIRE_CPP") == "1":
            pytest.fail(f"the C++ extension must be built here: {why}")
        pytest.skip(why)


def cpu_kernels(name):
    """fastagg's CPU kernel module for ``name`` ("cpp" or "numba"), or a skip as need_backend's."""
    need_backend(name)
    from fastagg import cpu_cpp, cpu_numba

    return {"cpp": cpu_cpp, "numba": cpu_numba}[name]


@pytest.fixture(params=["cpp", "numba"])
def cpu_backend(request):
    return cpu_kernels(request.param)


def triton_kernels(op):
    """fastagg.kernels.<op> (the Triton kernels of one op), or a skip where Triton is missing."""
    pytest.importorskip("triton")
    return importlib.import_module(f"fastagg.kernels.{op}")


def rel_err(a, b):
    """||a - b|| / ||b||, in float64."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def random_delta(agg, scale=0.1, gen=None):
    return torch.randn(agg.spec.numel, dtype=agg.dtype, generator=gen) * scale


@pytest.fixture
def rng(request):
    """A generator with a fresh seed each run; FASTAGG_TEST_SEED=<n> repeats one, and a failing
    test's report names the seed it ran with."""
    seed = int(os.environ.get("FASTAGG_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    request.node.fastagg_seed = seed
    return torch.Generator().manual_seed(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seed = getattr(item, "fastagg_seed", None)
    if report.failed and seed is not None:
        report.sections.append(("rng seed", f"FASTAGG_TEST_SEED={seed} reruns this test on the same inputs"))


@pytest.fixture
def device():
    return torch.device(DEVICE)
