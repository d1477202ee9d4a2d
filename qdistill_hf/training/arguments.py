"""`QDistillTrainingArguments`: `TrainingArguments` plus the Q-DISTILL teacher and distillation settings."""

from dataclasses import dataclass, field
from typing import Literal

from transformers import TrainingArguments


DISTILL_TARGETS = ("bi", "uni")


@dataclass
class QDistillTrainingArguments(TrainingArguments):
    r"""
    Configuration for [`QDistillTeacherTrainer`] and [`QDistillDistillationTrainer`].

    Only the parameters specific to Q-DISTILL are listed here. For the others, see [`~transformers.TrainingArguments`].
    Like every `TrainingArguments`, this class can be turned into command-line flags with
    [`~transformers.HfArgumentParser`].

    Parameters that control the teacher:

        teacher_model_name_or_path (`str`, *optional*):
            Folder or Hub id of the trained teacher that [`QDistillDistillationTrainer`] loads with
            `AutoModel.from_pretrained` when no `teacher_model` object is passed.
        teacher_text_column (`str`, *optional*, defaults to `"report"`):
            Dataset column with the human report the teacher reads (training the teacher; `distill_target="bi"`).
        gather_itc_features (`bool`, *optional*, defaults to `False`):
            Teacher training only: compute the image-text contrastive loss over the ITC embeddings of all processes
            (open_clip `gather_features` semantics: the other processes' embeddings enter without gradient, this
            process's with gradient), instead of within each process's batch. Every process then computes the same
            global-batch ITC value (tested equal to the single-process ITC of the whole batch), and after DDP's
            gradient averaging the update is that loss's gradient divided by the number of processes. Needs equal
            per-process batch sizes (`dataloader_drop_last=True`). ITM and classification stay per process.

    Parameters that control distillation:

        distill_target (`str`, *optional*, defaults to `"bi"`):
            Which teacher representation the student imitates. `"bi"`: the teacher sees the film and the human report
            and its bidirectional pooled queries and triage logits are the targets (the original code's default).
            `"uni"`: the teacher sees the film alone; the targets are its unimodal pooled queries and its classifier
            applied to them.
        feature_mse_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the MSE between the student's `projected_output` and the teacher's pooled queries.
        feature_cosine_weight (`float`, *optional*, defaults to `1.0`):
            Weight of `1 - cos` between the same two vectors.
        logit_kd_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the Hinton logit loss `T**2 * KL(softmax(teacher / T) || softmax(student / T))`.
        kd_temperature (`float`, *optional*, defaults to `2.0`):
            Temperature `T` of the logit loss (at the first step when `kd_temperature_final` is set).
        kd_temperature_final (`float`, *optional*):
            When set, `T` decreases linearly from `kd_temperature` at step 0 to this value at the last step.
        attention_alignment_weight (`float`, *optional*, defaults to `0.0`):
            Weight of the attention alignment loss: each model's query-to-image cross-attention probabilities are
            averaged over cross-attention layers, heads and queries into one distribution over the `T` image tokens,
            and the loss is the mean squared error between `T * student_map` and `T * teacher_map` (uniform attention
            is 1 on that scale), averaged over image tokens and films. `0` skips it (and the attention computation).
        supervised_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the student's own focal loss on the labels.
        student_text_column (`str`, *optional*, defaults to `"pseudo_report"`):
            Dataset column with the text a `text_mode="pseudo_report"` student reads (ignored for an `image_only`
            student). It must not be the teacher's human-report column.

    Parameters that control data:

        feature_cache_dir (`str`, *optional*):
            Folder where caches computed for training (frozen image features, teacher targets) are written. `None`:
            beside the dataset's own Arrow files (file-backed datasets only).

    NOTE: defaults changed from `TrainingArguments`:

        - `remove_unused_columns=False`: the collator reads raw columns (`report`, `pseudo_report`, `image`,
          `image_features`, `study_id`) that are not arguments of `model.forward`.
        - `report_to="none"`: no experiment tracker unless asked for.
        - `logging_steps=10`: the per-component losses are worth seeing on small runs.
    """

    # Teacher.
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Folder or Hub id of the trained teacher to distil from (loaded with AutoModel)."},
    )
    teacher_text_column: str = field(
        default="report", metadata={"help": "Dataset column with the human report the teacher reads."}
    )
    gather_itc_features: bool = field(
        default=False,
        metadata={"help": "Teacher training: contrastive loss over the ITC embeddings of all processes (open_clip)."},
    )
    # Distillation.
    distill_target: Literal["bi", "uni"] = field(
        default="bi",
        metadata={
            "help": "Teacher representation to imitate: 'bi' (film + human report, bidirectional queries) or "
            "'uni' (film only, unimodal queries).",
            "choices": list(DISTILL_TARGETS),
        },
    )
    feature_mse_weight: float = field(
        default=1.0, metadata={"help": "Weight of the MSE between student projected and teacher pooled queries."}
    )
    feature_cosine_weight: float = field(
        default=1.0, metadata={"help": "Weight of 1 - cosine between student projected and teacher pooled queries."}
    )
    logit_kd_weight: float = field(default=1.0, metadata={"help": "Weight of the T^2-scaled KL logit distillation."})
    kd_temperature: float = field(default=2.0, metadata={"help": "Temperature of the logit distillation."})
    kd_temperature_final: float | None = field(
        default=None,
        metadata={"help": "If set, the temperature decreases linearly from kd_temperature to this over training."},
    )
    attention_alignment_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the MSE between token-count-scaled cross-attention maps (0 = off)."},
    )
    supervised_weight: float = field(default=1.0, metadata={"help": "Weight of the student's focal loss on labels."})
    student_text_column: str | None = field(
        default="pseudo_report",
        metadata={"help": "Dataset column with the text a pseudo_report student reads (ignored for image_only)."},
    )
    # Data.
    feature_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Folder for caches computed for training (features, teacher targets); default: beside "
                  "the dataset's Arrow files."},
    )
    # Changed defaults.
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Keep raw dataset columns: the Q-DISTILL collator reads them (default changed to False)."},
    )
    report_to: None | str | list[str] = field(
        default="none", metadata={"help": "Integrations to report results and logs to (default 'none')."}
    )
    logging_steps: float = field(
        default=10, metadata={"help": "Log every X update steps (int, or a ratio of total steps if < 1)."}
    )

    def __post_init__(self):
        problems = []
        if self.distill_target not in DISTILL_TARGETS:
            problems.append(f"distill_target must be one of {DISTILL_TARGETS}, got {self.distill_target!r}")
        for name in (
            "feature_mse_weight", "feature_cosine_weight", "logit_kd_weight", "attention_alignment_weight",
            "supervised_weight",
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
                problems.append(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("kd_temperature", "kd_temperature_final"):
            value = getattr(self, name)
            if value is None and name == "kd_temperature_final":
                continue
            if not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
                problems.append(f"{name} must be a finite number > 0, got {value!r}")
        weights = ("feature_mse_weight", "feature_cosine_weight", "logit_kd_weight", "attention_alignment_weight",
                   "supervised_weight")
        if all(isinstance(getattr(self, name), (int, float)) and getattr(self, name) == 0 for name in weights):
            problems.append(f"{', '.join(weights)} are all 0: the student would have no loss")
        if not self.teacher_text_column:
            problems.append("teacher_text_column must name the dataset's human-report column, got an empty value")
        if self.student_text_column is not None and self.student_text_column == self.teacher_text_column:
            problems.append(
                f"student_text_column and teacher_text_column are both {self.teacher_text_column!r}: the student "
                "must never read the human report; use the pseudo-report column (or None for an image_only student)"
            )
        if self.remove_unused_columns:
            problems.append(
                "remove_unused_columns=True drops the raw columns (report, image, study_id, ...) the Q-DISTILL "
                "collator reads; set remove_unused_columns=False"
            )
        if problems:
            raise ValueError("Invalid QDistillTrainingArguments: " + "; ".join(problems) + ".")
        super().__post_init__()

    def kd_temperature_at(self, step: int, max_steps: int) -> float:
        """The logit-distillation temperature at optimizer step `step` of `max_steps` (linear schedule if set)."""
        if self.kd_temperature_final is None or max_steps <= 0:
            return float(self.kd_temperature)
        progress = min(max(step / max_steps, 0.0), 1.0)
        return float(self.kd_temperature + (self.kd_temperature_final - self.kd_temperature) * progress)


__all__ = ["DISTILL_TARGETS", "QDistillTrainingArguments"]
