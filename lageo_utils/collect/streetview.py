"""Google Street View Static API collector: metadata first (free), then one image per heading.

For each capture point the metadata endpoint gives the status, panorama id, snapped location and
date; points without imagery are skipped and a panorama reached from several points is taken
once. Each remaining heading becomes ``images/sv_<pano>_h<heading>.jpg`` and one manifest row.
``points.csv`` records every metadata answer, so a re-run asks again only for new points.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from lageo_utils.collect.http import (
    DEFAULT_RETRY,
    ApiClient,
    AuthError,
    BudgetExhausted,
    CollectError,
    Retryable,
    RetryPolicy,
)
from lageo_utils.collect.points import POINT_COLUMNS
from lageo_utils.collect.store import CsvLog, ImageFolder, check_image, is_complete_image
from lageo_utils.data import MANIFEST_COLUMNS

log = logging.getLogger(__name__)

KEY_ENV = "GOOGLE_MAPS_API_KEY"
DEFAULT_BASE_URL = "https://maps.googleapis.com"
METADATA_PATH = "/maps/api/streetview/metadata"
IMAGE_PATH = "/maps/api/streetview"
MAX_SIDE_PX = 640  # the Static API's largest image side
USD_PER_1000_IMAGES = 7.0  # Google's list price for the first 100,000 panoramas a month (2026); check current pricing

MANIFEST_FIELDS = [*MANIFEST_COLUMNS, "point_id", "pano_id", "requested_lat", "requested_lon", "date", "status",
                   "size", "fov", "pitch", "file_size_bytes", "downloaded_at"]
POINT_FIELDS = ["point_key", "point_id", "region_id", "requested_lat", "requested_lon", "status", "pano_id",
                "latitude", "longitude", "date"]
POINTS_LOG = "points.csv"
NO_IMAGERY = frozenset({"ZERO_RESULTS", "NOT_FOUND"})
TRANSIENT = frozenset({"OVER_QUERY_LIMIT", "UNKNOWN_ERROR"})


@dataclass(frozen=True)
class StreetViewOptions:
    """What each image request asks for (defaults: the seed study's 640x640, fov 90, pitch 0, four headings)."""

    headings: tuple[float, ...] = (0.0, 90.0, 180.0, 270.0)
    size: str = "640x640"
    fov: float = 90.0
    pitch: float = 0.0
    radius_m: float = 50.0
    outdoor: bool = False  # metadata/images restricted to outdoor panoramas

    def __post_init__(self):
        if not self.headings or any(not 0 <= h <= 360 for h in self.headings):
            raise ValueError(f"headings must be degrees in [0, 360], not {self.headings}")
        if len(set(self.headings)) != len(self.headings):
            raise ValueError(f"headings repeat: {self.headings}")
        match = re.fullmatch(r"(\d+)x(\d+)", self.size)
        if not match or not all(1 <= int(v) <= MAX_SIDE_PX for v in match.groups()):
            raise ValueError(f"size must be WIDTHxHEIGHT with sides 1..{MAX_SIDE_PX}, not {self.size!r}")
        if not 0 < self.fov <= 120:
            raise ValueError(f"fov must be in (0, 120] degrees, not {self.fov}")
        if not -90 <= self.pitch <= 90:
            raise ValueError(f"pitch must be in [-90, 90] degrees, not {self.pitch}")
        if self.radius_m <= 0:
            raise ValueError(f"radius_m must be positive, not {self.radius_m}")


def collect_streetview(
    points: pd.DataFrame,
    out_dir: str | Path,
    key: str | None,
    *,
    options: StreetViewOptions = StreetViewOptions(),
    rate: float = 10.0,
    max_images: int | None = None,
    dry_run: bool = False,
    base_url: str = DEFAULT_BASE_URL,
    retry: RetryPolicy = DEFAULT_RETRY,
    sleep: Callable[[float], None] = time.sleep,
) -> dict:
    """Download Street View images for capture points (``sample_points`` output) into ``out_dir``.

    Resumable: what ``manifest.csv`` lists is skipped, a complete image found without a row is
    recorded without a new request. ``max_images`` caps the image requests of this run (retries
    included). ``dry_run`` makes no image request and writes nothing: with a key it asks the free
    metadata endpoint to count the images exactly, without one it gives the upper bound.
    Raises ``AuthError`` on REQUEST_DENIED or a refused key, ``CollectError`` when retries run out.
    """
    if max_images is not None and max_images < 0:
        raise ValueError(f"max_images must be >= 0, not {max_images}")
    missing = [c for c in POINT_COLUMNS if c not in points.columns]
    if missing:
        raise ValueError(f"points lack columns {missing} (has {list(points.columns)}); see sample_points")
    if dry_run:
        return _plan(points, Path(out_dir), key, options, rate, max_images, base_url, retry, sleep)
    if not key:
        raise AuthError(f"no Street View key: set {KEY_ENV} in the environment")
    folder = ImageFolder(out_dir, MANIFEST_FIELDS)
    points_log = CsvLog(folder.root / POINTS_LOG, POINT_FIELDS)
    run = _Run(folder, points_log, options)
    client = ApiClient(base_url, auth_params={"key": key}, rate=rate, retry=retry, max_downloads=max_images, sleep=sleep)
    try:
        with client, tqdm(total=len(points), unit="point", desc="streetview", disable=None) as bar:
            for point in points.itertuples(index=False):
                run.visit(client, point)
                bar.update()
    except BudgetExhausted:
        run.budget_reached = True
        log.info("image budget of %d requests spent; re-run to continue", max_images)
    finally:
        folder.close()
        points_log.close()
    return {
        "out": str(folder.root),
        "manifest": str(folder.manifest.path),
        "points": len(points),
        "metadata_requests": run.metadata_requests,
        "metadata_status": dict(run.statuses),
        "duplicate_panoramas": run.duplicates,
        "images_in_manifest": len(folder.manifest.rows),
        "images_downloaded": run.downloaded,
        "images_already_present": run.present,
        "images_recovered": run.recovered,
        "image_requests": client.downloads_sent,
        "images_not_available": run.unavailable,
        "budget_reached": run.budget_reached,
        "repairs": folder.repairs,
    }


class _Run:
    """The state of one collection run over the capture points."""

    def __init__(self, folder: ImageFolder, points_log: CsvLog, options: StreetViewOptions):
        self.folder = folder
        self.points_log = points_log
        self.options = options
        self.known = {row["point_key"]: row for row in points_log.rows}
        self.done = {(row["pano_id"], float(row["heading"])) for row in folder.manifest.rows}
        self.claimed: dict[str, str] = {}  # pano_id -> the point that took it
        self.statuses: Counter = Counter()
        self.metadata_requests = self.duplicates = self.downloaded = self.present = self.recovered = 0
        self.unavailable: list[str] = []
        self.budget_reached = False

    def visit(self, client: ApiClient, point) -> None:
        meta = self.known.get(point_key(point))
        if meta is None:
            meta = metadata_row(point, fetch_metadata(client, point, self.options))
            self.metadata_requests += 1
            self.points_log.append(meta)
            self.known[meta["point_key"]] = meta
        self.statuses[meta["status"]] += 1
        if meta["status"] != "OK":
            return
        pano = meta["pano_id"]
        if self.claimed.setdefault(pano, meta["point_key"]) != meta["point_key"]:
            self.duplicates += 1
            return
        for heading in self.options.headings:
            self._image(client, meta, float(heading))

    def _image(self, client: ApiClient, meta: dict, heading: float) -> None:
        pano = meta["pano_id"]
        if (pano, heading) in self.done:
            self.present += 1
            return
        name = image_name(pano, heading)
        dest = self.folder.path_for(name)
        if dest.exists() and is_complete_image(dest):
            self.recovered += 1  # renamed into place just before a kill, its row not yet written
        else:
            response = client.download(IMAGE_PATH, dest, image_params(pano, heading, self.options), check_file=check_image)
            if response.status_code in (401, 403):
                raise AuthError(
                    f"Street View image request denied (REQUEST_DENIED, HTTP {response.status_code}): "
                    f"{client.redact(response.text[:200])}"
                )
            if response.status_code == 404:
                self.unavailable.append(f"{pano} heading {heading:g}: no image (HTTP 404)")
                return
            if response.status_code != 200:
                raise CollectError(f"Street View image request: unexpected HTTP {response.status_code}")
            self.downloaded += 1
        o = self.options
        self.folder.add(name, {
            "latitude": meta["latitude"], "longitude": meta["longitude"], "heading": f"{heading:g}",
            "region_id": meta["region_id"], "location_id": pano, "source": "streetview",
            "point_id": meta["point_id"], "pano_id": pano, "requested_lat": meta["requested_lat"],
            "requested_lon": meta["requested_lon"], "date": meta["date"], "status": meta["status"],
            "size": o.size, "fov": f"{o.fov:g}", "pitch": f"{o.pitch:g}",
        })
        self.done.add((pano, heading))


def point_key(point) -> str:
    """Identifies a capture point by its coordinate (1e-7 degrees), so a changed point list never reuses stale answers."""
    return f"{point.latitude:.7f},{point.longitude:.7f}"


def image_name(pano_id: str, heading: float) -> str:
    """``sv_<pano>_h<heading>.jpg`` with unsafe characters of the panorama id replaced."""
    return f"sv_{re.sub(r'[^A-Za-z0-9_-]', '_', pano_id)}_h{heading:03g}.jpg"


def image_params(pano_id: str, heading: float, options: StreetViewOptions) -> dict:
    params = {"size": options.size, "pano": pano_id, "heading": f"{heading:g}", "fov": f"{options.fov:g}",
              "pitch": f"{options.pitch:g}", "return_error_code": "true"}
    if options.outdoor:
        params["source"] = "outdoor"
    return params


def fetch_metadata(client: ApiClient, point, options: StreetViewOptions) -> dict:
    """The metadata answer for one point; transient statuses are retried, REQUEST_DENIED stops the run."""
    params = {"location": f"{point.latitude:.7f},{point.longitude:.7f}", "radius": f"{options.radius_m:g}"}
    if options.outdoor:
        params["source"] = "outdoor"
    response = client.get(METADATA_PATH, params, check=_check_metadata)
    if response.status_code in (401, 403):
        raise AuthError(f"Street View metadata request denied (REQUEST_DENIED, HTTP {response.status_code}); "
                        f"check {KEY_ENV} and that the Street View Static API is enabled with billing")
    if response.status_code != 200:
        raise CollectError(f"Street View metadata request: unexpected HTTP {response.status_code}")
    doc = _json(response)
    status = doc.get("status")
    if status == "REQUEST_DENIED":
        raise AuthError(f"Street View metadata request denied (status REQUEST_DENIED): "
                        f"{client.redact(str(doc.get('error_message', '')))} - check {KEY_ENV} and that the "
                        "Street View Static API is enabled with billing")
    if status == "INVALID_REQUEST":
        raise CollectError(f"Street View metadata: status INVALID_REQUEST for location {params['location']} "
                           f"(radius {params['radius']}): {client.redact(str(doc.get('error_message', '')))}")
    if status != "OK" and status not in NO_IMAGERY:
        raise CollectError(f"Street View metadata: unexpected status {status!r}")
    return doc


def metadata_row(point, doc: dict) -> dict:
    """The ``points.csv`` row for a metadata answer (the snapped location, else the requested one)."""
    location = doc.get("location") or {}
    return {
        "point_key": point_key(point), "point_id": point.point_id, "region_id": point.region_id,
        "requested_lat": f"{point.latitude:.7f}", "requested_lon": f"{point.longitude:.7f}",
        "status": doc["status"], "pano_id": doc.get("pano_id", ""),
        "latitude": location.get("lat", point.latitude), "longitude": location.get("lng", point.longitude),
        "date": doc.get("date", ""),
    }


def _check_metadata(response) -> None:
    if response.status_code == 200:
        status = _json(response).get("status")
        if status in TRANSIENT:
            raise Retryable(f"status {status}")


def _json(response) -> dict:
    try:
        doc = response.json()
    except ValueError:
        raise CollectError(f"Street View metadata: the answer is not JSON (HTTP {response.status_code})") from None
    if not isinstance(doc, dict):
        raise CollectError("Street View metadata: the answer is not a JSON object")
    return doc


def _plan(points, out_dir: Path, key, options, rate, max_images, base_url, retry, sleep) -> dict:
    """The dry run: count requests without any image request and without writing anything."""
    done = {(r["pano_id"], float(r["heading"])) for r in ImageFolder(out_dir, MANIFEST_FIELDS, read_only=True).manifest.rows}
    known = {r["point_key"]: r for r in CsvLog(out_dir / POINTS_LOG, POINT_FIELDS, read_only=True).rows}
    headings = [float(h) for h in options.headings]
    metadata_requests = 0
    if key:
        panos: dict[str, None] = {}
        statuses: Counter = Counter()
        with ApiClient(base_url, auth_params={"key": key}, rate=rate, retry=retry, sleep=sleep) as client:
            for point in points.itertuples(index=False):
                meta = known.get(point_key(point))
                if meta is None:
                    meta = metadata_row(point, fetch_metadata(client, point, options))
                    metadata_requests += 1
                statuses[meta["status"]] += 1
                if meta["status"] == "OK":
                    panos.setdefault(meta["pano_id"])
        wanted = sum((p, h) not in done for p in panos for h in headings)
    else:
        statuses = Counter()
        wanted = max(0, len(points) * len(headings) - len(done))
    planned = wanted if max_images is None else min(wanted, max_images)
    return {
        "dry_run": True,
        "points": len(points),
        "metadata_checked": bool(key),
        "metadata_requests": metadata_requests,
        "metadata_status": dict(statuses),
        "images_in_manifest": len(done),
        "image_requests_planned": planned,
        "estimated_cost_usd": round(planned * USD_PER_1000_IMAGES / 1000, 2),
        "price_assumption": f"{USD_PER_1000_IMAGES:g} USD per 1000 images (Google list price; check current pricing)",
        "estimated_minutes_at_rate": round((metadata_requests + planned) / rate / 60, 1) if rate else 0.0,
    }


def headings_from_text(text: str) -> tuple[float, ...]:
    """``"0,90,180,270"`` -> ``(0.0, 90.0, 180.0, 270.0)``."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"headings must be comma-separated degrees, not {text!r}") from None
    if any(not math.isfinite(v) for v in values):
        raise ValueError(f"headings must be finite, not {text!r}")
    return values
