"""`simulate` through the engine's convolution routes, on a CPU and (the device script) on a GPU:
the run-level check that fastagg's grouped convolutions change a whole FedADT run only by rounding.
Needs no data set (Fashion-MNIST-shaped inputs are generated) and no scikit-learn."""

import pytest
import torch

from fastagg import simulate


def test_runs_through_the_conv_routes_match_the_native_run(device):
    """Run-level check of the conv routes: the same simulated clients, FedADT corrected through
    vmap's own convolutions and through fastagg's grouped op (on a CPU its plain-PyTorch route and
    the Triton kernels through the interpreter, on a GPU the kernels, NCHW and channels-last, TF32
    off). Client training is identical, so the runs differ only by the correction's rounding: the
    routes must really run (engine.routes, routed_convs), and the final models must differ by far
    less than the correction itself moves them (FedADT against FedBuff). A 1% error in the weight
    gradient of the routed layer moves the ratio to ~2e-2; the clean runs give ~4e-5. The device
    is the suite's (FASTAGG_TEST_DEVICE; the device script runs it with cuda)."""
    device = device.type
    if device == "cuda":  # fp32 on both sides, not TF32 (restored below)
        tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        _compare_routes(device)
    finally:
        if device == "cuda":
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def _compare_routes(device):
    g = torch.Generator().manual_seed(int(torch.randint(1 << 30, ())))
    templates = torch.randn(10, 1, 28, 28, generator=g)

    def fake_fashion(n):  # Fashion-MNIST's shape (so the model is the convolutional one), learnable
        y = torch.randint(0, 10, (n,), generator=g)
        return templates[y] + 0.5 * torch.randn(n, 1, 28, 28, generator=g), y

    data = (*fake_fashion(1000), *fake_fashion(300))
    # small enough for the Triton interpreter (~1.7 s per corrected student on a CPU)
    cfg = simulate.SimConfig(dataset="fashion-mnist", clients=12, concurrency=4, arrivals=40, local_steps=5,
                             buffer=4, proxy=4, eval_every=40, lr=0.05, dirichlet=1.0, device=device)
    routes = ("native", "torch", "triton") if device == "cpu" else ("native", "triton", "triton_cl")
    runs = {}
    for route in routes:
        curve = simulate.run_one(f"fedadt-buff/conv={route},steps=1", cfg, data)
        engine = curve.aggregator.correction.engine
        assert set(engine.routes.values()) == {route}
        assert (engine.routed_convs > 0) == (route != "native")
        assert curve.stats["corrected"] > 0
        runs[route] = (curve.accuracy[-1], curve.aggregator.params.double())
    acc0, p0 = runs["native"]
    assert acc0 > 0.5  # ten classes
    effect = (p0 - simulate.run_one("fedbuff", cfg, data).aggregator.params.double()).norm()
    assert effect > 1e-4 * p0.norm()
    for route in routes[1:]:
        acc, p = runs[route]
        assert abs(acc - acc0) <= 0.03, (route, acc, acc0)
        assert (p - p0).norm() < 1e-3 * effect, route


@pytest.mark.parametrize("device, why", [("tpu", "is not a torch device"), ("meta", "runs on 'cpu' or 'cuda'")]
                         + ([] if torch.cuda.is_available() else [("cuda", "sees no CUDA device")]))
def test_a_device_simulate_cannot_use_is_refused_before_any_run(device, why):
    from fastagg.cli import main

    cfg = simulate.SimConfig(device=device, algorithms=("fedbuff",))
    with pytest.raises(ValueError, match=why):
        simulate.run(cfg, show_progress=False)
    assert main(["simulate", "--device", device, "--algorithms", "fedbuff", "--quiet", "--out", ""]) == 2
