"""A local look-alike of the Street View Static API and the Mapillary API v4, for the collector tests.

Runs on 127.0.0.1 (a free port) in a thread. It answers like the real services: metadata JSON with
OK / ZERO_RESULTS / REQUEST_DENIED, JPEG images (404 for an unknown panorama, 403 for a bad key),
Mapillary search pages with ``paging.next`` and signed thumbnail links. Tests queue faults per
endpoint (HTTP 429 with Retry-After, 500, a connection dropped mid-body, a JSON status) and read
the request log.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import socket
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlencode, urlsplit

from PIL import Image

ENDPOINTS = {
    "/maps/api/streetview/metadata": "metadata",
    "/maps/api/streetview": "image",
    "/images": "search",
}


@dataclass
class Request:
    endpoint: str
    path: str
    params: dict
    headers: dict


class FakeMapsApi:
    """Start with ``with FakeMapsApi() as api:``; ``api.url`` is the base URL to pass to the collectors."""

    def __init__(self, key: str = "sv-test-key", token: str = "MLY|4242|fake-token", pano_cell_deg: float = 0.01):
        self.key = key
        self.token = token
        self.pano_cell_deg = pano_cell_deg  # points in one cell share a panorama
        self.no_coverage = lambda lat, lon: False  # True -> ZERO_RESULTS
        self.body_pause_s = 0.0  # pause in the middle of every image body
        self.mapillary_images: list[dict] = []
        self.requests: list[Request] = []
        self._faults: dict[str, deque] = defaultdict(deque)
        self._lock = threading.Lock()
        self._jpegs: dict[tuple, bytes] = {}
        self._server: ThreadingHTTPServer | None = None

    # -- control -----------------------------------------------------------------------------
    def __enter__(self) -> FakeMapsApi:
        handler = type("Handler", (_Handler,), {"api": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def fail(self, endpoint: str, *faults: tuple) -> None:
        """Queue faults for the next requests to ``endpoint``: ("status", code[, retry_after]), ("drop",),
        ("api_status", "OVER_QUERY_LIMIT"), ("corrupt",)."""
        with self._lock:
            self._faults[endpoint].extend(faults)

    def sent(self, endpoint: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.endpoint == endpoint]

    # -- the fake world ------------------------------------------------------------------------
    def pano_for(self, lat: float, lon: float):
        """``(pano_id, lat, lon)`` of the panorama a location snaps to, or None without coverage."""
        if self.no_coverage(lat, lon):
            return None
        i, j = math.floor(lat / self.pano_cell_deg), math.floor(lon / self.pano_cell_deg)
        pano = f"FAKE{i}x{j}".replace("-", "m")
        return pano, (i + 0.5) * self.pano_cell_deg, (j + 0.5) * self.pano_cell_deg

    def jpeg(self, name: str, width: int, height: int) -> bytes:
        key = (name, width, height)
        if key not in self._jpegs:
            shade = hashlib.sha256(name.encode()).digest()[:3]
            img = Image.new("RGB", (width, height), tuple(shade))
            img.paste((255 - shade[0], 128, shade[2]), (0, 0, width // 2, height // 3))  # some structure
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=85)
            self._jpegs[key] = buf.getvalue()
        return self._jpegs[key]

    def _next_fault(self, endpoint: str):
        with self._lock:
            return self._faults[endpoint].popleft() if self._faults[endpoint] else None


class _Handler(BaseHTTPRequestHandler):
    api: FakeMapsApi
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        # Bodies go out in two writes; without this, Nagle + delayed ACK add ~40 ms to each.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:  # http.server's method name
        parts = urlsplit(self.path)
        params = dict(parse_qsl(parts.query))
        endpoint = ENDPOINTS.get(parts.path, "thumb" if parts.path.startswith("/thumbs/") else "unknown")
        with self.api._lock:
            self.api.requests.append(Request(endpoint, parts.path, params, dict(self.headers)))
        fault = self.api._next_fault(endpoint)
        if fault and fault[0] == "status":
            extra = {"Retry-After": str(fault[2])} if len(fault) > 2 else {}
            return self._send(fault[1], b"temporarily unavailable", "text/plain", extra)
        handler = getattr(self, f"_{endpoint}", None)
        if handler is None:
            return self._send(404, b"not found", "text/plain")
        handler(params, fault)

    # -- Street View ---------------------------------------------------------------------------
    def _metadata(self, params, fault) -> None:
        if params.get("key") != self.api.key:
            return self._json({"error_message": "The provided API key is invalid.", "status": "REQUEST_DENIED"})
        if fault and fault[0] == "api_status":
            return self._json({"status": fault[1]})
        lat, lon = (float(v) for v in params["location"].split(","))
        found = self.api.pano_for(lat, lon)
        if found is None:
            return self._json({"status": "ZERO_RESULTS"})
        pano, plat, plon = found
        self._json({"copyright": "© Fake", "date": "2024-05", "location": {"lat": plat, "lng": plon},
                    "pano_id": pano, "status": "OK"})

    def _image(self, params, fault) -> None:
        if params.get("key") != self.api.key:
            return self._send(403, b"The provided API key is invalid.", "text/plain")
        pano = params.get("pano", "")
        if not pano.startswith("FAKE"):
            return self._send(404, b"", "text/plain")
        width, height = (int(v) for v in params["size"].split("x"))
        body = self.api.jpeg(f"{pano}/{params['heading']}", width, height)
        self._image_body(body, fault)

    # -- Mapillary -----------------------------------------------------------------------------
    def _search(self, params, fault) -> None:
        if self.headers.get("Authorization") != f"OAuth {self.api.token}":
            return self._json({"error": {"message": "Invalid OAuth access token - Cannot parse access token",
                                         "type": "OAuthException", "code": 190}}, status=401)
        west, south, east, north = (float(v) for v in params["bbox"].split(","))
        fields = params["fields"].split(",")
        hits = sorted((im for im in self.api.mapillary_images
                       if west <= im["lon"] <= east and south <= im["lat"] <= north), key=lambda im: im["id"])
        after, limit = int(params.get("after", 0)), int(params["limit"])
        data = [self._fields(im, fields) for im in hits[after:after + limit]]
        doc = {"data": data}
        if after + limit < len(hits):
            doc["paging"] = {"next": f"{self.api.url}/images?{urlencode({**params, 'after': after + limit})}"}
        self._json(doc)

    def _fields(self, im: dict, fields: list[str]) -> dict:
        everything = {
            "id": im["id"],
            "computed_geometry": {"type": "Point", "coordinates": [im["lon"], im["lat"]]},
            "geometry": {"type": "Point", "coordinates": [im["lon"] + 1e-5, im["lat"] + 1e-5]},
            "compass_angle": im["compass"],
            "computed_compass_angle": im["compass"] + 0.5,
            "captured_at": im["captured_at"],
            "is_pano": im["is_pano"],
            "sequence": im["sequence"],
            "creator": {"username": im["creator"], "id": "7"},
        }
        for size in ("256", "1024", "2048", "original"):
            everything[f"thumb_{size}_url"] = f"{self.api.url}/thumbs/{im['id']}.jpg?size={size}&stp=sig-abc"
        return {k: v for k, v in everything.items() if k in fields or k == "id"}

    def _thumb(self, params, fault) -> None:
        image_id = self.path.split("/thumbs/")[1].split(".jpg")[0]
        if not any(im["id"] == image_id for im in self.api.mapillary_images):
            return self._send(404, b"", "text/plain")
        self._image_body(self.api.jpeg(f"mly/{image_id}", 48, 32), fault)

    # -- answers -------------------------------------------------------------------------------
    def _image_body(self, body: bytes, fault) -> None:
        if fault and fault[0] == "corrupt":
            body = body[:20] + b"\x00" * (len(body) - 20)
        if fault and fault[0] == "drop":  # promise the whole body, send half, hang up
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        half = len(body) // 2
        self.wfile.write(body[:half])
        self.wfile.flush()
        if self.api.body_pause_s:
            time.sleep(self.api.body_pause_s)
        self.wfile.write(body[half:])

    def _json(self, doc: dict, status: int = 200) -> None:
        self._send(status, json.dumps(doc).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)
