"""``lageo predict IMAGE...``: the most likely regions of each image, as JSON."""

from __future__ import annotations

from lageo_utils.cli import CommandError, print_json


def register(subparsers) -> None:
    parser = subparsers.add_parser("predict", help="zero-shot (or fine-tuned) region prediction for images")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model name (default: ViT-B-32)")
    parser.add_argument("--pretrained", default="openai",
                        help="open_clip tag, local checkpoint file, or 'none' for random weights (default: openai)")
    parser.add_argument("--checkpoint", default=None, help="fine-tuned checkpoint (best.pt); overrides --model")
    parser.add_argument("--regions", default=None, help="region file (default: the 15 LA County regions)")
    parser.add_argument("--top-k", type=int, default=5, help="regions to list per image (default: 5)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, mps (default: auto)")
    parser.set_defaults(func=_predict)


def _predict(args) -> int:
    from lageo_utils.images import ImageReadError
    from lageo_utils.model import WeightsUnavailableError
    from lageo_utils.predict import load_predictor
    from lageo_utils.regions import RegionsError, load_regions

    if args.top_k < 1:
        raise CommandError(f"--top-k must be at least 1, got {args.top_k}")
    try:
        regions = load_regions(args.regions)
        predictor = load_predictor(args.model, args.pretrained, regions, checkpoint=args.checkpoint, device=args.device)
    except (RegionsError, WeightsUnavailableError, ValueError, FileNotFoundError) as exc:
        raise CommandError(str(exc)) from None
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
