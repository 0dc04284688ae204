"""Index benchmark: build time, index RAM, single-query latency and recall@15 per index kind and size.

Vectors are synthetic but derived from real image embeddings: the default model (a trained run's
320-d lookalike embedding, EfficientNet-Lite0 trunk) embeds the fashionTexture photos, and those
557 unit vectors seed a smoothed bootstrap, i.e. samples from a Gaussian kernel density estimate
with the embeddings' own covariance:

    x = (f_i + h * (F - mean)^T g / sqrt(n - 1)) / norm     (f_i a random real embedding, g ~ N(0, I_557))

so every synthetic vector is a real photo's embedding moved by noise shaped like the real spread
(h = --bandwidth), re-normalised: clustered the way the photos are (by attribute, then by photo),
not uniform noise. The distance is the run's own learned weighted L2 (negative weights included,
so the index's exact L2 rewrite adds one dimension: 129-d search vectors). Queries are fresh
samples, not in the index. Every search goes through the product path
(lookalike.index.search.search_vectors): FAISS shortlist, exact re-rank from the memory-mapped raw
vectors, catalog lookup; recall@15 is measured against exact brute force (NumPy, the first row of
each size). `build_s` is `reindex` to that kind (wall time; `build_cpu_s` the CPU time of all
threads, which says more on shared cores): training, adding, and for IVF-PQ the build-time choice
of nprobe and shortlist (`nprobe`, `rerank` in its rows). `ram_mb` is the FAISS index (its file size, which is what a reader loads); the
raw vectors (n x d x 4 bytes; d = 320 for the default model) stay on disk, memory-mapped, and are read only for the shortlist.

    .venv/bin/python benchmarks/index_search.py --sizes 10000,100000 --json        # minutes
    nice .venv/bin/python benchmarks/index_search.py --sizes 1000000 --json       # about 5 minutes on 2 cores

With no --run, a one-split run is trained on --data first (a few minutes, kept in --workdir).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np

from lookalike.errors import LookalikeError
from lookalike.images import iter_image_files
from lookalike.index.catalog import NewImage
from lookalike.index.metric import IndexMetric
from lookalike.index.search import search_vectors
from lookalike.index.store import ImageIndex

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "fashionTexture"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def trained_run(data: Path, workdir: Path) -> Path:
    """A one-split run with default settings (the default model), trained once and kept in workdir."""
    run = workdir / "run"
    if not (run / "metrics.json").exists():
        log(f"training a one-split run on {data} into {run} (once)")
        subprocess.run([sys.executable, "-m", "lookalike", "run", "--data", str(data), "--out", str(run), "--splits", "1"], check=True, stdout=sys.stderr)
    return run


def real_embeddings(run: Path, data: Path) -> tuple[np.ndarray, IndexMetric]:
    """The run's embeddings of every photo in `data`, and its learned distance as the index uses it."""
    from lookalike.model import SimilarityModel

    model = SimilarityModel.load(run)
    result = model.embedder_.embed([str(p) for p in iter_image_files(data)], progress=False)
    feats, ok, skipped = result.features, result.paths, result.skipped
    if not ok:
        raise SystemExit(f"no photo of {data} could be embedded ({len(skipped)} skipped)")
    return feats.astype(np.float32), IndexMetric.from_ranker(model.ranker_)


class Synthesizer:
    """Samples of a Gaussian KDE around real embeddings (see module docstring)."""

    def __init__(self, feats: np.ndarray, bandwidth: float, seed: int):
        self.feats = feats.astype(np.float32)
        self.centered = ((feats - feats.mean(0)) * (bandwidth / np.sqrt(len(feats) - 1))).astype(np.float32)
        self.rng = np.random.default_rng(seed)

    def sample(self, n: int) -> np.ndarray:
        base = self.feats[self.rng.integers(0, len(self.feats), n)]
        x = base + self.rng.standard_normal((n, len(self.feats)), dtype=np.float32) @ self.centered
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def fill_index(directory: Path, metric: IndexMetric, synth: Synthesizer, n: int, params: dict, chunk: int = 50_000) -> ImageIndex:
    ix = ImageIndex.create(directory, synth.feats.shape[1], metric, kind="flat", params=params, overwrite=True)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        images = [NewImage(f"/synthetic/{start + i}.jpg", None, f"{start + i:064x}", 0, 0.0) for i in range(m)]
        ix.add(images, synth.sample(m))
    return ix


class NumpyBruteForce:
    """The best plain-NumPy exact search: one float32 mat-vec per query via the expanded square."""

    def __init__(self, X: np.ndarray, metric: IndexMetric):
        self.X = X
        self.w = metric.weights.astype(np.float32)
        self.row_term = np.concatenate([(np.asarray(X[s : s + 100_000]) ** 2) @ self.w for s in range(0, len(X), 100_000)])

    def search(self, q: np.ndarray, k: int) -> np.ndarray:
        # -(sum w (q - x)^2) ordering = descending (-2 X (w q) + row_term), constant sum w q^2 dropped
        score = self.row_term - 2.0 * (self.X @ (self.w * q))
        top = np.argpartition(-score, k)[:k]
        return top[np.argsort(-score[top])]


def time_queries(fn, queries) -> tuple[np.ndarray, list]:
    """Per query: wall and CPU milliseconds (rows), and the results."""
    out, times = [], []
    for q in queries:
        t, cpu = time.perf_counter(), time.process_time()
        out.append(fn(q))
        times.append((time.perf_counter() - t, time.process_time() - cpu))
    return np.asarray(times) * 1000, out


def recall(found: list, truth: list, k: int) -> float:
    return float(np.mean([len(set(map(int, f[:k])) & set(map(int, t[:k]))) / k for f, t in zip(found, truth)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000", help="comma-separated catalog sizes")
    ap.add_argument("--kinds", default="flat,hnsw,ivfpq")
    ap.add_argument("--queries", type=int, default=200, help="single queries timed per kind")
    ap.add_argument("--k", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bandwidth", type=float, default=0.5, help="KDE bandwidth h, as a fraction of the real embeddings' spread")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--run", type=Path, help="trained run whose model and learned distance to use (default: train one)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lookalike-index-bench"))
    ap.add_argument("--params", default="{}", help="JSON index parameters, e.g. '{\"hnsw_m\": 16}'")
    ap.add_argument("--json", action="store_true", help="print the rows as one JSON list (progress goes to stderr)")
    args = ap.parse_args()

    faiss.omp_set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    args.workdir.mkdir(parents=True, exist_ok=True)
    feats, metric = real_embeddings(args.run or trained_run(args.data, args.workdir), args.data)
    params = json.loads(args.params)
    log(f"seed: {len(feats)} real {feats.shape[1]}-d embeddings; {metric.describe()}; bandwidth h={args.bandwidth}; threads={args.threads}")
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        synth = Synthesizer(feats, args.bandwidth, seed=n)
        queries = Synthesizer(feats, args.bandwidth, seed=n + 1).sample(args.queries)
        directory = args.workdir / f"index-{n}"
        t = time.perf_counter()
        ix = fill_index(directory, metric, synth, n, params)
        log(f"\nn={n:,}: vectors generated and stored in {time.perf_counter() - t:.1f}s")
        brute = NumpyBruteForce(ix.vectors().matrix, metric)
        np_ms, truth = time_queries(lambda q: brute.search(q, args.k), queries)
        rows.append(_row(n, "numpy brute force", None, np_ms, 1.0, brute.X.nbytes))
        log(_fmt(rows[-1]))
        for kind in args.kinds.split(","):
            t, cpu = time.perf_counter(), time.process_time()
            try:
                ix.reindex(kind)
            except LookalikeError as e:
                log(f"  skipped {kind} at n={n:,}: {e}")
                continue
            build = {"build_s": time.perf_counter() - t, "build_cpu_s": time.process_time() - cpu}
            ann_bytes = (directory / ix.manifest["ann"]["file"]).stat().st_size
            ms, found = time_queries(lambda q: [m.id for m in search_vectors(ix, q, args.k)[0]], queries)
            tuned = {key: ix.manifest["ann"][key] for key in ("nprobe", "rerank") if key in ix.manifest["ann"]}
            rows.append(_row(n, kind, build, ms, recall(found, truth, args.k), ann_bytes) | tuned)
            log(_fmt(rows[-1]))
        ix.close()
        shutil.rmtree(directory)
    print(json.dumps(rows, indent=2) if args.json else _table(rows))


def _row(n, kind, build, ms, rec, index_bytes) -> dict:
    return {
        "n": n,
        "kind": kind,
        "p50_ms": round(float(np.percentile(ms[:, 0], 50)), 2),
        "p99_ms": round(float(np.percentile(ms[:, 0], 99)), 2),
        "p50_cpu_ms": round(float(np.percentile(ms[:, 1], 50)), 2),
        "recall_at_15": round(rec, 4),
        "build_s": None if build is None else round(build["build_s"], 1),
        "build_cpu_s": None if build is None else round(build["build_cpu_s"], 1),
        "ram_mb": round(index_bytes / 2**20, 1),
    }


def _fmt(r: dict) -> str:
    return "  " + "  ".join(f"{k}={v}" for k, v in r.items())


def _table(rows: list[dict]) -> str:
    lines = ["| n | kind | build s (CPU s) | p50 ms (CPU ms) | p99 ms | recall@15 | index RAM MB |", "|" + "---|" * 7]
    for r in rows:
        build = "–" if r["build_s"] is None else f"{r['build_s']} ({r['build_cpu_s']})"
        lines.append(f"| {r['n']:,} | {r['kind']} | {build} | {r['p50_ms']} ({r['p50_cpu_ms']}) | {r['p99_ms']} | {r['recall_at_15']:.3f} | {r['ram_mb']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
