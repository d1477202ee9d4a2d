"""Evaluation: triage metrics with bootstrap confidence intervals, calibration and operating points, retrieval.

```python
>>> from qdistill_hf.evaluation import compute_triage_metrics, make_compute_metrics
>>> metrics = compute_triage_metrics(labels, probabilities, threshold=model.config.decision_threshold)
>>> args = TrainingArguments(..., metric_for_best_model="auroc", load_best_model_at_end=True)
>>> trainer = Trainer(..., args=args, compute_metrics=make_compute_metrics())
```
"""

from .calibration import (
    calibrate_model,
    calibrated_probabilities,
    choose_threshold,
    fit_temperature,
    reliability_curve,
)
from .metrics import bootstrap_auroc, calibration_bins, compute_triage_metrics, make_compute_metrics, softmax
from .retrieval import recall_at_k, teacher_similarity_matrix


__all__ = [
    "compute_triage_metrics",
    "make_compute_metrics",
    "bootstrap_auroc",
    "calibration_bins",
    "softmax",
    "fit_temperature",
    "choose_threshold",
    "calibrate_model",
    "calibrated_probabilities",
    "reliability_curve",
    "recall_at_k",
    "teacher_similarity_matrix",
]
