"""The ``knet`` command line. Every subcommand reads ``params.yaml`` and takes ``--set`` overrides.

Subcommands arrive with the stages they run; today: ``knet config`` and ``knet model``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import yaml

from knet.config import Config, ConfigError, load_config


def _add_params_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--params", default="params.yaml", help="flat params file (default: %(default)s)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a dotted key, e.g. --set model.num_stages=4 (repeatable)",
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
    print(
        f"K-Net {cfg.model.task}, ResNet-{cfg.model.backbone.depth}, {classes}, "
        f"{cfg.model.num_kernels} kernels, {cfg.model.num_stages} rounds"
    )
    width = max(map(len, counts))
    for name, value in counts.items():
        print(f"  {name:<{width}}  {value:>12,}")
    print(f"  {'trainable':<{width}}  {trainable:>12,}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="knet", description="K-Net for semantic, instance and panoptic segmentation."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
    summary.set_defaults(func=cmd_model_summary)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"knet: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
