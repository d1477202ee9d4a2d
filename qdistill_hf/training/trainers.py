"""The Q-DISTILL teacher and distillation `Trainer`s, their callbacks and the teacher/student compatibility check."""

import logging
from collections import defaultdict

import torch
from accelerate.utils import extract_model_from_parallel
from transformers import AutoModel, PreTrainedModel, Trainer, TrainerCallback

from ..models.loss_qdistill import (
    distillation_kl_loss,
    embedding_alignment_loss,
    image_text_contrastive_loss,
    query_text_similarity,
    report_positive_mask,
)
from .arguments import QDistillTrainingArguments
from .collator import QDistillDataCollator
from .teacher_cache import attention_alignment_loss, compute_teacher_targets, cross_attention_map


logger = logging.getLogger(__name__)

_IMAGE_KEYS = ("image_features", "pixel_values")
_VISION_BOOKKEEPING_KEYS = ("transformers_version", "_name_or_path", "architectures", "torch_dtype", "dtype",
                            "model_type", "auto_map")


class ClampLogitScaleCallback(TrainerCallback):
    """After every optimizer step, apply the teacher's one documented bound (`model.clamp_logit_scale()`)."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is not None:
            extract_model_from_parallel(model).clamp_logit_scale()


class _QDistillTrainerMixin:
    """Per-component loss logging (TRL pattern), study-id errors, and an eval step returning (loss, logits, labels)."""

    # Fixed per class so that every process gathers tensors of the same shape.
    _metric_names: tuple[str, ...] = ()
    # The returned loss is a per-batch mean: the Trainer divides it by the gradient accumulation steps.
    loss_is_scaled_for_ga = False

    def _init_metrics(self):
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def _record(self, mode: str, values: dict[str, torch.Tensor | float | None]) -> None:
        # Detached tensors, not Python floats: no host sync per step; `log` reads them all at once.
        for name, value in values.items():
            if value is not None:
                self._metrics[mode][name].append(value.detach() if torch.is_tensor(value) else float(value))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """
        Add the buffered loss components (means since the last log, `eval_`-prefixed after an evaluation) and log.

        Under several processes the components are averaged over all of them with one gather, so every process must
        call `log` at the same points, as the Trainer itself does.
        """
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        device = self.accelerator.device
        rows = []
        for name in self._metric_names:
            values = self._metrics[mode].get(name, [])
            total = (
                torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values]).sum()
                if values else torch.zeros((), dtype=torch.float64, device=device)
            )
            rows.append(torch.stack([total, torch.tensor(float(len(values)), dtype=torch.float64, device=device)]))
        sums = torch.stack(rows) if rows else torch.zeros(0, 2, dtype=torch.float64, device=device)
        if self.accelerator.num_processes > 1 and len(self._metric_names):
            sums = self.accelerator.gather(sums[None]).sum(dim=0)
        prefix = "eval_" if mode == "eval" else ""
        for name, (total, count) in zip(self._metric_names, sums.tolist()):
            if count > 0:
                logs[f"{prefix}{name}"] = total / count
        self._metrics[mode].clear()
        super().log(logs, start_time)

    def _step_context(self, study_ids) -> str:
        return f"global step {self.state.global_step}, studies {study_ids}"

    def _raise_non_finite(self, loss, components: dict, study_ids) -> None:
        shown = ", ".join(f"{k}={float(v.detach()):.6g}" for k, v in components.items() if v is not None)
        raise FloatingPointError(
            f"Non-finite loss {float(loss.detach())} at {self._step_context(study_ids)} ({shown})."
        )

    def _forward(self, model, study_ids, **inputs):
        """
        `model(**inputs)`, with the model's input errors naming the step and the batch's study ids.

        In eager mode the Q-DISTILL models validate every batch themselves at the start of `forward`
        (`validate_model_inputs`). A compiled forward (`args.torch_compile`) keeps only the free shape checks, so the
        value checks (finite films, token ids in the vocabulary, labels in range, ...) run here once per batch through
        `model.validate_batch`.
        """
        try:
            if getattr(self.args, "torch_compile", False):
                unwrapped = self.accelerator.unwrap_model(model)
                if hasattr(unwrapped, "validate_batch"):
                    unwrapped.validate_batch(**inputs)
            return model(**inputs)
        except FloatingPointError as error:
            raise FloatingPointError(f"{error} At {self._step_context(study_ids)}.") from error
        except ValueError as error:
            raise ValueError(f"{error} At {self._step_context(study_ids)}.") from error

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        labels = inputs.get("labels")
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        loss = None if loss is None else loss.detach().mean()
        if prediction_loss_only:
            return loss, None, None
        logits = outputs.logits.detach() if outputs.logits is not None else None
        return loss, logits, None if labels is None else labels.detach()


class QDistillTeacherTrainer(_QDistillTrainerMixin, Trainer):
    """
    [`~transformers.Trainer`] for the Q-DISTILL teacher on its own loss (ITC + ITM + focal classification).

    Differences from the plain `Trainer`:

    - `loss_itc`, `loss_itm`, `loss_cls` are logged separately (averaged between logging steps; `eval_` in eval);
    - [`ClampLogitScaleCallback`] applies `model.clamp_logit_scale()` after every optimizer step;
    - a non-finite loss raises `FloatingPointError` naming `state.global_step` and the batch's study ids;
    - the default collator is [`QDistillDataCollator.for_teacher`] built from `processing_class` and `args`;
    - evaluation returns `eval_loss` and the triage logits, for a `compute_metrics` such as
      [`compute_auroc_metrics`];
    - with `args.gather_itc_features`, ITC is computed over the embeddings of all processes (see
      [`QDistillTrainingArguments`]).

    Batches are [`QDistillDataCollator`] dicts: `image_features` or `pixel_values`, `input_ids`, `attention_mask`,
    `labels`, `study_ids`.
    """

    _tag_names = ["qdistill", "qdistill-teacher"]
    _metric_names = ("loss_itc", "loss_itm", "loss_cls")

    def __init__(self, model=None, args=None, data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, callbacks=None, **kwargs):
        if args is None:
            args = QDistillTrainingArguments(output_dir="trainer_output")
        _check_args(args)
        if getattr(args, "gather_itc_features", False) and not hasattr(model, "logit_scale"):
            raise ValueError("gather_itc_features needs a QDistillTeacherModel (with its ITC `logit_scale`).")
        if data_collator is None:
            data_collator = QDistillDataCollator.for_teacher(processing_class, args)
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks, **kwargs)
        self._init_metrics()
        self.add_callback(ClampLogitScaleCallback())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        study_ids = inputs.pop("study_ids", None)
        for key in [k for k in inputs if k.startswith("teacher_")]:
            inputs.pop(key)
        mode = "train" if model.training else "eval"
        outputs = self._forward(model, study_ids, **inputs, return_loss=True)
        loss = outputs.loss
        components = {"loss_itc": outputs.loss_itc, "loss_itm": outputs.loss_itm, "loss_cls": outputs.loss_cls}
        if getattr(self.args, "gather_itc_features", False) and self.accelerator.num_processes > 1:
            loss, components["loss_itc"] = self._gathered_itc(model, inputs, outputs)
        if loss is None:
            raise ValueError(
                f"The teacher returned no loss at {self._step_context(study_ids)}: a batch needs at least 2 films "
                "for ITC, or labels."
            )
        if not torch.isfinite(loss):
            self._raise_non_finite(loss, components, study_ids)
        self._record(mode, components)
        return (loss, outputs) if return_outputs else loss

    def _gathered_itc(self, model, inputs, outputs):
        """ITC over all processes' embeddings (other processes' without gradient), replacing the local ITC term."""
        teacher = self.accelerator.unwrap_model(model)
        config = teacher.config
        image_embeds, text_embeds = outputs.image_embeds, outputs.text_embeds
        input_ids, attention_mask = inputs["input_ids"], inputs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        sizes = self.accelerator.gather(torch.tensor([image_embeds.shape[0]], device=image_embeds.device)).tolist()
        if len(set(sizes)) != 1:
            raise ValueError(f"gather_itc_features needs equal per-process batch sizes, got {sizes}; "
                             "set dataloader_drop_last=True.")
        padded_ids = self.accelerator.pad_across_processes(input_ids, dim=1, pad_index=0)
        padded_mask = self.accelerator.pad_across_processes(attention_mask, dim=1, pad_index=0)
        all_ids = self.accelerator.gather(padded_ids)
        all_mask = self.accelerator.gather(padded_mask)
        all_image = list(self.accelerator.gather(image_embeds.detach().contiguous()).chunk(world))
        all_text = list(self.accelerator.gather(text_embeds.detach().contiguous()).chunk(world))
        all_image[rank], all_text[rank] = image_embeds, text_embeds
        all_image, all_text = torch.cat(all_image), torch.cat(all_text)
        similarity = query_text_similarity(all_image, all_text, config.query_selection,
                                           config.query_selection_temperature)
        logits_per_image = similarity * teacher.logit_scale.exp().float()
        loss_itc = image_text_contrastive_loss(logits_per_image, report_positive_mask(all_ids, all_mask))
        # The model's loss holds the local ITC term (absent for a one-film batch): swap it for the global one.
        local_itc = outputs.loss_itc if outputs.loss_itc is not None else 0.0
        base = outputs.loss if outputs.loss is not None else 0.0
        loss = base + config.itc_loss_weight * (loss_itc - local_itc)
        return loss, loss_itc


class QDistillDistillationTrainer(_QDistillTrainerMixin, Trainer):
    """
    [`~transformers.Trainer`] that distils a [`QDistillStudentModel`] from a frozen [`QDistillTeacherModel`].

    Loss = `feature_mse_weight * MSE + feature_cosine_weight * (1 - cos)` between the student's `projected_output` and
    the teacher's pooled queries for `args.distill_target`, `+ logit_kd_weight * T**2 * KL` on the triage logits at
    the current temperature, `+ attention_alignment_weight *` [`attention_alignment_loss`] of the two models'
    averaged cross-attention maps ([`cross_attention_map`]), `+ supervised_weight *`
    the student's focal loss on `labels`. Each component is logged (`kd_mse`, `kd_cosine`, `kd_logits`,
    `kd_attention`, `loss_supervised`, `kd_temperature`).

    The teacher is loaded with `AutoModel.from_pretrained` when given as a string (or taken from
    `args.teacher_model_name_or_path`), moved to `self.accelerator.device`, put in eval mode with
    `requires_grad_(False)`, and never wrapped by DDP/FSDP; it runs under `torch.no_grad()`. When a batch carries
    cached targets (`teacher_pooled`, `teacher_logits`, see [`cache_teacher_targets`]) the teacher is not run at all;
    `teacher_model` may then be `None`.

    Args:
        model ([`QDistillStudentModel`]): the student.
        teacher_model (`str` or [`QDistillTeacherModel`], *optional*): the trained teacher.
        args ([`QDistillTrainingArguments`]): training and distillation settings.
        Other arguments as for [`~transformers.Trainer`]; the default `data_collator` is
        [`QDistillDataCollator.for_distillation`] built from `processing_class`, `args` and the student config.
    """

    _tag_names = ["qdistill", "qdistill-student", "distillation"]
    _metric_names = ("kd_mse", "kd_cosine", "kd_logits", "kd_attention", "loss_supervised", "kd_temperature")

    def __init__(self, model=None, teacher_model: str | PreTrainedModel | None = None, args=None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, callbacks=None, **kwargs):
        if args is None:
            args = QDistillTrainingArguments(output_dir="trainer_output")
        if not isinstance(args, QDistillTrainingArguments):
            raise TypeError(f"QDistillDistillationTrainer needs QDistillTrainingArguments, got {type(args).__name__}.")
        _check_args(args)
        if model is None:
            raise ValueError("QDistillDistillationTrainer needs the student `model`.")
        if teacher_model is None and args.teacher_model_name_or_path is not None:
            teacher_model = args.teacher_model_name_or_path
        if isinstance(teacher_model, str):
            teacher_model = AutoModel.from_pretrained(teacher_model)
        if teacher_model is not None:
            check_teacher_student_compatibility(model, teacher_model, args)
        else:
            logger.warning("No teacher model: every batch must carry cached teacher targets (cache_teacher_targets).")
        if data_collator is None:
            data_collator = QDistillDataCollator.for_distillation(processing_class, args, model.config)
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks, **kwargs)
        self._init_metrics()
        if teacher_model is not None:
            teacher_model = teacher_model.to(self.accelerator.device).eval().requires_grad_(False)
        self.teacher_model = teacher_model

    def current_kd_temperature(self) -> float:
        """The logit-distillation temperature at the current optimizer step."""
        return self.args.kd_temperature_at(self.state.global_step, self.state.max_steps or 0)

    def _targets(self, inputs: dict, teacher_inputs: dict, study_ids) -> dict[str, torch.Tensor]:
        need_attention = self.args.attention_alignment_weight > 0
        if "teacher_pooled" in teacher_inputs and "teacher_logits" in teacher_inputs:
            kinds = set(teacher_inputs.get("teacher_target") or [])
            if kinds != {self.args.distill_target}:
                raise ValueError(
                    f"Cached teacher targets are of kind {sorted(kinds)} but distill_target is "
                    f"{self.args.distill_target!r} (studies {study_ids}); recompute the cache with "
                    f"target={self.args.distill_target!r}."
                )
            if need_attention and "teacher_attention" not in teacher_inputs:
                raise ValueError(
                    "attention_alignment_weight > 0 but the cached teacher targets have no 'teacher_attention'; "
                    "recompute them with cache_teacher_targets(..., with_attention=True)."
                )
            targets = {"pooled": teacher_inputs["teacher_pooled"], "logits": teacher_inputs["teacher_logits"]}
            if need_attention:
                targets["attention"] = teacher_inputs["teacher_attention"]
            return targets
        if self.teacher_model is None:
            raise ValueError(
                f"No teacher model and no cached teacher targets in the batch (studies {study_ids}); pass "
                "`teacher_model` or add targets with cache_teacher_targets."
            )
        batch = {key: inputs[key] for key in _IMAGE_KEYS if key in inputs}
        batch.update(teacher_inputs)
        self.teacher_model.eval()
        with torch.no_grad():
            return compute_teacher_targets(self.teacher_model, batch, self.args.distill_target, need_attention)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        study_ids = inputs.pop("study_ids", None)
        teacher_inputs = {key: inputs.pop(key) for key in [k for k in inputs if k.startswith("teacher_")]}
        mode = "train" if model.training else "eval"
        need_attention = args.attention_alignment_weight > 0
        # The teacher (live or cached) is consulted only when a term that reads its targets is weighted.
        need_targets = need_attention or any(
            weight > 0 for weight in (args.feature_mse_weight, args.feature_cosine_weight, args.logit_kd_weight)
        )
        targets = self._targets(inputs, teacher_inputs, study_ids) if need_targets else None

        labels = inputs.get("labels")
        outputs = self._forward(model, study_ids, **inputs, output_attentions=need_attention or None)
        temperature = self.current_kd_temperature()
        components = {}
        loss = outputs.logits.new_zeros((), dtype=torch.float32)
        if targets is not None:
            kd_mse, kd_cosine = embedding_alignment_loss(outputs.projected_output, targets["pooled"])
            kd_logits = distillation_kl_loss(outputs.logits, targets["logits"], temperature)
            components.update(kd_mse=kd_mse, kd_cosine=kd_cosine, kd_logits=kd_logits)
            loss = loss + args.feature_mse_weight * kd_mse + args.feature_cosine_weight * kd_cosine
            loss = loss + args.logit_kd_weight * kd_logits
        if need_attention:
            student_map = cross_attention_map(outputs.cross_attentions)
            kd_attention = attention_alignment_loss(student_map, targets["attention"])
            components["kd_attention"] = kd_attention
            loss = loss + args.attention_alignment_weight * kd_attention
        if labels is not None:
            # The student's own loss: focal loss on the labels with its configured gamma and alpha.
            components["loss_supervised"] = outputs.loss
            loss = loss + args.supervised_weight * outputs.loss
        elif args.supervised_weight > 0 and mode == "train":
            raise ValueError(f"supervised_weight > 0 but the batch has no labels ({self._step_context(study_ids)}).")
        if not torch.isfinite(loss):
            self._raise_non_finite(loss, components, study_ids)
        self._record(mode, {**components, "kd_temperature": temperature})
        outputs.loss = loss
        return (loss, outputs) if return_outputs else loss


def _check_args(args) -> None:
    if getattr(args, "remove_unused_columns", False):
        raise ValueError(
            "remove_unused_columns=True drops the raw columns the Q-DISTILL collator reads; set "
            "remove_unused_columns=False (the QDistillTrainingArguments default)."
        )


def _vision_dict(config) -> dict:
    values = config.vision_config.to_dict()
    for key in _VISION_BOOKKEEPING_KEYS:
        values.pop(key, None)
    return values


def check_teacher_student_compatibility(student, teacher, args: QDistillTrainingArguments | None = None) -> None:
    """
    Raise `ValueError` (naming the fix) unless `student` can be distilled from `teacher`.

    Checks: the same vision encoder configuration; the same `id2label`; `student.config.teacher_hidden_size` equal
    to the teacher's Q-Former hidden size (the projection target); a `pseudo_report` student has a
    `student_text_column` other than the teacher's report column. Different vision encoder *weights* only warn (with
    cached features both models read the same tokens anyway).
    """
    problems = []
    s_cfg, t_cfg = student.config, teacher.config
    s_vision, t_vision = _vision_dict(s_cfg), _vision_dict(t_cfg)
    differing = sorted(k for k in set(s_vision) | set(t_vision) if s_vision.get(k) != t_vision.get(k))
    if differing:
        shown = ", ".join(f"{k}: student {s_vision.get(k)!r} vs teacher {t_vision.get(k)!r}" for k in differing)
        problems.append(f"the vision encoders differ ({shown}); build the student with the teacher's vision_config")
    if dict(s_cfg.id2label) != dict(t_cfg.id2label):
        problems.append(
            f"id2label differs (student {dict(s_cfg.id2label)} vs teacher {dict(t_cfg.id2label)}); build the student "
            "with id2label=teacher.config.id2label"
        )
    teacher_hidden = t_cfg.qformer_config.hidden_size
    if s_cfg.teacher_hidden_size != teacher_hidden:
        problems.append(
            f"student.config.teacher_hidden_size is {s_cfg.teacher_hidden_size} but the teacher's Q-Former hidden size "
            f"is {teacher_hidden}; build the student with teacher_hidden_size={teacher_hidden}"
        )
    if args is not None and s_cfg.text_mode == "pseudo_report":
        if not args.student_text_column:
            problems.append("the student reads a pseudo-report (text_mode='pseudo_report') but "
                            "student_text_column is None; set it to the pseudo-report column")
        elif args.student_text_column == args.teacher_text_column:
            problems.append("student_text_column equals teacher_text_column: the student must not read the human "
                            "report; set student_text_column to the pseudo-report column")
    if problems:
        raise ValueError("The student cannot be distilled from this teacher: " + "; ".join(problems) + ".")
    if not differing and hasattr(student, "vision_model") and hasattr(teacher, "vision_model"):
        s_state, t_state = student.vision_model.state_dict(), teacher.vision_model.state_dict()
        same = s_state.keys() == t_state.keys() and all(
            torch.equal(s_state[k].cpu(), t_state[k].cpu()) for k in s_state
        )
        if not same:
            logger.warning(
                "The student's and the teacher's vision encoder weights differ; with pixel inputs they see different "
                "image tokens. Load the same encoder weights into both (cached features are unaffected)."
            )


__all__ = [
    "ClampLogitScaleCallback",
    "QDistillDistillationTrainer",
    "QDistillTeacherTrainer",
    "check_teacher_student_compatibility",
]
