"""The one thread that loads the engine and runs every generation, and the queue in front of it.

The engine is not thread-safe and holds one KV cache (the previous sequence, whose prefix the
next request may reuse), so generations run one at a time, in arrival order, on a single worker
thread. That thread also loads the model: torch work on a second thread starts a second OpenMP
team, and a model loaded on one thread but run on another decoded ~1.6x slower on the CPU.

Handlers on the event loop submit a `Job` and receive its events through the job's `deliver`
callable, which the worker calls from its own thread (the app passes one that hops onto the loop
with `call_soon_threadsafe`). Every job ends with exactly one terminal event: `Finished`,
`Failed` or `Cancelled`.

A job is cancelled when its client goes away: a queued job is skipped, a running one is closed
at its next token. Stop strings are matched here, on the worker, so a matched stop ends the
generation at once instead of computing tokens nobody reads.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import asdict, dataclass
from typing import Any, Callable, Union

from jinja2 import TemplateError

from ferry.engine.text import Prompt
from ferry.errors import FerryError, SettingError
from ferry.server.schema import FINISH_REASONS, ApiError

log = logging.getLogger("ferry.server")


@dataclass(frozen=True)
class Piece:
    text: str  # the next piece of the reply (never empty)


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # OpenAI's: stop or length
    prompt_tokens: int
    completion_tokens: int
    stats: dict | None  # the engine's GenerationStats; None when a stop string ended it early


@dataclass(frozen=True)
class Failed:
    error: ApiError


@dataclass(frozen=True)
class Cancelled:
    pass


Event = Union[Piece, Finished, Failed, Cancelled]


class Job:
    """One request's generation: what to run, where its events go, and whether it is still wanted."""

    def __init__(self, prompt: Prompt, options: dict[str, Any], stop: tuple[str, ...],
                 deliver: Callable[[Event], None]):
        self.prompt, self.options, self.stop, self.deliver = prompt, options, stop, deliver
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        """The client went away (any thread): skip the job, or end it at its next token."""
        self.cancelled.set()


class QueueFull(Exception):
    """max_queue jobs are already waiting."""


class Worker:
    """A bounded queue of jobs and the thread that loads the engine and runs them, in order."""

    def __init__(self, load: Callable[[], Any], max_queue: int):
        self._load = load  # returns the engine; called on the worker thread
        self.max_queue = max_queue
        self.engine: Any = None
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name="ferry-generation", daemon=True)
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self._stopping = False
        self.running: Job | None = None
        self.counts = {"finished": 0, "cancelled": 0, "failed": 0}

    def start(self) -> None:
        """Start the thread (once; later calls do nothing); it loads the engine first."""
        if self._thread.ident is None:
            self._thread.start()

    def wait_loaded(self) -> Any:
        """The engine, once loaded; the loading error, raised here, if it failed."""
        self._loaded.wait()
        if self._load_error is not None:
            raise self._load_error
        return self.engine

    def submit(self, job: Job) -> None:
        """Queue a job (any thread); QueueFull when max_queue jobs wait already."""
        if self._stopping:
            raise QueueFull("the server is shutting down")
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self.max_queue} requests are waiting already") from None

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new jobs, fail the waiting ones, end the running one at its next token."""
        self._stopping = True
        if self.running is not None:
            self.running.cancel()
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                _send(job, Failed(ApiError(503, "the server is shutting down", code="shutting_down")))
        try:
            self._jobs.put(None, timeout=1.0)
        except queue.Full:  # a submit raced the drain; the daemon thread ends with the process
            return
        if self._thread.is_alive():
            self._thread.join(timeout)

    def status(self) -> dict:
        return {"queued": self._jobs.qsize(), "running": self.running is not None, **self.counts}

    def _run(self) -> None:
        try:
            self.engine = self._load()
        except BaseException as err:  # handed to wait_loaded's caller
            self._load_error = err
            return
        finally:
            self._loaded.set()
        try:
            self._serve_all()
        finally:
            self.engine.close()

    def _serve_all(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            self.running = job
            try:
                self.counts[self._serve(job)] += 1
            except Exception:  # a bug: log it, answer 500, keep serving the others
                log.exception("generation failed")
                _send(job, Failed(ApiError(500, "internal error while generating; see the server log")))
                self.counts["failed"] += 1
            finally:
                self.running = None

    def _serve(self, job: Job) -> str:
        """Run one job to its terminal event; returns which of self.counts it adds to."""
        if job.cancelled.is_set():
            _send(job, Cancelled())
            return "cancelled"
        try:
            prompt_tokens = self._check(job)
            stream = self.engine.stream(job.prompt, **job.options)
        except ApiError as err:
            _send(job, Failed(err))
            return "failed"
        except FerryError as err:  # a prompt the engine refuses (empty, bad message)
            _send(job, Failed(ApiError(400, str(err), _param(job))))
            return "failed"
        try:
            return _drain(job, stream, prompt_tokens)
        finally:
            stream.close()  # no-op when exhausted; else ends the generation (error, cancel, stop)

    def _check(self, job: Job) -> int:
        """The prompt's length in tokens, refused when it leaves no room in the context."""
        try:
            n = len(self.engine.encode(job.prompt, job.options.get("chat")))
        except SettingError as err:
            if err.setting != "chat":
                raise
            raise ApiError(400, "this model has no chat template; use /v1/completions with a raw prompt",
                           "messages", "no_chat_template") from None
        except TemplateError as err:  # e.g. a template that refuses system messages
            raise ApiError(400, f"the model's chat template refuses this conversation: {err}",
                           "messages") from None
        ctx = self.engine.plan.ctx
        if n >= ctx:
            raise ApiError(400, f"the prompt has {n} tokens; the context holds {ctx}, so it must be "
                                f"shorter than that", _param(job), "context_length_exceeded")
        return n


def _drain(job: Job, stream: Any, prompt_tokens: int) -> str:
    """Pass a stream's text on, cut at the first stop string; close it when the client is gone."""
    stops = StopMatcher(job.stop)
    count = 0
    for token in stream:
        count += token.id is not None
        if job.cancelled.is_set():
            _send(job, Cancelled())
            return "cancelled"
        piece, hit = stops.push(token.text)
        if piece:
            _send(job, Piece(piece))
        if hit:
            _send(job, Finished("stop", prompt_tokens, count, None))
            return "finished"
    tail = stops.flush()
    if tail:
        _send(job, Piece(tail))
    s = stream.result.stats
    _send(job, Finished(FINISH_REASONS[s.finish_reason], s.prompt_tokens, s.new_tokens, asdict(s)))
    return "finished"


def _send(job: Job, event: Event) -> None:
    """Deliver an event; when that fails (the handler's loop is gone) nobody listens: cancel."""
    try:
        job.deliver(event)
    except Exception:
        job.cancel()


def _param(job: Job) -> str:
    return "prompt" if isinstance(job.prompt, str) else "messages"


class StopMatcher:
    """Cuts streamed text before the first stop string. Text that could be the start of a stop
    string is held back until the next piece decides it, so no part of a stop is ever sent."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(the text that is safe to send now, whether a stop string was found)."""
        if not self.stops:
            return text, False
        buf = self.held + text
        cuts = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.held = ""
            return buf[:min(cuts)], True
        keep = max((k for s in self.stops for k in range(1, min(len(s), len(buf) + 1))
                    if buf.endswith(s[:k])), default=0)
        self.held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        """What was held back, once the text has ended without completing a stop string."""
        held, self.held = self.held, ""
        return held
