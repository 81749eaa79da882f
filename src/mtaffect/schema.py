"""Names, orders and missing-label codes of the ABAW Multi-Task Learning challenge.

This is the one place these facts live; every other module imports them from here.
"""

from __future__ import annotations

from typing import Final

#: The 12 action units in the official (column) order of the annotation files.
AU_NAMES: Final[tuple[str, ...]] = (
    "AU1",
    "AU2",
    "AU4",
    "AU6",
    "AU7",
    "AU10",
    "AU12",
    "AU15",
    "AU23",
    "AU24",
    "AU25",
    "AU26",
)
#: OpenFace-style zero-padded names (``AU01``), used in application outputs.
AU_OPENFACE_NAMES: Final[tuple[str, ...]] = tuple(f"AU{int(n[2:]):02d}" for n in AU_NAMES)

#: The 8 expression classes; the position is the official class index.
EXPR_NAMES: Final[tuple[str, ...]] = (
    "Neutral",
    "Anger",
    "Disgust",
    "Fear",
    "Happiness",
    "Sadness",
    "Surprise",
    "Other",
)

NUM_AUS: Final[int] = len(AU_NAMES)
NUM_EXPR: Final[int] = len(EXPR_NAMES)
VA_NAMES: Final[tuple[str, str]] = ("valence", "arousal")

#: Missing-label codes as written in the annotation files (VA may also be written -5.0).
MISSING_VA: Final[float] = -5.0
MISSING_EXPR: Final[int] = -1
MISSING_AU: Final[int] = -1

#: Header of annotation files and submissions (line 1 of an annotation file is skipped whatever it says).
OFFICIAL_HEADER: Final[str] = "image,valence,arousal,expression,aus"
#: Number of comma-separated fields of an annotation / submission row.
NUM_FIELDS: Final[int] = 4 + NUM_AUS

# ---- LabelTable columns (one row per annotated image) -------------------------------------------------
LABEL_COLUMNS: Final[tuple[str, ...]] = (
    "image",
    "video",
    "frame",
    "valence",
    "arousal",
    "expression",
    *AU_NAMES,
)

# ---- Probability and decision columns: one convention for every table ----------------------------------
# ``<quantity>_p`` is a probability and ``<AU>_c`` a 0/1 decision, with OpenFace's zero-padded AU names
# (``AU01_p``, ``AU01_c``, ``Happiness_p``): the same names in the research PredictionTable and in the
# application table of ``mtaffect predict``, so a column means one thing wherever it appears.
#: Probability column of each expression class, in class-index order.
EXPR_PROB_COLUMNS: Final[tuple[str, ...]] = tuple(f"{n}_p" for n in EXPR_NAMES)
#: Probability column of each AU, in official AU order.
AU_PROB_COLUMNS: Final[tuple[str, ...]] = tuple(f"{n}_p" for n in AU_OPENFACE_NAMES)
#: 0/1 decision column of each AU (probability >= its threshold), in official AU order.
AU_DECISION_COLUMNS: Final[tuple[str, ...]] = tuple(f"{n}_c" for n in AU_OPENFACE_NAMES)

# ---- PredictionTable columns (the currency between models, post-processing, metric and submission) ----
PREDICTION_COLUMNS: Final[tuple[str, ...]] = ("image", *VA_NAMES, *EXPR_PROB_COLUMNS, *AU_PROB_COLUMNS)

# ---- Application table (``mtaffect predict``): geometry columns -----------------------------------------
#: The five MTCNN landmarks, left/right as seen in the image.
LANDMARK_NAMES: Final[tuple[str, ...]] = ("eye_l", "eye_r", "nose", "mouth_l", "mouth_r")
LANDMARK_COLUMNS: Final[tuple[str, ...]] = tuple(f"{n}_{a}" for n in LANDMARK_NAMES for a in ("x", "y"))
BOX_COLUMNS: Final[tuple[str, ...]] = ("x1", "y1", "x2", "y2")
#: Head rotation in radians, OpenFace's names and convention (pitch, yaw, roll; see mtaffect.faces.pose).
POSE_COLUMNS: Final[tuple[str, str, str]] = ("pose_Rx", "pose_Ry", "pose_Rz")
#: What the report and the timelines call them, in POSE_COLUMNS order.
POSE_ANGLE_NAMES: Final[tuple[str, str, str]] = ("pitch", "yaw", "roll")

#: Eye gaze in radians, OpenFace's names and convention (both eyes averaged; see mtaffect.geometry.gaze).
GAZE_COLUMNS: Final[tuple[str, str]] = ("gaze_angle_x", "gaze_angle_y")
#: MediaPipe Face Landmarker's 52 blendshapes, in the model's output order (``_neutral`` first). Left and
#: right are the subject's, not the viewer's.
BLENDSHAPE_NAMES: Final[tuple[str, ...]] = (
    "_neutral",
    "browDownLeft",
    "browDownRight",
    "browInnerUp",
    "browOuterUpLeft",
    "browOuterUpRight",
    "cheekPuff",
    "cheekSquintLeft",
    "cheekSquintRight",
    "eyeBlinkLeft",
    "eyeBlinkRight",
    "eyeLookDownLeft",
    "eyeLookDownRight",
    "eyeLookInLeft",
    "eyeLookInRight",
    "eyeLookOutLeft",
    "eyeLookOutRight",
    "eyeLookUpLeft",
    "eyeLookUpRight",
    "eyeSquintLeft",
    "eyeSquintRight",
    "eyeWideLeft",
    "eyeWideRight",
    "jawForward",
    "jawLeft",
    "jawOpen",
    "jawRight",
    "mouthClose",
    "mouthDimpleLeft",
    "mouthDimpleRight",
    "mouthFrownLeft",
    "mouthFrownRight",
    "mouthFunnel",
    "mouthLeft",
    "mouthLowerDownLeft",
    "mouthLowerDownRight",
    "mouthPressLeft",
    "mouthPressRight",
    "mouthPucker",
    "mouthRight",
    "mouthRollLower",
    "mouthRollUpper",
    "mouthShrugLower",
    "mouthShrugUpper",
    "mouthSmileLeft",
    "mouthSmileRight",
    "mouthStretchLeft",
    "mouthStretchRight",
    "mouthUpperUpLeft",
    "mouthUpperUpRight",
    "noseSneerLeft",
    "noseSneerRight",
)
#: ``bs_<name>`` in [0, 1], one per blendshape.
BLENDSHAPE_COLUMNS: Final[tuple[str, ...]] = tuple(f"bs_{n}" for n in BLENDSHAPE_NAMES)
#: The AUs whose intensity the facial evidence supports (OpenFace's 0-5 scale, ``AUxx_r``).
AU_INTENSITY_NAMES: Final[tuple[str, ...]] = ("AU01", "AU02", "AU04", "AU07", "AU12", "AU25", "AU26")
AU_INTENSITY_COLUMNS: Final[tuple[str, ...]] = tuple(f"{n}_r" for n in AU_INTENSITY_NAMES)
#: Number of dense landmarks (MediaPipe's 468-point mesh and 10 iris points).
NUM_DENSE_LANDMARKS: Final[int] = 478
#: ``--landmarks dense``: ``x_0..x_477``, ``y_0..y_477`` (image pixels) and ``z_0..z_477`` (relative depth,
#: scaled like x; smaller is nearer the camera).
DENSE_LANDMARK_COLUMNS: Final[tuple[str, ...]] = tuple(
    f"{a}_{i}" for a in ("x", "y", "z") for i in range(NUM_DENSE_LANDMARKS)
)

#: Default decision threshold for AUs (a probability >= threshold is a positive).
DEFAULT_AU_THRESHOLD: Final[float] = 0.5

# ---- Official data layout ------------------------------------------------------------------------------
CROPPED_DIR: Final[str] = "cropped_aligned"
TRAIN_ANNOTATIONS: Final[str] = "training_set_annotations.txt"
VAL_ANNOTATIONS: Final[str] = "validation_set_annotations.txt"
#: Test lists as released: ABAW7 and ABAW4.
TEST_LIST_NAMES: Final[tuple[str, ...]] = ("MTL.txt", "MTL_Challenge_test_set_release.txt")
#: Labels of the synthetic test set (the real test labels are never released).
TEST_ANNOTATIONS: Final[str] = "test_set_annotations.txt"
SPLIT_FILES: Final[dict[str, str]] = {"train": TRAIN_ANNOTATIONS, "val": VAL_ANNOTATIONS}
