import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from qdistill_hf import QDistillStudentModel, QDistillTeacherModel
from tiny_models import report_batch, student_config, teacher_config


@pytest.mark.parametrize("model_class, factory", [(QDistillTeacherModel, teacher_config), (QDistillStudentModel, student_config)])
def test_save_pretrained_writes_a_hub_layout_with_auto_map(tmp_path, model_class, factory):
    model_class(factory()).save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"config.json", "model.safetensors", "configuration_qdistill.py", "modeling_qdistill.py", "loss_qdistill.py"} <= files
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": f"configuration_qdistill.{type(factory()).__name__}",
        "AutoModel": f"modeling_qdistill.{model_class.__name__}",
    }


def test_auto_classes_resolve_after_import(tmp_path):
    teacher = QDistillTeacherModel(teacher_config()).eval()
    teacher.save_pretrained(tmp_path / "teacher")
    student = QDistillStudentModel(student_config(text_mode="image_only")).eval()
    student.save_pretrained(tmp_path / "student")
    assert type(AutoConfig.from_pretrained(tmp_path / "teacher")).__name__ == "QDistillTeacherConfig"
    loaded_teacher = AutoModel.from_pretrained(tmp_path / "teacher")
    assert type(loaded_teacher) is QDistillTeacherModel
    classifier = AutoModelForImageClassification.from_pretrained(tmp_path / "student")
    assert type(classifier) is QDistillStudentModel
    pixel_values = report_batch()[0]
    with torch.no_grad():
        assert torch.equal(classifier(pixel_values=pixel_values).logits, student(pixel_values=pixel_values).logits)


REMOTE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys, torch
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "qdistill_hf" or name.startswith("qdistill_hf."):
                raise ImportError("qdistill_hf must not be imported in this process")
    sys.meta_path.insert(0, Block())
    from transformers import AutoModel
    from transformers.utils import logging
    logging.disable_progress_bar()
    model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)
    inputs = torch.load(sys.argv[2], weights_only=True)
    with torch.no_grad():
        out = model(**inputs)
    frozen = not any(p.requires_grad for p in model.vision_model.parameters())
    torch.save({"logits": out.logits, "frozen": torch.tensor(frozen)}, sys.argv[3])
    print(type(model).__module__, "qdistill_hf" in sys.modules)
    """
)


def test_remote_code_round_trip_in_a_fresh_process_without_the_package(tmp_path):
    model = QDistillTeacherModel(teacher_config()).eval()
    model.save_pretrained(tmp_path / "repo")
    pixel_values, input_ids, attention_mask, _ = report_batch()
    inputs = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}
    torch.save(inputs, tmp_path / "inputs.pt")
    (tmp_path / "remote.py").write_text(REMOTE_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, str(tmp_path / "remote.py"), str(tmp_path / "repo"), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    module, imported = result.stdout.split()[-2:]
    assert module.startswith("transformers_modules.") and imported == "False"
    remote = torch.load(tmp_path / "out.pt", weights_only=True)
    with torch.no_grad():
        local = model(**inputs).logits
    assert torch.allclose(remote["logits"], local, atol=1e-6)
    assert bool(remote["frozen"])
