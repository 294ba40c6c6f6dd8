"""`python -m dormant.gateway [--config FILE] [--host H] [--port P] [MODEL ...]`: serve without the CLI.

The tests start gateways this way; users run `dormant serve`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dormant.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dormant.gateway")
    parser.add_argument("models", nargs="*")
    parser.add_argument("--config", type=Path)
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--api-key-file", type=Path)
    parser.add_argument("--allow-insecure-bind", action="store_true", default=None)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, models=args.models, host=args.host, port=args.port,
                          api_key_file=args.api_key_file, allow_insecure_bind=args.allow_insecure_bind)
    except ConfigError as exc:
        print(f"dormant: config error: {exc}", file=sys.stderr)
        return 2
    from dormant.gateway.server import serve

    serve(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
