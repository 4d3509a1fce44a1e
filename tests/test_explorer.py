import numpy as np
import pandas as pd
from PIL import Image

from lageo_utils.explorer import PredictionExplorer


def _predictions(regions, tmp_path):
    lookup = regions.set_index("id")
    rows = []
    for i, (true, pred) in enumerate([("hollywood", "hollywood"), ("hollywood", "koreatown"), ("pasadena", "pasadena")]):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.jpg")
        rows.append({"image_path": f"{i}.jpg", "latitude": lookup.loc[true, "centroid_lat"] + 0.001,
                     "longitude": lookup.loc[true, "centroid_lon"], "true_region": true, "pred_region": pred,
                     "top_regions": [pred, "downtown_la", "malibu"], "top_probs": [0.6, 0.3, 0.1],
                     "confidence": 0.6, "pred_lat": lookup.loc[pred, "centroid_lat"],
                     "pred_lon": lookup.loc[pred, "centroid_lon"], "error_km": 0.1 if true == pred else 5.0,
                     "correct": true == pred})
    rows.append({**rows[0], "image_path": "missing.jpg"})
    return pd.DataFrame(rows)


def test_explorer_lists_regions_and_images_and_draws(regions, tmp_path):
    explorer = PredictionExplorer(_predictions(regions, tmp_path), regions, tmp_path)
    assert [v for _, v in explorer.region_picker.options] == ["hollywood", "pasadena"]  # region order
    assert [label for label, _ in explorer.image_picker.options] == ["0.jpg", "1.jpg", "missing.jpg"]
    explorer.region_picker.value = "pasadena"
    assert [label for label, _ in explorer.image_picker.options] == ["2.jpg"]
    fig = explorer.figure(1)
    image_ax, bar_ax, map_ax = fig.axes[:3]
    assert image_ax.get_title() == "true: Hollywood"
    assert [t.get_text() for t in bar_ax.get_yticklabels()] == ["Malibu", "Downtown Los Angeles", "Koreatown"]
    assert map_ax.get_xlim()[0] > 100_000  # EPSG:3310 metres, not degrees
    unreadable = explorer.figure(3)
    assert "unreadable" in unreadable.axes[0].texts[0].get_text()
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []  # built outside pyplot
