"""The HTTP routes: OpenAI's chat and text completions (whole or streamed as server-sent events),
the model list, and a health check.

Handlers run on uvicorn's event loop and never touch the engine: each request becomes a `Job` on
the worker's queue, and its events come back through a `Channel` (an asyncio queue filled from
the worker thread with `call_soon_threadsafe`). A handler watches for its client going away while
it waits, and cancels the job then, so a closed connection frees the engine at the next token.
Every refusal is a JSON error in OpenAI's shape; nothing a client sends can stop the server.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ferry.server.schema import ApiError, Call, chunk, error_body, parse_chat, parse_completion, reply, usage
from ferry.server.worker import Cancelled, Event, Failed, Finished, Job, Piece, QueueFull, Worker

log = logging.getLogger("ferry.server")
T = TypeVar("T")
CLIENT_GONE = 499  # nginx's status for a client that closed the connection; nobody reads it


class Channel:
    """One request's events, from the worker thread onto the handler's event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def deliver(self, event: Event) -> None:
        """Called on the worker thread; raises RuntimeError once the loop is closed."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def get(self) -> Event:
        return await self.queue.get()


def build_app(worker: Worker, *, model_name: str, api_key: str | None = None) -> Starlette:
    """The ASGI app serving the engine of `worker`. The app's startup starts the worker and waits
    for its engine (`ferry serve` starts it earlier, to print the URL once the model is in); its
    shutdown stops the worker (queued requests are answered 503, the running one is ended)."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        worker.start()
        await asyncio.to_thread(worker.wait_loaded)
        yield
        await asyncio.to_thread(worker.stop)

    routes = [
        Route("/v1/chat/completions", api(chat_completions), methods=["POST"]),
        Route("/v1/completions", api(completions), methods=["POST"]),
        Route("/v1/models", api(models), methods=["GET"]),
        Route("/v1/models/{model:path}", api(models), methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Exception: internal_error})
    app.state.worker, app.state.model_name, app.state.api_key = worker, model_name, api_key
    app.state.created = int(time.time())
    return app


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket for uvicorn (IPv4 or IPv6, as the host resolves); port 0 picks one.
    Made with proto IPPROTO_TCP: asyncio sets TCP_NODELAY only on such sockets' connections, and
    without it a keep-alive reply waits ~40 ms for a delayed ACK (Nagle)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    return sock


def api(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """An /v1 route: the key check first, and ApiError turned into its JSON reply."""

    async def route(request: Request) -> Response:
        try:
            check_key(request)
            return await handler(request)
        except ApiError as err:
            return JSONResponse(err.body(), status_code=err.status)

    return route


def check_key(request: Request) -> None:
    key = request.app.state.api_key
    if not key:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                       code="invalid_api_key")


async def chat_completions(request: Request) -> Response:
    return await run(request, parse_chat(await read_json(request)))


async def completions(request: Request) -> Response:
    return await run(request, parse_completion(await read_json(request)))


async def read_json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON: {err}") from None


async def run(request: Request, call: Call) -> Response:
    """Queue the call, then answer with the whole reply, or with a stream once its first event
    is in (so a refusal before the first token is still a plain HTTP error)."""
    state = request.app.state
    channel = Channel()
    job = Job(call.prompt, call.options, call.stop, channel.deliver)
    try:
        state.worker.submit(job)
    except QueueFull as err:
        raise ApiError(503, f"the server is busy ({err}); retry later", code="queue_full") from None
    if not call.stream:
        text, end = await until_disconnect(request, job, collect(channel))
        if isinstance(end, Finished):
            use = usage(end.prompt_tokens, end.completion_tokens)
            return JSONResponse(reply(call, state.model_name, text, end.finish_reason, use, end.stats))
    else:
        end = await until_disconnect(request, job, channel.get())
        if not isinstance(end, (Failed, Cancelled)):
            return StreamingResponse(events(call, state.model_name, job, channel, end),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    if isinstance(end, Failed):
        raise end.error
    return Response(status_code=CLIENT_GONE)


async def collect(channel: Channel) -> tuple[str, Event]:
    """The whole reply's text, and the event that ended it."""
    parts = []
    while isinstance(event := await channel.get(), Piece):
        parts.append(event.text)
    return "".join(parts), event


async def until_disconnect(request: Request, job: Job, waiting: Awaitable[T]) -> T:
    """Await `waiting` while listening for the client to go away; if it does, cancel the job
    (the worker then answers with Cancelled, which ends the wait)."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await waiting
    finally:
        watcher.cancel()


async def events(call: Call, model: str, job: Job, channel: Channel, first: Event) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. Starlette cancels
    this generator when the client disconnects; `finally` then cancels the job."""
    event = first
    try:
        if call.kind == "chat":
            yield sse(chunk(call, model, role=True))
        while True:
            if isinstance(event, Piece):
                yield sse(chunk(call, model, event.text))
            elif isinstance(event, Finished):
                yield sse(chunk(call, model, finish=event.finish_reason, ferry=event.stats))
                if call.include_usage:
                    yield sse(chunk(call, model, use=usage(event.prompt_tokens, event.completion_tokens)))
                yield "data: [DONE]\n\n"
                return
            elif isinstance(event, Failed):  # after the first token: the status is sent already
                yield sse(event.error.body())
                return
            else:
                return
            event = await channel.get()
    finally:
        job.cancel()


def sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def models(request: Request) -> Response:
    state = request.app.state
    card = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "ferry"}
    wanted = request.path_params.get("model")
    if wanted is None:
        return JSONResponse({"object": "list", "data": [card]})
    if wanted != state.model_name:
        raise ApiError(404, f"no model {wanted!r}; this server runs {state.model_name!r}", "model",
                       "model_not_found")
    return JSONResponse(card)


async def health(request: Request) -> Response:
    """Liveness and load, without a key (for load balancers and scripts)."""
    state = request.app.state
    return JSONResponse({"status": "ok", "model": state.model_name, **state.worker.status()})


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)


async def internal_error(request: Request, exc: Exception) -> Response:
    log.error("unexpected error", exc_info=exc)
    return JSONResponse(error_body("internal server error; see the server log", "server_error"), status_code=500)
