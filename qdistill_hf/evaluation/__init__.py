"""Evaluation: triage metrics with bootstrap confidence intervals, calibration and operating points, retrieval.

```python
>>> from qdistill_hf.evaluation import compute_triage_metrics, make_compute_metrics
>>> metrics = compute_triage_metrics(labels, probabilities, threshold=model.config.decision_threshold)
>>> trainer = Trainer(..., compute_metrics=make_compute_metrics(), args=TrainingArguments(metric_for_best_model="auroc"))
```
"""

from .calibration import calibrate_model, choose_threshold, fit_temperature, reliability_curve
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
    "reliability_curve",
    "recall_at_k",
    "teacher_similarity_matrix",
]
