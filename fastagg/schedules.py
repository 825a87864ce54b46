"""Training-stage weights lambda(t) for the KD correction (DESIGN.md section 1).

A schedule is called as ``schedule(version, teacher)`` where ``teacher`` is the
:class:`fastagg.correction.Teacher` cached for that version (its ``confidence`` and
``accuracy`` are measured on the proxy set). The correction weight of client i is
``lambda(t) * c(s_i)``.
"""

from __future__ import annotations

import math
import abc
from dataclasses import dataclass


class Schedule(abc.ABC):
    @abc.abstractmethod
    def __call__(self, version: int, teacher) -> float:
        """The weight."""


@dataclass(frozen=True)
class constant(Schedule):
    value: float = 1.0

    def __call__(self, version, teacher=None):
        return float(self.value)


@dataclass(frozen=True)
class linear_warmup(Schedule):
    """lambda_max * min(1, t / versions)."""

    lam_max: float = 1.0
    versions: int = 100

    def __call__(self, version, teacher=None):
        return float(self.lam_max * min(1.0, version / max(self.versions, 1)))


@dataclass(frozen=True)
class exp_saturation(Schedule):
    """lambda_max * (1 - exp(-t / kappa))."""

    lam_max: float = 1.0
    kappa: float = 50.0

    def __call__(self, version, teacher=None):
        return float(self.lam_max * (1.0 - math.exp(-version / self.kappa)))


@dataclass(frozen=True)
class sigmoid(Schedule):
    """lambda_max / (1 + exp(-k (t - center)))."""

    lam_max: float = 1.0
    center: float = 100.0
    k: float = 0.05

    def __call__(self, version, teacher=None):
        return float(self.lam_max / (1.0 + math.exp(-self.k * (version - self.center))))


@dataclass(frozen=True)
class teacher_confidence(Schedule):
    """lambda_max * (mean max p_T - 1/C) / (1 - 1/C): 0 for a uniform teacher, lambda_max for a
    one-hot one. Needs no labels."""

    lam_max: float = 1.0

    def __call__(self, version, teacher):
        return float(self.lam_max * teacher.confidence)


@dataclass(frozen=True)
class teacher_accuracy(Schedule):
    """lambda_max * accuracy of the teacher on the labelled proxy set."""

    lam_max: float = 1.0
    needs_labels = True

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
