"""Per-level numeric precision: autocast for bf16/fp16, dynamic loss scaling for fp16."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """How one level computes: ``"fp32"``, ``"bf16"`` (autocast) or ``"fp16"`` (autocast with a
    dynamic loss scaler). Parameters stay in their own dtype (fp32 master weights); autocast
    only lowers the precision of the operations inside the level's function.

    Attributes:
        mode: The precision name.
        scaler: A ``torch.amp.GradScaler`` for fp16, else ``None``.
    """

    def __init__(self, mode: str, device_type: str) -> None:
        self.mode = mode
        self.device_type = device_type
        self.dtype = _DTYPES.get(mode)
        self.scaler = torch.amp.GradScaler(device_type) if mode == "fp16" else None

    def autocast(self) -> Any:
        """A context in which the level's function runs."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def state_dict(self) -> dict[str, Any]:
        """The scaler's state (empty without one)."""
        return {} if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the scaler's state."""
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
