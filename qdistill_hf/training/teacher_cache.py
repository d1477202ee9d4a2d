"""
Teacher targets for distillation: computed live from a frozen teacher, or once per dataset and cached to Arrow.

A target is what the student imitates for one film:

- `teacher_pooled` (`(teacher_hidden_size,)`): the mean over queries of the teacher's bidirectional queries (target
  `"bi"`: film + human report) or unimodal queries (target `"uni"`: film alone);
- `teacher_logits` (`(num_labels,)`): the teacher's triage logits on those pooled queries (`"bi"`: the teacher's own
  classifier output; `"uni"`: the same classifier applied to the unimodal pooled queries);
- `teacher_attention` (`(image_tokens,)`, optional): the teacher's query-to-image cross-attention averaged over
  cross-attention layers, heads and queries, see [`cross_attention_map`].

The cache stores `teacher_pooled` in fp16 by default (a value beyond fp16's range is not clamped: it raises, naming
the studies, and `pooled_dtype=torch.float32` stores the targets exactly), `teacher_logits` and `teacher_attention` in
float32, plus `teacher_target` ("bi"/"uni") so a trainer can refuse targets of the wrong kind. fp16 rounding moves the
distillation loss by about 1e-4 relative (tested against the live teacher).
Its file name is a fingerprint of (dataset fingerprint, every teacher weight and its config, the tokenizer's
vocabulary and settings, the image processor's settings, the target kind, the stored columns and dtypes), so a second
call with the same inputs loads the Arrow file and runs no teacher forward pass.
"""

import hashlib
import json
import logging
from pathlib import Path

import datasets
import torch
from accelerate import PartialState

from .collator import QDistillDataCollator


logger = logging.getLogger(__name__)

_ARROW_DTYPES = {torch.float16: "float16", torch.float32: "float32"}
_CONFIG_BOOKKEEPING_KEYS = (
    "transformers_version", "_name_or_path", "architectures", "auto_map", "dtype", "torch_dtype",
)


def cross_attention_map(cross_attentions: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """
    One distribution over image tokens per film: the queries' cross-attention probabilities averaged over
    cross-attention layers, heads and queries.

    Each attention row is a softmax over the image tokens, so the average of rows is again a distribution (sums to 1).

    Args:
        cross_attentions (`tuple(torch.Tensor)`): per cross-attention layer, `(batch, heads, queries, image_tokens)`.

    Returns:
        `torch.Tensor` of shape `(batch, image_tokens)` in float32.
    """
    if not cross_attentions:
        raise ValueError("No cross-attention maps: run the model with output_attentions=True.")
    return torch.stack([layer.float().mean(dim=(1, 2)) for layer in cross_attentions]).mean(dim=0)


def attention_alignment_loss(student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """
    Mean squared error between two `(batch, image_tokens)` attention distributions, each first multiplied by the
    number of image tokens `T`: `mean_{b,t} (T * s[b, t] - T * t[b, t]) ** 2`.

    The factor `T` puts the maps on a scale where uniform attention is 1 everywhere, so the loss (and a sensible
    weight for it) does not shrink with the image resolution; without it a 50-token map differs from another by
    about 1e-4 per token and the loss would be ~1e-7.
    """
    if student_map.shape != teacher_map.shape:
        raise ValueError(
            f"Student and teacher attention maps differ in shape: {tuple(student_map.shape)} vs "
            f"{tuple(teacher_map.shape)}; the two models must share the vision encoder geometry."
        )
    tokens = student_map.shape[-1]
    return (tokens * (student_map.float() - teacher_map.float())).pow(2).mean()


@torch.no_grad()
def compute_teacher_targets(
    teacher,
    batch: dict,
    target: str = "bi",
    with_attention: bool = False,
) -> dict[str, torch.Tensor]:
    """
    Run the frozen teacher on a collated batch and return `{"pooled", "logits"[, "attention"]}` (see the module doc).

    Args:
        teacher ([`QDistillTeacherModel`]): the teacher, in eval mode (the caller's responsibility).
        batch (`dict`): a [`QDistillDataCollator`] batch with `image_features` or `pixel_values`, and for target
            `"bi"` the report as `teacher_input_ids`/`teacher_attention_mask`.
        target (`str`): `"bi"` or `"uni"`.
        with_attention (`bool`): also return the averaged cross-attention map.
    """
    images = {key: batch[key] for key in ("image_features", "pixel_values") if batch.get(key) is not None}
    if target == "bi":
        if batch.get("teacher_input_ids") is None:
            raise ValueError(
                "distill_target='bi' needs the teacher's report in the batch (`teacher_input_ids`); give the collator "
                "`teacher_text_column` (QDistillDataCollator.for_distillation does when distill_target='bi')."
            )
        output = teacher(
            **images,
            input_ids=batch["teacher_input_ids"],
            attention_mask=batch.get("teacher_attention_mask"),
            output_attentions=with_attention or None,
        )
        pooled = output.query_output_bidirectional.mean(dim=1)
        logits = output.logits
        cross = output.cross_attentions
    elif target == "uni":
        image_features = teacher.get_image_features(images.get("pixel_values"), images.get("image_features"))
        queries = teacher.query_tokens.expand(image_features.shape[0], -1, -1)
        output = teacher.qformer(
            query_embeds=queries, encoder_hidden_states=image_features, output_attentions=with_attention or None
        )
        pooled = output.query_output.mean(dim=1)
        logits = teacher.classifier(teacher.classifier_dropout(pooled))
        cross = output.cross_attentions
    else:
        raise ValueError(f"target must be 'bi' or 'uni', got {target!r}.")
    result = {"pooled": pooled.float(), "logits": logits.float()}
    if with_attention:
        result["attention"] = cross_attention_map(cross)
    return result


def _hash_tensor(hasher, name: str, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().to("cpu").contiguous()
    hasher.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
    if tensor.numel():
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy())


def _settings(obj) -> str:
    if obj is None:
        return "none"
    parts = [type(obj).__name__]
    backend = getattr(obj, "backend_tokenizer", None)
    if backend is not None:
        # The backend's `truncation`/`padding` entries are the state left by the last call (a fresh tokenizer and a
        # used one differ), not settings: leave them out.
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
        parts.append(json.dumps(state, sort_keys=True))
        parts.append(json.dumps({"model_max_length": getattr(obj, "model_max_length", None),
                                 "padding_side": getattr(obj, "padding_side", None),
                                 "truncation_side": getattr(obj, "truncation_side", None)}, sort_keys=True))
    elif hasattr(obj, "to_dict"):
        settings = dict(obj.to_dict())
        for key in ("processor_class", "_processor_class", "auto_map"):
            settings.pop(key, None)
        parts.append(json.dumps(settings, sort_keys=True, default=str))
    else:
        parts.append(repr(obj))
    return "|".join(parts)


def teacher_fingerprint(teacher, collator: QDistillDataCollator) -> str:
    """
    Fingerprint of a teacher + collator pair: every tensor of the teacher's `state_dict` in full (BLAKE2b over name,
    shape, dtype, bytes), its config (minus the bookkeeping keys `save_pretrained` adds, such as `architectures`, so
    saving the teacher on one process does not change its fingerprint there), and the tokenizer/image-processor
    settings and columns of the collator.
    """
    hasher = hashlib.blake2b(digest_size=16)
    hasher.update(type(teacher).__name__.encode())
    for name, tensor in teacher.state_dict().items():
        _hash_tensor(hasher, name, tensor)
    config = teacher.config.to_dict()
    # Bookkeeping that `save_pretrained` adds on the saving process only (the weights' dtype is hashed above).
    for key in _CONFIG_BOOKKEEPING_KEYS:
        config.pop(key, None)
    hasher.update(json.dumps(config, sort_keys=True, default=str).encode())
    hasher.update(_settings(collator.tokenizer).encode())
    hasher.update(_settings(collator.image_processor).encode())
    hasher.update(
        json.dumps([collator.teacher_text_column, collator.feature_column, collator.image_column,
                    collator.image_source, collator.max_length]).encode()
    )
    return hasher.hexdigest()


def cache_teacher_targets(
    dataset: datasets.Dataset,
    teacher,
    collator_or_tokenizer,
    target: str = "bi",
    batch_size: int = 32,
    with_attention: bool = False,
    pooled_dtype: torch.dtype = torch.float16,
    cache_dir: str | None = None,
    device: str | torch.device | None = None,
    teacher_text_column: str = "report",
    fingerprint: str | None = None,
) -> datasets.Dataset:
    """
    Add the frozen teacher's distillation targets of every row as columns, cached to Arrow.

    Adds `teacher_pooled`, `teacher_logits`, `teacher_target` and, with `with_attention`, `teacher_attention` (see the
    module doc). The teacher runs in eval mode without gradients on `device`; its mode and device are restored. Under
    `accelerate launch` the main process computes the cache first and the others load it.

    Args:
        dataset (`datasets.Dataset`): rows with the film (`image_features`, `pixel_values` or `image`) and, for
            `"bi"`, the human report.
        teacher ([`QDistillTeacherModel`]): the trained teacher.
        collator_or_tokenizer: a [`QDistillDataCollator`] (its `teacher_text_column` and image settings are used),
            or a tokenizer / `QDistillProcessor` from which one is built with `teacher_text_column`.
        target (`str`, *optional*, defaults to `"bi"`): `"bi"` or `"uni"`; must match the trainer's `distill_target`.
        batch_size (`int`, *optional*, defaults to 32): rows per teacher pass.
        with_attention (`bool`, *optional*): also store the averaged cross-attention map (attention alignment).
        pooled_dtype (`torch.dtype`, *optional*, defaults to `torch.float16`): storage dtype of `teacher_pooled`.
        cache_dir (`str`, *optional*): folder for the Arrow file; defaults to beside the dataset's own cache files.
            An in-memory dataset without `cache_dir` is computed but not cached.
        device (`str` or `torch.device`, *optional*): defaults to this process's accelerate device.
        teacher_text_column (`str`, *optional*, defaults to `"report"`): used when building a collator.
        fingerprint (`str`, *optional*): use instead of [`teacher_fingerprint`] (you must change it with the teacher).

    Returns:
        `datasets.Dataset` with the new columns.
    """
    if target not in ("bi", "uni"):
        raise ValueError(f"target must be 'bi' or 'uni', got {target!r}.")
    if pooled_dtype not in _ARROW_DTYPES:
        raise ValueError(f"pooled_dtype must be torch.float16 or torch.float32, got {pooled_dtype}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    existing = [c for c in ("teacher_pooled", "teacher_logits", "teacher_attention", "teacher_target")
                if c in dataset.column_names]
    if existing:
        raise ValueError(f"The dataset already has teacher-target columns {existing}; remove them first.")
    if isinstance(collator_or_tokenizer, QDistillDataCollator):
        base = collator_or_tokenizer
        collator = QDistillDataCollator(
            base.tokenizer, image_processor=base.image_processor, text_column=None,
            teacher_text_column=(base.teacher_text_column or teacher_text_column) if target == "bi" else None,
            label_column=None, feature_column=base.feature_column, image_column=base.image_column,
            study_id_column=base.study_id_column, max_length=base.max_length, image_source=base.image_source,
        )
    else:
        collator = QDistillDataCollator(
            collator_or_tokenizer, text_column=None, label_column=None,
            teacher_text_column=teacher_text_column if target == "bi" else None,
        )

    state = PartialState()
    run_device = torch.device(device) if device is not None else state.device
    hidden = teacher.config.qformer_config.hidden_size
    num_labels = teacher.config.num_labels
    key_fingerprint = fingerprint or teacher_fingerprint(teacher, collator)
    key = "|".join([dataset._fingerprint, key_fingerprint, target, str(with_attention), _ARROW_DTYPES[pooled_dtype],
                    "teacher-targets-v1"])
    new_fingerprint = hashlib.blake2b(key.encode(), digest_size=16).hexdigest()

    features = dataset.features.copy()
    features["teacher_pooled"] = datasets.List(datasets.Value(_ARROW_DTYPES[pooled_dtype]), length=hidden)
    features["teacher_logits"] = datasets.List(datasets.Value("float32"), length=num_labels)
    if with_attention:
        vision = teacher.config.vision_config
        tokens = (vision.image_size // vision.patch_size) ** 2 + 1
        features["teacher_attention"] = datasets.List(datasets.Value("float32"), length=tokens)
    features["teacher_target"] = datasets.Value("string")

    def compute(batch, indices):
        names = list(batch.keys())
        rows = [{name: batch[name][i] for name in names} for i in range(len(indices))]
        inputs = collator(rows)
        study_ids = inputs.pop("study_ids")
        inputs = {k: v.to(run_device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        targets = compute_teacher_targets(teacher, inputs, target, with_attention)
        pooled = targets["pooled"].to(pooled_dtype)
        overflow = (~torch.isfinite(pooled)).any(dim=1)
        if bool(overflow.any()):
            bad = [study_ids[i] for i in overflow.nonzero().flatten().tolist()]
            raise ValueError(
                f"Teacher pooled queries of studies {bad} (rows {indices[0]}-{indices[-1]}) are not finite in "
                f"{pooled_dtype}; use pooled_dtype=torch.float32 (or check the teacher)."
            )
        for name in ("logits", "attention"):
            if name in targets and not bool(torch.isfinite(targets[name]).all()):
                raise ValueError(f"Non-finite teacher {name} for studies {study_ids}.")
        out = {
            "teacher_pooled": pooled.cpu().numpy(),
            "teacher_logits": targets["logits"].cpu().numpy(),
            "teacher_target": [target] * len(indices),
        }
        if with_attention:
            out["teacher_attention"] = targets["attention"].cpu().numpy()
        return out

    cache_file_name = None
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        cache_file_name = str(Path(cache_dir) / f"teacher-targets-{new_fingerprint}.arrow")
    elif not dataset.cache_files:
        logger.warning("The dataset is in memory and no cache_dir was given: teacher targets are not cached to disk.")

    was_training = teacher.training
    original_device = next(teacher.parameters()).device
    teacher.to(run_device).eval()
    try:
        with state.main_process_first():
            result = dataset.map(
                compute,
                batched=True,
                batch_size=batch_size,
                with_indices=True,
                features=features,
                new_fingerprint=new_fingerprint,
                cache_file_name=cache_file_name,
                desc="Caching teacher targets",
            )
    finally:
        teacher.to(original_device).train(was_training)
    return result


__all__ = [
    "attention_alignment_loss",
    "cache_teacher_targets",
    "compute_teacher_targets",
    "cross_attention_map",
    "teacher_fingerprint",
]
