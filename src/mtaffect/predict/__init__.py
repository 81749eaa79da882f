"""The application: run a face-affect model on images, folders and videos (``mtaffect predict``).

``Predictor(model=None).predict("clip.mp4")`` returns the per-frame, per-face table (see
:mod:`mtaffect.predict.outputs` for its columns); the CLI writes the same table, plus timelines, an
annotated video and an HTML report; ``summarize(table)`` gives the per-face summary the report shows,
and ``table.affect`` its column groups, summary and timelines (:mod:`mtaffect.predict.accessor`).
Names are imported lazily so ``import mtaffect.predict`` (and the CLI's
start-up) does not load torch.
"""

from __future__ import annotations

import importlib

from mtaffect.predict import accessor as _accessor  # noqa: F401  (registers ``df.affect`` on tables)

_EXPORTS = {
    "Predictor": "mtaffect.predict.pipeline",
    "FileResult": "mtaffect.predict.pipeline",
    "load_affect_model": "mtaffect.predict.torch_engine",
    "predict": "mtaffect.predict.pipeline",
    "predict_to_file": "mtaffect.predict.job",
    "COLUMNS": "mtaffect.predict.outputs",
    "read_table": "mtaffect.predict.outputs",
    "write_table": "mtaffect.predict.outputs",
    "to_prediction_table": "mtaffect.predict.outputs",
    "InputError": "mtaffect.predict.sources",
    "FaceTracker": "mtaffect.predict.tracking",
    "summarize": "mtaffect.predict.summary",
    "annotate_image": "mtaffect.predict.annotate",
    "annotate_video": "mtaffect.predict.annotate",
    "face_thumbnails": "mtaffect.predict.thumbnails",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mtaffect.predict' has no attribute {name!r}")
