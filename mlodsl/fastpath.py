"""The on/off state shared by mlodsl's faster routes to public torch functions
(:mod:`mlodsl.autodiff`, :mod:`mlodsl.batching`)."""

from __future__ import annotations

import os
from collections.abc import Callable


class FastPath:
    """A faster route to a public torch function: used while torch has what it needs, the
    environment variable ``env`` is not set to switch it off, and ``agrees()`` (run once, on
    first use) confirms it gives what the public function gives.

    Args:
        available: Whether this torch has the entry points the route calls.
        env: The environment variable that turns the route off (``MLODSL_PUBLIC_...=1``).
        agrees: The one-off check against the public function.
    """

    def __init__(self, available: bool, env: str, agrees: Callable[[], bool]) -> None:
        self._available = available
        self._agrees = agrees
        self.enabled = available and os.environ.get(env, "") in ("", "0")
        self.checked = False

    def use(self, enabled: bool) -> bool:
        """Turn the route on (subject to a fresh check) or off; returns the previous setting."""
        previous = self.enabled
        self.enabled, self.checked = bool(enabled) and self._available, False
        return previous

    def in_use(self) -> bool:
        """Whether the route is taken (running the one-off check if it has not run)."""
        if self.enabled and not self.checked:
            self.enabled, self.checked = self._agrees(), True
        return self.enabled
