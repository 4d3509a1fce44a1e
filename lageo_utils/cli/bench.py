"""``lageo bench embed|engine|train|gallery|stages``: throughput benchmarks that print JSON figures."""

from __future__ import annotations

from lageo_utils.cli import CommandError, print_json

ENGINES = ("eager", "onnx", "compile")  # bench.BENCH_ENGINES (a test checks)


def register(subparsers) -> None:
    group = subparsers.add_parser("bench", help="throughput benchmarks").add_subparsers(dest="action", required=True)
    embed = group.add_parser("embed", help="image embedding: raw model vs. pipeline vs. cache")
    embed.add_argument("--model", default="ViT-B-32")
    embed.add_argument("--pretrained", default="none", help="random weights are fine for timing")
    embed.add_argument("--images", type=int, default=256)
    embed.add_argument("--batch-size", type=int, default=64)
    embed.add_argument("--num-workers", type=int, default=None)
    embed.add_argument("--device", default="auto")
    embed.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                       help="forward passes: auto (CUDA: bfloat16 autocast where supported; else float32), float32, "
                       "or bfloat16/float16 autocast")
    embed.add_argument("--rounds", type=int, default=1, help="(raw, pipeline) pairs timed in turn; medians reported")
    embed.set_defaults(func=_embed)

    engine = group.add_parser("engine", help="CPU inference engines against eager: img/s, ratio, equal outputs")
    engine.add_argument("--model", default="ViT-B-32")
    engine.add_argument("--pretrained", default="none", help="random weights are fine for timing")
    engine.add_argument("--batch-size", type=int, default=32)
    engine.add_argument("--rounds", type=int, default=7, help="rounds in which the engines take turns")
    engine.add_argument("--engines", nargs="+", choices=ENGINES, default=["eager", "onnx"],
                        help="engines to measure (eager always is: the reference); compile: torch.compile, "
                             "measured but not offered")
    engine.add_argument("--check-points", type=int, default=1,
                        help="demo capture points per region (4 images each) for the equal-output check")
    engine.add_argument("--cache-dir", default=None,
                        help="keep exported engines here (default: a temporary folder, so export time is measured)")
    engine.set_defaults(func=_engine)

    train = group.add_parser("train", help="training images/s and peak memory per strategy")
    train.add_argument("--model", default="ViT-B-32")
    train.add_argument("--pretrained", default="none")
    train.add_argument("--strategy", default="partial", help="a strategy, or all (a JSON list, one per strategy)")
    train.add_argument("--images", type=int, default=64)
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--device", default="auto")
    train.add_argument("--embeddings", type=int, default=None,
                       help="linear_probe, text_scale: cached embeddings to train on (default: --images)")
    train.add_argument("--epochs", type=int, default=None, help="linear_probe, text_scale: epochs timed (default 8)")
    train.add_argument("--rounds", type=int, default=1,
                       help="timed repetitions (fresh runs, or epochs for encoder strategies); seconds is the median")
    train.set_defaults(func=_train)

    gallery = group.add_parser("gallery", help="nearest-neighbour search: exact vs FAISS, queries/s, memory, recall")
    gallery.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    gallery.add_argument("--dim", type=int, default=512)
    gallery.add_argument("--queries", type=int, default=1000)
    gallery.add_argument("--repeats", type=int, default=3, help="rounds in which the backends take turns")
    gallery.set_defaults(func=_gallery)

    stages = group.add_parser("stages", help="seconds and memory per image of each pipeline stage at several sizes")
    stages.add_argument("--sizes", type=int, nargs="+", default=[200, 800, 3200], help="demo images (about)")
    stages.add_argument("--model", default="lageo-tiny")
    stages.add_argument("--pretrained", default="none")
    stages.add_argument("--image-size", type=int, default=224, help="demo image side, px")
    stages.add_argument("--epochs", type=int, default=8, help="linear probe epochs")
    stages.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples of the metrics stage")
    stages.add_argument("--device", default="cpu")
    stages.set_defaults(func=_stages)


def _embed(args) -> int:
    from lageo_utils.bench import benchmark_embed
    from lageo_utils.model import precision

    with precision(args.precision):
        print_json(benchmark_embed(model_name=args.model, pretrained=args.pretrained, images=args.images,
                                   batch_size=args.batch_size, num_workers=args.num_workers, device=args.device,
                                   rounds=args.rounds))
    return 0


def _engine(args) -> int:
    from lageo_utils.bench import benchmark_engine
    from lageo_utils.engines import EngineUnavailableError

    try:
        print_json(benchmark_engine(model_name=args.model, pretrained=args.pretrained, batch_size=args.batch_size,
                                    rounds=args.rounds, engines=args.engines, check_points=args.check_points,
                                    cache_dir=args.cache_dir))
    except (EngineUnavailableError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    return 0


def _train(args) -> int:
    from lageo_utils.bench import benchmark_train
    from lageo_utils.training.config import STRATEGIES

    strategies = [s for s in STRATEGIES if s != "zeroshot"] if args.strategy == "all" else [args.strategy]
    results = [benchmark_train(model_name=args.model, pretrained=args.pretrained, strategy=strategy,
                               images=args.images, batch_size=args.batch_size, device=args.device,
                               embeddings=args.embeddings, epochs=args.epochs, rounds=args.rounds)
               for strategy in strategies]
    print_json(results if args.strategy == "all" else results[0])
    return 0


def _gallery(args) -> int:
    from lageo_utils.bench import benchmark_gallery

    print_json(benchmark_gallery(sizes=args.sizes, dim=args.dim, queries=args.queries, repeats=args.repeats))
    return 0


def _stages(args) -> int:
    from lageo_utils.bench import benchmark_stages

    print_json(benchmark_stages(sizes=args.sizes, model_name=args.model, pretrained=args.pretrained,
                                image_size=args.image_size, epochs=args.epochs, n_boot=args.n_boot,
                                device=args.device))
    return 0
