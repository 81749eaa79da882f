"""A trained checkpoint as a model: its heads on backbone arrays, over feature stores, over face crops.

:class:`TrainedAffectModel` is both interfaces of :mod:`mtaffect.models.base`: the application's
:class:`~mtaffect.models.base.FaceAffectModel` (its backbone, fine-tuned weights included, and its heads)
and the research :class:`~mtaffect.models.base.AffectPredictor` (``predict_store`` / ``predict_images``
over a list of images, decoded in DataLoader workers as extraction decodes them). The file format it is
read from is :mod:`mtaffect.models.checkpoint`; which name loads it, :mod:`mtaffect.models.loading`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mtaffect.features.registry import options_from_file, with_trust
from mtaffect.models.base import AffectOutputs, MTLModel, outputs_to_probs
from mtaffect.models.checkpoint import CONFIG, CheckpointError, load_mtl_model
from mtaffect.schema import DEFAULT_AU_THRESHOLD, NUM_AUS

if TYPE_CHECKING:
    from mtaffect.data.predictions import PredictionTable
    from mtaffect.features.base import Backbone, BackboneSpec
    from mtaffect.features.reader import StoreSet
    from mtaffect.features.store import FeatureStore

    #: A feature store as a caller may give it: opened or its folder; the main one also with named ones.
    NamedStore = FeatureStore | str | os.PathLike
    StoreArg = NamedStore | StoreSet

#: The model's input arrays for each batch of positions (into the de-duplicated image names).
InputBatches = Callable[[list[np.ndarray]], Iterable[Mapping[str, Any]]]


class TrainedAffectModel:
    """A trained recipe ready for prediction: a :class:`~mtaffect.models.base.FaceAffectModel` and an
    :class:`~mtaffect.models.base.AffectPredictor`.

    ``predict(features, logits, tokens)`` takes N faces, one time step each. Temporal recipes also
    accept one sequence ``(1, T, ...)`` (consecutive frames of one video) and then return T rows;
    (N, ...) input is treated as N sequences of length 1 (no temporal context).
    :meth:`predict_store` predicts a whole store, temporal recipes over windows of each video;
    :meth:`predict_images` the same from face crops (the backbone runs on them);
    :meth:`create_backbone` builds the backbone the model was trained with (fine-tuned weights included).
    ``backbone_module`` gives an already built backbone (e.g. a model still in memory after training).
    """

    def __init__(
        self,
        model: MTLModel,
        config: dict,
        device: str | torch.device = "cpu",
        *,
        path: str | os.PathLike | None = None,
        backbone_module: Backbone | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        self.model = model.to(device).eval()
        self.config = config
        self.device = torch.device(device)
        self.path = None if path is None else Path(path)
        self._backbone_module = backbone_module
        bb = config["backbone"]
        self.backbone: str = bb["name"]
        kwargs = options_from_file(bb.get("kwargs"), "checkpoint config: backbone.kwargs")
        self.backbone_kwargs: dict = with_trust(self.backbone, kwargs, trust_remote_code)
        self.backbone_weights: str | None = bb.get("weights")  # fine-tuned weights inside the checkpoint
        self.fingerprint: str | None = bb.get("fingerprint")
        self.failures: list[tuple[str, str]] = []  # images predict_images could not read
        self.au_thresholds = np.asarray(config.get("au_thresholds", [DEFAULT_AU_THRESHOLD] * NUM_AUS), float)
        self.temporal = bool(config.get("temporal", False))
        self.window = int(config.get("window", 1))
        self.window_edge = str(config.get("window_edge", "pad"))
        self.inputs: tuple[str, ...] = tuple(config.get("inputs", model.inputs))
        self.metrics: dict = config.get("metrics", {})
        # named stores the model reads (features@au ...): {name: {backbone, fingerprint}}
        self.input_stores: dict[str, dict] = dict(config.get("input_stores", {}))

    @property
    def store_inputs(self) -> tuple[str, ...]:
        """Inputs read from named stores (``features@<name>``), not from this model's own backbone."""
        return tuple(i for i in self.inputs if "@" in i)

    def __repr__(self) -> str:
        return (
            f"TrainedAffectModel(recipe={self.config['recipe']!r}, backbone={self.backbone!r}, "
            f"temporal={self.temporal}, P={self.metrics.get('P')})"
        )

    @torch.no_grad()
    def _forward(self, arrays: Mapping[str, torch.Tensor | np.ndarray | None]) -> dict[str, torch.Tensor]:
        batch = {}
        for name in self.inputs:
            a = arrays.get(name)
            if a is None:
                raise ValueError(f"this model reads {name!r} from the backbone; pass {name}=...")
            t = torch.as_tensor(np.asarray(a) if not torch.is_tensor(a) else a)
            batch[name] = t.to(self.device).float()  # float16 from a store is cast on the device
        return self.model(batch)

    def predict(
        self, features: torch.Tensor, logits: torch.Tensor | None = None, tokens: torch.Tensor | None = None
    ) -> AffectOutputs:
        arrays = {"features": features, "logits": logits, "tokens": tokens}
        if self.temporal:
            f = torch.as_tensor(features)
            if f.ndim == 3 and f.shape[0] == 1:  # one sequence (1, T, D): keep the time axis
                out = self._forward(arrays)
                return outputs_to_probs({k: v[0] for k, v in out.items()})
            arrays = {k: None if v is None else torch.as_tensor(v)[:, None] for k, v in arrays.items()}
            out = self._forward(arrays)
            return outputs_to_probs({k: v[:, 0] for k, v in out.items()})
        return outputs_to_probs(self._forward(arrays))

    def create_backbone(self) -> Backbone:
        """The backbone this model reads: ``create_backbone(name, **kwargs)``, with the checkpoint's own
        fine-tuned weights when it has them (eval mode, on the model's device)."""
        if self._backbone_module is not None:
            return self._backbone_module.to(self.device).eval()
        from mtaffect.features.registry import create_backbone

        kwargs = dict(self.backbone_kwargs)
        where = self.path / CONFIG if self.path is not None else "the checkpoint config"
        # backbone_kwargs come from the file through options_from_file (no code-running option) plus
        # the caller's own trust_remote_code decision (with_trust), never anything else
        if self.backbone_weights:
            root = self.path
            folder = root / self.backbone_weights if root is not None else None
            inside = root is not None and folder is not None and root.resolve() in folder.resolve().parents
            if root is None or folder is None or not folder.is_dir() or not inside:
                raise CheckpointError(
                    f"{where}: the fine-tuned backbone's weights ({self.backbone_weights!r}) are not a "
                    "folder inside the checkpoint; the checkpoint is damaged"
                )
            kwargs["weights"] = str(folder)
        return create_backbone(self.backbone, **kwargs).to(self.device).eval()

    def _predict_units(
        self, inputs: InputBatches, images: Sequence[str], batch_size: int, valid: np.ndarray | None = None
    ) -> PredictionTable:
        """The prediction loop of :meth:`predict_store` / :meth:`predict_images`: ``inputs(batches)``
        yields, in order, the model's input arrays for each array of positions (into the de-duplicated
        names) of ``batches``. ``valid`` (per de-duplicated name) adds the table's ``valid`` column."""
        from mtaffect.data.predictions import PredictionTable
        from mtaffect.data.units import make_windows, split_image_names

        names = list(dict.fromkeys(str(x) for x in images))
        n = len(names)
        va = np.zeros((n, 2))
        expr = np.zeros((n, 8))
        au = np.zeros((n, NUM_AUS))
        if self.temporal:
            video, frame = split_image_names(names, strict=False)
            units, mask = make_windows(video, frame, self.window, self.window, self.window_edge)
            bs = max(1, batch_size // self.window)
        else:
            units, mask, bs = np.arange(n), None, batch_size
        starts = range(0, len(units), bs)
        for s, arrays in zip(starts, inputs([units[s : s + bs] for s in starts]), strict=True):
            pos = units[s : s + bs]
            probs = outputs_to_probs(self._forward(arrays))
            idx = pos
            if mask is not None:
                keep = mask[s : s + bs]
                idx = pos[keep]
                probs = AffectOutputs(probs.va[keep], probs.expr_probs[keep], probs.au_probs[keep])
            va[idx], expr[idx], au[idx] = probs.va, probs.expr_probs, probs.au_probs
        row_of = {name: i for i, name in enumerate(names)}
        take = np.array([row_of[str(x)] for x in images], dtype=np.int64)
        extra = {"valid": np.asarray(valid)[take].astype(np.int8)} if valid is not None else {}
        return PredictionTable.from_arrays(
            [str(x) for x in images], va[take, 0], va[take, 1], expr[take], au[take], **extra
        )

    def _store_set(self, store: StoreArg, stores: Mapping[str, NamedStore] | None) -> FeatureStore | StoreSet:
        """``store`` (a store, its path or a StoreSet) with the named ``stores``, checked against the
        backbones this model was trained on."""
        from mtaffect.features.reader import StoreSet
        from mtaffect.features.store import FeatureStore

        st: FeatureStore | StoreSet
        if isinstance(store, StoreSet):
            st = store
        else:
            main = store if isinstance(store, FeatureStore) else FeatureStore.open(store)
            named = StoreSet.open(dict(stores)).stores if stores else {}
            st = StoreSet({"": main, **named}) if named else main
        main_store = st.main if isinstance(st, StoreSet) else st
        if self.fingerprint and main_store.fingerprint != self.fingerprint:
            main_store.check_compatible(self.fingerprint, self.backbone)
        self._check_named(st if isinstance(st, StoreSet) else None)
        return st

    def _needs_stores(self) -> CheckpointError:
        from mtaffect.features.reader import store_names

        names = sorted(store_names(self.store_inputs))
        return CheckpointError(
            f"this model fuses features of other models ({', '.join(self.store_inputs)}): give the "
            f"stores they were exported into ({', '.join(f'{n}=STORE' for n in names)}), or predict "
            "with the combined model that holds those models (a pipeline run's best/)"
        )

    def _check_named(self, stores: StoreSet | None) -> None:
        if not self.store_inputs:
            return
        if stores is None:
            raise self._needs_stores()
        for key, rec in self.input_stores.items():
            if key in stores.stores and rec.get("fingerprint"):
                stores.stores[key].check_compatible(rec["fingerprint"], rec.get("backbone"))

    def predict_store(
        self,
        store: StoreArg,
        images: Sequence[str],
        batch_size: int = 4096,
        *,
        allow_missing: bool = False,
        stores: Mapping[str, NamedStore] | None = None,
    ) -> PredictionTable:
        """A PredictionTable for ``images`` (repeats allowed) from a FeatureStore (or its path).

        Temporal recipes see windows of ``window`` consecutive listed frames of one video (sorted by
        frame, the last padded or shifted as in training); every frame is predicted exactly once.
        A model reading named stores (``features@au``) gets them from ``stores`` (``{name: store}``)
        or from ``store`` given as a :class:`~mtaffect.features.reader.StoreSet`.

        Images whose extraction failed (their store rows are zeros) are an error
        (:class:`mtaffect.features.reader.FailedImagesError`, counting them and naming the first few).
        With ``allow_missing`` the table gets a ``valid`` column: 0 for those rows, whose values are
        the model's output on zero features (placeholders to filter or fill), 1 for the others.
        """
        from mtaffect.features.reader import InputSource, check_valid

        if self.backbone_weights:
            raise CheckpointError(
                f"this model fine-tuned its backbone ({self.backbone!r}): no feature store holds its "
                "features; predict from the images (infer --data, predict)"
            )
        st = self._store_set(store, stores)
        names = list(dict.fromkeys(str(x) for x in images))
        rows = st.rows(names)
        ok = check_valid(st, rows, names, allow_missing=allow_missing)
        source = InputSource(st, rows, self.inputs, in_memory=False)
        return self._predict_units(
            lambda batches: map(source.get, batches), images, batch_size, ok if allow_missing else None
        )

    def _decoded(
        self,
        folder: str | os.PathLike,
        names: Sequence[str],
        batches: list[np.ndarray],
        spec: BackboneSpec,
        workers: int,
    ) -> Iterator[torch.Tensor]:
        """Normalised pixels on the model's device for each array of positions (into ``names``) of
        ``batches``, decoded in ``workers`` processes exactly as extraction decodes; failures are added
        to :attr:`failures`."""
        from torch.utils.data import DataLoader

        from mtaffect.features.base import normalise, pixels_to_unit
        from mtaffect.features.decode import ImageReader, ReaderBatches

        reader = ImageReader(folder, list(names), spec.input_size, spec.colour)
        # ReaderBatches is map-style without torch's Dataset base class (decode.py imports no torch)
        decoded: DataLoader[tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]] = DataLoader(
            ReaderBatches(reader, batches),  # type: ignore[arg-type]
            batch_size=None,
            num_workers=workers,
        )
        for pixels, _, failed in decoded:
            self.failures.extend(failed)
            x = pixels_to_unit(torch.as_tensor(pixels).to(self.device), spec.colour)
            yield normalise(x, spec.mean, spec.std)

    @torch.no_grad()
    def backbone_features(
        self, folder: str | os.PathLike, images: Sequence[str], batch_size: int = 256, workers: int = 0
    ) -> np.ndarray:
        """This model's backbone features (float32, one row per distinct name of ``images``) of face
        crops under ``folder``: what ``mtaffect extract --backbone run:<this run>`` stores, in memory.
        Unreadable images give zero rows and are listed in :attr:`failures`."""
        from mtaffect.models.image_model import ImageMTLModel

        bb = self.create_backbone()
        loop = ImageMTLModel(bb, self.model)
        names = list(dict.fromkeys(str(x) for x in images))
        self.failures = []
        batches = [np.arange(s, min(s + batch_size, len(names))) for s in range(0, len(names), batch_size)]
        out = np.zeros((len(names), bb.spec.feature_dim), dtype=np.float32)
        for pos, x in zip(batches, self._decoded(folder, names, batches, bb.spec, workers), strict=True):
            out[pos] = loop.backbone_outputs(x)["features"].float().cpu().numpy()
        bad = {n for n, _ in self.failures}
        if bad:
            out[[i for i, n in enumerate(names) if n in bad]] = 0.0
        return out

    @torch.no_grad()
    def predict_images(
        self,
        folder: str | os.PathLike,
        images: Sequence[str],
        batch_size: int = 256,
        workers: int = 0,
        *,
        allow_missing: bool = False,
        stores: Mapping[str, NamedStore] | StoreSet | None = None,
        extra: Mapping[str, np.ndarray] | None = None,
    ) -> PredictionTable:
        """A PredictionTable for ``images`` (names relative to ``folder``, e.g. a dataset's
        ``cropped_aligned``), decoded and normalised exactly as extraction does, through the backbone.

        ``workers`` decoding processes (0: decode here) prepare the next batches while the backbone
        runs. Unreadable images (missing, truncated) are an error counting them and naming the first
        few (:class:`mtaffect.features.reader.FailedImagesError`), as :meth:`predict_store`; with
        ``allow_missing`` the table gets a ``valid`` column, 0 for those rows (predicted from a black
        image, as extraction stores them: placeholders to filter or fill). ``self.failures`` lists them.

        A model that also reads named stores (``features@au``) takes them from ``stores``
        (``{name: store}``, read by image name) or ``extra`` (``{input name: array}``, one row per
        distinct name of ``images`` in order: what a combined model computes with the task models).
        """
        from mtaffect.features.reader import FailedImagesError, InputSource, StoreSet, check_valid
        from mtaffect.models.image_model import ImageMTLModel

        bb = self.create_backbone()
        loop = ImageMTLModel(bb, self.model)  # frozen: the same backbone -> head path as training
        names = list(dict.fromkeys(str(x) for x in images))
        self.failures = []
        named_valid = None
        read_named: Callable[[np.ndarray], Mapping[str, Any]] | None = None
        if self.store_inputs and extra is not None:
            missing = [i for i in self.store_inputs if i not in extra]
            if missing:
                raise ValueError(f"extra lacks {missing}, which this model reads")

            def read_named(pos: np.ndarray) -> dict:
                return {i: torch.from_numpy(np.asarray(extra[i])[pos]) for i in self.store_inputs}
        elif self.store_inputs:
            if not stores:
                raise self._needs_stores()
            sset = stores if isinstance(stores, StoreSet) else StoreSet.open(dict(stores))
            self._check_named(sset)
            rows = sset.rows(names)
            named_valid = check_valid(sset, rows, names, allow_missing=allow_missing)
            read_named = InputSource(sset, rows, self.store_inputs, in_memory=False).get

        def inputs(batches: list[np.ndarray]):
            for pos, x in zip(batches, self._decoded(folder, names, batches, bb.spec, workers), strict=True):
                arrays = loop.backbone_outputs(x)
                if read_named is not None:
                    arrays.update(read_named(pos))
                yield arrays

        table = self._predict_units(inputs, images, batch_size)
        failed = dict(self.failures)
        if named_valid is not None:
            failed.update(
                {
                    n: "failed extraction in a named store"
                    for n, ok in zip(names, named_valid, strict=True)
                    if not ok
                }
            )
        if failed and not allow_missing:
            first = [f"{n} ({why})" for n, why in list(failed.items())[:5]]
            raise FailedImagesError(
                f"{len(failed)} of {len(names)} images could not be read under {folder}, e.g. "
                f"{'; '.join(first)}; fix them, or pass --allow-missing (allow_missing=True) to write "
                "their rows with valid = 0",
                list(failed),
            )
        if allow_missing:
            valid = np.array([n not in failed for n in table.frame["image"].astype(str)], dtype=np.int8)
            table = table.with_columns({"valid": valid})
        return table


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu", *, trust_remote_code: bool = False
) -> TrainedAffectModel:
    """Load the checkpoint folder ``path`` (safetensors only, no pickle; never an ensemble).

    Args:
        path: a folder written by :func:`mtaffect.models.checkpoint.save_checkpoint`.
        device: where the heads (and, when built, the backbone) run.
        trust_remote_code: lets an ``hf:`` backbone run the code its repository ships: the caller's
            decision, never the checkpoint's.

    Returns:
        The model, in eval mode on ``device``.
    """
    model, config = load_mtl_model(path)
    return TrainedAffectModel(model, config, device, path=path, trust_remote_code=trust_remote_code)


__all__ = ["TrainedAffectModel", "load_checkpoint"]
