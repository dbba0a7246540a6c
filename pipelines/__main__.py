"""``python -m pipelines train-knet|ablate-knet [...]``: run a flow here (``make pipeline``).

Without ``PREFECT_API_URL`` Prefect starts an ephemeral API for the run; with it (``make
servers``), the run is recorded on that server. Prints the flow's summary and where to look.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__)
    parser.add_argument("flow", choices=["train-knet", "ablate-knet"])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument(
        "--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE"
    )
    parser.add_argument("--epochs", type=int, help="train.epochs (train-knet)")
    parser.add_argument("--address", help="Ray cluster (default: a local instance)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: tracking.uri)")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    from knet.config import ConfigError, load_config
    from knet.io import dumps

    # A bad params file or --set key is the commonest mistake: one line before any flow starts
    # (the flow checks again, for runs that come through a deployment).
    epochs = [f"train.epochs={args.epochs}"] if args.epochs is not None else []
    try:
        load_config(args.params, [*args.overrides, *epochs])
    except ConfigError as err:
        print(f"python -m pipelines: error: {err}", file=sys.stderr)
        return 2
    from pipelines.flows import ablate_knet, train_knet

    common = dict(
        params=args.params,
        overrides=args.overrides,
        address=args.address,
        tracking_uri=args.tracking_uri,
    )
    start = time.perf_counter()
    if args.flow == "train-knet":
        summary = train_knet(epochs=args.epochs, **common)
    else:
        summary = ablate_knet(**common)
    seconds = time.perf_counter() - start
    print(f"\n== {args.flow} finished in {seconds:.0f} s")
    print(dumps(summary, indent=2, default=str))
    if args.flow == "train-knet":
        champion = "became champion" if summary["decision"] == "promoted" else "was rejected"
        print(
            f"\n{summary['model']} version {summary['version']} {champion} "
            f"({summary['reason']}); champion is version {summary['champion']}.\n"
            f"Overlay pictures: {summary['pictures']}/*.png"
        )
    print(
        "\nLook at it:\n"
        "  MLflow   make mlflow-ui          -> http://127.0.0.1:5000 (runs, Models)\n"
        "  Prefect  make servers            -> http://127.0.0.1:4200 (flow runs, artifacts)\n"
        "  Ray      make servers            -> http://127.0.0.1:8265 (dashboard)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
