"""``lageo predict IMAGE...``: where each image was taken, as JSON.

Without ``--run``: the most likely regions and their centroids (the seed's ``top_pred_gps``,
``top_pred_prob``). With ``--run RUN_DIR``: coordinates from that run's model, gallery and tuned
settings (``--method``: centroid, expected, retrieval, region_retrieval, geocell).
"""

from __future__ import annotations

from lageo_utils.cli import CommandError, print_json

METHODS = ("centroid", "expected", "retrieval", "region_retrieval", "geocell")  # geolocate.METHODS (a test checks)
RUN_MODELS = ("zeroshot", "finetuned")  # runs.MODELS
ENGINES = ("eager", "onnx")  # engines.ENGINES (a test checks)


def register(subparsers) -> None:
    parser = subparsers.add_parser("predict", help="where images were taken: regions, or coordinates from a run")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--method", default="centroid", choices=METHODS,
                        help="how to answer (default: centroid, the top regions' centroids); every other method "
                             "needs --run")
    parser.add_argument("--run", default=None, metavar="RUN_DIR",
                        help="a finished run (or 'latest') whose model, gallery and tuned settings answer")
    parser.add_argument("--model", default=None,
                        help="without --run: the open_clip model name (default: ViT-B-32); with --run: the run's "
                             "zeroshot or finetuned model (default: finetuned)")
    parser.add_argument("--pretrained", default="openai",
                        help="open_clip tag, local checkpoint file, or 'none' for random weights (default: openai)")
    parser.add_argument("--checkpoint", default=None, help="fine-tuned checkpoint (best.pt); overrides --model")
    parser.add_argument("--regions", default=None, help="region file (default: the 15 LA County regions)")
    parser.add_argument("--top-k", type=int, default=5, help="regions to list per image (default: 5)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, mps (default: auto)")
    parser.add_argument("--engine", default="eager", choices=ENGINES,
                        help="what runs the image encoder: eager (PyTorch, default), or onnx (ONNX Runtime, CPU; the "
                             "engines extra; the exported model is kept in the embedding cache)")
    parser.set_defaults(func=_predict)


def _predict(args) -> int:
    from lageo_utils.images import ImageReadError
    from lageo_utils.model import WeightsUnavailableError
    from lageo_utils.predict import load_predictor
    from lageo_utils.regions import RegionsError, load_regions

    if args.top_k < 1:
        raise CommandError(f"--top-k must be at least 1, got {args.top_k}")
    _check_engine(args)
    if args.run is not None:
        return _predict_from_run(args)
    if args.method != "centroid":
        raise CommandError(f"--method {args.method} answers from a run's gallery and tuned settings: add --run RUN_DIR "
                           "(a run made by `lageo run`)")
    try:
        regions = load_regions(args.regions)
        predictor = load_predictor(args.model or "ViT-B-32", args.pretrained, regions, checkpoint=args.checkpoint,
                                   device=args.device)
    except (RegionsError, WeightsUnavailableError, ValueError, FileNotFoundError) as exc:
        raise CommandError(str(exc)) from None
    _use_engine(predictor, args.engine)
    results = []
    for image in args.images:
        try:
            top_idx, top_prob = predictor.predict_embeddings(predictor.embed_image(image), args.top_k)
        except ImageReadError as exc:
            results.append({"image": image, "error": exc.reason})
            continue
        results.append({
            "image": image,
            "top_regions": [predictor.region_ids[i] for i in top_idx[0]],
            "top_pred_gps": [[float(lat), float(lon)] for lat, lon in predictor.centroids[top_idx[0]]],
            "top_pred_prob": [float(p) for p in top_prob[0]],
        })
    print_json(results)
    return 0 if any("error" not in r for r in results) else 1


def _predict_from_run(args) -> int:
    """Coordinates from a run: its model (zero-shot or the best fine-tuned checkpoint) and its locator."""
    from lageo_utils.images import ImageReadError
    from lageo_utils.predict import GeoPredictor

    model = args.model or "finetuned"
    if model not in RUN_MODELS:
        raise CommandError(f"with --run, --model names the run's model: zeroshot or finetuned, not {model!r} (the "
                           "run's open_clip model comes from its params.yaml)")
    if args.checkpoint is not None or args.regions is not None:
        raise CommandError("with --run, the checkpoint and the regions are the run's own: drop --checkpoint/--regions")
    predictor, locator, root = _run_model(args.run, model, args.method, args.device)
    _use_engine(predictor, args.engine)
    results = []
    for image in args.images:
        try:
            embedding = predictor.embed_image(image).cpu().numpy()
        except ImageReadError as exc:
            results.append({"image": image, "error": exc.reason})
            continue
        # An image-only backbone's frozen (zeroshot) model has no region head: embedding methods only.
        probabilities = predictor.probabilities(embedding) if isinstance(predictor, GeoPredictor) else None
        answers = locator.answer(args.method, embedding, probabilities)
        result = {"image": image, "method": args.method, "model": model, "lat": float(answers.lat[0]),
                  "lon": float(answers.lon[0]), "confidence": float(answers.confidence[0])}
        if answers.region is not None:
            result["region"] = predictor.region_ids[int(answers.region[0])]
        if answers.neighbours is not None:
            g = locator.gallery
            result["neighbours"] = [
                {"path": str(root / str(g.paths[j])) if g.paths is not None else int(j), "lat": float(g.lat[j]),
                 "lon": float(g.lon[j]), "similarity": float(s)}
                for j, s in zip(answers.neighbours[0], answers.similarities[0]) if j >= 0]
        results.append(result)
    print_json(results)
    return 0 if any("error" not in r for r in results) else 1


def _check_engine(args) -> None:
    """Refuse an engine that cannot run here (missing packages, not the CPU) before any model is loaded."""
    from lageo_utils.engines import EngineUnavailableError, check_engine
    from lageo_utils.model import resolve_device

    try:
        check_engine(args.engine, resolve_device(args.device))
    except (EngineUnavailableError, ValueError) as exc:
        raise CommandError(str(exc)) from None


def _use_engine(predictor, engine: str) -> None:
    from lageo_utils.steps import embedding_cache_dir

    predictor.use_engine(engine, cache_dir=embedding_cache_dir())


def _run_model(run_dir: str, model: str, method: str, device: str):
    """The run's predictor for ``model``, its fitted locator and its image root (gallery paths are relative to it);
    ``CommandError`` says what the run lacks."""
    from lageo_utils.backbones import is_image_only
    from lageo_utils.checkpoints import CheckpointError
    from lageo_utils.geolocate import load_locator
    from lageo_utils.model import WeightsUnavailableError
    from lageo_utils.predict import GeoPredictor, ImageEncoder, load_finetuned
    from lageo_utils.regions import RegionsError
    from lageo_utils.runs import RunError, read_params, resolve_run_dir
    from lageo_utils.steps import finetuned_checkpoint, image_root, load_model, regions_of, zero_shot_temperature

    try:
        run = resolve_run_dir(run_dir)
        params = read_params(run)
    except RunError as exc:
        raise CommandError(str(exc)) from None
    if not (run.locator(model) / "locator.json").is_file():
        step = "02_zero_shot" if model == "zeroshot" else "03_finetune"
        raise CommandError(f"{run} has no fitted locator for the {model} model ({run.locator(model)} is missing): "
                           f"it was made before coordinate answers existed or its step {step} did not finish; "
                           "run `lageo run` again (or that notebook on the run)")
    try:
        locator = load_locator(run.locator(model))
        frozen = model == "zeroshot" and is_image_only(params["model"])  # an image encoder without a region head
        answerable = [*([] if frozen else ["centroid"]), *locator.settings()]
        if method not in answerable:
            why = (f"the {model} model of this image-only run ({params['model']}) has no region head, so it answers "
                   "from embeddings alone; --model finetuned answers every method" if frozen
                   else f"it was not fitted in {run} (its geo_methods: {params.get('geo_methods')})")
            raise CommandError(f"method {method!r}: {why}; choose one of {', '.join(answerable)}")
        regions = regions_of(params)
        params = {**params, "device": device}
        if frozen:
            backbone, preprocess, _ = load_model(params)
            predictor = ImageEncoder(backbone, preprocess, device=device, model_name=params["model"])
        elif model == "zeroshot":
            clip_model, preprocess, tokenizer = load_model(params)
            predictor = GeoPredictor(clip_model, preprocess, tokenizer, regions, device=device,
                                     model_name=params["model"], temperature=zero_shot_temperature(run))
        else:
            predictor = load_finetuned(finetuned_checkpoint(run, params), regions, device=device,
                                       clip=load_model(params))
    except (RegionsError, WeightsUnavailableError, CheckpointError, ValueError, FileNotFoundError) as exc:
        raise CommandError(f"{run}: {exc}") from None
    return predictor, locator, image_root(run)
