"""Experiments: what is built on trained models, with Ray Tune and the MLflow registry.

- :mod:`~knet.experiments.tune`: ``knet tune``, the ablation sweep on Ray Tune over Ray Train;
- :mod:`~knet.experiments.ablation`: its report (table, csv, plot, paired comparisons);
- :mod:`~knet.experiments.registry`: ``knet promote`` and ``knet lineage``, loading by alias;
- :mod:`~knet.experiments.mlflow_model`: the pyfunc model logged from code with each version.

The top layer under the command line (see ``tests/test_layers.py``).
"""
