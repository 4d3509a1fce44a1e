import numpy as np
import pytest

from lageo_utils.geo import acc_at_km, haversine_km, nearest_km


def test_haversine_known_distances():
    # One degree of latitude is ~111.2 km on the mean sphere; LA City Hall to Santa Monica Pier ~ 24.6 km.
    assert haversine_km(0, 0, 1, 0) == pytest.approx(111.195, rel=1e-4)
    assert haversine_km(34.0537, -118.2427, 34.0100, -118.4962) == pytest.approx(23.8, abs=0.5)
    assert haversine_km(34.0, -118.0, 34.0, -118.0) == 0


def test_haversine_broadcasts_many_to_one():
    lat = np.array([34.0, 34.1, 34.2])
    d = haversine_km(lat, -118.0, 34.0, -118.0)
    assert d.shape == (3,) and d[0] == 0 and d[1] < d[2]


def test_nearest_matches_brute_force():
    rng = np.random.default_rng(1)
    q = rng.uniform([33.7, -118.8], [34.5, -118.1], size=(500, 2))
    r = rng.uniform([33.7, -118.8], [34.5, -118.1], size=(300, 2))
    dist, idx = nearest_km(q[:, 0], q[:, 1], r[:, 0], r[:, 1])
    brute = haversine_km(q[:, :1], q[:, 1:], r[None, :, 0], r[None, :, 1])
    assert np.array_equal(idx, brute.argmin(axis=1))
    assert np.allclose(dist, brute.min(axis=1))


def test_acc_at_km():
    out = acc_at_km([0.5, 2, 7, 30])
    assert out == {"1": 0.25, "5": 0.5, "10": 0.75, "25": 0.75}
    assert acc_at_km([3.0], thresholds=(2.5,)) == {"2.5": 0.0}
    assert np.isnan(acc_at_km([])["1"])
