"""Cache frozen CheXzero (CLIP ViT) image tokens to Arrow with `datasets`, so training never re-runs the encoder.

What is stored: the encoder's `last_hidden_state`, i.e. the raw tokens of the last transformer layer (CLS + patches,
`(num_tokens, hidden)`) **before** `post_layernorm`. That is the same tensor the Q-Former cross-attends to in the
teacher and the student, so cached and on-the-fly training see identical inputs (up to fp16 rounding).

Disk cost: one film is `num_tokens x hidden` fp16 values. For CheXzero ViT-B/32 at 224 px that is
50 x 768 x 2 bytes = 76,800 bytes (about 77 KB) per film; MIMIC-CXR's ~377k films need about 29 GB, on top of the
images. The cache lives beside the dataset's own Arrow files (`dataset.cache_files`), so it only works for
file-backed datasets (a `datasets` builder or `load_from_disk`); an in-memory dataset is computed but not cached.

Re-use: the cache file is named by a fingerprint of (dataset fingerprint, encoder weights and config, image processor
settings, output column and dtype). A second call with the same encoder and processor loads the Arrow file and runs
no encoder forward pass; changing any weight or preprocessing setting produces a new cache file.
"""

import hashlib
import json
import logging

import datasets
import torch
from accelerate import PartialState


logger = logging.getLogger(__name__)

_ARROW_DTYPES = {torch.float16: "float16", torch.float32: "float32"}
# Keys that describe how a processor was saved or wrapped, not how it transforms pixels.
_PROCESSOR_BOOKKEEPING_KEYS = ("processor_class", "_processor_class", "auto_map")


def _hash_tensor(hasher, name: str, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().to("cpu").contiguous()
    hasher.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
    if tensor.numel():
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy())


def feature_fingerprint(vision_model: torch.nn.Module, image_processor) -> str:
    """Fingerprint an encoder + image processor pair for the feature cache.

    The hash covers every tensor of the encoder's `state_dict` in full (name, shape, dtype and raw bytes, with
    BLAKE2b), the encoder config when it has one (so e.g. `hidden_act` changes count), and the image processor's
    settings (`to_dict()` minus bookkeeping keys such as `processor_class`). Hashing every byte is exact, and cheap
    next to one encoder pass over a dataset.

    Args:
        vision_model (`torch.nn.Module`): the frozen vision encoder (e.g. `CLIPVisionModel`).
        image_processor: the image processor (anything with `to_dict()`, e.g. `QDistillImageProcessor`).

    Returns:
        `str`: a 32-character hex digest.
    """
    hasher = hashlib.blake2b(digest_size=16)
    hasher.update(type(vision_model).__name__.encode())
    for name, tensor in vision_model.state_dict().items():
        _hash_tensor(hasher, name, tensor)
    config = getattr(vision_model, "config", None)
    if config is not None:
        config_dict = config.to_dict()
        config_dict.pop("transformers_version", None)
        hasher.update(json.dumps(config_dict, sort_keys=True, default=str).encode())
    processor_dict = dict(image_processor.to_dict())
    for key in _PROCESSOR_BOOKKEEPING_KEYS:
        processor_dict.pop(key, None)
    hasher.update(json.dumps(processor_dict, sort_keys=True, default=str).encode())
    return hasher.hexdigest()


def _num_tokens_and_hidden(vision_model: torch.nn.Module) -> tuple[int, int]:
    config = getattr(vision_model, "config", None)
    if config is None or not all(hasattr(config, key) for key in ("image_size", "patch_size", "hidden_size")):
        raise ValueError(
            f"{type(vision_model).__name__} has no CLIP-style config (image_size, patch_size, hidden_size); "
            "pass a transformers CLIPVisionModel."
        )
    num_patches = (config.image_size // config.patch_size) ** 2
    return num_patches + 1, config.hidden_size


def cache_image_features(
    dataset: datasets.Dataset,
    vision_model: torch.nn.Module,
    image_processor,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    fingerprint: str | None = None,
    feature_column: str = "image_features",
    image_column: str = "image",
    dtype: torch.dtype = torch.float16,
) -> datasets.Dataset:
    """Add the frozen encoder's `last_hidden_state` of every film as a column, cached to Arrow.

    The encoder runs in eval mode under `torch.inference_mode()` on `device`; its previous train/eval mode and device
    are restored afterwards. Every row and column is kept. Under `accelerate launch` the main process builds the cache first and the other
    processes then load it.

    Args:
        dataset (`datasets.Dataset`): file-backed dataset with an `Image()` column `image_column`.
        vision_model (`torch.nn.Module`): a `CLIPVisionModel`; its `last_hidden_state` (before `post_layernorm`)
            is stored.
        image_processor: callable returning `pixel_values` (e.g. `QDistillImageProcessor`).
        batch_size (`int`, *optional*, defaults to 32): films per encoder pass (also the `map` batch size).
        device (`str` or `torch.device`, *optional*): where to run the encoder. Defaults to this process's
            accelerate device (`PartialState().device`: the GPU when one is present, else the CPU).
        fingerprint (`str`, *optional*): use this instead of [`feature_fingerprint`] for the encoder + processor
            part of the cache key (e.g. `"chexzero-<ckpt-sha>-prep-v1"`); you must change it whenever the weights or
            preprocessing change.
        feature_column (`str`, *optional*, defaults to `"image_features"`): name of the new column.
        image_column (`str`, *optional*, defaults to `"image"`): column holding the films.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float16`): storage dtype, `float16` or `float32`.

    Returns:
        `datasets.Dataset` with the new column of type `Array2D((num_tokens, hidden), dtype)`.

    Raises:
        ValueError: on a missing image column, an existing feature column, an unsupported dtype or batch size, or a
            film the processor rejects (the message names the row).
    """
    if image_column not in dataset.column_names:
        raise ValueError(f"The dataset has no column {image_column!r} (columns: {dataset.column_names}).")
    if feature_column in dataset.column_names:
        raise ValueError(f"The dataset already has a column {feature_column!r}; choose another feature_column.")
    if dtype not in _ARROW_DTYPES:
        raise ValueError(f"dtype must be torch.float16 or torch.float32, got {dtype}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    if not dataset.cache_files:
        logger.warning("The dataset is in memory (no cache files): features are computed but not cached to disk.")

    num_tokens, hidden_size = _num_tokens_and_hidden(vision_model)
    state = PartialState()
    model_device = torch.device(device) if device is not None else state.device
    original_device = next(vision_model.parameters()).device
    model_dtype = next(vision_model.parameters()).dtype
    encoder_fingerprint = fingerprint or feature_fingerprint(vision_model, image_processor)
    key = "|".join(
        [dataset._fingerprint, encoder_fingerprint, feature_column, image_column, _ARROW_DTYPES[dtype], "v1"]
    )
    new_fingerprint = hashlib.blake2b(key.encode(), digest_size=16).hexdigest()

    features = dataset.features.copy()
    features[feature_column] = datasets.Array2D(shape=(num_tokens, hidden_size), dtype=_ARROW_DTYPES[dtype])

    def encode(batch, indices):
        try:
            pixel_values = image_processor(batch[image_column], return_tensors="pt")["pixel_values"]
        except (ValueError, TypeError, OSError) as error:
            raise ValueError(
                f"Could not process field {image_column!r} in rows {indices[0]}-{indices[-1]}: {error}"
            ) from error
        with torch.inference_mode():
            hidden = vision_model(pixel_values=pixel_values.to(model_device, model_dtype)).last_hidden_state
        if tuple(hidden.shape[1:]) != (num_tokens, hidden_size):
            raise ValueError(
                f"The encoder returned tokens of shape {tuple(hidden.shape[1:])} for rows {indices[0]}-{indices[-1]}, "
                f"expected {(num_tokens, hidden_size)}; check the image processor size against the encoder config."
            )
        return {feature_column: hidden.to(device="cpu", dtype=dtype).numpy()}

    was_training = vision_model.training
    vision_model.to(model_device).eval()
    try:
        with state.main_process_first():
            result = dataset.map(
                encode,
                batched=True,
                batch_size=batch_size,
                with_indices=True,
                features=features,
                new_fingerprint=new_fingerprint,
                desc="Caching frozen image features",
            )
    finally:
        vision_model.to(original_device).train(was_training)
    return result


def features_as_torch(dataset: datasets.Dataset, feature_column: str = "image_features") -> datasets.Dataset:
    """Return the dataset with the feature column as fp16 `torch.Tensor`s and every other column left as is.

    The plain `"torch"` format upcasts float16 Array2D columns to float32, and `with_format("torch",
    dtype=torch.float16)` would also turn integer labels into float16. Only the feature column is therefore
    formatted; the other columns come back as Python objects (ints, strings, images) for the collator to convert,
    so labels stay integers.

    Args:
        dataset (`datasets.Dataset`): output of [`cache_image_features`].
        feature_column (`str`, *optional*, defaults to `"image_features"`): the cached feature column.

    Returns:
        `datasets.Dataset` whose rows give `feature_column` as a `torch.float16` tensor `(num_tokens, hidden)`.
    """
    if feature_column not in dataset.column_names:
        raise ValueError(f"The dataset has no column {feature_column!r} (columns: {dataset.column_names}).")
    return dataset.with_format("torch", columns=[feature_column], dtype=torch.float16, output_all_columns=True)


__all__ = ["cache_image_features", "feature_fingerprint", "features_as_torch"]
