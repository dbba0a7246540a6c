"""The checks behind :func:`knet.data.validate.validate_split`, one module per format.

- :mod:`~knet.data.validation.report`: problems, their codes and levels, the report;
- :mod:`~knet.data.validation.checker`: what every format shares (recording problems, JSON
  files, categories, COCO images and image files, paths confined to the dataset root);
- :mod:`~knet.data.validation.panoptic`, :mod:`~knet.data.validation.instance`,
  :mod:`~knet.data.validation.semantic`: COCO panoptic, COCO instance, semantic label PNGs.
"""
