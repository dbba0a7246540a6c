"""Atomic outputs: build in a temporary sibling, then swap it in, so failures lose nothing."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MARKER = ".knet-output"  # JSON; no .json suffix, so a glob of the results never lists it
"""The file that marks a folder as knet's own output of one kind (``{"kind": ...}``)."""
LEDGER = ".knet-files"  # JSON {file name: kind}: the files knet wrote into a shared folder
"""The files knet wrote into a folder it shares with others (``metrics/``, ``reports/``)."""


class OutputExistsError(ValueError):
    """An output path that holds something knet did not write; nothing was touched."""


def output_kind(folder: str | Path) -> str | None:
    """The kind recorded in ``folder``'s marker, or None if it has no readable marker."""
    marker = Path(folder) / MARKER
    if marker.is_symlink() or not marker.is_file():
        return None
    try:
        kind = json.loads(marker.read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


def check_output_dir(target: str | Path, kind: str) -> None:
    """Refuse ``target`` unless knet may write there: new, empty, or knet's own ``kind`` output.

    This is the only rule under which knet replaces or writes into an existing folder (as DVC
    never deletes a workspace file it does not track): a folder that holds anything else,
    a file, or a symbolic link raises :class:`OutputExistsError` naming it and the marker.
    """
    path = Path(target)
    if path.is_symlink():
        raise OutputExistsError(f"output {target} is a symbolic link; give a new folder")
    if not path.exists():
        return
    if not path.is_dir():
        raise OutputExistsError(f"output {target} is an existing file, not a folder")
    if not any(path.iterdir()):
        return
    found = output_kind(path)
    if found == kind:
        return
    what = f"knet's {found} output" if found else "files knet did not write"
    raise OutputExistsError(
        f"output {target} already exists and holds {what}; knet only replaces an empty "
        f"folder or its own {kind} output (marked by {MARKER}): choose a new folder, or "
        f"remove it yourself"
    )


def check_output_file(target: str | Path, kind: str) -> None:
    """Refuse a single-file output knet may not replace: a folder, a symbolic link, or an
    existing file that knet did not write as ``kind`` (not in its folder's :data:`LEDGER`).

    The files of shared folders (``metrics/eval.json`` beside the user's own notes,
    ``reports/ablation.md``) follow the folder rule of :func:`check_output_dir` one file at a
    time; call it before the work, so a refusal comes first and costs nothing.
    """
    path = Path(target)
    if path.is_symlink():
        raise OutputExistsError(f"output {target} is a symbolic link; give a new file path")
    if path.is_dir():
        raise OutputExistsError(f"output {target} is a folder; give a file path")
    if path.exists() and _ledger(path.parent).get(path.name) != kind:
        raise OutputExistsError(
            f"output {target} already exists and knet did not write it as {kind} output "
            f"(it is not in {path.parent / LEDGER}); knet only replaces files it wrote: "
            f"choose another path, or remove it yourself"
        )


def write_output_file(target: str | Path, content: str | bytes, kind: str) -> None:
    """Write ``content`` to ``target`` atomically (a temporary file in the same folder, then a
    rename) after :func:`check_output_file`, and record it in the folder's :data:`LEDGER`, so
    that a later run of the same kind may replace it."""
    path = Path(target)
    check_output_file(path, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, content)
    ledger = _ledger(path.parent)
    if ledger.get(path.name) != kind:
        _write_atomic(path.parent / LEDGER, json.dumps({**ledger, path.name: kind}, indent=1))


def _ledger(folder: Path) -> dict[str, str]:
    entry = folder / LEDGER
    if entry.is_symlink() or not entry.is_file():
        return {}
    try:
        data = json.loads(entry.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, str)} if isinstance(data, dict) else {}


def _write_atomic(path: Path, content: str | bytes) -> None:
    data = content.encode() if isinstance(content, str) else content
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def mark_output(folder: str | Path, kind: str) -> None:
    """Write the marker that lets a later run of the same kind replace ``folder``."""
    (Path(folder) / MARKER).write_text(json.dumps({"kind": kind}) + "\n")


@contextlib.contextmanager
def atomic_directory(target: str | Path, kind: str) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``target``; on success it replaces ``target``.

    ``target`` must pass :func:`check_output_dir` for ``kind`` (checked first, and again just
    before the swap); the new folder is marked as ``kind`` output. On an exception (or Ctrl-C)
    the temporary folder is removed and an existing ``target`` is left exactly as it was. The
    swap moves the old folder aside, renames the new one in and only then deletes the old one.
    Temporary and backup folders are named after the process, so ones left behind by a killed
    run are removed by the next run.
    """
    check_output_dir(target, kind)
    target = Path(os.path.abspath(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        mark_output(tmp, kind)
        check_output_dir(target, kind)  # something may have appeared there meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap_in(tmp, target)


def _swap_in(tmp: Path, target: Path) -> None:
    backup = target.with_name(f".{target.name}.old-{os.getpid()}")
    shutil.rmtree(backup, ignore_errors=True)
    had_old = target.exists() or target.is_symlink()
    if had_old:
        os.replace(target, backup)
    try:
        os.replace(tmp, target)
    except BaseException:
        if had_old:
            os.replace(backup, target)
        raise
    if had_old:
        if backup.is_dir() and not backup.is_symlink():
            shutil.rmtree(backup, ignore_errors=True)
        else:
            backup.unlink(missing_ok=True)


def remove_stale(target: Path) -> None:
    """Delete temporary/backup siblings of ``target`` left by runs whose process is gone."""
    for kind in ("tmp", "old"):
        for path in target.parent.glob(f".{target.name}.{kind}-*"):
            pid = path.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                log.info("removing %s left by an interrupted run", path)
                shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists but belongs to someone else
        return True
    return True


def json_safe(data: Any) -> Any:
    """``data`` as plain JSON values: every NaN / infinite float as None, a stage result (a
    dataclass) as the mapping of its fields, a path as its string.

    This is the one serializer of what knet writes and prints as JSON (metrics files, the
    stage results of ``knet ... --json``-like output, the flows' summaries). Python's ``json``
    writes a bare ``NaN``, which no JSON parser but Python's accepts; knet writes ``null`` for
    a metric that has no value (e.g. AP_l when the split has no large object), as
    docs/data.md states.
    """
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: json_safe(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [json_safe(v) for v in data]
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        return {f.name: json_safe(getattr(data, f.name)) for f in dataclasses.fields(data)}
    if isinstance(data, Path):
        return str(data)
    return data


def dumps(data: Any, **dump_kwargs: Any) -> str:
    """``json.dumps`` of :func:`json_safe` data; refuses anything that is still not JSON."""
    return json.dumps(json_safe(data), allow_nan=False, **dump_kwargs)


def write_json_atomic(path: str | Path, data: Any, **dump_kwargs: Any) -> None:
    """Write valid JSON (NaN as null, :func:`json_safe`) to a temporary file in the same
    folder, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, dumps(data, **dump_kwargs))
