"""The ablation report of ``knet tune``: one row per trial in, paper-style tables and plot out.

Pure functions over plain rows (dicts), no Ray. The sweep's **axes** are its grid: dotted
config keys and their values (rounds x kernels by default, Table 4c/4d; any keys with
``tune.grid``). The cells are every combination of axis values, or (``tune.design:
one_at_a_time``) the reference and each axis varied alone around it. :func:`cell_stats`
groups the trials into cells and takes mean +- std and a 95% t interval over seeds;
:func:`compare` pairs a cell with the reference cell (the params' own values) seed by seed.
:func:`write_reports` writes ``ablation.csv`` (one row per trial), ``ablation.md`` (a rows x
columns table for two axes, like Table 4, one small table per axis for one at a time, one row
per cell otherwise; the paired comparison) and ``ablation.png`` (the metric against each axis
with 95% intervals), each atomically (temporary file, then rename).
"""

from __future__ import annotations

import csv
import functools
import io
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from knet.io import check_output_file, write_output_file

# The csv's columns, in order (the swept keys follow "status"); rows may hold more keys.
COLUMNS = (
    "trial_id",
    "status",
    "num_stages",
    "num_kernels",
    "seed",
    "epochs",
    "metric",
    "value",
    "value_low",
    "value_high",
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

# Grid keys that rows also carry under a short column name, and their labels in the tables.
SHORT_COLUMNS = {"model.num_stages": "num_stages", "model.num_kernels": "num_kernels"}
LABELS = {"model.num_stages": "rounds", "model.num_kernels": "kernels"}

# Further metrics shown as tables when the trials reported them (their headline is `metric`).
SECONDARY = ("val_pq", "val_pq_th", "val_pq_st", "val_sq", "val_rq", "val_ap", "val_miou")

# A trial's status: ran all epochs; stopped early by ASHA; failed; interrupted before the end.
STATUSES = ("finished", "stopped", "error", "unfinished")

# Two-sided confidence of every interval, and of the paired test's "significant".
CONFIDENCE = 0.95

Axes = Mapping[str, Sequence[Any]]
CellKey = tuple[Any, ...]


@dataclass(frozen=True)
class Cell:
    """One combination of axis values: the metric over its finished seeds."""

    point: tuple[tuple[str, Any], ...]  # ((dotted key, value), ...) in axis order
    values: tuple[float, ...]
    seeds: tuple[int, ...]  # the seed of each value, for pairing cells
    params: int | None
    images_per_s: float | None
    failed: int
    stopped: int = 0
    # One seed: the 95% bootstrap interval over validation images of its value (PQ and mIoU
    # metrics), else None.
    bootstrap: tuple[float, float] | None = None

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    @property
    def half_width(self) -> float:
        """Half the 95% t interval of the mean; NaN with fewer than two seeds."""
        return _t_half_width(self.values)

    @property
    def interval(self) -> tuple[float, float]:
        return self.mean - self.half_width, self.mean + self.half_width

    @property
    def label(self) -> str:
        return ", ".join(f"{axis_label(k)} {format_value(v)}" for k, v in self.point)


@dataclass(frozen=True)
class Comparison:
    """A cell against the reference cell over the seeds both finished: the paired t test, and
    the Wilcoxon signed-rank test, which does not assume normal differences (a run that
    collapses on one seed is one large difference: it widens the t interval, but it counts only
    as the largest rank)."""

    pairs: int
    difference: float  # mean of (cell - reference) per seed
    low: float
    high: float
    p_value: float
    better: int = 0  # seeds on which the cell beat the reference
    worse: int = 0
    rank_p_value: float = math.nan  # two-sided, exact for untied differences

    @property
    def significant(self) -> bool:
        return self.pairs > 1 and self.p_value < 1 - CONFIDENCE


def axis_label(key: str) -> str:
    return LABELS.get(key, key)


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return str(value)


def hashable(value: Any) -> Any:
    """Grid values as dictionary keys (a list value, e.g. optim.lr_steps, becomes a tuple)."""
    return tuple(hashable(v) for v in value) if isinstance(value, list | tuple) else value


def row_value(row: Mapping[str, Any], key: str) -> Any:
    """The value of grid ``key`` in a trial's row (its dotted key, or its short column)."""
    if key in row:
        return hashable(row[key])
    return hashable(row.get(SHORT_COLUMNS.get(key, key)))


def cells_of(axes: Axes) -> list[CellKey]:
    """Every combination of axis values, the first axis slowest (table order)."""
    keys: list[CellKey] = [()]
    for values in axes.values():
        keys = [(*key, hashable(v)) for key in keys for v in values]
    return keys


def one_at_a_time_cells(axes: Axes, reference: CellKey) -> list[CellKey]:
    """The reference cell and, for each axis in turn, every other value of that axis with the
    other axes at the reference (a one-factor-at-a-time design, as the paper's Table 4 varies
    one component around the default), in axis order then value order."""
    cells = []
    for i, values in enumerate(axes.values()):
        for value in values:
            cell = (*reference[:i], hashable(value), *reference[i + 1 :])
            if cell not in cells:
                cells.append(cell)
    return cells


def design_cells(axes: Axes, design: str = "product", reference: CellKey | None = None):
    """The cells a sweep runs: the full product, or one axis at a time around ``reference``."""
    if design == "product":
        return cells_of(axes)
    if design == "one_at_a_time":
        if reference is None:
            raise ValueError("a one-at-a-time design needs its reference cell")
        return one_at_a_time_cells(axes, reference)
    raise ValueError(f"unknown design {design!r}")


def cell_stats(
    rows: Sequence[Mapping[str, Any]],
    axes: Axes,
    key: str = "value",
    cells: Sequence[CellKey] | None = None,
) -> dict[CellKey, Cell]:
    """Mean +- std of ``key`` (the sweep's metric by default) per cell over the trials that
    finished or that the scheduler stopped. ``cells``: the sweep's cells (default: every
    combination of the axes)."""
    stats = {}
    for cell in cells if cells is not None else cells_of(axes):
        group = [r for r in rows if tuple(row_value(r, k) for k in axes) == cell]
        done = [r for r in group if r["status"] in ("finished", "stopped") and _finite(r.get(key))]
        speeds = [r["images_per_s"] for r in done if _finite(r.get("images_per_s"))]
        ends = [done[0].get(f"{key}_low"), done[0].get(f"{key}_high")] if len(done) == 1 else []
        stats[cell] = Cell(
            point=tuple(zip(axes, cell, strict=True)),
            values=tuple(float(r[key]) for r in done),
            seeds=tuple(int(r["seed"]) for r in done),
            params=next((r["params"] for r in group if r.get("params")), None),
            images_per_s=statistics.fmean(speeds) if speeds else None,
            failed=sum(r["status"] in ("error", "unfinished") for r in group),
            stopped=sum(r["status"] == "stopped" for r in group),
            bootstrap=(float(ends[0]), float(ends[1]))
            if ends and all(map(_finite, ends))
            else None,
        )
    return stats


def compare(cell: Cell, reference: Cell) -> Comparison | None:
    """``cell`` minus ``reference`` seed by seed; None without a seed both finished."""
    theirs = dict(zip(reference.seeds, reference.values, strict=True))
    diffs = [v - theirs[s] for s, v in zip(cell.seeds, cell.values, strict=True) if s in theirs]
    if not diffs:
        return None
    mean = statistics.fmean(diffs)
    half = _t_half_width(diffs)
    p_value = math.nan
    if len(diffs) > 1:
        from scipy import stats

        sd = statistics.stdev(diffs)
        if sd > 0:
            t = mean / (sd / math.sqrt(len(diffs)))
            p_value = float(2 * stats.t.sf(abs(t), len(diffs) - 1))
        else:  # identical differences: significant unless they are all zero
            p_value = 1.0 if mean == 0 else 0.0
    return Comparison(
        len(diffs),
        mean,
        mean - half,
        mean + half,
        p_value,
        better=sum(d > 0 for d in diffs),
        worse=sum(d < 0 for d in diffs),
        rank_p_value=_signed_rank_p(diffs),
    )


def _signed_rank_p(diffs: Sequence[float]) -> float:
    """Two-sided p of the Wilcoxon signed-rank test (zero differences dropped); NaN for fewer
    than two differences, 1.0 when all are zero."""
    if len(diffs) < 2:
        return math.nan
    if not any(diffs):
        return 1.0
    from scipy import stats

    return float(stats.wilcoxon(diffs, zero_method="wilcox", method="auto").pvalue)


def reference_cell(axes: Axes, base: Mapping[str, Any]) -> CellKey:
    """The cell of the params' own values (``base``: dotted key -> value); the first cell when
    the grid does not hold them."""
    key = tuple(hashable(base.get(k)) for k in axes)
    return key if key in cells_of(axes) else cells_of(axes)[0]


def off_reference_axis(cell: CellKey, reference: CellKey) -> int | None:
    """The one axis on which ``cell`` differs from ``reference`` (None: it is the reference, or
    differs on several)."""
    differ = [i for i, (a, b) in enumerate(zip(cell, reference, strict=True)) if a != b]
    return differ[0] if len(differ) == 1 else None


def write_reports(
    rows: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    *,
    metric: str,
    axes: Axes,
    reference: CellKey | None = None,
    header: Mapping[str, Any] | None = None,
    design: str = "product",
) -> dict[str, Path]:
    """Write ``ablation.{csv,md,png}`` under ``out_dir``; returns their paths by suffix.

    ``reference`` is the cell the others are compared with, seed by seed (default: the first);
    ``design`` says which cells the sweep ran (:func:`design_cells`).
    """
    out = Path(out_dir)
    check_reports(out)
    if reference is None:
        reference = cells_of(axes)[0]
    keys = design_cells(axes, design, reference)
    order = {cell: i for i, cell in enumerate(keys)}
    rows = sorted(
        rows,
        key=lambda r: (order.get(tuple(row_value(r, k) for k in axes), len(order)), r["seed"]),
    )
    cells = cell_stats(rows, axes, cells=keys)
    reference = reference if reference in cells else next(iter(cells))
    paths = {"csv": out / "ablation.csv", "md": out / "ablation.md", "png": out / "ablation.png"}
    write_output_file(paths["csv"], render_csv(rows, axes), REPORT_KIND)
    text = render_markdown(rows, cells, metric, axes, reference, header or {}, design)
    write_output_file(paths["md"], text, REPORT_KIND)
    plot = _render_plot(cells, metric, axes, reference if design != "product" else None)
    write_output_file(paths["png"], plot, REPORT_KIND)
    return paths


REPORT_KIND = "ablation-report"  # the ledger's kind of ablation.{csv,md,png}
REPORT_FILES = ("ablation.csv", "ablation.md", "ablation.png")


def check_reports(out_dir: str | Path) -> None:
    """Refuse a report folder whose ``ablation.*`` files knet did not write (before a sweep
    of minutes or hours, not after it): :func:`knet.io.check_output_file`."""
    for name in REPORT_FILES:
        check_output_file(Path(out_dir) / name, REPORT_KIND)


def render_csv(rows: Sequence[Mapping[str, Any]], axes: Axes | None = None) -> str:
    swept = tuple(k for k in (axes or {}) if k not in SHORT_COLUMNS)
    columns = (*COLUMNS[:2], *swept, *COLUMNS[2:])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k)) for k in columns})
    return buffer.getvalue()


# Columns of the csv that hold text; every other cell is read back as YAML (numbers, booleans,
# lists), as the grid's values were written.
TEXT_COLUMNS = ("trial_id", "status", "metric", "mlflow_run_id", "checkpoint", "error")


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The trials of an ``ablation.csv`` as rows again (the inverse of :func:`render_csv`).

    Raises ``ValueError`` naming the file and line when it is not such a csv.
    """
    import yaml

    path = Path(path)
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [
            c for c in ("trial_id", "status", "seed", "value") if c not in (reader.fieldnames or [])
        ]
        if missing:
            raise ValueError(f"{path}: not an ablation.csv of knet tune (no column {missing[0]})")
        rows = []
        for line, record in enumerate(reader, start=2):
            row: dict[str, Any] = {}
            for column, text in record.items():
                if column in TEXT_COLUMNS or text is None:
                    row[column] = text or None
                    continue
                try:
                    row[column] = yaml.safe_load(text) if text != "" else None
                except yaml.YAMLError as err:
                    raise ValueError(f"{path}:{line}: column {column}: {text!r}: {err}") from None
            if row["status"] not in STATUSES or not isinstance(row["seed"], int):
                raise ValueError(f"{path}:{line}: a trial needs a status and an integer seed")
            rows.append(row)
    return rows


def pool_rows(sources: Mapping[str, Sequence[Mapping[str, Any]]], axes: Axes) -> list[dict]:
    """The trials of several sweeps of the same grid as one sweep's (more seeds per cell).

    ``sources``: a name (the csv's path) -> its rows. A trial outside the grid's cells, or a
    cell and seed found twice (the same seed would count twice), is refused with both names.
    """
    cells = set(cells_of(axes))
    seen: dict[tuple[CellKey, int], str] = {}
    pooled = []
    for name, rows in sources.items():
        for row in rows:
            cell = tuple(row_value(row, k) for k in axes)
            if cell not in cells:
                point = ", ".join(f"{k}={format_value(v)}" for k, v in zip(axes, cell, strict=True))
                raise ValueError(
                    f"{name}: trial {row.get('trial_id')} ({point}) is not a cell of the grid "
                    f"{', '.join(axes)}; pool sweeps of the same --grid or tune.grid"
                )
            key = (cell, row["seed"])
            if key in seen:
                raise ValueError(
                    f"{name}: trial {row.get('trial_id')} has seed {row['seed']} of a cell that "
                    f"{seen[key]} holds too; pool sweeps of different seeds (train.seed)"
                )
            seen[key] = name
            pooled.append(dict(row))
    return pooled


def render_markdown(
    rows: Sequence[Mapping[str, Any]],
    cells: Mapping[CellKey, Cell],
    metric: str,
    axes: Axes,
    reference: CellKey,
    header: Mapping[str, Any],
    design: str = "product",
) -> str:
    seeds = max((len({r["seed"] for r in rows}), 1))
    title = " x ".join(
        {"model.num_stages": "kernel-update rounds", "model.num_kernels": "instance kernels"}.get(
            k, k
        )
        for k in axes
    )
    lines = [f"# K-Net ablation: {title}", ""]
    lines += [f"- {key}: {value}" for key, value in header.items()]
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    shown = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    lines += [f"- trials: {len(rows)} ({shown})", ""]
    spread = f"mean ± std over {seeds} seeds" if seeds > 1 else "1 seed"
    table = functools.partial(_cell_table, axes=axes, reference=reference, design=design)
    lines += table(f"{metric} at the last epoch ({spread})", cells, text=_metric_text)
    if counts["stopped"]:
        lines += ["\\* includes trials the scheduler stopped early, at their last epoch.", ""]
    lines += _comparison(cells, reference, metric)
    lines += table(
        "Parameters (millions)",
        cells,
        text=lambda c: f"{c.params / 1e6:.2f}" if c.params else "—",
    )
    lines += table(
        "Training throughput (images/s, mean over epochs)",
        cells,
        text=lambda c: f"{c.images_per_s:.1f}" if c.images_per_s else "—",
    )
    for other in SECONDARY:
        if other != metric and any(_finite(r.get(other)) for r in rows):
            grid = cell_stats(rows, axes, key=other, cells=list(cells))
            lines += table(f"{other} ({spread})", grid, text=_metric_text)
    lines += ["## Trials", ""]
    swept = [(k, SHORT_COLUMNS.get(k, k)) for k in axes]
    shown = ("trial_id", *(column for _, column in swept), "seed", "status", "epochs", "value")
    times = ("images_per_s", "epochs_s", "trial_s", "ray_train_s", "setup_s", "tracking_s")
    names = ["trial", *(axis_label(k) for k, _ in swept), "seed", "status", "epochs", metric]
    names += ["img/s", "train s", "trial s", "Ray Train s", "set-up s", "MLflow s"]
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


def _cell_table(
    title: str,
    cells: Mapping[CellKey, Cell],
    *,
    axes: Axes,
    text,
    reference: CellKey | None = None,
    design: str = "product",
) -> list[str]:
    """Two axes of a product: rows x columns, like the paper's Table 4. One axis at a time:
    one small table per axis, the others at the reference, like its Tables 4a-4d. Otherwise one
    row per cell."""
    lines = [f"## {title}", ""]
    keys = list(axes)
    if design == "one_at_a_time" and reference is not None:
        at = {k: format_value(v) for k, v in zip(keys, reference, strict=True)}
        lines.append(
            "Each axis with the others at "
            + ", ".join(f"{axis_label(k)} {v}" for k, v in at.items())
            + " (the reference, marked *)."
        )
        lines.append("")
        for i, key in enumerate(keys):
            row = [c for c in cells if c == reference or off_reference_axis(c, reference) == i]
            row.sort(key=lambda c: [hashable(v) for v in axes[key]].index(c[i]))
            heads = [format_value(c[i]) + ("*" if c == reference else "") for c in row]
            lines.append(f"| {axis_label(key)} | " + " | ".join(heads) + " |")
            lines.append("|---|" + "---:|" * len(row))
            lines.append("| | " + " | ".join(text(cells[c]) for c in row) + " |")
            lines.append("")
        return lines
    if len(keys) == 2:
        rows_key, cols_key = keys
        columns = [hashable(v) for v in axes[cols_key]]
        head = f"| {axis_label(rows_key)} \\ {axis_label(cols_key)} | "
        lines.append(head + " | ".join(format_value(v) for v in columns) + " |")
        lines.append("|---:|" + "---:|" * len(columns))
        for value in axes[rows_key]:
            texts = [text(cells[hashable(value), c]) for c in columns]
            lines.append(f"| {format_value(value)} | " + " | ".join(texts) + " |")
    else:
        lines.append("| " + " | ".join(axis_label(k) for k in keys) + " | value |")
        lines.append("|" + "---:|" * (len(keys) + 1))
        for cell in cells.values():
            values = " | ".join(format_value(v) for _, v in cell.point)
            lines.append(f"| {values} | {text(cell)} |")
    lines.append("")
    return lines


def _comparison(cells: Mapping[CellKey, Cell], reference: CellKey, metric: str) -> list[str]:
    """Each cell's 95% interval, and its difference from the reference cell, seed by seed."""
    ref = cells[reference]
    lines = [
        f"## {metric}: 95% intervals, and each cell against {ref.label or 'the reference'} "
        "(paired by seed)",
        "",
        "Intervals are Student-t over seeds; a difference is significant when its paired "
        f"interval excludes 0 (two-sided p < {1 - CONFIDENCE:.2f}). Better / worse counts the "
        "seeds on which the cell beat / lost to the reference; the signed-rank p (Wilcoxon) does "
        "not assume normal differences, so one seed that collapses weighs as one rank, not as "
        "its size (with n seeds all on one side its smallest value is 2 / 2^n: 0.25 at 3 "
        "seeds, 0.031 at 6). A cell of one seed shows the bootstrap interval over validation "
        "images instead (marked b; PQ and mIoU metrics): it covers the choice of images, not of "
        "the seed, so it is narrower than a seed interval.",
        "",
        "| cell | seeds | mean ± std | 95% interval | Δ vs reference | 95% interval of Δ | p "
        "| significant | better / worse | signed-rank p |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for key, cell in cells.items():
        interval = _interval_text(*cell.interval) if len(cell.values) > 1 else "—"
        if len(cell.values) == 1 and cell.bootstrap:
            interval = _interval_text(*cell.bootstrap) + " b"
        mean = "—" if not cell.values else f"{cell.mean:.1f} ± {cell.std:.1f}"
        if key == reference:
            lines.append(
                f"| {cell.label} (reference) | {len(cell.values)} | {mean} | {interval} "
                "| | | | | | |"
            )
            continue
        diff = compare(cell, ref)
        if diff is None:
            lines.append(
                f"| {cell.label} | {len(cell.values)} | {mean} | {interval} | — | — | — | — "
                "| — | — |"
            )
            continue
        paired = _interval_text(diff.low, diff.high) if diff.pairs > 1 else "—"
        p = f"{diff.p_value:.3f}" if math.isfinite(diff.p_value) else "—"
        verdict = "yes" if diff.significant else ("no" if diff.pairs > 1 else "— (1 seed)")
        rank_p = f"{diff.rank_p_value:.3f}" if math.isfinite(diff.rank_p_value) else "—"
        lines.append(
            f"| {cell.label} | {len(cell.values)} | {mean} | {interval} | {diff.difference:+.1f} "
            f"| {paired} | {p} | {verdict} | {diff.better} / {diff.worse} | {rank_p} |"
        )
    lines.append("")
    return lines


def _interval_text(low: float, high: float) -> str:
    return f"[{low:.1f}, {high:.1f}]"


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


def _render_plot(
    cells: Mapping[CellKey, Cell],
    metric: str,
    axes: Axes,
    reference: CellKey | None = None,
) -> bytes:
    """One panel per axis: the metric (mean, 95% interval over seeds) against the axis's
    values, one line per combination of the other axes (with ``reference``, one-at-a-time:
    only the line through the reference)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(axes)
    fig, panels = plt.subplots(
        1, len(keys), figsize=(5 * len(keys), 4), constrained_layout=True, squeeze=False
    )
    for i, (axis, panel) in enumerate(zip(keys, panels[0], strict=True)):
        lines: dict[str, list[Cell]] = {}
        for key, cell in cells.items():
            off_line = reference is not None and key != reference
            if off_line and off_reference_axis(key, reference) != i:
                continue
            others = [(k, v) for k, v in cell.point if k != axis]
            label = ", ".join(f"{axis_label(k)} {format_value(v)}" for k, v in others)
            lines.setdefault(label or metric, []).append(cell)
        ticks = [hashable(v) for v in axes[axis]]
        _panel(panel, metric, axis, ticks, "os^Dv"[i % 5], lines, i)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _panel(axes, metric: str, axis: str, ticks: list, marker: str, lines, index: int) -> None:
    """``metric`` against the values of ``axis`` (the cells' ``index``-th value); error bars:
    the 95% interval over seeds."""
    for label, line in lines.items():
        line = sorted(line, key=lambda c: ticks.index(hashable(c.point[index][1])))
        xs = [ticks.index(hashable(c.point[index][1])) for c in line]
        half = [c.half_width if math.isfinite(c.half_width) else 0.0 for c in line]
        axes.errorbar(xs, [c.mean for c in line], yerr=half, marker=marker, capsize=3, label=label)
    positions = list(range(len(ticks)))
    labels = [format_value(v) for v in ticks]
    axes.set(xlabel=axis_label(axis), ylabel=metric, xticks=positions, xticklabels=labels)
    axes.set_title(f"{metric} vs {axis_label(axis)} (95% intervals)")
    axes.grid(alpha=0.3)
    if len(lines) > 1:
        axes.legend(fontsize="small")


def _t_half_width(values: Sequence[float]) -> float:
    if len(values) < 2:
        return math.nan
    from scipy import stats

    quantile = float(stats.t.ppf(0.5 + CONFIDENCE / 2, len(values) - 1))
    return quantile * statistics.stdev(values) / math.sqrt(len(values))


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


__all__ = [
    "Cell",
    "Comparison",
    "cell_stats",
    "compare",
    "reference_cell",
    "pool_rows",
    "read_rows",
    "render_csv",
    "render_markdown",
    "write_reports",
]
