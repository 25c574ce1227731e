"""`ferry serve`: load the model once, then answer OpenAI-compatible HTTP requests.

The port is bound before the model loads, so a taken port fails in a second rather than after
minutes of loading; the model loads on the thread that will run every generation, and the URL
is printed once it is in. Without --ctx the plan reserves its default context (min(4096, the
model's maximum)), since requests of any length may come.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path
from typing import Any

from ferry.cli.flags import add_flags, config_options
from ferry.cli.generate import ENGINE_FLAGS
from ferry.engine import Engine, FerryConfig
from ferry.errors import FerryError

# Sampling flags set the defaults of requests that leave those fields out.
SERVE_FLAGS = ("temperature", "top_p", "seed", "host", "port", "max_queue", "api_key", "model_name")


def add_parser(sub: Any) -> None:
    serve = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                           description="Load the model once and answer /v1/chat/completions, /v1/completions "
                                       "(streamed or not), /v1/models and /health. Requests run one at a "
                                       "time, in arrival order; --temperature, --top-p and --seed set the "
                                       "defaults of requests that leave them out.")
    add_flags(serve, *ENGINE_FLAGS, *SERVE_FLAGS)
    serve.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    import uvicorn

    from ferry.server import Worker, build_app, listen

    config = FerryConfig.from_options(**config_options(args))
    key = args.api_key or os.environ.get("FERRY_API_KEY") or None
    try:
        sock = listen(args.host, args.port)
    except (OSError, OverflowError) as err:
        raise FerryError(f"cannot listen on {args.host}:{args.port}: {err}") from None
    host, port = sock.getsockname()[:2]
    if not key and not is_loopback(host):
        print(f"ferry: warning: listening on {host} without an API key: anyone who can reach this port "
              "can use the model (set --api-key or FERRY_API_KEY)", file=sys.stderr)
    worker = Worker(lambda: Engine(config), args.max_queue)  # loads on the thread that generates
    worker.start()
    engine = worker.wait_loaded()
    name = args.model_name or model_name(config.runtime.model)
    shown = f"[{host}]" if ":" in host else host
    print(f"ferry: serving {name} ({engine.plan.ctx} tokens of context) at http://{shown}:{port}/v1",
          flush=True)
    app = build_app(worker, model_name=name, api_key=key)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=3))
    try:
        server.run(sockets=[sock])  # its shutdown stops the worker, which closes the engine
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has shut down: the normal way out
        print("ferry: stopped", file=sys.stderr)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def model_name(spec: str | None) -> str:
    """What /v1/models calls the model: the hub id, or the folder's or GGUF file's name."""
    from ferry.offload.sources import DEFAULT_MODEL_FILE

    if spec is None:
        return DEFAULT_MODEL_FILE.split(".")[0]
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        return path.stem
    if path.exists():
        return path.resolve().name
    return str(spec)
