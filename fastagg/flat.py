"""The model's state as one flat vector.

fastagg keeps the global model as a single contiguous tensor of P elements (every floating
parameter and floating buffer of the model, in ``state_dict`` order), so that merging is one
pass over memory and K client updates stack into a [K, P] matrix. ``ParamSpec`` maps between
that vector and named tensors (views, no copies).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import errors


@dataclass(frozen=True)
class ParamSpec:
    names: tuple
    shapes: tuple
    offsets: tuple
    trainable: tuple  # True for nn.Parameters with requires_grad (KD gradients exist only for these)
    numel: int
    ignored: tuple = ()  # the model's non-floating state (BatchNorm's num_batches_tracked): not aggregated
    aliases: tuple = ()  # (name, name it is tied to), e.g. an LM's output weight tied to its embedding

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> "ParamSpec":
        params = {id(p) for p in module.parameters() if p.requires_grad}
        names, shapes, offsets, trainable, ignored, aliases = [], [], [], [], [], []
        off = 0
        seen = {}  # id of a tensor -> its first name
        for name, t in module.state_dict(keep_vars=True).items():
            if not torch.is_floating_point(t):
                ignored.append(name)  # e.g. BatchNorm's num_batches_tracked: not averaged
                continue
            if id(t) in seen:  # tied: one tensor under two names, held once
                aliases.append((name, seen[id(t)]))
                continue
            seen[id(t)] = name
            names.append(name)
            shapes.append(tuple(t.shape))
            offsets.append(off)
            trainable.append(id(t) in params)
            off += t.numel()
        if off == 0:
            raise ValueError("the model has no floating-point parameters")
        return cls(tuple(names), tuple(shapes), tuple(offsets), tuple(trainable), off, tuple(ignored),
                   tuple(aliases))

    def __len__(self):
        return len(self.names)

    def items(self):
        for name, shape, off in zip(self.names, self.shapes, self.offsets):
            n = 1
            for d in shape:
                n *= d
            yield name, shape, off, n

    def unflatten(self, flat: torch.Tensor) -> dict:
        """[P] -> {name: view}; or [K, P] -> {name: [K, *shape] view}."""
        lead = flat.shape[:-1]
        return {name: flat[..., off:off + n].view(*lead, *shape) for name, shape, off, n in self.items()}

    def with_aliases(self, tensors: dict) -> dict:
        """{name: tensor} with the tied names added (copies: the wire format refuses shared
        tensors), so that a model with tied weights loads it strictly."""
        return {**tensors, **{alias: tensors[name].clone() for alias, name in self.aliases}}

    def flatten(self, tensors: dict, out: torch.Tensor | None = None, dtype=None) -> torch.Tensor:
        """{name: tensor} (exactly the spec's keys and shapes) -> flat [P]. Validates."""
        check_keys(self, tensors)
        if out is None:
            out = torch.empty(self.numel, dtype=dtype or torch.float32)
        for name, shape, off, n in self.items():
            t = tensors[name]
            if not isinstance(t, torch.Tensor):
                t = torch.as_tensor(t)
            if tuple(t.shape) != shape:
                raise errors.UpdateShapeError(f"{name!r} has shape {tuple(t.shape)}, expected {shape}")
            check_float(name, t.dtype)
            out[off:off + n].copy_(t.reshape(-1))
        return out


def check_float(name, dtype):
    if not dtype.is_floating_point:
        raise errors.UpdateDTypeError(f"{name!r} has dtype {dtype}; updates must be floating point")


def check_keys(spec: ParamSpec, tensors: dict):
    """The floating keys of the model, each once; its non-floating state and the tied names may
    come along (a full ``state_dict``) and are left out (a tied name holds the same tensor)."""
    keys = set(tensors) - set(spec.ignored) - {alias for alias, _ in spec.aliases}
    expected = set(spec.names)
    if keys != expected:
        missing = sorted(expected - keys)
        extra = sorted(keys - expected)
        raise errors.UpdateKeysError(
            f"update keys differ from the model's: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
        )
