"""benchmarks.envoy_stack's Envoy binds its listener and admin on port 0 and learns them back
(``--admin-address-path``, then the admin API), so a port cannot be taken between choosing and
binding it: while ``squatting()`` is on, every port probed with a port-0 socket here is taken
by another socket the moment the probe lets it go."""

from __future__ import annotations

import httpx
import pytest

from benchmarks.envoy_stack import extproc_envoy, static_envoy
from tests.helpers.envoy import envoy_binary
from tests.helpers.sim import MODEL
from tests.helpers.squat import squatting

pytestmark = pytest.mark.envoy


def test_envoys_bind_port_0_and_report_their_ports(tmp_path):
    from simulator.fleet import SimConfig, SimFleet

    binary = envoy_binary()
    fleet = SimFleet([SimConfig(model=MODEL, time_scale=0.0, kv_events=False)])
    fleet.start()
    envoys = []
    try:
        with squatting() as squat:
            envoys.append(static_envoy(tmp_path, "127.0.0.1", fleet.handles[0].config.port, binary).start())
            envoys.append(extproc_envoy(tmp_path, 9, binary).start())  # (no picker: only its ports matter)
        for e in envoys:
            assert e.listen_port and e.admin_port and {e.listen_port, e.admin_port}.isdisjoint(squat.ports)
            assert e.listener_ports() == [e.listen_port]
            assert httpx.get(f"http://127.0.0.1:{e.admin_port}/ready", timeout=5).status_code == 200
        # the static one proxies to the replica: the listener really is this Envoy's
        r = httpx.get(f"{envoys[0].url}/v1/models", timeout=10)
        assert r.status_code == 200 and r.json()["data"][0]["id"] == MODEL
    finally:
        for e in envoys:
            e.stop()
        fleet.stop()
