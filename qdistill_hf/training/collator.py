"""`QDistillDataCollator`: dataset rows -> the tensors the Q-DISTILL trainers read, validated once per batch on CPU."""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


logger = logging.getLogger(__name__)

# Columns written by `cache_teacher_targets`, passed through to the batch under the same names.
TEACHER_TARGET_COLUMNS = ("teacher_pooled", "teacher_logits", "teacher_attention")


def _split_processor(processing_class) -> tuple[Any, Any]:
    """(tokenizer, image_processor) from a `QDistillProcessor`, a tokenizer or an image processor."""
    if processing_class is None:
        return None, None
    tokenizer = getattr(processing_class, "tokenizer", None)
    image_processor = getattr(processing_class, "image_processor", None)
    if tokenizer is None and image_processor is None:
        if hasattr(processing_class, "pad_token_id") or hasattr(processing_class, "convert_tokens_to_ids"):
            return processing_class, None
        return None, processing_class
    return tokenizer, image_processor


def _as_float_tensor(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(torch.float32)
    return torch.as_tensor(np.asarray(value, dtype=np.float32))


@dataclass
class QDistillDataCollator:
    """
    Turn a list of dataset rows (dicts) into one batch for the Q-DISTILL trainers.

    Images: the cached encoder tokens of `feature_column` (fp16 in the cache, float32 in the batch), else a
    `pixel_values` column, else the films of `image_column` through `image_processor`. Texts are tokenized with
    dynamic padding (`padding="longest"`, truncation to `max_length`).

    Output keys:
        - `image_features` (`(batch, tokens, hidden)` float32) or `pixel_values` (`(batch, 3, H, W)` float32);
        - `input_ids`, `attention_mask`: `text_column`, the text the model being trained reads (the report for the
          teacher, the pseudo-report for a `pseudo_report` student); absent when `text_column` is `None`;
        - `teacher_input_ids`, `teacher_attention_mask`: `teacher_text_column` (distillation with target `"bi"`);
        - `labels` (`LongTensor`), when `label_column` is set;
        - `study_ids` (`list[str]`): popped by the trainers before the forward pass and used in error messages;
        - `teacher_pooled`, `teacher_logits`, `teacher_attention` (float32) and `teacher_target` (`list[str]`),
          when the rows carry cached teacher targets (see [`cache_teacher_targets`]).

    Validation, once per batch: a missing column raises naming it and the available ones; a non-finite feature or
    pixel raises naming the study ids; an empty or missing text raises naming the study and the column.

    Args:
        tokenizer: tokenizer for the text columns (or a `QDistillProcessor`, whose tokenizer and image processor are
            used).
        image_processor (*optional*): image processor for the `image_column` films (needed only for raw images).
        text_column (`str`, *optional*): column read into `input_ids`/`attention_mask`.
        teacher_text_column (`str`, *optional*): column read into `teacher_input_ids`/`teacher_attention_mask`.
        label_column (`str`, *optional*, defaults to `"label"`): class ids; `None` for no labels.
        feature_column (`str`, *optional*, defaults to `"image_features"`): cached encoder tokens.
        image_column (`str`, *optional*, defaults to `"image"`): films.
        study_id_column (`str`, *optional*, defaults to `"study_id"`): ids used in error messages.
        max_length (`int`, *optional*): truncation length; defaults to the tokenizer's `model_max_length`.
        image_source (`str`, *optional*): force `"image_features"`, `"pixel_values"` or `"image"` instead of the
            automatic choice (first present of those, in this order).
    """

    tokenizer: Any = None
    image_processor: Any = None
    text_column: str | None = None
    teacher_text_column: str | None = None
    label_column: str | None = "label"
    feature_column: str = "image_features"
    image_column: str = "image"
    study_id_column: str = "study_id"
    max_length: int | None = None
    image_source: str | None = None

    def __post_init__(self):
        tokenizer, image_processor = _split_processor(self.tokenizer)
        self.tokenizer = tokenizer
        self.image_processor = self.image_processor if self.image_processor is not None else image_processor
        if (self.text_column or self.teacher_text_column) and self.tokenizer is None:
            raise ValueError(
                f"QDistillDataCollator reads text columns ({self.text_column!r}, {self.teacher_text_column!r}) but "
                "got no tokenizer; pass `tokenizer=` (a tokenizer or a QDistillProcessor)."
            )
        if self.image_source not in (None, "image_features", "pixel_values", "image"):
            raise ValueError(
                f"image_source must be 'image_features', 'pixel_values', 'image' or None, got {self.image_source!r}."
            )

    @classmethod
    def for_teacher(cls, processing_class, args, **kwargs) -> "QDistillDataCollator":
        """The collator for teacher training: film + `args.teacher_text_column` as `input_ids`, labels."""
        return cls(processing_class, text_column=args.teacher_text_column, **kwargs)

    @classmethod
    def for_distillation(cls, processing_class, args, student_config, **kwargs) -> "QDistillDataCollator":
        """
        The collator for distillation: film, the student's text (`args.student_text_column`, only for a
        `pseudo_report` student), the teacher's report (`args.teacher_text_column`, only for target `"bi"`), labels.
        """
        student_text = args.student_text_column if student_config.text_mode == "pseudo_report" else None
        teacher_text = args.teacher_text_column if args.distill_target == "bi" else None
        return cls(processing_class, text_column=student_text, teacher_text_column=teacher_text, **kwargs)

    # -- helpers --------------------------------------------------------------------------------------------------

    def _require(self, rows: Sequence[dict], column: str, purpose: str) -> list:
        missing = [i for i, row in enumerate(rows) if column not in row]
        if missing:
            available = sorted(rows[missing[0]].keys())
            raise KeyError(
                f"QDistillDataCollator needs column {column!r} ({purpose}) but batch rows {missing} lack it; "
                f"available columns: {available}. If you use the Trainer, set remove_unused_columns=False."
            )
        return [row[column] for row in rows]

    def _study_ids(self, rows: Sequence[dict]) -> list[str]:
        if all(self.study_id_column in row for row in rows):
            return [str(row[self.study_id_column]) for row in rows]
        return [f"<row {i} of batch>" for i in range(len(rows))]

    def _check_finite(self, name: str, values: torch.Tensor, study_ids: list[str]) -> None:
        finite = torch.isfinite(values.reshape(values.shape[0], -1)).all(dim=1)
        if not bool(finite.all()):
            bad = [study_ids[i] for i in (~finite).nonzero().flatten().tolist()]
            raise ValueError(f"Non-finite values in {name!r} for studies {bad}.")

    def _images(self, rows: Sequence[dict], study_ids: list[str]) -> dict[str, torch.Tensor]:
        source = self.image_source
        if source is None:
            keys = rows[0].keys()
            source = next((c for c in (self.feature_column, "pixel_values", self.image_column) if c in keys), None)
            if source is None:
                raise KeyError(
                    f"QDistillDataCollator found no image input: expected a column {self.feature_column!r} (cached "
                    f"features), 'pixel_values' or {self.image_column!r}; available columns: {sorted(keys)}."
                )
            source = {self.feature_column: "image_features", self.image_column: "image"}.get(source, source)
        if source == "image_features":
            values = self._require(rows, self.feature_column, "cached image features")
            tensor = torch.stack([_as_float_tensor(v) for v in values])
            self._check_finite(self.feature_column, tensor, study_ids)
            return {"image_features": tensor}
        if source == "pixel_values":
            values = self._require(rows, "pixel_values", "processed films")
            tensor = torch.stack([_as_float_tensor(v) for v in values])
            self._check_finite("pixel_values", tensor, study_ids)
            return {"pixel_values": tensor}
        images = self._require(rows, self.image_column, "films")
        if self.image_processor is None:
            raise ValueError(
                f"Batch rows carry raw films ({self.image_column!r}) but the collator has no image processor; pass "
                "`image_processor=` or a QDistillProcessor, or cache features with cache_image_features."
            )
        try:
            pixel_values = self.image_processor(images, return_tensors="pt")["pixel_values"]
        except (ValueError, TypeError, OSError) as error:
            raise ValueError(f"Could not process the films of studies {study_ids}: {error}") from error
        pixel_values = pixel_values.to(torch.float32)
        self._check_finite("pixel_values", pixel_values, study_ids)
        return {"pixel_values": pixel_values}

    def _text(self, rows: Sequence[dict], column: str, study_ids: list[str]) -> dict[str, torch.Tensor]:
        texts = self._require(rows, column, "text")
        empty = [study_ids[i] for i, text in enumerate(texts) if not isinstance(text, str) or not text.strip()]
        if empty:
            raise ValueError(f"Empty or missing text in column {column!r} for studies {empty}.")
        encoded = self.tokenizer(
            list(texts), padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    # -- call -----------------------------------------------------------------------------------------------------

    def __call__(self, rows: Sequence[dict]) -> dict[str, Any]:
        if len(rows) == 0:
            raise ValueError("QDistillDataCollator got an empty batch.")
        rows = [dict(row) for row in rows]
        study_ids = self._study_ids(rows)
        batch: dict[str, Any] = self._images(rows, study_ids)
        if self.text_column is not None:
            batch.update(self._text(rows, self.text_column, study_ids))
        if self.teacher_text_column is not None:
            teacher = self._text(rows, self.teacher_text_column, study_ids)
            batch["teacher_input_ids"] = teacher["input_ids"]
            batch["teacher_attention_mask"] = teacher["attention_mask"]
        if self.label_column is not None:
            labels = self._require(rows, self.label_column, "class labels")
            bad = [study_ids[i] for i, label in enumerate(labels) if isinstance(label, bool) or not _is_int(label)]
            if bad:
                raise ValueError(f"Column {self.label_column!r} must hold integer class ids; studies {bad} do not.")
            batch["labels"] = torch.tensor([int(label) for label in labels], dtype=torch.long)
        present = [column for column in TEACHER_TARGET_COLUMNS if column in rows[0]]
        for column in present:
            tensor = torch.stack([_as_float_tensor(v) for v in self._require(rows, column, "cached teacher target")])
            self._check_finite(column, tensor, study_ids)
            batch[column] = tensor
        if present:
            batch["teacher_target"] = [str(t) for t in self._require(rows, "teacher_target", "cached target kind")]
        batch["study_ids"] = study_ids
        return batch


def _is_int(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not value.is_floating_point()
    return isinstance(value, (int, np.integer))


__all__ = ["QDistillDataCollator", "TEACHER_TARGET_COLUMNS"]
