"""Convert a CheXzero checkpoint (OpenAI CLIP state dict) into a transformers ``CLIPVisionModel`` folder.

CheXzero (rajpurkarlab/CheXzero) saves ``torch.save(model.state_dict())`` of OpenAI's ``clip.model.CLIP``.
Only the ViT visual tower is converted; the text tower is ignored, because the Q-DISTILL Q-Formers
consume the vision tokens only.

Choice about ``visual.proj``: by default the output folder holds a plain ``CLIPVisionModel`` (keys
``embeddings.*``, ``pre_layrnorm.*``, ``encoder.layers.N.*``, ``post_layernorm.*``), which the teacher
and student load with ``CLIPVisionModel.from_pretrained`` without any unexpected-key report. The
Q-Former reads ``last_hidden_state``, so the 768→512 projection is unused there; its width is still
recorded as ``config.projection_dim``. Pass ``with_projection=True`` to save a
``CLIPVisionModelWithProjection`` instead (``visual_projection.weight = visual.proj.T``) for zero-shot
use with CheXzero text embeddings computed elsewhere.

Mapping (OpenAI → transformers v5 ``CLIPVisionModel``)::

    visual.conv1.weight              -> embeddings.patch_embedding.weight
    visual.class_embedding           -> embeddings.class_embedding
    visual.positional_embedding      -> embeddings.position_embedding.weight
    visual.ln_pre.* / visual.ln_post.* -> pre_layrnorm.* / post_layernorm.*
    visual.transformer.resblocks.i.attn.in_proj_{weight,bias} (chunk 3) -> encoder.layers.i.self_attn.{q,k,v}_proj.*
    ...attn.out_proj / ln_1 / ln_2 / mlp.c_fc / mlp.c_proj
        -> self_attn.out_proj / layer_norm1 / layer_norm2 / mlp.fc1 / mlp.fc2
    visual.proj (width x proj_dim)   -> visual_projection.weight = proj.T   (with_projection only)
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

from ..models.processing_qdistill import CHEXZERO_MEAN, CHEXZERO_STD, QDistillImageProcessor

logger = logging.getLogger(__name__)

# Suggested Hub id for a converted ViT-B/32 folder, used in docs only: nothing here downloads or uploads it.
CHEXZERO_HUB_ID = "qdistill-hf/chexzero-vit-b32"

# The one definition lives in models/processing_qdistill.py; these names are kept for existing imports.
CHEXZERO_PIXEL_MEAN = CHEXZERO_MEAN
CHEXZERO_PIXEL_STD = CHEXZERO_STD

# OpenAI CLIP derives the vision head count as width // 64.
OPENAI_HEAD_WIDTH = 64

_VISUAL_PREFIX = "visual."
_BLOCK_PREFIX = "transformer.resblocks."
_BLOCK_RE = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_RESNET_MARKERS = ("layer1.", "attnpool.", "conv2.", "conv3.", "bn1.")

# OpenAI resblock parameter -> transformers CLIPEncoderLayer parameter (in_proj handled separately).
_BLOCK_KEY_MAP = {
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_BLOCK_KEYS = frozenset(_BLOCK_KEY_MAP) | {"attn.in_proj_weight", "attn.in_proj_bias"}
_STEM_KEYS = (
    "conv1.weight",
    "class_embedding",
    "positional_embedding",
    "ln_pre.weight",
    "ln_pre.bias",
    "ln_post.weight",
    "ln_post.bias",
)


def _expect_shape(key: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"'{_VISUAL_PREFIX}{key}' has shape {tuple(tensor.shape)}, expected {shape}")


def extract_clip_state_dict(obj: object) -> dict[str, torch.Tensor]:
    """Return the flat CLIP state dict from what ``torch.load`` produced.

    Args:
        obj: a state dict, or a dict wrapping one under ``"state_dict"`` or ``"model_state_dict"``.
            A ``module.`` prefix (DataParallel) on every key is removed.

    Returns:
        A new ``{key: tensor}`` dict.

    Raises:
        ValueError: when ``obj`` is not a mapping of tensors.
    """
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a state dict (a mapping of tensors), got {type(obj).__name__}")
    for wrapper in ("state_dict", "model_state_dict"):
        if wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
            break
    state_dict = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(
                f"entry {key!r} is a {type(value).__name__}, not a tensor: expected a CLIP state dict "
                "(optionally wrapped under 'state_dict' or 'model_state_dict')"
            )
        state_dict[key] = value
    if state_dict and all(key.startswith("module.") for key in state_dict):
        state_dict = {key[len("module.") :]: value for key, value in state_dict.items()}
    return state_dict


def convert_openai_visual_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    num_attention_heads: int | None = None,
    with_projection: bool = False,
) -> tuple[CLIPVisionConfig, dict[str, torch.Tensor]]:
    """Infer a ``CLIPVisionConfig`` from an OpenAI-format CLIP state dict and map its ViT visual tower.

    Args:
        state_dict: the full OpenAI CLIP state dict (``visual.*`` keys are converted; the text tower and
            ``logit_scale`` are ignored).
        num_attention_heads: head count; defaults to ``width // 64`` as OpenAI's ``build_model`` does.
        with_projection: return keys for ``CLIPVisionModelWithProjection`` (``vision_model.`` prefix plus
            ``visual_projection.weight``); requires ``visual.proj``. Otherwise keys for ``CLIPVisionModel``.

    Returns:
        ``(config, hf_state_dict)``, with every tensor cast to float32 and contiguous.

    Raises:
        ValueError: no ``visual.*`` keys, a ResNet visual tower, missing or unknown keys, missing
            transformer blocks, or inconsistent shapes.
    """
    visual = {key[len(_VISUAL_PREFIX) :]: value for key, value in state_dict.items() if key.startswith(_VISUAL_PREFIX)}
    if not visual:
        sample = ", ".join(sorted(state_dict)[:5]) or "<empty>"
        raise ValueError(
            f"no '{_VISUAL_PREFIX}*' keys found (first keys: {sample}); expected an OpenAI-format CLIP state dict "
            "such as CheXzero's"
        )
    if any(key.startswith(_RESNET_MARKERS) for key in visual):
        raise ValueError(
            "the visual tower is a ResNet (found 'visual.layer1'/'visual.attnpool' keys): "
            "only ViT CheXzero/CLIP checkpoints are supported"
        )
    non_finite = []
    for key, value in sorted(visual.items()):
        if value.is_floating_point() or value.is_complex():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                non_finite.append(f"'{_VISUAL_PREFIX}{key}' ({bad} of {value.numel()} values)")
    if non_finite:
        raise ValueError(
            f"non-finite (NaN or inf) weights in {', '.join(non_finite)}: the checkpoint is corrupt or was saved "
            "from a diverged run; a converted encoder would output NaN"
        )
    missing_stem = [f"{_VISUAL_PREFIX}{key}" for key in _STEM_KEYS if key not in visual]
    if missing_stem:
        raise ValueError(f"missing ViT keys: {', '.join(missing_stem)}")

    blocks: dict[int, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in visual.items():
        match = _BLOCK_RE.match(key)
        if match:
            blocks.setdefault(int(match.group(1)), {})[match.group(2)] = value
        elif key not in _STEM_KEYS and key != "proj":
            unknown.append(f"{_VISUAL_PREFIX}{key}")
    if unknown:
        raise ValueError(f"unknown visual keys (not part of an OpenAI CLIP ViT): {', '.join(sorted(unknown))}")
    if not blocks:
        raise ValueError(f"no transformer blocks found ('{_VISUAL_PREFIX}{_BLOCK_PREFIX}N.*')")
    num_layers = max(blocks) + 1
    missing_blocks = [index for index in range(num_layers) if index not in blocks]
    if missing_blocks:
        raise ValueError(
            f"missing transformer blocks {missing_blocks} of {num_layers} "
            f"('{_VISUAL_PREFIX}{_BLOCK_PREFIX}N.*' is not contiguous from 0)"
        )
    for index in range(num_layers):
        absent = sorted(_BLOCK_KEYS - set(blocks[index]))
        extra = sorted(set(blocks[index]) - _BLOCK_KEYS)
        if absent or extra:
            prefix = f"{_VISUAL_PREFIX}{_BLOCK_PREFIX}{index}."
            problems = [f"missing {', '.join(prefix + k for k in absent)}"] if absent else []
            problems += [f"unknown {', '.join(prefix + k for k in extra)}"] if extra else []
            raise ValueError(f"transformer block {index}: {'; '.join(problems)}")

    conv = visual["conv1.weight"]
    if conv.ndim != 4 or conv.shape[1] != 3 or conv.shape[2] != conv.shape[3]:
        raise ValueError(
            f"'{_VISUAL_PREFIX}conv1.weight' has shape {tuple(conv.shape)}, expected (width, 3, patch, patch)"
        )
    width, patch_size = int(conv.shape[0]), int(conv.shape[2])
    heads = width // OPENAI_HEAD_WIDTH if num_attention_heads is None else num_attention_heads
    if heads < 1 or width % heads != 0:
        raise ValueError(f"width {width} cannot be split into {heads} attention heads; pass num_attention_heads")

    positional = visual["positional_embedding"]
    if positional.ndim != 2 or positional.shape[1] != width:
        raise ValueError(
            f"'{_VISUAL_PREFIX}positional_embedding' has shape {tuple(positional.shape)}, expected (tokens, {width})"
        )
    num_patches = positional.shape[0] - 1
    grid = math.isqrt(num_patches)
    if num_patches < 1 or grid * grid != num_patches:
        raise ValueError(
            f"'{_VISUAL_PREFIX}positional_embedding' has {positional.shape[0]} tokens: expected 1 + a square grid"
        )
    for key in ("class_embedding", "ln_pre.weight", "ln_pre.bias", "ln_post.weight", "ln_post.bias"):
        _expect_shape(key, visual[key], (width,))

    intermediate = int(blocks[0]["mlp.c_fc.weight"].shape[0])
    for index in range(num_layers):
        block = blocks[index]
        expected = {
            "attn.in_proj_weight": (3 * width, width),
            "attn.in_proj_bias": (3 * width,),
            "attn.out_proj.weight": (width, width),
            "attn.out_proj.bias": (width,),
            "ln_1.weight": (width,),
            "ln_1.bias": (width,),
            "ln_2.weight": (width,),
            "ln_2.bias": (width,),
            "mlp.c_fc.weight": (intermediate, width),
            "mlp.c_fc.bias": (intermediate,),
            "mlp.c_proj.weight": (width, intermediate),
            "mlp.c_proj.bias": (width,),
        }
        for key, shape in expected.items():
            _expect_shape(f"{_BLOCK_PREFIX}{index}.{key}", block[key], shape)

    config_kwargs = {}
    projection = visual.get("proj")
    if projection is not None:
        if projection.ndim != 2 or projection.shape[0] != width:
            raise ValueError(
                f"'{_VISUAL_PREFIX}proj' has shape {tuple(projection.shape)}, expected ({width}, projection_dim)"
            )
        config_kwargs["projection_dim"] = int(projection.shape[1])
    elif with_projection:
        raise ValueError(f"with_projection=True needs '{_VISUAL_PREFIX}proj', which the checkpoint lacks")

    config = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=intermediate,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_channels=3,
        image_size=grid * patch_size,
        patch_size=patch_size,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        **config_kwargs,
    )

    converted = {
        "embeddings.patch_embedding.weight": conv,
        "embeddings.class_embedding": visual["class_embedding"],
        "embeddings.position_embedding.weight": positional,
        "pre_layrnorm.weight": visual["ln_pre.weight"],
        "pre_layrnorm.bias": visual["ln_pre.bias"],
        "post_layernorm.weight": visual["ln_post.weight"],
        "post_layernorm.bias": visual["ln_post.bias"],
    }
    for index in range(num_layers):
        block, prefix = blocks[index], f"encoder.layers.{index}."
        for name, weight, bias in zip(
            ("q_proj", "k_proj", "v_proj"),
            block["attn.in_proj_weight"].chunk(3, dim=0),
            block["attn.in_proj_bias"].chunk(3, dim=0),
        ):
            converted[f"{prefix}self_attn.{name}.weight"] = weight
            converted[f"{prefix}self_attn.{name}.bias"] = bias
        for source, target in _BLOCK_KEY_MAP.items():
            converted[prefix + target] = block[source]
    # OpenAI's build_model stores fp16; the HF model (and the Q-Former above it) runs in fp32.
    converted = {key: value.detach().float().contiguous() for key, value in converted.items()}
    if with_projection:
        converted = {f"vision_model.{key}": value for key, value in converted.items()}
        converted["visual_projection.weight"] = projection.detach().float().t().contiguous()
    return config, converted


def chexzero_image_processor(image_size: int = 224) -> QDistillImageProcessor:
    """The image processor saved with every converted folder: ``QDistillImageProcessor.chexzero_preset()``.

    CheXzero feeds raw 0-255 grayscale repeated to 3 channels, normalised with mean 101.48761 and std 83.43944
    (no rescale to [0, 1]); the preset keeps the aspect ratio and zero-pads to a square (CheXzero pads too), so
    non-square films reach the ViT at ``image_size`` x ``image_size``. The constants are defined once, in
    :mod:`qdistill_hf.models.processing_qdistill`.

    Args:
        image_size: the ViT input side (``config.image_size``).

    Returns:
        ``QDistillImageProcessor.chexzero_preset(size={"height": image_size, "width": image_size})``.
    """
    return QDistillImageProcessor.chexzero_preset(size={"height": image_size, "width": image_size})


def load_openai_checkpoint(checkpoint_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load an OpenAI-format CLIP state dict from disk (``weights_only=True``).

    Args:
        checkpoint_path: a ``.pt`` file written by ``torch.save(model.state_dict())`` (or a dict wrapping it).

    Returns:
        The flat state dict.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a loadable tensor state dict (the message names the file).
    """
    path = Path(checkpoint_path)
    if path.is_dir():
        raise IsADirectoryError(f"CheXzero checkpoint {path} is a directory; expected the .pt file (e.g. chexzero_best.pt)")
    if not path.is_file():
        raise FileNotFoundError(f"CheXzero checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        # OpenAI's own released .pt files are TorchScript archives, which weights_only refuses.
        raise ValueError(
            f"{path}: cannot be read as a tensor state dict with torch.load(weights_only=True) ({error}). "
            "If it is a TorchScript archive, re-save it with torch.save(torch.jit.load(path).state_dict(), new_path)."
        ) from error
    try:
        return extract_clip_state_dict(obj)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error


def convert_chexzero_checkpoint(
    checkpoint_path: str | os.PathLike,
    output_dir: str | os.PathLike | None,
    image_processor: QDistillImageProcessor | None = None,
    num_attention_heads: int | None = None,
    with_projection: bool = False,
) -> CLIPVisionModel | CLIPVisionModelWithProjection:
    """Convert a CheXzero (OpenAI CLIP) checkpoint into a transformers vision model and save it.

    Args:
        checkpoint_path: the CheXzero ``.pt`` state dict (e.g. ``checkpt/chexzero_best.pt``).
        output_dir: folder that receives ``save_pretrained`` (``config.json`` + ``model.safetensors``) and
            ``preprocessor_config.json``; ``None`` converts without writing anything.
        image_processor: the processor to save; defaults to ``chexzero_image_processor(config.image_size)`` (the
            ``chexzero_preset()``). It must be a ``QDistillImageProcessor`` resizing to ``config.image_size``, since
            the retrieval embedder loads the folder's processor with that class.
        num_attention_heads: override of OpenAI's ``width // 64`` head count.
        with_projection: save a ``CLIPVisionModelWithProjection`` (keeps ``visual.proj``) instead of a
            ``CLIPVisionModel``.

    Returns:
        The converted model in eval mode, float32, on CPU.

    Raises:
        FileNotFoundError: the checkpoint does not exist.
        ValueError: the checkpoint is not a convertible OpenAI CLIP ViT, or holds NaN/inf weights (the message names
            the file and the tensors), or ``image_processor`` does not fit the model.
    """
    path = Path(checkpoint_path)
    state_dict = load_openai_checkpoint(path)
    try:
        config, converted = convert_openai_visual_state_dict(
            state_dict, num_attention_heads=num_attention_heads, with_projection=with_projection
        )
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error
    ignored = sum(1 for key in state_dict if not key.startswith(_VISUAL_PREFIX))
    logger.info("%s: ignoring %d non-visual keys (text tower, logit_scale)", path, ignored)
    if "visual.proj" in state_dict and not with_projection:
        logger.info("%s: 'visual.proj' not saved (with_projection=True keeps it)", path)

    model_class = CLIPVisionModelWithProjection if with_projection else CLIPVisionModel
    model = model_class(config)
    result = model.load_state_dict(converted, strict=False)
    missing = [key for key in result.missing_keys if not key.endswith("embeddings.position_ids")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path}: converted weights do not match {model_class.__name__}: "
            f"missing {sorted(missing)}, unexpected {sorted(result.unexpected_keys)}"
        )
    model.eval()

    if output_dir is not None:
        output_dir = Path(output_dir)
        if output_dir.exists() and not output_dir.is_dir():
            raise NotADirectoryError(f"output_dir {output_dir} exists and is a file, not a folder")
        processor = image_processor if image_processor is not None else chexzero_image_processor(config.image_size)
        if not isinstance(processor, QDistillImageProcessor):
            raise ValueError(f"image_processor must be a QDistillImageProcessor, got {type(processor).__name__}")
        if (processor.size["height"], processor.size["width"]) != (config.image_size, config.image_size):
            raise ValueError(
                f"image_processor resizes to {processor.size['height']}x{processor.size['width']}, but the converted "
                f"model expects {config.image_size}x{config.image_size}"
            )
        model.save_pretrained(output_dir)
        processor.save_pretrained(output_dir)
        logger.info("saved %s (%d parameters) to %s", model_class.__name__, model.num_parameters(), output_dir)
    return model


__all__ = [
    "CHEXZERO_HUB_ID",
    "CHEXZERO_PIXEL_MEAN",
    "CHEXZERO_PIXEL_STD",
    "chexzero_image_processor",
    "convert_chexzero_checkpoint",
    "convert_openai_visual_state_dict",
    "extract_clip_state_dict",
    "load_openai_checkpoint",
]
