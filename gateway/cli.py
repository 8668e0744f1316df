"""The ``kvgate`` command: one entry point, one subcommand per program.

Subcommands import their module lazily so ``kvgate sim`` does not load the gateway and the
other way round.
"""

from __future__ import annotations

import importlib
import sys

#: subcommand -> (module, function taking argv and returning an exit code, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "serve": ("gateway.server", "main", "run the gateway (OpenAI-compatible HTTP)"),
    "demo": ("gateway.demo", "main", "gateway + simulated fleet + a sample workload"),
    "sim": ("simulator.cli", "main", "run simulated vLLM replica(s)"),
    "indexer": ("gateway.indexer", "main", "consume KV events into a shared Redis index"),
    "extproc": ("gateway.extproc", "main", "Envoy ext_proc endpoint picker (gRPC)"),
    "bench": ("benchmarks.compare", "main", "compare routing policies on a simulated fleet"),
}


def _usage() -> str:
    lines = ["usage: kvgate <command> [options]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, _, help_) in SUBCOMMANDS.items()]
    lines.append("\n`kvgate <command> --help` for a command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"kvgate: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name, _ = SUBCOMMANDS[name]
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
