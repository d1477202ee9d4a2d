#!/usr/bin/env python
"""Distil a Q-DISTILL student (image only, or film + pseudo-report) from a trained teacher with the Trainer.

Quick CPU run on the synthetic films, after `run_teacher.py examples/configs/teacher_cpu_synthetic.yaml`:

    HF_HUB_OFFLINE=1 python examples/run_distillation.py examples/configs/student_cpu_synthetic.yaml

The paper's settings (a pseudo-report student; the dataset must carry pseudo-reports, see below):

    HF_HUB_OFFLINE=1 python examples/run_distillation.py examples/configs/student_paper.yaml \
        --data_dir ../shared/data/cxr-paired --teacher_model_name_or_path runs/teacher --output_dir runs/student

With flags only (`--help` lists the script's options, `--help_all` all of them):

    HF_HUB_OFFLINE=1 python examples/run_distillation.py --teacher_model_name_or_path runs/teacher \
        --dataset_name synthetic --text_mode image_only --use_feature_cache true --output_dir runs/student

The student reuses the teacher's frozen vision encoder (configuration and weights) and its processor, so it reads
the same image tokens and report vocabulary. Pseudo-reports (`--text_mode pseudo_report`) come from the dataset's
`student_text_column` (`pseudo_report`): for a qdistill_folder dataset, make them first with

    HF_HUB_OFFLINE=1 python data_scripts/generate_pseudo_reports.py --data_dir DATA --vision_model chexzero-vit-b32

(retrieval; or `--generator hf --model_id google/medgemma-4b-it` on a GPU), which writes `DATA/medgemma_reports/`
that the builder reads. `--pseudo_report_source retrieval` instead gives every film the report of its most similar
*training* film (never its own) from the cached encoder features, as examples/demo.py does; the synthetic dataset
has no pseudo-reports, so it needs this.

`output_dir` receives the student (`config.json`, `model.safetensors`), the processor, the metrics files and a
model card; the student loads with `AutoModel.from_pretrained(output_dir)` after `import qdistill_hf`.
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from example_utils import (
    DataArguments,
    calibrate_on_validation,
    cache_features,
    disable_trainer_push,
    finish,
    load_splits,
    model_sizes,
    parse_arguments,
    read_library_constant,
    setup_logging,
    training_arguments_class,
    training_epilog,
)


logger = logging.getLogger(__name__)

QFORMER_SIZE_FIELDS = (
    "num_query_tokens", "num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
    "hidden_dropout_prob", "attention_probs_dropout_prob",
)
DISTILLATION_EPILOG = (
    "  --teacher_model_name_or_path DIR  the trained teacher (run_teacher.py's output_dir); required\n"
    "  --distill_target bi, --feature_mse_weight X, --feature_cosine_weight X, --logit_kd_weight X,\n"
    "  --kd_temperature T, --attention_alignment_weight X, --supervised_weight X, --student_text_column C\n"
)
StudentTextMode = Literal[read_library_constant("models/configuration_qdistill.py", "STUDENT_TEXT_MODES")]


@dataclass
class ModelArguments:
    """The student's text input, sizes and supervised-loss settings (the teacher is a training option)."""

    _argument_group_name = "model options"

    text_mode: StudentTextMode = field(
        default="image_only",
        metadata={"help": "image_only: the film alone; pseudo_report: the film and a generated report."},
    )
    processor_name_or_path: str | None = field(
        default=None, metadata={"help": "Folder of the QDistillProcessor (default: the teacher's folder)."}
    )
    num_query_tokens: int | None = field(
        default=None, metadata={"help": "Learnable queries (default: QDistillStudentConfig's, 8)."}
    )
    num_hidden_layers: int | None = field(default=None, metadata={"help": "Q-Former layers (default: the config's)."})
    hidden_size: int | None = field(default=None, metadata={"help": "Q-Former width (default: the config's)."})
    num_attention_heads: int | None = field(default=None, metadata={"help": "Q-Former heads (default: the config's)."})
    intermediate_size: int | None = field(
        default=None, metadata={"help": "Feed-forward width (default: the config's)."}
    )
    hidden_dropout_prob: float | None = field(
        default=None, metadata={"help": "Q-Former dropout (default: the config's)."}
    )
    attention_probs_dropout_prob: float | None = field(
        default=None, metadata={"help": "Attention dropout (default: the config's)."}
    )
    focal_gamma: float | None = field(default=None, metadata={"help": "Focal gamma of the supervised loss."})
    focal_alpha: list[float] | None = field(
        default=None, metadata={"help": "Per-class focal weights in label order (default: none)."}
    )


@dataclass
class DistillationDataArguments(DataArguments):
    """`DataArguments` plus where pseudo-reports come from and the teacher-target cache."""

    pseudo_report_source: Literal["dataset", "retrieval"] = field(
        default="dataset",
        metadata={
            "help": "pseudo_report students: 'dataset' reads student_text_column (make it with "
            "data_scripts/generate_pseudo_reports.py); 'retrieval' gives each film the report of its most similar "
            "training film from the cached features (switches the feature cache on)."
        },
    )
    cache_teacher_targets: bool = field(
        default=False,
        metadata={
            "help": "Run the frozen teacher once per study and store its targets (in --feature_cache_dir, or beside "
            "the dataset's Arrow files) instead of at every step."
        },
    )


def retrieval_pseudo_reports(splits, student_text_column: str, report_column: str):
    """Every split with `student_text_column` = the report of its most similar *training* film (never its own)."""
    import datasets
    import numpy as np

    from qdistill_hf.reports.pseudo_reports import RetrievalPseudoReportGenerator, image_embeddings_from_features

    train = splits["train"]
    train_embeds = image_embeddings_from_features(np.asarray(train["image_features"], dtype=np.float32))
    retriever = RetrievalPseudoReportGenerator(train_embeds, train[report_column], train["study_id"])
    out = {}
    for name, split in splits.items():
        embeds = image_embeddings_from_features(np.asarray(split["image_features"], dtype=np.float32))
        reports = retriever.generate(embeds, split["study_id"], own_reports=split[report_column])
        if student_text_column in split.column_names:
            split = split.remove_columns(student_text_column)
        out[name] = split.add_column(student_text_column, reports)
    return datasets.DatasetDict(out)


def check_pseudo_reports(splits, column: str) -> None:
    """Raise naming the split, the count and the first studies when `column` is missing or empty anywhere."""
    for name, split in splits.items():
        if column not in split.column_names:
            raise ValueError(
                f"The {name} split has no column {column!r} for a pseudo_report student (columns: "
                f"{split.column_names}); generate pseudo-reports with data_scripts/generate_pseudo_reports.py or "
                "pass --pseudo_report_source retrieval"
            )
        texts = split[column]
        empty = [sid for sid, text in zip(split["study_id"], texts) if not isinstance(text, str) or not text.strip()]
        if empty:
            raise ValueError(
                f"{len(empty)} of {len(texts)} studies of the {name} split have no {column!r} (e.g. {empty[:5]}); "
                "generate them with data_scripts/generate_pseudo_reports.py, or pass --pseudo_report_source retrieval"
            )


def main(argv: list[str] | None = None) -> int:
    # 1. Parse the arguments: a single .yaml/.yml/.json config file (+ overrides), or flags.
    model_args, data_args, training_args = parse_arguments(
        (ModelArguments, DistillationDataArguments),
        lambda: (training_arguments_class(),),
        argv,
        description=__doc__.split("\n\n")[0],
        training_epilog=training_epilog("run_distillation.py", DISTILLATION_EPILOG),
    )
    if training_args.teacher_model_name_or_path is None:
        raise ValueError("--teacher_model_name_or_path is required: the folder run_teacher.py wrote")
    push_to_hub = disable_trainer_push(training_args)

    # 2. Logging, with the level of this process (`get_process_log_level`).
    setup_logging(training_args, logger)
    logger.info(f"Training/evaluation parameters {training_args}")

    from transformers import AutoModel, set_seed

    from qdistill_hf import QDistillProcessor, QDistillStudentConfig, QDistillStudentModel, QDistillTeacherModel
    from qdistill_hf.training import QDistillDistillationTrainer, cache_teacher_targets, compute_auroc_metrics

    set_seed(training_args.seed)

    # 3. The frozen teacher, and its processor (the student reads the same tokens).
    teacher = AutoModel.from_pretrained(training_args.teacher_model_name_or_path)
    if not isinstance(teacher, QDistillTeacherModel):
        raise ValueError(
            f"{training_args.teacher_model_name_or_path} holds a {type(teacher).__name__}, not a QDistillTeacherModel"
        )
    teacher.eval().requires_grad_(False)
    processor = QDistillProcessor.from_pretrained(
        model_args.processor_name_or_path or training_args.teacher_model_name_or_path
    )

    # 4. Data: train / validation / test splits of the qdistill_hf CXR builder (main process first).
    splits = load_splits(data_args, training_args)
    label_names = splits["train"].features["label"].names
    teacher_labels = [teacher.config.id2label[i] for i in range(teacher.config.num_labels)]
    if list(label_names) != teacher_labels:
        raise ValueError(f"The dataset's classes {label_names} are not the teacher's {teacher_labels}; pass "
                         "--class_names in the teacher's order")
    logger.info(f"Splits: { {name: len(split) for name, split in splits.items()} }, labels {label_names}")

    # 5. Optional frozen-feature cache, with the teacher's encoder (needed by retrieval pseudo-reports).
    pseudo_reports = model_args.text_mode == "pseudo_report"
    retrieval = pseudo_reports and data_args.pseudo_report_source == "retrieval"
    if data_args.use_feature_cache or training_args.feature_cache_dir is not None or retrieval:
        splits = cache_features(splits, teacher.vision_model, processor.image_processor, training_args)

    # 6. Pseudo-reports for a pseudo_report student: from the dataset, or retrieved from the training films.
    if retrieval:
        splits = retrieval_pseudo_reports(splits, training_args.student_text_column, training_args.teacher_text_column)
    if pseudo_reports:
        check_pseudo_reports(splits, training_args.student_text_column)

    # 7. Optional teacher-target cache: the teacher runs once per study instead of at every step.
    if data_args.cache_teacher_targets:
        splits = {
            name: cache_teacher_targets(
                split, teacher, processor, target=training_args.distill_target,
                batch_size=training_args.per_device_eval_batch_size,
                with_attention=training_args.attention_alignment_weight > 0,
                cache_dir=training_args.feature_cache_dir, teacher_text_column=training_args.teacher_text_column,
            )
            for name, split in splits.items()
        }

    # 8. The student: the teacher's encoder (configuration and frozen weights), labels and query width.
    qformer_config = model_sizes(model_args, QFORMER_SIZE_FIELDS)
    if pseudo_reports:
        tokenizer = processor.tokenizer
        qformer_config.update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                              max_position_embeddings=tokenizer.model_max_length)
    config = QDistillStudentConfig(
        vision_config=teacher.config.vision_config.to_dict(),
        qformer_config=qformer_config,
        text_mode=model_args.text_mode,
        teacher_hidden_size=teacher.config.qformer_config.hidden_size,
        id2label=dict(enumerate(teacher_labels)),
        focal_alpha=model_args.focal_alpha,
        **model_sizes(model_args, ("focal_gamma",)),
    )
    model = QDistillStudentModel(config)
    model.vision_model.load_state_dict(teacher.vision_model.state_dict())
    if teacher.config.qformer_config.standardize_image_features:
        # The same training-film statistics as the teacher, so both read the same standardised tokens.
        model.set_image_feature_statistics(teacher.qformer.image_feature_mean, teacher.qformer.image_feature_std)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(f"Student ({model_args.text_mode}): {trainable:,} trainable parameters (vision encoder frozen)")

    # 9. The Trainer: evaluation every epoch, best checkpoint by validation AUROC (see --help for the defaults).
    trainer = QDistillDistillationTrainer(
        model=model,
        teacher_model=teacher,
        args=training_args,
        train_dataset=splits["train"],
        eval_dataset=splits.get("validation"),
        processing_class=processor,
        compute_metrics=compute_auroc_metrics,
    )

    # 10. Train.
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    # 11a. Predictions of the kept model (predictions_<split>.npz, for evaluate_triage.py), then temperature and
    # threshold fitted on validation (90% sensitivity) and stored in the config that `finish` saves.
    calibrate_on_validation(trainer, splits, training_args.output_dir)

    # 11. Save, evaluate on validation and test, log and save metrics; push to the Hub or write a model card.
    kwargs = {"finetuned_from": str(Path(training_args.teacher_model_name_or_path)), "tasks": "image-classification",
              "dataset": data_args.dataset_name, "tags": ["qdistill", "student", model_args.text_mode]}
    return finish(trainer, processor, splits, training_args, push_to_hub, train_result, kwargs)


if __name__ == "__main__":
    raise SystemExit(main())
