"""Helpers shared by plugins: normalisations, the queue estimate, the seeded picker base."""

from __future__ import annotations

import pytest

from kvindex.index import PrefixMatch
from scorers.common import est_queue_s, relative_inverse, smoothed_inverse
from tests.helpers.scorers import ctx, eps


def test_relative_inverse_spans_zero_to_one():
    assert relative_inverse({}) == {}
    assert relative_inverse({"a": 2.0, "b": 2.0}) == {"a": 1.0, "b": 1.0}
    assert relative_inverse({"a": 0.0, "b": 5.0, "c": 10.0}) == {"a": 1.0, "b": 0.5, "c": 0.0}


def test_smoothed_inverse_scales_differences_by_a_typical_load():
    assert smoothed_inverse({}, 4.0) == {}
    assert smoothed_inverse({"a": 0.0, "b": 4.0}, 4.0) == {"a": 1.0, "b": 0.5}
    assert smoothed_inverse({"a": 100.0, "b": 104.0}, 4.0) == {"a": 1.0, "b": pytest.approx(104 / 108)}


def test_est_queue_s_counts_queued_and_own_uncached_tokens():
    e = eps(1, prefill_tokens_per_s=1000.0)[0]
    e.inflight_prefill_tokens = 500
    assert est_queue_s(ctx(), e) == pytest.approx(0.66)  # (500 + 160) / 1000
    assert est_queue_s(ctx(prefix={"e0": PrefixMatch(10, "GPU")}), e) == pytest.approx(0.5)
    e.prefill_tokens_per_s = 0.0  # unknown rate: 1 token/s, no division by zero
    assert est_queue_s(ctx(prefix={"e0": PrefixMatch(10, "GPU")}), e) == 500.0
