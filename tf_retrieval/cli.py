"""`tfr`: the command line. Each command parses its arguments and calls one library function.

    tfr embed     --dataset cifar10 --out emb.npy         vectors of a collection (in process or through TF Serving)
    tfr index     --dataset cifar10 --name cifar10        build an index bundle under <workdir>/indexes/<name>
    tfr index     --name cifar10 --add FOLDER --delete ID  add / remove images of a bundle without rebuilding it
    tfr dedup     --index cifar10 --threshold 0.95        near-duplicate groups of an indexed collection
    tfr search    IMAGE|FOLDER... --index cifar10         top-k neighbours with class and score
    tfr evaluate  --protocol cifar10-2                    retrieval metrics of a protocol, kept in a records file
    tfr demo                                              CIFAR-10 with the baseline and a fine-tuned model, the page
    tfr export    --name baseline                         SavedModel for TF Serving under <workdir>/models
    tfr serve                                             gRPC (and REST) server speaking TF Serving's protocol
    tfr web       --index demo-baseline [--server H:P]    the search page over one or more index bundles
    tfr train     --protocol cifar10-2                    fine-tune a triplet-loss head (and top blocks)
    tfr tune      --protocol cifar10-2 --trials 20        search embedding size, margin, lr, mining (keras-tuner)
    tfr compare   RUN...                                  baseline vs fine-tuned report (Markdown, JSON, figures)

User errors (`tf_retrieval.errors.RetrievalError`) are reported as one line, `tfr: error: ...`, exit status 2; any
other exception is a bug and keeps its traceback. `--verbose` shows tracebacks of user errors too.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import sys
from typing import Sequence

from tf_retrieval.config import (BACKBONE_NAMES, POOLINGS, PREPROCESSINGS, TRAINED_MODEL_FIELDS, ModelConfig, Recipe,
                                  TrainConfig, load_recipe, recipe_names)
from tf_retrieval.errors import InvalidInputError, MissingDependencyError, RetrievalError
from tf_retrieval import flags

logger = logging.getLogger("tf_retrieval")


# -- shared arguments ---------------------------------------------------------------------------------------------------
def _add_model_args(parser: argparse.ArgumentParser) -> None:
    defaults = ModelConfig()
    group = parser.add_argument_group("model")
    group.add_argument("--model-config", help="a ModelConfig JSON file, e.g. a training run's model.json (the flags "
                                              "below override it)")
    group.add_argument("--model-name", help=f"model name (default {defaults.name})")
    group.add_argument("--backbone", help=f"backbone: {', '.join(BACKBONE_NAMES)} (default {defaults.backbone})")
    group.add_argument("--image-size", type=int, help=f"input size in px (default {defaults.image_size})")
    group.add_argument("--pooling", choices=POOLINGS, help=f"pooling (default {defaults.pooling})")
    group.add_argument("--scales", type=float, nargs="+", metavar="SCALE",
                       help="multi-scale descriptors: also run the backbone on the input scaled by these factors, e.g. "
                            "1 0.889 0.778 (default: 1, single scale)")
    group.add_argument("--flip", action=argparse.BooleanOptionalAction,
                       help="test-time flip: pool the features of the image and of its mirror (twice the backbone's "
                            "compute; any model, trained ones included; default: the config's, else off)")
    group.add_argument("--preprocessing", choices=PREPROCESSINGS,
                       help="the backbone's input normalisation (default: its own, what its weights were trained "
                            "on): tf (x / 127.5 - 1, EfficientNet-Lite's own), torch (ImageNet mean / std; the "
                            "earlier EfficientNet-Lite models, whose records name no preprocessing, ran on it), "
                            "caffe, none")
    group.add_argument("--weights", help="'imagenet' (default), 'none' for random weights, or a weights file")
    group.add_argument("--head", help="a trained head (.keras), or 'none' to drop the config's head (a fine-tuned "
                                      "trunk's own pooled features); omit for the config's (none: the frozen baseline)")
    group.add_argument("--hash-bits", type=int, help="the head is a hashing head with this many bits")


def _add_runtime_arg(parser: argparse.ArgumentParser) -> None:
    from tf_retrieval.features.litert import RUNTIMES

    parser.add_argument("--runtime", choices=RUNTIMES, default=RUNTIMES[0],
                        help="where models run in this process: litert (default; the model converted to LiteRT, "
                             "several times faster on CPUs), litert-fp16 (the same in float16 arithmetic: faster again "
                             "on CPUs that have it, vectors within float16 rounding) or tf (TensorFlow)")


def _model_config(args: argparse.Namespace) -> ModelConfig:
    config = ModelConfig.load(args.model_config) if args.model_config else ModelConfig()
    overrides = {"name": args.model_name, "backbone": args.backbone, "image_size": args.image_size,
                 "pooling": args.pooling, "scales": args.scales, "flip": args.flip, "hash_bits": args.hash_bits,
                 "preprocessing": args.preprocessing}
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    if args.weights is not None:
        config.weights = None if args.weights.lower() == "none" else args.weights
    if args.head is not None:
        config.head = None if args.head.lower() == "none" else args.head
        if config.head is None and args.hash_bits is None:
            config.hash_bits = None  # a hashing model's codes are its head's
    if args.model_config:
        from tf_retrieval.training.adapt import check_adapted_features

        check_adapted_features(args.model_config, config)
    return config


def _model_flags_given(args: argparse.Namespace) -> list[tuple[str, object]]:
    """(flag, value) of each model flag (`_add_model_args`), its value None where it was not given."""
    return [(f"--{name.replace('_', '-')}", getattr(args, name))
            for name in ("model_config", "model_name", "backbone", "image_size", "pooling", "scales", "flip",
                         "preprocessing", "weights",
                         "head", "hash_bits")]


def _add_data_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--dataset", required=required,
                        help="a tfds name (cifar10, oxford_flowers102) or a folder of images with one sub-folder per class")
    parser.add_argument("--data-dir", help="tfds data directory (default: $TFDS_DATA_DIR, else tfds' own default)")
    parser.add_argument("--split", action="append", help="only these splits of a tfds dataset, or of a folder whose "
                                                         "index.csv has an official_split column (repeatable)")
    parser.add_argument("--limit", type=int, help="only the first N images")


def _load_collection(args: argparse.Namespace):
    from tf_retrieval.data.images import load_collection

    collection = load_collection(args.dataset, data_dir=args.data_dir, splits=args.split, limit=args.limit)
    if collection.skipped:
        print(f"skipped {len(collection.skipped)} unreadable file(s):", file=sys.stderr)
        for path, reason in collection.skipped:
            print(f"  {path}: {reason}", file=sys.stderr)
    return collection


def _workdir(args: argparse.Namespace) -> str:
    from tf_retrieval.features.cache import default_workdir

    return args.workdir or default_workdir()


def _bundle(args: argparse.Namespace, name: str) -> str:
    from tf_retrieval.search.engine import resolve_bundle

    return resolve_bundle(name, _workdir(args))


def _remote_embedder(address: str | None, model_name: str, batch_size: int | None = None):
    """A TF Serving client (gRPC "host:port" or REST "http://host:port"; several, comma-separated, are replicas) for
    `model_name` sending up to `batch_size` images a request (default: the client's), or None for in process.
    `RetrievalEngine.load` checks that its vectors fit the index."""
    if not address:
        return None
    try:
        from tf_retrieval.serving.client import connect
    except ImportError as exc:
        raise MissingDependencyError(f"--server needs the serving extra: pip install 'tf_retrieval[serving]' ({exc})")
    return connect(address, model_name, **({} if batch_size is None else {"batch_size": batch_size}))


def _web():
    try:
        from tf_retrieval.web import app
    except ImportError as exc:
        raise MissingDependencyError(f"the search page needs the web extra: pip install 'tf_retrieval[web]' ({exc})")
    return app


def _command_line() -> str:
    return "tfr " + " ".join(shlex.quote(a) for a in sys.argv[1:])


# -- commands -----------------------------------------------------------------------------------------------------------
def cmd_embed(args: argparse.Namespace) -> None:
    """Embeds a collection and saves the vectors (.npy: unit-length float32 rows, or packed uint8 codes for a hashing
    model) with their image ids (.ids.txt)."""
    from tf_retrieval.features.embedding import embed_collection, save_vectors
    from tf_retrieval.vectors import finish

    config = _model_config(args)
    collection = _load_collection(args)
    client = _remote_embedder(args.server, args.server_model or config.name, args.batch_size)
    if client is not None:
        import numpy as np

        client.check_embedding_space(config.embedding_space(), "this command's model")
        chunk = 16 * args.batch_size  # images read into memory at a time (the client sends --batch-size a request)
        vectors = finish(np.concatenate([
            client.embed_bytes([collection.read_bytes(i) for i in range(start, min(start + chunk, len(collection)))])
            for start in range(0, len(collection), chunk)]), config.hash_bits)
    else:
        vectors = embed_collection(collection, config, workdir=_workdir(args), batch_size=args.batch_size,
                                   runtime=args.runtime)
    ids_path = save_vectors(args.out, vectors, collection.ids)
    print(f"{vectors.shape[0]} vectors of {vectors.shape[1]} {'bytes' if config.hash_bits else 'dimensions'} -> "
          f"{args.out} (ids: {ids_path})")


def cmd_index(args: argparse.Namespace) -> None:
    """Builds an index bundle (model config + catalog + index) for a collection, or changes one without a rebuild.

    With --add FOLDER and/or --delete ID..., the existing bundle --name is changed in place: the images of FOLDER that
    it does not hold yet are embedded with the bundle's own model (its model.json; the model flags are ignored) and
    added to its index and catalog, the given image ids are removed, and the bundle is saved atomically. ScaNN indexes
    change through ScaNN's mutation API and retrain only after many changes.
    """
    from tf_retrieval.search.engine import index_collection, update_from_folder

    if args.add or args.delete:
        if args.dataset:
            raise InvalidInputError("--dataset builds a new index, --add / --delete change an existing one: give one "
                                    "or the other")
        ignored = [flag for flag, given in (
            ("--split", args.split), ("--limit", args.limit is not None), ("--from-pipeline", args.from_pipeline),
            ("--metric", args.metric), ("--backend", args.backend != "auto"), ("--shards", args.shards != 1),
            ("--target-recall", args.target_recall is not None), ("--dba", args.dba), ("--alpha", args.alpha != 3.0))
            if given]
        if ignored:
            raise InvalidInputError(f"--add / --delete change a bundle with its own index settings and model; drop "
                                    f"{', '.join(ignored)} (or rebuild the bundle with them)")
        bundle = _bundle(args, args.name or _model_config(args).name)
        result = update_from_folder(bundle, add_folder=args.add, delete=args.delete or (), workdir=_workdir(args),
                                    batch_size=args.batch_size, runtime=args.runtime)
        for path, reason in result["unreadable"]:
            print(f"skipped unreadable file {path}: {reason}", file=sys.stderr)
        note = f" ({result['already']} already indexed)" if result["already"] else ""
        print(f"{bundle}: added {len(result['added'])} image(s){note}, deleted {len(result['deleted'])}; "
              f"{result['count']} images indexed, no rebuild")
        return
    options = {} if args.target_recall is None else {"target_recall": args.target_recall}
    if args.shards > 1:
        options["shards"] = args.shards
    augmented = f", α-DBA over {args.dba} neighbours" if args.dba else ""
    if args.from_pipeline:
        from tf_retrieval.pipeline import index_from_shards, read_manifest

        given = [flag for flag, value in (("--dataset", args.dataset), ("--split", args.split), ("--limit", args.limit),
                                          *_model_flags_given(args)) if value is not None]
        if given:
            raise InvalidInputError(f"--from-pipeline indexes the source and model of the pipeline run (its manifest); "
                                    f"drop {', '.join(given)}")
        name = args.name or read_manifest(args.from_pipeline)[0]["model_config"]["name"]
        bundle = os.path.join(_workdir(args), "indexes", name)
        engine = index_from_shards(args.from_pipeline, bundle, data_dir=args.data_dir, metric=args.metric,
                                   backend=args.backend, index_options=options, augment=args.dba, alpha=args.alpha)
        print(f"indexed {len(engine)} images embedded by the pipeline ({engine.config.model_id()}, "
              f"{engine.index.metric}{augmented}) -> {bundle}")
        return
    if not args.dataset:
        raise InvalidInputError("--dataset is required to build an index (or give --add / --delete to change one)")
    config = _model_config(args)
    collection = _load_collection(args)
    bundle = os.path.join(_workdir(args), "indexes", args.name or config.name)
    engine = index_collection(collection, config, bundle, source=args.dataset, data_dir=args.data_dir,
                              metric=args.metric, backend=args.backend, index_options=options, workdir=_workdir(args),
                              batch_size=args.batch_size, runtime=args.runtime, augment=args.dba, alpha=args.alpha)
    print(f"indexed {len(engine)} images of {args.dataset} with {config.model_id()} ({engine.index.metric}{augmented}) "
          f"-> {bundle}")


def cmd_pipeline(args: argparse.Namespace) -> None:
    """Embeds a collection on Apache Beam (DirectRunner by default; Dataflow, Flink or Spark through Beam's options
    after `--`) with an exported model (`tfr export`), into sharded TFRecords and a manifest; unreadable images go to
    a dead-letter file with the reason. `tfr index --from-pipeline <out>.manifest.json` then builds the bundle."""
    from tf_retrieval.pipeline import run_embedding

    beam_args = [a for a in args.beam_args if a != "--"] or ["--runner=DirectRunner", "--direct_num_workers=2",
                                                             "--direct_running_mode=multi_processing"]
    manifest = run_embedding(args.dataset, args.model_dir, args.out, shards=args.shards, batch_size=args.batch_size,
                             data_dir=args.data_dir, split=args.split, beam_args=beam_args)
    print(f"embedded {manifest['count']} images ({manifest['dead_letters']} unreadable, see {args.out}-dead-letter-*) "
          f"into {len(manifest['shards'])} shards in {manifest['seconds']} s -> {args.out}.manifest.json")
    print(f"next: tfr index --from-pipeline {args.out}.manifest.json --name NAME")


def cmd_dedup(args: argparse.Namespace) -> None:
    """Finds groups of near-duplicate images in an index bundle: every pair with similarity >= --threshold, joined into
    connected components (like imagededup). Uses the vectors stored in the index: nothing is embedded."""
    from tf_retrieval.search.dedup import find_duplicates, write_report
    from tf_retrieval.search.engine import RetrievalEngine

    if args.k < 1:
        raise InvalidInputError(f"-k must be positive, got {args.k}")
    bundle = _bundle(args, args.index)
    engine = RetrievalEngine.load(bundle, data_dir=args.data_dir)
    groups = find_duplicates(engine, args.threshold, k=args.k)
    print(f"{len(groups)} group(s) of near-duplicates ({sum(len(g.ids) for g in groups)} images) among {len(engine)} "
          f"at similarity >= {args.threshold} ({engine.index.metric}) in {bundle}")
    for number, group in enumerate(groups, 1):
        scores = [score for *_, score in group.pairs]
        print(f"group {number}: {len(group.ids)} images, pair scores {min(scores):.4f}-{max(scores):.4f}")
        for image_id in group.ids:
            print(f"  {image_id}")
    if args.out:
        write_report(args.out, engine, groups, bundle=bundle, threshold=args.threshold, k=args.k)
        print(f"groups written to {args.out}")


def cmd_search(args: argparse.Namespace) -> None:
    """Prints the top-k neighbours of each query image (files, or folders of images)."""
    from tf_retrieval.data.images import ImageDecodeError, image_files
    from tf_retrieval.search.engine import RetrievalEngine

    files = image_files(args.images)
    bundle = _bundle(args, args.index)
    config = ModelConfig.load(os.path.join(bundle, "model.json"))
    engine = RetrievalEngine.load(bundle, embedder=_remote_embedder(args.server, args.server_model or config.name),
                                  data_dir=args.data_dir, runtime=args.runtime)
    failures = 0
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        try:
            results = engine.search_images([data], args.k, threshold=args.threshold)[0]
        except ImageDecodeError as exc:
            print(f"{path}: skipped: {exc}", file=sys.stderr)
            failures += 1
            continue
        print(f"{path}: top {len(results)} of {len(engine)} ({engine.config.name}, {engine.index.metric})")
        for rank, result in enumerate(results, 1):
            print(f"  {rank:3d}. {result.score:7.4f}  {result.class_name:<16s} {result.id}")
    if failures == len(files):
        raise InvalidInputError("no query image could be read")


def _check_not_trained_on(run_dir: str | None, protocol: str, source: str | None) -> None:
    """Refuses to score (or adapt) a training run's model on another protocol of the data it trained on: that
    protocol's queries, or its unseen classes, hold images or classes the model trained on.

    Raises:
      InvalidInputError: such a protocol.
    """
    from tf_retrieval.data.protocols import dataset_family

    if not run_dir or not os.path.isfile(os.path.join(run_dir, "train_config.json")):
        return
    trained = TrainConfig.load(os.path.join(run_dir, "train_config.json"))

    def where(path: str | None) -> str | None:
        return os.path.realpath(path) if path and os.path.exists(path) else path

    same_data = (dataset_family(trained.protocol) == dataset_family(protocol)
                 and where(trained.source) == where(source))
    if same_data and trained.protocol != protocol:
        raise InvalidInputError(f"{run_dir} trained on {trained.protocol}'s training images: {protocol} on the same "
                                f"data would search with images or classes it trained on; use --protocol "
                                f"{trained.protocol} (or another dataset)")


def cmd_evaluate(args: argparse.Namespace) -> None:
    """Scores a protocol with the vectors `tfr index` would index, and keeps the record in a records file."""
    from tf_retrieval.data.protocols import SEEDED_PROTOCOLS, load_protocol
    from tf_retrieval.evaluation.evaluate import evaluate_model, records_markdown, write_records_markdown
    from tf_retrieval.training.adapt import adaptation_details

    config = _model_config(args)
    store = _records_store(args)
    if store is not None and args.metric not in (None, config.metric):
        raise InvalidInputError(f"--records keeps one record per model, ranked as the model ranks ({config.metric}): "
                                f"--metric {args.metric} would replace it; drop --records or --metric")
    if args.seed and args.protocol in SEEDED_PROTOCOLS and config.fine_tuned:
        raise InvalidInputError(f"--seed {args.seed}: training drew {args.protocol}'s split with seed 0, so another "
                                "draw's queries include images this model trained on; evaluate it with seed 0")
    adaptation = adaptation_details(args.model_config) if args.model_config else {}
    label = adaptation.pop("model", None)
    run_dir = adaptation.pop("run_dir", None) or (os.path.dirname(os.path.abspath(args.model_config))
                                                  if args.model_config else None)
    _check_not_trained_on(run_dir, args.protocol, args.dataset)
    protocol = load_protocol(args.protocol, source=args.dataset, data_dir=args.data_dir, seed=args.seed)
    print(protocol.summary())
    if run_dir and not os.path.isfile(os.path.join(run_dir, "result.json")):
        run_dir = None  # a model config that is not a training run's
    record = evaluate_model(protocol, config, workdir=_workdir(args), pca_dim=args.pca_dim, metric=args.metric,
                            batch_size=args.batch_size, command=_command_line(),
                            model=args.record_model or label, run_dir=run_dir, runtime=args.runtime,
                            expand=args.expand, augment=args.dba, alpha=args.alpha)
    record.update(adaptation)
    if args.seed and args.protocol in SEEDED_PROTOCOLS:
        record["seed"] = args.seed  # another draw of queries: a record of its own
    print(records_markdown([record]), end="")
    if store:
        write_records_markdown(args.records, store.merge([record]))
        print(f"record written to {args.records}")


def cmd_adapt(args: argparse.Namespace) -> None:
    """Fuses a model's frozen features (whitened on a protocol's database, or not) with its trained head
    (`training.adapt`); writes an ordinary model directory to index, serve or evaluate."""
    from tf_retrieval.data.protocols import load_protocol
    from tf_retrieval.training.adapt import adapt

    config = _model_config(args)
    run_dir = os.path.dirname(os.path.abspath(args.model_config)) if args.model_config else None
    if run_dir and not os.path.isfile(os.path.join(run_dir, "train_config.json")):
        run_dir = None
    _check_not_trained_on(run_dir, args.protocol, args.dataset)
    protocol = load_protocol(args.protocol, source=args.dataset, data_dir=args.data_dir)
    whiten = {"auto": None, "yes": True, "no": False}[args.whiten]
    adapted = adapt(config, protocol, args.out, dim=args.whiten_dim, whiten=whiten,
                    head_weight=args.head_weight, shrinkage=args.shrinkage, run_dir=run_dir, workdir=_workdir(args),
                    runtime=args.runtime)
    print(f"adapted {config.model_id()} -> {os.path.join(args.out, 'model.json')} ({adapted.model_id()})")
    print(f"next: tfr evaluate --protocol {protocol.name} --model-config {os.path.join(args.out, 'model.json')}")


def cmd_demo(args: argparse.Namespace) -> None:
    """Indexes CIFAR-10 train images with the frozen baseline and a fine-tuned model (a training run: --finetuned
    RUN, else the best cifar10-2 run by validation MAP@R, else a head trained now on the cached features), answers a
    query with a test image, then serves the search page with both models side by side."""
    from tf_retrieval.demo import demo_query, prepare_demo

    if args.finetuned and args.baseline_only:
        raise InvalidInputError("--baseline-only indexes no fine-tuned model: drop --finetuned or --baseline-only")
    web = None if args.no_web else _web()
    sock = None if web is None else web.reserve_port(args.host, args.port)  # a busy port fails before slow work
    engines = prepare_demo(_model_config(args), workdir=_workdir(args), limit=args.limit, data_dir=args.data_dir,
                           run_dir=args.finetuned, finetuned=not args.baseline_only, flip=args.flip,
                           batch_size=args.batch_size, runtime=args.runtime)
    demo_query(engines, k=args.k, seed=args.seed, data_dir=args.data_dir)
    if web is not None:
        print(f"search page: http://{args.host}:{args.port}/  (Ctrl-C to stop)")
        web.serve(web.create_app(engines, warmup=True), sock=sock)


def cmd_export(args: argparse.Namespace) -> None:
    """Exports the embedding model as a SavedModel for TF Serving: <base-dir>/<name>/<version>/ (with its LiteRT
    flatbuffer in assets.extra/model.tflite)."""
    from tf_retrieval.serving.export import export_config

    config = _model_config(args)
    base_dir = args.base_dir or os.path.join(_workdir(args), "models")
    path = export_config(config, base_dir, name=args.name, version=args.version)
    print(f"exported {config.model_id()} -> {path}")
    print(f"serve it: tfr serve --model-base-path {base_dir}   (or tensorflow/serving with MODEL_NAME="
          f"{args.name or config.name})")


def cmd_serve(args: argparse.Namespace) -> None:
    """Serves exported models over gRPC (and TF Serving's REST API) with TF Serving's protocol; Ctrl-C or SIGTERM stops
    it gracefully."""
    try:
        from tf_retrieval.serving.server import serve
    except ImportError as exc:
        raise MissingDependencyError(f"tfr serve needs the serving extra: pip install 'tf_retrieval[serving]' ({exc})")
    server = serve(args.model_base_path or os.path.join(_workdir(args), "models"), args.model_name, host=args.host,
                   port=args.port, rest_port=args.rest_port or None, poll_seconds=args.poll_seconds,
                   max_workers=args.max_workers, max_batch_size=args.max_batch_size,
                   version_policy=args.version_policy, runtime=args.runtime,
                   rest_max_connections=args.rest_max_connections, rest_timeout_seconds=args.rest_timeout)
    rest = f", REST on http://{args.host}:{server.rest_port}" if server.rest_port else ""
    print(f"serving gRPC on {args.host}:{server.port}{rest}  (Ctrl-C to stop)", flush=True)
    server.wait_for_signal()


def cmd_web(args: argparse.Namespace) -> None:
    """Serves the search page and its JSON API over index bundles (one model each), with waitress; a bundle changed
    by `tfr index --add/--delete` is picked up without a restart."""
    from tf_retrieval.search.engine import RetrievalEngine

    web = _web()
    sock = web.reserve_port(args.host, args.port)  # a busy port fails before the models load
    bundles = [_bundle(args, name) for name in args.index]
    configs = [ModelConfig.load(os.path.join(bundle, "model.json")) for bundle in bundles]
    names = [config.name for config in configs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InvalidInputError(f"two bundles hold the model {repeated[0]!r}; each model may appear once")

    def build_app():  # in each worker process
        engines = {}
        for bundle, config in zip(bundles, configs):
            engines[config.name] = RetrievalEngine.load(bundle, embedder=_remote_embedder(args.server, config.name),
                                                        data_dir=args.data_dir, runtime=args.runtime)
            print(f"{config.name}: {len(engines[config.name]):,} images from {bundle}", flush=True)
        return web.create_app(engines, max_upload_mb=args.max_upload_mb, warmup=True)

    workers = f" with {args.workers} worker processes" if args.workers > 1 else ""
    print(f"search page: http://{args.host}:{args.port}/{workers}  (Ctrl-C to stop)", flush=True)
    web.serve_workers(build_app, sock, workers=args.workers, threads=args.threads)


def cmd_train(args: argparse.Namespace) -> None:
    """Fine-tunes on a protocol's training set (cached backbone outputs, or images end to end) and writes a run
    directory; a recipe in stages writes one per stage, the last one at --run-dir."""
    from tf_retrieval.training.train import train_recipe

    recipe = _train_recipe(args)
    config = recipe.stages[-1]
    run_dir = args.run_dir or os.path.join(_workdir(args), "runs", f"{config.model.name}-{config.protocol}")
    result = train_recipe(recipe, run_dir, workdir=_workdir(args), verbose=2 if args.progress else 0,
                          runtime=args.runtime, command=_command_line())
    stage = f" (the last of {len(recipe.stages)} stages)" if len(recipe.stages) > 1 else ""
    print(f"trained {config.model.name} on {config.protocol}{stage} in {result.seconds:.0f} s ({result.epochs} "
          f"epochs): {result.validation_summary}")
    print(f"run: {run_dir}; model config: {os.path.join(run_dir, 'model.json')}")
    print(f"next: tfr compare {run_dir}   |   tfr index --model-config {os.path.join(run_dir, 'model.json')} ...")


def cmd_tune(args: argparse.Namespace) -> None:
    """Searches embedding size, margin, learning rate, mining and hidden width (keras-tuner) on a protocol's training
    set (cached backbone outputs); writes the best TrainConfig, a trial table and a plot with each size's index cost.
    Resumable: run it again with the same --out to finish or extend (--trials) the search."""
    try:
        from tf_retrieval.tuning.tune import SEARCHED, tune_protocol
    except ImportError as exc:
        raise MissingDependencyError(f"tfr tune needs keras-tuner and matplotlib: pip install "
                                     f"'tf_retrieval[tuning,plots]' ({exc})")
    ignored = [f"--{name.replace('_', '-')}" for name in (*SEARCHED, "strategy")
               if getattr(args, f"train_{name}", None) is not None]
    if ignored:
        raise InvalidInputError(f"tfr tune searches {', '.join(SEARCHED)} itself, on one device: drop "
                                f"{', '.join(ignored)} (the search space is in tuning/hypermodel.py's SearchSpace)")
    config = _train_config(args)
    out = args.out or os.path.join(_workdir(args), "tuning", f"{config.model.name}-{config.protocol}")
    result = tune_protocol(config, out, workdir=_workdir(args), trials=args.trials, algorithm=args.algorithm,
                           index_backend=args.index_backend, overwrite=args.overwrite,
                           verbose=args.progress or args.verbose)
    best = result.best_config
    print(f"best of {len(result.trials)} trials: validation MAP@R {result.best_score:.4f} with embedding_dim "
          f"{best.embedding_dim}, hidden_dim {best.hidden_dim}, {best.mining}, margin {best.margin}, "
          f"learning_rate {best.learning_rate:.2e}")
    print(f"table: {result.table_path}; plot: {result.plot_path}")
    print(f"next: tfr train --config {result.config_path}")


def _records_store(args: argparse.Namespace):
    """The records file of `--records` (None without it), read once now: a damaged one fails before the evaluation,
    not after it."""
    from tf_retrieval.evaluation.evaluate import RECORD_KEY
    from tf_retrieval.storage import RecordStore

    if not args.records:
        return None
    store = RecordStore(args.records, RECORD_KEY)
    store.load()
    return store


def cmd_compare(args: argparse.Namespace) -> None:
    """Scores baseline and fine-tuned models of training runs; writes report.md, report.json and figures."""
    from tf_retrieval.evaluation.compare import compare
    from tf_retrieval.evaluation.evaluate import write_records_markdown

    store = _records_store(args)
    records = compare(args.runs, args.out, workdir=_workdir(args), command=_command_line(), expand=args.expand,
                      augment=args.dba, alpha=args.alpha, label=args.label, runtime=args.runtime, flip=args.flip)
    print(f"report: {os.path.join(args.out, 'report.md')} ({len(records)} records)")
    if store:
        write_records_markdown(args.records, store.merge(records))
        print(f"records written to {args.records}")


def _add_search_args(parser: argparse.ArgumentParser, expand: bool = True, expand_default: int = 0) -> None:
    """--dba, --alpha (and --expand): α database augmentation and α query expansion (`search.query`)."""
    if expand:
        parser.add_argument("--expand", type=int, default=expand_default,
                            help=f"α query expansion over the top-k (0: off; default {expand_default})")
    parser.add_argument("--dba", type=int, default=0, metavar="K",
                        help="α database-side augmentation: each database vector averaged with its K nearest others "
                             "(0: off, the default; cosine float vectors only)")
    parser.add_argument("--alpha", type=float, default=3.0, help="the α of α-QE / α-DBA: neighbour weight = "
                                                                 "similarity ** α (default 3)")


# -- training flags: one per TrainConfig field and per field of its ModelConfig -------------------------------------
def _int_or_none(text: str) -> int | str:
    """argparse type of --hash-bits: a whole number, or "none" (unsets a config's)."""
    return text if text.lower() == "none" else int(text)


_OPTIONAL_TYPES = {"hash_bits": _int_or_none, "train_from": str, "source": str, "weights": str, "proxy_loss": str,
                   "preprocessing": str}
_LIST_TYPES = {"scales": (float, "+"), "augment": (str, "*")}  # `--augment` alone: no views (over a recipe's)


def _add_train_args(parser: argparse.ArgumentParser) -> None:
    """`--embedding-dim`, `--margin`, `--backbone`, `--hash-bits`, ...: all optional, they override --config."""
    group = parser.add_argument_group("training (override --config; defaults from TrainConfig and ModelConfig)")
    model_defaults = TrainConfig().model
    fields = [(f.name, f.default) for f in dataclasses.fields(TrainConfig) if f.name != "model"]
    fields += [(name, getattr(model_defaults, name)) for name in TRAINED_MODEL_FIELDS]
    for name, default in fields:
        if isinstance(default, bool):
            group.add_argument("--" + name.replace("_", "-"), dest=f"train_{name}",
                               action=argparse.BooleanOptionalAction, help=f"default {default}")
            continue
        kind, many = _LIST_TYPES[name] if name in _LIST_TYPES else (_OPTIONAL_TYPES.get(name, type(default)), None)
        group.add_argument("--" + name.replace("_", "-"), dest=f"train_{name}", type=kind, nargs=many,
                           metavar=name.upper(), help=f"default {list(default) if many else default}")


def _train_recipe(args: argparse.Namespace) -> Recipe:
    """The `Recipe` of --config or --recipe (default: one stage of `TrainConfig`'s defaults) with the training flags
    applied to each stage, and --stages; checks the protocol."""
    from tf_retrieval.data.protocols import dataset_family

    recipe = getattr(args, "recipe", None)
    if args.config and recipe:
        raise InvalidInputError("give --config or --recipe, not both")
    base = Recipe.load(args.config) if args.config else load_recipe(recipe) if recipe else Recipe((TrainConfig(),))
    flags = {k[len("train_"):]: v for k, v in vars(args).items() if k.startswith("train_") and v is not None}
    for name in ("weights", "train_from", "source", "proxy_loss", "hash_bits"):  # `--proxy-loss none` unsets a recipe's
        if isinstance(flags.get(name), str) and flags[name].lower() == "none":
            flags[name] = None
    recipe = base.with_changes(flags, getattr(args, "stages", None))
    dataset_family(recipe.stages[0].protocol)  # an unknown protocol: a clear error before anything loads
    return recipe


def _train_config(args: argparse.Namespace) -> TrainConfig:
    """The one `TrainConfig` of `_train_recipe` (for commands that train a single run, such as `tfr tune`)."""
    recipe = _train_recipe(args)
    if len(recipe.stages) > 1:
        raise InvalidInputError(f"{args.config} has {len(recipe.stages)} stages: give one stage (a TrainConfig file)")
    return recipe.stages[0]


# -- the parser ---------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from tf_retrieval.data.protocols import PROTOCOLS
    from tf_retrieval.search.index import BACKENDS, METRICS

    parser = argparse.ArgumentParser(prog="tfr", description="tf_retrieval: content-based image retrieval.")
    parser.add_argument("--workdir", help="artefacts directory (default: $TFR_WORKDIR or ./artifacts)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    backends = ("auto", *BACKENDS)

    def command(name: str, function, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=function.__doc__)
        sub.set_defaults(run=function)
        return sub

    embed = command("embed", cmd_embed, "embed a collection to a .npy file")
    _add_data_args(embed)
    _add_model_args(embed)
    embed.add_argument("--out", required=True, help="output .npy file")
    embed.add_argument("--server", help="embed through TF Serving: gRPC HOST:PORT or REST http://HOST:PORT; replicas: A:PORT,B:PORT")
    embed.add_argument("--server-model", help="model name on the server (default: the model name)")
    embed.add_argument("--batch-size", type=flags.positive_int, default=64)
    _add_runtime_arg(embed)

    index = command("index", cmd_index, "build an index bundle of a collection, or add / remove images")
    _add_data_args(index, required=False)
    _add_model_args(index)
    index.add_argument("--name", help="bundle name under <workdir>/indexes, or a bundle directory for --add / --delete "
                                      "(default: the model name)")
    index.add_argument("--metric", choices=METRICS,
                       help="similarity (default: cosine, or hamming for a hashing model, the only one it takes)")
    index.add_argument("--backend", default="auto", choices=backends)
    index.add_argument("--target-recall", type=float,
                       help="ScaNN: the recall@10 its automatic settings aim at, e.g. 0.9 (faster) or 0.99 "
                            "(see tf_retrieval.search.index.scann_params); default: its own settings")
    index.add_argument("--shards", type=flags.positive_int, default=1,
                       help="split the index by image id into N shards, searched in parallel and merged (each a "
                            "complete index of --backend under <bundle>/index/shard-NNNNN)")
    index.add_argument("--from-pipeline", metavar="MANIFEST",
                       help="build the bundle from the vectors a `tfr pipeline` run wrote (its .manifest.json)")
    index.add_argument("--add", metavar="FOLDER",
                       help="add the images of FOLDER that the bundle --name does not hold yet (embedded with the "
                            "bundle's own model), without rebuilding it; a picture replaced under an id the bundle "
                            "holds is re-embedded with --delete ID --add FOLDER (deletes run first)")
    index.add_argument("--delete", nargs="+", metavar="ID",
                       help="remove these image ids (as `tfr search` prints them) from the bundle --name, without "
                            "rebuilding it")
    index.add_argument("--batch-size", type=flags.positive_int, default=64)
    _add_search_args(index, expand=False)
    _add_runtime_arg(index)

    pipeline = command("pipeline", cmd_pipeline, "embed a collection on Apache Beam into sharded vector files")
    pipeline.add_argument("--dataset", required=True, help="a folder (one sub-folder per class), a file pattern on any "
                                                           "Beam filesystem, or a tfds name")
    pipeline.add_argument("--split", help="a tfds split, or a folder's (its index.csv's official_split); a file "
                                          "pattern has none")
    pipeline.add_argument("--data-dir", help="tfds data directory")
    pipeline.add_argument("--model-dir", required=True, help="an exported model version, e.g. artifacts/models/baseline/1")
    pipeline.add_argument("--out", required=True, help="output prefix, e.g. artifacts/vectors/cifar10 (local or gs://)")
    pipeline.add_argument("--shards", type=flags.positive_int, default=4, help="output shards")
    pipeline.add_argument("--batch-size", type=flags.positive_int, default=64, help="largest batch per model call")
    pipeline.add_argument("beam_args", nargs=argparse.REMAINDER,
                          help="after --: Beam pipeline options (default: --runner=DirectRunner --direct_num_workers=2 "
                               "--direct_running_mode=multi_processing)")

    dedup = command("dedup", cmd_dedup, "near-duplicate groups of an indexed collection")
    dedup.add_argument("--index", required=True, help="bundle name under <workdir>/indexes, or a bundle directory")
    dedup.add_argument("--threshold", type=float, default=0.95,
                       help="minimum similarity of a duplicate pair (default 0.95; cosine for the default metric)")
    dedup.add_argument("-k", type=int, default=10, help="neighbours fetched per image at first (more where needed)")
    dedup.add_argument("--out", help="also write the groups to this JSON file")
    dedup.add_argument("--data-dir", help="tfds data directory of the indexed collection")

    search = command("search", cmd_search, "query an index with images")
    search.add_argument("images", nargs="+", help="query image files or folders of images")
    search.add_argument("--index", required=True, help="bundle name under <workdir>/indexes, or a bundle directory")
    search.add_argument("-k", type=int, default=10, help="results per query")
    search.add_argument("--threshold", type=float, help="minimum similarity score")
    search.add_argument("--data-dir", help="tfds data directory of the indexed collection")
    search.add_argument("--server", help="embed queries through TF Serving: gRPC HOST:PORT or REST http://HOST:PORT; replicas: A:PORT,B:PORT")
    search.add_argument("--server-model", help="model name on the server (default: the bundle's model name)")
    _add_runtime_arg(search)

    evaluate = command("evaluate", cmd_evaluate, "score an evaluation protocol")
    evaluate.add_argument("--protocol", required=True, choices=list(PROTOCOLS))
    evaluate.add_argument("--dataset", help="collection to use (default: tfds cifar10 / oxford_flowers102); e.g. a folder")
    evaluate.add_argument("--data-dir", help="tfds data directory")
    _add_model_args(evaluate)
    evaluate.add_argument("--pca-dim", type=int, help="reduce embeddings with PCA fitted on the database")
    evaluate.add_argument("--metric", choices=METRICS, help="ranking similarity (default: the model's own)")
    evaluate.add_argument("--records", help="keep the record in this JSON list (e.g. benchmarks/results/retrieval.json)")
    evaluate.add_argument("--record-model", help="model label of the record (default: finetuned with a head or a "
                                                 "fine-tuned trunk, else baseline)")
    evaluate.add_argument("--seed", type=int, default=0, help="draws cifar10-1's queries and training images (trained "
                                                          "models: 0, the draw training used)")
    _add_search_args(evaluate)
    evaluate.add_argument("--batch-size", type=flags.positive_int, default=64)
    _add_runtime_arg(evaluate)

    adapt = command("adapt", cmd_adapt, "fuse a model's frozen features (whitened or not) with its trained head")
    adapt.add_argument("--protocol", required=True, choices=list(PROTOCOLS),
                       help="the whitening is fitted on its database; the whitening and the head weight are chosen on "
                            "its training set's validation split")
    adapt.add_argument("--dataset", help="collection to use (default: tfds cifar10 / oxford_flowers102); e.g. a folder")
    adapt.add_argument("--data-dir", help="tfds data directory")
    _add_model_args(adapt)
    adapt.add_argument("--whiten", choices=("auto", "yes", "no"), default="auto",
                       help="whiten the frozen features (auto: if it scores better on the protocol's training set)")
    adapt.add_argument("--whiten-dim", type=int, help="whitened dimensions (default: chosen on the training set)")
    adapt.add_argument("--shrinkage", type=float, help="variance added to each whitened axis, as a share of the mean "
                                                       "variance (0: plain whitening; default: chosen)")
    adapt.add_argument("--head-weight", type=float, help="the head's share in [0, 1] (default: chosen on the training "
                                                         "run's validation split)")
    adapt.add_argument("--out", required=True, help="output directory (model.json, the adapted head, adapt.json)")
    _add_runtime_arg(adapt)

    demo = command("demo", cmd_demo, "CIFAR-10: baseline and fine-tuned side by side on the page")
    _add_model_args(demo)
    demo.add_argument("--data-dir", help="tfds data directory")
    demo.add_argument("--limit", type=int, default=10000, help="database images from the CIFAR-10 train split")
    demo.add_argument("-k", type=int, default=10)
    demo.add_argument("--seed", type=int, default=0, help="picks the query test image")
    demo.add_argument("--batch-size", type=flags.positive_int, default=64)
    _add_runtime_arg(demo)
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=flags.port, default=8080)
    demo.add_argument("--no-web", action="store_true", help="stop after the query instead of serving the page")
    demo.add_argument("--finetuned", metavar="RUN", help="the training run to compare (default: the cifar10-2 run "
                                                         "with the best validation MAP@R, else a head trained now)")
    demo.add_argument("--baseline-only", action="store_true", help="do not index a fine-tuned model")

    export = command("export", cmd_export, "export the embedder as a SavedModel for TF Serving")
    _add_model_args(export)
    export.add_argument("--base-dir", help="model base path (default <workdir>/models)")
    export.add_argument("--name", help="served model name (default: the model name)")
    export.add_argument("--version", type=int, help="integer version (default: the next one)")

    serve = command("serve", cmd_serve, "serve exported models over gRPC and REST (TF Serving's protocol)")
    serve.add_argument("--model-base-path", help="a model directory or a directory of models (default <workdir>/models)")
    serve.add_argument("--model-name", help="served name when the base path is one model's directory")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=flags.port, default=8500, help="gRPC port")
    serve.add_argument("--rest-port", type=flags.port, default=8501, help="TF Serving REST API port (0: none)")
    serve.add_argument("--version-policy", default="latest", help="versions served: latest (default), latest:N, all, "
                                                                  "or specific:1,3")
    serve.add_argument("--poll-seconds", type=flags.seconds, default=2.0,
                       help="how often new versions are looked for (0: never)")
    serve.add_argument("--max-workers", type=flags.positive_int, default=8)
    serve.add_argument("--max-batch-size", type=flags.positive_int, default=1024)
    serve.add_argument("--rest-max-connections", type=flags.positive_int, default=64,
                       help="REST connections served at once (one thread each); one more is answered 503")
    serve.add_argument("--rest-timeout", type=float, default=30.0,
                       help="seconds after which a stalled REST connection (request body, idle keep-alive) is closed")
    _add_runtime_arg(serve)

    web = command("web", cmd_web, "serve the search page")
    web.add_argument("--index", action="append", required=True,
                     help="bundle name under <workdir>/indexes, or a bundle directory (repeat for several models)")
    web.add_argument("--server", help="embed queries through TF Serving: gRPC HOST:PORT or REST http://HOST:PORT; replicas: A:PORT,B:PORT "
                                      "(default: in process)")
    web.add_argument("--data-dir", help="tfds data directory of the indexed collections")
    _add_runtime_arg(web)
    web.add_argument("--host", default="127.0.0.1")
    web.add_argument("--port", type=flags.port, default=8080)
    web.add_argument("--threads", type=flags.positive_int, default=8, help="request threads per worker process")
    web.add_argument("--workers", type=flags.positive_int, default=1,
                     help="server processes (each loads the models and the index; more than one keeps several cores "
                          "busy under load: e.g. the number of cores)")
    web.add_argument("--max-upload-mb", type=float, default=10.0)

    train = command("train", cmd_train, "fine-tune with a triplet loss (cached features, or end to end; recipes in stages)")
    train.add_argument("--config", help="a TrainConfig JSON file (e.g. the best one `tfr tune` wrote), or a recipe file "
                                         "(tf_retrieval.config.Recipe: stages)")
    train.add_argument("--recipe", metavar="NAME",
                       help=f"a shipped recipe ({', '.join(recipe_names())}): the settings that gave the best "
                            f"recorded figure on that protocol, in stages where it took several runs (flags override "
                            f"them in every stage; --weights in the first)")
    train.add_argument("--stages", type=int, help="train only the first N stages of the recipe (default: all)")
    train.add_argument("--run-dir", help="output directory (default <workdir>/runs/<name>-<protocol>)")
    train.add_argument("--progress", action="store_true", help="print one line per epoch")
    _add_runtime_arg(train)
    _add_train_args(train)

    tune = command("tune", cmd_tune, "search the head's hyperparameters with keras-tuner")
    tune.add_argument("--config", help="a base TrainConfig JSON file (the searched fields are replaced)")
    tune.add_argument("--trials", type=int, default=20, help="number of trials in all (default 20)")
    tune.add_argument("--algorithm", default="bayesian", choices=("bayesian", "random", "hyperband"))
    tune.add_argument("--out", help="output directory (default <workdir>/tuning/<name>-<protocol>)")
    tune.add_argument("--index-backend", default="auto", choices=backends,
                      help="index whose memory and latency are measured per embedding size")
    tune.add_argument("--overwrite", action="store_true", help="discard an earlier search in --out instead of resuming")
    tune.add_argument("--progress", action="store_true", help="also print Keras' per-epoch lines")
    _add_train_args(tune)

    compare = command("compare", cmd_compare, "baseline vs fine-tuned report")
    compare.add_argument("runs", nargs="+", help="training run directories (from tfr train), or model directories "
                                                 "from tfr adapt")
    compare.add_argument("--out", default="reports/compare", help="report directory (default reports/compare)")
    compare.add_argument("--records", help="also keep the records in this JSON list (benchmarks/results/retrieval.json)")
    _add_search_args(compare, expand_default=5)
    compare.add_argument("--flip", action=argparse.BooleanOptionalAction,
                         help="test-time flip on (or off) for both models (`--flip` of the model flags; figures "
                              "<run>-flip-*.png); default: both as the run's model.json says")
    compare.add_argument("--label", default="finetuned", help="model name of the trained runs in the records "
                         "(e.g. 'tuned' for a configuration from tfr tune)")
    _add_runtime_arg(compare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `tfr`; returns the exit status."""
    from tf_retrieval.runtime import quiet_tensorflow

    quiet_tensorflow()  # before TensorFlow is imported (building the parser imports it)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("absl").setLevel(logging.WARNING)  # tfds logs every dataset it opens through absl
    try:
        args.run(args)
    except KeyboardInterrupt:
        print("tfr: interrupted", file=sys.stderr)
        return 130
    except RetrievalError as exc:
        if args.verbose:
            raise
        print(f"tfr: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
