"""Training-stage weights lambda(t) for the KD correction (DESIGN.md section 1).

A schedule is called as ``schedule(version, teacher)`` where ``teacher`` is the
:class:`fastagg.correction.Teacher` cached for that version (its ``confidence`` and
``accuracy`` are measured on the proxy set). The correction weight of client i is
``lambda(t) * c(s_i)``.
"""

from __future__ import annotations

import abc
import math
import numbers
from dataclasses import dataclass


class Schedule(abc.ABC):
    @abc.abstractmethod
    def __call__(self, version: int, teacher) -> float:
        """The weight."""


def _check(name, **values):
    """Each value a finite number >= 0 (``versions`` and ``kappa`` > 0)."""
    for key, v in values.items():
        positive = key in ("versions", "kappa")
        if not (isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
                and (v > 0 if positive else v >= 0)):
            raise ValueError(f"{name}: {key} must be a finite number {'> 0' if positive else '>= 0'}, got {v!r}")


@dataclass(frozen=True)
class constant(Schedule):
    value: float = 1.0

    def __post_init__(self):
        _check("constant", value=self.value)

    def __call__(self, version, teacher=None):
        return float(self.value)


@dataclass(frozen=True)
class linear_warmup(Schedule):
    """lambda_max * min(1, t / versions)."""

    lam_max: float = 1.0
    versions: int = 100

    def __post_init__(self):
        _check("linear_warmup", lam_max=self.lam_max, versions=self.versions)

    def __call__(self, version, teacher=None):
        return float(self.lam_max * min(1.0, version / max(self.versions, 1)))


@dataclass(frozen=True)
class exp_saturation(Schedule):
    """lambda_max * (1 - exp(-t / kappa))."""

    lam_max: float = 1.0
    kappa: float = 50.0

    def __post_init__(self):
        _check("exp_saturation", lam_max=self.lam_max, kappa=self.kappa)

    def __call__(self, version, teacher=None):
        return float(self.lam_max * (1.0 - math.exp(-version / self.kappa)))


@dataclass(frozen=True)
class sigmoid(Schedule):
    """lambda_max / (1 + exp(-k (t - center)))."""

    lam_max: float = 1.0
    center: float = 100.0
    k: float = 0.05

    def __post_init__(self):
        _check("sigmoid", lam_max=self.lam_max, k=self.k)
        if not (isinstance(self.center, numbers.Real) and math.isfinite(self.center)):
            raise ValueError(f"sigmoid: center must be a finite number, got {self.center!r}")

    def __call__(self, version, teacher=None):
        x = -self.k * (version - self.center)  # far from the center exp(x) overflows a float: 1 / (1 + e^x) by its sign
        return float(self.lam_max / (1.0 + math.exp(x)) if x <= 0 else self.lam_max * math.exp(-x) / (1.0 + math.exp(-x)))


@dataclass(frozen=True)
class teacher_confidence(Schedule):
    """lambda_max * (mean max p_T - 1/C) / (1 - 1/C): 0 for a uniform teacher, lambda_max for a
    one-hot one. Needs no labels."""

    lam_max: float = 1.0

    def __post_init__(self):
        _check("teacher_confidence", lam_max=self.lam_max)

    def __call__(self, version, teacher):
        return float(self.lam_max * teacher.confidence)


@dataclass(frozen=True)
class teacher_accuracy(Schedule):
    """lambda_max * accuracy of the teacher on the labelled proxy set."""

    lam_max: float = 1.0
    needs_labels = True

    def __post_init__(self):
        _check("teacher_accuracy", lam_max=self.lam_max)

    def __call__(self, version, teacher):
        if teacher.accuracy is None:
            raise ValueError("teacher_accuracy needs proxy labels: pass proxy_labels= to KDCorrection")
        return float(self.lam_max * teacher.accuracy)


def resolve(spec) -> Schedule:
    if isinstance(spec, Schedule) or callable(spec):
        return spec
    if isinstance(spec, (int, float)):
        return constant(float(spec))
    names = {
        "constant": constant, "linear_warmup": linear_warmup, "exp_saturation": exp_saturation,
        "sigmoid": sigmoid, "teacher_confidence": teacher_confidence,
        "teacher_accuracy": teacher_accuracy,
    }
    if spec in names:
        return names[spec]()
    raise ValueError(f"unknown lambda schedule {spec!r}; use one of {sorted(names)}, a number or a callable")
