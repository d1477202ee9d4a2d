"""Training: arguments, collators, the teacher and distillation Trainers, callbacks."""

from .arguments import DISTILL_TARGETS, QDistillTrainingArguments
from .collator import TEACHER_TARGET_COLUMNS, QDistillDataCollator
from .metrics import compute_auroc_metrics
from .teacher_cache import (
    attention_alignment_loss,
    cache_teacher_targets,
    compute_teacher_targets,
    cross_attention_map,
    teacher_fingerprint,
)
from .trainers import (
    ClampLogitScaleCallback,
    QDistillDistillationTrainer,
    QDistillTeacherTrainer,
    check_teacher_student_compatibility,
)


__all__ = [
    "DISTILL_TARGETS",
    "TEACHER_TARGET_COLUMNS",
    "ClampLogitScaleCallback",
    "QDistillDataCollator",
    "QDistillDistillationTrainer",
    "QDistillTeacherTrainer",
    "QDistillTrainingArguments",
    "attention_alignment_loss",
    "cache_teacher_targets",
    "check_teacher_student_compatibility",
    "compute_auroc_metrics",
    "compute_teacher_targets",
    "cross_attention_map",
    "teacher_fingerprint",
]
