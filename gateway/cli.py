"""The ``kvgate`` command: one entry point, one subcommand per program.

Subcommands are the ``kvgate.commands`` entry points of the installed distributions
(``pyproject.toml`` lists ours), loaded only when run: ``kvgate sim`` does not load the gateway,
and the gateway package never imports the simulator or the benchmarks that ``demo``, ``sim``
and ``bench`` live in. A separately installed package can add its own command the same way.
"""

from __future__ import annotations

import sys
from importlib.metadata import EntryPoint, entry_points

GROUP = "kvgate.commands"

#: one-line help for the commands this distribution ships (others show their module's name)
HELP: dict[str, str] = {
    "serve": "run the gateway (OpenAI-compatible HTTP)",
    "demo": "gateway + simulated fleet + a sample workload",
    "sim": "run simulated vLLM replica(s)",
    "indexer": "consume KV events into a shared Redis index",
    "extproc": "Envoy ext_proc endpoint picker (gRPC)",
    "sidecar": "prefill→decode proxy in the decode pod (behind Envoy + picker)",
    "bench": "compare routing policies on a simulated fleet",
}


def commands() -> dict[str, EntryPoint]:
    """Every installed ``kvgate`` subcommand by name."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def _usage(found: dict[str, EntryPoint]) -> str:
    lines = ["usage: kvgate <command> [options]", "", "commands:"]
    order = [n for n in HELP if n in found] + sorted(set(found) - set(HELP))
    lines += [f"  {name:<9} {HELP.get(name, found[name].module)}" for name in order]
    if not found:
        lines.append("  (none installed: reinstall kvgate, e.g. `pip install -e .`)")
    lines.append("\n`kvgate <command> --help` for a command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    found = commands()
    if not args or args[0] in ("-h", "--help"):
        print(_usage(found))
        return 0
    name, rest = args[0], args[1:]
    if name not in found:
        print(f"kvgate: unknown command {name!r}\n\n{_usage(found)}", file=sys.stderr)
        return 2
    return int(found[name].load()(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
