"""``df.affect``: the prediction table's column groups, summary and timelines, as pandas methods.

A prediction table (what ``Predictor.predict`` returns, what ``mtaffect predict`` writes and
``mtaffect.read_table`` reads) is a plain DataFrame; this accessor names its column groups (from
:mod:`mtaffect.schema`, the one list of names) so a user need not spell 12 AU or 52 blendshape columns::

    df.affect.aus  # AU01_p .. AU26_p          df.affect.expressions   # Neutral_p .. Other_p
    df.affect.pose  # pose_Rx, pose_Ry, pose_Rz df.affect.blendshapes   # bs__neutral .. (52)
    df.affect.summarize()  # mtaffect.summarize(df)   df.affect.plot_timeline(0)  # a Figure

Every group keeps the table's index, so ``df.loc[df.affect.aus["AU12_p"] > 0.5, "file"]`` works.

The accessor is registered when this module is imported, which ``mtaffect.predict`` does: anything of
the prediction API (``mtaffect.Predictor``, ``mtaffect.read_table``, ``mtaffect.summarize``,
``import mtaffect.predict``) makes ``df.affect`` available; ``import mtaffect`` alone stays light.
"""

from __future__ import annotations

from typing import Final

import pandas as pd

from mtaffect.predict.outputs import ID_COLUMNS
from mtaffect.predict.plots import face_ids, timeline_figure
from mtaffect.predict.summary import summarize
from mtaffect.schema import (
    AU_DECISION_COLUMNS,
    AU_INTENSITY_COLUMNS,
    AU_PROB_COLUMNS,
    BLENDSHAPE_COLUMNS,
    BOX_COLUMNS,
    DENSE_LANDMARK_COLUMNS,
    EXPR_PROB_COLUMNS,
    GAZE_COLUMNS,
    LANDMARK_COLUMNS,
    POSE_COLUMNS,
    VA_NAMES,
)

#: What every prediction table has, whatever its options: the accessor refuses a frame without them.
REQUIRED_COLUMNS: Final[tuple[str, ...]] = ("file", "frame", "face_id", "success")
#: Column group -> (its columns, what a table lacking them was made with).
GROUPS: Final[dict[str, tuple[tuple[str, ...], str]]] = {
    "ids": (ID_COLUMNS, ""),
    "boxes": (BOX_COLUMNS, ""),
    "landmarks": (LANDMARK_COLUMNS, ""),
    "aus": (AU_PROB_COLUMNS, ""),
    "au_decisions": (AU_DECISION_COLUMNS, ""),
    "au_intensities": (AU_INTENSITY_COLUMNS, "landmarks='none' (--landmarks none)"),
    "expressions": (EXPR_PROB_COLUMNS, ""),
    "va": (VA_NAMES, ""),
    "pose": (POSE_COLUMNS, ""),
    "gaze": (GAZE_COLUMNS, "landmarks='none' (--landmarks none)"),
    "blendshapes": (BLENDSHAPE_COLUMNS, "landmarks='none' (--landmarks none)"),
    "dense_landmarks": (DENSE_LANDMARK_COLUMNS, "a landmarks mode other than 'dense' (--landmarks dense)"),
}


class NotAPredictionTable(ValueError):
    """A DataFrame without the columns of a prediction table (or of the group asked for)."""


@pd.api.extensions.register_dataframe_accessor("affect")
class AffectAccessor:
    """``df.affect``: column groups (``aus``, ``au_decisions``, ``au_intensities``, ``expressions``,
    ``va``, ``pose``, ``gaze``, ``blendshapes``, ``landmarks``, ``dense_landmarks``, ``boxes``, ``ids``),
    ``faces``, ``summarize()`` and ``plot_timeline(face_id)`` of a prediction table.

    Args:
        table: a prediction table; a frame without :data:`REQUIRED_COLUMNS` raises
            :class:`NotAPredictionTable` naming the missing columns.
    """

    def __init__(self, table: pd.DataFrame) -> None:
        missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
        if missing:
            raise NotAPredictionTable(
                f"df.affect needs a prediction table; this frame lacks the column(s) {', '.join(missing)} "
                "(use what Predictor.predict returns or mtaffect.read_table reads)"
            )
        self._table = table

    def _group(self, name: str) -> pd.DataFrame:
        columns, made_with = GROUPS[name]
        missing = [c for c in columns if c not in self._table.columns]
        if missing:
            why = f"; was it made with {made_with}?" if made_with else ""
            shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            raise NotAPredictionTable(f"df.affect.{name}: the table has no {shown} column(s){why}")
        return self._table[list(columns)]

    @property
    def ids(self) -> pd.DataFrame:
        """``file, frame, time, face_id, success, confidence``."""
        return self._group("ids")

    @property
    def boxes(self) -> pd.DataFrame:
        """Face boxes ``x1, y1, x2, y2`` (pixels)."""
        return self._group("boxes")

    @property
    def landmarks(self) -> pd.DataFrame:
        """The five detector landmarks ``eye_l_x .. mouth_r_y`` (pixels)."""
        return self._group("landmarks")

    @property
    def aus(self) -> pd.DataFrame:
        """AU probabilities ``AU01_p .. AU26_p``."""
        return self._group("aus")

    @property
    def au_decisions(self) -> pd.DataFrame:
        """AU 0/1 decisions ``AU01_c .. AU26_c`` (at the model's or post-processing's thresholds)."""
        return self._group("au_decisions")

    @property
    def au_intensities(self) -> pd.DataFrame:
        """AU intensities ``AU01_r ..`` (0-5) of the AUs the facial evidence supports."""
        return self._group("au_intensities")

    @property
    def expressions(self) -> pd.DataFrame:
        """The 8 expression probabilities ``Neutral_p .. Other_p`` (the label is ``df["expression"]``)."""
        return self._group("expressions")

    @property
    def va(self) -> pd.DataFrame:
        """``valence, arousal`` in [-1, 1]."""
        return self._group("va")

    @property
    def pose(self) -> pd.DataFrame:
        """Head pose ``pose_Rx, pose_Ry, pose_Rz`` (pitch, yaw, roll; radians)."""
        return self._group("pose")

    @property
    def gaze(self) -> pd.DataFrame:
        """Gaze ``gaze_angle_x, gaze_angle_y`` (radians)."""
        return self._group("gaze")

    @property
    def blendshapes(self) -> pd.DataFrame:
        """MediaPipe's 52 blendshapes ``bs__neutral .. bs_noseSneerRight`` in [0, 1]."""
        return self._group("blendshapes")

    @property
    def dense_landmarks(self) -> pd.DataFrame:
        """The 478 points ``x_0 .. x_477, y_0 .., z_0 ..`` (tables made with ``landmarks="dense"``)."""
        return self._group("dense_landmarks")

    @property
    def faces(self) -> pd.DataFrame:
        """The rows with a face (``success == 1``): a frame without any face has one row of its own."""
        return self._table[self._table["success"] == 1]

    def summarize(self) -> pd.DataFrame:
        """One row per (file, face id): :func:`mtaffect.summarize` of the table.

        Returns:
            The per-face summary (columns in :data:`mtaffect.predict.summary.SUMMARY_COLUMNS`).
        """
        return summarize(self._table)

    def plot_timeline(self, face_id: int, file: str | None = None):
        """The timeline of one face (VA, expressions, AUs and the geometry the table has) as a Figure;
        nothing is written (``fig.savefig(path)`` does that).

        Args:
            face_id: a face id of ``file`` with at least one detected face.
            file: the input whose face it is; may be left out when the table has one input.

        Returns:
            A matplotlib Figure.
        """
        files = list(dict.fromkeys(self._table["file"]))
        listed = ", ".join(map(str, files[:5])) + (" ..." if len(files) > 5 else "")
        if file is None:
            if len(files) != 1:
                raise ValueError(f"the table has {len(files)} inputs: say which with file= ({listed})")
            file = files[0]
        elif file not in files:
            raise ValueError(f"file={file!r} is not in the table (its inputs: {listed})")
        ids = face_ids(self._table, file)
        if int(face_id) not in ids:
            raise ValueError(f"{file} has no face {face_id} (its faces: {ids or 'none'})")
        return timeline_figure(self._table, file, int(face_id))


__all__ = ["GROUPS", "REQUIRED_COLUMNS", "AffectAccessor", "NotAPredictionTable"]
