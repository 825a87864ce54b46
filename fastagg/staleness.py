"""Staleness weights w(s) for s = t - tau (version now minus the client's base version).

- ``constant()``:          w(s) = 1
- ``polynomial(a)``:       w(s) = (1 + s)^(-a)                       (FedAsync, Xie et al. 2019)
- ``hinge(a, b)``:         w(s) = 1 if s <= b else 1 / (a (s - b) + 1)
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass


class Staleness(abc.ABC):
    @abc.abstractmethod
    def __call__(self, s: int) -> float:
        """The weight."""


@dataclass(frozen=True)
class constant(Staleness):
    def __call__(self, s: int) -> float:
        return 1.0


@dataclass(frozen=True)
class polynomial(Staleness):
    a: float = 0.5

    def __post_init__(self):
        if not (math.isfinite(self.a) and self.a >= 0):
            raise ValueError(f"polynomial staleness needs a finite a >= 0, got {self.a}")

    def __call__(self, s: int) -> float:
        return float((1.0 + s) ** (-self.a))


@dataclass(frozen=True)
class hinge(Staleness):
    a: float = 10.0
    b: int = 4

    def __post_init__(self):
        if not (math.isfinite(self.a) and math.isfinite(self.b) and self.a >= 0 and self.b >= 0):
            raise ValueError(f"hinge staleness needs finite a, b >= 0, got a={self.a}, b={self.b}")

    def __call__(self, s: int) -> float:
        return 1.0 if s <= self.b else 1.0 / (self.a * (s - self.b) + 1.0)


def resolve(spec) -> Staleness:
    """Accept a Staleness object, a callable, or a name: 'constant', 'polynomial', 'hinge'."""
    if isinstance(spec, Staleness) or callable(spec):
        return spec
    names = {"constant": constant, "polynomial": polynomial, "hinge": hinge}
    if spec in names:
        return names[spec]()
    raise ValueError(f"unknown staleness function {spec!r}; use one of {sorted(names)} or a callable")
