"""``role`` filter: keeps replicas whose P/D role fits the phase being scheduled."""

from __future__ import annotations

from collections.abc import Mapping

from scorers.base import PHASE_ANY, PHASE_DECODE, PHASE_PREFILL, ROLE_BOTH, ROLE_DECODE, ROLE_PREFILL, EndpointState, Filter, RequestContext

#: phase being scheduled → replica roles that may take it
ROLES_FOR_PHASE: Mapping[str, tuple[str, ...]] = {
    PHASE_ANY: (ROLE_BOTH, ROLE_DECODE),
    PHASE_PREFILL: (ROLE_PREFILL, ROLE_BOTH),
    PHASE_DECODE: (ROLE_DECODE, ROLE_BOTH),
}


class RoleFilter(Filter):
    """Keeps replicas whose P/D role fits the phase being scheduled (no parameters)."""

    type_name = "role"

    def filter(self, ctx: RequestContext, endpoints: list[EndpointState]) -> list[EndpointState]:
        roles = ROLES_FOR_PHASE.get(ctx.phase, (ROLE_BOTH,))
        kept = [e for e in endpoints if e.role in roles]
        if not kept and ctx.phase == PHASE_ANY:
            return list(endpoints)  # only prefill-role replicas: any vLLM replica can still serve
        return kept
