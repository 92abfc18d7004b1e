"""How long a `batch --server` question may wait, from the speeds of the answers already given (no server here)."""

from __future__ import annotations

import pytest

from medgemma_cli.batch.pace import Pace, Size, request_size


def test_before_any_answer_only_the_timeout_applies():
    pace = Pace(floor_s=0.01)
    limit = pace.limit(Size(1, 300, 64), timeout=600.0)
    assert pace.expected(Size(1, 300, 64)) is None
    assert limit.seconds == 600.0 and not limit.bounded


def test_each_part_scales_with_what_the_request_asks():
    """Without the server's own split, each part of an answer is given its whole wall time: speeds that are at
    least the server's. A request twice the prompt and twice the answer is expected to take twice as long."""
    pace = Pace()
    pace.record(Size(1, 1000, 200), completion_tokens=100, seconds=2.0)  # ≥ 500 prompt tok/s, ≥ 50 tok/s written
    assert pace.expected(Size(1, 1000, 100)) == pytest.approx(2.0 + 2.0)
    assert pace.expected(Size(2, 2000, 200)) == pytest.approx(4.0 + 4.0)


def test_the_servers_split_of_its_time_is_used():
    """llama.cpp's timings say how much went on the prompt: the wall time is split alike (the HTTP and any queueing
    with it), which gives tighter speeds."""
    pace = Pace()
    pace.record(Size(1, 1000, 200), completion_tokens=100, seconds=2.0, server_split=(300.0, 100.0))
    # 1.5 s on 1000 prompt tokens, 0.5 s on 100 written: a request twice as large takes twice the 2 s
    assert pace.expected(Size(2, 2000, 200)) == pytest.approx(4.0)
    pace.record(Size(1, 1000, 200), completion_tokens=0, seconds=1.0, server_split=(0.0, 0.0))  # nothing to split
    # 1000 prompt tokens in 1 s is faster than before; the writing speed stays the first answer's (200 tokens/s)
    assert pace.expected(Size(2, 2000, 200)) == pytest.approx(2.0 + 1.0)


def test_the_fastest_speeds_are_kept():
    """A slow answer (it queued behind others) does not slow the estimate down: waiting is the margin's part."""
    pace = Pace()
    pace.record(Size(1, 1000, 100), completion_tokens=100, seconds=1.0)
    pace.record(Size(1, 1000, 100), completion_tokens=100, seconds=9.0)
    assert pace.expected(Size(1, 1000, 100)) == pytest.approx(2.0) and pace.answers == 2


def test_an_answer_that_says_nothing_of_its_length_leaves_the_timeout():
    pace = Pace()
    pace.record(Size(1, 1000, 100), completion_tokens=0, seconds=1.0)
    assert pace.expected(Size(1, 1000, 100)) is None and not pace.limit(Size(1, 1000, 100), 600.0).bounded


def test_the_limit_has_a_margin_a_floor_sharing_and_the_timeout_above_it():
    pace = Pace(sharing=3, safety=4.0, floor_s=30.0)
    pace.record(Size(1, 1000, 100), completion_tokens=100, seconds=5.0)
    size = Size(1, 1000, 100)  # expected: 10 s
    assert pace.limit(size, 600.0).seconds == pytest.approx(4 * 3 * 10.0)
    assert pace.limit(size, 600.0, stretch=2.0).seconds == pytest.approx(240.0)
    assert pace.limit(size, 100.0).seconds == 100.0 and not pace.limit(size, 100.0).bounded
    small = Size(0, 10, 1)
    assert pace.limit(small, 600.0).seconds == 30.0 and pace.limit(small, 600.0).bounded


def test_request_size_counts_images_and_text():
    assert request_size(2, 400, 64, image_tokens=256) == Size(2, 2 * 256 + 100 + 1, 64)
