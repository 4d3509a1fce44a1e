"""Benchmarks run and report consistent figures (never timed here); head-only batches match a DataLoader's."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lageo_utils.bench import STAGES, benchmark_stages, benchmark_train
from lageo_utils.model import TINY_MODEL
from lageo_utils.training.data import TensorBatches


def test_tensor_batches_are_what_a_data_loader_yields():
    dataset = TensorDataset(torch.randn(10, 4), torch.arange(10))
    batches = [[3, 1, 4], [], [5, 9, 2, 6], [0]]  # an empty slice: a process's share of a short last batch
    sliced = list(TensorBatches(dataset, batches))
    assert len(TensorBatches(dataset, batches)) == len(batches)
    assert sliced[1][0] is None and sliced[1][1].numel() == 0
    expected = DataLoader(dataset, batch_sampler=[rows for rows in batches if rows])  # its collate needs items
    for (inputs, indices), (want_inputs, want_indices) in zip([b for b in sliced if b[0] is not None], expected,
                                                              strict=True):
        assert torch.equal(inputs, want_inputs) and torch.equal(indices, want_indices)


def test_linear_probe_benchmark_repeats_the_same_run():
    figures = benchmark_train(TINY_MODEL, None, "linear_probe", batch_size=8, device="cpu", embeddings=48, epochs=2,
                              rounds=2)  # raises if the two runs from one seed trained different heads
    assert figures["images"] == 48 and figures["epochs_timed"] == 2 and len(figures["seconds_rounds"]) == 2
    assert figures["seconds"] == pytest.approx(sorted(figures["seconds_rounds"])[0] / 2
                                               + sorted(figures["seconds_rounds"])[1] / 2, abs=2e-3)
    # train_img_s comes from the unrounded median; "seconds" is rounded to the millisecond
    assert figures["train_img_s"] == pytest.approx(48 * 2 / figures["seconds"], rel=0.01 + 5e-4 / figures["seconds"])
    assert figures["cpu_seconds"] > 0


def test_benchmark_train_refuses_bad_counts():
    with pytest.raises(ValueError, match="epochs must be at least 1"):
        benchmark_train(TINY_MODEL, None, "linear_probe", epochs=0)


def test_stage_benchmark_times_every_stage_per_image():
    figures = benchmark_stages(sizes=(180,), image_size=32, epochs=1, n_boot=10, geo_methods=("centroid",))
    (result,) = figures["results"]
    assert result["images"] == 180 == sum(result["splits"].values())  # 3 capture points x 4 headings x 15 regions
    assert tuple(result["stages"]) == STAGES
    for entry in result["stages"].values():
        assert entry["seconds"] > 0 and entry["peak_extra_mb"] >= 0
        assert entry["ms_per_image"] == pytest.approx(1000 * entry["seconds"] / 180, abs=1e-3)
