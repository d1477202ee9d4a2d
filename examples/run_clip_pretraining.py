#!/usr/bin/env python
"""Pretrain a CLIP encoder on films and their reports (CheXzero's recipe) with the stock Trainer, for when CheXzero's
weights are absent; its vision tower then plugs into the teacher and the students.

CheXzero is OpenAI's CLIP (ViT-B/32 image tower, 12-layer text transformer) trained contrastively on MIMIC-CXR films
and the impression sections of their reports. This script trains the same kind of model, a transformers `CLIPModel`
with `return_loss=True`, on the *training split* of a qdistill_hf CXR dataset:

- text tower: the project's report tokenizer (`train_report_tokenizer`, WordPiece; `[CLS] ... [SEP]`, the pooled
  text vector is the `[SEP]` token's, `eos_token_id=3`), trained on the training reports (plus `--extra_reports`), or
  a saved `QDistillProcessor` (`--processor_name_or_path`, e.g. from data_scripts/build_tokenizer.py); the CLIP text
  config's vocabulary is the tokenizer's;
- image tower: a `CLIPVisionConfig` with CheXzero's shape by default (224 px, patch 32, width 768, 12 layers, 12
  heads, QuickGELU, eps 1e-5), smaller through the `--vision_*` options for a CPU; the films go through the
  project's one preprocessing, `QDistillImageProcessor` (at `--image_size`).

Reports that are identical (the same token ids) within a batch are false negatives for CLIP's loss: two films with
"Normal chest." are pushed apart from each other's report. `--duplicate_reports positives` (default) makes every
film's target the uniform distribution over all the batch reports with its token ids (and every report's target the
films that carry it); with no duplicates this is exactly `CLIPModel`'s own loss (tested). `ignore` keeps
`CLIPModel`'s loss as it is. Either way the loss of a model that has learnt nothing is `log(batch size)`, logged as
chance. `logit_scale` is bounded at log(100) after every step, as OpenAI's CLIP training does.

`--extra_reports FILE.jsonl` (one JSON object per line with a `report` field, e.g.
../shared/data/cxr-paired/iu_reports_dev.jsonl) adds report text *without films*: CLIP's loss needs a film for every
report, so these texts only enlarge the tokenizer's vocabulary; every extra report whose text is a validation or test
report of the dataset is removed first (the count is logged).

Quick CPU run on the synthetic films (a few minutes; see examples/README.md for measured figures):

    HF_HUB_OFFLINE=1 python examples/run_clip_pretraining.py examples/configs/clip_pretraining_cpu_synthetic.yaml

then the teacher on the pretrained vision tower:

    HF_HUB_OFFLINE=1 python examples/run_teacher.py examples/configs/teacher_cpu_synthetic.yaml \
        --vision_model_name_or_path outputs/clip_cpu_synthetic/vision_model

`output_dir` receives the `CLIPModel` (`config.json`, `model.safetensors`), its `QDistillProcessor`, the metrics files
(`retrieval_results.json`: validation image->report recall@k over distinct reports, the loss against chance) and
`vision_model/`: a `CLIPVisionModel` folder (config + safetensors + the image processor) for
`run_teacher.py --vision_model_name_or_path`, `run_baseline.py --vision_model_name_or_path` and
`demo.py --vision_model` (students take the teacher's encoder).
"""

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from example_utils import (
    DataArguments,
    disable_trainer_push,
    finish,
    load_splits,
    parse_arguments,
    setup_logging,
)


logger = logging.getLogger(__name__)

# This script's training defaults: the checkpoint is chosen by the validation contrastive loss (there are no triage
# logits); the collator reads the raw `image` and `report` columns.
CLIP_TRAINING_DEFAULTS = {
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "load_best_model_at_end": True,
    "metric_for_best_model": "loss",
    "save_total_limit": 2,
    "remove_unused_columns": False,
    "prediction_loss_only": True,
    "report_to": "none",
}
# OpenAI CLIP (and so CheXzero) bounds the learnt temperature: logit_scale <= log(100).
MAX_LOGIT_SCALE = math.log(100.0)
CLIP_EPILOG = (
    "training options: every transformers.TrainingArguments option is accepted. The ones that matter most:\n"
    "  --output_dir DIR   --num_train_epochs N   --per_device_train_batch_size N (the contrastive batch)\n"
    "  --learning_rate LR   --weight_decay WD   --lr_scheduler_type cosine   --warmup_steps N   --seed N\n"
    "  --eval_strategy epoch, --save_strategy epoch, --load_best_model_at_end true, --metric_for_best_model loss\n"
    "                     (this script's defaults: the checkpoint with the lowest validation contrastive loss)\n"
    "  --push_to_hub true --hub_model_id USER/NAME   upload output_dir at the end (fails offline, files kept)\n"
    "Run `python examples/run_clip_pretraining.py --help_all` for all of them (imports torch: a few seconds).\n"
    "A single config file works too: `python examples/run_clip_pretraining.py examples/configs/FILE.yaml "
    "[--option value ...]`."
)


@dataclass
class ClipModelArguments:
    """The report tokenizer, the two towers' sizes and the contrastive-loss settings."""

    _argument_group_name = "model options"

    processor_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Folder of a saved QDistillProcessor (data_scripts/build_tokenizer.py). Default: train the "
                          "report tokenizer here on the train reports (+ --extra_reports)."},
    )
    extra_reports: str | None = field(
        default=None,
        metadata={"help": "JSON-lines file of extra reports (field --extra_reports_field) for the tokenizer's "
                          "vocabulary; its validation/test reports of the dataset are removed."},
    )
    extra_reports_field: str = field(default="report", metadata={"help": "Text field of --extra_reports."})
    vocab_size: int = field(default=8000, metadata={"help": "Tokenizer trained here: target vocabulary size."})
    tokenizer_min_frequency: int = field(default=2, metadata={"help": "Tokenizer trained here: minimum count."})
    model_max_length: int = field(
        default=77, metadata={"help": "Tokenizer trained here: longest report in tokens (CLIP's context, 77)."}
    )
    image_size: int = field(default=224, metadata={"help": "Films are letterboxed to this size (CheXzero: 224)."})
    patch_size: int = field(default=32, metadata={"help": "Vision patch size (CheXzero: 32)."})
    vision_hidden_size: int = field(default=768, metadata={"help": "Vision width (CheXzero: 768)."})
    vision_intermediate_size: int = field(default=3072, metadata={"help": "Vision MLP width (CheXzero: 3072)."})
    vision_num_hidden_layers: int = field(default=12, metadata={"help": "Vision layers (CheXzero: 12)."})
    vision_num_attention_heads: int = field(default=12, metadata={"help": "Vision heads (CheXzero: 12)."})
    text_hidden_size: int = field(default=512, metadata={"help": "Text width (CheXzero: 512)."})
    text_intermediate_size: int = field(default=2048, metadata={"help": "Text MLP width (CheXzero: 2048)."})
    text_num_hidden_layers: int = field(default=12, metadata={"help": "Text layers (CheXzero: 12)."})
    text_num_attention_heads: int = field(default=8, metadata={"help": "Text heads (CheXzero: 8)."})
    projection_dim: int = field(default=512, metadata={"help": "Shared embedding size (CheXzero: 512)."})
    logit_scale_init_value: float = field(
        default=math.log(1 / 0.07), metadata={"help": "Initial log inverse temperature (CLIP: log(1/0.07))."}
    )
    duplicate_reports: Literal["positives", "ignore"] = field(
        default="positives",
        metadata={"help": "positives: identical reports in a batch are all positives of each other's films (no "
                          "false negatives); ignore: CLIPModel's own loss (identical reports count as negatives)."},
    )
    retrieval_k: int = field(default=5, metadata={"help": "Validation image->report recall@k, over distinct reports."})
    init_seed: int | None = field(default=None, metadata={"help": "Seed of the initial weights (default: --seed)."})

    def __post_init__(self):
        for name in ("vocab_size", "tokenizer_min_frequency", "model_max_length", "image_size", "patch_size",
                     "vision_hidden_size", "vision_intermediate_size", "vision_num_hidden_layers",
                     "vision_num_attention_heads", "text_hidden_size", "text_intermediate_size",
                     "text_num_hidden_layers", "text_num_attention_heads", "projection_dim", "retrieval_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"--image_size {self.image_size} is not a multiple of --patch_size {self.patch_size}")
        for width, heads in (("vision_hidden_size", "vision_num_attention_heads"),
                             ("text_hidden_size", "text_num_attention_heads")):
            if getattr(self, width) % getattr(self, heads):
                raise ValueError(f"--{width} {getattr(self, width)} is not divisible by --{heads} "
                                 f"{getattr(self, heads)}")
        if self.processor_name_or_path is not None and not Path(self.processor_name_or_path).is_dir():
            raise ValueError(f"--processor_name_or_path {self.processor_name_or_path}: no such folder")
        if self.processor_name_or_path is not None and self.extra_reports is not None:
            raise ValueError("--extra_reports only feeds a tokenizer trained here; --processor_name_or_path brings "
                             "its own (give one of them)")


# ------------------------------------------------------------------------------------------------ loss and batches


def report_groups(input_ids, attention_mask):
    """`(batch,)` long tensor: for every row, the index of the first row of the batch with the same token ids.

    Two reports are the same for the text tower when their (truncated) token ids are equal, whatever their spelling
    differences the tokenizer removes (case, accents, spacing).
    """
    import torch

    first = {}
    groups = []
    for row, (ids, mask) in enumerate(zip(input_ids.tolist(), attention_mask.tolist())):
        key = tuple(token for token, keep in zip(ids, mask) if keep)
        groups.append(first.setdefault(key, row))
    return torch.tensor(groups, dtype=torch.long)


def contrastive_loss_with_duplicates(logits_per_image, groups):
    """CLIP's symmetric cross-entropy where every row sharing a report group is a positive.

    The target of film `i` is uniform over the reports `j` with `groups[j] == groups[i]` (and the same for every
    report over films); with all groups distinct this is `CLIPModel`'s loss, `(CE(logits_per_text, arange) +
    CE(logits_per_image, arange)) / 2`. A model that has learnt nothing (equal logits) scores `log(batch)`.

    Args:
        logits_per_image (`torch.Tensor`): `(batch, batch)` scaled image-report similarities.
        groups (`torch.Tensor`): `(batch,)` report group of every row ([`report_groups`]).
    """
    import torch

    same = (groups[:, None] == groups[None, :]).to(logits_per_image.dtype)
    targets = same / same.sum(dim=1, keepdim=True)
    image_loss = -(targets * torch.log_softmax(logits_per_image, dim=1)).sum(dim=1).mean()
    text_loss = -(targets * torch.log_softmax(logits_per_image.t(), dim=1)).sum(dim=1).mean()
    return (image_loss + text_loss) / 2


def duplicate_aware_loss(outputs, labels, num_items_in_batch=None):
    """`Trainer(compute_loss_func=...)`: [`contrastive_loss_with_duplicates`] with the batch's groups as `labels`.

    Under gradient accumulation the Trainer hands over the rows of the whole accumulated batch (`num_items_in_batch`)
    and does not rescale the loss itself, so the batch mean is weighted by its share of those rows.
    """
    loss = contrastive_loss_with_duplicates(outputs.logits_per_image, labels)
    if num_items_in_batch is not None:
        loss = loss * labels.numel() / num_items_in_batch
    return loss


class ClipCollator:
    """Rows with `image` and `report` -> `pixel_values`, `input_ids`, `attention_mask`, `return_loss=True`, and the
    report groups as `labels` when duplicates are positives."""

    def __init__(self, processor, duplicate_reports: str = "positives"):
        self.processor = processor
        self.duplicate_reports = duplicate_reports

    def __call__(self, rows):
        reports = []
        for row in rows:
            report = row["report"]
            if not isinstance(report, str) or not report.strip():
                raise ValueError(f"study {row.get('study_id')!r} has no report text ({report!r}); CLIP pretraining "
                                 "needs a report for every film")
            reports.append(report)
        batch = dict(self.processor(images=[row["image"] for row in rows], text=reports, return_tensors="pt"))
        batch["return_loss"] = True
        if self.duplicate_reports == "positives":
            batch["labels"] = report_groups(batch["input_ids"], batch["attention_mask"])
        return batch


def _clamp_logit_scale_callback():
    from accelerate.utils import extract_model_from_parallel
    from transformers import TrainerCallback

    class ClampClipLogitScale(TrainerCallback):
        """After every optimizer step, `logit_scale <= log(100)` (OpenAI CLIP's bound on the temperature)."""

        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            if model is not None:
                import torch

                with torch.no_grad():
                    extract_model_from_parallel(model).logit_scale.clamp_(max=MAX_LOGIT_SCALE)

    return ClampClipLogitScale()


# ------------------------------------------------------------------------------------------------ data and tokenizer


def _normalise(text: str) -> str:
    return " ".join(text.split())


def extra_report_texts(path: str, field_name: str, splits) -> list[str]:
    """The reports of `path` minus every one whose text is a validation or test report of `splits` (logged)."""
    from qdistill_hf.models.tokenization_qdistill import read_reports_jsonl

    reports = read_reports_jsonl(path, field=field_name)
    held_out = {_normalise(text) for name, split in splits.items() if name != "train" for text in split["report"]}
    kept = [text for text in reports if _normalise(text) not in held_out]
    logger.info(f"--extra_reports {path}: {len(reports)} reports, {len(reports) - len(kept)} removed because they are "
                f"validation/test reports of the dataset; {len(kept)} added to the tokenizer's corpus (no films: "
                "they do not enter the contrastive loss)")
    return kept


def build_processor(model_args, splits):
    """A saved `QDistillProcessor`, or the report tokenizer trained on the train reports (+ extra reports)."""
    from qdistill_hf import QDistillImageProcessor, QDistillProcessor
    from qdistill_hf.models.tokenization_qdistill import train_report_tokenizer

    size = {"height": model_args.image_size, "width": model_args.image_size}
    if model_args.processor_name_or_path is not None:
        processor = QDistillProcessor.from_pretrained(model_args.processor_name_or_path)
        actual = processor.image_processor.size
        if (actual.height, actual.width) != (model_args.image_size, model_args.image_size):
            raise ValueError(f"{model_args.processor_name_or_path}: the image processor's size is "
                             f"{actual.height}x{actual.width}, but --image_size is {model_args.image_size}")
        return processor
    corpus = list(splits["train"]["report"])
    source = f"the train split ({len(corpus)} reports)"
    if model_args.extra_reports is not None:
        extra = extra_report_texts(model_args.extra_reports, model_args.extra_reports_field, splits)
        corpus += extra
        source += f" + {len(extra)} reports of {model_args.extra_reports}"
    tokenizer = train_report_tokenizer(corpus, vocab_size=model_args.vocab_size,
                                       min_frequency=model_args.tokenizer_min_frequency,
                                       model_max_length=model_args.model_max_length, source=source)
    return QDistillProcessor(image_processor=QDistillImageProcessor(size=size), tokenizer=tokenizer)


def clip_config(model_args, tokenizer):
    """`CLIPConfig`: the vision tower CheXzero-shaped (sizes from the arguments), the text tower on `tokenizer`."""
    from transformers import CLIPConfig

    vision_config = {
        "hidden_size": model_args.vision_hidden_size, "intermediate_size": model_args.vision_intermediate_size,
        "num_hidden_layers": model_args.vision_num_hidden_layers,
        "num_attention_heads": model_args.vision_num_attention_heads, "image_size": model_args.image_size,
        "patch_size": model_args.patch_size, "num_channels": 3, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
        "projection_dim": model_args.projection_dim,
    }
    text_config = {
        "vocab_size": len(tokenizer), "hidden_size": model_args.text_hidden_size,
        "intermediate_size": model_args.text_intermediate_size,
        "num_hidden_layers": model_args.text_num_hidden_layers,
        "num_attention_heads": model_args.text_num_attention_heads,
        "max_position_embeddings": tokenizer.model_max_length, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
        "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.cls_token_id,
        # The pooled text vector is the first [SEP]'s (an eos id other than 2 selects by id, not by argmax).
        "eos_token_id": tokenizer.sep_token_id, "projection_dim": model_args.projection_dim,
    }
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=model_args.projection_dim,
                      logit_scale_init_value=model_args.logit_scale_init_value)


# ------------------------------------------------------------------------------------------------ evaluation


def chance_loss(num_rows: int, batch_size: int) -> float:
    """The contrastive loss of a model that has learnt nothing, `log(b)` per batch, averaged over rows as the Trainer
    averages its evaluation loss (the last batch may be smaller)."""
    full, rest = divmod(num_rows, batch_size)
    total = full * batch_size * math.log(batch_size) + (rest * math.log(rest) if rest else 0.0)
    return total / num_rows


def retrieval_recall(model, split, collator, k: int = 5, batch_size: int = 64) -> dict:
    """Image->report recall@k over the split's distinct report texts (token ids), with its chance `k / distinct`.

    Every film ranks every distinct report by the CLIP similarity; a hit is its own report among the top k.
    """
    import torch

    images, keys, texts = [], [], {}
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, len(split), batch_size):
            rows = [split[i] for i in range(start, min(start + batch_size, len(split)))]
            batch = ClipCollator(collator.processor, "ignore")(rows)
            image_embeds = model.get_image_features(pixel_values=batch["pixel_values"].to(device))
            images.append(torch.nn.functional.normalize(_as_tensor(image_embeds), dim=-1))
            text_embeds = _as_tensor(model.get_text_features(input_ids=batch["input_ids"].to(device),
                                                             attention_mask=batch["attention_mask"].to(device)))
            for ids, mask, embed in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(), text_embeds):
                key = tuple(t for t, m in zip(ids, mask) if m)
                keys.append(key)
                texts.setdefault(key, torch.nn.functional.normalize(embed, dim=-1))
    distinct = list(texts)
    index = {key: i for i, key in enumerate(distinct)}
    similarity = torch.cat(images) @ torch.stack([texts[key] for key in distinct]).t()
    own = torch.tensor([index[key] for key in keys], device=similarity.device)
    top = min(k, len(distinct))
    recall = float((similarity.topk(top, dim=1).indices == own[:, None]).any(dim=1).float().mean())
    return {f"recall_at_{k}": recall, f"recall_at_{k}_chance": top / len(distinct), "distinct_reports": len(distinct)}


def _as_tensor(output):
    """`get_*_features` returns a tensor, or a model output whose pooled projection is `pooler_output`."""
    return output if hasattr(output, "norm") else output.pooler_output


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    # 1. Parse the arguments: a single .yaml/.yml/.json config file (+ overrides), or flags.
    def training_types():
        from transformers import TrainingArguments

        return (TrainingArguments,)

    model_args, data_args, training_args = parse_arguments(
        (ClipModelArguments, DataArguments), training_types, argv, description=__doc__.split("\n\n")[0],
        training_epilog=CLIP_EPILOG, training_defaults=CLIP_TRAINING_DEFAULTS,
    )
    if data_args.use_feature_cache:
        raise ValueError("--use_feature_cache does not apply: CLIP pretraining trains the vision tower on the films")
    push_to_hub = disable_trainer_push(training_args)

    # 2. Logging, with the level of this process (`get_process_log_level`).
    setup_logging(training_args, logger)
    logger.info(f"Training/evaluation parameters {training_args}")

    import torch
    from transformers import CLIPModel, Trainer, set_seed

    # 3. Data: the films and reports of the train split (validation for the checkpoint choice and recall).
    splits = load_splits(data_args, training_args)
    logger.info(f"Splits: { {name: len(split) for name, split in splits.items()} }")

    # 4. The report tokenizer and the image processor.
    processor = build_processor(model_args, splits)
    tokenizer = processor.tokenizer

    # 5. The CLIP model, from scratch.
    set_seed(training_args.seed if model_args.init_seed is None else model_args.init_seed)
    model = CLIPModel(clip_config(model_args, tokenizer))
    vision_parameters = sum(p.numel() for p in model.vision_model.parameters())
    logger.info(f"CLIPModel: {sum(p.numel() for p in model.parameters()):,} parameters ({vision_parameters:,} in the "
                f"vision tower), text vocabulary {len(tokenizer)}, torch {torch.__version__}")
    set_seed(training_args.seed)

    # 6. The stock Trainer; duplicate reports within a batch are positives unless --duplicate_reports ignore.
    collator = ClipCollator(processor, model_args.duplicate_reports)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=splits["train"],
        eval_dataset=splits.get("validation"),
        data_collator=collator,
        processing_class=processor,
        compute_loss_func=duplicate_aware_loss if model_args.duplicate_reports == "positives" else None,
        callbacks=[_clamp_logit_scale_callback()],
    )

    # 7. Train.
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    # 8. The loss against chance, and the validation image->report recall of the kept (best) model.
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    summary = {"train_batch_chance_loss": math.log(training_args.per_device_train_batch_size)}
    if losses:
        summary.update(first_logged_train_loss=losses[0], last_logged_train_loss=losses[-1])
        logger.info(f"Contrastive training loss {losses[0]:.4f} (first log) -> {losses[-1]:.4f} (last log); chance "
                    f"log({training_args.per_device_train_batch_size}) = {summary['train_batch_chance_loss']:.4f}")
    if "validation" in splits:
        validation = splits["validation"]
        eval_loss = trainer.evaluate(validation)["eval_loss"]
        summary.update(eval_loss=eval_loss,
                       eval_chance_loss=chance_loss(len(validation), training_args.per_device_eval_batch_size))
        summary.update(retrieval_recall(trainer.model, validation, collator, k=model_args.retrieval_k,
                                        batch_size=training_args.per_device_eval_batch_size))
        logger.info(f"Validation contrastive loss {eval_loss:.4f} (chance {summary['eval_chance_loss']:.4f}); "
                    f"image->report recall@{model_args.retrieval_k} over {summary['distinct_reports']} distinct "
                    f"reports {summary[f'recall_at_{model_args.retrieval_k}']:.3f} (chance "
                    f"{summary[f'recall_at_{model_args.retrieval_k}_chance']:.3f})")
    trainer.save_metrics("retrieval", summary, combined=False)

    # 9. The vision tower as a CLIPVisionModel folder, with the image processor, for the teacher and students.
    if trainer.is_world_process_zero():
        vision_folder = Path(training_args.output_dir) / "vision_model"
        trainer.model.vision_model.save_pretrained(vision_folder)
        processor.image_processor.save_pretrained(vision_folder)
        logger.info(f"Vision tower saved to {vision_folder}: pass --vision_model_name_or_path {vision_folder} to "
                    "run_teacher.py (or run_baseline.py; demo.py --vision_model)")

    # 10. Save, evaluate on validation and test, log and save metrics; push to the Hub or write a model card.
    kwargs = {"tasks": "zero-shot-image-classification", "dataset": data_args.dataset_name,
              "tags": ["qdistill", "clip", "chexzero-recipe"]}
    return finish(trainer, processor, splits, training_args, push_to_hub, train_result, kwargs)


if __name__ == "__main__":
    raise SystemExit(main())
