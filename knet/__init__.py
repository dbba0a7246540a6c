"""knet: K-Net for semantic, instance and panoptic segmentation.

The package is in layers, bottom to top (imports run downwards only; ``tests/test_layers.py``):
the foundations (``config``, ``io``, ``structures``, ``syncs``) and ``tracking`` are single
modules here; ``data/``, ``model/``, ``method/``, ``evaluation/``, ``training/`` and
``experiments/`` are sub-packages; ``cli`` is the command line. docs/configuration.md has the
table.

Modules that moved into the sub-packages keep their old names (``knet.registry``,
``knet.predict``, ...) as aliases of the new modules: every version registered before the move
carries an ``mlflow_model.py`` that imports ``knet.registry`` and ``knet.predict`` by name, and
a sweep started before it restores trials that name ``knet.tune``. knet's own code uses only the
new names (a test checks).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

# Old module name -> where it lives now (the layer split of 2026-12).
MOVED = {
    **{
        f"knet.{name}": f"knet.method.{name}"
        for name in (
            "matcher",
            "losses",
            "postprocess",
            "optim",
            "metrics",
            "visualize",
            "checkpoint",
            "engine",
        )
    },
    **{f"knet.{name}": f"knet.evaluation.{name}" for name in ("evaluate", "predict", "export")},
    **{
        f"knet.{name}": f"knet.experiments.{name}"
        for name in ("tune", "ablation", "registry", "mlflow_model")
    },
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old name as the very module object of its new name (no copy: a patch of one
    is a patch of the other)."""

    def find_spec(self, name, path=None, target=None):
        if name not in MOVED:
            return None
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec):
        return None  # a placeholder; exec_module puts the real module in its place

    def exec_module(self, module) -> None:
        # The import system returns whatever sys.modules holds under the name after this call.
        sys.modules[module.__name__] = importlib.import_module(MOVED[module.__name__])


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.insert(0, _MovedModules())
