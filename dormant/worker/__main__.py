"""`python -m dormant.worker --source SOURCE --model-id ID --port P [--engine native --engine-args JSON]`"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import signal
import sys
import time


def set_pdeathsig() -> None:
    """Die with the parent (the gateway): a second guard beside the gateway's own."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except OSError:
        pass


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dormant.worker")
    p.add_argument("--source", required=True, help="model source: builtin:smollm2, a folder, a .gguf, org/name")
    p.add_argument("--model-id", required=True)
    p.add_argument("--served-model-name", action="append", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--engine", default="native")
    p.add_argument("--engine-args", default="{}", help="JSON object of engine settings")
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    set_pdeathsig()
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"[worker {args.model_id}] %(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    log = logging.getLogger("dormant.worker")
    try:
        engine_args = json.loads(args.engine_args)
        if not isinstance(engine_args, dict):
            raise ValueError("must be a JSON object")
    except ValueError as e:
        log.error("--engine-args: %s", e)
        return 2

    from dormant.engines import create_engine
    from dormant.store.models import ModelNotFound, materialize

    started = time.perf_counter()
    try:
        model_dir = materialize(args.source)
    except ModelNotFound as e:
        log.error("%s", e)
        return 2
    try:
        engine, tokenizer, max_model_len = create_engine(args.engine, model_dir, engine_args)
    except ValueError as e:
        log.error("%s", e)
        return 2
    log.info("loaded %s from %s in %.2f s", args.model_id, model_dir, time.perf_counter() - started)

    import uvicorn

    from dormant.worker.server import WorkerState, build_app

    names = args.served_model_name or [args.model_id]
    app = build_app(WorkerState(engine, tokenizer, names, max_model_len))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
