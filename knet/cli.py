"""The ``knet`` command line. Every subcommand reads ``params.yaml`` and takes ``--set`` overrides.

Subcommands arrive with the stages they run; today: ``knet config``, ``knet model`` and
``knet data {synth,validate,prepare}``, ``knet train``, ``knet tune``, ``knet evaluate``,
``knet predict``, ``knet promote`` and ``knet lineage``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import yaml

from knet.config import Config, ConfigError, load_config
from knet.data import DataError
from knet.io import dumps


def _add_params_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--params", default="params.yaml", help="flat params file (default: %(default)s)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override dotted keys, e.g. --set model.num_stages=4 train.epochs=2 "
        "(several after one --set, or --set repeated)",
    )


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.params, args.overrides)


def cmd_config_show(args: argparse.Namespace) -> int:
    cfg = _config(args)
    print(f"# resolved from {args.params} (digest {cfg.digest()})")
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


def cmd_model_summary(args: argparse.Namespace) -> int:
    from knet.model import build_model

    cfg = _config(args)
    model = build_model(cfg.model, args.num_things, args.num_stuff)
    counts = model.parameter_counts()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    classes = f"{args.num_things} thing classes"
    if cfg.model.task != "instance":
        classes += f" + {args.num_stuff} stuff classes"
    m = cfg.model
    print(
        f"K-Net {m.task}, ResNet-{m.backbone.depth}, {classes}, "
        f"{m.num_kernels} kernels, {m.num_stages} rounds; kernel updater {m.kernel_updater}, "
        f"kernel interaction {'on' if m.kernel_interaction else 'off'}, "
        f"positional encoding {m.positional_encoding}"
    )
    width = max(map(len, counts))
    for name, value in counts.items():
        print(f"  {name:<{width}}  {value:>12,}")
    print(f"  {'trainable':<{width}}  {trainable:>12,}")
    if args.variants:
        from knet.model import variant_parameter_counts

        rows = variant_parameter_counts(m, args.num_things, args.num_stuff)
        base = rows[0][1]
        width = max(len(name) for name, _ in rows)
        print("Table 4 variants (one switch changed from this config):")
        print(f"  {'variant':<{width}}  {'parameters':>12}  {'vs this config':>14}")
        for name, value in rows:
            print(f"  {name:<{width}}  {value:>12,}  {value - base:>+14,}")
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from knet.data.synth import generate

    cfg = _config(args)
    out = args.out or cfg.data.synth.out
    summary = generate(out, cfg.data.synth, cfg.data, progress=not args.quiet)
    print(f"wrote the synthetic dataset to {out}: {dumps(summary)}")
    return 0


def cmd_data_nuclei(args: argparse.Namespace) -> int:
    from knet.data.nuclei import generate_nuclei

    cfg = _config(args)
    summary = generate_nuclei(args.out, cfg.data)
    print(f"wrote the nuclei dataset to {args.out}: {dumps(summary)}")
    return 0


def cmd_data_validate(args: argparse.Namespace) -> int:
    from knet.data.layout import dataset_paths
    from knet.data.validate import validate_split

    cfg = _config(args)
    splits = [cfg.data.train_split, cfg.data.val_split] if args.split == "all" else [args.split]
    failed = False
    for split in splits:
        paths = dataset_paths(cfg.data, split, args.root)
        report = validate_split(
            paths, cfg.data.format, progress=not args.quiet, ignore_values=cfg.data.semantic_ignore
        )
        print(f"== {cfg.data.format} split {split!r} at {paths.root}")
        print(report.summary())
        failed |= not report.ok
    if failed and args.strict:
        return 1
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from knet.data.prepare import EmptyDatasetError, prepare, scale_advice
    from knet.data.validate import DatasetValidationError

    cfg = _config(args)
    try:
        manifest = prepare(cfg.data, args.out, strict=args.strict, progress=not args.quiet)
    except EmptyDatasetError as err:
        print(f"knet: prepare refused {cfg.data.raw}: {err}", file=sys.stderr)
        return 1
    except DatasetValidationError as err:
        print(
            f"knet: prepare refused {cfg.data.raw} (nothing was written; --lenient skips "
            f"bad items):\n{err}",
            file=sys.stderr,
        )
        return 1
    out = args.out or cfg.data.prepared
    for split, info in manifest.splits.items():
        seconds = manifest.seconds.get(split, 0.0)
        rate = f"{info['images'] / seconds:.1f} img/s" if seconds else "-"
        print(
            f"{split}: {info['images']} images, {info['segments']} segments, "
            f"{len(info['skipped'])} problems skipped, {rate}"
        )
    print(f"wrote {out} (content hash {manifest.content_hash[:12]})")
    advice = scale_advice(manifest.splits[cfg.data.train_split], cfg.data.test_size)
    if advice:
        print(f"knet: warning: {advice}", file=sys.stderr)
    return 0


def _tracking_uri(args: argparse.Namespace, cfg: Config | None = None) -> str:
    """``--tracking-uri``, else ``tracking.uri`` of the params (relative sqlite paths from here)."""
    from knet.config import resolve_uri

    if getattr(args, "tracking_uri", None):
        return args.tracking_uri
    if cfg is None:
        cfg = load_config("params.yaml" if Path("params.yaml").exists() else None)
    return resolve_uri(cfg.tracking.uri, Path.cwd())


def _registered(args: argparse.Namespace, cfg: Config | None = None):
    """((model, config, categories), its ModelVersion) of ``--model models:/...``, or None."""
    if not args.model:
        return None
    from knet.experiments.registry import load_registered

    model, trained, categories, version = load_registered(
        args.model, _tracking_uri(args, cfg), args.device
    )
    print(f"{args.model}: {version.name} version {version.version}", file=sys.stderr)
    return (model, trained, categories), version


def cmd_evaluate(args: argparse.Namespace) -> int:
    from knet.evaluation.evaluate import evaluate_checkpoint

    registered = _registered(args, _config(args))
    evaluation = evaluate_checkpoint(
        args.checkpoint,
        args.params,
        args.overrides,
        split=args.split,
        out=args.out,
        metrics_file=args.metrics,
        kernel_maps=args.kernel_maps,
        progress=not args.quiet,
        device=args.device,
        max_images=args.max_images,
        loaded=registered[0] if registered else None,
        source=args.model,
    )
    print(dumps(evaluation.metrics, indent=2))
    if evaluation.run_id:
        print(f"MLflow run: {evaluation.run_id}", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from knet.evaluation.export import export_checkpoint

    result = export_checkpoint(args.checkpoint, args.out)
    print(
        f"wrote {result.path}: torch.export program of {args.checkpoint} (dynamic batch, sides "
        f"multiples of 32); max |exported - eager| on a {list(result.checked_shape)} batch: "
        f"{result.max_abs_difference:.2e}"
    )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from knet.evaluation.predict import predict_checkpoint

    # --set takes several items, as on every command; what follows it without '=' is an input.
    args.inputs = [*args.inputs, *(o for o in args.overrides if "=" not in o)]
    args.overrides = [o for o in args.overrides if "=" in o]
    if not args.inputs:
        raise ConfigError("knet predict needs at least one IMAGE_OR_FOLDER")

    registered = _registered(args)
    summary = predict_checkpoint(
        args.inputs,
        args.checkpoint,
        args.out,
        task=args.task,
        params=args.params,
        overrides=args.overrides,
        device=args.device,
        progress=not args.quiet,
        loaded=registered[0] if registered else None,
        source=args.model,
        parent_run_id=registered[1].run_id if registered else None,
    )
    print(
        f"wrote {len(summary.written)} overlay PNGs and segment JSONs to {args.out}; "
        f"{len(summary.failed)} failed"
        + (f"; MLflow run {summary.run_id}" if summary.run_id else "")
    )
    for _, reason in summary.failed:
        print(f"  failed: {reason}", file=sys.stderr)
    return 1 if summary.failed else 0


def cmd_train(args: argparse.Namespace) -> int:
    from knet.training import train

    result = train(
        _config(args), run_name=args.run_name, address=args.address, progress=not args.quiet
    )
    shown = {k: v for k, v in result.final.items() if k.startswith("val_") or k == "loss"}
    print(f"run {result.run_name}: {result.epochs} epochs in {result.seconds} s")
    print(dumps(shown, indent=2))
    print(f"final checkpoint: {result.checkpoint}")
    hosts = result.worker_hosts
    speeds = result.worker_images_per_s or [None] * len(hosts)
    if hosts:  # the last worker group: where each rank ran, and its mean images/s
        workers = (
            f"{h} ({v} img/s)" if v is not None else h for h, v in zip(hosts, speeds, strict=True)
        )
        print(f"workers: {', '.join(workers)}")
    if result.mlflow_run_id:
        print(f"MLflow run: {result.mlflow_run_id}")
    return 0


def _pool_sweeps(cfg, files: list[str]) -> int:
    from knet.experiments.tune import pool

    pooled = pool(cfg, files)
    print(Path(pooled.reports["md"]).read_text())
    print(f"pooled {len(pooled.rows)} trials of {len(pooled.sources)} sweeps")
    for kind, path in pooled.reports.items():
        print(f"  {kind}: {path}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from knet.experiments.ablation import format_value
    from knet.experiments.tune import command_line_sweep, tune

    cfg, notes = command_line_sweep(_config(args), args.overrides, args.grid)
    for note in notes:
        print(note)
    if args.pool:
        return _pool_sweeps(cfg, args.pool)
    sweep = tune(cfg, address=args.address)
    print(Path(sweep.reports["md"]).read_text())
    print(f"sweep {sweep.name}: {len(sweep.rows)} trials in {sweep.seconds} s")
    for kind, path in sweep.reports.items():
        print(f"  {kind}: {path}")
    best = sweep.best
    if best:
        point = ", ".join(f"{k}={format_value(best.get(k))}" for k in sweep.axes)
        print(
            f"best trial {best['trial_id']} ({point}, seed {best['seed']}): "
            f"{sweep.metric} {best['value']:.2f}; checkpoint {best['checkpoint']}"
        )
    if sweep.parent_run_id:
        print(f"MLflow parent run: {sweep.parent_run_id}")
    if sweep.failed:
        print(
            f"knet: {sweep.failed} trial(s) failed (see the report); rerun the same "
            f"command to retry them, finished trials are kept",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from knet.experiments.registry import promote

    record = promote(_config(args), run_id=args.run_id, checkpoint=args.checkpoint)
    metric, challenger, before = record.metric, record.challenger, record.champion_before
    print(f"{record.model} version {record.version}: {metric} {challenger[metric]:.2f}")
    if before:
        print(f"champion before: version {before['version']}: {metric} {before[metric]:.2f}")
    print(f"decision: {record.decision} ({record.reason})")
    print(f"champion: version {record.champion}  (models:/{record.model}@champion)")
    timings = ", ".join(f"{k} {v:.2f}" for k, v in record.timings.items())
    print(f"timings (s): {timings}")
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    from knet.experiments.registry import lineage

    info = lineage(args.uri, args.tracking_uri or _tracking_uri(args, _config(args)))
    print(f"{info.uri} -> {info.model} version {info.version} {info.aliases}")
    print(f"  run:        {info.run_id} ({info.run_name})")
    print(f"  params:     hash {info.params_hash}  {dumps(info.params)}")
    print(f"  data:       {info.data_hash}")
    print(f"  git commit: {info.git_commit} (dirty: {info.git_dirty})")
    shown = ", ".join(f"{k} {v:.2f}" for k, v in sorted(info.metrics.items()))
    print(f"  metrics:    {shown}")
    print(f"  validation: {info.validation}")
    print("  reproduce:")
    for line in info.reproduce:
        print(f"    {line}")
    return 0


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", help="a registered model instead: models:/NAME@ALIAS or models:/NAME/VERSION"
    )
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI for --model (default: tracking.uri)"
    )


def _device(text: str) -> str:
    """An argparse type: a torch device this machine has (a usage error otherwise)."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA devices")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: knet runs on cpu or cuda")
    return text


def _positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (argparse turns the error into a usage line, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1; got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="knet",
        description="K-Net for semantic, instance and panoptic segmentation.",
        epilog="Every command has an example: knet COMMAND [ACTION] --help.",
    )
    parser.add_argument("--version", action="version", version=f"knet {_version()}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of an error (also KNET_DEBUG=1); by default one line",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_inspect_commands(commands)
    _add_data_commands(commands)
    _add_training_commands(commands)
    _add_registry_commands(commands)
    _add_model_use_commands(commands)
    _describe(parser)
    return parser


def _add_inspect_commands(commands) -> None:
    """``knet config show``, ``knet model summary``."""
    config = commands.add_parser("config", help="inspect the configuration")
    config_cmds = config.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = config_cmds.add_parser("show", help="validate params and print the resolved config")
    _add_params_args(show)
    show.set_defaults(func=cmd_config_show)

    model = commands.add_parser("model", help="inspect the model")
    model_cmds = model.add_subparsers(dest="action", required=True, metavar="ACTION")
    summary = model_cmds.add_parser("summary", help="parameter counts per component")
    _add_params_args(summary)
    summary.add_argument(
        "--num-things", type=int, default=80, help="thing classes (default: %(default)s, COCO)"
    )
    summary.add_argument(
        "--num-stuff", type=int, default=53, help="stuff classes (default: %(default)s, COCO)"
    )
    summary.add_argument(
        "--variants",
        action="store_true",
        help="also the total of every Table-4 variant (kernel updater, interaction, PE)",
    )
    summary.set_defaults(func=cmd_model_summary)


def _add_data_commands(commands) -> None:
    """``knet data synth|nuclei|validate|prepare``."""
    data = commands.add_parser("data", help="synthesise, validate and prepare datasets")
    data_cmds = data.add_subparsers(dest="action", required=True, metavar="ACTION")
    synth = data_cmds.add_parser("synth", help="write the synthetic panoptic dataset")
    _add_params_args(synth)
    synth.add_argument("--out", help="output folder (default: data.synth.out)")
    synth.add_argument("--quiet", action="store_true", help="no progress bar")
    synth.set_defaults(func=cmd_data_synth)
    nuclei = data_cmds.add_parser(
        "nuclei",
        help="write the real-image preset: StarDist's packaged nuclei micrograph as COCO instances",
    )
    _add_params_args(nuclei)
    nuclei.add_argument(
        "--out", default="data/raw/nuclei", help="output folder (default: data/raw/nuclei)"
    )
    nuclei.set_defaults(func=cmd_data_nuclei)

    validate = data_cmds.add_parser(
        "validate", help="check every image and annotation; report all problems"
    )
    _add_params_args(validate)
    validate.add_argument("--root", help="dataset root (default: data.raw)")
    validate.add_argument(
        "--split",
        default="all",
        help="split name, or 'all' for train and val (default: %(default)s)",
    )
    mode = validate.add_mutually_exclusive_group()
    mode.add_argument(
        "--strict",
        dest="strict",
        action="store_true",
        default=True,
        help="exit 1 when there are errors (default)",
    )
    mode.add_argument("--lenient", dest="strict", action="store_false", help="report, but exit 0")
    validate.add_argument("--quiet", action="store_true", help="no progress bar")
    validate.set_defaults(func=cmd_data_validate)

    prep = data_cmds.add_parser("prepare", help="validate and index the raw dataset")
    _add_params_args(prep)
    prep.add_argument("--out", help="output folder (default: data.prepared)")
    mode = prep.add_mutually_exclusive_group()
    mode.add_argument(
        "--strict",
        dest="strict",
        action="store_true",
        default=True,
        help="refuse a dataset with errors, writing nothing (default)",
    )
    mode.add_argument(
        "--lenient",
        dest="strict",
        action="store_false",
        help="skip images with errors and record them in the manifest",
    )
    prep.add_argument("--quiet", action="store_true", help="no progress bars")
    prep.set_defaults(func=cmd_data_prepare)


def _add_training_commands(commands) -> None:
    """``knet train``, ``knet tune``."""
    train = commands.add_parser("train", help="train on Ray Train (resumes a run of the same name)")
    _add_params_args(train)
    train.add_argument(
        "--address", help="Ray cluster to join: auto or HOST:PORT (default: start a local instance)"
    )
    train.add_argument(
        "--run-name",
        help="run name (default: train.run_name, else derived from the params, so reruns resume)",
    )
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(func=cmd_train)

    tune = commands.add_parser(
        "tune",
        help="Ray Tune ablation of Table 4 (the params' sweep; restores a sweep of the same name)",
    )
    _add_params_args(tune)
    tune.add_argument(
        "--address", help="Ray cluster to join: auto or HOST:PORT (default: start a local instance)"
    )
    tune.add_argument(
        "--grid",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=V1,V2",
        help="sweep every combination of these keys' values instead of the params' tune.grid "
        "(--set tune.design=one_at_a_time to vary one key at a time), e.g. --grid "
        "model.num_stages=1,2,3 model.kernel_interaction=true,false",
    )
    tune.add_argument(
        "--pool",
        nargs="+",
        default=[],
        metavar="CSV",
        help="train nothing: one report (tune.report_dir) over the trials of finished sweeps of "
        "this grid, read from their ablation.csv, e.g. seeds 0-2 and a sweep with "
        "--set train.seed=3 tune.seeds=5",
    )
    tune.set_defaults(func=cmd_tune)


def _add_registry_commands(commands) -> None:
    """``knet promote``, ``knet lineage``."""
    promote = commands.add_parser(
        "promote",
        help="register a model, alias it challenger, move champion if it is better",
    )
    _add_params_args(promote)
    source = promote.add_mutually_exclusive_group()
    source.add_argument("--run-id", help="an MLflow training run (its checkpoint artifact)")
    source.add_argument("--checkpoint", help="a checkpoint file (default: train.output)")
    promote.set_defaults(func=cmd_promote)

    lin = commands.add_parser(
        "lineage", help="a registered version's run, params, data hash, commit and metrics"
    )
    lin.add_argument("uri", help="models:/NAME@ALIAS or models:/NAME/VERSION")
    _add_params_args(lin)
    lin.add_argument("--tracking-uri", help="MLflow tracking URI (default: tracking.uri)")
    lin.set_defaults(func=cmd_lineage)


def _add_model_use_commands(commands) -> None:
    """``knet evaluate``, ``knet predict``, ``knet export``."""
    _add_evaluate_command(commands)
    _add_predict_command(commands)
    export = commands.add_parser("export", help="the model as a torch.export program (.pt2)")
    export.add_argument(
        "--checkpoint",
        default="outputs/train/model.pt",
        help="a knet checkpoint (default: %(default)s)",
    )
    export.add_argument(
        "--out", default="outputs/export/knet.pt2", help="the .pt2 file (default: %(default)s)"
    )
    export.set_defaults(func=cmd_export)


def _add_evaluate_command(commands) -> None:
    evaluate = commands.add_parser(
        "evaluate", help="PQ / mask AP / mIoU on a prepared split, with prediction files"
    )
    _add_params_args(evaluate)
    evaluate.add_argument("--checkpoint", help="a knet checkpoint (default: evaluate.checkpoint)")
    _add_model_args(evaluate)
    evaluate.add_argument(
        "--split", help="prepared split (default: evaluate.split or data.val_split)"
    )
    evaluate.add_argument("--out", help="prediction files folder (default: evaluate.out)")
    evaluate.add_argument(
        "--metrics",
        help="metrics JSON; the per-class CSV goes beside it (default: evaluate.metrics)",
    )
    evaluate.add_argument(
        "--kernel-maps",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write the mean kernel activations and per-stage masks "
        "(default: evaluate.kernel_maps)",
    )
    evaluate.add_argument(
        "--max-images", type=_positive_int, help="evaluate only the first N images (N >= 1)"
    )
    evaluate.add_argument(
        "--device", default="cpu", type=_device, help="cpu, cuda or cuda:N (default: %(default)s)"
    )
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluate.set_defaults(func=cmd_evaluate)


def _add_predict_command(commands) -> None:
    predict = commands.add_parser("predict", help="overlay pictures and segment JSON")
    predict.add_argument("inputs", nargs="*", metavar="IMAGE_OR_FOLDER")
    predict.add_argument(
        "--params",
        default=None,
        help="params file for sizes and post-processing (default: the "
        "config stored in the checkpoint)",
    )
    predict.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override dotted keys, as on every command (items without '=' after --set are "
        "inputs: knet predict --set a=1 b=2 photo.jpg)",
    )
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a knet checkpoint (.pt)")
    source.add_argument(
        "--model", help="a registered model: models:/NAME@ALIAS or models:/NAME/VERSION"
    )
    predict.add_argument(
        "--tracking-uri", help="MLflow tracking URI for --model (default: tracking.uri)"
    )
    predict.add_argument(
        "--task",
        choices=["panoptic", "instance", "semantic"],
        help="which results (default: the model's task)",
    )
    predict.add_argument(
        "--out", default="outputs/predict", help="output folder (default: %(default)s)"
    )
    predict.add_argument(
        "--device", default="cpu", type=_device, help="cpu, cuda or cuda:N (default: %(default)s)"
    )
    predict.add_argument("--quiet", action="store_true", help="no progress bar")
    predict.set_defaults(func=cmd_predict)


# Each command's --help: a paragraph on what it does, and an example (command path -> text).
COMMAND_HELP: dict[tuple[str, ...], tuple[str, str]] = {
    ("config", "show"): (
        "Load the params file, apply the --set overrides, validate every key and value, and "
        "print the resolved configuration with its digest (the run's params_hash).",
        "knet config show --set model.num_stages=4 train.epochs=2",
    ),
    ("model", "summary"): (
        "Build the model of the params and print its parameters per component; --variants adds "
        "the total of every Table-4 variant (kernel updater, kernel interaction, positional "
        "encoding).",
        "knet model summary --params configs/coco-panoptic-r50.yaml --variants",
    ),
    ("data", "synth"): (
        "Write the synthetic panoptic dataset (COCO panoptic format, train and val) that the "
        "default params train on; refuses a folder that is not empty or knet's own.",
        "knet data synth --out data/raw",
    ),
    ("data", "nuclei"): (
        "Cut the fluorescence micrograph with hand-made nucleus masks that ships inside the "
        "stardist wheel into 117 train and 4 held-out val tiles (COCO instance layout), the "
        "real-image preset of configs/nuclei-instance.yaml.",
        "knet data nuclei && knet data prepare --params configs/nuclei-instance.yaml",
    ),
    ("data", "validate"): (
        "Check every image and annotation of a raw dataset (COCO panoptic, COCO instance or "
        "semantic PNGs) and report all problems with file, image id and segment id; exit 1 on "
        "errors.",
        "knet data validate --split val --strict",
    ),
    ("data", "prepare"): (
        "Validate the raw dataset and write the prepared index that training and evaluation "
        "read (data.prepared), atomically; the DVC stage prepare runs this.",
        "knet data prepare --out data/prepared",
    ),
    ("evaluate",): (
        "Evaluate a checkpoint on a prepared split: PQ, mask AP and mIoU with per-class "
        "tables, prediction files and overlays; writes the DVC metrics file.",
        "knet evaluate --checkpoint outputs/train/model.pt --max-images 20",
    ),
    ("train",): (
        "Train on Ray Train (a local instance, or --address for a cluster), validate, "
        "checkpoint every epoch and log to MLflow; rerunning the same run name resumes it.",
        "knet train --set train.epochs=3 optim.lr_steps=[2] train.seed=1",
    ),
    ("tune",): (
        "Run the ablation as one Ray Tune sweep (the params' tune.grid: rounds, kernels and the "
        "kernel update, each varied around the default model over 3 seeds; any keys with "
        "--grid), "
        "each trial the TorchTrainer of knet train; writes reports/ablation.{md,csv,png} with "
        "95% intervals and the paired comparison, and one MLflow parent run. Rerunning "
        "restores the sweep; --pool joins finished sweeps of other seeds into one report.",
        "knet tune --grid model.kernel_updater=adaptive,none --set tune.seeds=3",
    ),
    ("promote",): (
        "Register a checkpoint (or a training run's) as a version of the registered model, "
        "alias it challenger, evaluate it against the champion and move the champion alias "
        "only if it is better by registry.min_improvement.",
        "knet promote --checkpoint outputs/train/model.pt",
    ),
    ("lineage",): (
        "Print a registered version's training run, params hash, data hash, commit and metrics.",
        "knet lineage models:/knet-panoptic@champion",
    ),
    ("export",): (
        "Export the model of a checkpoint with torch.export: the forward pass (every round's "
        "mask and class logits) for any batch and image sides that are multiples of 32, "
        "checked against eager on a batch of another size. Load it with "
        "torch.export.load(path).module() after import knet.evaluation.export; "
        "post-processing stays in knet.method.postprocess.",
        "knet export --checkpoint outputs/train/model.pt --out outputs/export/knet.pt2",
    ),
    ("predict",): (
        "Segment images or folders with a checkpoint or a registered model: one overlay PNG "
        "and one segment JSON per image.",
        "knet predict photos/ --model models:/knet-panoptic@champion --out outputs/predict",
    ),
}


def _describe(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> None:
    """Give every command in :data:`COMMAND_HELP` its paragraph and example."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                _describe(sub, (*path, name))
    if path in COMMAND_HELP:
        description, example = COMMAND_HELP[path]
        parser.description = textwrap.fill(description, 78)
        parser.epilog = f"example:\n  {example}"
        parser.formatter_class = argparse.RawDescriptionHelpFormatter


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("knet")
    except PackageNotFoundError:  # a source tree without an install
        return "unknown"


def _show_knet_logs() -> None:
    """The library logs through ``logging``; the command line shows knet's INFO messages."""
    logger = logging.getLogger("knet")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _show_knet_logs()
    debug = args.debug or os.environ.get("KNET_DEBUG", "") not in ("", "0")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("knet: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # the one error boundary: one line, no traceback unless asked
        if debug:
            raise
        # Usage, config and input errors (a bad key, a missing file, a refused output) are 2,
        # as argparse's; problems of the data (DataError) and anything else that stopped the
        # command are 1.
        usage = isinstance(err, ConfigError | ValueError | FileNotFoundError | KeyError)
        usage = usage and not isinstance(err, DataError)  # the data given is at fault: 1
        print(f"knet: error: {_one_line(err)}", file=sys.stderr)
        if not usage:
            print("knet: (run with --debug for the traceback)", file=sys.stderr)
        return 2 if usage else 1


def _one_line(err: BaseException) -> str:
    """The error as one line: its message (or its type), newlines folded."""
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, RecursionError):
        text = f"input nested too deeply to read ({text})"
    elif isinstance(err, OSError) and err.filename:
        text = f"{err.strerror or type(err).__name__}: {err.filename}"
    return text if len(text) <= 2000 else text[:2000] + " ..."


if __name__ == "__main__":
    sys.exit(main())
