"""Load benchmark of `clipkit index serve`: concurrent clients on 127.0.0.1 against the same queries via the CLI path.

Usage: python tools/bench/bench_serve.py INDEX_DIR [--clients 8] [--requests 250] [-k 20] [--cli-runs 5] [--out F]

Three sides, the same text queries (the index's own first captions, cycled), k hits each:
- server: the search server in this process (one shared encoder), C client threads each sending R requests of
  GET /api/search?text=...&k=... over fresh connections; latency per request, p50/p99, requests/s over the wall time;
- query function: `clipkit.serve.answer`, what `clipkit index query` runs once its model is loaded, one query at a
  time in this process;
- CLI command: `python -m clipkit.cli index query DIR --text ... -k K --json` as a whole process (start, model load,
  one query), `--cli-runs` times.
The loop is bounded (C x R requests) and stops by itself. Prints one JSON object (also written to --out).
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
    return {
        "clients": clients,
        "requests": len(flat),
        "errors": sum(errors),
        "wall_s": wall,
        "requests_per_s": len(flat) / wall,
        **percentiles(flat),
    }


def bench_function(index, encoder, queries: list[str], n: int, k: int) -> dict:
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        answer(index, [{"text": queries[i % len(queries)]}], k, encoder)
        times.append(time.perf_counter() - t0)
    return {"requests": n, "requests_per_s": n / sum(times), **percentiles(times)}


def bench_cli(index_dir: Path, queries: list[str], runs: int, k: int) -> dict | None:
    if runs <= 0:
        return None
    times = []
    for i in range(runs):
        cmd = [sys.executable, "-m", "clipkit.cli", "index", "query", str(index_dir), "--text", queries[i], "-k", str(k)]
        t0 = time.perf_counter()
        subprocess.run([*cmd, "--json"], check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return {"requests": runs, "requests_per_s": runs / sum(times), **percentiles(times)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("index_dir")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=250, help="requests per client")
    p.add_argument("-k", type=int, default=20)
    p.add_argument("--cli-runs", type=int, default=5, help="whole `clipkit index query` processes timed")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    index = open_index_dir(Path(args.index_dir))
    encoder = QueryEncoder(index.model)
    queries = list(dict.fromkeys(c for row in index.meta for c in row.get("captions", [])[:1]))[:200]
    answer(index, [{"text": queries[0]}], args.k, encoder)  # warm-up: first forward allocates
    result = {
        "index": {"count": index.count, "dim": index.dim, "factory": index.info.get("factory"), "model": index.model},
        "k": args.k,
        "server": bench_server(index, encoder, queries, args.clients, args.requests, args.k),
        "query_function": bench_function(index, encoder, queries, args.clients * args.requests, args.k),
        "cli_command": bench_cli(Path(args.index_dir), queries, args.cli_runs, args.k),
        "machine": {
            "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
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


if __name__ == "__main__":
    main()
