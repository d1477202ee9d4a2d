"""Calibration and operating point, fitted on the validation split and stored in the model's config.

- [`fit_temperature`]: temperature scaling (Guo et al., 2017), `softmax(logits / T)` with the `T` that minimises the
  negative log-likelihood of the labels.
- [`choose_threshold`]: the decision threshold on p(urgent) that meets a rule (sensitivity or specificity target,
  or Youden's J) on the labels it is given.
- [`calibrate_model`]: both, written to `model.config.calibration_temperature`, `decision_threshold` and
  `decision_rule`, so `model.triage_probabilities` / `model.triage_decisions`, a saved model and the pipelines use
  them. Report test metrics at the stored threshold, never at a threshold chosen on the test split.
- [`reliability_curve`]: the data of a reliability diagram.
"""

import logging
import math

import numpy as np

from .metrics import _as_labels, _as_probabilities, calibration_bins, compute_triage_metrics, softmax


logger = logging.getLogger(__name__)

LOG_TEMPERATURE_BOUNDS = (math.log(1e-2), math.log(1e2))
THRESHOLD_RULES = ("sensitivity", "specificity", "youden")


def _check_logits(logits, labels) -> tuple[np.ndarray, np.ndarray]:
    logits = np.asarray(logits, dtype=np.float64)
    labels_in = np.asarray(labels)
    if logits.ndim != 2 or logits.shape[1] < 2 or labels_in.ndim != 1 or logits.shape[0] != labels_in.shape[0]:
        raise ValueError(
            f"Expected logits (n, num_labels >= 2) and labels (n,), got logits {logits.shape} and labels "
            f"{labels_in.shape}."
        )
    finite = np.isfinite(logits).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise ValueError(f"`logits` row {row} is not finite ({logits[row].tolist()}).")
    if logits.shape[0] < 2:
        raise ValueError(f"Temperature scaling needs at least 2 examples, got {logits.shape[0]}.")
    return logits, _as_labels(labels_in, logits.shape[1])


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    scaled = logits / temperature
    shifted = scaled - scaled.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=1))
    return float(np.mean(log_norm - shifted[np.arange(labels.size), labels]))


def fit_temperature(logits, labels, *, max_iter: int = 200) -> float:
    """
    Temperature `T` minimising the mean negative log-likelihood of `softmax(logits / T)` on the given labels.

    The search runs over `log T` in `[log 0.01, log 100]` with a bounded Brent search (scipy), in float64. The NLL
    is convex in `1 / T`, hence unimodal in `log T`, so the 1-D search finds the global minimum inside the bounds;
    an optimum at a bound (labels perfectly separated, or logits anti-correlated with them) is logged as a warning.
    Fit it on the validation split, never on the test split.

    Args:
        logits (array-like of shape `(n, num_labels)`): uncalibrated logits.
        labels (array-like of shape `(n,)`): class ids.
        max_iter (`int`, *optional*, defaults to 200): iteration budget of the search.

    Returns:
        `float`: the temperature (> 1 softens over-confident logits).

    Raises:
        ValueError: non-finite logits (row named), fewer than 2 examples, shapes that disagree, labels out of range.
    """
    from scipy.optimize import minimize_scalar

    logits, labels = _check_logits(logits, labels)
    result = minimize_scalar(
        lambda log_t: _nll(logits, labels, math.exp(log_t)),
        bounds=LOG_TEMPERATURE_BOUNDS,
        method="bounded",
        options={"xatol": 1e-8, "maxiter": max_iter},
    )
    if not result.success:
        raise RuntimeError(f"Temperature search did not converge in {max_iter} iterations: {result.message}")
    temperature = math.exp(result.x)
    if min(abs(result.x - bound) for bound in LOG_TEMPERATURE_BOUNDS) < 1e-3:
        logger.warning(
            "fit_temperature: optimum at the search bound (T = %.4g): the logits separate the labels perfectly or "
            "are anti-correlated with them; the temperature is not meaningful.",
            temperature,
        )
    return temperature


def _positive_probabilities(probabilities, labels) -> np.ndarray:
    probabilities = _as_probabilities(probabilities, labels.shape[0], labels.shape)
    if probabilities.ndim == 2:
        if probabilities.shape[1] != 2:
            raise ValueError(
                f"A decision threshold applies to binary triage only; got {probabilities.shape[1]} classes."
            )
        probabilities = probabilities[:, 1]
    return probabilities


def choose_threshold(
    labels,
    probabilities,
    *,
    rule: str = "sensitivity",
    target: float = 0.90,
    split: str = "validation",
    label_names=None,
) -> tuple[float, str]:
    """
    A decision threshold on p(urgent) (urgent iff `p >= threshold`) meeting a rule on the given labels.

    The candidate thresholds are the distinct predicted probabilities (the points of the empirical ROC curve).

    - `"sensitivity"`: the highest threshold whose sensitivity is at least `target` (the fewest false alarms that
      still catch `target` of the urgent studies);
    - `"specificity"`: the lowest threshold whose specificity is at least `target`;
    - `"youden"`: the threshold maximising sensitivity + specificity - 1 (`target` unused; the highest such
      threshold on ties).

    Args:
        labels (array-like of shape `(n,)`): class ids (0/1) of the split the threshold is chosen on.
        probabilities (array-like of shape `(n,)` or `(n, 2)`): calibrated probabilities (of class 1, or rows).
        rule (`str`, *optional*, defaults to `"sensitivity"`): one of `"sensitivity"`, `"specificity"`, `"youden"`.
        target (`float`, *optional*, defaults to 0.90): sensitivity or specificity to reach, in (0, 1].
        split (`str`, *optional*, defaults to `"validation"`): name of the split, for the description.
        label_names (`Sequence[str]`, *optional*): class names; defaults to `("non_urgent", "urgent")`.

    Returns:
        `tuple[float, str]`: the threshold and a description such as
        `"sensitivity >= 0.90 on validation (n=123, 40 urgent): sensitivity 0.925, specificity 0.610"`.

    Raises:
        ValueError: unknown rule, target outside (0, 1], a single class in the labels, no threshold meeting a
            specificity target, or the checks of `compute_triage_metrics` on the inputs.
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"Unknown threshold rule {rule!r}; expected one of {THRESHOLD_RULES}.")
    if not 0.0 < target <= 1.0:
        raise ValueError(f"`target` must lie in (0, 1], got {target}.")
    labels_in = np.asarray(labels)
    scores = _positive_probabilities(probabilities, labels_in)
    labels = _as_labels(labels_in, 2)
    if label_names is None:
        from ..labels.policy import LABEL_NAMES

        label_names = LABEL_NAMES
    n_pos, n_neg = int(labels.sum()), int((labels == 0).sum())
    if n_pos == 0 or n_neg == 0:
        present = label_names[1] if n_neg == 0 else label_names[0]
        raise ValueError(
            f"Cannot choose a threshold on {split}: only one class present ({present!r} in all {labels.size} labels)."
        )
    candidates = np.unique(scores)[::-1]  # descending
    positives, negatives = np.sort(scores[labels == 1]), np.sort(scores[labels == 0])
    sensitivity = (n_pos - np.searchsorted(positives, candidates, side="left")) / n_pos  # share with p >= t
    specificity = np.searchsorted(negatives, candidates, side="left") / n_neg  # share with p < t
    tolerance = 1e-12
    if rule == "sensitivity":
        index = int(np.flatnonzero(sensitivity >= target - tolerance)[0])  # descending: the highest threshold
        what = f"sensitivity >= {target:.2f}"
    elif rule == "specificity":
        meeting = np.flatnonzero(specificity >= target - tolerance)
        if meeting.size == 0:
            raise ValueError(
                f"No threshold reaches specificity {target:.2f} on {split}: a {label_names[0]!r} study has the highest "
                f"score ({candidates[0]:.4g}), so every threshold flags it."
            )
        index = int(meeting[-1])  # descending: the lowest threshold
        what = f"specificity >= {target:.2f}"
    else:
        youden = sensitivity + specificity - 1
        index = int(np.argmax(youden))
        what = "max Youden J (sensitivity + specificity - 1)"
    threshold = float(candidates[index])
    description = (
        f"{what} on {split} (n={labels.size}, {n_pos} {label_names[1]}): sensitivity {sensitivity[index]:.3f}, "
        f"specificity {specificity[index]:.3f} at threshold {threshold:.4g}"
    )
    return threshold, description


def reliability_curve(labels, probabilities, n_bins: int = 15) -> dict:
    """
    Data of a reliability diagram, on the same bins as the ECE of `compute_triage_metrics`.

    Binary triage (`(n,)` or `(n, 2)`): predicted p(urgent) against the observed frequency of urgent studies; more
    classes: max-probability confidence against accuracy.

    Args:
        labels (array-like of shape `(n,)`): class ids.
        probabilities (array-like of shape `(n,)` or `(n, k)`): predicted probabilities.
        n_bins (`int`, *optional*, defaults to 15): equal-width bins over [0, 1].

    Returns:
        `dict` with `bin_edges` `(n_bins + 1,)`, `mean_confidence`, `observed_frequency` (`nan` in empty bins) and
        `counts` `(n_bins,)` as lists, `ece` and `kind` (`"positive_class"` or `"max_probability"`).
    """
    labels_in = np.asarray(labels)
    probabilities = _as_probabilities(probabilities, labels_in.shape[0] if labels_in.ndim else -1, labels_in.shape)
    if probabilities.ndim == 2 and probabilities.shape[1] == 2:
        probabilities = probabilities[:, 1]
    num_classes = 2 if probabilities.ndim == 1 else probabilities.shape[1]
    labels = _as_labels(labels_in, num_classes)
    if probabilities.ndim == 1:
        bins, kind = calibration_bins(probabilities, labels == 1, n_bins), "positive_class"
    else:
        bins = calibration_bins(probabilities.max(axis=1), probabilities.argmax(axis=1) == labels, n_bins)
        kind = "max_probability"
    return {
        "bin_edges": bins["bin_edges"].tolist(),
        "mean_confidence": bins["mean_confidence"].tolist(),
        "observed_frequency": bins["observed_frequency"].tolist(),
        "counts": bins["counts"].tolist(),
        "ece": bins["ece"],
        "kind": kind,
    }


def calibrated_probabilities(logits, temperature: float = 1.0) -> np.ndarray:
    """
    `softmax(logits / temperature)` computed exactly as the models' `triage_probabilities` (float32 torch), so a
    threshold chosen on these values flags the same studies as a saved model's `triage_decisions`.

    Args:
        logits (array-like of shape `(n, num_labels)`): triage logits.
        temperature (`float`, *optional*, defaults to 1.0): the calibration temperature.

    Returns:
        `np.ndarray` (float64 holding the float32 values) of shape `(n, num_labels)`.
    """
    import torch

    logits = torch.as_tensor(np.asarray(logits)).float()
    return torch.softmax(logits / float(temperature), dim=-1).double().numpy()


def calibrate_model(
    model,
    logits,
    labels,
    *,
    rule: str = "sensitivity",
    target: float = 0.90,
    split: str = "validation",
    n_bins: int = 15,
) -> dict:
    """
    Fit temperature scaling and choose the operating threshold on one split, and store both in `model.config`.

    Sets `model.config.calibration_temperature` (from [`fit_temperature`]), then computes the calibrated
    probabilities with `model.triage_probabilities` and, for binary triage, `decision_threshold` and
    `decision_rule` (from [`choose_threshold`]); with more classes the threshold stays `None` (argmax) and the rule
    says so. `save_pretrained` then carries them and the pipelines use them.

    Args:
        model ([`QDistillPreTrainedModel`]): the teacher or student whose logits these are.
        logits (array-like or `torch.Tensor` of shape `(n, num_labels)`): the model's triage logits on `split`.
        labels (array-like of shape `(n,)`): class ids on `split`.
        rule (`str`, *optional*, defaults to `"sensitivity"`): threshold rule, see [`choose_threshold`].
        target (`float`, *optional*, defaults to 0.90): its target.
        split (`str`, *optional*, defaults to `"validation"`): name of the split, recorded in `decision_rule`.
        n_bins (`int`, *optional*, defaults to 15): ECE bins for the before/after report.

    Returns:
        `dict` with `temperature`, `threshold`, `decision_rule`, `n`, and `nll_before`/`nll_after`,
        `ece_before`/`ece_after` (on `split`, uncalibrated vs calibrated).
    """
    import torch

    if isinstance(logits, torch.Tensor):
        logits = logits.detach().cpu().double().numpy()
    logits, labels = _check_logits(logits, labels)
    if logits.shape[1] != model.config.num_labels:
        raise ValueError(f"`logits` have {logits.shape[1]} columns; the model has {model.config.num_labels} labels.")
    temperature = fit_temperature(logits, labels)
    model.config.calibration_temperature = float(temperature)
    if hasattr(model, "triage_probabilities"):
        with torch.no_grad():
            calibrated = model.triage_probabilities(torch.from_numpy(logits)).double().numpy()
    else:  # another model (a baseline): the same computation, stored in the same config fields
        calibrated = calibrated_probabilities(logits, temperature)
    # Kept exactly as the model computes them (float32): the threshold is one of these values, so the model's own
    # `triage_decisions` flags the same studies.
    if logits.shape[1] == 2:
        id2label = getattr(model.config, "id2label", None) or {}
        label_names = [str(id2label[i]) for i in (0, 1)] if set(id2label) == {0, 1} else None
        threshold, description = choose_threshold(
            labels, calibrated[:, 1], rule=rule, target=target, split=split, label_names=label_names
        )
        if not threshold > 0.0:
            raise ValueError(
                f"The chosen threshold {threshold} is not > 0 (saturated probabilities on {split}): it would flag "
                "every film, and cannot be stored as `decision_threshold`."
            )
        if threshold == 1.0:
            logger.warning(
                "The model separates %s with saturated probabilities (calibrated p(urgent) == 1 in float32), so the "
                "threshold is 1.0: only saturated films are flagged. This operating point is fragile on new films; "
                "a larger or harder selection split gives a better one.", split
            )
    else:
        threshold, description = None, f"argmax ({logits.shape[1]} classes; a threshold applies to binary triage only)"
    model.config.decision_threshold = threshold
    model.config.decision_rule = description
    before = compute_triage_metrics(labels, softmax(logits), n_bootstrap=0, n_bins=n_bins)
    after = compute_triage_metrics(labels, calibrated, n_bootstrap=0, n_bins=n_bins, threshold=threshold)
    summary = {
        "temperature": float(temperature),
        "threshold": threshold,
        "decision_rule": description,
        "n": int(labels.size),
        "nll_before": _nll(logits, labels, 1.0),
        "nll_after": _nll(logits, labels, temperature),
        "ece_before": before["ece"],
        "ece_after": after["ece"],
    }
    logger.info(
        "calibrated on %s: T = %.3f, ECE %.4f -> %.4f, threshold %s (%s)",
        split, temperature, summary["ece_before"], summary["ece_after"], threshold, description,
    )
    return summary


__all__ = ["fit_temperature", "choose_threshold", "calibrate_model", "calibrated_probabilities", "reliability_curve"]
