"""Fair sampling: the authors' area-normalised scheme."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pandas as pd


def area_normalized_sample(manifest: pd.DataFrame, regions: gpd.GeoDataFrame, seed: int = 42) -> pd.DataFrame:
    """Sample every region to the same image density (images per km²).

    The target density is the lowest available density over the regions that have images
    (available images / box area); each region keeps ``floor(density x area)`` images drawn
    at random with ``seed``. Regions without images are ignored. Rows keep their order.
    """
    summary = sampling_summary(manifest, regions)
    rng = np.random.default_rng(seed)
    keep = []
    for rid, n in summary["sampled_images"].items():
        idx = manifest.index[manifest["region_id"] == rid].to_numpy()
        keep.append(rng.choice(idx, size=int(n), replace=False))
    chosen = np.sort(np.concatenate(keep)) if keep else np.empty(0, dtype=int)
    return manifest.loc[chosen].reset_index(drop=True)


def sampling_summary(manifest: pd.DataFrame, regions: gpd.GeoDataFrame) -> pd.DataFrame:
    """Per region: area, available images and density, target density and sampled count.

    Same columns as the authors' ``sampling_summary.csv``.
    """
    area = regions.set_index("id")["area_km2"]
    counts = manifest["region_id"].value_counts()
    ids = [rid for rid in regions["id"] if counts.get(rid, 0) > 0]
    table = pd.DataFrame({"area_km2": area.loc[ids], "available_images": counts.loc[ids].astype(int)})
    table["available_density"] = table["available_images"] / table["area_km2"]
    target = table["available_density"].min() if len(table) else np.nan
    table["target_density"] = target
    # The region that sets the density keeps all its images (floor would lose one to rounding).
    table["sampled_images"] = np.minimum(
        np.floor(target * table["area_km2"] + 1e-9), table["available_images"]
    ).astype(int)
    table.index.name = "region_id"
    return table
