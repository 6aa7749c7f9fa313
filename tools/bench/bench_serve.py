"""Load benchmark of `clipkit index serve`: concurrent clients on 127.0.0.1 against the same queries via the CLI path.

Usage: python tools/bench/bench_serve.py INDEX_DIR [--clients 8] [--requests 250] [-k 20] [--rounds 5] [--out F]

Three sides, the same text queries (the index's own first captions, cycled), k hits each:
- server: the search server in this process (one shared encoder), C client threads each sending R requests of
  GET /api/search?text=...&k=... over fresh connections; latency per request, p50/p99, requests/s over the wall time;
- query function: `clipkit.serve.answer`, what `clipkit index query` runs once its model is loaded, one query at a
  time in this process's main thread (as the CLI does), and the same from one worker thread (as a handler does);
- CLI command: `python -m clipkit.cli index query DIR --text ... -k K --json` as a whole process (start, model load,
  one query), `--cli-runs` times per round.
The sides alternate over `--rounds` rounds (each round: R / rounds requests per client, then
--function-requests / rounds function calls, then the CLI runs), so a change in the machine's load reaches all of
them. The loop is bounded and stops by itself. Prints one JSON object (also written to --out): per side p50/p99/mean
latency (ms) and requests/s (server: over the wall time of the concurrent load; the others: one at a time).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

from clipkit.index import open_index_dir
from clipkit.serve import QueryEncoder, answer, make_server


def percentiles(seconds: list[float]) -> dict[str, float]:
    """p50 / p99 / mean in milliseconds."""
    ms = sorted(s * 1000 for s in seconds)
    pick = lambda q: ms[min(len(ms) - 1, round(q * (len(ms) - 1)))]
    return {"p50_ms": pick(0.50), "p99_ms": pick(0.99), "mean_ms": statistics.fmean(ms)}


def bench_server(index, encoder, queries: list[str], clients: int, requests: int, k: int) -> dict:
    server = make_server(index, encoder, port=0)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients

    def client(c: int) -> None:
        for i in range(requests):
            text = queries[(c * requests + i) % len(queries)]
            t0 = time.perf_counter()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request("GET", "/api/search?" + urlencode({"text": text, "k": k}))
            resp = conn.getresponse()
            body = resp.read()
            conn.close()
            latencies[c].append(time.perf_counter() - t0)
            if resp.status != 200 or len(json.loads(body)["hits"]) != min(k, index.count):
                errors[c] += 1

    try:
        workers = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        wall = time.perf_counter() - t0
    finally:
        server.shutdown()
        server.server_close()
    flat = [s for per in latencies for s in per]
    return {"requests": len(flat), "errors": sum(errors), "busy_s": wall, "seconds": flat}


def bench_function(index, encoder, queries: list[str], n: int, k: int) -> dict:
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        answer(index, [{"text": queries[i % len(queries)]}], k, encoder)
        times.append(time.perf_counter() - t0)
    return {"requests": n, "busy_s": sum(times), "seconds": times}


def bench_cli(index_dir: Path, queries: list[str], runs: int, k: int) -> dict | None:
    if runs <= 0:
        return None
    times = []
    for i in range(runs):
        cmd = [
            sys.executable,
            "-m",
            "clipkit.cli",
            "index",
            "query",
            str(index_dir),
            "--text",
            queries[i],
            "-k",
            str(k),
        ]
        t0 = time.perf_counter()
        subprocess.run([*cmd, "--json"], check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return {"requests": runs, "busy_s": sum(times), "seconds": times}


SIDES = ("server", "query_function", "query_function_thread", "cli_command")


def in_thread(fn, *args):
    """fn(*args) run in a new thread, as the server's handlers run (OpenMP teams and their spinning differ from the
    main thread's on a loaded machine)."""
    out = []
    worker = threading.Thread(target=lambda: out.append(fn(*args)))
    worker.start()
    worker.join()
    return out[0]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("index_dir")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=250, help="requests per client (over all rounds)")
    p.add_argument("-k", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5, help="the sides alternate this many times (load shifts)")
    p.add_argument("--function-requests", type=int, default=400, help="query-function calls per side (all rounds)")
    p.add_argument("--cli-runs", type=int, default=1, help="whole `clipkit index query` processes timed per round")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    index = open_index_dir(Path(args.index_dir))
    encoder = QueryEncoder(index.model)
    queries = list(dict.fromkeys(c for row in index.meta for c in row.get("captions", [])[:1]))[:200]
    answer(index, [{"text": queries[0]}], args.k, encoder)  # warm-up: first forward allocates
    load_start = os.getloadavg()
    per_round = max(1, args.requests // args.rounds)
    calls = max(1, args.function_requests // args.rounds)  # one at a time: fewer than the server's requests
    rounds = []
    for r in range(args.rounds):  # server, function, CLI, then again: each side sees the same shifts in load
        shifted = queries[r * 7 % len(queries) :] + queries[: r * 7 % len(queries)]
        rounds.append(
            {
                "server": bench_server(index, encoder, shifted, args.clients, per_round, args.k),
                "query_function": bench_function(index, encoder, shifted, calls, args.k),
                "query_function_thread": in_thread(bench_function, index, encoder, shifted, calls, args.k),
                "cli_command": bench_cli(Path(args.index_dir), shifted, args.cli_runs, args.k),
            }
        )
    result = {
        "index": {"count": index.count, "dim": index.dim, "factory": index.info.get("factory"), "model": index.model},
        "k": args.k,
        "clients": args.clients,
        "rounds": args.rounds,
        **{side: merge([r[side] for r in rounds if r[side]]) for side in SIDES},
        "per_round": [{side: merge([r[side]]) if r[side] else None for side in r} for r in rounds],
        "machine": {
            "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "loadavg_at_start": load_start,
            "loadavg_at_end": os.getloadavg(),
            "python": platform.python_version(),
        },
        "date": time.strftime("%Y-%m-%d"),
    }
    text = json.dumps(result, indent=2)
    if args.out:
        from clipkit.files import write_text_atomic

        write_text_atomic(args.out, text + "\n")
    print(text)
    return result


def merge(parts: list[dict]) -> dict | None:
    """One side's rounds together: all latencies' percentiles, requests/s over the summed time."""
    if not parts:
        return None
    seconds = [s for p in parts for s in p["seconds"]]
    busy = sum(p["busy_s"] for p in parts)
    return {"requests": len(seconds), "errors": sum(p.get("errors", 0) for p in parts),
            "requests_per_s": len(seconds) / busy, **percentiles(seconds)}  # fmt: skip


if __name__ == "__main__":
    main()
