"""
Training: arguments, the collator, the teacher and distillation Trainers, the teacher-target cache, metrics.

Teacher on film + human report, then an image-only student distilled from it (cached encoder features here; raw
films work the same way through the processor's image processor):

```python
>>> from qdistill_hf.training import (QDistillTrainingArguments, QDistillTeacherTrainer,
...     QDistillDistillationTrainer, cache_teacher_targets, compute_auroc_metrics)
>>> args = QDistillTrainingArguments("out/teacher", eval_strategy="epoch", save_strategy="epoch",
...     metric_for_best_model="auroc", load_best_model_at_end=True)
>>> QDistillTeacherTrainer(model=teacher, args=args, train_dataset=train, eval_dataset=val,
...     processing_class=processor, compute_metrics=compute_auroc_metrics).train()
>>> train = cache_teacher_targets(train, teacher, processor, target="bi")   # optional: no live teacher
>>> args = QDistillTrainingArguments("out/student", distill_target="bi", kd_temperature=4.0,
...     kd_temperature_final=1.0, eval_strategy="epoch", save_strategy="epoch", metric_for_best_model="auroc",
...     load_best_model_at_end=True)
>>> QDistillDistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train,
...     eval_dataset=val, processing_class=processor, compute_metrics=compute_auroc_metrics).train()
```

Batches come from [`QDistillDataCollator`] (built by the trainers from `processing_class` and `args` when no
`data_collator` is given): `image_features` or `pixel_values`, `input_ids`/`attention_mask` (the text the trained
model reads), `teacher_input_ids`/`teacher_attention_mask` (the human report, distillation target `"bi"`), `labels`,
`study_ids`, and cached `teacher_pooled`/`teacher_logits`/`teacher_attention`/`teacher_target` when present.
"""

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
