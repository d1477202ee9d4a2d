#!/usr/bin/env python
"""Train the Q-DISTILL teacher (frozen CheXzero ViT + Q-Former reading the film and its report) with the Trainer.

Quick CPU run on the embedded synthetic films (about a minute):

    HF_HUB_OFFLINE=1 python examples/run_teacher.py examples/configs/teacher_cpu_synthetic.yaml

The paper's settings on a qdistill_folder dataset, with a converted CheXzero encoder
(data_scripts/convert_chexzero.py) and options overriding the config file:

    HF_HUB_OFFLINE=1 python examples/run_teacher.py examples/configs/teacher_paper.yaml \
        --data_dir ../shared/data/cxr-paired --vision_model_name_or_path chexzero-vit-b32 --output_dir runs/teacher

Everything can also be given as flags (`--help` lists the script's options, `--help_all` all of them):

    HF_HUB_OFFLINE=1 python examples/run_teacher.py --dataset_name synthetic --output_dir runs/teacher \
        --use_feature_cache true --num_train_epochs 3 --per_device_train_batch_size 32 --learning_rate 3e-4

`output_dir` receives the teacher (`config.json`, `model.safetensors`), the processor (image processor + the report
tokenizer trained on the train split), `{train,eval,test}_results.json`, `all_results.json`, `trainer_state.json`
and a model card. `run_distillation.py --teacher_model_name_or_path <output_dir>` distils a student from it.
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path

from example_utils import (
    DataArguments,
    calibrate_on_validation,
    cache_features,
    disable_trainer_push,
    finish,
    load_splits,
    model_sizes,
    parse_arguments,
    setup_logging,
    training_arguments_class,
    training_epilog,
)


logger = logging.getLogger(__name__)

QFORMER_SIZE_FIELDS = (
    "num_query_tokens", "num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
    "hidden_dropout_prob", "attention_probs_dropout_prob",
)


@dataclass
class ModelArguments:
    """The frozen vision encoder, the processor and the teacher's sizes and loss settings."""

    _argument_group_name = "model options"

    vision_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Folder (or Hub id) of the frozen CLIPVisionModel, e.g. CheXzero converted with "
            "data_scripts/convert_chexzero.py. Default: a small randomly initialised CLIP ViT with CheXzero's "
            "geometry (224 px, patch 32, width 128, 2 layers): a stand-in for offline tests, not a real encoder."
        },
    )
    stand_in_seed: int = field(default=0, metadata={"help": "Seed of the random stand-in encoder."})
    processor_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Folder of a saved QDistillProcessor (data_scripts/build_tokenizer.py). Default: train the "
            "report tokenizer on the train split and use the encoder folder's image processor (if it has one)."
        },
    )
    vocab_size: int = field(default=8000, metadata={"help": "Tokenizer trained here: target vocabulary size."})
    tokenizer_min_frequency: int = field(default=2, metadata={"help": "Tokenizer trained here: minimum count."})
    model_max_length: int = field(default=256, metadata={"help": "Tokenizer trained here: longest report, in tokens."})
    # Sizes and loss settings: `None` keeps QFormerConfig's / QDistillTeacherConfig's default.
    num_query_tokens: int | None = field(default=None, metadata={"help": "Learnable queries (default: the config's)."})
    num_hidden_layers: int | None = field(default=None, metadata={"help": "Q-Former layers (default: the config's)."})
    hidden_size: int | None = field(default=None, metadata={"help": "Q-Former width (default: the config's)."})
    num_attention_heads: int | None = field(default=None, metadata={"help": "Q-Former heads (default: the config's)."})
    intermediate_size: int | None = field(default=None, metadata={"help": "Feed-forward width (default: config's)."})
    hidden_dropout_prob: float | None = field(default=None, metadata={"help": "Q-Former dropout (default: config's)."})
    attention_probs_dropout_prob: float | None = field(
        default=None, metadata={"help": "Attention dropout (default: the config's)."}
    )
    embed_dim: int | None = field(default=None, metadata={"help": "ITC embedding size (default: the config's)."})
    itc_loss_weight: float | None = field(default=None, metadata={"help": "ITC weight (default: the config's 0.45)."})
    itm_loss_weight: float | None = field(default=None, metadata={"help": "ITM weight (default: the config's 0.45)."})
    cls_loss_weight: float | None = field(default=None, metadata={"help": "Focal weight (default: the config's 0.1)."})
    focal_gamma: float | None = field(default=None, metadata={"help": "Focal gamma (default: the config's 2.0)."})
    focal_alpha: list[float] | None = field(
        default=None, metadata={"help": "Per-class focal weights in label order (default: none)."}
    )
    focal_alpha_inverse_frequency: bool = field(
        default=False,
        metadata={"help": "Focal weights N / (K * n_k) from the train labels (the original's teacher setting)."},
    )

    def __post_init__(self):
        if self.focal_alpha is not None and self.focal_alpha_inverse_frequency:
            raise ValueError("give --focal_alpha or --focal_alpha_inverse_frequency, not both")
        for name in ("vocab_size", "tokenizer_min_frequency", "model_max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.processor_name_or_path is not None and not Path(self.processor_name_or_path).is_dir():
            raise ValueError(f"--processor_name_or_path {self.processor_name_or_path}: no such folder")


def stand_in_encoder(seed: int):
    """A small random CLIP ViT with CheXzero's geometry (224 px, patch 32, 50 tokens), for offline runs."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, image_size=224,
        patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=64,
    )
    return CLIPVisionModel(config).eval()


def inverse_frequency_alpha(labels, num_labels: int) -> list[float]:
    """`N / (K * n_k)` per class k over `labels`; a class without any example raises (its weight is undefined)."""
    counts = [0] * num_labels
    for label in labels:
        counts[int(label)] += 1
    missing = [k for k, n in enumerate(counts) if n == 0]
    if missing:
        raise ValueError(f"--focal_alpha_inverse_frequency: classes {missing} have no training example")
    return [len(labels) / (num_labels * n) for n in counts]


def main(argv: list[str] | None = None) -> int:
    # 1. Parse the arguments: a single .yaml/.yml/.json config file (+ overrides), or flags.
    model_args, data_args, training_args = parse_arguments(
        (ModelArguments, DataArguments),
        lambda: (training_arguments_class(),),
        argv,
        description=__doc__.split("\n\n")[0],
        training_epilog=training_epilog("run_teacher.py"),
    )
    push_to_hub = disable_trainer_push(training_args)

    # 2. Logging, with the level of this process (`get_process_log_level`).
    setup_logging(training_args, logger)
    logger.info(f"Training/evaluation parameters {training_args}")

    import torch
    from transformers import CLIPVisionModel, set_seed

    from qdistill_hf import (
        QDistillImageProcessor,
        QDistillProcessor,
        QDistillTeacherConfig,
        QDistillTeacherModel,
        build_report_tokenizer,
    )
    from qdistill_hf.training import QDistillTeacherTrainer, compute_auroc_metrics

    set_seed(training_args.seed)

    # 3. Data: train / validation / test splits of the qdistill_hf CXR builder (main process first).
    splits = load_splits(data_args, training_args)
    label_names = splits["train"].features["label"].names
    logger.info(f"Splits: { {name: len(split) for name, split in splits.items()} }, labels {label_names}")

    # 4. Processor: a saved one, or the report tokenizer trained on the *train* split only.
    if model_args.processor_name_or_path is not None:
        processor = QDistillProcessor.from_pretrained(model_args.processor_name_or_path)
    else:
        tokenizer = build_report_tokenizer(
            splits, text_column=training_args.teacher_text_column, vocab_size=model_args.vocab_size,
            min_frequency=model_args.tokenizer_min_frequency, model_max_length=model_args.model_max_length,
        )
        encoder_folder = model_args.vision_model_name_or_path
        if encoder_folder is not None and (Path(encoder_folder) / "preprocessor_config.json").is_file():
            image_processor = QDistillImageProcessor.from_pretrained(encoder_folder)
        else:
            image_processor = QDistillImageProcessor()
        processor = QDistillProcessor(image_processor=image_processor, tokenizer=tokenizer)
    tokenizer = processor.tokenizer

    # 5. The frozen vision encoder: a converted CheXzero folder, or the random stand-in.
    if model_args.vision_model_name_or_path is not None:
        encoder = CLIPVisionModel.from_pretrained(model_args.vision_model_name_or_path)
    else:
        logger.warning("No --vision_model_name_or_path: the frozen encoder is a small random stand-in, not CheXzero.")
        encoder = stand_in_encoder(model_args.stand_in_seed)
    encoder.eval().requires_grad_(False)

    # 6. Optional frozen-feature cache: the encoder runs once per film instead of at every step.
    if data_args.use_feature_cache or training_args.feature_cache_dir is not None:
        splits = cache_features(splits, encoder, processor.image_processor, training_args)

    # 7. The teacher: Q-Former sizes and loss settings from the arguments, the encoder's weights loaded.
    id2label = dict(enumerate(label_names))
    focal_alpha = model_args.focal_alpha
    if model_args.focal_alpha_inverse_frequency:
        focal_alpha = inverse_frequency_alpha(splits["train"]["label"], len(label_names))
        logger.info(f"Focal alpha (inverse train frequency): {focal_alpha}")
    qformer_config = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "max_position_embeddings": tokenizer.model_max_length,
        **model_sizes(model_args, QFORMER_SIZE_FIELDS),
    }
    config = QDistillTeacherConfig(
        vision_config=encoder.config.to_dict(),
        qformer_config=qformer_config,
        id2label=id2label,
        focal_alpha=focal_alpha,
        **model_sizes(
            model_args, ("embed_dim", "itc_loss_weight", "itm_loss_weight", "cls_loss_weight", "focal_gamma")
        ),
    )
    model = QDistillTeacherModel(config)
    model.vision_model.load_state_dict(encoder.state_dict())
    del encoder
    if "image_features" in splits["train"].column_names:
        # Standardise the encoder tokens with the training films' statistics: without it every film's queries start
        # identical and ITC stays at chance (see `set_image_feature_statistics`).
        from qdistill_hf.models.modeling_qdistill import image_feature_statistics

        features = splits["train"].select_columns(["image_features"]).with_format("torch")[:]["image_features"]
        model.set_image_feature_statistics(*image_feature_statistics(features))
        logger.info("Encoder tokens standardised with the training films' per-(token, channel) statistics")
    else:
        logger.warning("No feature cache: the encoder tokens are not standardised (pass --use_feature_cache true "
                       "to compute their training-set statistics); ITC may stay near chance.")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(f"Teacher: {trainable:,} trainable parameters (vision encoder frozen), torch {torch.__version__}")

    # 8. The Trainer: evaluation every epoch, best checkpoint by validation AUROC (see --help for the defaults).
    trainer = QDistillTeacherTrainer(
        model=model,
        args=training_args,
        train_dataset=splits["train"],
        eval_dataset=splits.get("validation"),
        processing_class=processor,
        compute_metrics=compute_auroc_metrics,
    )

    # 9. Train.
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    # 10a. Predictions of the kept model (predictions_<split>.npz, for evaluate_triage.py), then temperature and
    # threshold fitted on validation (90% sensitivity) and stored in the config that `finish` saves.
    calibrate_on_validation(trainer, splits, training_args.output_dir)

    # 10. Save, evaluate on validation and test, log and save metrics; push to the Hub or write a model card.
    kwargs = {"finetuned_from": model_args.vision_model_name_or_path or "random stand-in encoder",
              "tasks": "image-classification", "dataset": data_args.dataset_name, "tags": ["qdistill", "teacher"]}
    return finish(trainer, processor, splits, training_args, push_to_hub, train_result, kwargs)


if __name__ == "__main__":
    raise SystemExit(main())
