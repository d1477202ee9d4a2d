"""Both trainers under a real 2-process `accelerate launch` on CPU (gloo), via tests/training_ddp_script.py."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("training_ddp_script.py")


def test_two_process_teacher_and_distillation(tmp_path):
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT), str(tmp_path),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    # Own process group, so that a timeout ends the launcher and both workers (nothing left spinning on the CPUs).
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail("2-process run timed out after 300 s:\n" + stdout[-3000:] + stderr[-5000:])
    assert process.returncode == 0, stdout[-3000:] + stderr[-5000:]
    report = json.loads((tmp_path / "report.json").read_text())

    assert report["teacher_world_size"] == 2
    assert report["teacher_wrapped"] == "DistributedDataParallel"
    assert report["student_wrapped"] == "DistributedDataParallel"
    # The frozen teacher is never wrapped, stays in eval mode and has no trainable parameter.
    assert report["distill_teacher_type"] == "QDistillTeacherModel"
    assert report["distill_teacher_training"] is False
    assert report["distill_teacher_requires_grad"] is False
    # Gathered ITC over the two halves equals the ITC of the whole batch in one process, on both ranks.
    # (Only rank 0 writes the report; every rank's gathered value comes back through the gather.)
    assert report["itc_gathered_rank0"] == pytest.approx(report["itc_full_rank0"], rel=1e-5)
    for value in report["itc_gathered_all_ranks"]:
        assert value == pytest.approx(report["itc_full_rank0"], rel=1e-5)
    assert report["itc_local_rank0"] != pytest.approx(report["itc_full_rank0"], rel=1e-3)
    assert "eval_loss" in report["teacher_eval"] and "eval_auroc" in report["teacher_eval"]
    assert any("eval_loss" in h and "eval_auroc" in h for h in report["student_logs"])
    assert all("kd_mse" in h for h in report["student_logs"] if "loss" in h)
    # The teacher-target cache was computed once, by the main process; the other process loaded the file.
    assert report["cache_forwards_all_ranks"][0] > 0 and report["cache_forwards_all_ranks"][1] == 0
    cached_losses = [h["loss"] for h in report["student_cached_logs"] if "loss" in h]
    assert len(cached_losses) == 3 and all(loss == loss for loss in cached_losses)
    for name in ("teacher", "student"):
        assert (tmp_path / name / "model.safetensors").is_file()
        assert (tmp_path / name / "config.json").is_file()
