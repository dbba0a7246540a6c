"""The MLflow ``pyfunc`` model of a registered knet version, logged as *code*, not a pickle.

``knet promote`` logs this file with ``mlflow.pyfunc.log_model(python_model=<this file>)``
("models from code"): to load a version, MLflow runs the file, whose last line names the model
object. Its :meth:`KNetPyfunc.load_context` rebuilds K-Net from the version's own two files,
``weights.pt`` (a plain state dict, read with ``torch.load(weights_only=True)``) and
``knet.json`` (the config and the categories), so nothing pickled is ever loaded::

    model = mlflow.pyfunc.load_model("models:/knet-panoptic@champion")
    results = model.predict(image[None])   # a batch (N, H, W, 3) of uint8 RGB images

``predict`` returns one dict per image: ``task``, ``height``, ``width``, ``segments`` (the
JSON of ``knet predict``) and, for panoptic and semantic results, ``segment_map`` / ``class_map``
(int32 arrays at the image's size). ``params={"task": "semantic"}`` asks a panoptic model for
its semantic view. knet must be installed where the model is loaded.

Not a library module: it is only ever executed by MLflow (the ``set_model`` call is its
contract), and nothing in knet imports it.
"""

from __future__ import annotations

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class KNetPyfunc(PythonModel):
    """K-Net behind MLflow's pyfunc interface."""

    def load_context(self, context) -> None:
        from knet.experiments.registry import load_model_files

        self.model, self.cfg, self.categories = load_model_files(
            context.artifacts["weights"], context.artifacts["config"]
        )

    # np.ndarray is a hint MLflow infers no schema from (a list of images is taken too); without
    # any hint MLflow warned at every registration that one should be added.
    def predict(self, context, model_input: np.ndarray, params=None):
        from knet.evaluation.predict import predict_image, segments_of, semantic_map

        task = (params or {}).get("task") or self.cfg.model.task
        # The signature's input is a batch (N, H, W, 3) uint8; one (H, W, 3) image or a list of
        # images of any sizes is taken too when called without schema enforcement.
        one = isinstance(model_input, np.ndarray) and model_input.ndim == 3
        images = [model_input] if one else list(model_input)
        outputs = []
        for image in images:
            image = np.asarray(image, dtype=np.uint8)
            result = predict_image(
                self.model, self.cfg.model.task, self.categories, self.cfg, image, task
            )
            item = {
                "task": task,
                "height": int(image.shape[0]),
                "width": int(image.shape[1]),
                "segments": segments_of(result, task, self.categories),
            }
            if task == "panoptic":
                item["segment_map"] = result.segment_map.cpu().numpy().astype(np.int32)
            elif task == "semantic":
                item["class_map"] = semantic_map(result).astype(np.int32)
            outputs.append(item)
        return outputs


mlflow.models.set_model(KNetPyfunc())
