"""The example scripts run end to end (small sizes) and leave loadable artefacts."""

import os
import subprocess
import sys
from pathlib import Path

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


def test_demo_runs_end_to_end_and_saves_loadable_models(tmp_path):
    out = tmp_path / "demo"
    result = run([str(EXAMPLES / "demo.py"), "--output_dir", str(out), "--num_train", "64", "--num_validation", "16",
                  "--num_test", "16", "--teacher_epochs", "1", "--student_epochs", "1", "--batch_size", "16"], tmp_path)
    triage_lines = [line for line in result.stdout.splitlines() if line.startswith("synthetic-test-")]
    assert len(triage_lines) == 5 and all("p(urgent)=" in line for line in triage_lines)
    assert "test  student (film only)" in result.stderr and "auroc" in result.stderr
    student = AutoModel.from_pretrained(out / "student")
    processor = AutoProcessor.from_pretrained(out / "student")
    assert type(student).__name__ == "QDistillStudentModel" and student.config.text_mode == "image_only"
    assert not any(p.requires_grad for p in student.vision_model.parameters())
    from PIL import Image

    film = Image.new("L", (64, 80), color=90)
    with torch.no_grad():
        probs = student(**processor(images=[film])).logits.softmax(-1)
    assert probs.shape == (1, 2) and torch.allclose(probs.sum(-1), torch.ones(1))
    teacher = AutoModel.from_pretrained(out / "teacher")
    assert type(teacher).__name__ == "QDistillTeacherModel"
