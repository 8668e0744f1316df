"""``token-load`` scorer: uncached prompt tokens in flight plus this request's own."""

from __future__ import annotations

from kvindex.index import PrefixMatch
from scorers.base import NoParams, Scorer
from scorers.scorer.token_load import TokenLoadScorer
from tests.helpers.scorers import build, config_error, ctx, eps


def test_params_none():
    sc = build(Scorer, "token-load")
    assert isinstance(sc, TokenLoadScorer) and sc.params == NoParams()


def test_unknown_params_rejected():
    assert config_error(Scorer, {"type": "token-load", "params": {"tokens_scale": 1}}) == "token-load: unknown parameters ['tokens_scale']; it takes none"


def test_bad_values_rejected():
    assert config_error(Scorer, {"type": "token-load", "params": "x"}) == "params of 'token-load' must be a mapping, got 'x'"


def test_counts_queued_and_own_uncached_tokens():
    fleet = eps(3)
    fleet[1].inflight_prefill_tokens = 32
    # e0: 0 queued + 160 uncached, e1: 32 + 0 (fully cached), e2: 0 + (160 - 64)
    c = ctx(prefix={"e1": PrefixMatch(10, "GPU"), "e2": PrefixMatch(4, "CPU")})
    assert TokenLoadScorer().score(c, fleet) == {"e0": 0.0, "e1": 1.0, "e2": 0.5}
    assert TokenLoadScorer().score(ctx(), eps(2)) == {"e0": 1.0, "e1": 1.0}
