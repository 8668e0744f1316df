"""``role`` filter: P/D roles against the phase being scheduled."""

from __future__ import annotations

import pytest

from scorers.base import Filter, NoParams
from scorers.filter.role import RoleFilter
from tests.helpers.scorers import build, config_error, ctx, eps


def test_params_none():
    f = build(Filter, {"type": "role"})
    assert isinstance(f, RoleFilter) and f.params == NoParams() and f.name == "role"


def test_unknown_params_rejected():
    assert config_error(Filter, {"type": "role", "params": {"phase": "decode"}}) == "role: unknown parameters ['phase']; it takes none"


def test_bad_values_rejected():
    assert config_error(Filter, {"type": "role", "params": "decode"}) == "params of 'role' must be a mapping, got 'decode'"
    with pytest.raises(ValueError, match="role: unknown parameters"):
        RoleFilter(phase="decode")


@pytest.mark.parametrize(
    "phase,kept",
    [("any", ["both", "decode"]), ("prefill", ["prefill", "both"]), ("decode", ["both", "decode"]), ("unheard-of", ["both"])],
)
def test_roles_for_each_phase(phase, kept):
    fleet = eps(3)
    for e, role in zip(fleet, ["prefill", "both", "decode"], strict=True):
        e.role = role
    assert [e.role for e in RoleFilter().filter(ctx(phase=phase), fleet)] == kept


def test_one_hop_falls_back_to_prefill_only_replicas():
    # only prefill-role replicas left: a one-hop request may still use them
    only_prefill = [e for e in eps(2, role="prefill")]
    assert len(RoleFilter().filter(ctx(), only_prefill)) == 2
    assert RoleFilter().filter(ctx(phase="decode"), only_prefill) == []  # a decode hop may not
