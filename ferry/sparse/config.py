"""The sparsity settings of a run."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ferry.errors import SettingError

METHODS = ("griffin", "cats")


@dataclass(frozen=True)
class SparsityConfig:
    sparsity: float = 0.0  # fraction of MLP neurons dropped; 0 is dense
    method: str = "griffin"  # griffin (prompt-fixed rows) or cats (per-token threshold)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.sparsity) and 0 <= self.sparsity < 1):
            raise SettingError("sparsity", f"must be in [0, 1), got {self.sparsity}")
        if self.method not in METHODS:
            raise SettingError("sparse_method", f"must be one of {', '.join(METHODS)}, got {self.method!r}")
