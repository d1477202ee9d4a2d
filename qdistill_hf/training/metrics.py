"""A minimal `compute_metrics` for the Trainers: validation AUROC and accuracy from the triage logits."""

import numpy as np


def compute_auroc_metrics(eval_pred) -> dict[str, float]:
    """
    AUROC and accuracy of the triage logits, for `Trainer(compute_metrics=...)`.

    With `metric_for_best_model="auroc"` and `load_best_model_at_end=True` the Trainer keeps the checkpoint with the
    best `eval_auroc`. Binary tasks: `roc_auc_score` of the softmax probability of class 1; more classes: macro
    one-vs-rest AUROC of the softmax probabilities. Accuracy: argmax of the logits.

    Args:
        eval_pred (`EvalPrediction`): `predictions` = logits `(n, num_labels)`, `label_ids` = class ids `(n,)`.

    Returns:
        `dict` with `auroc` and `accuracy`.

    Raises:
        ValueError: if the evaluation labels hold a single class (AUROC undefined) or shapes disagree.
    """
    from sklearn.metrics import roc_auc_score

    logits = eval_pred.predictions
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(eval_pred.label_ids).astype(np.int64).reshape(-1)
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"Expected logits (n, num_labels) and labels (n,), got {logits.shape} and {labels.shape}.")
    if not np.isfinite(logits).all():
        raise ValueError("Non-finite logits in evaluation predictions.")
    present = np.unique(labels)
    if present.size < 2:
        raise ValueError(f"AUROC is undefined: the evaluation labels hold a single class {present.tolist()}.")
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    if logits.shape[1] == 2:
        auroc = roc_auc_score(labels, probs[:, 1])
    else:
        auroc = roc_auc_score(labels, probs, multi_class="ovr", average="macro", labels=list(range(logits.shape[1])))
    accuracy = float((logits.argmax(axis=1) == labels).mean())
    return {"auroc": float(auroc), "accuracy": accuracy}


__all__ = ["compute_auroc_metrics"]
