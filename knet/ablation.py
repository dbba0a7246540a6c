"""The ablation report of ``knet tune``: one row per trial in, paper-style table and plot out.

Pure functions over plain rows (dicts), no Ray: :func:`cell_stats` groups the trials by
(update rounds, kernels) and takes mean +- std over seeds; :func:`write_reports` writes
``ablation.csv`` (one row per trial), ``ablation.md`` (rows = rounds, columns = kernel counts,
like Table 4 of the paper) and ``ablation.png`` (metric vs rounds and vs kernels, error bars),
each atomically (temporary file, then rename).
"""

from __future__ import annotations

import csv
import io
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The csv's columns, in order; rows may hold more keys (they are ignored).
COLUMNS = (
    "trial_id",
    "status",
    "num_stages",
    "num_kernels",
    "seed",
    "epochs",
    "metric",
    "value",
    "val_pq",
    "val_pq_th",
    "val_pq_st",
    "val_sq",
    "val_rq",
    "val_ap",
    "val_miou",
    "params",
    "images_per_s",
    "epochs_s",
    "trial_s",
    "ray_train_s",
    "setup_s",
    "tracking_s",
    "driver_s",
    "mlflow_run_id",
    "checkpoint",
    "error",
)


# Further metrics shown as tables when the trials reported them (their headline is `metric`).
SECONDARY = ("val_pq", "val_pq_th", "val_pq_st", "val_sq", "val_rq", "val_ap", "val_miou")

# A trial's status: ran all epochs; stopped early by ASHA; failed; interrupted before the end.
STATUSES = ("finished", "stopped", "error", "unfinished")


@dataclass(frozen=True)
class Cell:
    """One (rounds, kernels) cell: the metric over its finished seeds."""

    num_stages: int
    num_kernels: int
    values: tuple[float, ...]
    params: int | None
    images_per_s: float | None
    failed: int
    stopped: int = 0

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0


def cell_stats(
    rows: Sequence[Mapping[str, Any]],
    num_stages: Sequence[int],
    num_kernels: Sequence[int],
    key: str = "value",
) -> dict[tuple[int, int], Cell]:
    """Mean +- std of ``key`` (the sweep's metric by default) per (rounds, kernels) over the
    trials that finished or that the scheduler stopped."""
    cells = {}
    for stages in num_stages:
        for kernels in num_kernels:
            group = [r for r in rows if (r["num_stages"], r["num_kernels"]) == (stages, kernels)]
            done = [
                r for r in group if r["status"] in ("finished", "stopped") and _finite(r.get(key))
            ]
            speeds = [r["images_per_s"] for r in done if _finite(r.get("images_per_s"))]
            params = next((r["params"] for r in group if r.get("params")), None)
            cells[stages, kernels] = Cell(
                num_stages=stages,
                num_kernels=kernels,
                values=tuple(float(r[key]) for r in done),
                params=params,
                images_per_s=statistics.fmean(speeds) if speeds else None,
                failed=sum(r["status"] in ("error", "unfinished") for r in group),
                stopped=sum(r["status"] == "stopped" for r in group),
            )
    return cells


def write_reports(
    rows: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    *,
    metric: str,
    num_stages: Sequence[int],
    num_kernels: Sequence[int],
    header: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``ablation.{csv,md,png}`` under ``out_dir``; returns their paths by suffix."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: (r["num_stages"], r["num_kernels"], r["seed"]))
    cells = cell_stats(rows, num_stages, num_kernels)
    paths = {"csv": out / "ablation.csv", "md": out / "ablation.md", "png": out / "ablation.png"}
    _write_text(paths["csv"], render_csv(rows))
    _write_text(
        paths["md"], render_markdown(rows, cells, metric, num_stages, num_kernels, header or {})
    )
    _write_plot(paths["png"], cells, metric, num_stages, num_kernels)
    return paths


def render_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k)) for k in COLUMNS})
    return buffer.getvalue()


def render_markdown(
    rows: Sequence[Mapping[str, Any]],
    cells: Mapping[tuple[int, int], Cell],
    metric: str,
    num_stages: Sequence[int],
    num_kernels: Sequence[int],
    header: Mapping[str, Any],
) -> str:
    seeds = max((len({r["seed"] for r in rows}), 1))
    lines = ["# K-Net ablation: kernel-update rounds x instance kernels", ""]
    lines += [f"- {key}: {value}" for key, value in header.items()]
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    shown = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    lines += [f"- trials: {len(rows)} ({shown})", ""]

    def table(title: str, grid: Mapping[tuple[int, int], Cell], cell_text) -> None:
        lines.extend([f"## {title}", ""])
        lines.append("| rounds \\ kernels | " + " | ".join(str(k) for k in num_kernels) + " |")
        lines.append("|---:|" + "---:|" * len(num_kernels))
        for stages in num_stages:
            texts = [cell_text(grid[stages, kernels]) for kernels in num_kernels]
            lines.append(f"| {stages} | " + " | ".join(texts) + " |")
        lines.append("")

    spread = f"mean ± std over {seeds} seeds" if seeds > 1 else "1 seed"
    table(f"{metric} at the last epoch ({spread})", cells, _metric_text)
    if counts["stopped"]:
        lines += ["\\* includes trials the scheduler stopped early, at their last epoch.", ""]
    table("Parameters (millions)", cells, lambda c: f"{c.params / 1e6:.2f}" if c.params else "—")
    table(
        "Training throughput (images/s, mean over epochs)",
        cells,
        lambda c: f"{c.images_per_s:.1f}" if c.images_per_s else "—",
    )
    for other in SECONDARY:
        if other != metric and any(_finite(r.get(other)) for r in rows):
            grid = cell_stats(rows, num_stages, num_kernels, key=other)
            table(f"{other} ({spread})", grid, _metric_text)
    lines += ["## Trials", ""]
    shown = ("trial_id", "num_stages", "num_kernels", "seed", "status", "epochs", "value")
    times = ("images_per_s", "epochs_s", "trial_s", "ray_train_s", "setup_s", "tracking_s")
    names = ["trial", "rounds", "kernels", "seed", "status", "epochs", metric, "img/s"]
    names += ["train s", "trial s", "Ray Train s", "set-up s", "MLflow s"]
    lines.append("| " + " | ".join(names) + " |")
    lines.append("|" + "---|" * len(names))
    for row in rows:
        texts = [_md_value(row.get(k)) for k in (*shown, *times)]
        lines.append("| " + " | ".join(texts) + " |")
    errors = [r for r in rows if r["status"] in ("error", "unfinished")]
    if errors:
        lines += ["", "Failed or unfinished trials (rerun the same command to retry them):", ""]
        lines += [f"- {r['trial_id']}: {r.get('error') or r['status']}" for r in errors]
    lines += ["", _time_summary(rows), ""]
    return "\n".join(lines)


def _time_summary(rows: Sequence[Mapping[str, Any]]) -> str:
    def mean(key: str) -> float:
        values = [float(r[key]) for r in rows if _finite(r.get(key))]
        return statistics.fmean(values) if values else math.nan

    return (
        "Where a trial's time goes (mean per trial): training and per-epoch validation "
        f"{mean('epochs_s'):.1f} s of {mean('trial_s'):.1f} s; Ray Train start-up and "
        f"teardown {mean('ray_train_s'):.1f} s, worker set-up (data, model) "
        f"{mean('setup_s'):.1f} s, MLflow {mean('tracking_s'):.1f} s."
    )


def _metric_text(cell: Cell) -> str:
    if not cell.values:
        return f"failed ({cell.failed})" if cell.failed else "—"
    text = f"{cell.mean:.1f}"
    if len(cell.values) > 1:
        text += f" ± {cell.std:.1f}"
    if cell.stopped:
        text += "*"
    if cell.failed:
        text += f" ({cell.failed} failed)"
    return text


def _write_plot(
    path: Path,
    cells: Mapping[tuple[int, int], Cell],
    metric: str,
    num_stages: Sequence[int],
    num_kernels: Sequence[int],
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    per_kernels = {f"{k} kernels": [cells[s, k] for s in num_stages] for k in num_kernels}
    per_rounds = {f"{s} rounds": [cells[s, k] for k in num_kernels] for s in num_stages}
    _panel(left, metric, "update rounds", "kernel update rounds", num_stages, "o", per_kernels)
    _panel(right, metric, "kernels", "instance kernels", num_kernels, "s", per_rounds)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _panel(axes, metric: str, versus: str, xlabel: str, xs, marker: str, lines) -> None:
    """One panel: ``metric`` (mean +- std over seeds) against ``xs``, one line per label."""
    for label, line in lines.items():
        axes.errorbar(
            xs,
            [c.mean for c in line],
            yerr=[c.std for c in line],
            marker=marker,
            capsize=3,
            label=label,
        )
    axes.set(xlabel=xlabel, ylabel=metric, xticks=list(xs))
    axes.set_title(f"{metric} vs {versus}")
    axes.grid(alpha=0.3)
    axes.legend()


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return "" if not math.isfinite(value) else round(value, 4)
    return "" if value is None else value


def _md_value(value: Any) -> str:
    if isinstance(value, float):
        return "—" if not math.isfinite(value) else f"{value:.1f}"
    return "—" if value is None or value == "" else str(value)


__all__ = ["Cell", "cell_stats", "render_csv", "render_markdown", "write_reports"]
