"""Benchmarks (figures for docs/benchmarks.md, never timed tests)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import numpy as np

from lageo_utils.geolocate import NeighbourIndex


def benchmark_gallery(sizes: Sequence[int] = (10_000, 100_000, 1_000_000), dim: int = 512, queries: int = 1000,
                      k: int = 10, seed: int = 0, nprobe: int = 32) -> dict:
    """Gallery search throughput: exact numpy, exact FAISS (IndexFlatIP) and approximate FAISS (IVF-Flat).

    Gallery and queries are random unit vectors (seeded), the hardest case for an approximate
    index: real embeddings cluster, which raises IVF recall. Per size: build seconds, queries per
    second, memory (the float32 gallery; each FAISS index's vectors, ids and centroids, from its
    layout) and recall@k of each FAISS index against exact search.
    """
    import faiss

    rng = np.random.default_rng(seed)
    query_vectors = _unit(rng.standard_normal((queries, dim), dtype=np.float32))
    results = []
    for size in sizes:
        gallery = _unit(rng.standard_normal((size, dim), dtype=np.float32))
        row: dict = {"gallery_size": int(size), "gallery_mb": gallery.nbytes / 2**20}
        exact_ids = None
        for backend in ("exact", "faiss", "faiss-ivf"):
            start = time.perf_counter()
            index = NeighbourIndex(gallery, backend, nprobe=nprobe, seed=seed)
            built = time.perf_counter()
            _, ids = index.search(query_vectors, k)
            searched = time.perf_counter()
            entry = {"build_s": built - start, "search_s": searched - built,
                     "queries_per_s": queries / max(searched - built, 1e-9)}
            if backend == "exact":
                exact_ids = ids
            else:
                nlist = index.settings.get("nlist", 0)  # IVF-Flat also stores an 8-byte id per vector
                index_bytes = gallery.nbytes + (size * 8 + nlist * dim * 4 if nlist else 0)
                entry.update(index_mb=index_bytes / 2**20, recall_at_k=_recall(ids, exact_ids), **index.settings)
            row[backend.replace("-", "_")] = entry
            del index
        results.append(row)
        del gallery
    return {"dim": dim, "k": k, "queries": queries, "seed": seed, "faiss_threads": faiss.omp_get_max_threads(),
            "cpu_count": os.cpu_count(), "results": results}


def _unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each query's true top-k found by the index."""
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found.tolist(), truth.tolist())]))

