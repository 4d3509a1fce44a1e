"""``lageo compare``: runs side by side, the parameters that differ, paired tests on shared test images."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import yaml

from lageo_utils.cli import main
from lageo_utils.compare import load_run, paired_comparisons
from lageo_utils.metrics import metrics_json
from lageo_utils.runs import RunDir, resolve_params


def fake_run(root, name: str, seed: int, test_hash: str, accuracy: float, regions) -> RunDir:
    """A finished run's files, with predictions of a given accuracy on 40 images (10 capture points)."""
    run = RunDir(root / name)
    run.mkdir(parents=True)
    params = {**resolve_params("demo"), "seed": seed}
    run.params_file.write_text(yaml.safe_dump({"run_id": name, "params": params}))
    run.data_file.write_text(json.dumps({"sha256": {"test.csv": test_hash}}))
    ids = regions["id"].tolist()
    rng = np.random.default_rng(seed)
    tables = {}
    for model, acc in (("zeroshot", 0.1), ("finetuned", accuracy)):
        true = [ids[i % 3] for i in range(40)]
        correct = rng.random(40) < acc
        pred = [t if c else ids[(ids.index(t) + 1) % len(ids)] for t, c in zip(true, correct)]
        tables[model] = pd.DataFrame({"image_path": [f"img{i}.jpg" for i in range(40)], "true_region": true,
                                      "pred_region": pred, "confidence": rng.random(40), "error_km": rng.random(40) * 9,
                                      "correct": correct, "location_id": [f"p{i // 4}" for i in range(40)]})
        tables[model].to_parquet(run.predictions(model))
    doc = metrics_json(tables["zeroshot"], tables["finetuned"], regions, params, {"train": 1, "val": 1, "test": 40},
                       n_boot=50)
    run.metrics.write_text(json.dumps(doc))
    return run


def test_compare_shows_runs_the_differing_parameter_and_paired_tests(tmp_path, regions, capsys):
    a = fake_run(tmp_path, "run-a", seed=1, test_hash="same", accuracy=0.9, regions=regions)
    b = fake_run(tmp_path, "run-b", seed=2, test_hash="same", accuracy=0.2, regions=regions)
    c = fake_run(tmp_path, "run-c", seed=3, test_hash="other", accuracy=0.5, regions=regions)
    assert main(["compare", str(a), str(b), str(c), "--out", str(tmp_path / "cmp"), "--n-boot", "50"]) == 0
    rows = pd.read_csv(tmp_path / "cmp" / "comparison.csv")
    assert sorted(set(zip(rows["run"], rows["model"]))) == sorted(
        (r, m) for r in ("run-a", "run-b", "run-c") for m in ("finetuned", "zeroshot"))
    assert rows["accuracy_ci95"].str.match(r"\[\d\.\d{3}, \d\.\d{3}\]").all()
    html = (tmp_path / "cmp" / "comparison.html").read_text()
    assert "Parameters that differ" in html and "<th>seed</th>" in html and "data:image/png;base64," in html
    # paired only where the test images are the same: a with b, never with c
    assert "run-a" in html and "run-b" in html and html.count("run-c") >= 1
    table = paired_comparisons([load_run(r) for r in (a, b, c)], n_boot=50)
    assert set(zip(table["run_a"], table["run_b"])) == {("run-a", "run-b")}
    assert table.iloc[0]["ci95"] in html
    assert (table[table["model"] == "finetuned"]["a_minus_b"] > 0).all()  # fine-tuned 0.9 vs 0.2 on the same images


def test_compare_keeps_the_coordinate_rows_of_a_model_without_classes(tmp_path, regions, capsys):
    """An image-only backbone's frozen model (e.g. DINOv2 before training) answers retrieval but has no classes."""
    a = fake_run(tmp_path, "clip", seed=1, test_hash="same", accuracy=0.9, regions=regions)
    b = fake_run(tmp_path, "dinov2", seed=1, test_hash="same", accuracy=0.8, regions=regions)
    metrics = json.loads(b.metrics.read_text())
    del metrics["zeroshot"]
    metrics["methods"] = {"zeroshot": {"retrieval": {"n_images": 40, "median_error_km": 1.5,
                                                     "median_error_km_ci95": [1.0, 2.0], "acc_at_km": {"1": 0.3}}}}
    b.metrics.write_text(json.dumps(metrics))
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "cmp"), "--n-boot", "50"]) == 0
    rows = pd.read_csv(tmp_path / "cmp" / "comparison.csv")
    frozen = rows[(rows["run"] == "dinov2") & (rows["model"] == "zeroshot")]
    assert frozen[["method", "median_error_km", "median_error_km_ci95", "acc_at_1km"]].values.tolist() == [
        ["retrieval", 1.5, "[1.000, 2.000]", 0.3]]
    assert set(rows[rows["run"] == "dinov2"]["model"]) == {"zeroshot", "finetuned"}
    table = paired_comparisons([load_run(r) for r in (a, b)], n_boot=50)
    assert table["model"].tolist() == ["finetuned"]  # only models with classes on both sides are paired


def test_compare_refuses_unfinished_runs(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(tmp_path / "empty"), str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "only evaluated runs" in capsys.readouterr().err
