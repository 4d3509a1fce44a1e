"""Throughput benchmarks (``lageo bench``): JSON figures, never asserted in tests.

Timings drift between machines and with load, so each benchmark measures the sides it compares
in the same process, and reports the machine's load beside the figures.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import platform
import resource
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from lageo_utils.checkpoints import seed_everything
from lageo_utils.demo import build_demo
from lageo_utils.embed import embed_paths
from lageo_utils.engines import ENGINES, check_engine, image_encoder
from lageo_utils.geolocate import NeighbourIndex
from lageo_utils.images import default_num_workers, input_size, open_rgb
from lageo_utils.model import TINY_MODEL, autocast, autocast_dtype, load_clip, resolve_device
from lageo_utils.predict import RegionClassifier
from lageo_utils.prompts import encode_region_texts
from lageo_utils.regions import load_regions
from lageo_utils.training.config import EMBEDDING_STRATEGIES, STRATEGIES, TrainConfig
from lageo_utils.training.data import TrainData
from lageo_utils.training.encoder import image_data, trainable_encoder
from lageo_utils.training.loop import deterministic, fit, new_run, train_epoch


def benchmark_embed(
    model_name: str = "ViT-B-32",
    pretrained: str | None = None,
    images: int = 256,
    batch_size: int = 64,
    num_workers: int | None = None,
    device: str = "auto",
    rounds: int = 1,
) -> dict:
    """Images/s of the bare model, of files through loader and model, and of a cached re-run.

    Writes ``images`` synthetic 640 x 640 JPEGs (street-view-like file sizes) to a temporary
    folder; the raw figure is the forward pass alone on already-preprocessed tensors (one batch
    of them, reused until ``images`` were processed), normalised and copied back like the pipeline's.
    Forward passes run at the precision in effect (``lageo_utils.model.precision``; reported).
    ``rounds`` pairs of (raw, pipeline into a fresh cache) are timed in turn; the figures are their
    medians, ``pipeline_vs_raw`` the median of each pair's ratio.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    target = resolve_device(device)
    model, preprocess, _ = load_clip(model_name, pretrained, device=target)
    _reset_peak_gpu_memory(target)
    workers = default_num_workers(num_workers)
    raw_times, pipeline_times = [], []
    with tempfile.TemporaryDirectory(prefix="lageo-bench-") as tmp:
        paths = write_test_jpegs(Path(tmp) / "images", images)
        batch = torch.stack([preprocess(open_rgb(p)) for p in paths[:batch_size]]).to(target)
        # The raw figure is timed in two halves (whole batches, as the pipeline runs them), before and
        # after the pipeline, so that a change in the load of a shared machine biases neither figure.
        raw_first = min(images, math.ceil(images / batch_size) // 2 * batch_size)
        for i in range(rounds):
            run = dict(cache_dir=Path(tmp) / f"cache{i}", batch_size=batch_size, num_workers=workers,
                       model_name=model_name)
            raw_s = _time_raw_forward(model, batch, raw_first, target)
            start = time.perf_counter()
            first = embed_paths(model, preprocess, paths, **run)
            pipeline_times.append(time.perf_counter() - start)
            raw_times.append(raw_s + _time_raw_forward(model, batch, images - raw_first, target))
        start = time.perf_counter()
        second = embed_paths(model, preprocess, paths, **run)
        cached_s = time.perf_counter() - start
    if not np.array_equal(first.embeddings, second.embeddings) or len(first.failures):
        raise RuntimeError("benchmark check failed: cached embeddings differ from computed ones, or images failed")
    raw_s, pipeline_s = float(np.median(raw_times)), float(np.median(pipeline_times))
    ratios = [r / p for r, p in zip(raw_times, pipeline_times)]
    return {
        "model": model_name,
        "device": str(target),
        "precision": _precision_name(target),
        "images": images,
        "rounds": rounds,
        "raw_model_img_s": round(images / raw_s, 2),
        "pipeline_img_s": round(images / pipeline_s, 2),
        "pipeline_vs_raw": round(float(np.median(ratios)), 3),
        "pipeline_vs_raw_rounds": [round(r, 3) for r in ratios],
        "cached_img_s": round(images / cached_s, 1),
        "cache_speedup": round(pipeline_s / cached_s, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "worker_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "peak_gpu_mb": _peak_gpu_mb(target),
        "batch_size": batch_size,
        "num_workers": workers,
        "decoded_at_px": input_size(preprocess),  # JPEGs decoded at reduced scale down to this size (open_rgb)
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 2),  # this run included: above ~2-3 means other work shared the 2 cores
    }


def write_test_jpegs(folder: Path, count: int, size: int = 640, seed: int = 0) -> list[str]:
    """Synthetic JPEGs: smooth random colour fields plus grain, about the size of Street View images."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        grain = rng.normal(0.0, 6.0, (size, size, 3))
        pixels = np.clip(np.asarray(coarse, dtype=np.float64) + grain, 0, 255).astype(np.uint8)
        path = folder / f"bench_{i:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=85)
        paths.append(str(path))
    return paths


def _time_raw_forward(model, batch: torch.Tensor, images: int, device: torch.device) -> float:
    """Seconds for the model alone to embed ``images`` preprocessed images, in batches like ``batch``."""
    model.eval()
    with torch.inference_mode(), autocast(device):
        model.encode_image(batch[:2])  # warm-up: first-call allocations are not throughput
        _synchronize(device)
        start = time.perf_counter()
        done = 0
        while done < images:
            chunk = batch[: min(len(batch), images - done)]
            F.normalize(model.encode_image(chunk).float(), dim=-1).cpu()
            done += len(chunk)
        _synchronize(device)
    return time.perf_counter() - start


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _precision_name(device: torch.device) -> str:
    """What forward passes run at on ``device``: float32, or the autocast dtype."""
    dtype = autocast_dtype(device)
    return "float32" if dtype is None else f"autocast-{str(dtype).removeprefix('torch.')}"


def _reset_peak_gpu_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gpu_mb(device: torch.device) -> float | None:
    """Peak memory torch allocated on the GPU since the last reset (None off CUDA)."""
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def benchmark_train(
    model_name: str = "ViT-B-32",
    pretrained: str | None = None,
    strategy: str = "partial",
    images: int = 64,
    batch_size: int = 16,
    device: str = "auto",
    embeddings: int | None = None,
    epochs: int | None = None,
    rounds: int = 1,
) -> dict:
    """Training images/s and peak memory of one strategy, through the real training loop.

    Encoder strategies: ``images`` synthetic 640 x 640 JPEGs through the loader, augmentation off;
    one warm-up epoch, then ``rounds`` timed epochs (training only). ``linear_probe``, ``text_scale``:
    ``epochs`` (default 8) epochs over ``embeddings`` (default ``images``) cached embeddings
    (synthetic unit vectors with a class structure; the head's cost does not depend on their
    values), timed end to end: every epoch's validation on a sixth as many embeddings and both
    checkpoints included; ``rounds`` fresh runs from the same seed, which must end with the same
    head (checked). ``seconds`` is the median over the rounds.
    """
    if strategy not in STRATEGIES or strategy == "zeroshot":
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES[1:])} (zeroshot trains nothing), "
                         f"not {strategy!r}")
    on_embeddings = strategy in EMBEDDING_STRATEGIES
    count = embeddings if embeddings is not None and on_embeddings else images
    for name, value in (("images", images), ("embeddings", count), ("epochs", epochs), ("rounds", rounds)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    target = resolve_device(device)
    config = TrainConfig(strategy=strategy, model_name=model_name, pretrained=pretrained, batch_size=batch_size,
                         epochs=(epochs or 8) if on_embeddings else 1 + rounds)
    seed_everything(config.seed)
    model, preprocess, tokenizer = load_clip(model_name, pretrained, device=target)
    regions = load_regions()
    region_ids = [str(r) for r in regions["id"]]
    class_embeddings = encode_region_texts(model, tokenizer, regions, device=target)
    logit_scale = float(model.logit_scale.exp().item())
    _reset_peak_gpu_memory(target)
    seconds, cpu_seconds, heads = [], [], []
    with tempfile.TemporaryDirectory(prefix="lageo-bench-train-") as tmp:
        if on_embeddings:
            train_data = _synthetic_embeddings(class_embeddings.cpu(), count, seed=0)
            val_data = _synthetic_embeddings(class_embeddings.cpu(), max(1, count // 6), seed=1)
            visual = model.visual
        else:
            paths = write_test_jpegs(Path(tmp) / "images", count)
            frame = pd.DataFrame({"image_path": paths, "region_id": [region_ids[i % len(region_ids)]
                                                                      for i in range(count)]})
            train_data = image_data(frame, region_ids, preprocess, None)
            val_data = train_data
            visual = trainable_encoder(model.visual, config)

        def start_run(folder: str):
            classifier = RegionClassifier(visual, class_embeddings, logit_scale, head=config.head)
            run = new_run(config, classifier, region_ids, train_data, val_data, target, Path(tmp) / folder, "bench",
                          {})
            run.out_dir.mkdir()
            run.self_contained = False  # checkpoints as with pretrained weights: the trained part only
            return run

        with deterministic():
            if on_embeddings:
                for i in range(rounds):  # fresh runs from the same seed: same work, same result
                    seed_everything(config.seed)
                    run = start_run(f"round{i}")
                    start, cpu_start = time.perf_counter(), time.process_time()
                    fit(run, None)
                    seconds.append(time.perf_counter() - start)
                    cpu_seconds.append(time.process_time() - cpu_start)
                    heads.append([p.detach().cpu().clone() for p in run.classifier.head_parameters()])
                trained = count * config.epochs
            else:
                run = start_run("run")
                train_epoch(run, 1, None)  # warm-up: allocations, thread pools, loader start
                for epoch in range(2, 2 + rounds):
                    _synchronize(target)
                    start, cpu_start = time.perf_counter(), time.process_time()
                    train_epoch(run, epoch, None)
                    _synchronize(target)
                    seconds.append(time.perf_counter() - start)
                    cpu_seconds.append(time.process_time() - cpu_start)
                trained = count
    if any(not all(torch.equal(a, b) for a, b in zip(heads[0], head)) for head in heads[1:]):
        raise RuntimeError("benchmark check failed: runs from the same seed trained different heads")
    median_s = float(np.median(seconds))
    trainable = sum(p.numel() for group in run.optimizer.param_groups for p in group["params"])
    return {
        "model": model_name,
        "device": str(target),
        "precision": _precision_name(target),
        "strategy": strategy,
        "images": count,
        "epochs_timed": config.epochs if on_embeddings else 1,
        "batch_size": batch_size,
        "rounds": rounds,
        "seconds": round(median_s, 3),
        "seconds_rounds": [round(s, 3) for s in seconds],
        # this process's CPU time (all its threads): on shared cores, the work done whatever the wait for a core
        "cpu_seconds": round(float(np.median(cpu_seconds)), 3),
        "train_img_s": round(trained / median_s, 1),
        "trainable_params": trainable,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_gpu_mb": _peak_gpu_mb(target),
        "num_workers": default_num_workers(config.num_workers) if train_data.images else 0,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }


def _synthetic_embeddings(class_embeddings: torch.Tensor, count: int, seed: int) -> TrainData:
    """Unit vectors scattered around the class embeddings: stand-ins for cached image embeddings."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(len(class_embeddings), (count,), generator=generator)
    noise = torch.randn(count, class_embeddings.shape[1], generator=generator) / class_embeddings.shape[1] ** 0.5
    vectors = F.normalize(class_embeddings[labels] + noise, dim=-1)
    return TrainData(TensorDataset(vectors, torch.arange(count)), labels, [f"embedding_{i}" for i in range(count)], False)


def benchmark_gallery(sizes: Sequence[int] = (10_000, 100_000, 1_000_000), dim: int = 512, queries: int = 1000,
                      k: int = 10, seed: int = 0, nprobe: int = 32, repeats: int = 3) -> dict:
    """Gallery search throughput: exact numpy, exact FAISS (IndexFlatIP) and approximate FAISS (IVF-Flat).

    Gallery and queries are random unit vectors (seeded), the hardest case for an approximate
    index: real embeddings cluster, which raises IVF recall. Per size: build seconds, queries per
    second (the median of ``repeats`` rounds in which the backends take turns, so a change in the
    machine's load hits them alike), memory (the float32 gallery; each FAISS index's vectors, ids
    and centroids, from its layout; the process's peak resident memory so far, all indexes of the
    size held at once) and recall@k of each FAISS index against exact search.
    """
    import faiss

    backends = ("exact", "faiss", "faiss-ivf")
    rng = np.random.default_rng(seed)
    query_vectors = _unit(rng.standard_normal((queries, dim), dtype=np.float32))
    results = []
    for size in sizes:
        gallery = _unit(rng.standard_normal((size, dim), dtype=np.float32))
        row: dict = {"gallery_size": int(size), "gallery_mb": gallery.nbytes / 2**20}
        indexes, ids, seconds = {}, {}, {b: [] for b in backends}
        for backend in backends:
            start = time.perf_counter()
            indexes[backend] = NeighbourIndex(gallery, backend, nprobe=nprobe, seed=seed)
            row[backend.replace("-", "_")] = {"build_s": time.perf_counter() - start}
        for _ in range(repeats):  # A B C, A B C, ...
            for backend in backends:
                start = time.perf_counter()
                _, ids[backend] = indexes[backend].search(query_vectors, k)
                seconds[backend].append(time.perf_counter() - start)
        for backend in backends:
            entry = row[backend.replace("-", "_")]
            median_s = float(np.median(seconds[backend]))
            entry.update(search_s=median_s, queries_per_s=queries / max(median_s, 1e-9))
            if backend != "exact":
                nlist = indexes[backend].settings.get("nlist", 0)  # IVF-Flat also stores an 8-byte id per vector
                index_bytes = gallery.nbytes + (size * 8 + nlist * dim * 4 if nlist else 0)
                entry.update(index_mb=index_bytes / 2**20, recall_at_k=_recall(ids[backend], ids["exact"]),
                             **indexes[backend].settings)
        row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # process, so far
        results.append(row)
        del gallery, indexes
    return {"dim": dim, "k": k, "queries": queries, "seed": seed, "repeats": repeats,
            "faiss_threads": faiss.omp_get_max_threads(), "cpu_count": os.cpu_count(),
            "load_avg_1min": round(os.getloadavg()[0], 2), "results": results}


def _unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each query's true top-k found by the index."""
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found.tolist(), truth.tolist())]))



BENCH_ENGINES = (*ENGINES, "compile")  # compile: torch.compile, measured here but not offered (see engines)


def benchmark_engine(model_name: str = "ViT-B-32", pretrained: str | None = None, batch_size: int = 32,
                     rounds: int = 7, engines: Sequence[str] = ENGINES, check_points: int = 1, seed: int = 0,
                     cache_dir: str | os.PathLike | None = None) -> dict:
    """Images/s of each inference engine against eager, and whether their outputs are eager's.

    Speed: one batch of ``batch_size`` preprocessed images (demo scenes), embedded by each engine in
    turn (eager, then the others, ``rounds`` times, after one warm-up call each), so that a change in
    the machine's load hits the engines alike; per round, eager's seconds over the engine's, and the
    median and range of those ratios; the same for the process's CPU seconds (all its threads), which move less
    than wall time when other work shares the cores. Equality: ``check_points`` capture points per region of the
    synthetic demo (four headings each) embedded by every engine: the largest ``1 - cosine`` to
    eager's embedding, and the share of images whose top-1 zero-shot region is eager's. ``prepare_s``
    is each engine's one-off cost (export or compilation; loading when ``cache_dir`` already holds it).
    """
    unknown = [e for e in engines if e not in BENCH_ENGINES]
    if unknown or not engines:
        raise ValueError(f"engines must name some of {', '.join(BENCH_ENGINES)}, got {list(engines)!r}")
    if rounds < 1 or batch_size < 1 or check_points < 1:
        raise ValueError(f"rounds, batch_size and check_points must be at least 1, got {rounds}, {batch_size}, "
                         f"{check_points}")
    for engine in engines:
        if engine != "compile":
            check_engine(engine, "cpu")  # a missing package fails here, before the model loads
    engines = ["eager", *(e for e in engines if e != "eager")]
    load_before = os.getloadavg()[0]
    seed_everything(seed)
    model, preprocess, tokenizer = load_clip(model_name, pretrained, device="cpu")
    regions = load_regions()
    class_embeddings = encode_region_texts(model, tokenizer, regions, device="cpu")
    with tempfile.TemporaryDirectory(prefix="lageo-bench-engine-") as tmp:
        manifest = build_demo(Path(tmp) / "demo", points_per_region=check_points, seed=seed)
        images = torch.stack([preprocess(open_rgb(Path(tmp) / "demo" / p)) for p in manifest["image_path"]])
        batch = images[torch.arange(batch_size) % len(images)]
        encoders, prepare_s = {}, {}
        for engine in engines:
            start = time.perf_counter()
            encoders[engine] = _bench_encoder(model, engine, cache_dir or Path(tmp) / "cache", model_name)
            _embed(encoders[engine], batch[:2])  # exports, compiles or loads
            prepare_s[engine] = time.perf_counter() - start
        embeddings = {engine: torch.cat([_embed(encoders[engine], chunk) for chunk in images.split(batch_size)])
                      for engine in engines}
        seconds = {engine: [] for engine in engines}
        cpu_seconds = {engine: [] for engine in engines}
        for engine in engines:
            _embed(encoders[engine], batch)  # warm-up at the timed batch size
        for _ in range(rounds):
            for engine in engines:
                start, cpu_start = time.perf_counter(), time.process_time()
                _embed(encoders[engine], batch)
                seconds[engine].append(time.perf_counter() - start)
                cpu_seconds[engine].append(time.process_time() - cpu_start)
    top1 = {engine: (vectors @ class_embeddings.T).argmax(dim=1) for engine, vectors in embeddings.items()}
    results = {}
    for engine in engines:
        results[engine] = {"img_s": round(batch_size / float(np.median(seconds[engine])), 2),
                           "cpu_s_per_batch": round(float(np.median(cpu_seconds[engine])), 3),
                           "prepare_s": round(prepare_s[engine], 1)}
        if engine == "eager":
            continue
        ratios = np.array(seconds["eager"]) / np.array(seconds[engine])
        cpu_ratios = np.array(cpu_seconds["eager"]) / np.array(cpu_seconds[engine])
        cosine = F.cosine_similarity(embeddings[engine].double(), embeddings["eager"].double(), dim=1)
        results[engine].update({
            "ratio_vs_eager": {"median": round(float(np.median(ratios)), 3), "min": round(float(ratios.min()), 3),
                               "max": round(float(ratios.max()), 3)},
            "cpu_ratio_vs_eager": {"median": round(float(np.median(cpu_ratios)), 3),
                                   "min": round(float(cpu_ratios.min()), 3), "max": round(float(cpu_ratios.max()), 3)},
            "max_cosine_deviation": float(1 - cosine.min()),
            "top1_agreement": float((top1[engine] == top1["eager"]).double().mean()),
        })
    return {
        "model": model_name,
        "pretrained": pretrained,
        "batch_size": batch_size,
        "rounds": rounds,
        "check_images": len(images),
        "engines": results,
        "machine": _machine(),
        "load_avg_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
    }


def _bench_encoder(model, engine: str, cache_dir: Path, model_name: str):
    if engine == "compile":
        return torch.compile(model.encode_image)
    return image_encoder(model, engine, cache_dir=cache_dir, model_name=model_name)


def _embed(encoder, images: torch.Tensor) -> torch.Tensor:
    """L2-normalised embeddings, as the embedding pipeline computes them."""
    with torch.inference_mode():
        return F.normalize(encoder(images).float(), dim=-1)


def _machine() -> dict:
    """The CPU, its cores and threads, and the software versions the engines' figures depend on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    versions = {}
    for package in ("torch", "onnxruntime", "onnxscript"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "versions": versions}


STAGES = ("generate", "manifest_split", "embed", "train_linear_probe", "predict_geolocate", "metrics")


def benchmark_stages(sizes: Sequence[int] = (200, 800, 3200), model_name: str = TINY_MODEL,
                     pretrained: str | None = None, image_size: int = 224, epochs: int = 8, n_boot: int = 200,
                     geo_methods: Sequence[str] | None = None, device: str = "cpu", seed: int = 0) -> dict:
    """Seconds and memory of each pipeline stage at several data sizes, per image.

    For each size, a demo data set of about that many images (four headings per capture point,
    ``image_size`` px JPEGs) goes through the stages the notebooks run: ``generate`` (drawing the
    demo images; a real project collects them instead), ``manifest_split`` (reading and checking
    the manifest, the location split), ``embed`` (every split through the embedding pipeline into
    a fresh cache), ``train_linear_probe`` (``training.train`` on the cached embeddings, ``epochs``
    epochs, checkpoints and calibration included), ``predict_geolocate`` (zero-shot and fine-tuned
    region predictions of the test split; every coordinate method tuned on validation against the
    training gallery and answering the test split; ``geo_methods``, default all) and ``metrics``
    (``metrics_json`` with ``n_boot`` bootstrap resamples).

    Each size runs in a process of its own, so that memory freed by a smaller size and
    kept by the allocator cannot hide a larger size's needs. Memory: the peak of that process's
    resident memory during the stage above its level at the stage's start, sampled every 5 ms
    (embedding workers are other processes and not included). Random weights: the figures are
    timings, not accuracies.
    """
    from lageo_utils.geolocate import METHODS

    methods = tuple(geo_methods or METHODS)
    if not sizes or min(sizes) < 1:
        raise ValueError(f"sizes must be positive image counts, got {list(sizes)}")
    target = resolve_device(device)
    settings = dict(model_name=model_name, pretrained=pretrained, image_size=image_size, epochs=epochs, n_boot=n_boot,
                    methods=methods, device=target, seed=seed)
    results = []
    with tempfile.TemporaryDirectory(prefix="lageo-bench-stages-") as tmp:
        for size in sizes:
            # spawn, not fork: a fork copies the locks other threads hold (torch's, logging's) and can hang
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                results.append(pool.submit(_stages_at, size, Path(tmp) / f"n{size}", **settings).result())
    return {"model": model_name, "device": str(target), "image_size": image_size, "epochs": epochs,
            "n_boot": n_boot, "geo_methods": list(methods), "num_workers": default_num_workers(None),
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "load_avg_1min": round(os.getloadavg()[0], 2), "results": results}


def _stages_at(size: int, folder: Path, *, model_name: str, pretrained: str | None, image_size: int, epochs: int,
               n_boot: int, methods: tuple[str, ...], device: torch.device, seed: int) -> dict:
    """``benchmark_stages`` at one size, in this process."""
    from lageo_utils.data import read_manifest
    from lageo_utils.demo import HEADINGS, build_demo
    from lageo_utils.embed import embed_manifest
    from lageo_utils.geolocate import Gallery, answer_all, fit_locator
    from lageo_utils.metrics import metrics_json
    from lageo_utils.predict import GeoPredictor, load_finetuned, predictions_from_embeddings
    from lageo_utils.runs import SPLITS
    from lageo_utils.splits import split
    from lageo_utils.training.loop import train

    # A spawned process inherits "spawn" as its start method: loader workers would re-import everything. This one
    # is fresh (no threads yet), so forked workers are safe, as in a normal run.
    multiprocessing.set_start_method("fork", force=True)
    regions = load_regions()
    clip = load_clip(model_name, pretrained, device=device)
    model, preprocess, tokenizer = clip
    data_dir, cache = folder / "data", folder / "cache"
    stages: dict[str, dict] = {}
    per_region = max(1, round(size / (len(HEADINGS) * len(regions))))
    with _stage(stages, "generate"):
        build_demo(data_dir, points_per_region=per_region, seed=seed, image_size=image_size, regions=regions)
    with _stage(stages, "manifest_split"):
        manifest, _ = read_manifest(data_dir / "manifest.csv", regions)
        parts = split(manifest, "location", seed=seed)
    with _stage(stages, "embed"):
        embedded = {name: embed_manifest(model, preprocess, parts[name], data_dir, cache_dir=cache, device=device,
                                         model_name=model_name) for name in SPLITS}
    with _stage(stages, "train_linear_probe"):
        config = TrainConfig(strategy="linear_probe", model_name=model_name, pretrained=pretrained, epochs=epochs,
                             seed=seed)
        trained = train(parts["train"], parts["val"], regions, data_dir, folder / "train", config, device=device,
                        cache_dir=cache, clip=clip)
    with _stage(stages, "predict_geolocate"):
        zeroshot = GeoPredictor(model, preprocess, tokenizer, regions, device=device, model_name=model_name)
        finetuned = load_finetuned(trained.best_checkpoint, regions, device, clip=clip)
        predictions = {name: predictions_from_embeddings(predictor, parts["test"], embedded["test"])
                       for name, predictor in (("zeroshot", zeroshot), ("finetuned", finetuned))}
        rows = {name: parts[name].iloc[embedded[name].rows].reset_index(drop=True) for name in SPLITS}
        gallery = Gallery.from_rows(rows["train"], embedded["train"].embeddings, finetuned.region_ids)
        val_embeddings = embedded["val"].embeddings
        locator = fit_locator(finetuned.centroids, gallery, val_embeddings, finetuned.probabilities(val_embeddings),
                              rows["val"]["latitude"].to_numpy(float), rows["val"]["longitude"].to_numpy(float),
                              methods=methods, seed=seed)
        test_embeddings = embedded["test"].embeddings
        answer_all(locator, rows["test"], test_embeddings, finetuned.probabilities(test_embeddings),
                   finetuned.region_ids, methods)
    with _stage(stages, "metrics"):
        metrics_json(predictions["zeroshot"], predictions["finetuned"], regions, {},
                     {name: len(parts[name]) for name in SPLITS}, n_boot=n_boot, seed=seed)
    images = len(manifest)
    for entry in stages.values():
        entry.update(ms_per_image=round(1000 * entry["seconds"] / images, 3),
                     peak_kb_per_image=round(1024 * entry["peak_extra_mb"] / images, 1))
    return {"images": images, "splits": {name: len(parts[name]) for name in SPLITS}, "stages": stages}


@contextlib.contextmanager
def _stage(stages: dict, name: str):
    """Time a stage and sample this process's resident memory (every 5 ms) while it runs."""
    page = os.sysconf("SC_PAGE_SIZE")

    def rss_mb() -> float:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * page / 2**20

    start_mb, peak = rss_mb(), [0.0]
    done = threading.Event()

    def sample() -> None:  # a sampler thread: the kernel keeps only a lifetime peak (ru_maxrss), not one per stage
        while not done.wait(0.005):
            peak[0] = max(peak[0], rss_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
        end_mb = rss_mb()
        stages[name] = {"seconds": round(seconds, 3), "peak_extra_mb": round(max(peak[0], end_mb) - start_mb, 1),
                        "rss_end_mb": round(end_mb, 1)}
