"""Training from images: the backbone in the loop (frozen on the fly, or fine-tuned).

A config with a ``backbone:`` section trains from the official layout's face crops instead of a
feature store, beside the store path and sharing its units, losses, metric and checkpoints:

- :mod:`.augment`: the ``augment:`` presets (``none``, ``li2024``, ``liu2024``) and per-op overrides,
  batched on the device with kornia, seeded, one transform per window;
- :mod:`.data`: :class:`~.data.ImageDataModule`, decoding in DataLoader workers, rank shards;
- :mod:`.build`: :func:`~.build.build_image_training` (backbone + recipe ->
  :class:`~mtaffect.models.image_model.ImageMTLModel`, data module, checkpoint writer) called by
  :func:`mtaffect.train.build.build_training`, and :func:`~.build.image_affect_model` for predictions.

Nothing is imported here, so the CLI stays light.
"""
