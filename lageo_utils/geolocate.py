"""Coordinate answers: where exactly a photo was taken, beyond its region's centroid.

Every method maps numpy inputs to an :class:`Answers` (latitude, longitude and a confidence per
image). Inputs: image embeddings are L2-normalised float32 rows, coordinates are latitude and
longitude in degrees, region probabilities are ``n x n_regions`` in class order.

* ``centroid``: the top-1 region's centroid (the seed's answer).
* ``expected``: the probability-weighted mean of the top-k region centroids.
* ``retrieval``: the k most similar gallery images (cosine similarity), answered with their
  coordinates weighted by ``softmax(similarity / temperature)``.
* ``region_retrieval``: retrieval among the gallery images of the predicted region.
* ``geocell``: a linear head over H3 cells trained with haversine label smoothing (PIGEON),
  answered by the predicted cell's training-image centroid, optionally refined by retrieval
  inside the cell.

Averages of coordinates are taken on the sphere: points become unit vectors in 3-D, the
weighted vector mean is projected back onto the sphere (the extrinsic mean). Unlike averaging
degrees it is right everywhere (the antimeridian, high latitudes); within a city it agrees with
the mean in a local metric projection to well under a metre.

Capture-point voting works on top of every method: pass ``location_ids`` and the headings of
one capture point pool their evidence (mean of probabilities, mean of embeddings renormalised)
before answering, so every heading of a point gets the point's answer.

Tuning (:func:`tune_expected`, :func:`tune_retrieval`, :func:`tune_geocell`, and
:func:`fit_locator` which runs them) takes the training gallery and the validation split only:
there is no argument through which test data could reach a choice.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h3
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from lageo_utils.geo import haversine_km, nearest_km

# Softmax temperatures tried on validation: cosines of one model's neighbours can all sit within 0.02 of each
# other, so the grid reaches down to where only the nearest few neighbours count.
TEMPERATURES = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3)
METHODS = ("centroid", "expected", "retrieval", "region_retrieval", "geocell")
SEARCH_BACKENDS = ("auto", "exact", "faiss", "faiss-ivf")
FAISS_AUTO_MIN_GALLERY = 50_000  # "auto" uses exact numpy search below this many gallery vectors, FAISS above
EXACT_CHUNK_BYTES = 256 * 2**20  # the similarity block of one chunk of queries in exact search
OBJECTIVES = ("median_error_km", "mean_error_km", "acc@<km>")
NEAREST_SHOWN = 3  # nearest gallery images kept per test image for reports (answer_all)


# -- results ------------------------------------------------------------------------------------


@dataclass
class Answers:
    """Coordinate answers for n images, one method.

    ``confidence`` ranks answers for abstention: the top-1 probability for classifiers
    (``centroid``, ``expected``, ``region_retrieval``: the probability of the region searched,
    ``geocell``: of the cell) and the top cosine similarity for ``retrieval``.
    """

    method: str
    lat: np.ndarray  # (n,) degrees
    lon: np.ndarray  # (n,) degrees
    confidence: np.ndarray  # (n,)
    region: np.ndarray | None = None  # (n,) predicted region index (class order), classifier methods
    cell: np.ndarray | None = None  # (n,) predicted geocell index, geocell
    neighbours: np.ndarray | None = None  # (n, k) gallery row indices, best first; -1 pads missing ones
    similarities: np.ndarray | None = None  # (n, k) cosine similarities; NaN pads missing ones

    def __len__(self) -> int:
        return len(self.lat)


def answers_table(rows: pd.DataFrame, answers: Answers, region_ids: Sequence[str] | None = None,
                  gallery: Gallery | None = None) -> pd.DataFrame:
    """A predictions table for coordinate metrics: one row per image, aligned with ``rows``.

    Columns: ``image_path``, ``latitude``, ``longitude``, ``method``, ``pred_lat``, ``pred_lon``,
    ``confidence``, ``error_km``; ``location_id``/``heading``/``region_id`` (as ``true_region``)
    when ``rows`` has them; ``pred_region`` when the answers carry regions and ``region_ids`` is
    given (and ``correct`` when the true region is known); ``neighbours`` (gallery rows, or
    gallery paths when ``gallery`` has paths) and ``neighbour_similarities`` for retrieval methods.
    """
    missing = [c for c in ("image_path", "latitude", "longitude") if c not in rows.columns]
    if missing:
        raise ValueError(f"rows lack column(s) {missing}")
    if len(rows) != len(answers):
        raise ValueError(f"{len(rows)} rows but {len(answers)} answers")
    rows = rows.reset_index(drop=True)
    lat, lon = rows["latitude"].to_numpy(float), rows["longitude"].to_numpy(float)
    table = pd.DataFrame({
        "image_path": rows["image_path"].astype(str).to_numpy(),
        "latitude": lat,
        "longitude": lon,
        "method": answers.method,
        "pred_lat": answers.lat,
        "pred_lon": answers.lon,
        "confidence": answers.confidence,
        "error_km": haversine_km(lat, lon, answers.lat, answers.lon),
    })
    for column, name in (("location_id", "location_id"), ("heading", "heading"), ("region_id", "true_region")):
        if column in rows:
            table[name] = rows[column].to_numpy()
    if answers.region is not None and region_ids is not None:
        table["pred_region"] = np.asarray(region_ids, dtype=object)[answers.region]
        if "true_region" in table:
            table["correct"] = table["pred_region"] == table["true_region"]
    if answers.neighbours is not None:
        names = gallery.paths if gallery is not None and gallery.paths is not None else None
        table["neighbours"] = [
            [names[j] if names is not None else int(j) for j in row if j >= 0] for row in answers.neighbours
        ]
        table["neighbour_similarities"] = [[float(s) for s in row if not np.isnan(s)] for row in answers.similarities]
    return table


# -- geometry -----------------------------------------------------------------------------------


def spherical_mean(lat, lon, weights=None, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean of points on the sphere along ``axis``: the normalised mean of their unit vectors."""
    lat_r, lon_r = np.radians(np.asarray(lat, float)), np.radians(np.asarray(lon, float))
    xyz = np.stack([np.cos(lat_r) * np.cos(lon_r), np.cos(lat_r) * np.sin(lon_r), np.sin(lat_r)], axis=-1)
    w = np.ones(lat_r.shape) if weights is None else np.broadcast_to(np.asarray(weights, float), lat_r.shape)
    axis = axis % lat_r.ndim
    mean = np.sum(xyz * w[..., None], axis=axis)
    norm = np.linalg.norm(mean, axis=-1)
    if np.any(norm < 1e-12):
        raise ValueError("spherical_mean: the weighted points cancel out (antipodal points); no mean exists")
    mean = mean / norm[..., None]
    return np.degrees(np.arcsin(np.clip(mean[..., 2], -1, 1))), np.degrees(np.arctan2(mean[..., 1], mean[..., 0]))


# -- capture-point voting -----------------------------------------------------------------------


def pool_by_location(values, location_ids, normalise: bool = False) -> np.ndarray:
    """Each row replaced by the mean of the rows sharing its ``location_id`` (renormalised if ``normalise``)."""
    values = np.asarray(values)
    ids = pd.Series(np.asarray(location_ids, dtype=object))
    if len(ids) != len(values):
        raise ValueError(f"{len(ids)} location ids for {len(values)} rows")
    if ids.isna().any():
        raise ValueError(f"location_ids has missing values (row {int(np.flatnonzero(ids.isna())[0])})")
    codes, uniques = pd.factorize(ids)
    sums = np.zeros((len(uniques), *values.shape[1:]), dtype=np.float64)
    np.add.at(sums, codes, values)
    pooled = (sums / np.bincount(codes).reshape(-1, *([1] * (values.ndim - 1))))[codes]
    if normalise:
        pooled = pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)
    return pooled.astype(values.dtype if np.issubdtype(values.dtype, np.floating) else np.float64)


def _pooled(values, location_ids, normalise: bool):
    return values if location_ids is None else pool_by_location(values, location_ids, normalise)


# -- nearest-neighbour search -------------------------------------------------------------------


class NeighbourIndex:
    """Top-k inner-product search over L2-normalised vectors (= cosine similarity).

    ``backend``: ``exact`` (numpy matmul in query chunks), ``faiss`` (``IndexFlatIP``, also
    exact), ``faiss-ivf`` (``IndexIVFFlat``, approximate: ``nlist`` k-means lists, sqrt(n) by
    default, ``nprobe`` of them searched), or ``auto`` (exact below ``FAISS_AUTO_MIN_GALLERY`` vectors, ``faiss`` above).
    """

    def __init__(self, embeddings, backend: str = "auto", *, nlist: int | None = None, nprobe: int = 32,
                 seed: int = 0):
        if backend not in SEARCH_BACKENDS:
            raise ValueError(f"search backend must be one of {SEARCH_BACKENDS}, not {backend!r}")
        self.vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
        if self.vectors.ndim != 2 or len(self.vectors) == 0:
            raise ValueError(f"the gallery needs a non-empty (n, dim) embedding matrix, got shape {self.vectors.shape}")
        if backend == "auto":
            backend = "faiss" if len(self.vectors) >= FAISS_AUTO_MIN_GALLERY else "exact"
        self.backend = backend
        self.settings: dict[str, int] = {}  # nlist and nprobe of an IVF index
        self._faiss = None
        if backend == "faiss":
            import faiss

            self._faiss = faiss.IndexFlatIP(self.vectors.shape[1])
            self._faiss.add(self.vectors)
        elif backend == "faiss-ivf":
            self._faiss = _ivf_index(self.vectors, nlist, nprobe, seed)
            self.settings = {"nlist": int(self._faiss.nlist), "nprobe": int(self._faiss.nprobe)}

    def __len__(self) -> int:
        return len(self.vectors)

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Similarities (n, k') float32 and gallery row indices (n, k') int64, best first; k' = min(k, gallery)."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.vectors.shape[1]:
            raise ValueError(f"queries have dimension {queries.shape[1]}, the gallery {self.vectors.shape[1]}")
        k = min(k, len(self.vectors))
        if self._faiss is not None:
            sims, idx = self._faiss.search(queries, k)
            return sims, idx.astype(np.int64)
        return _exact_search(queries, self.vectors, k)


def _exact_search(queries: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by matmul over query chunks; ties go to the lower gallery index."""
    chunk = max(1, EXACT_CHUNK_BYTES // (4 * len(vectors)))
    all_sims, all_idx = [], []
    for start in range(0, len(queries), chunk):
        sims = queries[start : start + chunk] @ vectors.T
        idx = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < sims.shape[1] else np.tile(np.arange(k), (len(sims), 1))
        top = np.take_along_axis(sims, idx, axis=1)
        order = np.lexsort((idx, -top), axis=-1)
        all_sims.append(np.take_along_axis(top, order, axis=1))
        all_idx.append(np.take_along_axis(idx, order, axis=1))
    return np.concatenate(all_sims).astype(np.float32), np.concatenate(all_idx).astype(np.int64)


def _ivf_index(vectors: np.ndarray, nlist: int | None, nprobe: int, seed: int):
    import faiss

    n, dim = vectors.shape
    nlist = nlist or max(1, min(int(math.sqrt(n)), n // 39))  # FAISS wants >= 39 training points per list
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    sample = vectors
    if n > 64 * nlist:  # k-means on a sample: 64 points per list are plenty and keep 1M-vector builds short
        sample = vectors[np.sort(np.random.default_rng(seed).choice(n, 64 * nlist, replace=False))]
    index.cp.seed = seed
    index.train(sample)
    index.add(vectors)
    index.nprobe = min(nprobe, nlist)
    return index


@dataclass
class Gallery:
    """Geotagged images to answer from (the training split): embeddings, coordinates, regions, paths."""

    embeddings: np.ndarray  # (m, dim) float32, L2-normalised
    lat: np.ndarray  # (m,)
    lon: np.ndarray  # (m,)
    region: np.ndarray | None = None  # (m,) region index (class order), needed by region_retrieval
    paths: np.ndarray | None = None  # (m,) image paths, for reporting neighbours
    backend: str = "auto"
    _indices: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        self.embeddings = np.ascontiguousarray(self.embeddings, dtype=np.float32)
        self.lat, self.lon = np.asarray(self.lat, float), np.asarray(self.lon, float)
        m = len(self.embeddings)
        if m == 0:
            raise ValueError("the gallery is empty")
        for name in ("lat", "lon", "region", "paths"):
            value = getattr(self, name)
            if value is not None and len(value) != m:
                raise ValueError(f"gallery {name} has {len(value)} entries for {m} embeddings")
        bad = np.flatnonzero(~np.isfinite(self.lat) | ~np.isfinite(self.lon) | (np.abs(self.lat) > 90))
        if len(bad):
            raise ValueError(f"gallery row {bad[0]} has an invalid coordinate ({self.lat[bad[0]]}, {self.lon[bad[0]]})")
        norms = np.linalg.norm(self.embeddings, axis=1)
        off = np.flatnonzero(np.abs(norms - 1) > 1e-3)
        if len(off):
            raise ValueError(f"gallery embedding row {off[0]} has norm {norms[off[0]]:.4f}; embeddings must be "
                             "L2-normalised")
        if self.region is not None:
            self.region = np.asarray(self.region, dtype=np.int64)
        if self.paths is not None:
            self.paths = np.asarray(self.paths, dtype=object)

    @classmethod
    def from_rows(cls, rows: pd.DataFrame, embeddings, region_ids: Sequence[str] | None = None,
                  backend: str = "auto") -> Gallery:
        """A gallery from manifest rows (``latitude``, ``longitude``, ``image_path``, ``region_id``) and their embeddings.

        ``region_ids`` (class order) maps ``region_id`` to region indices for ``region_retrieval``.
        """
        missing = [c for c in ("latitude", "longitude") if c not in rows.columns]
        if missing:
            raise ValueError(f"gallery rows lack column(s) {missing}")
        region = None
        if region_ids is not None:
            if "region_id" not in rows.columns:
                raise ValueError("gallery rows need a 'region_id' column when region_ids are given")
            codes = pd.Series(rows["region_id"].to_numpy()).map({r: i for i, r in enumerate(region_ids)})
            if codes.isna().any():
                i = int(np.flatnonzero(codes.isna())[0])
                raise ValueError(f"gallery row {i} has region_id {rows['region_id'].iloc[i]!r}, not in region_ids")
            region = codes.to_numpy(dtype=np.int64)
        paths = rows["image_path"].astype(str).to_numpy() if "image_path" in rows.columns else None
        return cls(embeddings, rows["latitude"].to_numpy(float), rows["longitude"].to_numpy(float), region, paths,
                   backend)

    def __len__(self) -> int:
        return len(self.embeddings)

    def search(self, queries, k: int, rows=None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k neighbours: similarities and gallery row indices, best first.

        ``rows`` limits the search to those gallery rows (a region's, a cell's); results are then
        padded to ``min(k, len(self))`` columns with NaN / -1. Indices are built once per subset.
        """
        if rows is None:
            return self._index(None).search(queries, k)
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            raise ValueError("cannot search an empty subset of the gallery")
        sims, idx = self._index(rows).search(queries, k)
        width = min(k, len(self))
        out_sims = np.full((len(sims), width), np.nan, dtype=np.float32)
        out_idx = np.full((len(idx), width), -1, dtype=np.int64)
        out_sims[:, : sims.shape[1]], out_idx[:, : idx.shape[1]] = sims, rows[idx]
        return out_sims, out_idx

    def _index(self, rows: np.ndarray | None) -> NeighbourIndex:
        key = None if rows is None else (len(rows), hash(rows.tobytes()))
        if key not in self._indices:
            vectors = self.embeddings if rows is None else self.embeddings[rows]
            self._indices[key] = NeighbourIndex(vectors, self.backend)
        return self._indices[key]


def search(queries, gallery_embeddings, k: int, backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """One-off top-k cosine search: similarities and gallery row indices, best first."""
    return NeighbourIndex(gallery_embeddings, backend).search(queries, k)


# -- classifier methods -------------------------------------------------------------------------


def centroid(probs, centroids, *, location_ids=None) -> Answers:
    """The top-1 region's centroid; confidence is its probability."""
    probs, centroids = _check_probs(probs, centroids)
    probs = _pooled(probs, location_ids, normalise=False)
    top = np.argmax(probs, axis=1)
    return Answers("centroid", centroids[top, 0].copy(), centroids[top, 1].copy(), probs[np.arange(len(top)), top],
                   region=top)


def expected(probs, centroids, k: int = 3, *, location_ids=None) -> Answers:
    """The spherical mean of the top-k region centroids weighted by their renormalised probabilities.

    Confidence is the top-1 probability (as for ``centroid``); ``k=1`` is the centroid answer.
    """
    probs, centroids = _check_probs(probs, centroids)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    probs = _pooled(probs, location_ids, normalise=False)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    weights = np.take_along_axis(probs, order, axis=1)
    lat, lon = spherical_mean(centroids[order, 0], centroids[order, 1], weights / weights.sum(1, keepdims=True))
    return Answers("expected", lat, lon, weights[:, 0], region=order[:, 0])


def _check_probs(probs, centroids) -> tuple[np.ndarray, np.ndarray]:
    probs, centroids = np.atleast_2d(np.asarray(probs, float)), np.asarray(centroids, float)
    if centroids.ndim != 2 or centroids.shape[1] != 2:
        raise ValueError(f"centroids must be (n_regions, 2) latitude/longitude, got shape {centroids.shape}")
    if probs.shape[1] != len(centroids):
        raise ValueError(f"probabilities have {probs.shape[1]} columns for {len(centroids)} region centroids")
    return probs, centroids


# -- retrieval methods --------------------------------------------------------------------------


def retrieval(embeddings, gallery: Gallery, k: int = 10, temperature: float = 0.05, *, location_ids=None) -> Answers:
    """The softmax(similarity / temperature)-weighted spherical mean of the k nearest gallery images.

    Confidence is the top similarity; ``neighbours``/``similarities`` hold the k neighbours.
    """
    queries = _pooled(_check_queries(embeddings, gallery), location_ids, normalise=True)
    sims, idx = gallery.search(queries, k)
    lat, lon = _weighted_answer(sims, idx, gallery, temperature)
    return Answers("retrieval", lat, lon, sims[:, 0].astype(float), neighbours=idx, similarities=sims)


def region_retrieval(embeddings, probs, gallery: Gallery, k: int = 10, temperature: float = 0.05, *,
                     location_ids=None) -> Answers:
    """Retrieval among the gallery images of the predicted region (the classifier picks where to look).

    A query whose top region has no gallery image searches the most probable region that has
    some. Confidence is the probability of the region searched; ``region`` is that region.
    """
    if gallery.region is None:
        raise ValueError("region_retrieval needs a gallery with regions (Gallery.from_rows(..., region_ids=...))")
    probs = np.atleast_2d(np.asarray(probs, float))
    queries = _pooled(_check_queries(embeddings, gallery), location_ids, normalise=True)
    probs = _pooled(probs, location_ids, normalise=False)
    if len(probs) != len(queries):
        raise ValueError(f"{len(probs)} probability rows for {len(queries)} embeddings")
    if gallery.region.min() < 0 or gallery.region.max() >= probs.shape[1]:
        raise ValueError(f"gallery region indices span {gallery.region.min()}..{gallery.region.max()} but the "
                         f"probabilities have {probs.shape[1]} regions")
    stocked = np.zeros(probs.shape[1], dtype=bool)
    stocked[gallery.region] = True
    chosen = np.argmax(np.where(stocked, probs, -np.inf), axis=1)
    width = min(k, len(gallery))
    sims = np.full((len(queries), width), np.nan, dtype=np.float32)
    idx = np.full((len(queries), width), -1, dtype=np.int64)
    for r in np.unique(chosen):
        members = chosen == r
        sims[members], idx[members] = gallery.search(queries[members], k, rows=np.flatnonzero(gallery.region == r))
    lat, lon = _weighted_answer(sims, idx, gallery, temperature)
    return Answers("region_retrieval", lat, lon, probs[np.arange(len(chosen)), chosen], region=chosen,
                   neighbours=idx, similarities=sims)


def _check_queries(embeddings, gallery: Gallery) -> np.ndarray:
    queries = np.atleast_2d(np.asarray(embeddings, dtype=np.float32))
    if queries.shape[1] != gallery.embeddings.shape[1]:
        raise ValueError(f"embeddings have dimension {queries.shape[1]}, the gallery {gallery.embeddings.shape[1]}")
    return queries


def _weighted_answer(sims: np.ndarray, idx: np.ndarray, gallery: Gallery, temperature: float):
    """Spherical mean of the neighbours' coordinates, weights softmax(sim / temperature); -1 neighbours get 0."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    valid = idx >= 0
    logits = np.where(valid, sims.astype(float) / temperature, -np.inf)
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    safe = np.where(valid, idx, 0)
    return spherical_mean(gallery.lat[safe], gallery.lon[safe], weights / weights.sum(axis=1, keepdims=True))


# -- geocells -----------------------------------------------------------------------------------


@dataclass
class GeoCells:
    """H3 cells holding the training images after sparse cells were merged into their parents.

    ``lat``/``lon`` are each cell's training-image centroid (the geocell answer), ``centre_lat``/
    ``centre_lon`` its H3 centre; resolutions vary after merging (at most ``resolution``).
    """

    ids: list[str]
    lat: np.ndarray
    lon: np.ndarray
    centre_lat: np.ndarray
    centre_lon: np.ndarray
    counts: np.ndarray
    resolution: int
    min_cell_images: int

    def __len__(self) -> int:
        return len(self.ids)

    def assign(self, lat, lon) -> np.ndarray:
        """Cell index of each point: its finest H3 ancestor among the cells, else the nearest cell centroid."""
        lookup = {cell: i for i, cell in enumerate(self.ids)}
        lat, lon = np.asarray(lat, float), np.asarray(lon, float)
        out = np.full(len(lat), -1, dtype=np.int64)
        for i, (a, b) in enumerate(zip(lat, lon)):
            cell = h3.latlng_to_cell(a, b, self.resolution)
            for res in range(self.resolution, -1, -1):
                ancestor = cell if res == self.resolution else h3.cell_to_parent(cell, res)
                if ancestor in lookup:
                    out[i] = lookup[ancestor]
                    break
        outside = out < 0
        if outside.any():
            out[outside] = nearest_km(lat[outside], lon[outside], self.lat, self.lon)[1]
        return out


def build_geocells(lat, lon, resolution: int = 8, min_cell_images: int = 10) -> tuple[GeoCells, np.ndarray]:
    """H3 cells at ``resolution`` for the training points, sparse ones merged upwards; also each point's cell index.

    Cells with fewer than ``min_cell_images`` points are replaced by their parent, one resolution
    at a time from the finest, until every cell has enough points or is a resolution-0 cell.
    """
    lat, lon = np.asarray(lat, float), np.asarray(lon, float)
    if len(lat) == 0:
        raise ValueError("build_geocells needs at least one training point")
    if not 0 <= resolution <= 15:
        raise ValueError(f"H3 resolution must be between 0 and 15, got {resolution}")
    if min_cell_images < 1:
        raise ValueError(f"min_cell_images must be at least 1, got {min_cell_images}")
    assigned = np.array([h3.latlng_to_cell(a, b, resolution) for a, b in zip(lat, lon)], dtype=object)
    for res in range(resolution, 0, -1):  # only cells at the finest remaining resolution can be sparse
        cells, codes, counts = np.unique(assigned, return_inverse=True, return_counts=True)
        sparse = np.array([counts[c] < min_cell_images and h3.get_resolution(cells[c]) == res for c in codes])
        if not sparse.any():
            break
        assigned[sparse] = [h3.cell_to_parent(c, res - 1) for c in assigned[sparse]]
    ids, codes, counts = np.unique(assigned, return_inverse=True, return_counts=True)
    c_lat, c_lon = np.zeros(len(ids)), np.zeros(len(ids))
    for i in range(len(ids)):
        c_lat[i], c_lon[i] = spherical_mean(lat[codes == i], lon[codes == i])
    centres = np.array([h3.cell_to_latlng(c) for c in ids])
    cells = GeoCells(list(ids), c_lat, c_lon, centres[:, 0], centres[:, 1], counts, resolution, min_cell_images)
    return cells, codes.astype(np.int64)


def haversine_smoothing(lat, lon, cell_lat, cell_lon, tau_km: float) -> np.ndarray:
    """PIGEON's label smoothing: row i over cells is proportional to exp(-haversine(point i, cell) / tau_km)."""
    if not tau_km > 0:
        raise ValueError(f"tau_km must be positive, got {tau_km}")
    d = haversine_km(np.asarray(lat, float)[:, None], np.asarray(lon, float)[:, None],
                     np.asarray(cell_lat, float)[None, :], np.asarray(cell_lon, float)[None, :])
    logits = -(d - d.min(axis=1, keepdims=True)) / tau_km  # shifted for stability; cancels in the normalisation
    weights = np.exp(logits)
    return weights / weights.sum(axis=1, keepdims=True)


@dataclass
class GeocellModel:
    """A linear head over geocells: probabilities = softmax(embeddings @ weight.T + bias)."""

    cells: GeoCells
    weight: np.ndarray  # (n_cells, dim) float32
    bias: np.ndarray  # (n_cells,) float32
    tau_km: float
    train_cell: np.ndarray  # (n_train,) the cell of each training image (gallery row order)

    def probabilities(self, embeddings) -> np.ndarray:
        """Cell probabilities (n x n_cells, float64)."""
        x = np.atleast_2d(np.asarray(embeddings, dtype=np.float32))
        logits = (x @ self.weight.T + self.bias).astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)


def train_geocell_head(embeddings, lat, lon, *, resolution: int = 8, min_cell_images: int = 10, tau_km: float = 1.0,
                       epochs: int = 20, lr: float = 0.05, weight_decay: float = 1e-4, batch_size: int = 1024,
                       seed: int = 0) -> GeocellModel:
    """Train a geocell head on cached training embeddings with haversine-smoothed targets (AdamW, CPU).

    The loss is cross-entropy against :func:`haversine_smoothing` targets over every cell. The
    head starts at zero (the problem is convex) and batches are shuffled by a generator seeded
    with ``seed``: the same inputs and seed give the same weights.
    """
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if len(x) != len(lat) or len(x) != len(lon):
        raise ValueError(f"{len(x)} embeddings for {len(lat)} latitudes and {len(lon)} longitudes")
    cells, train_cell = build_geocells(lat, lon, resolution, min_cell_images)
    targets = haversine_smoothing(lat, lon, cells.lat, cells.lon, tau_km)
    head = torch.nn.Linear(x.shape[1], len(cells))
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    optimiser = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    features, soft = torch.from_numpy(x), torch.from_numpy(targets.astype(np.float32))
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=generator).split(batch_size):
            loss = F.cross_entropy(head(features[batch]), soft[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return GeocellModel(cells, head.weight.detach().numpy().copy(), head.bias.detach().numpy().copy(), tau_km,
                        train_cell)


def geocell(embeddings, model: GeocellModel, *, gallery: Gallery | None = None, k: int = 0,
            temperature: float = 0.05, location_ids=None) -> Answers:
    """The predicted cell's training-image centroid; with ``gallery`` and ``k > 0``, retrieval inside that cell.

    ``gallery`` must be the training images the head was trained on, in the same order.
    Confidence is the top cell probability. Voting pools cell probabilities (and embeddings for
    the refinement).
    """
    queries = np.atleast_2d(np.asarray(embeddings, dtype=np.float32))
    probs = _pooled(model.probabilities(queries), location_ids, normalise=False)
    top = np.argmax(probs, axis=1)
    confidence = probs[np.arange(len(top)), top]
    if gallery is None or k == 0:
        return Answers("geocell", model.cells.lat[top], model.cells.lon[top], confidence, cell=top)
    if len(gallery) != len(model.train_cell):
        raise ValueError(f"the gallery has {len(gallery)} images, the geocell head was trained on "
                         f"{len(model.train_cell)}: refine with the training gallery")
    queries = _pooled(_check_queries(queries, gallery), location_ids, normalise=True)
    width = min(k, len(gallery))
    sims = np.full((len(queries), width), np.nan, dtype=np.float32)
    idx = np.full((len(queries), width), -1, dtype=np.int64)
    for c in np.unique(top):
        members = top == c
        sims[members], idx[members] = gallery.search(queries[members], k, rows=np.flatnonzero(model.train_cell == c))
    lat, lon = _weighted_answer(sims, idx, gallery, temperature)
    return Answers("geocell", lat, lon, confidence, cell=top, neighbours=idx, similarities=sims)


def save_geocell_model(model: GeocellModel, path: str | os.PathLike) -> None:
    """Write a geocell head to ``path`` (readable with ``torch.load(weights_only=True)``)."""
    cells = model.cells
    torch.save({
        "format": 1, "ids": list(cells.ids), "resolution": cells.resolution, "min_cell_images": cells.min_cell_images,
        "tau_km": model.tau_km,
        **{name: torch.from_numpy(np.asarray(value).copy()) for name, value in (
            ("lat", cells.lat), ("lon", cells.lon), ("centre_lat", cells.centre_lat), ("centre_lon", cells.centre_lon),
            ("counts", cells.counts), ("weight", model.weight), ("bias", model.bias),
            ("train_cell", model.train_cell))},
    }, path)


def load_geocell_model(path: str | os.PathLike) -> GeocellModel:
    """Read a geocell head written by :func:`save_geocell_model`."""
    state = torch.load(path, weights_only=True)
    if state.get("format") != 1:
        raise ValueError(f"{path}: not a geocell head (format {state.get('format')!r})")
    arr = {k: v.numpy() for k, v in state.items() if isinstance(v, torch.Tensor)}
    cells = GeoCells(state["ids"], arr["lat"], arr["lon"], arr["centre_lat"], arr["centre_lon"], arr["counts"],
                     state["resolution"], state["min_cell_images"])
    return GeocellModel(cells, arr["weight"], arr["bias"], state["tau_km"], arr["train_cell"])


# -- tuning on the validation split -------------------------------------------------------------


@dataclass(frozen=True)
class ExpectedSettings:
    k: int
    objective: str
    score: float  # the objective on the validation split
    grid: tuple[tuple[int, float], ...]  # (k, score) for every candidate


@dataclass(frozen=True)
class RetrievalSettings:
    k: int
    temperature: float
    objective: str
    score: float
    grid: tuple[tuple[int, float, float], ...]  # (k, temperature, score)


@dataclass(frozen=True)
class GeocellSettings:
    resolution: int
    min_cell_images: int
    tau_km: float
    objective: str
    score: float
    grid: tuple[tuple[int, int, float, float], ...]  # (resolution, min_cell_images, tau_km, score)


def objective_score(errors_km, objective: str = "median_error_km") -> float:
    """The tuning objective on validation errors, as a number to maximise.

    ``median_error_km`` / ``mean_error_km`` (negated) or ``acc@<km>``, e.g. ``acc@1``.
    """
    errors = np.asarray(errors_km, float)
    if objective == "median_error_km":
        return -float(np.median(errors))
    if objective == "mean_error_km":
        return -float(np.mean(errors))
    if objective.startswith("acc@"):
        try:
            threshold = float(objective[4:])
        except ValueError:
            raise ValueError(f"objective {objective!r}: acc@ needs a distance in km, e.g. acc@1") from None
        return float(np.mean(errors <= threshold))
    raise ValueError(f"objective must be one of {OBJECTIVES}, not {objective!r}")


def tune_expected(val_probs, val_lat, val_lon, centroids, *, ks: Sequence[int] = (1, 2, 3, 5),
                  objective: str = "median_error_km", val_location_ids=None) -> ExpectedSettings:
    """The k of :func:`expected` that scores best on the validation split (ties: the first candidate)."""
    grid = []
    for k in ks:
        a = expected(val_probs, centroids, k, location_ids=val_location_ids)
        grid.append((int(k), objective_score(haversine_km(val_lat, val_lon, a.lat, a.lon), objective)))
    best = max(range(len(grid)), key=lambda i: grid[i][1])  # max keeps the first of equal scores
    return ExpectedSettings(grid[best][0], objective, grid[best][1], tuple(grid))


def tune_retrieval(val_embeddings, val_lat, val_lon, gallery: Gallery, *, val_probs=None,
                   ks: Sequence[int] = (1, 3, 5, 10, 20, 50), temperatures: Sequence[float] = TEMPERATURES,
                   objective: str = "median_error_km", val_location_ids=None) -> RetrievalSettings:
    """k and temperature of retrieval chosen on the validation split (ties: the first candidate).

    With ``val_probs`` the candidates are scored as :func:`region_retrieval`, else as
    :func:`retrieval`. The neighbours are searched once, at the largest k.
    """
    kmax = max(ks)
    if val_probs is None:
        found = retrieval(val_embeddings, gallery, kmax, location_ids=val_location_ids)
    else:
        found = region_retrieval(val_embeddings, val_probs, gallery, kmax, location_ids=val_location_ids)
    grid = []
    for k in ks:
        for t in temperatures:
            lat, lon = _weighted_answer(found.similarities[:, :k], found.neighbours[:, :k], gallery, t)
            grid.append((int(k), float(t), objective_score(haversine_km(val_lat, val_lon, lat, lon), objective)))
    best = max(range(len(grid)), key=lambda i: grid[i][2])
    return RetrievalSettings(grid[best][0], grid[best][1], objective, grid[best][2], tuple(grid))


def tune_geocell(train_embeddings, train_lat, train_lon, val_embeddings, val_lat, val_lon, *,
                 resolutions: Sequence[int] = (7, 8), min_cell_images: Sequence[int] = (10,),
                 taus_km: Sequence[float] = (0.5, 2.0), objective: str = "median_error_km", epochs: int = 20,
                 seed: int = 0, val_location_ids=None) -> tuple[GeocellSettings, GeocellModel]:
    """Geocell resolution, merge threshold and tau chosen on the validation split; the chosen trained head too."""
    grid, models = [], []
    for res in resolutions:
        for min_images in min_cell_images:
            for tau in taus_km:
                model = train_geocell_head(train_embeddings, train_lat, train_lon, resolution=res,
                                           min_cell_images=min_images, tau_km=tau, epochs=epochs, seed=seed)
                a = geocell(val_embeddings, model, location_ids=val_location_ids)
                score = objective_score(haversine_km(val_lat, val_lon, a.lat, a.lon), objective)
                grid.append((int(res), int(min_images), float(tau), score))
                models.append(model)
    best = max(range(len(grid)), key=lambda i: grid[i][3])
    res, min_images, tau, score = grid[best]
    return GeocellSettings(res, min_images, tau, objective, score, tuple(grid)), models[best]


# -- everything fitted, ready to answer ---------------------------------------------------------


@dataclass
class Locator:
    """The fitted pieces every method needs: region centroids, gallery, tuned settings, geocell head."""

    centroids: np.ndarray  # (n_regions, 2)
    gallery: Gallery | None = None
    expected_settings: ExpectedSettings | None = None
    retrieval_settings: RetrievalSettings | None = None
    region_retrieval_settings: RetrievalSettings | None = None
    geocell_settings: GeocellSettings | None = None
    geocell_model: GeocellModel | None = None
    geocell_refine: bool = True  # refine geocell answers by retrieval inside the cell (retrieval's k, temperature)

    def answer(self, method: str, embeddings=None, probs=None, *, location_ids=None) -> Answers:
        """Answers of ``method`` (one of ``METHODS``) for the images' embeddings and/or region probabilities."""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; methods are {METHODS}")
        needs_probs = method in ("centroid", "expected", "region_retrieval")
        needs_embeddings = method in ("retrieval", "region_retrieval", "geocell")
        if needs_probs and probs is None:
            raise ValueError(f"method {method!r} needs region probabilities")
        if needs_embeddings and embeddings is None:
            raise ValueError(f"method {method!r} needs image embeddings")
        if method == "centroid":
            return centroid(probs, self.centroids, location_ids=location_ids)
        if method == "expected":
            return expected(probs, self.centroids, self._settings("expected", self.expected_settings).k,
                            location_ids=location_ids)
        if method == "retrieval":
            s = self._settings(method, self.retrieval_settings)
            return retrieval(embeddings, self._need_gallery(), s.k, s.temperature, location_ids=location_ids)
        if method == "region_retrieval":
            s = self._settings(method, self.region_retrieval_settings)
            return region_retrieval(embeddings, probs, self._need_gallery(), s.k, s.temperature,
                                    location_ids=location_ids)
        model = self._settings(method, self.geocell_model)
        refine = self.retrieval_settings if self.geocell_refine else None
        return geocell(embeddings, model, gallery=self.gallery if refine else None, k=refine.k if refine else 0,
                       temperature=refine.temperature if refine else 1.0, location_ids=location_ids)

    def settings(self) -> dict:
        """The chosen settings and their validation grids, as plain data (for params/metrics files)."""
        out: dict = {}
        for name, value in (("expected", self.expected_settings), ("retrieval", self.retrieval_settings),
                            ("region_retrieval", self.region_retrieval_settings), ("geocell", self.geocell_settings)):
            if value is not None:
                out[name] = {k: [list(row) for row in v] if k == "grid" else v for k, v in asdict(value).items()}
        if self.geocell_model is not None:
            out["geocell"]["n_cells"] = len(self.geocell_model.cells)
            out["geocell"]["refine"] = self.geocell_refine
        return out

    def _settings(self, method: str, value):
        if value is None:
            raise ValueError(f"this locator was not fitted for {method!r}: pass it in fit_locator's methods")
        return value

    def _need_gallery(self) -> Gallery:
        if self.gallery is None:
            raise ValueError("retrieval methods need a gallery")
        return self.gallery


def fit_locator(centroids, gallery: Gallery | None, val_embeddings, val_probs, val_lat, val_lon, *,
                methods: Sequence[str] = METHODS, val_location_ids=None, objective: str = "median_error_km",
                expected_ks: Sequence[int] = (1, 2, 3, 5), retrieval_ks: Sequence[int] = (1, 3, 5, 10, 20, 50),
                temperatures: Sequence[float] = TEMPERATURES, geocell_resolutions: Sequence[int] = (7, 8),
                geocell_min_cell_images: Sequence[int] = (10,), geocell_taus_km: Sequence[float] = (0.5, 2.0),
                geocell_epochs: int = 20, geocell_refine: bool = True, seed: int = 0) -> Locator:
    """Tune every requested method on the validation split and train the geocell head on the gallery.

    Takes the training gallery and the validation split only: the test split is answered
    afterwards with :meth:`Locator.answer`, so it cannot influence any setting. With
    ``val_location_ids`` the settings are tuned for capture-point voting.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; methods are {METHODS}")
    if val_probs is None and set(methods) & {"expected", "region_retrieval"}:
        raise ValueError("expected and region_retrieval are tuned on validation region probabilities: pass val_probs")
    if gallery is None and set(methods) & {"retrieval", "region_retrieval", "geocell"}:
        raise ValueError("retrieval, region_retrieval and geocell need the training gallery")
    loc = Locator(np.asarray(centroids, float), gallery, geocell_refine=geocell_refine)
    kw = {"objective": objective, "val_location_ids": val_location_ids}
    if "expected" in methods:
        loc.expected_settings = tune_expected(val_probs, val_lat, val_lon, centroids, ks=expected_ks, **kw)
    if "retrieval" in methods or ("geocell" in methods and geocell_refine):
        loc.retrieval_settings = tune_retrieval(val_embeddings, val_lat, val_lon, gallery, ks=retrieval_ks,
                                                temperatures=temperatures, **kw)
    if "region_retrieval" in methods:
        loc.region_retrieval_settings = tune_retrieval(val_embeddings, val_lat, val_lon, gallery, val_probs=val_probs,
                                                       ks=retrieval_ks, temperatures=temperatures, **kw)
    if "geocell" in methods:
        loc.geocell_settings, loc.geocell_model = tune_geocell(
            gallery.embeddings, gallery.lat, gallery.lon, val_embeddings, val_lat, val_lon,
            resolutions=geocell_resolutions, min_cell_images=geocell_min_cell_images, taus_km=geocell_taus_km,
            epochs=geocell_epochs, seed=seed, **kw)
    return loc


def answer_all(locator: Locator, rows: pd.DataFrame, embeddings, probs, region_ids: Sequence[str],
               methods: Sequence[str] = METHODS) -> pd.DataFrame:
    """Every method's answers for ``rows``, per image and voted per capture point, as one table.

    The :func:`answers_table` of each method is stacked with a ``voted`` column: False for the
    per-image answers, True for those after capture-point voting (when ``rows`` has a
    ``location_id``). Rows follow ``methods``, then per image before voted. With a gallery, the
    per-image rows also carry each image's ``NEAREST_SHOWN`` nearest gallery images (``nearest``:
    paths or rows, ``nearest_similarities``) whatever k the methods use, for reports.
    """
    parts = []
    location_ids = rows["location_id"].to_numpy() if "location_id" in rows.columns else None
    nearest = None
    if locator.gallery is not None:
        g = locator.gallery
        sims, idx = g.search(_check_queries(embeddings, g), NEAREST_SHOWN)
        nearest = {"nearest": [[g.paths[j] if g.paths is not None else int(j) for j in row] for row in idx],
                   "nearest_similarities": [[float(v) for v in row] for row in sims]}
    for method in methods:
        for voted in (False, True) if location_ids is not None else (False,):
            answers = locator.answer(method, embeddings, probs, location_ids=location_ids if voted else None)
            table = answers_table(rows, answers, region_ids, locator.gallery).assign(voted=voted)
            if nearest is not None and not voted:
                table = table.assign(**nearest)
            parts.append(table)
    return pd.concat(parts, ignore_index=True)


LOCATOR_FILE, GALLERY_FILE, GEOCELL_FILE = "locator.json", "gallery.npz", "geocell.pt"
_SETTINGS = {"expected": ExpectedSettings, "retrieval": RetrievalSettings, "region_retrieval": RetrievalSettings,
             "geocell": GeocellSettings}


def save_locator(locator: Locator, directory: str | os.PathLike) -> None:
    """Write a fitted locator to ``directory``: ``locator.json`` (centroids, settings), ``gallery.npz``
    (embeddings, coordinates, regions, paths) and ``geocell.pt`` (the head), each when present.

    A locator belongs to one model: the gallery holds that model's embeddings.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    settings = {name: asdict(value) for name, value in (
        ("expected", locator.expected_settings), ("retrieval", locator.retrieval_settings),
        ("region_retrieval", locator.region_retrieval_settings), ("geocell", locator.geocell_settings))
        if value is not None}
    doc = {"format": 1, "centroids": np.asarray(locator.centroids, float).tolist(),
           "geocell_refine": locator.geocell_refine, "settings": settings,
           "gallery_backend": locator.gallery.backend if locator.gallery is not None else None}
    (directory / LOCATOR_FILE).write_text(json.dumps(doc, indent=1))
    if locator.gallery is not None:
        g = locator.gallery
        arrays = {"embeddings": g.embeddings, "lat": g.lat, "lon": g.lon}
        if g.region is not None:
            arrays["region"] = g.region
        if g.paths is not None:
            arrays["paths"] = np.asarray(g.paths, dtype=str)
        np.savez(directory / GALLERY_FILE, **arrays)
    if locator.geocell_model is not None:
        save_geocell_model(locator.geocell_model, directory / GEOCELL_FILE)


def load_locator(directory: str | os.PathLike) -> Locator:
    """Read a locator written by :func:`save_locator`."""
    directory = Path(directory)
    path = directory / LOCATOR_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: no fitted locator in {directory}")
    doc = json.loads(path.read_text())
    if doc.get("format") != 1:
        raise ValueError(f"{path}: unknown locator format {doc.get('format')!r}")
    gallery = None
    if (directory / GALLERY_FILE).exists():
        with np.load(directory / GALLERY_FILE, allow_pickle=False) as arrays:
            gallery = Gallery(arrays["embeddings"], arrays["lat"], arrays["lon"],
                              arrays["region"] if "region" in arrays else None,
                              arrays["paths"] if "paths" in arrays else None, doc["gallery_backend"])
    settings = {name: _SETTINGS[name](**{k: tuple(map(tuple, v)) if k == "grid" else v for k, v in fields.items()})
                for name, fields in doc["settings"].items()}
    model = load_geocell_model(directory / GEOCELL_FILE) if (directory / GEOCELL_FILE).exists() else None
    return Locator(np.asarray(doc["centroids"], float), gallery, settings.get("expected"), settings.get("retrieval"),
                   settings.get("region_retrieval"), settings.get("geocell"), model, doc["geocell_refine"])
