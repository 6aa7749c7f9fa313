"""Index types on real-like CLIP embeddings: recall@10 vs exact search against queries/s; what `choose_factory` picks.

Data: the image embeddings of an embedding folder exported by `clipkit embed` from a trained clipkit model
(default: Fashion-MNIST + Emoji through the quickstart-style model). Rows of the "train" split form the base
set, repeated with small gaussian noise and renormalized until it has --n vectors (each copy's noise has a norm
of half the median nearest-neighbour distance of the real rows, so copies are near but not duplicate); held-out
rows (the "test" split: never in the index) are the image queries, and held-out captions the text queries.

For each index type: build, tune nprobe/efSearch on half the queries to reach recall@10 >= --target on them
(`tune_search_params`), then measure on the other half: recall@10 against exact search, queries/s batched
(all queries in one call) and one query per call, both against faiss's exact IndexFlatIP measured in the same
run, bytes (serialized index), and build time. The machine load (os.getloadavg) is printed with the results.

    clipkit embed --checkpoint runs/quickstart/model --images-only \
        --data 'data/fashion-mnist/*.tar::data/emoji/*.tar' --out /tmp/bench/emb
    python tools/bench_index.py --emb /tmp/bench/emb --n 100000 --plot docs/images/index_tradeoff.png \
        --json docs/images/index_tradeoff.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import faiss
import numpy as np

from clipkit.index import build_index, exact_search, load_embeddings, recall_at_k, search
from clipkit.index.build import choose_factory, set_search_params
from clipkit.index.embeddings import image_rows
from clipkit.index.measure import single_query_qps, tune_search_params


def real_like(base: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, float]:
    """[n, D] float32: the base rows, then noisy renormalized copies of them, until n rows; and the noise norm."""
    rng = np.random.default_rng(seed)
    sample = base[rng.choice(len(base), size=min(500, len(base)), replace=False)]
    _, ids = exact_search(base, sample, 2)  # [500, 2]: self, then the nearest other row
    nearest = base[ids[:, 1]]
    nn_dist = float(np.median(np.linalg.norm(sample - nearest, axis=1)))
    sigma = 0.5 * nn_dist / np.sqrt(base.shape[1])  # E|noise| = 0.5 * median NN distance
    out = np.empty((n, base.shape[1]), np.float32)
    filled = min(n, len(base))
    out[:filled] = base[:filled]
    while filled < n:
        take = min(len(base), n - filled)
        copy = base[:take] + rng.normal(scale=sigma, size=(take, base.shape[1])).astype(np.float32)
        out[filled : filled + take] = copy / np.linalg.norm(copy, axis=1, keepdims=True)
        filled += take
    return out, 0.5 * nn_dist


def qps_batch(fn, queries: np.ndarray, repeats: int = 3) -> float:
    """Best of `repeats` timings of answering all queries in one call."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(queries)
        best = min(best, time.perf_counter() - t0)
    return len(queries) / best


def qps_single(fn, queries: np.ndarray) -> float:
    """Queries/s answering one query per call, for about 3 s (at least 10 queries)."""
    return single_query_qps(fn, queries, seconds=3.0, min_queries=10)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--emb", required=True, help="embedding folder from `clipkit embed` (rows with a 'split' field)")
    p.add_argument("--n", type=int, default=100_000, help="vectors in the index")
    p.add_argument("--queries", type=int, default=2000, help="held-out image queries (half tune, half measure)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--target", type=float, default=0.95, help="recall@k each index is tuned to reach")
    p.add_argument("--factories", nargs="*", help="factory strings to compare (default: a representative set)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sizes", type=int, nargs="*", help="also measure the automatic choice at these sizes")
    p.add_argument("--plot", help="write recall@k vs queries/s (one point per index type) to this PNG")
    p.add_argument("--json", help="write the results to this JSON file")
    args = p.parse_args()

    emb = load_embeddings(Path(args.emb))
    vectors = np.asarray(image_rows(emb), np.float32)  # [N_real, D]
    split = np.array([m.get("split", "train") for m in emb["meta"]])
    base, held = vectors[split != "test"], vectors[split == "test"]
    rng = np.random.default_rng(args.seed)
    queries = held[rng.choice(len(held), size=min(args.queries, len(held)), replace=False)]
    tune_q, test_q = queries[: len(queries) // 2], queries[len(queries) // 2 :]
    text_q = text_tune_q = None
    if emb["text_emb"] is not None and len(emb["text_emb"]):
        t2i = np.asarray(emb["text_to_image"])
        held_caps = np.nonzero(split[t2i] == "test")[0]
        caps = [c for m in emb["meta"] for c in m.get("captions", [])]
        unique = {caps[i]: i for i in held_caps}  # one row per distinct held-out caption
        rows = np.array(sorted(unique.values()))
        rows = rows[rng.permutation(len(rows))][: 2 * len(test_q)]
        if len(rows) >= 2:
            caps_emb = np.asarray(emb["text_emb"][np.sort(rows)], np.float32)
            text_tune_q, text_q = caps_emb[: len(rows) // 2], caps_emb[len(rows) // 2 :]

    x, noise = real_like(base, args.n, args.seed)
    n, d = x.shape
    auto = choose_factory(n, d)
    nlist = 2 ** round(np.log2(4 * np.sqrt(n)))
    m = max(dd for dd in range(1, d + 1) if d % dd == 0 and dd <= min(64, d // 4))
    factories = args.factories or [
        "Flat",
        "HNSW32,Flat",
        f"IVF{nlist},Flat",
        f"IVF{nlist},SQ8",
        f"IVF{nlist},PQ{m}x8",
        f"OPQ{m},IVF{nlist},PQ{m}x8",
    ]
    if auto not in factories:
        factories.append(auto)
    threads = faiss.omp_get_max_threads()
    print(
        f"{n} x {d} vectors ({len(base)} real train rows + noisy copies, noise norm {noise:.4f}); "
        f"{len(test_q)} held-out image queries{'' if text_q is None else f', {len(text_q)} caption queries'} "
        f"(+ as many for tuning); faiss {faiss.__version__}, {threads} threads, {os.cpu_count()} cores; "
        f"auto choice: {auto}",
        flush=True,
    )
    load_before = os.getloadavg()

    flat = faiss.IndexFlatIP(d)
    flat.add(x)
    _, exact_ids = flat.search(test_q, args.k)
    # Tuning sees both kinds of held-out query (image and caption); recall is reported for each on other queries.
    tune_sets = [(tune_q, flat.search(tune_q, args.k)[1])]
    if text_tune_q is not None:
        tune_sets.append((text_tune_q, flat.search(text_tune_q, args.k)[1]))
    text_exact = flat.search(text_q, args.k)[1] if text_q is not None else None
    # Exact baselines: faiss's flat index and clipkit's chunked numpy scan; ratios use the faster of the two.
    exact = {
        "faiss IndexFlatIP": (
            qps_batch(lambda q: flat.search(q, args.k), test_q),
            qps_single(lambda q: flat.search(q, args.k), test_q),
        ),
        "numpy scan (exact_search)": (
            qps_batch(lambda q: exact_search(x, q, args.k), test_q),
            qps_single(lambda q: exact_search(x, q, args.k), test_q),
        ),
    }
    flat_batch = max(v[0] for v in exact.values())
    flat_single = max(v[1] for v in exact.values())
    for name, (b, s1) in exact.items():
        print(f"exact {name}: {b:,.0f} QPS batched, {s1:,.0f} QPS one-by-one", flush=True)

    rows = []
    for factory in factories:
        rows.append(run_one(factory, x, tune_sets, test_q, exact_ids, text_q, text_exact, args, flat))
        rows[-1].update(
            auto=factory == auto,
            speedup_batch=rows[-1]["qps_batch"] / flat_batch,
            speedup_single=rows[-1]["qps_single"] / flat_single,
        )
        print(json.dumps(rows[-1]), flush=True)

    sizes = []
    for size in args.sizes or []:
        xs = x[:size] if size <= n else real_like(base, size, args.seed)[0]
        fl = faiss.IndexFlatIP(d)
        fl.add(xs)
        sets = [(q, fl.search(q, args.k)[1]) for q, _ in tune_sets]
        ex_q = fl.search(test_q, args.k)[1]
        ex_text = fl.search(text_q, args.k)[1] if text_q is not None else None
        fb = max(
            qps_batch(lambda q, fl=fl: fl.search(q, args.k), test_q),
            qps_batch(lambda q, xs=xs: exact_search(xs, q, args.k), test_q),
        )
        fs = max(
            qps_single(lambda q, fl=fl: fl.search(q, args.k), test_q),
            qps_single(lambda q, xs=xs: exact_search(xs, q, args.k), test_q),
        )
        chosen = choose_factory(*xs.shape)
        candidates = [chosen]
        if chosen == "Flat":  # what the next tier would give at this size
            nl = 2 ** round(np.log2(4 * np.sqrt(size)))
            while size < 39 * nl:
                nl //= 2
            candidates.append(f"IVF{nl},Flat")
        for f in candidates:
            r = run_one(f, xs, sets, test_q, ex_q, text_q, ex_text, args, fl)
            r.update(n=size, auto=f == chosen, speedup_batch=r["qps_batch"] / fb, speedup_single=r["qps_single"] / fs)
            sizes.append(r)
            print(json.dumps(r), flush=True)
    load_after = os.getloadavg()

    header = (
        "| index | search params | recall@10 image q | recall@10 caption q | QPS batched | x exact | "
        "QPS one-by-one | x exact | bytes/vector | build s |"
    )
    lines = [header, "|" + "---|" * 10]
    for r in rows:
        lines.append(_row(r, f"**{r['factory']}** (auto)" if r["auto"] else r["factory"], r["bytes"] / n))
    table = "\n".join(lines)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, faiss {threads} threads"
    load = f"load average (1/5/15 min): before {tuple(round(v, 2) for v in load_before)}, after " + str(
        tuple(round(v, 2) for v in load_after)
    )
    print()
    print(table)
    if sizes:
        lines = ["| vectors | " + header[2:], "|" + "---|" * 11]
        lines += [
            f"| {r['n']:,} " + _row(r, f"**{r['factory']}** (auto)" if r["auto"] else r["factory"], r["bytes"] / r["n"])
            for r in sizes
        ]
        print()
        print("\n".join(lines))
    print()
    for name, (b, s1) in exact.items():
        print(f"exact {name}: {b:,.0f} QPS batched, {s1:,.0f} QPS one-by-one")
    print(f"{machine}; {load}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        result = {
            "n": n,
            "dim": d,
            "k": args.k,
            "target": args.target,
            "auto": auto,
            "noise_norm": noise,
            "n_queries": len(test_q),
            "n_text_queries": 0 if text_q is None else len(text_q),
            "exact": {k: {"qps_batch": v[0], "qps_single": v[1]} for k, v in exact.items()},
            "rows": rows,
            "sizes": sizes,
            "machine": machine,
            "loadavg_before": load_before,
            "loadavg_after": load_after,
            "command": " ".join(sys.argv),
        }
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot(rows, flat_batch, flat_single, n, d, args.k, load_before, Path(args.plot))
    return 0


def run_one(factory, x, tune_sets, test_q, exact_ids, text_q, text_exact, args, flat=None) -> dict:
    """Builds (or reuses `flat`), tunes, and measures one index type.

    Tuning runs on each held-out tuning set (image queries, caption queries) separately and keeps the larger
    setting of each knob, so the target is met for both kinds of query, not on their average.
    """
    t0 = time.perf_counter()
    index = flat if factory == "Flat" and flat is not None else build_index(x, factory)
    build_s = time.perf_counter() - t0
    rerank = x if factory.startswith("OPQ") else None  # the automatic PQ choice: re-ranked from the vectors
    tunings = [tune_search_params(index, q, e, args.k, args.target, rerank) for q, e in tune_sets]
    params = {}
    if tunings[0]["param"]:
        name = tunings[0]["param"]
        params[name] = max(t["value"] for t in tunings)
        set_search_params(index, **{name: params[name]})
    factor = max(t["rerank_factor"] or 1 for t in tunings)
    if rerank is not None:
        params["rerank_factor"] = factor
    fn = lambda q: search(index, q, args.k, rerank_vectors=rerank, rerank_factor=factor)  # noqa: E731
    return {
        "factory": factory + (" + rerank" if rerank is not None else ""),
        "params": params,
        "recall": recall_at_k(fn(test_q)[1], exact_ids, args.k),
        "text_recall": recall_at_k(fn(text_q)[1], text_exact, args.k) if text_q is not None else None,
        "qps_batch": qps_batch(fn, test_q),
        "qps_single": qps_single(fn, test_q),
        "bytes": int(faiss.serialize_index(index).size),
        "build_s": build_s,
    }


def _row(r: dict, name: str, bytes_per_vector: float) -> str:
    params = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "-"
    text = f"{r['text_recall']:.3f}" if r["text_recall"] is not None else "-"
    return (
        f"| {name} | {params} | {r['recall']:.3f} | {text} | {r['qps_batch']:,.0f} | {r['speedup_batch']:.1f} | "
        f"{r['qps_single']:,.0f} | {r['speedup_single']:.1f} | {bytes_per_vector:.0f} | {r['build_s']:.1f} |"
    )


def plot(rows: list[dict], flat_batch: float, flat_single: float, n: int, d: int, k: int, load, out: Path) -> None:
    """Recall@k vs queries/s, one colour per index type: circle = image queries, triangle = caption queries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key, flat, title in (
        (axes[0], "qps_single", flat_single, "one query per call"),
        (axes[1], "qps_batch", flat_batch, "all queries in one call"),
    ):
        for i, r in enumerate(rows):
            c = colors[i % len(colors)]
            size = 120 if r["auto"] else 45
            label = r["factory"] + (" (automatic choice)" if r["auto"] else "")
            edge = "black" if r["auto"] else c
            ax.scatter(r[key], r["recall"], s=size, color=c, edgecolors=edge, marker="o", zorder=3, label=label)
            if r["text_recall"] is not None:
                ax.scatter(r[key], r["text_recall"], s=size, color=c, edgecolors=edge, marker="^", zorder=3)
                ax.plot([r[key]] * 2, [r["recall"], r["text_recall"]], color=c, lw=0.8, alpha=0.6)
        ax.axvline(5 * flat, color="grey", ls="--", lw=0.8)
        ax.text(5 * flat, 0.22, " 5x exact", color="grey", fontsize=8, va="bottom")
        ax.axhline(0.95, color="grey", ls=":", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("queries / s (log scale)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"recall@{k} against exact search")
    axes[0].set_ylim(0.2, 1.02)
    axes[1].legend(fontsize=7, loc="lower right", title="o image queries, ^ caption queries", title_fontsize=7)
    fig.suptitle(f"{n:,} x {d} real-like CLIP image embeddings, 2-core CPU (load {load[0]:.2f} at start)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"plot: {out}")


if __name__ == "__main__":
    sys.exit(main())
