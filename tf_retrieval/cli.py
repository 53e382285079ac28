"""`tfr`: the command line, a thin layer over library functions.

    tfr embed     --dataset cifar10 --out emb.npy         embeddings of a collection (in process or through TF Serving)
    tfr index     --dataset cifar10 --name cifar10        build an index bundle under <workdir>/indexes/<name>
    tfr index     --name cifar10 --add FOLDER --delete ID  add / remove images of a bundle without rebuilding it
    tfr dedup     --index cifar10 --threshold 0.95        near-duplicate groups of an indexed collection
    tfr search    IMAGE|FOLDER... --index cifar10         top-k neighbours with class and score
    tfr evaluate  --protocol cifar10-2                    retrieval metrics of a protocol, appended to a records file
    tfr demo                                              index CIFAR-10, answer a query, serve the search page
    tfr export    --name baseline                         SavedModel for TF Serving under <workdir>/models
    tfr serve                                             gRPC server speaking TF Serving's protocol
    tfr web       --index demo-baseline [--server H:P]    the search page over one or more index bundles
    tfr train     --protocol cifar10-2                    fine-tune a triplet-loss head (and top blocks) on cached features
    tfr tune      --protocol cifar10-2 --trials 20        search embedding size, margin, lr, mining (keras-tuner)
    tfr compare   RUN...                                  baseline vs fine-tuned report (Markdown, JSON, figures)

Errors are reported as one line (`tfr: error: ...`, exit status 2); `--verbose` shows tracebacks.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from typing import Sequence

import numpy as np

from tf_retrieval.config import ModelConfig

logger = logging.getLogger("tf_retrieval")


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    defaults = ModelConfig()
    group = parser.add_argument_group("model")
    group.add_argument("--model-config", help="a ModelConfig JSON file (the flags below override it)")
    group.add_argument("--model-name", help=f"model name (default {defaults.name})")
    group.add_argument("--backbone", help=f"backbone (default {defaults.backbone}); see tf_retrieval.backbones.BACKBONES")
    group.add_argument("--image-size", type=int, help=f"input size in px (default {defaults.image_size})")
    group.add_argument("--pooling", choices=("avg", "gem", "max"), help=f"pooling (default {defaults.pooling})")
    group.add_argument("--weights", help="'imagenet' (default), 'none' for random weights, or a weights file")
    group.add_argument("--head", help="a trained head (.keras); omit for the frozen baseline")


def _model_config(args: argparse.Namespace) -> ModelConfig:
    config = ModelConfig.load(args.model_config) if args.model_config else ModelConfig()
    overrides = {"name": args.model_name, "backbone": args.backbone, "image_size": args.image_size,
                 "pooling": args.pooling, "head": args.head}
    for field, value in overrides.items():
        if value is not None:
            setattr(config, field, value)
    if args.weights is not None:
        config.weights = None if args.weights.lower() == "none" else args.weights
    from tf_retrieval.backbones import BACKBONES  # validate early, with the list of choices

    if config.backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {config.backbone!r}; choose one of {', '.join(BACKBONES)}")
    if config.image_size < 32:
        raise ValueError(f"--image-size must be at least 32, got {config.image_size}")
    return config


def _add_data_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--dataset", required=required,
                        help="a tfds name (cifar10, oxford_flowers102) or a folder of images with one sub-folder per class")
    parser.add_argument("--data-dir", help="tfds data directory (default: $TFDS_DATA_DIR, else tfds' own default)")
    parser.add_argument("--split", action="append", help="only these splits of a tfds dataset (repeatable)")
    parser.add_argument("--limit", type=int, help="only the first N images")


def _load_collection(args: argparse.Namespace):
    from tf_retrieval.data import load_dataset, load_tfds

    if os.path.isdir(args.dataset) or args.dataset.startswith("folder:"):
        collection = load_dataset(args.dataset)
    elif args.split:
        collection = load_tfds(args.dataset, data_dir=args.data_dir, splits=args.split)
    else:
        collection = load_dataset(args.dataset, data_dir=args.data_dir)
    if collection.skipped:
        print(f"skipped {len(collection.skipped)} unreadable file(s):", file=sys.stderr)
        for path, reason in collection.skipped:
            print(f"  {path}: {reason}", file=sys.stderr)
    if args.limit is not None:
        if args.limit <= 0:
            raise ValueError(f"--limit must be positive, got {args.limit}")
        collection = collection.subset(np.arange(min(args.limit, len(collection))))
    return collection


def _workdir(args: argparse.Namespace) -> str:
    from tf_retrieval.features import default_workdir

    return args.workdir or default_workdir()


def _bundle_dir(args: argparse.Namespace, name: str) -> str:
    return name if os.path.isdir(os.path.join(name, "index")) else os.path.join(_workdir(args), "indexes", name)


def cmd_embed(args: argparse.Namespace) -> None:
    """Embeds a collection and saves the vectors (.npy) with their ids (.ids.txt)."""
    from tf_retrieval.evaluate import embed_with_model

    config = _model_config(args)
    collection = _load_collection(args)
    if args.server:
        from serving.client import EmbeddingClient

        client = EmbeddingClient(args.server, args.server_model or config.name)
        embeddings = np.concatenate([client.embed_bytes([collection.read_bytes(i) for i in range(s, min(s + 64, len(collection)))])
                                     for s in range(0, len(collection), 64)])
    else:
        embeddings = embed_with_model(collection, config, workdir=_workdir(args), batch_size=args.batch_size)
        embeddings = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    np.save(args.out, embeddings.astype(np.float32))
    ids_path = os.path.splitext(args.out)[0] + ".ids.txt"
    with open(ids_path, "w") as f:
        f.write("\n".join(collection.ids) + "\n")
    print(f"{embeddings.shape[0]} embeddings of dimension {embeddings.shape[1]} -> {args.out} (ids: {ids_path})")


def cmd_index(args: argparse.Namespace) -> None:
    """Builds an index bundle (model config + catalog + index) for a collection, or changes one without a rebuild.

    With --add FOLDER and/or --delete ID..., the existing bundle --name is changed in place: the images of FOLDER that
    it does not hold yet are embedded with the bundle's own model (its model.json; the model flags are ignored) and
    added to its index and catalog, the given image ids are removed, and the bundle is saved atomically. ScaNN indexes
    change through ScaNN's mutation API and retrain only after many changes.
    """
    if args.add or args.delete:
        _update_index(args)
        return
    if not args.dataset:
        raise ValueError("--dataset is required to build an index (or give --add / --delete to change one)")
    from tf_retrieval.engine import build_bundle
    from tf_retrieval.evaluate import embed_with_model

    config = _model_config(args)
    collection = _load_collection(args)
    embeddings = embed_with_model(collection, config, workdir=_workdir(args), batch_size=args.batch_size)
    name = args.name or config.name
    bundle = os.path.join(_workdir(args), "indexes", name)
    options = {} if args.target_recall is None else {"target_recall": args.target_recall}
    engine = build_bundle(bundle, config, collection, embeddings, source=args.dataset, data_dir=args.data_dir,
                          metric=args.metric, backend=args.backend, index_options=options)
    print(f"indexed {len(engine)} images of {args.dataset} with {config.model_id()} -> {bundle}")


def _update_index(args: argparse.Namespace) -> None:
    """`tfr index --add/--delete`: embeds the new images with the bundle's model and updates the bundle in place."""
    from tf_retrieval.data import load_dataset
    from tf_retrieval.engine import pending_images, update_bundle
    from tf_retrieval.evaluate import embed_with_model

    if args.dataset:
        raise ValueError("--dataset builds a new index, --add / --delete change an existing one: give one or the other")
    name = args.name or _model_config(args).name
    bundle = _bundle_dir(args, name)
    if not os.path.isfile(os.path.join(bundle, "catalog.json")):
        raise FileNotFoundError(f"no index bundle {name!r} at {bundle}: build it first with `tfr index --dataset ...`")
    add = embeddings = None
    already = 0
    if args.add:
        if not os.path.isdir(args.add):
            raise FileNotFoundError(f"image folder not found: {args.add}")
        collection = load_dataset(args.add)
        for path, reason in collection.skipped:
            print(f"skipped unreadable file {path}: {reason}", file=sys.stderr)
        add = pending_images(bundle, collection, deleted=args.delete or ())
        already = len(collection) - len(add)
        embeddings = np.zeros((0, 1), np.float32)
        if len(add):
            config = ModelConfig.load(os.path.join(bundle, "model.json"))
            embeddings = embed_with_model(add, config, workdir=_workdir(args), batch_size=args.batch_size)
    result = update_bundle(bundle, add=add, embeddings=embeddings, delete=args.delete or ())
    note = f" ({already} already indexed)" if already else ""
    print(f"{bundle}: added {len(result['added'])} image(s){note}, deleted {len(result['deleted'])}; "
          f"{result['count']} images indexed, no rebuild")


def cmd_dedup(args: argparse.Namespace) -> None:
    """Finds groups of near-duplicate images in an index bundle: every pair with similarity >= --threshold, joined into
    connected components (like imagededup). Uses the vectors stored in the index: nothing is embedded."""
    import json

    from tf_retrieval.dedup import find_duplicates
    from tf_retrieval.engine import RetrievalEngine

    if args.k < 1:
        raise ValueError(f"-k must be positive, got {args.k}")
    bundle = _bundle_dir(args, args.index)
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
        report = {"bundle": os.path.abspath(bundle), "threshold": args.threshold, "metric": engine.index.metric,
                  "k": args.k, "images": len(engine), "groups": [group.to_dict() for group in groups]}
        folder = os.path.dirname(os.path.abspath(args.out))
        os.makedirs(folder, exist_ok=True)
        with open(args.out + ".tmp", "w") as f:
            json.dump(report, f, indent=1)
        os.replace(args.out + ".tmp", args.out)
        print(f"groups written to {args.out}")


def _query_files(paths: Sequence[str]) -> list[str]:
    from tf_retrieval.data import IMAGE_EXTENSIONS

    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names
                           if f.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise ValueError(f"no images in folder {path}")
            files.extend(found)
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"no such image or folder: {path}")
    return files


def cmd_search(args: argparse.Namespace) -> None:
    """Prints the top-k neighbours of each query image."""
    from tf_retrieval.data import ImageDecodeError
    from tf_retrieval.engine import RetrievalEngine

    files = _query_files(args.images)
    embedder = None
    if args.server:
        from serving.client import EmbeddingClient

        embedder = EmbeddingClient(args.server, args.server_model)
    engine = RetrievalEngine.load(_bundle_dir(args, args.index), embedder=embedder, data_dir=args.data_dir)
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
        print(f"{path}: top {len(results)} of {len(engine)} ({engine.config.name})")
        for rank, result in enumerate(results, 1):
            print(f"  {rank:3d}. {result.score:7.4f}  {result.class_name:<16s} {result.id}")
    if failures == len(files):
        raise ValueError("no query image could be read")


def cmd_evaluate(args: argparse.Namespace) -> None:
    """Scores a protocol and appends the record to a records file."""
    from tf_retrieval.evaluate import evaluate_model, merge_records, records_markdown
    from tf_retrieval.protocols import load_protocol

    config = _model_config(args)
    protocol = load_protocol(args.protocol, source=args.dataset, data_dir=args.data_dir, seed=args.seed)
    print(protocol.summary())
    record = evaluate_model(protocol, config, workdir=_workdir(args), pca_dim=args.pca_dim, metric=args.metric,
                            batch_size=args.batch_size, command="tfr " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    print(records_markdown([record]), end="")
    if args.records:
        merge_records(args.records, [record])
        print(f"record written to {args.records}")


def _demo_engine(args: argparse.Namespace, config: ModelConfig, bundle: str, database):
    """The demo's engine for `config`: loaded from `bundle`, or built (and saved there) from `database`."""
    from tf_retrieval.engine import RetrievalEngine, build_bundle
    from tf_retrieval.evaluate import embed_with_model

    if os.path.exists(os.path.join(bundle, "catalog.json")):
        try:
            engine = RetrievalEngine.load(bundle, data_dir=args.data_dir)
            if len(engine) == len(database):
                print(f"using the index at {bundle}")
                return engine
            print(f"rebuilding {bundle}: it holds {len(engine):,} images, the demo asks for {len(database):,}")
        except ValueError as exc:
            print(f"rebuilding {bundle}: {exc}")
    print(f"indexing {len(database):,} CIFAR-10 train images with {config.model_id()} ...")
    embeddings = embed_with_model(database, config, workdir=_workdir(args), batch_size=args.batch_size)
    return build_bundle(bundle, config, database, embeddings, source="cifar10", data_dir=args.data_dir)


def _finetuned_run(args: argparse.Namespace) -> ModelConfig | None:
    """The model of --finetuned RUN, else of the newest finished CIFAR-10 float-embedding run under <workdir>/runs
    (cifar10-2 runs first: they train on the whole train split the demo indexes)."""
    import glob

    from tf_retrieval.train import load_run

    if args.finetuned:
        return load_run(args.finetuned)[1]
    candidates = []
    for path in glob.glob(os.path.join(_workdir(args), "runs", "*", "model.json")):
        try:
            train_config, model_config = load_run(os.path.dirname(path))
        except (ValueError, OSError):
            continue
        if train_config.protocol.startswith("cifar10") and not train_config.hash_bits:
            candidates.append((train_config.protocol == "cifar10-2", os.path.getmtime(path), model_config))
    return max(candidates, key=lambda c: c[:2])[2] if candidates else None


def cmd_demo(args: argparse.Namespace) -> None:
    """Builds (once) a baseline CIFAR-10 index, answers a query with a test image, then serves the search page.

    When a fine-tuned CIFAR-10 model exists (`tfr train`; or --finetuned RUN), it is indexed too and the page offers both.
    """
    from tf_retrieval.data import load_tfds

    config = _model_config(args)
    database = load_tfds("cifar10", data_dir=args.data_dir, splits=["train"])
    database = database.subset(np.arange(min(args.limit, len(database))))
    engines = {config.name: _demo_engine(args, config, os.path.join(_workdir(args), "indexes", f"demo-{config.name}"),
                                         database)}
    finetuned = None if args.baseline_only else _finetuned_run(args)
    if finetuned is not None:
        engines[finetuned.name] = _demo_engine(args, finetuned, os.path.join(_workdir(args), "indexes",
                                                                             f"demo-{finetuned.name}"), database)
    queries = load_tfds("cifar10", data_dir=args.data_dir, splits=["test"])
    position = int(np.random.default_rng(args.seed).integers(len(queries)))
    print(f"query: CIFAR-10 test image {queries.ids[position]} (class {queries.class_names[queries.labels[position]]})")
    for name, engine in engines.items():
        results = engine.search_images([queries.read_bytes(position)], args.k)[0]
        hits = sum(r.label == queries.labels[position] for r in results)
        print(f"{name}: {hits}/{len(results)} neighbours share the query's class")
        for rank, result in enumerate(results, 1):
            print(f"  {rank:3d}. {result.score:7.4f}  {result.class_name:<12s} {result.id}")
    if args.no_web:
        return
    try:
        from web.app import create_app, serve
    except ImportError as exc:
        raise ImportError(f"the search page needs the web extra: pip install 'tf_retrieval[web]' ({exc})") from None
    print(f"search page: http://{args.host}:{args.port}/  (Ctrl-C to stop)")
    serve(create_app(engines, warmup=True), host=args.host, port=args.port)


def cmd_export(args: argparse.Namespace) -> None:
    """Exports the embedding model as a SavedModel for TF Serving: <base-dir>/<name>/<version>/."""
    from tf_retrieval.embedder import build_model
    from tf_retrieval.export import export_model

    config = _model_config(args)
    base_dir = args.base_dir or os.path.join(_workdir(args), "models")
    path = export_model(build_model(config), base_dir, args.name or config.name, image_size=config.image_size,
                        version=args.version, config=config.to_dict())
    print(f"exported {config.model_id()} -> {path}")
    print(f"serve it: tfr serve --model-base-path {base_dir}   (or tensorflow/serving with MODEL_NAME={args.name or config.name})")


def cmd_serve(args: argparse.Namespace) -> None:
    """Serves exported models over gRPC with TF Serving's protocol (Ctrl-C or SIGTERM stops it gracefully)."""
    from serving.server import main as serve_main

    argv = ["--model_base_path", args.model_base_path or os.path.join(_workdir(args), "models"), "--port", str(args.port),
            "--host", args.host, "--file_system_poll_wait_seconds", str(args.poll_seconds),
            "--max_workers", str(args.max_workers), "--max_batch_size", str(args.max_batch_size)]
    if args.model_name:
        argv += ["--model_name", args.model_name]
    if serve_main(argv) != 0:
        raise ValueError("the server could not start (see above)")


def cmd_web(args: argparse.Namespace) -> None:
    """Serves the search page and its JSON API over index bundles (one model each), with waitress."""
    from tf_retrieval.engine import RetrievalEngine

    try:
        from web.app import create_app, serve
    except ImportError as exc:
        raise ImportError(f"the search page needs the web extra: pip install 'tf_retrieval[web]' ({exc})") from None
    engines = {}
    for name in args.index:
        embedder = None
        if args.server:  # queries embedded by TF Serving (or `tfr serve`), under the bundle's model name
            from serving.client import EmbeddingClient

            embedder = EmbeddingClient(args.server, ModelConfig.load(os.path.join(_bundle_dir(args, name), "model.json")).name)
        engine = RetrievalEngine.load(_bundle_dir(args, name), embedder=embedder, data_dir=args.data_dir)
        if engine.name in engines:
            raise ValueError(f"two bundles hold the model {engine.name!r}; each model may appear once")
        engines[engine.name] = engine
        print(f"{engine.name}: {len(engine):,} images from {_bundle_dir(args, name)}")
    print(f"search page: http://{args.host}:{args.port}/  (Ctrl-C to stop)")
    serve(create_app(engines, max_upload_mb=args.max_upload_mb, warmup=True), host=args.host, port=args.port,
          threads=args.threads)


_TRAIN_FIELD_TYPES = {"hash_bits": int, "train_from": str, "source": str, "weights": str}


def _add_train_args(parser: argparse.ArgumentParser) -> None:
    """One flag per `TrainConfig` field (`--embedding-dim`, `--margin`, ...), all optional: they override --config."""
    import dataclasses

    from tf_retrieval.config import TrainConfig

    group = parser.add_argument_group("training (override --config; defaults from TrainConfig)")
    for field in dataclasses.fields(TrainConfig):
        kind = _TRAIN_FIELD_TYPES.get(field.name, type(field.default))
        group.add_argument("--" + field.name.replace("_", "-"), dest=f"train_{field.name}", type=kind,
                           metavar=field.name.upper(), help=f"default {field.default}")


def _train_config(args: argparse.Namespace):
    """The `TrainConfig` of --config (if any) with the training flags applied; checks the protocol name."""
    from tf_retrieval.config import TrainConfig
    from tf_retrieval.protocols import dataset_family

    values = TrainConfig.load(args.config).to_dict() if args.config else {}
    values.update({k[len("train_"):]: v for k, v in vars(args).items() if k.startswith("train_") and v is not None})
    for field in ("weights", "train_from", "source"):
        if isinstance(values.get(field), str) and values[field].lower() == "none":
            values[field] = None
    config = TrainConfig.from_dict(values)
    dataset_family(config.protocol)  # unknown protocol: a clear error before anything loads
    return config


def cmd_train(args: argparse.Namespace) -> None:
    """Fine-tunes on a protocol's training set (cached backbone outputs) and writes a run directory."""
    from tf_retrieval.train import train

    config = _train_config(args)
    run_dir = args.run_dir or os.path.join(_workdir(args), "runs", f"{config.name}-{config.protocol}")
    result = train(config, run_dir, workdir=_workdir(args), verbose=2 if args.progress else 0)
    print(f"trained {config.name} on {config.protocol} in {result.seconds:.0f} s ({result.epochs} epochs): "
          f"best validation MAP@R {result.best_map_at_r:.4f}")
    print(f"run: {run_dir}; model config: {os.path.join(run_dir, 'model.json')}")
    print(f"next: tfr compare {run_dir}   |   tfr index --model-config {os.path.join(run_dir, 'model.json')} ...")


def cmd_tune(args: argparse.Namespace) -> None:
    """Searches embedding size, margin, learning rate, mining and hidden width (keras-tuner) on a protocol's training
    set (cached backbone outputs); writes the best TrainConfig, a trial table and a plot with each size's index cost.
    Resumable: run it again with the same --out to finish or extend (--trials) the search."""
    try:
        from tuning.tune import tune
    except ImportError as exc:
        raise ImportError(f"tfr tune needs keras-tuner and matplotlib: pip install 'tf_retrieval[tuning,plots]' ({exc})")
    from tf_retrieval.protocols import load_protocol
    from tf_retrieval.train import cache_inputs

    config = _train_config(args)
    if args.trials < 1:
        raise ValueError(f"--trials must be positive, got {args.trials}")
    out = args.out or os.path.join(_workdir(args), "tuning", f"{config.name}-{config.protocol}")
    protocol = load_protocol(config.protocol, config.source)
    inputs = cache_inputs(config, protocol.collection, workdir=_workdir(args))
    labels = protocol.collection.labels
    quiet = [] if args.progress or args.verbose else [logging.getLogger(n) for n in ("tf_retrieval.train",
                                                                                      "tf_retrieval.index")]
    levels = [q.level for q in quiet]
    for q in quiet:  # one line per trial, not per epoch
        q.setLevel(logging.WARNING)
    try:
        result = tune(config, inputs[protocol.train], labels[protocol.train], out, trials=args.trials,
                      algorithm=args.algorithm, database_size=len(protocol.database), index_backend=args.index_backend,
                      overwrite=args.overwrite, verbose=2 if args.progress else 0,
                      title=f"{protocol.summary()} ({config.backbone}, {config.image_size} px)")
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    best = result.best_config
    print(f"best of {len(result.trials)} trials: validation MAP@R {result.best_score:.4f} with embedding_dim "
          f"{best.embedding_dim}, hidden_dim {best.hidden_dim}, {best.mining}, margin {best.margin}, "
          f"learning_rate {best.learning_rate:.2e}")
    print(f"table: {result.table_path}; plot: {result.plot_path}")
    print(f"next: tfr train --config {result.config_path}")


def cmd_compare(args: argparse.Namespace) -> None:
    """Scores baseline and fine-tuned models of training runs; writes report.md, report.json and figures."""
    from tf_retrieval.compare import compare
    from tf_retrieval.evaluate import merge_records

    command = "tfr " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    records = compare(args.runs, args.out, workdir=_workdir(args), command=command, expand=args.expand,
                      alpha=args.alpha, label=args.label)
    print(f"report: {os.path.join(args.out, 'report.md')} ({len(records)} records)")
    if args.records:
        merge_records(args.records, records)
        print(f"records written to {args.records}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tfr", description="tf_retrieval: content-based image retrieval.")
    parser.add_argument("--workdir", help="artefacts directory (default: $TFR_WORKDIR or ./artifacts)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    embed = commands.add_parser("embed", help="embed a collection to a .npy file", description=cmd_embed.__doc__)
    _add_data_args(embed)
    _add_model_args(embed)
    embed.add_argument("--out", required=True, help="output .npy file")
    embed.add_argument("--server", help="embed through a TF Serving gRPC server at HOST:PORT instead of in process")
    embed.add_argument("--server-model", help="model name on the server (default: the model name)")
    embed.add_argument("--batch-size", type=int, default=64)
    embed.set_defaults(run=cmd_embed)

    index = commands.add_parser("index", help="build an index bundle of a collection, or add / remove images",
                                description=cmd_index.__doc__)
    _add_data_args(index, required=False)
    _add_model_args(index)
    index.add_argument("--name", help="bundle name under <workdir>/indexes, or a bundle directory for --add / --delete "
                                      "(default: the model name)")
    index.add_argument("--metric", default="cosine", choices=("cosine", "euclidean", "dot", "pearson"))
    index.add_argument("--backend", default="auto", choices=("auto", "exact", "scann"))
    index.add_argument("--target-recall", type=float,
                       help="ScaNN: the recall@10 its automatic settings aim at, e.g. 0.9 (faster) or 0.99 "
                            "(see tf_retrieval.index.scann_params); default: its own settings")
    index.add_argument("--add", metavar="FOLDER",
                       help="add the images of FOLDER that the bundle --name does not hold yet (embedded with the "
                            "bundle's own model), without rebuilding it")
    index.add_argument("--delete", nargs="+", metavar="ID",
                       help="remove these image ids (as `tfr search` prints them) from the bundle --name, without "
                            "rebuilding it")
    index.add_argument("--batch-size", type=int, default=64)
    index.set_defaults(run=cmd_index)

    dedup = commands.add_parser("dedup", help="near-duplicate groups of an indexed collection",
                                description=cmd_dedup.__doc__)
    dedup.add_argument("--index", required=True, help="bundle name under <workdir>/indexes, or a bundle directory")
    dedup.add_argument("--threshold", type=float, default=0.95,
                       help="minimum similarity of a duplicate pair (default 0.95; cosine for the default metric)")
    dedup.add_argument("-k", type=int, default=10, help="neighbours fetched per image at first (more where needed)")
    dedup.add_argument("--out", help="also write the groups to this JSON file")
    dedup.add_argument("--data-dir", help="tfds data directory of the indexed collection")
    dedup.set_defaults(run=cmd_dedup)

    search = commands.add_parser("search", help="query an index with images", description=cmd_search.__doc__)
    search.add_argument("images", nargs="+", help="query image files or folders of images")
    search.add_argument("--index", required=True, help="bundle name under <workdir>/indexes, or a bundle directory")
    search.add_argument("-k", type=int, default=10, help="results per query")
    search.add_argument("--threshold", type=float, help="minimum similarity score")
    search.add_argument("--data-dir", help="tfds data directory of the indexed collection")
    search.add_argument("--server", help="embed queries through a TF Serving gRPC server at HOST:PORT")
    search.add_argument("--server-model", default="baseline", help="model name on the server")
    search.set_defaults(run=cmd_search)

    evaluate = commands.add_parser("evaluate", help="score an evaluation protocol", description=cmd_evaluate.__doc__)
    evaluate.add_argument("--protocol", required=True,
                          choices=("cifar10-2", "cifar10-1", "cifar10-unseen", "flowers-official", "flowers-disjoint"))
    evaluate.add_argument("--dataset", help="collection to use (default: tfds cifar10 / oxford_flowers102); e.g. a folder")
    evaluate.add_argument("--data-dir", help="tfds data directory")
    _add_model_args(evaluate)
    evaluate.add_argument("--pca-dim", type=int, help="reduce embeddings with PCA fitted on the database")
    evaluate.add_argument("--metric", default="cosine", choices=("cosine", "euclidean", "dot", "pearson"))
    evaluate.add_argument("--records", help="append the record to this JSON list (e.g. benchmarks/results/retrieval.json)")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.set_defaults(run=cmd_evaluate)

    demo = commands.add_parser("demo", help="index CIFAR-10, answer a query, serve the page", description=cmd_demo.__doc__)
    _add_model_args(demo)
    demo.add_argument("--data-dir", help="tfds data directory")
    demo.add_argument("--limit", type=int, default=10000, help="database images from the CIFAR-10 train split")
    demo.add_argument("-k", type=int, default=10)
    demo.add_argument("--seed", type=int, default=0, help="picks the query test image")
    demo.add_argument("--batch-size", type=int, default=64)
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8080)
    demo.add_argument("--no-web", action="store_true", help="stop after the query instead of serving the page")
    demo.add_argument("--finetuned", help="a training run to index beside the baseline (default: the newest CIFAR-10 run)")
    demo.add_argument("--baseline-only", action="store_true", help="do not index a fine-tuned model")
    demo.set_defaults(run=cmd_demo)

    export = commands.add_parser("export", help="export the embedder as a SavedModel for TF Serving",
                                 description=cmd_export.__doc__)
    _add_model_args(export)
    export.add_argument("--base-dir", help="model base path (default <workdir>/models)")
    export.add_argument("--name", help="served model name (default: the model name)")
    export.add_argument("--version", type=int, help="integer version (default: the next one)")
    export.set_defaults(run=cmd_export)

    serve = commands.add_parser("serve", help="serve exported models over gRPC (TF Serving protocol)",
                                description=cmd_serve.__doc__)
    serve.add_argument("--model-base-path", help="a model directory or a directory of models (default <workdir>/models)")
    serve.add_argument("--model-name", help="served name when the base path is one model's directory")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8500)
    serve.add_argument("--poll-seconds", type=float, default=2.0, help="how often new versions are looked for")
    serve.add_argument("--max-workers", type=int, default=8)
    serve.add_argument("--max-batch-size", type=int, default=1024)
    serve.set_defaults(run=cmd_serve)

    web = commands.add_parser("web", help="serve the search page", description=cmd_web.__doc__)
    web.add_argument("--index", action="append", required=True,
                     help="bundle name under <workdir>/indexes, or a bundle directory (repeat for several models)")
    web.add_argument("--server", help="embed queries through TF Serving at HOST:PORT (default: in process)")
    web.add_argument("--data-dir", help="tfds data directory of the indexed collections")
    web.add_argument("--host", default="127.0.0.1")
    web.add_argument("--port", type=int, default=8080)
    web.add_argument("--threads", type=int, default=8)
    web.add_argument("--max-upload-mb", type=float, default=10.0)
    web.set_defaults(run=cmd_web)

    train = commands.add_parser("train", help="fine-tune with a triplet loss on cached features",
                                description=cmd_train.__doc__)
    train.add_argument("--config", help="a TrainConfig JSON file (e.g. the best one `tfr tune` wrote)")
    train.add_argument("--run-dir", help="output directory (default <workdir>/runs/<name>-<protocol>)")
    train.add_argument("--progress", action="store_true", help="print one line per epoch")
    _add_train_args(train)
    train.set_defaults(run=cmd_train)

    tune = commands.add_parser("tune", help="search the head's hyperparameters with keras-tuner",
                               description=cmd_tune.__doc__)
    tune.add_argument("--config", help="a base TrainConfig JSON file (the searched fields are replaced)")
    tune.add_argument("--trials", type=int, default=20, help="number of trials in all (default 20)")
    tune.add_argument("--algorithm", default="bayesian", choices=("bayesian", "random", "hyperband"))
    tune.add_argument("--out", help="output directory (default <workdir>/tuning/<name>-<protocol>)")
    tune.add_argument("--index-backend", default="auto", choices=("auto", "exact", "scann"),
                      help="index whose memory and latency are measured per embedding size")
    tune.add_argument("--overwrite", action="store_true", help="discard an earlier search in --out instead of resuming")
    tune.add_argument("--progress", action="store_true", help="also print Keras' per-epoch lines")
    _add_train_args(tune)
    tune.set_defaults(run=cmd_tune)

    compare = commands.add_parser("compare", help="baseline vs fine-tuned report", description=cmd_compare.__doc__)
    compare.add_argument("runs", nargs="+", help="training run directories (from tfr train)")
    compare.add_argument("--out", default="reports/compare", help="report directory (default reports/compare)")
    compare.add_argument("--records", help="also merge the records into this JSON list (benchmarks/results/retrieval.json)")
    compare.add_argument("--expand", type=int, default=5, help="α query expansion over the top-k (0: off)")
    compare.add_argument("--alpha", type=float, default=3.0)
    compare.add_argument("--label", default="finetuned", help="model name of the trained runs in the records "
                         "(e.g. 'tuned' for a configuration from tfr tune)")
    compare.set_defaults(run=cmd_compare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `tfr`; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # tfds logs every dataset it opens through absl
        logging.getLogger("absl").setLevel(logging.WARNING)
    if not args.verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        args.run(args)
    except KeyboardInterrupt:
        print("tfr: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, ImportError, KeyError, IndexError) as exc:
        if args.verbose:
            raise
        message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"tfr: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
