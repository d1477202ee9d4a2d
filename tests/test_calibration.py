"""Temperature scaling, threshold choice on validation, and the operating point stored in a saved model."""

import math

import numpy as np
import pytest
import torch

from qdistill_hf import QDistillStudentModel
from qdistill_hf.evaluation import (
    calibrate_model,
    choose_threshold,
    compute_triage_metrics,
    fit_temperature,
    reliability_curve,
    softmax,
)
from tiny_models import student_config


def _miscalibrated(n=3000, scale=3.0, seed=0, classes=2):
    """Labels drawn from softmax(z); the 'model' reports scale * z (over-confident by `scale`)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=1.5, size=(n, classes))
    p = softmax(z)
    labels = (rng.random(n)[:, None] > np.cumsum(p, axis=1)).sum(axis=1)
    return scale * z, labels


def test_fit_temperature_recovers_scale_and_lowers_ece():
    logits, labels = _miscalibrated()
    temperature = fit_temperature(logits, labels)
    assert temperature == pytest.approx(3.0, rel=0.1)
    before = compute_triage_metrics(labels, softmax(logits), n_bootstrap=0)
    after = compute_triage_metrics(labels, softmax(logits / temperature), n_bootstrap=0)
    assert after["ece"] < 0.5 * before["ece"]
    assert after["brier"] < before["brier"]
    # AUROC is invariant to temperature.
    assert after["auroc"] == pytest.approx(before["auroc"], abs=1e-12)
    # Already calibrated logits give T ~ 1; three classes work too.
    logits3, labels3 = _miscalibrated(classes=3, scale=1.0, seed=1)
    assert fit_temperature(logits3, labels3) == pytest.approx(1.0, rel=0.1)


def test_fit_temperature_refuses_bad_input():
    logits, labels = _miscalibrated(n=10)
    logits[7, 1] = np.nan
    with pytest.raises(ValueError, match="row 7 is not finite"):
        fit_temperature(logits, labels)
    with pytest.raises(ValueError, match="at least 2 examples"):
        fit_temperature(np.zeros((1, 2)), [0])
    with pytest.raises(ValueError, match=r"\(4, 2\) and labels \(3,\)"):
        fit_temperature(np.zeros((4, 2)), [0, 1, 0])


def _validation(n=400, seed=0):
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.3).astype(int)
    p = 1 / (1 + np.exp(-(rng.normal(size=n) + 1.2 * labels - 0.5)))
    return labels, p


def test_choose_threshold_sensitivity_rule_is_the_highest_meeting_target():
    labels, p = _validation()
    threshold, description = choose_threshold(labels, p, rule="sensitivity", target=0.90)
    sens = np.mean(p[labels == 1] >= threshold)
    assert sens >= 0.90
    higher = np.unique(p[p > threshold])
    assert higher.size and np.mean(p[labels == 1] >= higher[0]) < 0.90  # the next candidate misses the target
    n_pos = labels.sum()
    assert description.startswith(f"sensitivity >= 0.90 on validation (n=400, {n_pos} urgent)")
    assert f"sensitivity {sens:.3f}" in description
    # Same threshold through compute_triage_metrics.
    assert compute_triage_metrics(labels, p, threshold=threshold, n_bootstrap=0)["sensitivity"] == pytest.approx(sens)


def test_choose_threshold_specificity_and_youden():
    labels, p = _validation(seed=1)
    threshold, description = choose_threshold(labels, p, rule="specificity", target=0.95, split="selection")
    spec = np.mean(p[labels == 0] < threshold)
    assert spec >= 0.95 and "on selection" in description
    lower = np.unique(p[p < threshold])
    assert np.mean(p[labels == 0] < lower[-1]) < 0.95  # the next lower candidate misses the target

    # Youden on a hand case: negatives 0.1 0.2 0.6, positives 0.4 0.7 0.8.
    # t=0.7: sens 2/3 spec 1 -> J 0.667; t=0.4: sens 1 spec 2/3 -> 0.667; t=0.8: 1/3 + 1 - 1; tie -> highest, 0.7.
    threshold, description = choose_threshold([0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.6, 0.4, 0.7, 0.8], rule="youden")
    assert threshold == 0.7 and "Youden" in description
    with pytest.raises(ValueError, match="only one class"):
        choose_threshold([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="Unknown threshold rule"):
        choose_threshold(labels, p, rule="f1")
    with pytest.raises(ValueError, match="No threshold reaches specificity"):
        choose_threshold([1, 0, 0], [0.2, 0.9, 0.1], rule="specificity", target=0.9)


def test_reliability_curve_matches_ece():
    labels, p = _validation(n=200, seed=2)
    curve = reliability_curve(labels, p, n_bins=10)
    assert len(curve["bin_edges"]) == 11 and sum(curve["counts"]) == 200
    assert curve["ece"] == pytest.approx(compute_triage_metrics(labels, p, n_bins=10, n_bootstrap=0)["ece"])
    first = (p < 0.1)
    if first.any():
        assert curve["observed_frequency"][0] == pytest.approx(labels[first].mean())
        assert curve["mean_confidence"][0] == pytest.approx(p[first].mean())
    assert curve["kind"] == "positive_class"


def test_calibrate_model_writes_config_and_survives_save_load(tmp_path):
    torch.manual_seed(0)
    model = QDistillStudentModel(student_config())
    assert model.config.num_labels == 2
    logits, labels = _miscalibrated(n=600, scale=2.5, seed=3)
    summary = calibrate_model(model, torch.tensor(logits, dtype=torch.float32), labels, rule="sensitivity",
                              target=0.9)
    assert summary["temperature"] == pytest.approx(2.5, rel=0.15)
    assert summary["ece_after"] < summary["ece_before"] and summary["nll_after"] < summary["nll_before"]
    assert model.config.calibration_temperature == summary["temperature"]
    assert model.config.decision_threshold == summary["threshold"] and 0 < summary["threshold"] < 1
    assert model.config.decision_rule.startswith(f"sensitivity >= 0.90 on validation (n=600, {labels.sum()} urgent)")

    model.save_pretrained(tmp_path)
    loaded = QDistillStudentModel.from_pretrained(tmp_path)
    for key in ("calibration_temperature", "decision_threshold", "decision_rule"):
        assert getattr(loaded.config, key) == getattr(model.config, key)
    # The loaded model's own decisions reach the validation sensitivity target.
    decisions = loaded.triage_decisions(loaded.triage_probabilities(torch.tensor(logits, dtype=torch.float32)))
    decisions = decisions.numpy()
    assert np.mean(decisions[labels == 1] == 1) >= 0.9
    assert np.mean(decisions[labels == 1] == 1) == pytest.approx(
        float(model.config.decision_rule.split("sensitivity ")[2].split(",")[0]), abs=5e-4)


def test_calibrate_model_on_a_perfectly_separated_split_stores_threshold_one(caplog):
    # A teacher reading the report separates the selection split: T runs to its lower bound and the calibrated
    # p(urgent) of every urgent film is exactly 1.0 in float32, so the threshold reaching 90% sensitivity is 1.0.
    import logging

    import torch

    from qdistill_hf import QDistillStudentModel
    from qdistill_hf.evaluation import calibrate_model
    from tiny_models import student_config

    model = QDistillStudentModel(student_config(text_mode="image_only"))
    labels = np.array([0, 0, 0, 1, 1, 1])
    logits = np.array([[5.0, -5.0]] * 3 + [[-5.0, 5.0]] * 3)
    with caplog.at_level(logging.WARNING):
        summary = calibrate_model(model, logits, labels)
    assert summary["threshold"] == 1.0
    assert model.config.decision_threshold == 1.0
    assert "saturated" in caplog.text
    probabilities = model.triage_probabilities(torch.tensor(logits, dtype=torch.float32))
    assert model.triage_decisions(probabilities).tolist() == labels.tolist()


def test_calibrate_model_of_a_baseline_uses_its_class_names_and_the_same_probabilities():
    # A transformers ResNet has no `triage_probabilities`; it gets the same float32 computation and the same config
    # fields, and the threshold description names its own classes.
    from transformers import ResNetConfig, ResNetForImageClassification

    from qdistill_hf.evaluation import calibrate_model, calibrated_probabilities

    config = ResNetConfig(embedding_size=4, hidden_sizes=[4], depths=[1], num_labels=2,
                          id2label={0: "normal", 1: "abnormal"}, label2id={"normal": 0, "abnormal": 1})
    model = ResNetForImageClassification(config)
    rng = np.random.default_rng(0)
    labels = np.array([0, 1] * 10)
    logits = np.stack([np.zeros(20), 3.0 * (labels - 0.5) + rng.normal(size=20)], axis=1)
    summary = calibrate_model(model, logits, labels)
    assert "abnormal" in model.config.decision_rule and "urgent" not in model.config.decision_rule
    probabilities = calibrated_probabilities(logits, summary["temperature"])[:, 1]
    assert model.config.decision_threshold in set(probabilities.tolist())
    assert (probabilities[labels == 1] >= model.config.decision_threshold).mean() >= 0.9
