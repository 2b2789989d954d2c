"""The circuit breaker the gateway keeps in front of the knowledge store backend (serving/circuit.py);
end to end, with a hung and a killed Milvus, in tests/reliability/test_faults.py."""

from __future__ import annotations

from serving.circuit import CircuitBreaker


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_consecutive_failures_and_lets_one_trial_through_after_the_pause():
    clock = Clock()
    breaker = CircuitBreaker(failures=3, reset_s=10, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.failure()
    assert breaker.state == "closed"
    breaker.success()  # a success in between resets the count
    for _ in range(3):
        assert breaker.allow()
        breaker.failure()
    assert breaker.state == "open" and not breaker.allow() and breaker.retry_after_s() == 10
    clock.now += 9.5
    assert not breaker.allow() and breaker.retry_after_s() == 0.5
    clock.now += 0.5
    assert breaker.state == "half-open" and breaker.allow()
    assert not breaker.allow()  # one trial at a time
    breaker.failure()  # the trial failed: open for another pause
    assert breaker.state == "open" and breaker.retry_after_s() == 10
    clock.now += 10
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed" and breaker.allow() and breaker.retry_after_s() == 0
