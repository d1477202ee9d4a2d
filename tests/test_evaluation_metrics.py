"""compute_triage_metrics against scikit-learn and hand values; bootstrap determinism; degenerate inputs; the
Trainer compute_metrics; the local `evaluate` metric."""

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    roc_auc_score,
    roc_curve,
)
from transformers import EvalPrediction

from qdistill_hf.evaluation import compute_triage_metrics, make_compute_metrics
from qdistill_hf.evaluation.metrics import _rank_auroc, bootstrap_auroc, calibration_bins


REPO = Path(__file__).resolve().parents[1]


def _toy(n=200, seed=0):
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.3).astype(int)
    # Overlapping scores with ties (rounded) so the ROC has vertical and horizontal steps.
    probabilities = np.round(1 / (1 + np.exp(-(rng.normal(size=n) + 1.5 * labels - 0.8))), 2)
    return labels, probabilities


def _operating_points_by_hand(labels, scores, target):
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    sens = max(t for f, t in zip(fpr, tpr) if 1 - f >= target - 1e-12)
    spec = max(1 - f for f, t in zip(fpr, tpr) if t >= target - 1e-12)
    return sens, spec


@pytest.mark.parametrize("threshold", [None, 0.3, 0.62])
def test_binary_metrics_equal_sklearn(threshold):
    labels, p = _toy()
    m = compute_triage_metrics(labels, p, threshold=threshold, n_bootstrap=200)
    predicted = (p > 0.5 if threshold is None else p >= threshold).astype(int)
    assert m["threshold"] == (0.5 if threshold is None else threshold)
    assert m["n"] == 200 and m["n_positive"] == labels.sum() and m["prevalence"] == pytest.approx(labels.mean())
    assert m["auroc"] == pytest.approx(roc_auc_score(labels, p), abs=1e-12)
    assert m["average_precision"] == pytest.approx(average_precision_score(labels, p), abs=1e-12)
    assert m["accuracy"] == pytest.approx(np.mean(predicted == labels), abs=1e-12)
    assert m["macro_f1"] == pytest.approx(f1_score(labels, predicted, average="macro"), abs=1e-12)
    assert m["brier"] == pytest.approx(brier_score_loss(labels, p), abs=1e-12)
    cm = confusion_matrix(labels, predicted, labels=[0, 1])
    assert m["confusion_matrix"] == cm.tolist()
    assert m["sensitivity"] == pytest.approx(cm[1, 1] / cm[1].sum())
    assert m["specificity"] == pytest.approx(cm[0, 0] / cm[0].sum())
    for target in (90, 95):
        sens, spec = _operating_points_by_hand(labels, p, target / 100)
        assert m[f"sensitivity_at_{target}_specificity"] == pytest.approx(sens, abs=1e-12)
        assert m[f"specificity_at_{target}_sensitivity"] == pytest.approx(spec, abs=1e-12)
    assert m["auroc_ci_low"] <= m["auroc"] <= m["auroc_ci_high"]
    assert m["auroc_ci_high"] - m["auroc_ci_low"] > 0.01
    assert m["nan_reasons"] == {}


def test_operating_points_hand_values():
    # Negatives 0.1..0.9 (9 of them) plus 0.95; positives 0.5, 0.85, 0.97, 0.99.
    negatives = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
    positives = [0.5, 0.85, 0.97, 0.99]
    labels = [0] * 10 + [1] * 4
    m = compute_triage_metrics(labels, negatives + positives, n_bootstrap=0)
    # Specificity >= 0.90 allows at most 1 false positive of 10: threshold 0.95 -> positives 0.97, 0.99 (2/4).
    # Threshold 0.85 would flag 0.9 and 0.95 (2 FPs, spec 0.8).
    assert m["sensitivity_at_90_specificity"] == pytest.approx(0.5)
    # Specificity >= 0.95 allows 0 FPs: threshold 0.97 -> 2/4.
    assert m["sensitivity_at_95_specificity"] == pytest.approx(0.5)
    # Sensitivity >= 0.90 needs all 4 positives: threshold 0.5 -> negatives 0.5..0.95 flagged (6), spec 0.4.
    assert m["specificity_at_90_sensitivity"] == pytest.approx(0.4)
    assert m["specificity_at_95_sensitivity"] == pytest.approx(0.4)


def test_multiclass_metrics_equal_sklearn():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, size=90)
    logits = rng.normal(size=(90, 3)) + 1.2 * np.eye(3)[labels]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = compute_triage_metrics(labels, p, n_bootstrap=100)
    predicted = p.argmax(1)
    assert m["auroc"] == pytest.approx(roc_auc_score(labels, p, multi_class="ovr", average="macro"), abs=1e-12)
    assert m["accuracy"] == pytest.approx(np.mean(predicted == labels))
    assert m["macro_f1"] == pytest.approx(f1_score(labels, predicted, average="macro"), abs=1e-12)
    assert m["confusion_matrix"] == confusion_matrix(labels, predicted).tolist()
    assert m["brier"] == pytest.approx(brier_score_loss(labels, p), abs=1e-12)
    assert m["auroc_ci_low"] <= m["auroc"] <= m["auroc_ci_high"]
    for key in ("sensitivity", "average_precision", "sensitivity_at_90_specificity", "threshold"):
        assert math.isnan(m[key]) and "binary" in m["nan_reasons"][key]
    with pytest.raises(ValueError, match="binary triage only"):
        compute_triage_metrics(labels, p, threshold=0.5)


def test_two_column_probabilities_use_column_one():
    labels, p = _toy(60)
    a = compute_triage_metrics(labels, p, n_bootstrap=50)
    b = compute_triage_metrics(labels, np.stack([1 - p, p], axis=1), n_bootstrap=50)
    assert a == b


def test_rank_auroc_equals_sklearn_with_ties():
    labels, p = _toy(150, seed=5)
    assert _rank_auroc(labels[None].astype(float), p[None])[0] == pytest.approx(roc_auc_score(labels, p), abs=1e-12)


def test_bootstrap_is_seeded_and_stratified_keeps_counts():
    labels, p = _toy(80, seed=1)
    a = compute_triage_metrics(labels, p, n_bootstrap=300, seed=7)
    b = compute_triage_metrics(labels, p, n_bootstrap=300, seed=7)
    c = compute_triage_metrics(labels, p, n_bootstrap=300, seed=8)
    assert (a["auroc_ci_low"], a["auroc_ci_high"]) == (b["auroc_ci_low"], b["auroc_ci_high"])
    assert (a["auroc_ci_low"], a["auroc_ci_high"]) != (c["auroc_ci_low"], c["auroc_ci_high"])

    # Stratified: every resample keeps the class counts, so none is ever skipped; plain resampling of a rare class
    # does skip some.
    rare_labels = np.array([1, 1] + [0] * 38)
    rare_p = np.linspace(0.05, 0.95, 40)
    plain = bootstrap_auroc(rare_labels, rare_p, n_bootstrap=400, seed=0)
    strat = bootstrap_auroc(rare_labels, rare_p, n_bootstrap=400, seed=0, stratified=True)
    assert plain["n_skipped"] > 0 and strat["n_skipped"] == 0 and strat["values"].size == 400
    rng = np.random.default_rng(0)
    from qdistill_hf.evaluation.metrics import _draw_resamples

    index = _draw_resamples(rng, rare_labels, 50, stratified=True)
    assert (rare_labels[index].sum(axis=1) == 2).all() and index.shape == (50, 40)
    m = compute_triage_metrics(rare_labels, rare_p, n_bootstrap=400, seed=0)
    assert m["n_bootstrap_skipped"] == plain["n_skipped"]
    assert "skipped" in m["notes"]["auroc_ci"]  # > 10% of 400 skipped with 2 positives in 40 (P = 0.95^40 * ... )


def test_ece_hand_computed_six_samples():
    # 5 bins of width 0.2. Scores 0.1, 0.15 (bin 0), 0.5 (bin 2), 0.7, 0.75 (bin 3), 1.0 (bin 4, closed at 1).
    labels = [0, 1, 1, 0, 1, 1]
    p = [0.1, 0.15, 0.5, 0.7, 0.75, 1.0]
    # bin 0: mean 0.125 vs freq 0.5 -> 0.375 * 2/6; bin 2: |0.5 - 1| * 1/6; bin 3: |0.725 - 0.5| * 2/6; bin 4: 0.
    expected = 0.375 * 2 / 6 + 0.5 / 6 + 0.225 * 2 / 6
    assert compute_triage_metrics(labels, p, n_bins=5, n_bootstrap=0)["ece"] == pytest.approx(expected, abs=1e-12)
    bins = calibration_bins(np.array(p), np.array(labels), 5)
    assert bins["counts"].tolist() == [2, 0, 1, 2, 1]
    assert math.isnan(bins["mean_confidence"][1]) and bins["observed_frequency"][3] == pytest.approx(0.5)


def test_one_class_gives_nan_with_reason_and_other_metrics():
    m = compute_triage_metrics([0, 0, 0, 0], [0.1, 0.7, 0.2, 0.3])
    for key in ("auroc", "auroc_ci_low", "auroc_ci_high", "average_precision", "sensitivity_at_90_specificity",
                "specificity_at_95_sensitivity", "sensitivity"):
        assert math.isnan(m[key]), key
        assert key in m["nan_reasons"]
    assert m["nan_reasons"]["auroc"].startswith("only one class present")
    assert m["accuracy"] == pytest.approx(0.75) and m["specificity"] == pytest.approx(0.75)
    assert m["brier"] == pytest.approx(np.mean(np.square([0.1, 0.7, 0.2, 0.3])))
    every_nan = {k for k, v in m.items() if isinstance(v, float) and math.isnan(v)}
    assert every_nan == set(m["nan_reasons"])


def test_constant_score_is_noted_not_silent():
    m = compute_triage_metrics([0, 1, 0, 1], [0.4] * 4, n_bootstrap=50)
    assert m["auroc"] == 0.5
    assert "constant" in m["notes"]["auroc"]


@pytest.mark.parametrize(
    "labels, probabilities, message",
    [
        ([0, 1, 0], [0.2, float("nan"), 0.4], "row 1 is not finite"),
        ([0, 1, 0], [[0.8, 0.2], [0.5, 0.5], [0.6, float("inf")]], "row 2 is not finite"),
        ([0, 1, 0], [0.2, 1.3, 0.4], r"row 1 lies outside \[0, 1\]"),
        ([0, 1, 0], [[0.8, 0.2], [0.5, 0.6], [0.6, 0.4]], "row 1 sums to 1.1"),
        ([0, 1, 0], [0.2, 0.4], r"\(2,\) and labels \(3,\)"),
        ([0, 1, 0], [[0.2, 0.3, 0.5]] * 2, r"\(2, 3\) and labels \(3,\)"),
        ([0, 2, 0], [0.2, 0.4, 0.3], "row 1 holds class 2"),
        ([0, 0.5, 0], [0.2, 0.4, 0.3], "row 1 holds 0.5"),
    ],
)
def test_bad_inputs_raise_naming_row_or_shapes(labels, probabilities, message):
    with pytest.raises(ValueError, match=message):
        compute_triage_metrics(labels, probabilities)


def test_make_compute_metrics_for_trainer():
    logits = np.array([[0.0, -1.0], [0.0, 0.0], [0.0, 1.0], [0.0, 2.0], [1.0, -1.0], [-0.5, 0.5]])
    labels = np.array([0, 1, 0, 1, 0, 1])
    compute = make_compute_metrics(n_bootstrap=100)
    out = compute(EvalPrediction(predictions=(logits, np.zeros((6, 4))), label_ids=labels))
    assert all(type(v) is float for v in out.values())
    p1 = 1 / (1 + np.exp(-(logits[:, 1] - logits[:, 0])))
    assert out["auroc"] == pytest.approx(roc_auc_score(labels, p1))
    assert out["accuracy"] == pytest.approx(np.mean((p1 > 0.5) == labels))
    assert {"auroc_ci_low", "auroc_ci_high", "ece", "brier", "macro_f1"} <= set(out)
    assert "confusion_matrix" not in out and "nan_reasons" not in out
    with pytest.raises(ValueError, match="row 2"):
        bad = np.where(np.arange(12).reshape(6, 2) == 4, np.inf, logits)
        compute(EvalPrediction(predictions=bad, label_ids=labels))
    with pytest.raises(ValueError, match="single class"):
        compute(EvalPrediction(predictions=logits, label_ids=np.zeros(6)))
    lenient = make_compute_metrics(allow_undefined_auroc=True)
    lenient = lenient(EvalPrediction(predictions=logits, label_ids=np.zeros(6)))
    assert "auroc" not in lenient and lenient["accuracy"] == pytest.approx(0.5)


def test_evaluate_load_local_metric_equals_function(tmp_path):
    # A subprocess so that HF_HOME (read when `evaluate` is imported) points at tmp_path, offline.
    labels, p = _toy(50, seed=2)
    script = f"""
import json, numpy as np, evaluate
m = evaluate.load("metrics/cxr_triage")
out = m.compute(predictions={p.tolist()}, references={labels.tolist()}, threshold=0.4, n_bootstrap=100, seed=3)
print("RESULT" + json.dumps(out))
"""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    loaded = json.loads(result.stdout.split("RESULT", 1)[1])
    direct = compute_triage_metrics(labels, p, threshold=0.4, n_bootstrap=100, seed=3)
    assert loaded["auroc"] == pytest.approx(direct["auroc"], abs=1e-6)
    assert loaded["auroc_ci_low"] == pytest.approx(direct["auroc_ci_low"], abs=1e-6)
    assert loaded["confusion_matrix"] == direct["confusion_matrix"]
    assert loaded["sensitivity"] == direct["sensitivity"] and loaded["ece"] == pytest.approx(direct["ece"], abs=1e-6)
    assert (tmp_path / "hf").exists()
