"""`ferry serve` under load: the server's overhead per token, and many clients at once.

Starts `python -m ferry serve` (the embedded default model unless --model) as a subprocess on a
free port, and loads the same model in this process for the direct comparison. Clients speak raw
HTTP (http.client, server-sent events parsed by hand), so client-side parsing stays out of
the figures.

1. Overhead: one client, streamed chat completion of exactly --new-tokens tokens (ignore_eos),
   against `engine.stream` of the same conversation in this process; runs interleaved, median
   of --runs. Overhead per token = (server - direct) / tokens.
2. Load: --clients threads x --requests each (prompts from bench/prompts.jsonl, greedy,
   --load-tokens each, streamed and whole alternating); counts complete replies (a finish
   reason, and `data: [DONE]` when streamed) and errors, with the wall time.

Prints a table, then one JSON line.

    python bench/serve_load.py [--runs 7] [--new-tokens 64] [--clients 8] [--requests 20]
        [--load-tokens 16] [--model PATH] [-- extra ferry serve flags]
"""

from __future__ import annotations

import argparse
import http.client
import json
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import ferry

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
PROMPTS = [json.loads(line)["prompt"] for line in (Path(__file__).parent / "prompts.jsonl").open()]


def start_server(model: str | None, extra: list[str]) -> tuple[subprocess.Popen, str, int]:
    argv = [sys.executable, "-m", "ferry", "serve", "--port", "0", "--device", "cpu", "--quant", "none", *extra]
    if model:
        argv += ["--model", model]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    if " at http://" not in line:
        proc.kill()
        raise SystemExit(f"ferry serve did not start: {line!r}")
    host, port = line.rsplit("http://", 1)[1].strip().removesuffix("/v1").rsplit(":", 1)
    return proc, host, int(port)


def chat(address: tuple[str, int], prompt: str, tokens: int, stream: bool, ignore_eos: bool = False) -> dict:
    """One chat completion on a new connection (uvicorn closes keep-alive connections idle for 5 s;
    a connection to localhost costs ~0.1 ms); {"ok", "finish", "tokens", "seconds", "first_s"}."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": tokens, "temperature": 0,
            "stream": stream, "ignore_eos": ignore_eos, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(*address, timeout=600)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    try:
        return _read(conn.getresponse(), stream, t0)
    finally:
        conn.close()


def _read(reply: http.client.HTTPResponse, stream: bool, t0: float) -> dict:
    if reply.status != 200:
        reply.read()
        return {"ok": False, "status": reply.status}
    if not stream:
        data = json.loads(reply.read())
        return {"ok": data["choices"][0]["finish_reason"] is not None, "finish": data["choices"][0]["finish_reason"],
                "tokens": data["usage"]["completion_tokens"], "seconds": time.perf_counter() - t0}
    finish, done, used, first, engine_s = None, False, 0, None, None
    for raw in reply:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        first = first or time.perf_counter() - t0
        if line == "data: [DONE]":
            done = True
            continue
        event = json.loads(line[6:])
        if event.get("usage"):
            used = event["usage"]["completion_tokens"]
        if event.get("choices") and event["choices"][0]["finish_reason"]:
            finish = event["choices"][0]["finish_reason"]
            stats = event.get("ferry") or {}
            engine_s = stats.get("prefill_s", 0) + stats.get("decode_s", 0) + stats.get("select_s", 0)
    return {"ok": done and finish is not None, "finish": finish, "tokens": used,
            "seconds": time.perf_counter() - t0, "first_s": first, "engine_s": engine_s}


def direct(engine, tokens: int) -> tuple[float, float]:
    """(seconds to exhaust the stream, the engine's own prefill + decode seconds)."""
    t0 = time.perf_counter()
    stream = engine.stream([{"role": "user", "content": PROMPT}], max_new_tokens=tokens, ignore_eos=True)
    for _ in stream:
        pass
    s = stream.result.stats
    return time.perf_counter() - t0, s.prefill_s + s.decode_s + s.select_s


def overhead(engine, host: str, port: int, runs: int, tokens: int) -> dict:
    address = (host, port)
    chat(address, PROMPT, tokens, True, True), direct(engine, tokens)  # warm-up
    served, alone, served_engine, alone_engine = [], [], [], []
    for run in range(runs):
        for who in (("server", "direct") if run % 2 == 0 else ("direct", "server")):
            if who == "server":
                r = chat(address, PROMPT, tokens, True, True)
                assert r["ok"] and r["tokens"] == tokens, r
                served.append(r["seconds"])
                served_engine.append(r["engine_s"])
            else:
                total, inside = direct(engine, tokens)
                alone.append(total)
                alone_engine.append(inside)
    s, d = statistics.median(served), statistics.median(alone)
    return {"server_s": s, "direct_s": d, "overhead_ms_per_token": (s - d) / tokens * 1000,
            "overhead_fraction": (s - d) / d, "server_engine_s": statistics.median(served_engine),
            "direct_engine_s": statistics.median(alone_engine)}


def load(host: str, port: int, clients: int, requests: int, tokens: int) -> dict:
    results: list[dict] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for i in range(requests):
            try:
                r = chat((host, port), PROMPTS[(c * requests + i) % len(PROMPTS)], tokens, stream=(c + i) % 2 == 0)
            except Exception as err:  # noqa: BLE001 - a benchmark counts errors, whatever they are
                r = {"ok": False, "error": repr(err)}
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    latencies = sorted(r["seconds"] for r in ok)
    return {"requests": len(results), "complete": len(ok), "errors": len(results) - len(ok), "wall_s": wall,
            "completion_tokens": sum(r["tokens"] for r in ok), "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
            "latency_p50_s": statistics.median(latencies) if latencies else None,
            "latency_max_s": latencies[-1] if latencies else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--load-tokens", type=int, default=16)
    parser.add_argument("--model", default=None)
    parser.add_argument("serve_flags", nargs="*", help="extra `ferry serve` flags (after --)")
    args = parser.parse_args()
    proc, host, port = start_server(args.model, args.serve_flags)
    try:
        engine = ferry.load(args.model, device="cpu", progress=False, quant="none")
        over = overhead(engine, host, port, args.runs, args.new_tokens)
        engine.close()
        busy = load(host, port, args.clients, args.requests, args.load_tokens)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    n = args.new_tokens
    print(f"ferry serve, {args.model or 'SmolLM2-135M-Instruct'}, CPU ({platform.processor() or platform.machine()}), "
          f"streamed chat, {n} tokens (ignore_eos), median of {args.runs} interleaved runs")
    print(f"{'':26}{'seconds':>10}{'ms/token':>10}{'engine s':>10}")
    print(f"{'engine.stream (direct)':26}{over['direct_s']:10.3f}{over['direct_s'] / n * 1000:10.2f}"
          f"{over['direct_engine_s']:10.3f}")
    print(f"{'ferry serve (HTTP, SSE)':26}{over['server_s']:10.3f}{over['server_s'] / n * 1000:10.2f}"
          f"{over['server_engine_s']:10.3f}")
    print(f"{'overhead':26}{over['server_s'] - over['direct_s']:10.3f}{over['overhead_ms_per_token']:10.2f}"
          f"  ({over['overhead_fraction'] * 100:+.1f}%)")
    print("(engine s: prefill + decode as the engine itself timed them, inside the server or here)")
    print(f"\nload: {args.clients} clients x {args.requests} requests, {args.load_tokens} tokens each, greedy")
    print(f"complete {busy['complete']}/{busy['requests']}, errors {busy['errors']}, wall {busy['wall_s']:.1f} s, "
          f"{busy['tokens_per_s']:.1f} tokens/s, latency p50 {busy['latency_p50_s']:.2f} s, "
          f"max {busy['latency_max_s']:.2f} s")
    print(json.dumps({"bench": "serve_load", "model": args.model or "SmolLM2-135M-Instruct", "device": "cpu",
                      "new_tokens": n, "runs": args.runs, **{k: round(v, 4) for k, v in over.items()},
                      "clients": args.clients, "requests_each": args.requests, "load_tokens": args.load_tokens,
                      **{f"load_{k}": round(v, 4) if isinstance(v, float) else v for k, v in busy.items()}}))


if __name__ == "__main__":
    main()
