"""Check one split of a raw dataset before training and report every problem found.

:func:`validate_split` reads the annotation files of a split (COCO panoptic, COCO instance or
semantic label PNGs, see :class:`knet.config.DataConfig`), opens every image and label file and
returns a :class:`ValidationReport`. It never stops at the first problem: each :class:`Problem`
names the file, the image id and the segment / annotation id and, for JSON content, the JSON path
it concerns, so that a broken dataset can be repaired in one pass.

Levels:

* ``error``: the sample cannot be trained on correctly (missing file, wrong size, mask/metadata
  disagreement, unknown category, a path leaving the dataset root, ...).
* ``warning``: suspicious but usable (e.g. a COCO instance ``area`` that is far from the decoded
  mask area; COCO's own polygon areas are approximate).
* ``info``: harmless facts, e.g. an image that is not RGB and will be converted.

Problem codes are stable and listed in :data:`PROBLEM_CODES`. The checks live in
:mod:`knet.data.validation`, one module per format; this module is the entry point and
re-exports the report's types.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence

from knet.data.layout import DatasetPaths
from knet.data.validation.checker import Checker
from knet.data.validation.instance import InstanceChecker
from knet.data.validation.panoptic import PanopticChecker
from knet.data.validation.report import (
    FORMATS,
    PROBLEM_CODES,
    DatasetValidationError,
    Level,
    Problem,
    ValidationReport,
)
from knet.data.validation.semantic import SemanticChecker

log = logging.getLogger(__name__)

# The checks of each data.format.
CHECKERS: dict[str, type[Checker]] = {
    "coco_panoptic": PanopticChecker,
    "coco_instance": InstanceChecker,
    "semantic_png": SemanticChecker,
}


def validate_split(
    paths: DatasetPaths,
    fmt: str,
    progress: bool = False,
    ignore_values: Sequence[int] = (255,),
) -> ValidationReport:
    """Check one split of a raw dataset and report every problem found.

    Args:
        paths: where the split's files are (:func:`knet.data.layout.dataset_paths`); every file
            name read from the data is confined to ``paths.root``.
        fmt: ``coco_panoptic``, ``coco_instance`` or ``semantic_png``.
        progress: show a tqdm progress bar over the images on stderr.
        ignore_values: semantic_png label values meaning "unlabelled" (``data.semantic_ignore``).

    Returns:
        The report; ``report.ok`` is False when any error was found. Use
        :meth:`ValidationReport.raise_for_errors` to turn errors into an exception.

    Raises:
        ValueError: for an unknown ``fmt`` (dataset problems are reported, never raised).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}; expected one of {', '.join(FORMATS)}")
    start = time.perf_counter()
    checker = CHECKERS[fmt](paths, fmt, progress, ignore_values)
    log.info("validating %s split %r (%s) under %s", fmt, paths.split, paths.images, paths.root)
    checker.run()
    report = ValidationReport(
        problems=checker.problems,
        num_images=checker.num_images,
        seconds=time.perf_counter() - start,
    )
    counts = Counter(p.level for p in report.problems)
    log.log(
        logging.WARNING if counts["error"] else logging.INFO,
        "validated %d images in %.2f s: %d errors, %d warnings, %d info",
        report.num_images,
        report.seconds,
        counts["error"],
        counts["warning"],
        counts["info"],
    )
    for problem in report.problems:
        log.debug("%s", problem)
    return report


__all__ = [
    "FORMATS",
    "PROBLEM_CODES",
    "DatasetValidationError",
    "Level",
    "Problem",
    "ValidationReport",
    "validate_split",
]
