import inspect
import json
import math

import h3
import numpy as np
import pandas as pd
import pytest

from lageo_utils import geolocate
from lageo_utils.geo import haversine_km
from lageo_utils.geolocate import (
    Gallery,
    NeighbourIndex,
    answers_table,
    build_geocells,
    centroid,
    expected,
    fit_locator,
    geocell,
    haversine_smoothing,
    load_geocell_model,
    load_locator,
    pool_by_location,
    region_retrieval,
    retrieval,
    save_geocell_model,
    save_locator,
    spherical_mean,
    train_geocell_head,
    tune_geocell,
    tune_retrieval,
)

CENTROIDS = np.array([[34.05, -118.25], [34.10, -118.33], [34.02, -118.49]])


def unit(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def orthonormal(n: int, dim: int, seed: int = 0) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, n)))
    return q.T.astype(np.float32)


# -- geometry and voting ------------------------------------------------------------------------


def test_spherical_mean_midpoints_and_antimeridian():
    lat, lon = spherical_mean([0, 0], [10, 20])
    assert (lat, lon) == pytest.approx((0, 15))
    lat, lon = spherical_mean([10, 10], [179, -179])
    assert abs(lon) == pytest.approx(180) and lat > 10  # not 0 as averaging degrees would say
    # Within LA the weighted sphere mean agrees with the mean in a local equirectangular projection.
    pts = np.array([[34.0, -118.3], [34.05, -118.2], [34.1, -118.4]])
    w = np.array([0.5, 0.3, 0.2])
    lat, lon = spherical_mean(pts[:, 0], pts[:, 1], w)
    assert haversine_km(lat, lon, w @ pts[:, 0], w @ pts[:, 1]) < 0.01


def test_pool_by_location_means_rows_of_one_capture_point():
    values = np.array([[1.0, 0.0], [0.0, 1.0], [4.0, 4.0]])
    pooled = pool_by_location(values, ["p", "p", "q"])
    assert np.allclose(pooled, [[0.5, 0.5], [0.5, 0.5], [4, 4]])
    assert np.allclose(np.linalg.norm(pool_by_location(values, ["p", "p", "q"], normalise=True), axis=1), 1)
    with pytest.raises(ValueError, match="row 1"):
        pool_by_location(values, ["p", None, "q"])


# -- classifier methods -------------------------------------------------------------------------


def test_centroid_answers_the_top_region_centroid():
    probs = np.array([[0.2, 0.5, 0.3], [0.7, 0.1, 0.2]])
    a = centroid(probs, CENTROIDS)
    assert np.array_equal(a.region, [1, 0])
    assert np.allclose(np.column_stack([a.lat, a.lon]), CENTROIDS[[1, 0]])
    assert np.allclose(a.confidence, [0.5, 0.7])


def test_expected_is_the_probability_weighted_point_between_centroids():
    probs = np.array([[0.6, 0.2, 0.2]])
    a = expected(probs, CENTROIDS, k=2)  # weights 0.6 / 0.8 and 0.2 / 0.8 on centroids 0 and 1 (2 ties, loses)
    d01 = haversine_km(*CENTROIDS[0], *CENTROIDS[1])
    assert haversine_km(a.lat[0], a.lon[0], *CENTROIDS[0]) == pytest.approx(0.25 * d01, rel=1e-3)
    assert haversine_km(a.lat[0], a.lon[0], *CENTROIDS[1]) == pytest.approx(0.75 * d01, rel=1e-3)
    assert a.confidence[0] == 0.6 and a.region[0] == 0
    one = expected(probs, CENTROIDS, k=1)
    assert (one.lat[0], one.lon[0]) == pytest.approx(tuple(CENTROIDS[0]))


def test_pooled_vote_differs_from_the_single_votes():
    # Headings 1 and 2 lean weakly to region 0, heading 3 is sure of region 1: two of three single
    # votes say region 0, the pooled probabilities (0.383, 0.617) say region 1 for all three.
    probs = np.array([[0.55, 0.45, 0.0], [0.55, 0.45, 0.0], [0.05, 0.95, 0.0], [0.1, 0.1, 0.8]])
    ids = ["p", "p", "p", "q"]
    single, voted = centroid(probs, CENTROIDS), centroid(probs, CENTROIDS, location_ids=ids)
    assert single.region.tolist() == [0, 0, 1, 2]
    assert voted.region.tolist() == [1, 1, 1, 2]
    assert voted.confidence[:3] == pytest.approx([(0.45 + 0.45 + 0.95) / 3] * 3)
    # The same vote through retrieval: heading embeddings are averaged before the search.
    basis = orthonormal(3, 8)
    gallery = Gallery(basis, CENTROIDS[:, 0], CENTROIDS[:, 1])
    emb = unit([basis[0] + 0.9 * basis[1], basis[0] + 0.9 * basis[1], basis[1] - 0.5 * basis[0]])
    alone = retrieval(emb, gallery, k=1)
    pooled = retrieval(emb, gallery, k=1, location_ids=["p", "p", "p"])
    assert alone.neighbours[:, 0].tolist() == [0, 0, 1] and pooled.neighbours[:, 0].tolist() == [1, 1, 1]


# -- retrieval ----------------------------------------------------------------------------------


def gallery_of_known_neighbours():
    """Four gallery images with orthonormal embeddings; a query near image 0, second nearest image 1."""
    basis = orthonormal(4, 16)
    coords = np.array([[34.00, -118.30], [34.01, -118.30], [34.20, -118.10], [33.90, -118.50]])
    query = unit(basis[0] + 0.5 * basis[1])
    return Gallery(basis, coords[:, 0], coords[:, 1], region=[0, 0, 1, 2], paths=["a", "b", "c", "d"]), coords, query


def test_retrieval_answers_with_softmax_weighted_neighbour_coordinates():
    gallery, coords, query = gallery_of_known_neighbours()
    s0, s1 = 1 / math.sqrt(1.25), 0.5 / math.sqrt(1.25)
    a = retrieval(query[None], gallery, k=2, temperature=0.1)
    assert a.neighbours.tolist() == [[0, 1]]
    assert a.similarities[0] == pytest.approx([s0, s1], abs=1e-6)
    assert a.confidence[0] == pytest.approx(s0, abs=1e-6)
    w1 = 1 / (1 + math.exp((s0 - s1) / 0.1))  # softmax weight of the second neighbour
    # Both neighbours lie on one meridian: the answer is at the weighted latitude.
    assert a.lat[0] == pytest.approx(34.00 + 0.01 * w1, abs=1e-6) and a.lon[0] == pytest.approx(-118.30)
    sharp = retrieval(query[None], gallery, k=4, temperature=1e-4)  # a cold softmax answers the nearest image
    assert (sharp.lat[0], sharp.lon[0]) == pytest.approx(tuple(coords[0]))
    rows = pd.DataFrame({"image_path": ["q.jpg"], "latitude": [34.0], "longitude": [-118.3], "location_id": ["p"]})
    table = answers_table(rows, a, gallery=gallery)
    assert table.loc[0, "neighbours"] == ["a", "b"] and table.loc[0, "error_km"] == pytest.approx(
        haversine_km(34.0, -118.3, a.lat[0], a.lon[0]))
    assert table.loc[0, "confidence"] == a.confidence[0] and table.loc[0, "location_id"] == "p"
    classified = answers_table(rows.assign(region_id="r1"), centroid([[0.2, 0.5, 0.3]], CENTROIDS), ["r0", "r1", "r2"])
    assert classified.loc[0, "pred_region"] == "r1" and bool(classified.loc[0, "correct"])


def test_region_retrieval_searches_the_predicted_region_and_falls_back():
    gallery, coords, query = gallery_of_known_neighbours()
    basis = gallery.embeddings
    q = unit([basis[2] + 0.1 * basis[0], basis[2] + 0.1 * basis[0], basis[3]])
    probs = np.array([[0.7, 0.2, 0.1, 0.0], [0.1, 0.2, 0.0, 0.7], [0.1, 0.1, 0.8, 0.0]])
    a = region_retrieval(q, probs, gallery, k=2, temperature=1e-3)
    # Query 0: nearest overall is image 2 (region 1), but region 0 is predicted: images 0 and 1 only.
    assert a.neighbours[0].tolist() == [0, 1] and (a.lat[0], a.lon[0]) == pytest.approx(tuple(coords[0]))
    # Query 1: region 3 has no gallery image; the next most probable region with images is 1.
    assert a.region[1] == 1 and a.neighbours[1].tolist() == [2, -1] and np.isnan(a.similarities[1, 1])
    assert a.confidence[1] == pytest.approx(0.2)
    assert (a.lat[1], a.lon[1]) == pytest.approx(tuple(coords[2]))  # padding carries no weight
    assert a.region[2] == 2 and a.neighbours[2, 0] == 3
    with pytest.raises(ValueError, match="regions"):
        region_retrieval(q, probs, Gallery(basis, coords[:, 0], coords[:, 1]))


def test_faiss_and_exact_search_give_the_same_neighbours():
    rng = np.random.default_rng(3)
    vectors, queries = unit(rng.standard_normal((3000, 32))), unit(rng.standard_normal((200, 32)))
    exact = NeighbourIndex(vectors, "exact")
    assert NeighbourIndex(vectors, "auto").backend == "exact"  # small galleries stay exact
    s_exact, i_exact = exact.search(queries, 10)
    sims = queries @ vectors.T
    assert np.array_equal(i_exact, np.argsort(-sims, axis=1, kind="stable")[:, :10])
    assert np.allclose(s_exact, np.take_along_axis(sims, i_exact, axis=1))
    s_flat, i_flat = NeighbourIndex(vectors, "faiss").search(queries, 10)
    assert np.array_equal(i_flat, i_exact) and np.allclose(s_flat, s_exact, atol=1e-5)
    ivf = NeighbourIndex(vectors, "faiss-ivf", nlist=16, nprobe=16)  # probing every list: exact again
    assert np.array_equal(ivf.search(queries, 10)[1], i_exact)
    assert exact.search(queries, 5000)[1].shape == (200, 3000)  # k is capped at the gallery size


def test_gallery_search_within_subsets():
    basis = orthonormal(6, 8)
    gallery = Gallery(basis, np.linspace(34, 34.05, 6), np.full(6, -118.3))
    query = unit(basis[0] + 0.5 * basis[4] + 0.2 * basis[5])
    assert gallery.search(query, 2, rows=[3, 4, 5])[1].tolist() == [[4, 5]]
    assert gallery.search(query, 2, rows=[0, 1, 2])[1].tolist() == [[0, 1]]  # same size, other rows: no stale index
    sims, idx = gallery.search(query, 3, rows=[5])
    assert idx.tolist() == [[5, -1, -1]] and np.isnan(sims[0, 1:]).all()


def test_exact_search_breaks_ties_by_gallery_row():
    v = unit([[1, 0], [0, 1], [1, 0], [1, 0]])
    assert NeighbourIndex(v, "exact").search(unit([[1, 0]]), 3)[1].tolist() == [[0, 2, 3]]


def test_gallery_rejects_unnormalised_embeddings_and_bad_coordinates():
    with pytest.raises(ValueError, match="row 1 has norm"):
        Gallery(np.array([[1.0, 0], [2.0, 0]]), [34, 34], [-118, -118])
    with pytest.raises(ValueError, match="row 0 has an invalid coordinate"):
        Gallery(unit([[1.0, 0]]), [np.nan], [-118])


# -- geocells -----------------------------------------------------------------------------------


def test_sparse_cells_merge_into_their_parents_repeatedly():
    parent = h3.latlng_to_cell(34.05, -118.24, 7)
    dense, sparse_a, sparse_b = sorted(h3.cell_to_children(parent, 8))[:3]
    lone = h3.latlng_to_cell(34.40, -118.60, 8)  # far away: alone at every resolution
    points = [h3.cell_to_latlng(c) for c in [dense] * 12 + [sparse_a] * 3 + [sparse_b] * 3 + [lone]]
    lat, lon = np.array(points).T
    cells, index = build_geocells(lat, lon, resolution=8, min_cell_images=5)
    by_id = dict(zip(cells.ids, cells.counts))
    assert by_id[dense] == 12  # dense enough: stays at resolution 8
    assert by_id[parent] == 6  # two sparse siblings of 3 merged into their resolution-7 parent
    lone_cell = cells.ids[index[-1]]
    assert h3.get_resolution(lone_cell) == 0 and lone_cell == h3.cell_to_parent(lone, 0)  # merged all the way up
    assert np.array_equal(cells.assign(lat, lon), index)  # new points land in the cell their training peers hold
    merged = cells.ids.index(parent)  # answered by its training images' centroid
    assert (cells.lat[merged], cells.lon[merged]) == pytest.approx(spherical_mean(lat[12:18], lon[12:18]))


def test_haversine_label_smoothing_by_hand():
    # Point at (34, -118); cell 0 at the point, cell 1 0.01 degree north (1.11195 km), tau 1 km:
    # weights 1 and exp(-1.11195) = 0.32893, normalised 0.75249 and 0.24751.
    target = haversine_smoothing([34.0], [-118.0], [34.0, 34.01], [-118.0, -118.0], tau_km=1.0)
    assert target[0] == pytest.approx([0.75249, 0.24751], abs=1e-4)
    wide = haversine_smoothing([34.0], [-118.0], [34.0, 34.01], [-118.0, -118.0], tau_km=100.0)
    assert wide[0, 1] == pytest.approx(math.exp(-0.0111195) / (1 + math.exp(-0.0111195)), rel=1e-4)


def clustered_places(n_per: int, seed: int, dim: int = 24):
    """Four places about 2 km apart; an image's embedding is its place's direction plus noise."""
    rng = np.random.default_rng(seed)
    places = np.array([[34.00, -118.30], [34.02, -118.30], [34.00, -118.28], [34.02, -118.28]])
    directions = orthonormal(4, dim, seed=42)
    which = np.repeat(np.arange(4), n_per)
    lat = places[which, 0] + rng.normal(0, 0.0004, len(which))
    lon = places[which, 1] + rng.normal(0, 0.0004, len(which))
    emb = unit(directions[which] + 0.3 * rng.standard_normal((len(which), dim)).astype(np.float32) / math.sqrt(dim))
    return emb, lat, lon, which


def test_geocell_head_learns_cells_deterministically(tmp_path):
    emb, lat, lon, _ = clustered_places(30, seed=0)
    settings = {"resolution": 8, "min_cell_images": 5, "tau_km": 0.5, "epochs": 10, "batch_size": 64}
    model = train_geocell_head(emb, lat, lon, **settings, seed=1)  # two shuffled batches per epoch
    again = train_geocell_head(emb, lat, lon, **settings, seed=1)
    assert np.array_equal(model.weight, again.weight) and np.array_equal(model.bias, again.bias)
    q_emb, q_lat, q_lon, _ = clustered_places(5, seed=9)
    a = geocell(q_emb, model)
    true_cell = model.cells.assign(q_lat, q_lon)
    assert np.mean(a.cell == true_cell) >= 0.9
    assert np.allclose(a.lat, model.cells.lat[a.cell]) and np.all(a.confidence > 0)
    # Refinement: the neighbours all lie in the predicted cell.
    gallery = Gallery(emb, lat, lon)
    refined = geocell(q_emb, model, gallery=gallery, k=3, temperature=0.05)
    cells_of_neighbours = model.train_cell[refined.neighbours]
    assert np.all((cells_of_neighbours == refined.cell[:, None]) | (refined.neighbours < 0))
    save_geocell_model(model, tmp_path / "geocell.pt")
    loaded = load_geocell_model(tmp_path / "geocell.pt")
    assert np.array_equal(loaded.probabilities(q_emb), model.probabilities(q_emb))
    assert loaded.cells.ids == model.cells.ids


# -- tuning never sees the test split -----------------------------------------------------------


def line_gallery(n: int = 40):
    """Gallery images every 0.001 degree (111 m) along a meridian, nearly orthogonal embeddings."""
    emb = orthonormal(n, 64, seed=5)
    return Gallery(emb, 34.0 + 0.001 * np.arange(n), np.full(n, -118.3))


def spread_queries(gallery: Gallery, centres):
    """Each query looks equally like the 4 images around its position but not like the image at it: k=4 is exact."""
    emb = unit([sum(gallery.embeddings[c + o] for o in (-2, -1, 1, 2)) for c in centres])
    return emb, gallery.lat[centres], gallery.lon[centres]


def sharp_queries(gallery: Gallery, centres):
    """Each query is its own image plus a trace of an image 0.7 km away: k=1 is exact, averaging hurts."""
    emb = unit([gallery.embeddings[c] + 0.3 * gallery.embeddings[c + 7] for c in centres])
    return emb, gallery.lat[centres], gallery.lon[centres]


def test_retrieval_settings_come_from_validation_only():
    gallery = line_gallery()
    val = spread_queries(gallery, range(3, 25))
    test = sharp_queries(gallery, range(3, 25))
    grid = {"ks": (1, 4), "temperatures": (1.0,)}
    assert tune_retrieval(*val, gallery, **grid).k == 4
    assert tune_retrieval(*test, gallery, **grid).k == 1  # what tuning on test would have picked
    locator = fit_locator(CENTROIDS, gallery, val[0], None, val[1], val[2], methods=("retrieval",),
                          retrieval_ks=(1, 4), temperatures=(1.0,))
    assert (locator.retrieval_settings.k, locator.retrieval_settings.temperature) == (4, 1.0)
    assert locator.settings()["retrieval"]["k"] == 4 and len(locator.settings()["retrieval"]["grid"]) == 2
    answered = locator.answer("retrieval", test[0])
    assert answered.neighbours.shape == (len(test[0]), 4)
    # The tuning API has no way in for test data: only the gallery (train) and validation arrays.
    for fn in (fit_locator, tune_retrieval, tune_geocell, geolocate.tune_expected):
        assert not [p for p in inspect.signature(fn).parameters if "test" in p], fn.__name__


def test_geocell_settings_are_the_validation_optimum():
    emb, lat, lon, _ = clustered_places(20, seed=0)
    v_emb, v_lat, v_lon, _ = clustered_places(4, seed=1)
    settings, model = tune_geocell(emb, lat, lon, v_emb, v_lat, v_lon, resolutions=(7, 8), min_cell_images=(5,),
                                   taus_km=(0.5,), epochs=20, seed=0)
    scores = {(r, t): s for r, _, t, s in settings.grid}
    assert settings.score == max(scores.values()) and scores[(settings.resolution, settings.tau_km)] == settings.score
    # Recompute the chosen candidate's validation score from scratch.
    retrained = train_geocell_head(emb, lat, lon, resolution=settings.resolution, min_cell_images=5,
                                   tau_km=settings.tau_km, epochs=20, seed=0)
    a = geocell(v_emb, retrained)
    assert -np.median(haversine_km(v_lat, v_lon, a.lat, a.lon)) == pytest.approx(settings.score)
    assert np.array_equal(retrained.weight, model.weight)


def test_locator_answers_every_method_and_round_trips(tmp_path):
    emb, lat, lon, which = clustered_places(20, seed=0)
    regions = np.where(which < 2, 0, 1)
    gallery = Gallery(emb, lat, lon, region=regions)
    v_emb, v_lat, v_lon, v_which = clustered_places(3, seed=1)
    centroids = np.array([[34.01, -118.30], [34.01, -118.28]])
    v_probs = np.where(np.arange(2)[None, :] == np.where(v_which < 2, 0, 1)[:, None], 0.8, 0.2)
    locator = fit_locator(centroids, gallery, v_emb, v_probs, v_lat, v_lon, geocell_resolutions=(8,),
                          geocell_taus_km=(0.5,), geocell_min_cell_images=(5,), geocell_epochs=10,
                          retrieval_ks=(1, 5), temperatures=(0.05,))
    assert set(json.loads(json.dumps(locator.settings()))) == {"expected", "retrieval", "region_retrieval", "geocell"}
    t_emb, t_lat, t_lon, t_which = clustered_places(2, seed=2)
    t_probs = np.where(np.arange(2)[None, :] == np.where(t_which < 2, 0, 1)[:, None], 0.8, 0.2)
    errors = {}
    for method in geolocate.METHODS:
        a = locator.answer(method, t_emb, t_probs, location_ids=None)
        assert len(a) == len(t_emb) and np.all(np.isfinite(a.lat)) and a.method == method
        errors[method] = np.median(haversine_km(t_lat, t_lon, a.lat, a.lon))
    assert errors["retrieval"] < 0.5 < errors["centroid"]  # the places are 1.1 km from their region centroid
    with pytest.raises(ValueError, match="needs region probabilities"):
        locator.answer("centroid", t_emb)
    save_locator(locator, tmp_path / "zeroshot")
    loaded = load_locator(tmp_path / "zeroshot")
    assert loaded.settings() == locator.settings()
    for method in geolocate.METHODS:
        a, b = locator.answer(method, t_emb, t_probs), loaded.answer(method, t_emb, t_probs)
        assert np.array_equal(a.lat, b.lat) and np.array_equal(a.lon, b.lon), method


def test_answer_all_stacks_every_method_per_image_and_voted(tmp_path):
    emb, lat, lon, which = clustered_places(10, seed=0)
    paths = [f"train/{i}.jpg" for i in range(len(emb))]
    gallery = Gallery(emb, lat, lon, region=np.where(which < 2, 0, 1), paths=paths)
    centroids = np.array([[34.01, -118.30], [34.01, -118.28]])
    v_emb, v_lat, v_lon, v_which = clustered_places(3, seed=1)
    v_probs = np.where(np.arange(2)[None, :] == np.where(v_which < 2, 0, 1)[:, None], 0.8, 0.2)
    locator = fit_locator(centroids, gallery, v_emb, v_probs, v_lat, v_lon, methods=("centroid", "retrieval"),
                          retrieval_ks=(1, 5), temperatures=(0.05,))
    t_emb, t_lat, t_lon, t_which = clustered_places(2, seed=2)
    t_probs = np.where(np.arange(2)[None, :] == np.where(t_which < 2, 0, 1)[:, None], 0.9, 0.1)
    rows = pd.DataFrame({"image_path": [f"test/{i}.jpg" for i in range(len(t_emb))], "latitude": t_lat,
                         "longitude": t_lon, "location_id": [f"p{w}" for w in t_which],
                         "region_id": np.where(t_which < 2, "a", "b")})
    table = geolocate.answer_all(locator, rows, t_emb, t_probs, ["a", "b"], ["centroid", "retrieval"])
    assert len(table) == 2 * 2 * len(rows)  # two methods, per image and voted
    assert table.groupby(["method", "voted"]).size().to_dict() == {(m, v): len(rows) for m in ("centroid", "retrieval")
                                                                   for v in (False, True)}
    voted = table[table["voted"] & (table["method"] == "retrieval")]
    assert voted.groupby("location_id")["pred_lat"].nunique().max() == 1  # a capture point answers once
    single = table[~table["voted"] & (table["method"] == "retrieval")]
    direct = locator.answer("retrieval", t_emb)
    assert np.array_equal(single["pred_lat"], direct.lat)
    # the 3 nearest gallery images are kept for reports whatever k retrieval uses, on per-image rows only
    sims, idx = gallery.search(t_emb, geolocate.NEAREST_SHOWN)
    assert list(single["nearest"].iloc[0]) == [paths[j] for j in idx[0]]
    assert np.allclose(single["nearest_similarities"].iloc[0], sims[0])
    assert voted["nearest"].isna().all()
    table.to_parquet(tmp_path / "answers.parquet")  # list columns with gaps survive Parquet
    back = pd.read_parquet(tmp_path / "answers.parquet")
    assert list(back["nearest"].iloc[0]) == list(single["nearest"].iloc[0])
