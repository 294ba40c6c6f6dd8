"""`python -m dormant.gateway ARGS` is `dormant serve ARGS`: the same command, flags and checks.

The tests and bench/bench_gateway_start.py start gateways this way (no console script needed);
users run `dormant serve`. An entry point, not part of the gateway: nothing imports it.
"""

from __future__ import annotations

import sys

import typer

from dormant.cli import app


def main(argv: list[str] | None = None) -> int:
    serve = typer.main.get_command(app).get_command(None, "serve")  # a click Group's lookup by name
    return serve.main(sys.argv[1:] if argv is None else argv, prog_name="python -m dormant.gateway")


if __name__ == "__main__":
    sys.exit(main())
