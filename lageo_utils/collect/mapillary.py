"""Mapillary API v4 collector: images inside each region box, spread out, saved with their attribution.

The images search endpoint is asked per box (split into tiles, as the API limits a bbox to under
0.01 square degrees), following ``paging.next``. Candidates are shuffled with the seed and thinned
to ``min_distance_m`` apart (a sequence has a photo every few metres), then the thumbnails are
downloaded. The access token travels in the ``Authorization`` header to the API host only; the
thumbnail links are signed CDN URLs and get no token. Images are CC BY-SA 4.0: the manifest keeps
the creator for attribution.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

import geopandas as gpd
import numpy as np
from tqdm.auto import tqdm

from lageo_utils.collect.http import DEFAULT_RETRY, ApiClient, AuthError, BudgetExhausted, CollectError, RetryPolicy
from lageo_utils.collect.points import thin_points
from lageo_utils.collect.store import ImageFolder, check_image, is_complete_image
from lageo_utils.data import MANIFEST_COLUMNS, location_ids

log = logging.getLogger(__name__)

TOKEN_ENV = "MAPILLARY_ACCESS_TOKEN"
DEFAULT_BASE_URL = "https://graph.mapillary.com"
SEARCH_PATH = "/images"
THUMB_SIZES = ("256", "1024", "2048", "original")
LICENCE = "CC BY-SA 4.0"
MAX_TILE_DEG = 0.099  # tiles stay under the API's 0.01 square-degree bbox limit
SEARCH_FIELDS = ("id", "computed_geometry", "geometry", "compass_angle", "computed_compass_angle", "captured_at",
                 "is_pano", "sequence", "creator")
MANIFEST_FIELDS = [*MANIFEST_COLUMNS, "mapillary_id", "captured_at", "compass_angle", "sequence_id",
                   "creator_username", "is_pano", "licence", "thumb_size", "file_size_bytes", "downloaded_at"]


def collect_mapillary(
    regions: gpd.GeoDataFrame,
    out_dir: str | Path,
    token: str | None,
    *,
    per_region: int,
    thumb_size: str = "1024",
    min_distance_m: float = 10.0,
    include_pano: bool = False,
    seed: int = 0,
    rate: float = 10.0,
    max_images: int | None = None,
    dry_run: bool = False,
    base_url: str = DEFAULT_BASE_URL,
    retry: RetryPolicy = DEFAULT_RETRY,
    tile_deg: float = 0.05,
    page_limit: int = 2000,
    max_pages: int = 50,
    sleep: Callable[[float], None] = time.sleep,
) -> dict:
    """Download up to ``per_region`` Mapillary images inside each region box into ``out_dir``.

    Resumable: a region's images already in ``manifest.csv`` count toward its ``per_region`` and
    keep new ones ``min_distance_m`` away. ``max_images`` caps the thumbnail requests of this run.
    ``dry_run`` searches (free) but downloads and writes nothing; without a token it gives the upper bound.
    """
    if thumb_size not in THUMB_SIZES:
        raise ValueError(f"thumb_size must be one of {THUMB_SIZES}, not {thumb_size!r}")
    if per_region < 1:
        raise ValueError(f"per_region must be at least 1, not {per_region}")
    if not 0 < tile_deg <= MAX_TILE_DEG:
        raise ValueError(f"tile_deg must be in (0, {MAX_TILE_DEG}], not {tile_deg}")
    if max_images is not None and max_images < 0:
        raise ValueError(f"max_images must be >= 0, not {max_images}")
    folder = ImageFolder(out_dir, MANIFEST_FIELDS, read_only=dry_run)
    if dry_run and not token:
        have = sum(min(per_region, _count(folder, rid)) for rid in regions["id"])
        planned = per_region * len(regions) - have
        return {"dry_run": True, "searched": False, "images_in_manifest": len(folder.manifest.rows),
                "image_requests_planned": planned if max_images is None else min(planned, max_images)}
    if not token:
        raise AuthError(f"no Mapillary token: set {TOKEN_ENV} in the environment")
    client = ApiClient(base_url, auth_headers={"Authorization": f"OAuth {token}"}, rate=rate, retry=retry,
                       max_downloads=max_images, sleep=sleep)
    summary = {"out": str(folder.root), "manifest": str(folder.manifest.path), "regions": {},
               "search_requests": 0, "images_downloaded": 0, "images_recovered": 0, "images_failed": [],
               "budget_reached": False, "repairs": folder.repairs}
    planned = 0
    fields = ",".join([*SEARCH_FIELDS, f"thumb_{thumb_size}_url"])
    try:
        with client:
            for index, (rid, b) in enumerate(zip(regions["id"], regions.geometry.bounds.itertuples(), strict=True)):
                box = (b.minx, b.miny, b.maxx, b.maxy)
                have = [r for r in folder.manifest.rows if r["region_id"] == rid]
                need = per_region - len(have)
                if need <= 0:
                    summary["regions"][rid] = {"candidates": None, "in_manifest": len(have), "new": 0}
                    continue
                found, pages = search_box(client, box, fields, tile_deg, page_limit, max_pages)
                summary["search_requests"] += pages
                taken = {r["mapillary_id"] for r in have}
                candidates = [c for c in found if c["id"] not in taken and (include_pano or not c["is_pano"])
                              and c["thumb_url"]]
                chosen = _choose(candidates, need, min_distance_m, have, np.random.default_rng([seed, index]))
                summary["regions"][rid] = {"candidates": len(candidates), "in_manifest": len(have), "new": len(chosen)}
                if dry_run:
                    planned += len(chosen)
                    continue
                for image in tqdm(chosen, unit="image", desc=f"mapillary {rid}", disable=None):
                    _download(client, folder, image, rid, thumb_size, summary)
    except BudgetExhausted:
        summary["budget_reached"] = True
        log.info("image budget of %d requests spent; re-run to continue", max_images)
    finally:
        folder.close()
    summary["image_requests"] = client.downloads_sent
    summary["images_in_manifest"] = len(folder.manifest.rows)
    if dry_run:
        return {"dry_run": True, "searched": True, "search_requests": summary["search_requests"],
                "regions": summary["regions"], "images_in_manifest": len(folder.manifest.rows),
                "image_requests_planned": planned if max_images is None else min(planned, max_images)}
    return summary


def search_box(client: ApiClient, box, fields: str, tile_deg: float, page_limit: int, max_pages: int):
    """All images the search endpoint lists inside ``box`` (west, south, east, north), one entry per id."""
    west, south, east, north = box
    found: dict[str, dict] = {}
    pages = 0
    nx, ny = math.ceil((east - west) / tile_deg), math.ceil((north - south) / tile_deg)
    xs, ys = np.linspace(west, east, nx + 1), np.linspace(south, north, ny + 1)
    for i in range(nx):
        for j in range(ny):
            bbox = f"{xs[i]:.7f},{ys[j]:.7f},{xs[i + 1]:.7f},{ys[j + 1]:.7f}"
            url, params = SEARCH_PATH, {"bbox": bbox, "fields": fields, "limit": str(page_limit)}
            for _ in range(max_pages):
                doc = _search_page(client, url, params)
                params = None
                pages += 1
                for item in doc.get("data") or []:
                    image = parse_image(item)
                    if image is not None and west <= image["lon"] <= east and south <= image["lat"] <= north:
                        found.setdefault(image["id"], image)
                url = _next_page(doc)
                if url is None:
                    break
            else:
                log.warning("bbox %s: stopped after %d pages", bbox, max_pages)
    return sorted(found.values(), key=lambda im: im["id"]), pages


def parse_image(item: dict) -> dict | None:
    """The fields the manifest needs from one search result; None when it has no id or coordinates."""
    geometry = item.get("computed_geometry") or item.get("geometry") or {}
    coords = geometry.get("coordinates") or []
    if not item.get("id") or len(coords) < 2:
        return None
    compass = item.get("computed_compass_angle", item.get("compass_angle"))
    captured = item.get("captured_at")
    thumb = next((v for k, v in item.items() if k.startswith("thumb_") and k.endswith("_url")), None)
    return {
        "id": str(item["id"]),
        "lon": float(coords[0]),
        "lat": float(coords[1]),
        "compass_angle": float(compass) if compass is not None else None,
        "captured_at": datetime.fromtimestamp(captured / 1000, UTC).isoformat(timespec="seconds") if captured else "",
        "is_pano": bool(item.get("is_pano", False)),
        "sequence_id": item.get("sequence") or "",
        "creator_username": (item.get("creator") or {}).get("username", ""),
        "thumb_url": thumb,
    }


def _search_page(client: ApiClient, url: str, params: dict | None) -> dict:
    response = client.get(url, params)
    if response.status_code in (401, 403):
        raise AuthError(f"Mapillary refused the access token (HTTP {response.status_code}: "
                        f"{client.redact(_error_message(response))}); check {TOKEN_ENV}")
    if response.status_code != 200:
        raise CollectError(f"Mapillary search: HTTP {response.status_code}: {client.redact(_error_message(response))}")
    try:
        doc = response.json()
    except ValueError:
        raise CollectError("Mapillary search: the answer is not JSON") from None
    if not isinstance(doc, dict):
        raise CollectError("Mapillary search: the answer is not a JSON object")
    return doc


def _next_page(doc: dict) -> str | None:
    """The next page's path and query, to send to the API base URL; a token in the link is dropped."""
    link = (doc.get("paging") or {}).get("next")
    if not link:
        return None
    parts = urlsplit(link)
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k != "access_token"])
    return f"{parts.path}?{query}" if query else parts.path


def _error_message(response) -> str:
    try:
        return str(response.json().get("error", {}).get("message", ""))[:200]
    except (ValueError, AttributeError):
        return response.text[:200]


def _choose(candidates: list[dict], n: int, min_distance_m: float, have: list[dict], rng) -> list[dict]:
    order = rng.permutation(len(candidates))
    shuffled = [candidates[i] for i in order]
    keep = thin_points([c["lat"] for c in shuffled], [c["lon"] for c in shuffled], n, min_distance_m,
                       [float(r["latitude"]) for r in have], [float(r["longitude"]) for r in have])
    return [shuffled[i] for i in keep]


def _download(client: ApiClient, folder: ImageFolder, image: dict, rid: str, thumb_size: str, summary: dict) -> None:
    name = f"mly_{image['id']}.jpg"
    dest = folder.path_for(name)
    if dest.exists() and is_complete_image(dest):
        summary["images_recovered"] += 1
    else:
        # Thumbnail links are signed CDN URLs: sent as given, without the token.
        response = client.download(image["thumb_url"], dest, auth=False, check_file=check_image)
        if response.status_code != 200:
            summary["images_failed"].append(f"{image['id']}: HTTP {response.status_code}")
            return
        summary["images_downloaded"] += 1
    folder.add(name, {
        "latitude": image["lat"], "longitude": image["lon"],
        "heading": "" if image["compass_angle"] is None else f"{image['compass_angle']:.2f}",
        "region_id": rid, "location_id": location_ids([image["lat"]], [image["lon"]])[0], "source": "mapillary",
        "mapillary_id": image["id"], "captured_at": image["captured_at"],
        "compass_angle": "" if image["compass_angle"] is None else f"{image['compass_angle']:.2f}",
        "sequence_id": image["sequence_id"], "creator_username": image["creator_username"],
        "is_pano": image["is_pano"], "licence": LICENCE, "thumb_size": thumb_size,
    })


def _count(folder: ImageFolder, rid: str) -> int:
    return sum(r["region_id"] == rid for r in folder.manifest.rows)
