"""``session`` scorer: stick to the replica that served the session last."""

from __future__ import annotations

import pytest

from scorers.base import Scorer
from scorers.scorer.session import SessionScorer
from tests.helpers.scorers import build, config_error, ctx, eps


def test_param_defaults():
    sc = build(Scorer, {"type": "session", "weight": 0.5})
    assert isinstance(sc, SessionScorer) and sc.params == SessionScorer.Params(max_sessions=100_000)


def test_unknown_params_rejected():
    assert config_error(Scorer, {"type": "session", "ttl_s": 60}) == "session: unknown parameters ['ttl_s']; known: max_sessions"


@pytest.mark.parametrize(
    "params,message",
    [
        ({"max_sessions": 0}, "parameter 'max_sessions': expected `int` >= 1, got 0"),
        ({"max_sessions": 1.5}, "parameter 'max_sessions': expected `int`, got 1.5"),
    ],
)
def test_bad_values_rejected(params, message):
    assert config_error(Scorer, {"type": "session", "params": params}) == f"session: {message}"


def test_session_affinity():
    sc = SessionScorer(max_sessions=2)
    fleet = eps(3)
    sc.on_dispatch(ctx(session_id="a"), fleet[2])
    assert sc.score(ctx(session_id="a"), fleet) == {"e0": 0.0, "e1": 0.0, "e2": 1.0}
    sc.on_dispatch(ctx(session_id="b"), fleet[0])
    sc.on_dispatch(ctx(session_id="c"), fleet[0])
    assert sc.score(ctx(session_id="a"), fleet)["e2"] == 0.0  # evicted: bounded


def test_no_session_and_prefill_hops_do_not_count():
    sc = SessionScorer()
    fleet = eps(2)
    sc.on_dispatch(ctx(), fleet[0])
    assert sc.score(ctx(), fleet) == {"e0": 0.0, "e1": 0.0}
    sc.on_dispatch(ctx(session_id="a", phase="prefill"), fleet[0])  # the decode replica is the session's home
    sc.on_dispatch(ctx(session_id="a", phase="decode"), fleet[1])
    assert sc.score(ctx(session_id="a"), fleet) == {"e0": 0.0, "e1": 1.0}
    sc.on_dispatch(ctx(session_id="a"), fleet[0])  # moved
    assert sc.score(ctx(session_id="a"), fleet) == {"e0": 1.0, "e1": 0.0}
