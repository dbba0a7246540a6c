"""The method: what K-Net does around the network, framework-free (no Ray, no MLflow).

- :mod:`~knet.method.matcher`: the Hungarian matching of kernels to ground-truth segments;
- :mod:`~knet.method.losses`: focal, BCE, Dice, rank and semantic CE, deeply supervised;
- :mod:`~knet.method.postprocess`: instance top-k, the panoptic merge, the semantic argmax;
- :mod:`~knet.method.optim`: AdamW and its step schedule;
- :mod:`~knet.method.metrics`: PQ, mask AP and mIoU, with the bootstrap over images;
- :mod:`~knet.method.visualize`: the overlay pictures;
- :mod:`~knet.method.checkpoint`: self-describing checkpoints, read with ``weights_only=True``;
- :mod:`~knet.method.engine`: the train and inference loops (``train_one_epoch`` and the
  inference over a loader).

Above :mod:`knet.model` and :mod:`knet.data`, below evaluation and training (see
``tests/test_layers.py``). Nothing is imported here, so importing one module loads only what it
needs.
"""
