"""The Trainers' default `compute_metrics`: the evaluation module's triage metrics on the triage logits."""

from ..evaluation.metrics import make_compute_metrics


compute_auroc_metrics = make_compute_metrics()
compute_auroc_metrics.__name__ = compute_auroc_metrics.__qualname__ = "compute_auroc_metrics"
compute_auroc_metrics.__doc__ = """
    Validation metrics of the triage logits for `Trainer(compute_metrics=...)`: `make_compute_metrics()` with its
    defaults (argmax decisions, no bootstrap), i.e. a flat `dict[str, float]` with `auroc`, `accuracy`, `macro_f1`,
    `sensitivity`, `specificity`, `average_precision`, the operating points, `ece`, `brier`, ...

    With `metric_for_best_model="auroc"` and `load_best_model_at_end=True` the Trainer keeps the checkpoint with the
    best `eval_auroc`. Build another with `qdistill_hf.evaluation.make_compute_metrics(threshold=..., n_bootstrap=...)`.

    Args:
        eval_pred (`EvalPrediction`): `predictions` = logits `(n, num_labels)`, `label_ids` = class ids `(n,)`.

    Raises:
        ValueError: if the evaluation labels hold a single class (AUROC undefined), logits are not finite (row named)
            or shapes disagree.
    """


__all__ = ["compute_auroc_metrics"]
