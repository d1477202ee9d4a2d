"""Both trainers on a few real paired films (skipped when the shared data folder is absent)."""

import math

import pytest
from transformers.utils import logging as hf_logging

from qdistill_hf import QDistillProcessor, load_cxr_dataset, train_report_tokenizer
from qdistill_hf.training import QDistillDistillationTrainer, QDistillTeacherTrainer, QDistillTrainingArguments
from training_toys import toy_image_processor, toy_student, toy_teacher


def test_trainers_on_real_films_and_reports(shared_data, tmp_path):
    hf_logging.set_verbosity_error()
    data = load_cxr_dataset("qdistill_folder", data_dir=str(shared_data / "cxr-paired"), cache_dir=str(tmp_path),
                            label_names=("normal", "abnormal"))
    train = data["train"].select(range(16))
    # Tiny models: 99-token vocabulary and 40 positions, so the real reports are truncated to 32 tokens.
    tokenizer = train_report_tokenizer(list(data["train"]["report"]), vocab_size=99, model_max_length=32)
    processor = QDistillProcessor(image_processor=toy_image_processor(), tokenizer=tokenizer)
    id2label = {0: "normal", 1: "abnormal"}
    common = dict(use_cpu=True, max_steps=2, per_device_train_batch_size=8, save_strategy="no", logging_steps=1,
                  disable_tqdm=True)

    teacher = toy_teacher(id2label=id2label)
    trainer = QDistillTeacherTrainer(model=teacher, processing_class=processor, train_dataset=train,
                                     args=QDistillTrainingArguments(output_dir=str(tmp_path / "t"), **common))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)

    student = toy_student(id2label=id2label)
    student.vision_model.load_state_dict(teacher.vision_model.state_dict())
    distiller = QDistillDistillationTrainer(model=student, teacher_model=teacher, processing_class=processor,
                                            train_dataset=train,
                                            args=QDistillTrainingArguments(output_dir=str(tmp_path / "s"), **common))
    distiller.train()
    assert all(math.isfinite(h["loss"]) for h in distiller.state.log_history if "loss" in h)

    # This folder has no pseudo-reports yet: a pseudo_report student is refused, naming the column and studies.
    reader = toy_student(text_mode="pseudo_report", id2label=id2label)
    distiller = QDistillDistillationTrainer(model=reader, teacher_model=teacher, processing_class=processor,
                                            train_dataset=train,
                                            args=QDistillTrainingArguments(output_dir=str(tmp_path / "p"), **common))
    with pytest.raises(ValueError, match=r"column 'pseudo_report' for studies \['nih"):
        distiller.train()
