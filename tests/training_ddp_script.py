"""Two-process CPU run of both Q-DISTILL trainers, launched by tests/test_training_distributed.py.

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
        tests/training_ddp_script.py OUTPUT_DIR

Rank 0 writes OUTPUT_DIR/report.json with what the test checks.
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from transformers.utils import logging as hf_logging  # noqa: E402

from qdistill_hf.training import (  # noqa: E402
    QDistillDataCollator,
    QDistillDistillationTrainer,
    QDistillTeacherTrainer,
    QDistillTrainingArguments,
    cache_teacher_targets,
    compute_auroc_metrics,
)
from training_toys import toy_dataset, toy_student, toy_teacher, toy_tokenizer  # noqa: E402


def main():
    output_dir = Path(sys.argv[1])
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    tokenizer = toy_tokenizer()
    common = dict(use_cpu=True, ddp_find_unused_parameters=False, per_device_train_batch_size=4,
                  per_device_eval_batch_size=4, learning_rate=1e-2, save_strategy="no", logging_steps=1,
                  disable_tqdm=True, dataloader_drop_last=True, seed=0)
    report = {}

    # 1. Teacher, with the contrastive loss over both processes' embeddings.
    args = QDistillTrainingArguments(output_dir=str(output_dir / "teacher"), max_steps=3, gather_itc_features=True,
                                     **common)
    trainer = QDistillTeacherTrainer(model=toy_teacher(), args=args, train_dataset=toy_dataset(16),
                                     eval_dataset=toy_dataset(8, seed=1), processing_class=tokenizer,
                                     compute_metrics=compute_auroc_metrics)
    trainer.train()
    metrics = trainer.evaluate()
    report["teacher_world_size"] = trainer.accelerator.num_processes
    report["teacher_wrapped"] = type(trainer.model_wrapped).__name__
    report["teacher_eval"] = {k: metrics[k] for k in ("eval_loss", "eval_auroc", "eval_loss_itc")}
    report["teacher_train_logs"] = [h for h in trainer.state.log_history if "loss" in h]

    # Gathered ITC equals the ITC of the whole global batch computed in one process.
    teacher = trainer.model.eval()
    rows = [toy_dataset(8, seed=2)[i] for i in range(8)]
    collator = QDistillDataCollator(tokenizer, text_column="report")
    full = collator(rows)
    full.pop("study_ids")
    rank = trainer.accelerator.process_index
    local = collator(rows[4 * rank: 4 * rank + 4])
    local.pop("study_ids")
    with torch.no_grad():
        full_itc = teacher(**full, return_loss=True).loss_itc
        local_out = teacher(**local, return_loss=True)
        _, gathered_itc = trainer._gathered_itc(trainer.model_wrapped, local, local_out)
    report[f"itc_full_rank{rank}"] = float(full_itc)
    report[f"itc_gathered_rank{rank}"] = float(gathered_itc)
    report[f"itc_local_rank{rank}"] = float(local_out.loss_itc)
    gathered_all = trainer.accelerator.gather(torch.tensor([float(gathered_itc)])).tolist()
    trainer.save_model()

    # Teacher targets cached under accelerate: the main process computes them first, the other one loads the file.
    forwards = []
    hook = teacher.register_forward_pre_hook(lambda *args: forwards.append(1))
    cached = cache_teacher_targets(toy_dataset(16), teacher, tokenizer, target="bi",
                                   cache_dir=str(output_dir / "teacher_targets"))
    hook.remove()
    report[f"cache_forwards_rank{rank}"] = len(forwards)
    report["cache_forwards_all_ranks"] = trainer.accelerator.gather(torch.tensor([len(forwards)])).tolist()

    # 2. Distillation from the trained teacher (frozen, not wrapped); every student parameter takes part in the loss,
    # so DDP runs with find_unused_parameters=False here too.
    args = QDistillTrainingArguments(output_dir=str(output_dir / "student"), max_steps=3, eval_strategy="steps",
                                     eval_steps=3, attention_alignment_weight=1.0, **common)
    student_trainer = QDistillDistillationTrainer(
        model=toy_student(), teacher_model=teacher, args=args, train_dataset=toy_dataset(16),
        eval_dataset=toy_dataset(8, seed=1), processing_class=tokenizer, compute_metrics=compute_auroc_metrics,
    )
    student_trainer.train()
    report["student_logs"] = [h for h in student_trainer.state.log_history if "loss" in h or "eval_loss" in h]

    # The same distillation from the cached targets, with no teacher at all.
    args = QDistillTrainingArguments(output_dir=str(output_dir / "student_cached"), max_steps=3, **common)
    cached_trainer = QDistillDistillationTrainer(model=toy_student(), args=args, train_dataset=cached,
                                                 processing_class=tokenizer)
    cached_trainer.train()
    report["student_cached_logs"] = [h for h in cached_trainer.state.log_history if "loss" in h]
    report["student_wrapped"] = type(student_trainer.model_wrapped).__name__
    report["distill_teacher_type"] = type(student_trainer.teacher_model).__name__
    report["distill_teacher_training"] = student_trainer.teacher_model.training
    report["distill_teacher_requires_grad"] = any(p.requires_grad for p in student_trainer.teacher_model.parameters())
    student_trainer.save_model()
    report["itc_gathered_all_ranks"] = gathered_all

    if student_trainer.accelerator.is_main_process:
        (output_dir / "report.json").write_text(json.dumps(report, indent=1))
    student_trainer.accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
