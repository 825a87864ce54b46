"""A bounded ring of recent global versions, so that theta_tau is at hand for stale updates.

Versions live as rows of one preallocated [capacity, P] tensor (so a fused merge can read a base
version as one more row). Capacity is the smaller of ``max_versions`` and ``max_bytes`` divided
by the bytes of one version. Pushing into a full ring evicts the oldest version and counts it.
"""

from __future__ import annotations

import torch


class VersionStore:
    def __init__(self, numel: int, dtype: torch.dtype, device, max_versions: int = 16,
                 max_bytes: int = 2 << 30):
        row_bytes = numel * torch.empty((), dtype=dtype).element_size()
        cap = min(int(max_versions), int(max_bytes) // row_bytes)
        if cap < 1:
            raise ValueError(f"version store limits allow no version: one version is {row_bytes} bytes, "
                             f"max_bytes={max_bytes}, max_versions={max_versions}")
        self.capacity = cap
        self.rows = torch.empty(cap, numel, dtype=dtype, device=device)
        self._slot_of: dict[int, int] = {}  # version -> row
        self._order: list[int] = []  # versions, oldest first
        self.evictions = 0

    def push(self, version: int, params: torch.Tensor):
        if version in self._slot_of:
            self.rows[self._slot_of[version]].copy_(params)
            return
        if len(self._order) == self.capacity:
            old = self._order.pop(0)
            slot = self._slot_of.pop(old)
            self.evictions += 1
        else:
            slot = len(self._order)
        self.rows[slot].copy_(params)
        self._slot_of[version] = slot
        self._order.append(version)

    def slot(self, version: int):
        """Row index of ``version`` in ``rows``, or None if it is not stored."""
        return self._slot_of.get(version)

    def __contains__(self, version):
        return version in self._slot_of

    def get(self, version: int) -> torch.Tensor:
        return self.rows[self._slot_of[version]]

    @property
    def versions(self):
        return list(self._order)

    @property
    def nbytes(self) -> int:
        return self.rows.numel() * self.rows.element_size()

    def used_bytes(self) -> int:
        return len(self._order) * self.rows.shape[1] * self.rows.element_size()

    def state_dict(self):
        return {"versions": list(self._order),
                "rows": torch.stack([self.get(v) for v in self._order]) if self._order else self.rows[:0].clone(),
                "evictions": self.evictions}

    def load_state_dict(self, state):
        self._slot_of.clear()
        self._order.clear()
        versions = list(state["versions"])[-self.capacity:]
        rows = state["rows"][-len(versions):] if versions else state["rows"][:0]
        for v, row in zip(versions, rows):
            self.push(int(v), row)
        self.evictions = int(state["evictions"])
