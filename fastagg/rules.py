"""Merge rules. Both are plain configuration; the arithmetic lives in ``merge_coefficients``.

FedAsync (Xie et al. 2019): each arrival mixes
    theta <- (1 - a_i) theta + a_i (theta_{tau_i} + delta'_i),   a_i = alpha * w(s_i)
and bumps the version by one. K arrivals processed together give exactly the result of
applying them one by one: with P_k = prod_{j>k} (1 - a_j),
    theta_K = (prod_j (1 - a_j)) theta_0 + sum_k a_k P_k (theta_{tau_k} + delta'_k).
With correction on, the whole batch is corrected against the teacher at the start of the batch
(theta_0), not against the intermediate versions: use batch_size=1 for the strict sequential
semantics.

FedBuff (Nguyen et al. 2022): buffer K corrected updates, then
    u = sum_k a_k delta'_k / N,   a_k = w(s_k) (x n_k if sample_weighted),
    N = sum_k a_k (normalize="weights") or K (normalize="count"),
    m <- beta m + u (server momentum, beta=0 disables),   theta <- theta + eta_g m
and bumps the version by one.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass


def _positive_int(n) -> bool:
    return isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 1


@dataclass(frozen=True)
class FedAsync:
    alpha: float = 0.6
    batch_size: int = 1

    def __post_init__(self):
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"FedAsync alpha must be in (0, 1], got {self.alpha}")
        if not _positive_int(self.batch_size):
            raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")

    @property
    def capacity(self):
        return self.batch_size

    def coefficients(self, weights):
        """(c0, [coef_k]): theta_K = c0 theta_0 + sum_k coef_k (theta_{tau_k} + delta'_k)."""
        a = [self.alpha * w for w in weights]
        coefs = [0.0] * len(a)
        suffix = 1.0
        for k in range(len(a) - 1, -1, -1):
            coefs[k] = a[k] * suffix
            suffix *= 1.0 - a[k]
        return suffix, coefs


@dataclass(frozen=True)
class FedBuff:
    buffer_size: int = 10
    server_lr: float = 1.0
    normalize: str = "weights"
    sample_weighted: bool = False
    momentum: float = 0.0

    def __post_init__(self):
        if not _positive_int(self.buffer_size):
            raise ValueError(f"buffer_size must be an int >= 1, got {self.buffer_size!r}")
        if not (isinstance(self.server_lr, numbers.Real) and math.isfinite(self.server_lr) and self.server_lr > 0):
            raise ValueError(f"server_lr must be a finite number > 0, got {self.server_lr!r}")
        if self.normalize not in ("weights", "count"):
            raise ValueError(f"normalize must be 'weights' or 'count', got {self.normalize!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")

    @property
    def capacity(self):
        return self.buffer_size

    def weights(self, weights, num_samples):
        """[a_k]: the staleness weights, times the sample counts if sample_weighted."""
        return [w * (n if self.sample_weighted else 1.0) for w, n in zip(weights, num_samples)]

    def coefficients(self, weights, num_samples, totals=None):
        """[a_k / N] for the buffered updates (before the server learning rate). ``totals``: the sum
        of the a_k and the number of updates over every rank, when the buffer is spread over
        several (fastagg.distributed); by default those of these updates."""
        a = self.weights(weights, num_samples)
        weight_sum, count = totals if totals is not None else (math.fsum(a), len(a))
        norm = weight_sum if self.normalize == "weights" else float(count)
        if norm <= 0:
            return [0.0] * len(a)
        return [x / norm for x in a]


def resolve(rule):
    if isinstance(rule, (FedAsync, FedBuff)):
        return rule
    if rule in ("fedasync", "FedAsync"):
        return FedAsync()
    if rule in ("fedbuff", "FedBuff"):
        return FedBuff()
    raise ValueError(f"unknown rule {rule!r}; use FedAsync(...) or FedBuff(...)")
