#!/usr/bin/env python
"""Train an image-only triage baseline with the stock `transformers.Trainer`: a small ResNet from scratch, or a linear
probe / small MLP on the frozen encoder's cached tokens.

The baselines of the original Q-DISTILL, on the same data, splits, metric and checkpoint choice as the teacher and the
students:

- `--baseline resnet`, the original's "CNN baseline": transformers' `ResNetForImageClassification` from a small
  `ResNetConfig` (no torchvision), trained from scratch on the films. Its input is the project's one preprocessing,
  `QDistillImageProcessor` (grey films repeated to 3 channels, letterboxed to `--image_size`, default 224, CLIP
  normalisation).
- `--baseline linear_probe` / `--baseline mlp`, the original's "CNN baseline with CheXzero": the frozen vision encoder
  the teacher and students use (`--vision_model_name_or_path`, a `CLIPVisionModel` folder such as a converted CheXzero
  or `run_clip_pretraining.py`'s `vision_model/`; default: `run_teacher.py`'s random stand-in) runs once per film
  (`cache_image_features`); the head reads one pooled vector per film, standardised with the training films'
  per-channel mean and standard deviation (stored in the saved model). `--pooling cls` (default, the original's
  choice) is the encoder's CLS token of `last_hidden_state`, i.e. before `post_layernorm` and without CLIP's
  projection; `--pooling mean` averages all tokens (CLS and patches). `linear_probe` is one linear layer; `mlp` is
  the original's 768 -> 512 -> 256 -> 2 (ReLU, dropout 0.5) with `--mlp_hidden_sizes`.

Quick CPU runs on the embedded synthetic films (the figures of examples/README.md):

    HF_HUB_OFFLINE=1 python examples/run_baseline.py examples/configs/baseline_cpu_synthetic.yaml --baseline resnet
    HF_HUB_OFFLINE=1 python examples/run_baseline.py examples/configs/baseline_cpu_synthetic.yaml --baseline mlp

On a qdistill_folder dataset with a real encoder:

    HF_HUB_OFFLINE=1 python examples/run_baseline.py --baseline linear_probe --dataset_name qdistill_folder \
        --data_dir ../shared/data/cxr-paired --class_names normal abnormal \
        --vision_model_name_or_path runs/clip/vision_model --output_dir runs/baseline_probe

Loss: plain cross-entropy (the models' own loss), not the focal loss the original used for its baselines, and no
class weighting; the checkpoint is chosen by validation AUROC, which does not depend on a decision threshold.

`output_dir` receives the model (`config.json`, `model.safetensors`), the image processor, the metrics files, a model
card and `predictions_validation.npz` / `predictions_test.npz` (`study_ids`, `labels`, `logits`; the input of
`examples/evaluate_triage.py`). The ResNet reloads with `AutoModelForImageClassification.from_pretrained(output_dir)`
and reads films through the saved image processor (`import qdistill_hf` registers it with `AutoImageProcessor`). The
probe heads reload with `run_baseline.FeatureProbeForImageClassification.from_pretrained(output_dir)` and read the
*encoder's tokens*, not films: the encoder is named in their config (`encoder`), not saved with them.
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from example_utils import (
    DataArguments,
    cache_features,
    disable_trainer_push,
    finish,
    load_splits,
    parse_arguments,
    save_predictions,
    setup_logging,
    training_arguments_class,
    training_epilog,
)


logger = logging.getLogger(__name__)

BASELINES = ("resnet", "linear_probe", "mlp")
BASELINE_EPILOG = (
    "  --baseline resnet|linear_probe|mlp  which baseline (required)\n"
    "  --use_feature_cache true            implied by linear_probe and mlp\n"
)


@dataclass
class BaselineArguments:
    """Which baseline, and its sizes."""

    _argument_group_name = "baseline options"

    baseline: Literal[BASELINES] = field(
        default=None,
        metadata={"help": "resnet: ResNet from scratch on the films; linear_probe / mlp: a head on the frozen "
                          "encoder's cached tokens."},
    )
    image_processor_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Folder with a saved QDistillImageProcessor (preprocessor_config.json). Default: the encoder "
                          "folder's (probes) or QDistillImageProcessor() (resnet)."},
    )
    # ResNet.
    image_size: int | None = field(
        default=None, metadata={"help": "resnet: films are letterboxed to this square size (default: the processor's, "
                                        "224). The probes read films at their encoder's size."}
    )
    embedding_size: int = field(default=32, metadata={"help": "resnet: channels of the stem convolution."})
    hidden_sizes: list[int] = field(
        default_factory=lambda: [32, 64, 128, 256],
        metadata={"help": "resnet: channels of each stage (the original CNN's widths 32, 64, 128, 256)."},
    )
    depths: list[int] = field(default_factory=lambda: [1, 1, 1, 1], metadata={"help": "resnet: blocks per stage."})
    layer_type: Literal["basic", "bottleneck"] = field(default="basic", metadata={"help": "resnet: block type."})
    # Probes.
    vision_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "linear_probe / mlp: folder of the frozen CLIPVisionModel (e.g. converted CheXzero, or "
                          "run_clip_pretraining.py's vision_model/). Default: run_teacher.py's random stand-in."},
    )
    stand_in_seed: int = field(default=0, metadata={"help": "Seed of the random stand-in encoder."})
    pooling: Literal["cls", "mean"] = field(
        default="cls",
        metadata={"help": "linear_probe / mlp: cls = the CLS token of last_hidden_state (before post_layernorm, the "
                          "original's choice); mean = the mean of all tokens."},
    )
    mlp_hidden_sizes: list[int] = field(
        default_factory=lambda: [512, 256], metadata={"help": "mlp: hidden layer widths (the original's 512, 256)."}
    )
    dropout: float = field(default=0.5, metadata={"help": "mlp: dropout after each hidden layer (the original's)."})

    def __post_init__(self):
        if self.baseline not in BASELINES:
            raise ValueError(f"--baseline must be one of {list(BASELINES)}, got {self.baseline!r}")
        for name in ("hidden_sizes", "depths", "mlp_hidden_sizes"):
            values = getattr(self, name)
            if not values or any(v < 1 for v in values):
                raise ValueError(f"--{name} needs positive integers, got {values}")
        if len(self.hidden_sizes) != len(self.depths):
            raise ValueError(f"--hidden_sizes {self.hidden_sizes} and --depths {self.depths} need one value per stage")
        if self.image_size is not None and self.image_size < 32:
            raise ValueError(f"--image_size must be >= 32 (the ResNet downsamples 32x), got {self.image_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.baseline == "resnet" and self.vision_model_name_or_path is not None:
            raise ValueError("--vision_model_name_or_path is for linear_probe and mlp; resnet learns from the films")


# ------------------------------------------------------------------------------------------------ the probe head


def _probe_classes():
    """`FeatureProbeConfig` and `FeatureProbeForImageClassification` (built on first use: they import torch)."""
    global FeatureProbeConfig, FeatureProbeForImageClassification
    if "FeatureProbeForImageClassification" in globals():
        return FeatureProbeConfig, FeatureProbeForImageClassification

    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForImageClassification, PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import ImageClassifierOutputWithNoAttention

    class FeatureProbeConfig(PretrainedConfig):
        r"""
        Configuration of [`FeatureProbeForImageClassification`], a head on a frozen encoder's tokens.

        Args:
            input_size (`int`, *optional*, defaults to 768): width of the encoder's tokens.
            head (`str`, *optional*, defaults to `"linear"`): `"linear"` (one linear layer) or `"mlp"`.
            mlp_hidden_sizes (`list[int]`, *optional*, defaults to `[512, 256]`): hidden widths of the MLP.
            dropout (`float`, *optional*, defaults to 0.5): dropout after each hidden layer of the MLP.
            pooling (`str`, *optional*, defaults to `"cls"`): `"cls"` (token 0) or `"mean"` (all tokens).
            encoder (`str`, *optional*): the encoder whose tokens the head reads (a folder, or the stand-in).
        """

        model_type = "qdistill_feature_probe"

        def __init__(self, input_size=768, head="linear", mlp_hidden_sizes=(512, 256), dropout=0.5, pooling="cls",
                     encoder=None, **kwargs):
            if head not in ("linear", "mlp"):
                raise ValueError(f"head must be 'linear' or 'mlp', got {head!r}")
            if pooling not in ("cls", "mean"):
                raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
            self.input_size = input_size
            self.head = head
            self.mlp_hidden_sizes = list(mlp_hidden_sizes)
            self.dropout = dropout
            self.pooling = pooling
            self.encoder = encoder
            super().__init__(**kwargs)

    class FeatureProbeForImageClassification(PreTrainedModel):
        """Pool the encoder's tokens (`(batch, tokens, width)`), standardise per channel, classify.

        `feature_mean`/`feature_std` are the training films' statistics of the pooled vector (saved buffers; 0 and 1
        until `set_feature_statistics` is called). The loss is plain cross-entropy.
        """

        config_class = FeatureProbeConfig
        main_input_name = "image_features"
        base_model_prefix = "probe"

        def __init__(self, config):
            super().__init__(config)
            widths = [config.input_size] + (config.mlp_hidden_sizes if config.head == "mlp" else [])
            layers = []
            for width_in, width_out in zip(widths[:-1], widths[1:]):
                layers += [nn.Linear(width_in, width_out), nn.ReLU(), nn.Dropout(config.dropout)]
            layers.append(nn.Linear(widths[-1], config.num_labels))
            self.classifier = nn.Sequential(*layers)
            self.register_buffer("feature_mean", torch.zeros(config.input_size))
            self.register_buffer("feature_std", torch.ones(config.input_size))
            self.post_init()

        def _init_weights(self, module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        def pool(self, image_features):
            """The pooled vector of every film: the CLS token or the mean of all tokens."""
            if image_features.ndim != 3 or image_features.shape[-1] != self.config.input_size:
                raise ValueError(f"image_features must be (batch, tokens, {self.config.input_size}), got "
                                 f"{tuple(image_features.shape)}")
            image_features = image_features.float()
            return image_features[:, 0] if self.config.pooling == "cls" else image_features.mean(dim=1)

        def set_feature_statistics(self, mean, std):
            """Store the training films' per-channel mean and std of the pooled vector (std must be positive)."""
            if (std <= 0).any():
                raise ValueError(f"{int((std <= 0).sum())} feature channels have a non-positive std; a constant "
                                 "channel cannot be standardised")
            self.feature_mean.copy_(mean)
            self.feature_std.copy_(std)

        def forward(self, image_features, labels=None, **kwargs):
            pooled = (self.pool(image_features) - self.feature_mean) / self.feature_std
            logits = self.classifier(pooled)
            loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
            return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits)

    AutoConfig.register(FeatureProbeConfig.model_type, FeatureProbeConfig, exist_ok=True)
    AutoModelForImageClassification.register(FeatureProbeConfig, FeatureProbeForImageClassification, exist_ok=True)
    globals().update(FeatureProbeConfig=FeatureProbeConfig,
                     FeatureProbeForImageClassification=FeatureProbeForImageClassification)
    return FeatureProbeConfig, FeatureProbeForImageClassification


def __getattr__(name):
    """`run_baseline.FeatureProbeConfig` / `.FeatureProbeForImageClassification`, built on first access."""
    if name in ("FeatureProbeConfig", "FeatureProbeForImageClassification"):
        return dict(zip(("FeatureProbeConfig", "FeatureProbeForImageClassification"), _probe_classes()))[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------------------------ collators


class FilmCollator:
    """Rows with `image` and `label` -> `pixel_values` (the image processor) and `labels`, for the ResNet."""

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __call__(self, rows):
        import torch

        pixel_values = self.image_processor([row["image"] for row in rows], return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixel_values, "labels": torch.tensor([int(row["label"]) for row in rows])}


class FeatureCollator:
    """Rows with cached `image_features` and `label` -> `image_features` (float32) and `labels`, for the probes."""

    def __call__(self, rows):
        import numpy as np
        import torch

        features = torch.from_numpy(np.stack([np.asarray(row["image_features"], dtype=np.float32) for row in rows]))
        return {"image_features": features, "labels": torch.tensor([int(row["label"]) for row in rows])}


def pooled_statistics(model, dataset, batch_size: int = 256):
    """Per-channel mean and (population) std of the pooled vectors of `dataset`'s cached `image_features`."""
    import torch

    collator = FeatureCollator()
    pooled = []
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            pooled.append(model.pool(collator(rows)["image_features"]))
    pooled = torch.cat(pooled).double()
    return pooled.mean(dim=0).float(), pooled.std(dim=0, unbiased=False).float()


def write_predictions(trainer, splits, output_dir) -> list[Path]:
    """`predictions_<split>.npz` (study_ids, labels, logits) of the validation and test splits, in dataset order."""
    import numpy as np

    written = []
    for name in ("validation", "test"):
        if name not in splits:
            continue
        split = splits[name]
        output = trainer.predict(split, metric_key_prefix=f"predict_{name}")
        labels = np.asarray(split["label"], dtype=np.int64)
        if output.label_ids is not None and not np.array_equal(np.asarray(output.label_ids).reshape(-1), labels):
            raise RuntimeError(f"the {name} predictions are not in the dataset's order (labels differ)")
        logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
        if trainer.is_world_process_zero():
            written.append(save_predictions(output_dir, name, split["study_id"], labels, logits))
    return written


def compute_metrics_function():
    """The evaluation module's `make_compute_metrics()` when present, else `compute_auroc_metrics` (same keys)."""
    try:
        from qdistill_hf.evaluation import make_compute_metrics
    except ImportError:
        from qdistill_hf.training import compute_auroc_metrics

        return compute_auroc_metrics
    return make_compute_metrics()


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    # 1. Parse the arguments: a single .yaml/.yml/.json config file (+ overrides), or flags.
    baseline_args, data_args, training_args = parse_arguments(
        (BaselineArguments, DataArguments),
        lambda: (training_arguments_class(),),
        argv,
        description=__doc__.split("\n\n")[0],
        training_epilog=training_epilog("run_baseline.py", BASELINE_EPILOG),
    )
    push_to_hub = disable_trainer_push(training_args)

    # 2. Logging, with the level of this process (`get_process_log_level`).
    setup_logging(training_args, logger)
    logger.info(f"Training/evaluation parameters {training_args}")

    from transformers import CLIPVisionModel, ResNetConfig, ResNetForImageClassification, Trainer, set_seed

    from qdistill_hf import QDistillImageProcessor

    set_seed(training_args.seed)

    # 3. Data: train / validation / test splits of the qdistill_hf CXR builder (main process first).
    splits = load_splits(data_args, training_args)
    label_names = splits["train"].features["label"].names
    id2label = dict(enumerate(label_names))
    label2id = {name: index for index, name in id2label.items()}
    logger.info(f"Splits: { {name: len(split) for name, split in splits.items()} }, labels {label_names}")

    # 4. The image processor: the project's one preprocessing (a saved one, the encoder folder's, or the default).
    processor_folder = baseline_args.image_processor_name_or_path
    encoder_folder = baseline_args.vision_model_name_or_path
    encoder_has_processor = encoder_folder is not None and (Path(encoder_folder) / "preprocessor_config.json").is_file()
    if processor_folder is None and encoder_has_processor:
        processor_folder = encoder_folder
    overrides = {}
    if baseline_args.image_size is not None:
        overrides["size"] = {"height": baseline_args.image_size, "width": baseline_args.image_size}
    if processor_folder is not None:
        image_processor = QDistillImageProcessor.from_pretrained(processor_folder, **overrides)
    else:
        image_processor = QDistillImageProcessor(**overrides)

    # 5. The model and its collator.
    if baseline_args.baseline == "resnet":
        if data_args.use_feature_cache or training_args.feature_cache_dir is not None:
            logger.warning("--baseline resnet learns from the films: the feature-cache options are ignored")
        config = ResNetConfig(
            num_channels=3, embedding_size=baseline_args.embedding_size, hidden_sizes=baseline_args.hidden_sizes,
            depths=baseline_args.depths, layer_type=baseline_args.layer_type, id2label=id2label, label2id=label2id,
        )
        model = ResNetForImageClassification(config)
        collator = FilmCollator(image_processor)
        finetuned_from = None  # trained from scratch
    else:
        # The frozen encoder runs once per film; the head trains on its cached tokens.
        if encoder_folder is not None:
            encoder = CLIPVisionModel.from_pretrained(encoder_folder)
            encoder_name = str(encoder_folder)
        else:
            from run_teacher import stand_in_encoder

            logger.warning("No --vision_model_name_or_path: the frozen encoder is a small random stand-in, not "
                           "CheXzero.")
            encoder = stand_in_encoder(baseline_args.stand_in_seed)
            encoder_name = f"random stand-in encoder (run_teacher.stand_in_encoder, seed {baseline_args.stand_in_seed})"
        encoder.eval().requires_grad_(False)
        # The films go in at the encoder's own size (--image_size is the ResNet's).
        encoder_size = encoder.config.image_size
        if (image_processor.size.height, image_processor.size.width) != (encoder_size, encoder_size):
            logger.warning(f"The encoder reads {encoder_size} px films: the image processor's size "
                           f"{image_processor.size.height}x{image_processor.size.width} is replaced by it "
                           "(--image_size applies to --baseline resnet)")
            image_processor.size = {"height": encoder_size, "width": encoder_size}
        splits = cache_features(splits, encoder, image_processor, training_args)
        probe_config_class, probe_class = _probe_classes()
        config = probe_config_class(
            input_size=encoder.config.hidden_size, head="linear" if baseline_args.baseline == "linear_probe" else "mlp",
            mlp_hidden_sizes=baseline_args.mlp_hidden_sizes, dropout=baseline_args.dropout,
            pooling=baseline_args.pooling, encoder=encoder_name, id2label=id2label, label2id=label2id,
        )
        del encoder
        model = probe_class(config)
        model.set_feature_statistics(*pooled_statistics(model, splits["train"]))
        collator = FeatureCollator()
        finetuned_from = encoder_name
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(f"Baseline {baseline_args.baseline}: {trainable:,} trainable parameters; loss: plain cross-entropy")

    # 6. The stock Trainer: evaluation every epoch, best checkpoint by validation AUROC (see --help for the defaults).
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=splits["train"],
        eval_dataset=splits.get("validation"),
        data_collator=collator,
        processing_class=image_processor,
        compute_metrics=compute_metrics_function(),
    )

    # 7. Train.
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    # 8. Validation and test predictions of the kept (best) model, for examples/evaluate_triage.py.
    for path in write_predictions(trainer, splits, training_args.output_dir):
        logger.info(f"Predictions written to {path}")

    # 9. Save, evaluate on validation and test, log and save metrics; push to the Hub or write a model card.
    kwargs = {"finetuned_from": finetuned_from, "tasks": "image-classification", "dataset": data_args.dataset_name,
              "tags": ["qdistill", "baseline", baseline_args.baseline]}
    return finish(trainer, image_processor, splits, training_args, push_to_hub, train_result, kwargs)


if __name__ == "__main__":
    raise SystemExit(main())
