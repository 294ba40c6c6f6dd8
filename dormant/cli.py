"""The `dormant` command: serve, ps, stop, pull, list, profile.

`serve` never imports torch (the gateway starts in under a second; workers import it).
`ps` and `stop` talk to a running server over HTTP, with `DORMANT_API_KEY` as the key.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer

from dormant.config import DEFAULT_PORT, ConfigError, ServerConfig, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])

_URL_HELP = "Server address (default: $DORMANT_URL or http://127.0.0.1:%d)" % DEFAULT_PORT


@app.command()
def serve(
    models: Optional[list[str]] = typer.Argument(None, help="Models to serve: ids from the config, HF repo ids, local folders or .gguf files. Default: the embedded smollm2."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="dormant.yaml"),
    host: Optional[str] = typer.Option(None, help="Bind address (default 127.0.0.1)"),
    port: Optional[int] = typer.Option(None, help=f"Port (default {DEFAULT_PORT})"),
    sleep_after: Optional[str] = typer.Option(None, help="Idle time before a model sleeps: 30s, 5m, 0 (at once), -1 (never)"),
    suspend_after: Optional[str] = typer.Option(None, help="Idle time before an asleep model's GPU state moves to host memory, its process kept (default -1: never)"),
    hibernate_after: Optional[str] = typer.Option(None, help="Idle time before a model's worker exits, keeping its engine image (default 30m)"),
    stop_after: Optional[str] = typer.Option(None, help="Idle time before a model's worker exits and its engine image is deleted (default -1: never)"),
    api_key_file: Optional[Path] = typer.Option(None, help="File with API keys, one per line (also: $DORMANT_API_KEY)"),
    allow_insecure_bind: bool = typer.Option(False, help="Serve a non-loopback address without an API key"),
    store: Optional[Path] = typer.Option(None, help="Store folder (default $DORMANT_HOME or ~/.dormant)"),
    shutdown_grace: Optional[str] = typer.Option(None, help="On SIGTERM, how long requests in flight may finish before they are ended (default 10s)"),
) -> None:
    """Serve the OpenAI API; models start on the first request and sleep when idle."""
    cfg = _load_config(
        config, models=models, host=host, port=port, api_key_file=api_key_file,
        allow_insecure_bind=allow_insecure_bind or None, store=store, shutdown_grace=shutdown_grace,
        model_defaults={"sleep_after": sleep_after, "suspend_after": suspend_after, "hibernate_after": hibernate_after,
                        "stop_after": stop_after},
    )
    from dormant.gateway.server import serve as run_server

    run_server(cfg)


def _load_config(path: Optional[Path], **overrides) -> ServerConfig:
    """The config, checked whole (engines, engine_args, sources) before anything starts; a bad
    one exits 2 with the message that names the key."""
    try:
        return load_config(path, **overrides)
    except ConfigError as exc:
        typer.echo(f"dormant: config error: {exc}", err=True)
        raise typer.Exit(2) from None


def _base_url(url: Optional[str]) -> str:
    return (url or os.environ.get("DORMANT_URL") or f"http://127.0.0.1:{DEFAULT_PORT}").rstrip("/")


def _admin(method: str, url: Optional[str], path: str, **kw) -> dict:
    import httpx

    key = os.environ.get("DORMANT_API_KEY", "").split(",")[0].strip()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        resp = httpx.request(method, _base_url(url) + path, headers=headers, timeout=120, **kw)
    except httpx.HTTPError as exc:
        typer.echo(f"dormant: cannot reach {_base_url(url)}: {exc}", err=True)
        raise typer.Exit(1)
    if resp.status_code >= 400:
        typer.echo(f"dormant: {resp.status_code}: {resp.text}", err=True)
        raise typer.Exit(1)
    return resp.json()


def _human_bytes(n: Optional[int]) -> str:
    if not n:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _until(value: Optional[str]) -> str:
    if not value:
        return "-"
    try:
        delta = datetime.fromisoformat(value).timestamp() - datetime.now().timestamp()
    except ValueError:
        return value
    return "now" if delta <= 0 else f"in {delta:.0f}s" if delta < 120 else f"in {delta / 60:.0f}m"


def _ago(value: Optional[str]) -> str:
    if not value:
        return "-"
    try:
        delta = datetime.now().timestamp() - datetime.fromisoformat(value).timestamp()
    except ValueError:
        return value
    return f"{max(0, delta):.0f}s ago" if delta < 120 else f"{delta / 60:.0f}m ago"


@app.command()
def ps(url: Optional[str] = typer.Option(None, help=_URL_HELP), as_json: bool = typer.Option(False, "--json")) -> None:
    """Show each model replica: state, device, bytes on the GPU / in host RAM / on disk, last use."""
    running = _admin("GET", url, "/running").get("running", [])
    if as_json:
        typer.echo(json.dumps(running, indent=2))
        return
    rows = [("MODEL", "STATE", "DEVICE", "PID", "GPU", "HOST", "DISK", "LAST USED", "IDLE UNTIL")]
    for r in running:
        rows.append((str(r.get("model")), str(r.get("state")), str(r.get("device") or "-"), str(r.get("pid") or "-"),
                     _human_bytes(r.get("gpu_bytes")), _human_bytes(r.get("host_bytes")),
                     _human_bytes(r.get("disk_bytes")), _ago(r.get("last_used")), _until(r.get("idle_until"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


@app.command()
def stop(model: str = typer.Argument(..., help="Model id, or 'all'"), url: Optional[str] = typer.Option(None, help=_URL_HELP)) -> None:
    """Unload a model now: drain its requests and stop its worker."""
    params = {} if model == "all" else {"model": model}
    result = _admin("POST", url, "/unload", params=params)
    typer.echo(json.dumps(result))


@app.command()
def pull(source: str = typer.Argument(..., help="HF repo id (org/name), local folder or .gguf file")) -> None:
    """Download a model into the Hugging Face cache (or import a local one) for serving."""
    from dormant.store.models import pull as pull_model

    try:
        path = pull_model(source)
    except (ValueError, OSError) as exc:
        typer.echo(f"dormant: pull failed: {exc}", err=True)
        raise typer.Exit(1)
    typer.echo(f"{source}: ready at {path}")


@app.command("list")
def list_models(config: Optional[Path] = typer.Option(None, "--config", "-c", help="dormant.yaml")) -> None:
    """List configured models and the models found in the store and the Hugging Face cache."""
    from dormant.store.catalog import local_models

    cfg = _load_config(config)
    typer.echo("configured:")
    for spec in cfg.models:
        alias = f"  (aliases: {', '.join(spec.aliases)})" if spec.aliases else ""
        typer.echo(f"  {spec.id}  {spec.source}  engine={spec.engine}{alias}")
    typer.echo("on disk:")
    for name, path, size in local_models(cfg.store_path()):
        typer.echo(f"  {name}  {_human_bytes(size)}  {path}")


@app.command()
def profile(
    model: str = typer.Argument(..., help="Model source: smollm2, a folder, a .gguf or an HF repo id"),
    engine_args: str = typer.Option("{}", help="JSON object of engine settings (as in dormant.yaml)"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of the table"),
) -> None:
    """Time a full cold start and a restore from the engine image, phase by phase."""
    from dormant.lifecycle.profile import format_table, run_profile

    try:
        args = json.loads(engine_args)
        result = run_profile(model, args if isinstance(args, dict) else {})
    except (ValueError, OSError, RuntimeError) as exc:
        typer.echo(f"dormant: profile failed: {exc}", err=True)
        raise typer.Exit(1)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(f"{model} ({result['model_dir']})")
    typer.echo(format_table({"cold start": result["cold"], "restore (image)": result["restore"]}))


def main() -> None:  # pragma: no cover - `python -m dormant.cli`
    app()


if __name__ == "__main__":
    sys.exit(main())
