"""`python -m dormant.store import SOURCE` materializes a source and prints its folder."""

from __future__ import annotations

import argparse
import sys

from dormant.store.models import SourceNotFound, list_models, pull


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dormant.store")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("import", "pull"):
        p = sub.add_parser(name, help="materialize a model source into a local folder")
        p.add_argument("source")
    sub.add_parser("list", help="list imported models")
    args = parser.parse_args(argv)
    if args.command == "list":
        print("\n".join(list_models()))
        return 0
    try:
        print(pull(args.source))
    except SourceNotFound as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
