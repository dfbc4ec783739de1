"""ROS-free flow control used by the nodes: newest-frame-wins slot, approximate time sync
of image + camera_info, throttled error reporting with counters."""
from __future__ import annotations

import threading
import time
from collections import Counter, deque
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class LatestSlot(Generic[T]):
    """A depth-1 mailbox: ``put`` replaces an unread item (counted as a drop); ``take``
    blocks until an item is there or ``timeout`` passes. Never grows under load."""

    def __init__(self, notify: threading.Event | None = None) -> None:
        self._item: T | None = None
        self._cond = threading.Condition()
        self._notify = notify
        self.dropped = 0
        self.received = 0
        self._closed = False

    def put(self, item: T) -> None:
        with self._cond:
            if self._item is not None:
                self.dropped += 1
            self._item = item
            self.received += 1
            self._cond.notify()
        if self._notify is not None:
            self._notify.set()

    def take(self, timeout: float | None = None) -> T | None:
        with self._cond:
            if self._item is None and not self._closed and timeout != 0:
                self._cond.wait(timeout)
            item, self._item = self._item, None
            return item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class ApproximateSync:
    """Pairs images with camera_infos whose stamps differ by at most ``slop_ns``.

    Keeps the last ``depth`` unmatched messages of each kind. ``on_pair(image, info)`` is
    called once per image that found its camera_info, in arrival order. Images older than
    ``depth`` still unmatched are counted in ``unmatched_images`` (a missing camera_info)."""

    def __init__(self, on_pair: Callable[[Any, Any], None], slop_ns: int = 20_000_000,
                 depth: int = 10, stamp: Callable[[Any], int] | None = None) -> None:
        self.on_pair = on_pair
        self.slop_ns = slop_ns
        self._images: deque[Any] = deque()
        self._infos: deque[Any] = deque(maxlen=depth)
        self._depth = depth
        self._stamp = stamp or (lambda m: int(m.header.stamp.sec) * 1_000_000_000
                                + int(m.header.stamp.nanosec))
        self._lock = threading.Lock()
        self.unmatched_images = 0
        self.last_info_time: float | None = None
        self.images_since_info = 0  # images received since the last camera_info

    def add_image(self, msg: Any) -> None:
        with self._lock:
            self.images_since_info += 1
            info = self._match(self._stamp(msg), self._infos)
            if info is None:
                self._images.append(msg)
                while len(self._images) > self._depth:
                    self._images.popleft()
                    self.unmatched_images += 1
                return
        self.on_pair(msg, info)

    def add_info(self, msg: Any) -> None:
        self.last_info_time = time.monotonic()
        pairs = []
        with self._lock:
            self.images_since_info = 0
            self._infos.append(msg)
            ts = self._stamp(msg)
            keep = deque()
            for img in self._images:
                if abs(self._stamp(img) - ts) <= self.slop_ns:
                    pairs.append(img)
                else:
                    keep.append(img)
            self._images = keep
        for img in pairs:
            self.on_pair(img, msg)

    @property
    def pending_images(self) -> int:
        return len(self._images)

    def _match(self, ts: int, infos: deque[Any]) -> Any:
        best, best_dt = None, None
        for info in infos:
            dt = abs(self._stamp(info) - ts)
            if dt <= self.slop_ns and (best_dt is None or dt < best_dt):
                best, best_dt = info, dt
        return best


class StampMatcher:
    """Pairs each primary item (an image) with the secondary message (a depth image) nearest
    in stamp within ``slop_ns``, waiting for a secondary that may still come.

    ``on_match(item, secondary_or_None)`` is called in primary order: as soon as a secondary
    with the very same stamp is there, or once a secondary newer than ``stamp + slop_ns`` has
    arrived (nothing closer can come), or when more than ``max_pending`` primaries wait, or
    (live) when no secondary arrived for ``stale_s`` seconds — then primaries pass at once
    with the best match there is (None when none), so a dead secondary stream never stalls
    the primary one; live, a primary also goes once it waited ``max_wait_s`` (call
    :meth:`poll` periodically). :meth:`flush` emits everything still waiting (end of a bag)."""

    def __init__(self, on_match: Callable[[Any, Any], None], slop_ns: int = 20_000_000,
                 max_pending: int = 3, depth: int = 10, stale_s: float | None = 1.0,
                 stamp: Callable[[Any], int] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 max_wait_s: float | None = None) -> None:
        self.on_match = on_match
        self.max_wait_s = max_wait_s
        self.slop_ns = slop_ns
        self.max_pending = max_pending
        self.stale_s = stale_s
        self._stamp = stamp or (lambda m: int(m.header.stamp.sec) * 1_000_000_000
                                + int(m.header.stamp.nanosec))
        self._clock = clock
        self._pending: deque[tuple[int, Any, float]] = deque()
        self._secondary: deque[Any] = deque(maxlen=depth)
        self._last_secondary: float | None = None
        self._lock = threading.Lock()
        self.unmatched = 0  # primaries emitted without a secondary

    def add_primary(self, item: Any, stamp_ns: int) -> None:
        with self._lock:
            self._pending.append((int(stamp_ns), item, self._clock()))
            out = self._ready()
        self._emit(out)

    def poll(self) -> None:
        """Emit what has waited long enough (live: call it from a timer or worker loop)."""
        with self._lock:
            out = self._ready()
        self._emit(out)

    def add_secondary(self, msg: Any) -> None:
        with self._lock:
            self._secondary.append(msg)
            self._last_secondary = self._clock()
            out = self._ready()
        self._emit(out)

    def flush(self) -> None:
        with self._lock:
            out = [(item, self._best(ts)) for ts, item, _ in self._pending]
            self._pending.clear()
        self._emit(out)

    def _best(self, ts: int) -> Any:
        best, best_dt = None, None
        for msg in self._secondary:
            dt = abs(self._stamp(msg) - ts)
            if dt <= self.slop_ns and (best_dt is None or dt < best_dt):
                best, best_dt = msg, dt
        return best

    def _ready(self) -> list[tuple[Any, Any]]:
        out = []
        newest = max((self._stamp(m) for m in self._secondary), default=None)
        stale = (self.stale_s is not None and (self._last_secondary is None or
                 self._clock() - self._last_secondary > self.stale_s))
        now = self._clock()
        while self._pending:
            ts, item, t_in = self._pending[0]
            best = self._best(ts)
            exact = best is not None and self._stamp(best) == ts
            passed = newest is not None and newest > ts + self.slop_ns
            waited = self.max_wait_s is not None and now - t_in >= self.max_wait_s
            if not (exact or passed or stale or waited or len(self._pending) > self.max_pending):
                break
            self._pending.popleft()
            out.append((item, best))
        return out

    def _emit(self, pairs: list[tuple[Any, Any]]) -> None:
        for item, secondary in pairs:
            if secondary is None:
                self.unmatched += 1
            self.on_match(item, secondary)


class ErrorReporter:
    """One clear error line per (field) at most every ``period`` seconds; every occurrence is
    counted (the counts go to /diagnostics)."""

    def __init__(self, log: Callable[[str], None], period: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = log
        self._period = period
        self._clock = clock
        self._last: dict[str, float] = {}
        self.counts: Counter[str] = Counter()

    def report(self, key: str, message: str) -> bool:
        """Count the error under ``key``; log ``message`` unless logged within the period.
        Returns whether it was logged."""
        self.counts[key] += 1
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._period:
            return False
        self._last[key] = now
        suffix = f" ({self.counts[key]} so far)" if self.counts[key] > 1 else ""
        self._log(message + suffix)
        return True


_FIELD_RE = None


def error_key(exc: BaseException) -> str:
    """A stable key for an error: the message field it names ('image.step',
    'camera_info.k', 'header.stamp' …) when there is one, else the exception type."""
    import re

    global _FIELD_RE
    if _FIELD_RE is None:
        _FIELD_RE = re.compile(r"\b((?:image|camera_info|header)(?:\.[a-z_]+)+)")
    m = _FIELD_RE.search(str(exc))
    return m.group(1) if m else type(exc).__name__
