"""A circuit breaker: stop calling a dependency that keeps failing, try again after a pause.

closed (calls go through) -> `failures` consecutive failures -> open (calls fail at once, for
`reset_s`) -> half-open (one trial call; success closes, failure opens again). The gateway
keeps one per dependency (the knowledge store backend), so an outage costs each request
microseconds instead of a timeout, and recovery needs no restart.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class CircuitBreaker:
    failures: int = 3
    reset_s: float = 10.0
    clock: object = field(default=time.monotonic, repr=False)
    _consecutive: int = 0
    _opened_at: float | None = None
    _trial: bool = False  # a half-open trial call is in flight

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return "closed"
        return "half-open" if self.clock() - self._opened_at >= self.reset_s else "open"

    def retry_after_s(self) -> float:
        """Seconds until the next trial call is allowed (0 when calls go through)."""
        if self._opened_at is None:
            return 0.0
        return max(0.0, self.reset_s - (self.clock() - self._opened_at))

    def allow(self) -> bool:
        """Whether to make the call now: always when closed, one trial when half-open."""
        state = self.state
        if state == "closed":
            return True
        if state == "half-open" and not self._trial:
            self._trial = True
            return True
        return False

    def success(self) -> None:
        self._consecutive, self._opened_at, self._trial = 0, None, False

    def failure(self) -> None:
        self._consecutive += 1
        self._trial = False
        if self._opened_at is not None or self._consecutive >= self.failures:
            self._opened_at = self.clock()
