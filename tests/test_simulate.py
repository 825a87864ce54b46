"""The simulator: split, determinism, and the missing-data message."""

import numpy as np
import pytest

pytest.importorskip("sklearn")

from fastagg import simulate  # noqa: E402


@pytest.mark.parametrize("alpha", [0.05, 0.5, 100.0])
def test_dirichlet_split_covers_every_sample_once(alpha):
    rng = np.random.default_rng(int(np.random.default_rng().integers(1 << 30)))
    labels = rng.integers(0, 10, size=1237)
    parts = simulate.dirichlet_split(labels, 57, alpha, rng)
    allidx = np.concatenate(parts)
    assert len(parts) == 57 and all(len(p) > 0 for p in parts)
    assert np.array_equal(np.sort(allidx), np.arange(len(labels)))


def test_small_dirichlet_alpha_is_non_iid():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=5000)
    skew = lambda parts: np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts])
    assert skew(simulate.dirichlet_split(labels, 20, 0.1, rng)) > 0.5 > skew(simulate.dirichlet_split(labels, 20, 100.0, rng))


def test_small_simulation_is_deterministic_and_learns():
    cfg = simulate.SimConfig(clients=12, concurrency=4, arrivals=120, local_steps=10, eval_every=40, proxy=40, lr=0.1,
                             algorithms=("fedbuff", "fedadt-async"))
    a = simulate.run(cfg, seeds=(3,), show_progress=False)
    b = simulate.run(cfg, seeds=(3,), show_progress=False)
    assert [r["accuracy"] for r in a["runs"]] == [r["accuracy"] for r in b["runs"]]
    assert [r["time"] for r in a["runs"]] == [r["time"] for r in b["runs"]]  # the same delay trace
    assert a["runs"][0]["time"] == a["runs"][1]["time"]  # ... for every algorithm
    assert all(r["accuracy"][-1] > 0.3 for r in a["runs"])  # 10 classes: chance is 0.1
    assert a["runs"][1]["stats"]["mean_staleness"] > 0


def test_missing_fashion_mnist_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setattr(simulate, "FASHION_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        simulate.load_dataset("fashion-mnist")
