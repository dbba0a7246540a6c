"""Evaluation: the stages that read a trained model.

- :mod:`~knet.evaluation.evaluate`: ``knet evaluate`` (metrics, per-class CSV, overlays);
- :mod:`~knet.evaluation.predict`: ``knet predict`` (images or a folder to segments and overlays);
- :mod:`~knet.evaluation.export`: ``knet export`` (``torch.export`` of the network).

Above :mod:`knet.method`, below training and experiments (see ``tests/test_layers.py``).
"""
