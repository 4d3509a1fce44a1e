"""Training on two gloo processes on the CPU (DistributedDataParallel): the same result as one process with the
same global batch, and a killed rank that resumes to the uninterrupted result.

Starting a Python that imports torch and open_clip costs ~10 s of CPU here, so only one run goes through the
real ``torchrun`` command (notebook 03's, ``steps.train_strategy`` with ``nproc`` 2); the killed run and its
resumption use torchrun's own launcher (``elastic_launch``, the agent ``torchrun`` runs) with workers forked
from this process, which has imported everything already.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from test_finetune import write_split
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from lageo_utils import steps
from lageo_utils.checkpoints import load_checkpoint
from lageo_utils.cli import build_parser
from lageo_utils.cli.train import config_from_args
from lageo_utils.embed import EmbeddingCache
from lageo_utils.params import defaults
from lageo_utils.runs import RunDir
from lageo_utils.training import TrainConfig, train

pytestmark = pytest.mark.slow
# 25 training rows (one unreadable) in global batches of 8: the last batch holds one image, so process 1's slice
# of it is empty; two batches per optimizer step: DDP's no_sync() between them.
CONFIG = TrainConfig(strategy="partial", model_name="lageo-tiny", pretrained=None, epochs=2, lr=1e-3, batch_size=8,
                     grad_accum_steps=2, num_workers=0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the two processes share the 2 cores of the test machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory, regions):
    """A run directory (splits, data.json) with 6 training and 2 validation images for each of 4 regions."""
    run = RunDir(tmp_path_factory.mktemp("ddp") / "run")
    run.mkdir()
    four = regions.iloc[:4].reset_index(drop=True)
    images = run.parent / "images"
    rng = np.random.default_rng(0)
    train_rows = write_split(images, "train", four, 6, rng)
    (images / "train" / "unreadable.png").write_bytes(b"not a png")
    unreadable = train_rows.iloc[[0]].assign(image_path="train/unreadable.png")
    pd.concat([train_rows, unreadable]).to_csv(run.split("train"), index=False)
    write_split(images, "val", four, 2, rng).to_csv(run.split("val"), index=False)
    run.data_file.write_text(json.dumps({"image_root": str(images)}))
    return SimpleNamespace(run=run, images=images, regions=four)


def train_here(data, out: Path, config: TrainConfig = CONFIG, **kwargs):
    return train(data.run.split("train"), data.run.split("val"), data.regions, data.images, out, config,
                 device="cpu", **kwargs)


def train_rank(data, out: Path, config: TrainConfig, kill_at: tuple[int, int] | None, resume: bool) -> None:
    """One forked torchrun worker; process 1 kills itself at ``kill_at`` (epoch, batch), mid-epoch."""
    torch.set_num_threads(1)

    def die(epoch: int, batch: int) -> None:
        if (epoch, batch) == kill_at and os.environ["RANK"] == "1":
            os.kill(os.getpid(), signal.SIGKILL)

    train_here(data, out, config, resume=resume, on_step=die)


def launch_two(data, out: Path, config: TrainConfig = CONFIG, kill_at: tuple[int, int] | None = None,
               resume: bool = False) -> None:
    launch = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=2, run_id=str(uuid.uuid4()), rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", max_restarts=0, start_method="fork", monitor_interval=0.1)
    elastic_launch(launch, train_rank)(data, out, config, kill_at, resume)


@pytest.fixture(scope="module")
def step_params(data, tmp_path_factory) -> dict:
    regions_file = data.run.parent / "regions.geojson"
    data.regions.to_file(regions_file, driver="GeoJSON")
    return {**defaults(), "model": "lageo-tiny", "pretrained": None, "device": "cpu", "regions": str(regions_file),
            "nproc": 2, **{name: getattr(CONFIG, name) for name in steps.TRAIN_PARAMS}}


@pytest.fixture(scope="module")
def two_processes(data, step_params, tmp_path_factory) -> Path:
    """Step 03's training with nproc 2: torchrun, the CLI, DDP on gloo."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LAGEO_OUTPUTS", str(tmp_path_factory.mktemp("outputs")))
        result = steps.train_strategy(data.run, step_params, CONFIG, data.regions)
    assert result.out_dir == data.run.strategy_checkpoints("partial")
    return result.out_dir


def assert_same_training(a: Path, b: Path) -> None:
    """Same history and weights up to float rounding: averaging gradients over processes changes the order of
    additions, and Adam's normalisation lets differences of 1e-7 grow to ~1e-5 in a few steps."""
    history_a, history_b = (pd.read_csv(p / "history.csv").drop(columns="seconds") for p in (a, b))
    pd.testing.assert_frame_equal(history_a, history_b, rtol=1e-3)
    state_a, state_b = (load_checkpoint(p / "best.pt") for p in (a, b))
    assert state_a["epoch"] == state_b["epoch"] and state_a["model"].keys() == state_b["model"].keys()
    summary_a, summary_b = (json.loads((p / "train_summary.json").read_text()) for p in (a, b))
    assert summary_a["skipped_images"] == summary_b["skipped_images"] == [
        {"image_path": "train/unreadable.png", "reason": "not an image (unrecognised format)"}]
    assert summary_a["best_val_acc"] == summary_b["best_val_acc"]
    for name, tensor in state_a["model"].items():
        torch.testing.assert_close(tensor, state_b["model"][name], rtol=1e-3, atol=1e-4)


def test_two_processes_train_like_one_with_the_same_global_batch(data, two_processes, tmp_path):
    one = train_here(data, tmp_path / "one")
    assert one.summary["n_train"] == 24 and one.summary["epochs_run"] == 2
    assert_same_training(tmp_path / "one", two_processes)


def test_a_killed_rank_resumes_to_the_uninterrupted_result(data, two_processes, tmp_path):
    with pytest.raises(ChildFailedError):
        launch_two(data, tmp_path, kill_at=(2, 1))
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1  # killed in epoch 2, after epoch 1's checkpoint
    launch_two(data, tmp_path, resume=True)
    assert_same_training(tmp_path, two_processes)
    assert json.loads((tmp_path / "train_summary.json").read_text())["resumed_from_epoch"] == 1


def test_two_processes_embed_their_shares_into_one_cache_and_train_the_head_like_one(data, tmp_path):
    config = TrainConfig(strategy="linear_probe", model_name="lageo-tiny", pretrained=None, epochs=2, lr=0.5,
                         batch_size=8, embed_batch_size=4, num_workers=0)
    launch_two(data, tmp_path / "two", config)
    (cache,) = (tmp_path / "two" / "embedding_cache").iterdir()
    assert len(pd.read_parquet(cache / "index.parquet")) == 24 + 8  # every readable image, from both processes
    train_here(data, tmp_path / "one", config)
    assert_same_training(tmp_path / "one", tmp_path / "two")


def test_notebook_03s_torchrun_command_carries_the_whole_config(data, step_params):
    config = TrainConfig(strategy="lora", model_name="lageo-tiny", pretrained=None, epochs=3, lr=2e-4,
                         weight_decay=0.05, batch_size=12, grad_accum_steps=3, warmup_fraction=0.2,
                         max_grad_norm=None, unfreeze_blocks=1, augment=True, patience=2, seed=7, num_workers=1,
                         lora_rank=4, lora_alpha=8.0, lora_dropout=0.1, train_regions=["hollywood", "downtown_la"],
                         embed_batch_size=16, engine="onnx")
    command = steps.torchrun_train_command(data.run, {**step_params, "nproc": 3}, config, resume=True)
    assert command[:7] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3",
                           "-m"]
    args = build_parser().parse_args(command[command.index("lageo_utils.cli") + 1:])
    assert config_from_args(args) == config
    assert (Path(args.splits), Path(args.out), args.resume) == (data.run, data.run.strategy_checkpoints("lora"), True)
    assert Path(args.image_root) == data.images and args.device == "cpu"


def add_entries(directory: Path, process: int) -> None:
    cache = EmbeddingCache(directory, {"test": 1})
    for i in range(20):
        cache.add([f"{process}-{i}"], np.full((1, 4), process, dtype=np.float32))


def test_processes_filling_one_embedding_cache_keep_every_entry(tmp_path):
    """torchrun's ranks embed their shares into the one cache at once: no index entry may be lost."""
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=add_entries, args=(tmp_path, k)) for k in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert [w.exitcode for w in workers] == [0, 0, 0]
    found = EmbeddingCache(tmp_path, {"test": 1}).lookup({f"{k}-{i}" for k in range(3) for i in range(20)})
    assert len(found) == 60 and all(found[f"2-{i}"][0] == 2 for i in range(20))
