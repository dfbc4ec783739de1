"""StampMatcher: frames paired with the depth image nearest in stamp, never stalled."""
from __future__ import annotations

from types import SimpleNamespace as NS

import pytest

from perception2d_ros.pipeline.flow import StampMatcher

MS = 1_000_000


def _msg(ms: int):
    return NS(header=NS(stamp=NS(sec=0, nanosec=ms * MS)), ms=ms)


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _matcher(**kw):
    out: list = []
    clock = _Clock()
    m = StampMatcher(lambda item, sec: out.append((item, None if sec is None else sec.ms)),
                     slop_ns=20 * MS, clock=clock, **kw)
    return m, out, clock


def test_exact_stamp_matches_at_once_in_either_order():
    m, out, _ = _matcher()
    m.add_secondary(_msg(100))
    m.add_primary("a", 100 * MS)
    m.add_primary("b", 200 * MS)
    assert out == [("a", 100)]
    m.add_secondary(_msg(200))
    assert out == [("a", 100), ("b", 200)]


def test_nearest_within_slop_waits_until_nothing_closer_can_come():
    m, out, _ = _matcher()
    m.add_secondary(_msg(95))
    m.add_primary("a", 100 * MS)
    assert out == []                   # a closer depth (up to 120 ms) may still come
    m.add_secondary(_msg(104))
    assert out == []
    m.add_secondary(_msg(130))         # past 100 + slop: decide with the best one seen
    assert out == [("a", 104)]


def test_no_depth_within_slop_gives_none_and_counts():
    m, out, _ = _matcher()
    m.add_primary("a", 100 * MS)
    m.add_secondary(_msg(300))
    assert out == [("a", None)] and m.unmatched == 1


def test_never_stalls_on_a_dead_depth_stream():
    m, out, clock = _matcher(max_pending=2)
    m.add_secondary(_msg(0))
    for i, ts in enumerate((100, 200, 300)):
        m.add_primary(i, ts * MS)
    assert out == [(0, None)]          # more than max_pending waiting: the oldest goes
    clock.t = 5.0                      # no depth for longer than stale_s: pass at once
    m.add_primary(3, 400 * MS)
    assert [i for i, _ in out] == [0, 1, 2, 3]


def test_flush_emits_the_rest_in_order():
    m, out, _ = _matcher(stale_s=None, max_pending=100)
    m.add_secondary(_msg(10))
    m.add_primary("a", 12 * MS)
    m.add_primary("b", 500 * MS)
    assert out == []
    m.flush()
    assert out == [("a", 10), ("b", None)]


@pytest.mark.parametrize("stale", [None, 1.0])
def test_before_any_depth(stale):
    m, out, _ = _matcher(stale_s=stale, max_pending=5)
    m.add_primary("a", 1 * MS)
    # live (stale_s set): no depth ever seen passes straight through; offline waits
    assert out == ([("a", None)] if stale else [])


def test_live_max_wait_releases_with_the_best_match_on_poll():
    m, out, clock = _matcher(max_wait_s=0.05)
    m.add_secondary(_msg(103))
    m.add_primary("a", 100 * MS)
    m.poll()
    assert out == []
    clock.t = 0.06
    m.poll()
    assert out == [("a", 103)]
