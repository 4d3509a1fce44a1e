import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lageo_utils.explorer import PredictionExplorer


def _predictions(regions, tmp_path, pairs=(("hollywood", "hollywood"), ("hollywood", "koreatown"),
                                           ("pasadena", "pasadena"))):
    lookup = regions.set_index("id")
    rows = []
    for i, (true, pred) in enumerate(pairs):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.jpg")
        rows.append({"image_path": f"{i}.jpg", "latitude": lookup.loc[true, "centroid_lat"] + 0.001,
                     "longitude": lookup.loc[true, "centroid_lon"], "true_region": true, "pred_region": pred,
                     "top_regions": [pred, "downtown_la", "malibu"], "top_probs": [0.6, 0.3, 0.1],
                     "confidence": 0.6, "pred_lat": lookup.loc[pred, "centroid_lat"],
                     "pred_lon": lookup.loc[pred, "centroid_lon"], "error_km": 0.1 if true == pred else 5.0,
                     "correct": true == pred})
    rows.append({**rows[0], "image_path": "missing.jpg"})
    return pd.DataFrame(rows)


def _two_models(regions, tmp_path):
    zeroshot = _predictions(regions, tmp_path)
    finetuned = _predictions(regions, tmp_path, pairs=(("hollywood", "pasadena"), ("hollywood", "hollywood"),
                                                       ("pasadena", "koreatown")))
    finetuned = finetuned[finetuned["image_path"] != "missing.jpg"]  # a model may lack an image
    return {"zeroshot": zeroshot, "finetuned": finetuned}


def test_explorer_lists_regions_and_images_and_draws(regions, tmp_path):
    explorer = PredictionExplorer({"finetuned": _predictions(regions, tmp_path)}, regions, tmp_path)
    assert [v for _, v in explorer.region_picker.options] == ["hollywood", "pasadena"]  # region order
    assert list(explorer.image_picker.options) == ["0.jpg", "1.jpg", "missing.jpg"]
    explorer.region_picker.value = "pasadena"
    assert list(explorer.image_picker.options) == ["2.jpg"]
    fig = explorer.figure("1.jpg")
    image_ax, bar_ax, map_ax = fig.axes[:3]
    assert image_ax.get_title() == "true: Hollywood"
    assert [t.get_text() for t in bar_ax.get_yticklabels()] == ["Malibu", "Downtown Los Angeles", "Koreatown"]
    assert map_ax.get_xlim()[0] > 100_000  # EPSG:3310 metres, not degrees
    unreadable = explorer.figure("missing.jpg")
    assert "unreadable" in unreadable.axes[0].texts[0].get_text()
    assert plt.get_fignums() == []  # built outside pyplot
    with pytest.raises(KeyError, match="nope.jpg"):
        explorer.figure("nope.jpg")


def _bar_labels(explorer):
    return [t.get_text() for t in explorer.shown.axes[1].get_yticklabels()]


def test_every_control_redraws_the_picture(regions, tmp_path):
    explorer = PredictionExplorer(_two_models(regions, tmp_path), regions, tmp_path,
                                  labels={"zeroshot": "Zero-shot CLIP", "finetuned": "Fine-tuned CLIP"})
    assert [label for label, _ in explorer.model_picker.options] == ["Zero-shot CLIP", "Fine-tuned CLIP"]
    assert explorer.shown is not None and "Zero-shot CLIP on 0.jpg" in explorer.shown.get_label()

    drawn = []
    original = explorer.redraw
    explorer.redraw = lambda: (original(), drawn.append(explorer.shown.get_label()))

    explorer.image_picker.value = "1.jpg"  # Image
    assert drawn[-1].startswith("Zero-shot CLIP on 1.jpg") and _bar_labels(explorer)[-1] == "Koreatown"
    explorer.model_picker.value = "finetuned"  # Model: same image, the other model's predictions
    assert drawn[-1].startswith("Fine-tuned CLIP on 1.jpg") and _bar_labels(explorer)[-1] == "Hollywood"
    assert explorer.shown.axes[1].get_title().startswith("Fine-tuned CLIP: top-3")
    explorer.region_picker.value = "pasadena"  # Region
    assert drawn[-1].startswith("Fine-tuned CLIP on 2.jpg") and _bar_labels(explorer)[-1] == "Koreatown"
    assert len(drawn) == 3  # one picture per change, not one per refreshed option


def test_switching_model_keeps_what_the_other_table_has(regions, tmp_path):
    explorer = PredictionExplorer(_two_models(regions, tmp_path), regions, tmp_path)
    explorer.image_picker.value = "missing.jpg"
    explorer.model_picker.value = "finetuned"  # has no missing.jpg: falls back to the region's first image
    assert explorer.region_picker.value == "hollywood"
    assert list(explorer.image_picker.options) == ["0.jpg", "1.jpg"]
    assert explorer.image_picker.value == "0.jpg" and "on 0.jpg" in explorer.shown.get_label()


def test_explorer_needs_a_table(regions, tmp_path):
    with pytest.raises(ValueError, match="at least one predictions table"):
        PredictionExplorer({}, regions, tmp_path)


def test_the_method_control_shows_a_coordinate_answer(regions, tmp_path):
    models = _two_models(regions, tmp_path)
    coordinates = {}
    for name, table in models.items():
        rows = []
        for row in table.itertuples():
            for method, (lat, lon, error) in {"centroid": (row.pred_lat, row.pred_lon, row.error_km),
                                              "retrieval": (row.latitude + 0.0005, row.longitude, 0.056)}.items():
                for voted in (False, True):
                    rows.append({"image_path": row.image_path, "method": method, "voted": voted, "pred_lat": lat,
                                 "pred_lon": lon, "error_km": error + voted})
        coordinates[name] = pd.DataFrame(rows)
    explorer = PredictionExplorer(models, regions, tmp_path, coordinates=coordinates)
    assert list(explorer.method_picker.options) == ["centroid", "retrieval"]
    assert explorer.method_picker in explorer.controls
    assert "retrieval" not in explorer.shown.get_label()
    explorer.method_picker.value = "retrieval"
    assert "retrieval 0.06 km" in explorer.shown.get_label()  # the per-image answer, not the voted one
    labels = [t.get_text() for t in explorer.shown.axes[2].get_legend().get_texts()]
    assert "retrieval: 0.06 km off" in labels
    without = PredictionExplorer(models, regions, tmp_path)  # no coordinates: no Method control
    assert without.method_picker not in without.controls
