"""Bounded concurrency, a request rate and retry with back-off for the HTTP judge.

An experiment judges many answers at once (the paper ran about 50 requests in flight at about
3 per second). One :class:`Throttle` per endpoint, shared by every thread of the process, keeps
at most ``max_in_flight`` requests open and starts at most ``rate_per_s`` a second;
:func:`with_retries` retries what a server may answer differently a moment later (429, 5xx,
a dropped connection) with exponential back-off and jitter, and gives up at once on the rest.
The clock and the sleep are parameters so the maths is tested without waiting.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Callable, TypeVar

T = TypeVar("T")


class Retryable(Exception):
    """Raised by a request that may succeed if tried again (carries the final error to raise)."""

    def __init__(self, error: Exception, retry_after: float | None = None):
        super().__init__(str(error))
        self.error, self.retry_after = error, retry_after


class Throttle:
    def __init__(self, max_in_flight: int = 50, rate_per_s: float = 3.0,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        if max_in_flight < 1 or not rate_per_s > 0:
            raise ValueError("max_in_flight must be >= 1 and rate_per_s > 0")
        self.max_in_flight, self.rate_per_s = int(max_in_flight), float(rate_per_s)
        self._slots = threading.BoundedSemaphore(self.max_in_flight)
        self._lock = threading.Lock()
        self._next_start = 0.0
        self._clock, self._sleep = clock, sleep
        self.in_flight = 0
        self.peak_in_flight = 0

    def _wait_turn(self) -> None:
        """Space request starts 1/rate apart (a token bucket of one)."""
        with self._lock:
            now = self._clock()
            start = max(now, self._next_start)
            self._next_start = start + 1.0 / self.rate_per_s
        if start > now:
            self._sleep(start - now)

    def __enter__(self) -> "Throttle":
        self._slots.acquire()
        with self._lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            self._wait_turn()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            self.in_flight -= 1
        self._slots.release()


def backoff_delays(retries: int, base_s: float, cap_s: float = 30.0, rng: random.Random | None = None) -> list[float]:
    """The waits before each retry: base * 2**k, capped, with +-25 % jitter (so clients spread)."""
    rng = rng or random.Random()
    return [min(cap_s, base_s * 2 ** k) * (0.75 + 0.5 * rng.random()) for k in range(retries)]


def with_retries(request: Callable[[], T], throttle: Throttle | None, retries: int = 4, base_s: float = 1.0,
                 sleep: Callable[[float], None] = time.sleep, rng: random.Random | None = None) -> T:
    """``request()`` inside the throttle; a :class:`Retryable` failure is retried after the
    back-off (or the server's Retry-After, if longer); the last one raises its error."""
    delays = backoff_delays(retries, base_s, rng=rng)
    for attempt in range(retries + 1):
        try:
            if throttle is None:
                return request()
            with throttle:
                return request()
        except Retryable as exc:
            if attempt == retries:
                raise exc.error from None
            sleep(max(delays[attempt], exc.retry_after or 0.0))
    raise AssertionError("unreachable")


_THROTTLES: dict[tuple, Throttle] = {}
_THROTTLES_LOCK = threading.Lock()


def throttle_for(endpoint: str, max_in_flight: int, rate_per_s: float) -> Throttle:
    """The process-wide throttle of one endpoint and limits (shared by every judge thread)."""
    key = (endpoint, int(max_in_flight), float(rate_per_s))
    with _THROTTLES_LOCK:
        if key not in _THROTTLES:
            _THROTTLES[key] = Throttle(max_in_flight, rate_per_s)
        return _THROTTLES[key]
