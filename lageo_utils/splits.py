"""Train/validation/test splits without geographic leakage, and the leakage audit."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from lageo_utils.geo import nearest_km

SPLITS = ("train", "val", "test")
STRATEGIES = ("location", "image")


def split(
    manifest: pd.DataFrame,
    strategy: str = "location",
    fractions: tuple[float, float, float] = (0.70, 0.15, 0.15),
    seed: int = 42,
    buffer_m: float = 0.0,
) -> dict[str, pd.DataFrame]:
    """Split a labelled manifest into ``train``, ``val`` and ``test``, stratified by region.

    ``strategy="location"`` keeps every ``location_id`` (capture point) in one split; with
    ``buffer_m > 0``, validation and test images within that distance of a training capture
    point are moved out of the evaluation splits into ``excluded`` (returned, never lost).
    ``strategy="image"`` is the authors' image-level split, kept for comparison: it lets the
    four headings of one panorama fall into different splits.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, not {strategy!r}")
    if len(fractions) != 3 or min(fractions) < 0 or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, not {fractions}")
    if manifest["region_id"].isna().any():
        raise ValueError("every manifest row needs a region_id before splitting")
    if strategy == "image":
        parts = _image_split(manifest, fractions, seed)
    else:
        parts = _location_split(manifest, fractions, seed)
    parts["excluded"] = manifest.iloc[0:0]
    if buffer_m > 0:
        parts = _apply_buffer(parts, buffer_m)
    return {k: v.reset_index(drop=True) for k, v in parts.items()}


def audit_leakage(train: pd.DataFrame, test: pd.DataFrame, radius_m: float = 50.0) -> dict[str, int]:
    """How many test images share an exact coordinate with, lie within ``radius_m`` of, or beyond, training."""
    train_coords = set(zip(train["latitude"].to_numpy(float), train["longitude"].to_numpy(float)))
    exact = sum((lat, lon) in train_coords for lat, lon in zip(test["latitude"], test["longitude"]))
    if len(train) and len(test):
        dist_km, _ = nearest_km(test["latitude"], test["longitude"], train["latitude"], train["longitude"])
    else:
        dist_km = np.full(len(test), np.inf)
    within = int(np.sum(dist_km * 1000 <= radius_m))
    return {
        "test_images": int(len(test)),
        "exact_train_coordinate": int(exact),
        f"within_{radius_m:g}m_of_train": within,
        f"beyond_{radius_m:g}m_from_train": int(len(test) - within),
    }


def _image_split(manifest: pd.DataFrame, fractions, seed: int) -> dict[str, pd.DataFrame]:
    train_frac, val_frac, test_frac = fractions
    idx = manifest.index.to_numpy()
    strata = manifest["region_id"].to_numpy()
    train_idx, rest_idx = train_test_split(idx, train_size=train_frac, stratify=strata, random_state=seed)
    rest_strata = manifest.loc[rest_idx, "region_id"].to_numpy()
    val_share = val_frac / (val_frac + test_frac)
    val_idx, test_idx = train_test_split(rest_idx, train_size=val_share, stratify=rest_strata, random_state=seed)
    return {name: manifest.loc[np.sort(i)] for name, i in zip(SPLITS, (train_idx, val_idx, test_idx))}


def _location_split(manifest: pd.DataFrame, fractions, seed: int) -> dict[str, pd.DataFrame]:
    # scikit-learn's group splitters give folds, not a stratified three-way split by
    # fractions, so capture points are allocated here: per region, shuffle the points and
    # give each split its share of them (largest remainder), at least one point per split
    # with a non-zero fraction when the region has enough points.
    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    for _, group in manifest.groupby("region_id", sort=True):
        locations = np.sort(group["location_id"].unique())
        order = locations[rng.permutation(len(locations))]
        counts = _allocate(len(order), np.asarray(fractions, dtype=float))
        labels = np.repeat(np.array(SPLITS), counts)
        assignment.update(zip(order, labels))
    which = manifest["location_id"].map(assignment)
    return {name: manifest[which == name] for name in SPLITS}


def _allocate(n: int, fractions: np.ndarray) -> np.ndarray:
    """Split ``n`` items by ``fractions`` (largest remainder), each non-zero share getting one if possible."""
    exact = fractions * n
    counts = np.floor(exact).astype(int)
    counts[np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]] += 1
    wanted = fractions > 0
    if n >= wanted.sum():
        for i in np.flatnonzero(wanted & (counts == 0)):
            counts[i] += 1
            counts[np.argmax(counts)] -= 1
    return counts


def _apply_buffer(parts: dict[str, pd.DataFrame], buffer_m: float) -> dict[str, pd.DataFrame]:
    train = parts["train"]
    excluded = [parts["excluded"]]
    for name in ("val", "test"):
        part = parts[name]
        if len(part) and len(train):
            dist_km, _ = nearest_km(part["latitude"], part["longitude"], train["latitude"], train["longitude"])
            near = dist_km * 1000 <= buffer_m
            excluded.append(part[near].assign(excluded_from=name))
            parts[name] = part[~near]
    parts["excluded"] = pd.concat(excluded)
    return parts
