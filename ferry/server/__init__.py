"""`ferry serve`: an OpenAI-compatible HTTP server over one loaded Engine.

`schema.py` checks request bodies and shapes replies in OpenAI's wire format, `worker.py` loads
the engine and runs every generation on one thread in arrival order (the engine is not
thread-safe), and `app.py` has the Starlette routes that connect the two.
`build_app(Worker(load, max_queue), model_name=...)` returns the ASGI app and
`listen(host, port)` the socket to serve it on; `ferry.cli.serve` runs both under uvicorn.
"""

from ferry.server.app import build_app, listen
from ferry.server.worker import Worker

__all__ = ["Worker", "build_app", "listen"]
