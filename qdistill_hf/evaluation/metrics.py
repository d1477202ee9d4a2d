"""Triage metrics a clinician-researcher can trust: discrimination with a bootstrap CI, operating points, calibration.

One implementation, [`compute_triage_metrics`], serves the evaluation scripts, the local `evaluate` metric
(`metrics/cxr_triage`) and the Trainers' `compute_metrics` ([`make_compute_metrics`]).

Conventions (binary triage, class 1 = `"urgent"` = the positive class):

- **Decision at a threshold** `t`: urgent iff `p(urgent) >= t`. `threshold=None` means argmax, exactly what
  `model.triage_decisions` does without a stored threshold: urgent iff `p(urgent) > 0.5` (a tie goes to class 0);
  the reported `threshold` is then 0.5.
- **Sensitivity at >= 90% specificity**: the highest sensitivity over the points of the empirical ROC curve (every
  distinct score used as a threshold, `roc_curve(drop_intermediate=False)`) whose specificity is at least 0.90
  (a 1e-12 tolerance absorbs the rounding of `1 - FP / N`). Symmetrically, specificity at >= 90% sensitivity is the
  highest specificity over the ROC points whose sensitivity is at least 0.90. Same for 95%.
- **ECE**: `n_bins` equal-width bins over `[0, 1]` (bin `b` holds `edges[b] <= s < edges[b + 1]`, the last bin also
  holds `s = 1`); ECE = sum over non-empty bins of `(n_b / n) * |mean score in b - observed frequency in b|`. For
  binary triage the score is the predicted probability of the positive class and the frequency that of the positive
  class (a calibration statement about `p(urgent)` itself); for more classes the score is the max-probability
  confidence and the frequency the accuracy of the argmax.
- **Brier**: binary, mean `(p(urgent) - y)^2` (`sklearn.metrics.brier_score_loss`); more classes, the mean over
  studies of the squared error summed over classes against the one-hot label (scikit-learn's multi-class Brier).
- **AUROC CI**: percentile bootstrap; each resample draws studies (rows) with replacement using
  `np.random.default_rng(seed)`; `stratified=True` resamples each class separately, keeping the class counts.
  Resamples holding a single class are skipped and counted in `n_bootstrap_skipped`.

Every value that is `nan` has its reason in `nan_reasons`; remarks that do not make a value undefined (a constant
score, many skipped resamples) are in `notes`. Bad input (NaN, probabilities outside [0, 1], rows not summing to 1,
shapes that disagree, labels that are not class ids) raises a `ValueError` naming the row or the shapes.
"""

import logging
import math
from collections.abc import Callable, Sequence

import numpy as np


logger = logging.getLogger(__name__)

SUM_TOLERANCE = 1e-4
_OPERATING_TOLERANCE = 1e-12
SKIPPED_WARNING_FRACTION = 0.10
_OPERATING_POINT_KEYS = (
    "sensitivity_at_90_specificity",
    "sensitivity_at_95_specificity",
    "specificity_at_90_sensitivity",
    "specificity_at_95_sensitivity",
)
_BINARY_ONLY_KEYS = ("sensitivity", "specificity", "average_precision", *_OPERATING_POINT_KEYS, "n_positive", "prevalence")
# Keys of the flat Trainer dict that describe the call rather than the model.
_SETTINGS_KEYS = ("confidence", "n_bootstrap", "n_bootstrap_skipped", "seed", "stratified", "n_bins")


def _as_labels(labels, num_classes: int | None = None) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"`labels` must be a 1-D array of class ids, got shape {array.shape}.")
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"`labels` must hold integer class ids, got dtype {array.dtype}.")
    if np.issubdtype(array.dtype, np.floating):
        bad = np.flatnonzero(~np.isfinite(array) | (array != np.round(array)))
        if bad.size:
            raise ValueError(f"`labels` must hold integer class ids; row {bad[0]} holds {float(array[bad[0]])}.")
    array = array.astype(np.int64)
    if num_classes is not None:
        bad = np.flatnonzero((array < 0) | (array >= num_classes))
        if bad.size:
            raise ValueError(
                f"`labels` row {bad[0]} holds class {array[bad[0]]}, outside [0, {num_classes - 1}] for "
                f"{num_classes} classes."
            )
    return array


def _as_probabilities(probabilities, n_labels: int, labels_shape) -> np.ndarray:
    """Validated float64 probabilities: `(n,)` positive-class probabilities or `(n, k)` rows summing to 1."""
    array = np.asarray(probabilities, dtype=np.float64)
    if array.ndim not in (1, 2) or array.shape[0] != n_labels or (array.ndim == 2 and array.shape[1] < 2):
        raise ValueError(
            f"`probabilities` must have shape (n,) or (n, k >= 2) with n = len(labels); got probabilities "
            f"{array.shape} and labels {tuple(labels_shape)}."
        )
    if array.shape[0] == 0:
        raise ValueError("No studies to evaluate: `labels` and `probabilities` are empty.")
    rows = array if array.ndim == 1 else array.reshape(array.shape[0], -1)
    finite = np.isfinite(rows) if rows.ndim == 1 else np.isfinite(rows).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise ValueError(f"`probabilities` row {row} is not finite ({array[row].tolist()}).")
    inside = (rows >= 0) & (rows <= 1)
    inside = inside if inside.ndim == 1 else inside.all(axis=1)
    if not inside.all():
        row = int(np.flatnonzero(~inside)[0])
        raise ValueError(
            f"`probabilities` row {row} lies outside [0, 1] ({array[row].tolist()}); pass probabilities, not logits."
        )
    if array.ndim == 2:
        sums = array.sum(axis=1)
        bad = np.flatnonzero(np.abs(sums - 1.0) > SUM_TOLERANCE)
        if bad.size:
            raise ValueError(
                f"`probabilities` row {bad[0]} sums to {sums[bad[0]]:.6f}, not 1 (tolerance {SUM_TOLERANCE}); pass "
                "softmax probabilities."
            )
    return array


def calibration_bins(scores, outcomes, n_bins: int = 15) -> dict:
    """
    Equal-width binning of scores against observed outcomes: the one binning behind the ECE and reliability diagrams.

    Bin `b` holds the scores with `edges[b] <= s < edges[b + 1]`; the last bin also holds `s = 1`.

    Args:
        scores (`np.ndarray` of shape `(n,)`): predicted probabilities (or confidences) in `[0, 1]`.
        outcomes (`np.ndarray` of shape `(n,)`): 0/1 outcomes (the event the score predicts).
        n_bins (`int`, *optional*, defaults to 15): number of bins.

    Returns:
        `dict` with `bin_edges` `(n_bins + 1,)`, `counts` `(n_bins,)`, `mean_confidence` and `observed_frequency`
        `(n_bins,)` (`nan` in empty bins) and `ece` (`float`).
    """
    if not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"`n_bins` must be a positive integer, got {n_bins!r}.")
    scores = np.asarray(scores, dtype=np.float64)
    outcomes = np.asarray(outcomes, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.searchsorted(edges[1:-1], scores, side="right")
    counts = np.bincount(index, minlength=n_bins)
    score_sum = np.bincount(index, weights=scores, minlength=n_bins)
    outcome_sum = np.bincount(index, weights=outcomes, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.where(counts > 0, score_sum / np.maximum(counts, 1), np.nan)
        observed = np.where(counts > 0, outcome_sum / np.maximum(counts, 1), np.nan)
    filled = counts > 0
    ece = float(np.sum(counts[filled] / scores.size * np.abs(mean_confidence[filled] - observed[filled])))
    return {
        "bin_edges": edges,
        "counts": counts,
        "mean_confidence": mean_confidence,
        "observed_frequency": observed,
        "ece": ece,
    }


def _rank_auroc(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """
    Binary AUROC of each row by the Mann-Whitney statistic (average ranks for ties), vectorised over resamples.

    `labels` and `scores` have shape `(b, n)`; every row must hold both classes. Equals `roc_auc_score` (tested).
    """
    from scipy.stats import rankdata

    ranks = rankdata(scores, axis=1)
    positives = labels.sum(axis=1)
    negatives = labels.shape[1] - positives
    rank_sum = (ranks * labels).sum(axis=1)
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def _auroc_of_resamples(labels: np.ndarray, probabilities: np.ndarray, index: np.ndarray) -> np.ndarray:
    """AUROC (binary, or macro one-vs-rest) of the resamples `index` `(b, n)`; all classes present in each row."""
    if probabilities.ndim == 1:
        return _rank_auroc((labels[index] == 1).astype(np.float64), probabilities[index])
    per_class = [
        _rank_auroc((labels[index] == c).astype(np.float64), probabilities[:, c][index])
        for c in range(probabilities.shape[1])
    ]
    return np.mean(per_class, axis=0)


def _draw_resamples(rng: np.random.Generator, labels: np.ndarray, size: int, stratified: bool) -> np.ndarray:
    n = labels.size
    if not stratified:
        return rng.integers(0, n, size=(size, n))
    parts = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        parts.append(members[rng.integers(0, members.size, size=(size, members.size))])
    return np.concatenate(parts, axis=1)


def bootstrap_auroc(
    labels,
    probabilities,
    *,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    stratified: bool = False,
    chunk_size: int = 200,
) -> dict:
    """
    Percentile bootstrap confidence interval of the AUROC (binary, or macro one-vs-rest).

    Args:
        labels (`np.ndarray` of shape `(n,)`): class ids; every class must be present.
        probabilities (`np.ndarray` of shape `(n,)` or `(n, k)`): positive-class probabilities, or class
            probabilities (`k > 2`; macro one-vs-rest).
        n_bootstrap (`int`, *optional*, defaults to 1000): number of resamples drawn.
        confidence (`float`, *optional*, defaults to 0.95): coverage of the interval.
        seed (`int`, *optional*, defaults to 0): seed of `np.random.default_rng`.
        stratified (`bool`, *optional*, defaults to `False`): resample each class separately (class counts kept).
        chunk_size (`int`, *optional*, defaults to 200): resamples computed at once (memory).

    Returns:
        `dict` with `low`, `high` (`nan` when no resample was usable), `values` (AUROC of the usable resamples, in
        draw order), `n_skipped` (resamples holding fewer than all classes) and `reason` (`None` or why `nan`).
    """
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"`confidence` must lie in (0, 1), got {confidence}.")
    if n_bootstrap < 0:
        raise ValueError(f"`n_bootstrap` must be >= 0, got {n_bootstrap}.")
    num_classes = 2 if probabilities.ndim == 1 else probabilities.shape[1]
    rng = np.random.default_rng(seed)
    values, skipped, drawn = [], 0, 0
    while drawn < n_bootstrap:
        size = min(chunk_size, n_bootstrap - drawn)
        index = _draw_resamples(rng, labels, size, stratified)
        drawn += size
        present = np.stack([(labels[index] == c).any(axis=1) for c in range(num_classes)]).all(axis=0)
        skipped += int((~present).sum())
        if present.any():
            values.append(_auroc_of_resamples(labels, probabilities, index[present]))
    values = np.concatenate(values) if values else np.empty(0)
    if values.size == 0:
        reason = (
            "n_bootstrap=0: no confidence interval requested"
            if n_bootstrap == 0
            else f"all {n_bootstrap} bootstrap resamples held fewer than all classes"
        )
        return {"low": math.nan, "high": math.nan, "values": values, "n_skipped": skipped, "reason": reason}
    alpha = 1.0 - confidence
    low, high = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return {"low": float(low), "high": float(high), "values": values, "n_skipped": skipped, "reason": None}


def _operating_points(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    specificity = 1.0 - fpr
    out = {}
    for target in (90, 95):
        t = target / 100
        out[f"sensitivity_at_{target}_specificity"] = float(tpr[specificity >= t - _OPERATING_TOLERANCE].max())
        out[f"specificity_at_{target}_sensitivity"] = float(specificity[tpr >= t - _OPERATING_TOLERANCE].max())
    return out


def _f1_macro(confusion: np.ndarray, names: Sequence[str]) -> tuple[float, str | None]:
    tp = np.diag(confusion).astype(np.float64)
    denominator = 2 * tp + (confusion.sum(axis=0) - tp) + (confusion.sum(axis=1) - tp)
    undefined = [names[c] for c in np.flatnonzero(denominator == 0)]
    if undefined:
        return math.nan, (
            f"F1 of class(es) {undefined} is undefined: absent from both the labels and the predictions"
        )
    return float(np.mean(2 * tp / denominator)), None


def compute_triage_metrics(
    labels,
    probabilities,
    *,
    threshold: float | None = None,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    stratified: bool = False,
    n_bins: int = 15,
    label_names: Sequence[str] | None = None,
) -> dict:
    """
    Triage metrics of predicted probabilities against labels: accuracy, macro-F1, AUROC with a bootstrap CI, average
    precision, sensitivity/specificity at the threshold and at fixed operating points, ECE, Brier, confusion matrix.

    The conventions (threshold, operating points, ECE bins, Brier, bootstrap) are in the module docstring.

    Args:
        labels (array-like of shape `(n,)`): class ids (integers; integral floats are accepted).
        probabilities (array-like of shape `(n,)` or `(n, k)`): the probability of class 1 (binary), or class
            probabilities whose rows sum to 1. `k = 2` uses column 1; `k > 2` gives macro one-vs-rest AUROC,
            argmax accuracy, macro-F1 and confusion matrix, and `nan` (with a reason) for the binary-only keys.
        threshold (`float`, *optional*): binary operating threshold in (0, 1] on `p(class 1)`; `None` = argmax
            (urgent iff `p > 0.5`), reported as 0.5.
        n_bootstrap (`int`, *optional*, defaults to 1000): bootstrap resamples for the AUROC CI; 0 = no CI (`nan`).
        confidence (`float`, *optional*, defaults to 0.95): coverage of the CI.
        seed (`int`, *optional*, defaults to 0): bootstrap seed (same seed, same CI).
        stratified (`bool`, *optional*, defaults to `False`): resample each class separately.
        n_bins (`int`, *optional*, defaults to 15): ECE bins.
        label_names (`Sequence[str]`, *optional*): class names for messages; defaults to `("non_urgent", "urgent")`
            for binary triage and `"0"`, `"1"`, ... otherwise.

    Returns:
        `dict` with `n`, `n_classes`, `class_counts`, `n_positive`, `prevalence`, `threshold`, `accuracy`,
        `macro_f1`, `sensitivity`, `specificity`, `auroc`, `auroc_ci_low`, `auroc_ci_high`, `average_precision`,
        `sensitivity_at_90_specificity`, `sensitivity_at_95_specificity`, `specificity_at_90_sensitivity`,
        `specificity_at_95_sensitivity`, `ece`, `brier`, `confusion_matrix` (list of lists, rows = true class, columns
        = predicted class, in label order), `confidence`, `n_bootstrap`, `n_bootstrap_skipped`, `stratified`, `seed`,
        `label_names`, `nan_reasons` (key -> reason, for every `nan` value) and `notes` (key -> remark).

    Raises:
        ValueError: shapes that disagree (both shapes named), non-finite probabilities or probabilities outside
            [0, 1] or rows not summing to 1 (row named), labels that are not class ids in range (row named), a
            threshold outside (0, 1] or given for more than two classes.

    Example:

    ```python
    >>> from qdistill_hf.evaluation import compute_triage_metrics
    >>> m = compute_triage_metrics([0, 0, 1, 1], [0.1, 0.6, 0.4, 0.9], n_bootstrap=0)
    >>> m["auroc"], m["accuracy"]
    (0.75, 0.5)
    ```
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    labels_in = np.asarray(labels)
    probabilities = _as_probabilities(probabilities, labels_in.shape[0] if labels_in.ndim else -1, labels_in.shape)
    if probabilities.ndim == 2 and probabilities.shape[1] == 2:
        probabilities = probabilities[:, 1]
    binary = probabilities.ndim == 1
    num_classes = 2 if binary else probabilities.shape[1]
    labels = _as_labels(labels_in, num_classes)
    if label_names is None:
        from ..labels.policy import LABEL_NAMES

        label_names = LABEL_NAMES if binary else tuple(str(c) for c in range(num_classes))
    label_names = [str(name) for name in label_names]
    if len(label_names) != num_classes:
        raise ValueError(f"`label_names` has {len(label_names)} names for {num_classes} classes: {label_names}.")
    if threshold is not None:
        if not binary:
            raise ValueError(f"A decision `threshold` applies to binary triage only; got {num_classes} classes.")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"`threshold` must lie in (0, 1], got {threshold}.")

    n = labels.size
    counts = np.bincount(labels, minlength=num_classes)
    present = np.flatnonzero(counts)
    reasons: dict[str, str] = {}
    notes: dict[str, str] = {}
    out: dict = {"n": int(n), "n_classes": int(num_classes), "class_counts": counts.tolist()}

    if binary:
        predicted = (probabilities > 0.5) if threshold is None else (probabilities >= threshold)
        predicted = predicted.astype(np.int64)
        out["n_positive"] = int(counts[1])
        out["prevalence"] = float(counts[1] / n)
        out["threshold"] = 0.5 if threshold is None else float(threshold)
        if threshold is None:
            notes["threshold"] = "no threshold given: argmax decisions (urgent iff p > 0.5)"
    else:
        predicted = probabilities.argmax(axis=1)
        out["threshold"] = math.nan
        reasons["threshold"] = f"argmax decisions: a threshold applies to binary triage only ({num_classes} classes)"

    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    out["accuracy"] = float(np.trace(confusion) / n)
    out["macro_f1"], reason = _f1_macro(confusion, label_names)
    if reason:
        reasons["macro_f1"] = reason

    single_class = present.size < num_classes
    if single_class:
        missing = [label_names[c] for c in range(num_classes) if counts[c] == 0]
        if present.size == 1:
            reason = f"only one class present ({label_names[present[0]]!r} in all {n} labels)"
        else:
            reason = f"only {present.size} of {num_classes} classes present (absent: {missing})"

    if binary:
        tp, fn = confusion[1, 1], confusion[1, 0]
        tn, fp = confusion[0, 0], confusion[0, 1]
        if tp + fn:
            out["sensitivity"] = float(tp / (tp + fn))
        else:
            out["sensitivity"] = math.nan
            reasons["sensitivity"] = f"no {label_names[1]!r} study in the labels"
        if tn + fp:
            out["specificity"] = float(tn / (tn + fp))
        else:
            out["specificity"] = math.nan
            reasons["specificity"] = f"no {label_names[0]!r} study in the labels"

    ranked_keys = ["auroc", "auroc_ci_low", "auroc_ci_high"]
    if binary:
        ranked_keys += ["average_precision", *_OPERATING_POINT_KEYS]
    if single_class:
        for key in ranked_keys:
            out[key] = math.nan
            reasons[key] = reason
        out["n_bootstrap_skipped"] = 0
    else:
        if binary:
            out["auroc"] = float(roc_auc_score(labels, probabilities))
            out["average_precision"] = float(average_precision_score(labels, probabilities))
            out.update(_operating_points(labels, probabilities))
            constant = np.ptp(probabilities) == 0
        else:
            out["auroc"] = float(
                roc_auc_score(
                    labels, probabilities, multi_class="ovr", average="macro", labels=list(range(num_classes))
                )
            )
            constant = bool((np.ptp(probabilities, axis=0) == 0).all())
        if constant:
            notes["auroc"] = (
                "the score is constant over all studies: AUROC 0.5 is exact but means no ranking information"
            )
        ci = bootstrap_auroc(
            labels, probabilities, n_bootstrap=n_bootstrap, confidence=confidence, seed=seed, stratified=stratified
        )
        out["auroc_ci_low"], out["auroc_ci_high"] = ci["low"], ci["high"]
        out["n_bootstrap_skipped"] = ci["n_skipped"]
        if ci["reason"]:
            reasons["auroc_ci_low"] = reasons["auroc_ci_high"] = ci["reason"]
        elif ci["n_skipped"] > SKIPPED_WARNING_FRACTION * n_bootstrap:
            notes["auroc_ci"] = (
                f"{ci['n_skipped']} of {n_bootstrap} bootstrap resamples held fewer than all classes and were skipped "
                "(so few studies of a class that the interval is unreliable; consider stratified=True)"
            )
            logger.warning("AUROC CI: %s", notes["auroc_ci"])

    if not binary:
        for key in _BINARY_ONLY_KEYS:
            out[key] = math.nan
            reasons[key] = f"defined for binary triage only ({num_classes} classes)"

    if binary:
        out["ece"] = calibration_bins(probabilities, labels == 1, n_bins)["ece"]
        out["brier"] = float(np.mean((probabilities - labels) ** 2))
    else:
        correct = predicted == labels
        out["ece"] = calibration_bins(probabilities.max(axis=1), correct, n_bins)["ece"]
        one_hot = np.eye(num_classes)[labels]
        out["brier"] = float(np.mean(np.sum((probabilities - one_hot) ** 2, axis=1)))

    out["confusion_matrix"] = confusion.tolist()
    out["label_names"] = label_names
    out["confidence"] = float(confidence)
    out["n_bootstrap"] = int(n_bootstrap)
    out["stratified"] = bool(stratified)
    out["seed"] = int(seed)
    missing_reason = [k for k, v in out.items() if isinstance(v, float) and math.isnan(v) and k not in reasons]
    if missing_reason:  # a bug, not a user error: every nan must carry its reason
        raise RuntimeError(f"nan without a reason for {missing_reason}")
    out["nan_reasons"] = reasons
    out["notes"] = notes
    return out


def softmax(logits) -> np.ndarray:
    """Row-wise softmax in float64 (max-shifted). `logits`: `(n, k)`."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def make_compute_metrics(
    *,
    threshold: float | None = None,
    n_bootstrap: int = 0,
    seed: int = 0,
    allow_undefined_auroc: bool = False,
    **kwargs,
) -> Callable[..., dict[str, float]]:
    """
    A `compute_metrics` for `Trainer(compute_metrics=...)` built on [`compute_triage_metrics`].

    The returned callable takes an `EvalPrediction` whose `predictions` are the triage logits `(n, num_labels)` (or a
    tuple whose first element they are), applies a float64 softmax and returns a flat `dict[str, float]` (keys such as
    `"auroc"`, `"accuracy"`, `"macro_f1"`, `"ece"`), so that `metric_for_best_model="auroc"` works. Values that are
    `nan` (binary-only keys with more classes, no CI when `n_bootstrap=0`) and the call settings are left out.

    An evaluation set holding a single class makes the AUROC undefined; the Trainer would keep a `nan` first
    `best_metric` for ever (no value compares greater than `nan`), so this raises unless `allow_undefined_auroc=True`.

    Args:
        threshold (`float`, *optional*): binary decision threshold; `None` = argmax (like an uncalibrated model).
        n_bootstrap (`int`, *optional*, defaults to 0): bootstrap resamples for `auroc_ci_low/high` (0 = none,
            cheap for per-epoch evaluation).
        seed (`int`, *optional*, defaults to 0): bootstrap seed.
        allow_undefined_auroc (`bool`, *optional*, defaults to `False`): return without `"auroc"` instead of raising
            when it is undefined.
        kwargs: passed to [`compute_triage_metrics`] (`confidence`, `stratified`, `n_bins`, `label_names`).

    Returns:
        `Callable[[EvalPrediction], dict[str, float]]`.
    """

    def compute_metrics(eval_pred) -> dict[str, float]:
        logits = eval_pred.predictions
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        logits = np.asarray(logits, dtype=np.float64)
        labels = np.asarray(eval_pred.label_ids).reshape(-1)
        if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
            raise ValueError(
                f"Expected logits (n, num_labels) and labels (n,), got logits {logits.shape} and labels {labels.shape}."
            )
        finite = np.isfinite(logits).all(axis=1)
        if not finite.all():
            row = int(np.flatnonzero(~finite)[0])
            raise ValueError(f"Non-finite logits in evaluation predictions, row {row}: {logits[row].tolist()}.")
        metrics = compute_triage_metrics(
            labels, softmax(logits), threshold=threshold, n_bootstrap=n_bootstrap, seed=seed, **kwargs
        )
        if math.isnan(metrics["auroc"]) and not allow_undefined_auroc:
            raise ValueError(
                f"AUROC is undefined on this evaluation set: {metrics['nan_reasons']['auroc']} (a single class, or "
                "classes missing). Evaluate on a set holding every class, or pass allow_undefined_auroc=True."
            )
        flat = {}
        for key, value in metrics.items():
            if key in _SETTINGS_KEYS or isinstance(value, (bool, list, dict, str)) or value is None:
                continue
            value = float(value)
            if not math.isnan(value):
                flat[key] = value
        return flat

    return compute_metrics


__all__ = [
    "compute_triage_metrics",
    "make_compute_metrics",
    "bootstrap_auroc",
    "calibration_bins",
    "softmax",
]
