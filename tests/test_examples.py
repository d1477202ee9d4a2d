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
    """The whole demo at tiny sizes: Trainer runs, test table, saved folders, fresh-process triage."""
    out = tmp_path / "demo"
    result = run([str(EXAMPLES / "demo.py"), "--output_dir", str(out), "--num_train", "48", "--num_validation", "32",
                  "--num_test", "24", "--teacher_epochs", "1", "--student_epochs", "1", "--batch_size", "16"], tmp_path)
    # The fresh process reloaded the image-only student and printed one triage line per film.
    assert "fresh process: QDistillStudentModel (image_only) and QDistillProcessor" in result.stdout
    triage_lines = [line for line in result.stdout.splitlines() if line.startswith("triage synthetic-test-")]
    assert len(triage_lines) == 5 and all("p(urgent)=" in line and "truth=" in line for line in triage_lines)
    for row in ("teacher, film + human report", "student, film + pseudo-report", "student, film only, distilled",
                "student, film only, labels only", "majority class"):
        assert row in result.stdout, row
    assert "loss_itc" in result.stderr and "0.6365" in result.stderr
    assert re.search(r"recall@5 over \d+ distinct reports: [01]\.\d{3} \(chance [01]\.\d{3}\)", result.stderr)
    results = json.loads((out / "results.json").read_text())
    assert len(results) == 5 and all(0.0 <= m["auroc"] <= 1.0 and 0.0 <= m["accuracy"] <= 1.0 for m in results.values())

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
    student = AutoModel.from_pretrained(out / "student")
    with torch.no_grad():
        probs = student(**processor(images=[film])).logits.softmax(-1)
    assert probs.shape == (1, 2) and torch.allclose(probs.sum(-1), torch.ones(1))
