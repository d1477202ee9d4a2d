"""The example scripts run end to end (small sizes) and leave loadable artefacts."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoProcessor

import qdistill_hf  # noqa: F401  (registers the Auto classes)

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = REPO_ROOT / "examples"


def run(args, tmp_path):
    # The scripts must import this checkout's package, whatever is pip-installed.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.demo
def test_demo_runs_end_to_end_and_saves_loadable_models(tmp_path):
    """The whole demo at tiny sizes: Trainer runs, baselines, calibration on validation, test table at the validation
    threshold, saved folders carrying their operating point, plots, fresh-process triage."""
    import numpy as np

    out = tmp_path / "demo"
    result = run([str(EXAMPLES / "demo.py"), "--output_dir", str(out), "--num_train", "48", "--num_validation", "32",
                  "--num_test", "24", "--teacher_epochs", "1", "--student_epochs", "1", "--batch_size", "16",
                  "--baselines"], tmp_path)
    # The fresh process reloaded the image-only student and printed one triage line per film.
    assert "fresh process: QDistillStudentModel (image_only) and QDistillProcessor" in result.stdout
    assert "operating point from its config: temperature" in result.stdout
    triage_lines = [line for line in result.stdout.splitlines() if line.startswith("triage synthetic-test-")]
    assert len(triage_lines) == 5 and all("p(urgent)=" in line and "truth=" in line for line in triage_lines)
    assert "test split (24 studies), threshold chosen on validation (sensitivity 0.90)" in result.stdout
    for row in ("teacher, film + human report", "student, film + pseudo-report", "student, film only, distilled",
                "student, film only, labels only", "baseline, ResNet from scratch", "baseline, linear probe",
                "majority class"):
        assert row in result.stdout, row
    assert "loss_itc" in result.stderr and "0.6365" in result.stderr
    for direction in ("image->report", "report->image"):
        assert re.search(direction + r" recall@1/5/10 over \d+ distinct reports: "
                         + ", ".join([r"[01]\.\d{3} \(chance [01]\.\d{3}\)"] * 3), result.stderr), direction

    folders = ["teacher", "student_pseudo_report", "student", "student_image_only_labels_only", "baseline_resnet",
               "baseline_linear_probe"]
    results = json.loads((out / "results.json").read_text())
    assert list(results) == folders
    assert results == json.loads((out / "evaluation" / "metrics.json").read_text())
    for name, m in results.items():
        assert m["n"] == 24 and m["selection_split"] == "validation" and m["evaluation_split"] == "test"
        assert m["auroc_ci_low"] <= m["auroc"] <= m["auroc_ci_high"] and 0.0 <= m["accuracy"] <= 1.0
        # The table's threshold is the one saved in the model's config, fitted on validation.
        config = json.loads((out / name / "config.json").read_text())
        assert m["threshold"] == pytest.approx(config["decision_threshold"], abs=1e-6), name
        assert m["calibration_temperature"] == pytest.approx(config["calibration_temperature"], rel=1e-6), name
        assert "on validation (n=32" in config["decision_rule"], name
        for split, n in (("validation", 32), ("test", 24)):
            with np.load(out / name / f"predictions_{split}.npz") as predictions:
                assert predictions["logits"].shape == (n, 2) and predictions["labels"].shape == (n,), (name, split)
                assert all(s.startswith(f"synthetic-{split}-") for s in predictions["study_ids"]), (name, split)
    for png in ("roc.png", "reliability.png", "confusion_matrices.png", "training_curves.png"):
        assert (out / "evaluation" / png).stat().st_size > 10_000, png
    assert "| student, film only, distilled |" in (out / "evaluation" / "table.md").read_text()

    from PIL import Image

    film = Image.new("L", (64, 80), color=90)
    expected = {"teacher": ("QDistillTeacherModel", None),
                "student_pseudo_report": ("QDistillStudentModel", "pseudo_report"),
                "student": ("QDistillStudentModel", "image_only"),
                "student_image_only_labels_only": ("QDistillStudentModel", "image_only")}
    for folder, (class_name, text_mode) in expected.items():
        model = AutoModel.from_pretrained(out / folder)
        processor = AutoProcessor.from_pretrained(out / folder)
        assert type(model).__name__ == class_name, folder
        assert type(processor).__name__ == "QDistillProcessor", folder
        assert not any(p.requires_grad for p in model.vision_model.parameters())
        if text_mode is not None:
            assert model.config.text_mode == text_mode
        # The operating point travels with the saved model.
        assert model.config.calibration_temperature > 0 and model.config.calibration_temperature != 1.0, folder
        assert 0.0 < model.config.decision_threshold < 1.0, folder
        assert model.config.decision_rule.startswith("sensitivity >= 0.90 on validation"), folder
    student = AutoModel.from_pretrained(out / "student")
    with torch.no_grad():
        probs = student.triage_probabilities(student(**processor(images=[film])).logits)
    assert probs.shape == (1, 2) and torch.allclose(probs.sum(-1), torch.ones(1))
    # The saved student's own decisions on the test logits match the table's sensitivity at its threshold.
    with np.load(out / "student" / "predictions_test.npz") as predictions:
        logits, labels = torch.from_numpy(predictions["logits"]), predictions["labels"]
    decisions = student.triage_decisions(student.triage_probabilities(logits)).numpy()
    if (labels == 1).any():
        assert results["student"]["sensitivity"] == pytest.approx(float(decisions[labels == 1].mean()))
