"""The embedded demo dataset: deterministic synthetic street scenes at capture points in each region.

Every region has its own style (palette, skyline, hills, vegetation, sea where it is coastal,
a landmark shape), so a small model can learn the regions. Within a region, the look of a street
(building heights, colours and density, greenery, street lights, road width, terrain) follows
smooth random fields over space (``street_look``): like real streets, a scene resembles its
neighbours a few hundred metres away and drifts across the region, so answering with the
coordinates of similar gallery images can beat answering with the region's centre. Each heading
of a capture point shows a different view (the road along or across, the share of sky, where
things stand, mirrored compositions); clouds, cars, light and sensor noise change per image.
For the eight regions shared with the seed authors, the capture points are real coordinates from
their released metadata (``demo_points.csv``, MIT, see ``DEMO_POINTS_LICENSE.txt``); the other
regions get seeded random points inside their boxes. The images are synthetic: they show the
pipeline working, not geolocation skill.
"""
from __future__ import annotations

import functools
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
from PIL import Image, ImageDraw
from sklearn.kernel_approximation import RBFSampler

from lageo_utils.data import location_ids, prepare_manifest, write_manifest
from lageo_utils.geo import EARTH_RADIUS_KM
from lageo_utils.regions import assign_regions, load_regions

DEMO_POINTS_PATH = Path(__file__).with_name("demo_points.csv")
HEADINGS = (0, 90, 180, 270)
SOURCE = "demo-synthetic"
JPEG_QUALITY = 90

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class RegionStyle:
    """How a region's scenes look; heights are fractions of the image height."""

    sky: tuple[RGB, RGB]  # top and horizon colours
    ground: RGB
    road: RGB
    lane: RGB
    buildings: tuple[RGB, ...]
    building_height: tuple[float, float]
    building_count: int
    windows: bool = True
    roofs: RGB | None = None  # pitched roofs in this colour (houses)
    hills: RGB | None = None
    hill_height: float = 0.12
    vegetation: str | None = None  # "palm", "tree" or "shrub"
    vegetation_colour: RGB = (52, 110, 48)
    vegetation_count: int = 4
    sea_heading: int | None = None  # the heading that faces the ocean (coastal regions)
    landmark: str | None = None
    horizon: float = 0.5


_GLASS = ((96, 122, 146), (150, 170, 190), (70, 86, 104), (180, 190, 198))
STYLES: dict[str, RegionStyle] = {
    "downtown_la": RegionStyle(
        sky=((150, 170, 190), (205, 200, 185)), ground=(128, 124, 118), road=(62, 62, 66), lane=(235, 235, 225),
        buildings=_GLASS, building_height=(0.3, 0.48), building_count=9, vegetation=None, horizon=0.58,
    ),
    "hollywood": RegionStyle(
        sky=((90, 150, 220), (235, 200, 160)), ground=(170, 150, 125), road=(70, 68, 70), lane=(240, 210, 60),
        buildings=((225, 190, 150), (200, 120, 100), (240, 225, 200)), building_height=(0.08, 0.18),
        building_count=6, hills=(118, 112, 70), hill_height=0.2, vegetation="palm", landmark="sign",
    ),
    "beverly_hills": RegionStyle(
        sky=((60, 140, 235), (185, 215, 245)), ground=(90, 160, 70), road=(88, 88, 92), lane=(250, 250, 250),
        buildings=((245, 240, 225), (235, 225, 200), (250, 250, 245)), building_height=(0.07, 0.14),
        building_count=5, roofs=(160, 90, 70), vegetation="palm", vegetation_count=8, horizon=0.52,
    ),
    "santa_monica": RegionStyle(
        sky=((110, 175, 235), (220, 235, 245)), ground=(215, 200, 165), road=(85, 85, 88), lane=(250, 250, 250),
        buildings=((230, 215, 185), (200, 190, 170), (240, 240, 230)), building_height=(0.08, 0.2),
        building_count=5, vegetation="palm", sea_heading=270, landmark="pier", horizon=0.46,
    ),
    "venice_beach": RegionStyle(
        sky=((100, 185, 240), (245, 230, 200)), ground=(230, 210, 160), road=(100, 95, 90), lane=(250, 250, 250),
        buildings=((235, 70, 90), (60, 170, 200), (250, 200, 50), (140, 80, 180), (80, 190, 120)),
        building_height=(0.06, 0.12), building_count=6, windows=False, vegetation="palm", sea_heading=270,
        horizon=0.48,
    ),
    "malibu": RegionStyle(
        sky=((70, 150, 230), (200, 225, 240)), ground=(200, 185, 140), road=(75, 75, 78), lane=(245, 200, 50),
        buildings=((250, 250, 250), (225, 220, 210)), building_height=(0.05, 0.09), building_count=2,
        roofs=(120, 110, 100), hills=(130, 125, 80), hill_height=0.18, vegetation="shrub", sea_heading=180,
        horizon=0.44,
    ),
    "griffith_park": RegionStyle(
        sky=((120, 165, 210), (225, 215, 190)), ground=(160, 140, 95), road=(96, 90, 84), lane=(240, 220, 120),
        buildings=(), building_height=(0.0, 0.0), building_count=0, hills=(135, 125, 75), hill_height=0.3,
        vegetation="shrub", vegetation_colour=(95, 105, 55), vegetation_count=9, landmark="dome", horizon=0.55,
    ),
    "koreatown": RegionStyle(
        sky=((165, 170, 180), (210, 205, 200)), ground=(120, 115, 112), road=(55, 55, 58), lane=(240, 240, 240),
        buildings=((150, 140, 135), (110, 105, 110), (175, 165, 150)), building_height=(0.18, 0.32),
        building_count=8, vegetation=None, landmark="signs", horizon=0.56,
    ),
    "pasadena": RegionStyle(
        sky=((75, 140, 215), (190, 210, 230)), ground=(125, 150, 95), road=(80, 78, 76), lane=(250, 250, 250),
        buildings=((165, 85, 60), (185, 120, 85), (205, 170, 130)), building_height=(0.08, 0.16),
        building_count=5, hills=(95, 110, 140), hill_height=0.26, vegetation="tree", vegetation_colour=(40, 95, 45),
        vegetation_count=5,
    ),
    "long_beach": RegionStyle(
        sky=((120, 160, 200), (215, 220, 225)), ground=(150, 150, 150), road=(70, 70, 72), lane=(250, 250, 250),
        buildings=((190, 195, 200), (120, 140, 150), (210, 200, 180)), building_height=(0.12, 0.26),
        building_count=5, vegetation="palm", vegetation_count=3, sea_heading=180, landmark="cranes", horizon=0.47,
    ),
    "silver_lake": RegionStyle(
        sky=((130, 175, 225), (230, 225, 210)), ground=(110, 140, 80), road=(92, 88, 84), lane=(245, 245, 245),
        buildings=((240, 200, 170), (180, 210, 190), (220, 190, 220), (250, 235, 180)), building_height=(0.04, 0.08),
        building_count=7, roofs=(150, 80, 60), hills=(90, 120, 70), hill_height=0.24, vegetation="tree",
        vegetation_colour=(55, 120, 60), landmark="reservoir", horizon=0.6,
    ),
    "west_hollywood": RegionStyle(
        sky=((95, 90, 160), (240, 160, 130)), ground=(110, 105, 110), road=(50, 48, 54), lane=(250, 250, 250),
        buildings=((30, 30, 35), (240, 240, 240), (70, 70, 80)), building_height=(0.1, 0.2), building_count=6,
        windows=False, vegetation="palm", vegetation_count=3, landmark="billboards", horizon=0.55,
    ),
    "manhattan_beach": RegionStyle(
        sky=((85, 170, 245), (235, 245, 250)), ground=(235, 220, 180), road=(110, 108, 104), lane=(250, 250, 250),
        buildings=((140, 190, 220), (250, 250, 245), (240, 220, 170)), building_height=(0.05, 0.1),
        building_count=6, roofs=(90, 100, 120), vegetation="shrub", vegetation_colour=(70, 130, 70),
        sea_heading=270, landmark="pier", horizon=0.44,
    ),
    "culver_city": RegionStyle(
        sky=((110, 160, 215), (215, 220, 220)), ground=(140, 135, 125), road=(74, 74, 78), lane=(250, 250, 250),
        buildings=((60, 150, 150), (230, 130, 60), (210, 205, 195)), building_height=(0.12, 0.24),
        building_count=5, vegetation="tree", vegetation_colour=(60, 120, 55), vegetation_count=6,
        landmark="studio",
    ),
    "santa_clarita": RegionStyle(
        sky=((95, 165, 240), (215, 230, 245)), ground=(200, 185, 130), road=(105, 105, 108), lane=(250, 250, 250),
        buildings=((225, 205, 170),), building_height=(0.05, 0.07), building_count=8, windows=False,
        roofs=(170, 75, 55), hills=(215, 180, 90), hill_height=0.16, vegetation="shrub",
        vegetation_colour=(120, 130, 70), horizon=0.5,
    ),
}


def style_for(region_id: str) -> RegionStyle:
    """The region's style; a region outside the built-in fifteen gets a style derived from its id."""
    if region_id in STYLES:
        return STYLES[region_id]
    rng = np.random.default_rng(zlib.crc32(region_id.encode()))

    def colour() -> RGB:
        return tuple(int(c) for c in rng.integers(30, 240, 3))

    return RegionStyle(
        sky=(colour(), colour()), ground=colour(), road=colour(), lane=colour(),
        buildings=(colour(), colour(), colour()), building_height=(0.05, float(rng.uniform(0.1, 0.4))),
        building_count=int(rng.integers(2, 9)), hills=colour() if rng.random() < 0.5 else None,
        vegetation=str(rng.choice(["palm", "tree", "shrub"])), horizon=float(rng.uniform(0.44, 0.6)),
    )


def read_demo_points(path: str | os.PathLike = DEMO_POINTS_PATH) -> pd.DataFrame:
    """The shipped real capture points (region_id, latitude, longitude)."""
    return pd.read_csv(path, comment="#", dtype={"region_id": str})


def reference_points(metadata: pd.DataFrame, regions: gpd.GeoDataFrame, per_region: int = 40,
                     seed: int = 0) -> pd.DataFrame:
    """Distinct capture points (6 decimals) inside their own box from the authors' metadata, ``per_region`` each.

    This is how ``demo_points.csv`` is made from the reference split CSVs (see tests/test_demo.py).
    """
    points = metadata[["region_id", "latitude", "longitude"]].copy()
    points[["latitude", "longitude"]] = points[["latitude", "longitude"]].round(6)
    points = points.drop_duplicates().sort_values(["region_id", "latitude", "longitude"])
    points = points[assign_regions(points["latitude"], points["longitude"], regions) == points["region_id"]]
    order = {rid: i for i, rid in enumerate(regions["id"])}
    chosen = [
        group.sample(n=min(per_region, len(group)), random_state=seed)
        for _, group in sorted(points.groupby("region_id"), key=lambda item: order[item[0]])
    ]
    return pd.concat(chosen, ignore_index=True)


def capture_points(regions: gpd.GeoDataFrame, points_per_region: int, seed: int = 0,
                   reference: pd.DataFrame | None = None) -> pd.DataFrame:
    """Capture points per region: real reference points where shipped, random points in the box otherwise.

    Shipped points outside the region's box (a custom region file) are not used; a region with
    fewer shipped points than asked is topped up with random points in its box.
    """
    if points_per_region < 1:
        raise ValueError(f"points_per_region must be at least 1, not {points_per_region}")
    reference = read_demo_points() if reference is None else reference
    rows = []
    for index, region in enumerate(regions.itertuples()):
        rng = np.random.default_rng([seed, index])
        west, south, east, north = region.geometry.bounds
        real = reference[(reference["region_id"] == region.id)
                         & reference["latitude"].between(south, north) & reference["longitude"].between(west, east)]
        take = rng.choice(len(real), size=min(points_per_region, len(real)), replace=False)
        real = real.iloc[np.sort(take)]
        n_random = points_per_region - len(real)
        lat = np.round(rng.uniform(south, north, n_random), 6)
        lon = np.round(rng.uniform(west, east, n_random), 6)
        rows.append(pd.DataFrame({
            "region_id": region.id,
            "latitude": np.concatenate([real["latitude"].to_numpy(float), lat]),
            "longitude": np.concatenate([real["longitude"].to_numpy(float), lon]),
            "point_origin": ["clip-geolocation"] * len(real) + ["random"] * n_random,
        }))
    points = pd.concat(rows, ignore_index=True)
    points.insert(1, "point", points.groupby("region_id").cumcount())
    return points


def build_demo(
    out_dir: str | os.PathLike,
    *,
    points_per_region: int = 40,
    seed: int = 0,
    image_size: int = 224,
    regions: gpd.GeoDataFrame | None = None,
    quality: int = JPEG_QUALITY,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Write ``out_dir/images/<region>_p<point>_h<heading>.jpg`` and ``out_dir/manifest.csv``; return the manifest.

    Four headings per capture point; ``image_path`` is relative to ``out_dir``. The same
    arguments give byte-identical images and manifest.
    """
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels, not {image_size}")
    out = Path(out_dir)
    if (out / "manifest.csv").exists() and not overwrite:
        raise FileExistsError(f"{out / 'manifest.csv'} exists; choose another folder or overwrite it")
    regions = load_regions() if regions is None else regions
    points = capture_points(regions, points_per_region, seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for p in points.itertuples():
        for heading in HEADINGS:
            name = f"images/{p.region_id}_p{p.point:03d}_h{heading:03d}.jpg"
            image = draw_scene(p.region_id, heading, p.latitude, p.longitude, seed=seed, size=image_size)
            image.save(out / name, quality=quality)
            rows.append((name, p.latitude, p.longitude, heading, p.region_id, p.point_origin))
    table = pd.DataFrame(rows, columns=["image_path", "latitude", "longitude", "heading", "region_id", "point_origin"])
    table["location_id"] = location_ids(table["latitude"], table["longitude"]).to_numpy()
    table["source"] = SOURCE
    manifest, _ = prepare_manifest(table, regions, outside="fail", unlabeled="fail", name=str(out / "manifest.csv"))
    write_manifest(manifest, out / "manifest.csv")
    return manifest


# -- the look of a street: smooth random fields over space ---------------------------------------

LOOK_FIELDS = ("height", "density", "hue", "tone", "rhythm", "greenery", "road", "furniture", "hills", "ridge",
               "slope", "bend", "shore")
FIELD_LENGTH_KM = 1.5  # the length scale over which a street's look changes (region boxes are 2-4 km wide)
FIELD_FEATURES = 64  # random Fourier features shared by the fields
LOOK_AHEAD_KM = 0.1  # each heading sees the street this far ahead of the camera


@functools.lru_cache(maxsize=256)
def _look_fields(seed: int, region_id: str) -> tuple[RBFSampler, np.ndarray]:
    """The region's random Fourier features (of Earth-centred km) and each field's weights on them."""
    region_key = zlib.crc32(region_id.encode())
    features = RBFSampler(gamma=0.5 / FIELD_LENGTH_KM ** 2, n_components=FIELD_FEATURES,
                          random_state=np.random.RandomState([seed, region_key, 1]))
    weights = np.random.default_rng([seed, region_key, 2]).standard_normal((FIELD_FEATURES, len(LOOK_FIELDS)))
    return features.fit(np.zeros((1, 3))), weights


def street_look(region_id: str, latitude: float, longitude: float, heading: int = 0, seed: int = 0) -> dict[str, float]:
    """The smooth part of a scene: every field of ``LOOK_FIELDS`` at the spot the heading looks at, in (0, 1).

    Each field is a stationary Gaussian-process sample with a squared-exponential kernel of length
    scale ``FIELD_LENGTH_KM``, seeded by ``seed`` and the region, drawn as random Fourier features
    (scikit-learn's ``RBFSampler``) with Gaussian weights on Earth-centred coordinates, so it is
    defined anywhere without a map projection. Capture points a few hundred metres apart therefore
    look alike and the look drifts across a region, as real neighbourhoods do. The normal CDF
    makes each value uniform on (0, 1).
    """
    lat, lon = np.radians(latitude), np.radians(longitude)
    ahead, bearing = LOOK_AHEAD_KM / EARTH_RADIUS_KM, np.radians(heading)
    lat, lon = lat + ahead * np.cos(bearing), lon + ahead * np.sin(bearing) / np.cos(lat)
    position = EARTH_RADIUS_KM * np.array([[np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)]])
    features, weights = _look_fields(seed, region_id)
    gaussian = (features.transform(position) @ weights)[0]
    return {name: 0.5 * (1 + math.erf(z / math.sqrt(2))) for name, z in zip(LOOK_FIELDS, gaussian)}


# -- drawing ------------------------------------------------------------------------------------


def draw_scene(region_id: str, heading: int, latitude: float, longitude: float, *, seed: int = 0,
               size: int = 224) -> Image.Image:
    """One synthetic street scene of a region, seen from a capture point towards ``heading``.

    Three sources of variation: the region's style (what makes regions recognisable); its look
    fields at the capture point (``street_look``: building heights and colours, density, greenery,
    street furniture, road width, terrain), which change smoothly with position; and the heading
    (road along or across, the share of sky, where things stand, mirrored compositions). Transient
    details (clouds, cars, light, sensor noise) are random per image.
    """
    style = style_for(region_id)
    look = street_look(region_id, latitude, longitude, heading, seed)
    region_key = zlib.crc32(region_id.encode())
    layout = np.random.default_rng([seed, region_key, heading, 2])  # where things stand along this view
    rng = np.random.default_rng([seed, region_key, zlib.crc32(f"{latitude:.6f},{longitude:.6f}".encode()), heading])
    light = rng.uniform(0.97, 1.03)
    cast = rng.normal(0, 2, 3)
    mirrored = heading in (180, 270)
    horizon = (style.horizon + {0: 0.0, 90: 0.05, 180: -0.07, 270: 0.03}[heading] + (look["slope"] - 0.5) * 0.14
               + rng.uniform(-0.01, 0.01))
    vanish = {0: 0.5, 90: 0.5, 180: 0.5, 270: 0.28}[heading] + (look["bend"] - 0.5) * 0.16 + rng.uniform(-0.01, 0.01)
    s = Scene(size, horizon, vanish, look, layout, rng)

    s.sky(style.sky)
    s.clouds(int(rng.integers(0, 2)))
    if style.hills:
        s.hills(style.hills, style.hill_height)
    if style.landmark in ("sign", "dome") and style.hills:
        s.landmark_on_hill(style.landmark)
    s.ground(style.ground, leafy=style.vegetation is not None)
    sea = _sea_share(style.sea_heading, heading)
    if sea:
        s.sea(sea, with_pier=style.landmark == "pier")
    if style.landmark == "reservoir":
        s.reservoir()
    if style.landmark == "cranes" and heading == style.sea_heading:
        s.cranes()
    s.buildings(style, near=heading == 90)
    if style.landmark in ("billboards", "signs", "studio"):
        s.street_landmark(style.landmark)
    s.road(style.road, style.lane, across=heading == 90)
    s.street_lights(across=heading == 90)
    s.cars(int(rng.integers(0, 3)), across=heading == 90)
    if style.vegetation:
        s.vegetation(style.vegetation, style.vegetation_colour, style.vegetation_count)

    levels = np.arange(256) * light
    lut = np.clip(np.concatenate([levels + c for c in cast]), 0, 255).astype(np.uint8)
    pixels = np.asarray(s.image.point(lut.tolist()), dtype=np.int16)
    pixels += rng.integers(-8, 9, pixels.shape, dtype=np.int16)  # sensor noise; integers are 3x faster than normals
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirrored else image


def _sea_share(sea_heading: int | None, heading: int) -> float:
    """Share of the image width covered by sea: all of it facing the ocean, half at right angles, none inland."""
    if sea_heading is None:
        return 0.0
    turn = (heading - sea_heading) % 360
    return {0: 1.0, 90: 0.5, 270: -0.5}.get(turn, 0.0)  # negative: sea on the left


def _palette_at(colours: tuple[RGB, ...], t: float) -> np.ndarray:
    """The palette as a colour wheel: position ``t`` (mod 1) blends the two neighbouring colours."""
    t = (t % 1.0) * len(colours)
    i, frac = int(t), t - int(t)
    first, second = np.array(colours[i % len(colours)], float), np.array(colours[(i + 1) % len(colours)], float)
    return first * (1 - frac) + second * frac


def _grown(level: float, threshold: float, ramp: float = 0.2) -> float:
    """How far an optional thing (a building, a tree, a lamp post) has grown at this ``level`` of its field.

    0 below its ``threshold``, full size ``ramp`` above it, linear between, so that scenes change
    continuously with position instead of things popping in and out.
    """
    return float(np.clip((level - threshold) / ramp, 0.0, 1.0))


def _rgb(colour: np.ndarray) -> RGB:
    return tuple(int(c) for c in np.clip(colour, 0, 255))


class Scene:
    """A canvas with a horizon and a vanishing point; methods draw one layer each, back to front.

    ``look`` holds the capture point's smooth fields, ``layout`` places things for the region and
    heading (the same draws for every capture point), ``rng`` draws the transient details.
    """

    def __init__(self, size: int, horizon: float, vanish: float, look: dict[str, float],
                 layout: np.random.Generator, rng: np.random.Generator):
        self.size = size
        self.horizon_y = int(size * horizon)
        self.vanish_x = size * vanish
        self.look = look
        self.layout = layout
        self.rng = rng
        self.ridge: list[tuple[float, float]] = []  # the hill outline, once drawn
        self.road_half_width = 0.0  # at the bottom edge, once the road is drawn
        self.image = Image.new("RGB", (size, size))
        self.draw = ImageDraw.Draw(self.image)

    def sky(self, colours: tuple[RGB, RGB]) -> None:
        top, bottom = (np.array(c, dtype=np.float32) for c in colours)
        t = np.linspace(0, 1, max(self.horizon_y, 1), dtype=np.float32)[:, None]
        rows = (top * (1 - t) + bottom * t).astype(np.uint8)
        band = np.broadcast_to(rows[:, None, :], (len(rows), self.size, 3))
        self.image.paste(Image.fromarray(np.ascontiguousarray(band)), (0, 0))

    def clouds(self, count: int) -> None:
        for _ in range(count):
            w = self.size * self.rng.uniform(0.08, 0.18)
            x = self.rng.uniform(-0.1, 0.95) * self.size
            y = self.rng.uniform(0.03, 0.5) * self.horizon_y
            for dx in (0.0, 0.3, 0.55):
                self.draw.ellipse([x + dx * w, y - w * 0.18, x + dx * w + w * 0.6, y + w * 0.12], fill=(246, 247, 250))

    def hills(self, colour: RGB, height: float) -> None:
        x = np.linspace(0, 1, 33)
        phases = 2 * np.pi * np.array([self.look["ridge"], 2 * self.look["ridge"] + self.look["hills"],
                                       self.layout.random()])
        ridge = sum(np.sin(x * np.pi * f + p) / f for f, p in zip((1.5, 3.3, 7.1), phases))
        height *= 0.55 + 0.9 * self.look["hills"]
        top = self.horizon_y - self.size * height * (0.65 + 0.35 * ridge / 1.6)
        outline = [(float(a * self.size), float(b)) for a, b in zip(x, top)]
        self.draw.polygon([*outline, (self.size, self.horizon_y), (0, self.horizon_y)], fill=colour)
        self.ridge = outline

    def landmark_on_hill(self, kind: str) -> None:
        ridge = self.ridge
        if kind == "sign":  # white letter blocks below the ridge
            start = 4 + int(10 * self.look["ridge"])
            letter = self.size / 60
            for i in range(9):
                x, y = ridge[start + i]
                self.draw.rectangle([x, y + letter * 1.2, x + letter, y + letter * 3], fill=(245, 245, 240))
        else:  # the observatory: a white building with dark domes on the highest point
            x, y = min(ridge, key=lambda p: p[1])
            w = self.size * 0.09
            self.draw.rectangle([x - w, y - w * 0.35, x + w, y + 2], fill=(240, 238, 230))
            self.draw.pieslice([x - w * 0.4, y - w * 0.8, x + w * 0.4, y], 180, 360, fill=(50, 55, 60))

    def ground(self, colour: RGB, leafy: bool) -> None:
        lawn = 0.6 * self.look["greenery"] if leafy else 0.0  # greener verges where the street is leafier
        self.draw.rectangle([0, self.horizon_y, self.size, self.size],
                            fill=_rgb(np.array(colour) * (1 - lawn) + np.array((80, 135, 60)) * lawn))

    def sea(self, share: float, with_pier: bool) -> None:
        depth = self.size * (0.09 + 0.05 * self.look["shore"])
        left, right = (0, self.size * share) if share > 0 else (self.size * (1 + share), self.size)
        y0, y1 = self.horizon_y, self.horizon_y + depth
        self.draw.rectangle([left, y0, right, y1], fill=(40, 105, 160))
        for _ in range(6):  # wave crests
            y = self.rng.uniform(y0 + 1, y1 - 1)
            x = self.rng.uniform(left, right)
            self.draw.line([x, y, x + self.size * 0.06, y], fill=(200, 225, 240), width=1)
        self.draw.rectangle([left, y1, right, y1 + depth * 0.5], fill=(232, 214, 170))  # the beach
        if with_pier:
            py = y0 - self.size * 0.015
            self.draw.rectangle([left, py, left + (right - left) * 0.7, py + self.size * 0.012], fill=(90, 70, 55))
            for px in np.linspace(left, left + (right - left) * 0.7, 8):
                self.draw.line([px, py, px, y0 + depth * 0.3], fill=(70, 55, 45), width=1)
            r = self.size * 0.07
            cx = left + (right - left) * 0.55
            self.draw.ellipse([cx - r, py - 2 * r, cx + r, py], outline=(200, 60, 50), width=2)  # a Ferris wheel

    def reservoir(self) -> None:
        w = self.size * (0.28 + 0.2 * self.look["shore"])
        cx = (0.3 + 0.4 * self.look["rhythm"]) * self.size
        y = self.horizon_y + self.size * 0.02
        self.draw.ellipse([cx - w, y, cx + w, y + self.size * 0.07], fill=(60, 120, 170))

    def cranes(self) -> None:
        shift = (self.look["rhythm"] - 0.5) * 0.3
        for _ in range(3):
            x = (self.layout.uniform(0.1, 0.9) + shift) * self.size
            h = self.size * (0.1 + 0.12 * self.look["height"])
            y = self.horizon_y
            self.draw.line([x, y, x, y - h], fill=(200, 70, 40), width=2)
            self.draw.line([x + h * 0.35, y, x + h * 0.35, y - h], fill=(200, 70, 40), width=2)
            self.draw.line([x - h * 0.4, y - h, x + h * 0.9, y - h], fill=(200, 70, 40), width=2)

    def buildings(self, style: RegionStyle, near: bool) -> None:
        """Twice ``building_count`` plots along the view; the look decides which are built, how high, which colour."""
        lo, hi = style.building_height
        look = self.look
        scale = 1.35 if near else 1.0  # looking across the street: the facades are closer
        shift = (look["rhythm"] - 0.5) * 0.2
        tone = 0.7 + 0.6 * look["tone"]
        for _ in range(2 * style.building_count):
            x0, width, own_height, own_hue, plot = self.layout.random(5)
            built = _grown(0.15 + 0.85 * look["density"], plot)
            if not built:
                continue  # an empty plot
            w = self.size * (0.07 + 0.09 * width) * scale
            x = (x0 * 1.1 - 0.05 + shift) * self.size
            if not near and abs(x + w / 2 - self.vanish_x) < self.size * 0.06:
                continue  # keep the end of the road open
            h = self.size * (lo + (hi - lo) * (0.4 * own_height + 0.6 * look["height"])) * scale * built
            base = self.horizon_y + (self.size * 0.08 if near else 0)
            colour = _rgb(_palette_at(style.buildings, look["hue"] + 0.5 * own_hue) * tone)
            self.draw.rectangle([x, base - h, x + w, base], fill=colour)
            if style.roofs:
                self.draw.polygon([(x - 2, base - h), (x + w + 2, base - h), (x + w / 2, base - h - w * 0.4)],
                                  fill=style.roofs)
            if style.windows and h > 8:
                self._windows(x, base - h, w, h, colour)

    def _windows(self, x: float, top: float, w: float, h: float, wall: RGB) -> None:
        step = max(self.size / 45, 3.0)
        pane = tuple(int(c * 0.55 + 30) for c in wall)
        for wy in np.arange(top + step * 0.6, top + h - step, step):
            for wx in np.arange(x + step * 0.5, x + w - step * 0.6, step):
                self.draw.rectangle([wx, wy, wx + step * 0.45, wy + step * 0.5], fill=pane)

    def street_landmark(self, kind: str) -> None:
        if kind == "studio":  # a long windowless studio wall with a stripe
            y, length = self.horizon_y, self.size * (0.3 + 0.3 * self.look["density"])
            self.draw.rectangle([0, y - self.size * 0.12, length, y], fill=(225, 215, 190))
            self.draw.rectangle([0, y - self.size * 0.09, length, y - self.size * 0.07], fill=(150, 40, 40))
            return
        palette = ((230, 40, 60), (250, 200, 30), (40, 90, 220), (240, 240, 240), (20, 20, 20))
        big = kind == "billboards"
        shift = (self.look["rhythm"] - 0.5) * 0.2
        for _ in range(3 if big else 6):
            x0, width, rise, pick, plot = self.layout.random(5)
            shown = _grown(0.3 + 0.7 * self.look["furniture"], plot)
            if not shown:
                continue
            w = self.size * (0.15 + 0.1 * width if big else 0.04 + 0.04 * width) * shown
            h = w * (0.5 if big else 1.6)
            x = (0.9 * x0 + shift) * self.size
            y = self.horizon_y - self.size * (0.08 + 0.17 * rise)
            if big:
                self.draw.line([x + w / 2, y + h, x + w / 2, self.horizon_y], fill=(60, 60, 60), width=2)
            self.draw.rectangle([x, y, x + w, y + h], fill=palette[int(pick * len(palette))])

    def road(self, colour: RGB, lane: RGB, across: bool) -> None:
        size, hy = self.size, self.horizon_y
        if across:  # looking sideways: the road runs across the bottom of the picture
            top = size * (0.88 - 0.12 * self.look["road"])
            self.draw.rectangle([0, top, size, size], fill=colour)
            for x in np.arange(self.layout.uniform(0, 20), size, size / 8):
                self.draw.rectangle([x, top + size * 0.06, x + size / 16, top + size * 0.07], fill=lane)
            return
        half_bottom = self.road_half_width = size * (0.28 + 0.32 * self.look["road"])
        vx = self.vanish_x
        self.draw.polygon([(vx - 2, hy), (vx + 2, hy), (vx + half_bottom, size), (vx - half_bottom, size)], fill=colour)
        depth = size - hy
        for t0 in np.arange(0.05, 1.0, 0.16):  # dashes that lengthen towards the viewer
            t1 = t0 + 0.07
            self.draw.polygon(
                [(vx - t0 * 1.5, hy + depth * t0 ** 2), (vx + t0 * 1.5, hy + depth * t0 ** 2),
                 (vx + t1 * 3, hy + depth * t1 ** 2), (vx - t1 * 3, hy + depth * t1 ** 2)],
                fill=lane,
            )

    def street_lights(self, across: bool) -> None:
        """Up to six lamp posts at the roadside; the look decides how many stand."""
        size, hy, dark = self.size, self.horizon_y, (55, 58, 62)
        for _ in range(6):
            t, side, plot = self.layout.uniform(0.2, 0.95), self.layout.choice([-1, 1]), self.layout.random()
            standing = _grown(self.look["furniture"], plot)
            if not standing:
                continue
            if across:
                x, base, h = t * size, size * (0.88 - 0.12 * self.look["road"]), size * 0.3
            else:
                base = hy + (size - hy) * t
                x = self.vanish_x + side * (self.road_half_width * t + size * 0.02)
                h = size * 0.45 * t
            h *= standing
            width = max(1, int(2.5 * h / (size * 0.3)))
            self.draw.line([x, base, x, base - h], fill=dark, width=width)
            arm = -side * h * 0.25 if not across else h * 0.2
            self.draw.line([x, base - h, x + arm, base - h], fill=dark, width=width)
            self.draw.ellipse([x + arm - width * 1.5, base - h, x + arm + width * 1.5, base - h + width * 2],
                              fill=(250, 235, 170))

    def cars(self, count: int, across: bool) -> None:
        palette = ((200, 30, 30), (240, 240, 240), (30, 30, 35), (150, 155, 165), (30, 70, 150))
        for _ in range(count):
            colour = palette[int(self.rng.integers(len(palette)))]
            if across:
                x, y, w = self.rng.uniform(0, 0.8) * self.size, self.size * 0.86, self.size * 0.18
                self.draw.rounded_rectangle([x, y, x + w, y + w * 0.35], radius=w * 0.08, fill=colour)
                continue
            t = self.rng.uniform(0.15, 0.8)
            y = self.horizon_y + (self.size - self.horizon_y) * t
            w = self.size * 0.2 * t
            x = self.vanish_x + self.rng.choice([-1.0, 0.15]) * w * 1.1
            self.draw.rounded_rectangle([x, y - w * 0.55, x + w, y], radius=max(w * 0.1, 0.5), fill=colour)
            self.draw.rectangle([x + w * 0.12, y - w * 0.5, x + w * 0.88, y - w * 0.32], fill=(60, 70, 80))

    def vegetation(self, kind: str, colour: RGB, count: int) -> None:
        """Up to twice ``count`` plants at fixed spots of the view; the greenery field decides how many grow."""
        size, hy = self.size, self.horizon_y
        for _ in range(2 * count):
            t, side, dx, lean, plot = self.layout.uniform(0.1, 1.0), self.layout.choice([-1, 1]), *self.layout.random(3)
            grown = _grown(self.look["greenery"], plot)
            if not grown:
                continue
            base_y = hy + (size - hy) * t * 0.9
            x = self.vanish_x + side * (size * 0.1 + size * 0.55 * t) + (dx - 0.5) * 10
            scale = (0.25 + 0.75 * t) * grown
            if kind == "palm":
                h = size * 0.45 * scale
                top = (x + (lean - 0.5) * 6, base_y - h)
                self.draw.line([x, base_y, *top], fill=(110, 85, 60), width=max(1, int(3 * scale)))
                frond = size * 0.1 * scale
                for direction in (-1.0, -0.55, -0.2, 0.2, 0.55, 1.0):  # fronds rise, then droop
                    mid = (top[0] + direction * frond * 0.6, top[1] - frond * 0.35 * (1.1 - abs(direction)))
                    end = (top[0] + direction * frond * 1.1, top[1] + frond * 0.45 * abs(direction))
                    self.draw.line([*top, *mid, *end], fill=colour, width=max(2, int(4 * scale)), joint="curve")
            elif kind == "tree":
                r = size * 0.11 * scale
                self.draw.line([x, base_y, x, base_y - r * 1.5], fill=(90, 65, 45), width=max(1, int(3 * scale)))
                self.draw.ellipse([x - r, base_y - r * 3, x + r, base_y - r], fill=colour)
            else:
                r = size * 0.05 * scale
                self.draw.ellipse([x - r * 1.4, base_y - r, x + r * 1.4, base_y + r * 0.3], fill=colour)
