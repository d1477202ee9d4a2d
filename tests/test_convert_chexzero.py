"""CheXzero (OpenAI CLIP format) -> transformers CLIPVisionModel conversion, checked against an independent
pure-torch forward in the OpenAI layout."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

from qdistill_hf.convert.convert_chexzero_to_hf import (
    CHEXZERO_PIXEL_MEAN,
    CHEXZERO_PIXEL_STD,
    convert_chexzero_checkpoint,
    convert_openai_visual_state_dict,
)
from qdistill_hf.models.processing_qdistill import QDistillImageProcessor
from tiny_models import processor_settings

REPO_ROOT = Path(__file__).resolve().parents[1]

WIDTH, LAYERS, PATCH, IMAGE, PROJ, TEXT_WIDTH = 128, 2, 8, 32, 32, 16
HEADS = WIDTH // 64  # OpenAI's rule; 2 heads
GRID = IMAGE // PATCH
TOL = 1e-5


def _openai_clip_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny random OpenAI-format CLIP ViT state dict, with a few text-tower keys that must be ignored."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.05, offset=0.0):
        return torch.randn(*shape, generator=gen) * scale + offset

    sd = {
        "visual.class_embedding": rand(WIDTH, scale=0.5),
        "visual.positional_embedding": rand(GRID * GRID + 1, WIDTH, scale=0.3),
        "visual.proj": rand(WIDTH, PROJ, scale=0.1),
        "visual.conv1.weight": rand(WIDTH, 3, PATCH, PATCH, scale=0.05),
        "visual.ln_pre.weight": rand(WIDTH, scale=0.1, offset=1.0),
        "visual.ln_pre.bias": rand(WIDTH, scale=0.1),
        "visual.ln_post.weight": rand(WIDTH, scale=0.1, offset=1.0),
        "visual.ln_post.bias": rand(WIDTH, scale=0.1),
        # Text tower and CLIP-level keys: present in CheXzero checkpoints, ignored by the conversion.
        "positional_embedding": rand(77, TEXT_WIDTH),
        "text_projection": rand(TEXT_WIDTH, PROJ),
        "logit_scale": torch.tensor(4.6052),
        "token_embedding.weight": rand(100, TEXT_WIDTH),
        "transformer.resblocks.0.attn.in_proj_weight": rand(3 * TEXT_WIDTH, TEXT_WIDTH),
        "ln_final.weight": rand(TEXT_WIDTH, offset=1.0),
    }
    for i in range(LAYERS):
        p = f"visual.transformer.resblocks.{i}."
        sd[p + "attn.in_proj_weight"] = rand(3 * WIDTH, WIDTH, scale=0.09)
        sd[p + "attn.in_proj_bias"] = rand(3 * WIDTH, scale=0.05)
        sd[p + "attn.out_proj.weight"] = rand(WIDTH, WIDTH, scale=0.09)
        sd[p + "attn.out_proj.bias"] = rand(WIDTH, scale=0.05)
        sd[p + "ln_1.weight"] = rand(WIDTH, scale=0.1, offset=1.0)
        sd[p + "ln_1.bias"] = rand(WIDTH, scale=0.1)
        sd[p + "ln_2.weight"] = rand(WIDTH, scale=0.1, offset=1.0)
        sd[p + "ln_2.bias"] = rand(WIDTH, scale=0.1)
        sd[p + "mlp.c_fc.weight"] = rand(4 * WIDTH, WIDTH, scale=0.09)
        sd[p + "mlp.c_fc.bias"] = rand(4 * WIDTH, scale=0.05)
        sd[p + "mlp.c_proj.weight"] = rand(WIDTH, 4 * WIDTH, scale=0.045)
        sd[p + "mlp.c_proj.bias"] = rand(WIDTH, scale=0.05)
    return sd


def _openai_reference(sd: dict[str, torch.Tensor], pixel_values: torch.Tensor):
    """OpenAI VisionTransformer.forward written independently of transformers.

    Returns (all tokens before ln_post, ln_post(CLS), ln_post(CLS) @ proj).
    """
    sd = {k: v.float() for k, v in sd.items()}
    v = lambda name: sd["visual." + name]  # noqa: E731
    x = F.conv2d(pixel_values, v("conv1.weight"), stride=PATCH)  # (B, W, g, g)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (B, g*g, W)
    cls = v("class_embedding") + torch.zeros(x.shape[0], 1, x.shape[-1])
    x = torch.cat([cls, x], dim=1) + v("positional_embedding")
    x = F.layer_norm(x, (WIDTH,), v("ln_pre.weight"), v("ln_pre.bias"), eps=1e-5)
    x = x.permute(1, 0, 2)  # (L, B, W): nn.MultiheadAttention's sequence-first layout
    for i in range(LAYERS):
        b = lambda name: v(f"transformer.resblocks.{i}.{name}")  # noqa: E731
        h = F.layer_norm(x, (WIDTH,), b("ln_1.weight"), b("ln_1.bias"), eps=1e-5)
        attn, _ = F.multi_head_attention_forward(
            h, h, h, WIDTH, HEADS,
            b("attn.in_proj_weight"), b("attn.in_proj_bias"),
            None, None, False, 0.0,
            b("attn.out_proj.weight"), b("attn.out_proj.bias"),
            training=False, need_weights=False,
        )
        x = x + attn
        h = F.layer_norm(x, (WIDTH,), b("ln_2.weight"), b("ln_2.bias"), eps=1e-5)
        h = F.linear(h, b("mlp.c_fc.weight"), b("mlp.c_fc.bias"))
        h = h * torch.sigmoid(1.702 * h)  # QuickGELU
        x = x + F.linear(h, b("mlp.c_proj.weight"), b("mlp.c_proj.bias"))
    tokens = x.permute(1, 0, 2)
    pooled = F.layer_norm(tokens[:, 0], (WIDTH,), v("ln_post.weight"), v("ln_post.bias"), eps=1e-5)
    return tokens, pooled, pooled @ v("proj")


@pytest.fixture
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    path = tmp_path / "chexzero_tiny.pt"
    torch.save(_openai_clip_state_dict(), path)
    return path


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_pure_conversion_infers_config_and_maps_only_visual_keys():
    config, converted = convert_openai_visual_state_dict(_openai_clip_state_dict())
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (WIDTH, 4 * WIDTH, LAYERS)
    assert (config.num_attention_heads, config.patch_size, config.image_size) == (HEADS, PATCH, IMAGE)
    assert (config.projection_dim, config.hidden_act, config.layer_norm_eps) == (PROJ, "quick_gelu", 1e-5)
    assert set(converted) == set(CLIPVisionModel(config).state_dict()) - {"embeddings.position_ids"}
    sd = _openai_clip_state_dict()
    q, k, vv = sd["visual.transformer.resblocks.1.attn.in_proj_weight"].chunk(3)
    assert torch.equal(converted["encoder.layers.1.self_attn.k_proj.weight"], k)
    v_bias = sd["visual.transformer.resblocks.1.attn.in_proj_bias"][2 * WIDTH :]
    assert torch.equal(converted["encoder.layers.1.self_attn.v_proj.bias"], v_bias)
    c_proj = sd["visual.transformer.resblocks.0.mlp.c_proj.weight"]
    assert torch.equal(converted["encoder.layers.0.mlp.fc2.weight"], c_proj)
    # The head-count override replaces OpenAI's width // 64.
    assert convert_openai_visual_state_dict(sd, num_attention_heads=4)[0].num_attention_heads == 4


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_matches_openai_reference_forward(checkpoint, pixels, attn_implementation):
    model = convert_chexzero_checkpoint(checkpoint, None)
    assert type(model) is CLIPVisionModel and not model.training
    model.set_attn_implementation(attn_implementation)
    tokens, pooled, _ = _openai_reference(_openai_clip_state_dict(), pixels)
    with torch.no_grad():
        out = model(pixel_values=pixels)
    assert out.last_hidden_state.shape == (2, GRID * GRID + 1, WIDTH)
    assert _max_diff(out.last_hidden_state, tokens) <= TOL
    assert _max_diff(out.pooler_output, pooled) <= TOL
    # Sanity check that the tolerance is meaningful: ln_post changes the tokens by far more than it.
    assert _max_diff(out.pooler_output, tokens[:, 0]) > 0.1
    visual_params = sum(
        v.numel() for k, v in _openai_clip_state_dict().items() if k.startswith("visual.") and k != "visual.proj"
    )
    assert model.num_parameters() == visual_params


def test_fp16_checkpoint_is_cast_to_fp32(tmp_path, pixels):
    sd16 = {k: v.half() for k, v in _openai_clip_state_dict().items()}
    path = tmp_path / "fp16.pt"
    torch.save(sd16, path)
    model = convert_chexzero_checkpoint(path, None)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert torch.equal(model.embeddings.patch_embedding.weight, sd16["visual.conv1.weight"].float())
    tokens, pooled, _ = _openai_reference(sd16, pixels)
    with torch.no_grad():
        out = model(pixel_values=pixels)
    assert _max_diff(out.last_hidden_state, tokens) <= TOL
    assert _max_diff(out.pooler_output, pooled) <= TOL


def test_saved_folder_reloads_with_identical_outputs_and_chexzero_processor(checkpoint, tmp_path, pixels):
    out_dir = tmp_path / "chexzero-tiny"
    model = convert_chexzero_checkpoint(checkpoint, out_dir)
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in out_dir.iterdir()}
    reloaded, info = CLIPVisionModel.from_pretrained(out_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert reloaded.config.hidden_act == "quick_gelu" and reloaded.config.image_size == IMAGE
    with torch.no_grad():
        a, b = model(pixel_values=pixels), reloaded.eval()(pixel_values=pixels)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)
    assert torch.equal(a.pooler_output, b.pooler_output)

    # The folder holds exactly QDistillImageProcessor.chexzero_preset() at the model's size (one definition).
    processor = QDistillImageProcessor.from_pretrained(out_dir)
    preset = QDistillImageProcessor.chexzero_preset(size={"height": IMAGE, "width": IMAGE})
    assert type(processor) is QDistillImageProcessor and processor_settings(processor) == processor_settings(preset)
    assert processor.do_rescale is False and processor.resize_mode == "pad"
    assert list(processor.image_mean) == [CHEXZERO_PIXEL_MEAN] * 3
    assert list(processor.image_std) == [CHEXZERO_PIXEL_STD] * 3
    assert int(processor.resample) == Image.Resampling.BICUBIC
    # A constant gray film stays constant under bicubic resizing, so the value is exact on the 0-255 scale.
    gray = Image.fromarray(np.full((64, 64), 200, dtype=np.uint8), mode="L")
    values = processor(images=gray, return_tensors="pt")["pixel_values"]
    assert values.shape == (1, 3, IMAGE, IMAGE)
    expected = (200 - CHEXZERO_PIXEL_MEAN) / CHEXZERO_PIXEL_STD
    assert torch.allclose(values, torch.full_like(values, expected), atol=1e-5)
    # A non-square film is letterboxed to the model's square input (zero-padding = black before normalising).
    wide = processor(images=Image.new("L", (80, 64), 200), return_tensors="pt")["pixel_values"]
    assert wide.shape == (1, 3, IMAGE, IMAGE)
    assert torch.allclose(wide[0, :, 0, 0], torch.full((3,), -CHEXZERO_PIXEL_MEAN / CHEXZERO_PIXEL_STD))


def test_caller_supplied_image_processor_is_saved(checkpoint, tmp_path):
    custom = QDistillImageProcessor(size={"height": IMAGE, "width": IMAGE}, image_mean=[0.5] * 3)
    convert_chexzero_checkpoint(checkpoint, tmp_path / "out", image_processor=custom)
    assert list(QDistillImageProcessor.from_pretrained(tmp_path / "out").image_mean) == [0.5] * 3
    with pytest.raises(ValueError, match=r"image_processor resizes to 224x224, but the converted model expects 32x32"):
        convert_chexzero_checkpoint(checkpoint, tmp_path / "bad", image_processor=QDistillImageProcessor())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, bad):
    sd = _openai_clip_state_dict()
    sd["visual.transformer.resblocks.1.mlp.c_fc.weight"][3, 5] = bad
    path = tmp_path / "nan.pt"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"nan\.pt: non-finite \(NaN or inf\) weights in "
                                         r"'visual\.transformer\.resblocks\.1\.mlp\.c_fc\.weight' \(1 of 65536 values\)"):
        convert_chexzero_checkpoint(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_with_projection_keeps_visual_proj(checkpoint, tmp_path, pixels):
    model = convert_chexzero_checkpoint(checkpoint, tmp_path / "wp", with_projection=True)
    assert type(model) is CLIPVisionModelWithProjection
    _, pooled, embeds = _openai_reference(_openai_clip_state_dict(), pixels)
    with torch.no_grad():
        out = model(pixel_values=pixels)
    assert out.image_embeds.shape == (2, PROJ)
    assert _max_diff(out.image_embeds, embeds) <= TOL
    reloaded = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "wp").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=pixels).image_embeds, out.image_embeds)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"state_dict": sd},
        lambda sd: {"model_state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3},
        lambda sd: {"module." + k: v for k, v in sd.items()},
    ],
    ids=["state_dict", "model_state_dict+module", "module"],
)
def test_wrapped_and_dataparallel_checkpoints(tmp_path, pixels, wrap):
    path = tmp_path / "wrapped.pt"
    torch.save(wrap(_openai_clip_state_dict()), path)
    model = convert_chexzero_checkpoint(path, None)
    tokens, _, _ = _openai_reference(_openai_clip_state_dict(), pixels)
    with torch.no_grad():
        assert _max_diff(model(pixel_values=pixels).last_hidden_state, tokens) <= TOL


def _text_only(sd):
    return {k: v for k, v in sd.items() if not k.startswith("visual.")}


def _resnet(sd):
    sd = _text_only(sd)
    sd["visual.conv1.weight"] = torch.zeros(32, 3, 3, 3)
    sd["visual.layer1.0.conv1.weight"] = torch.zeros(64, 32, 1, 1)
    sd["visual.attnpool.positional_embedding"] = torch.zeros(50, 256)
    return sd


def _bad_in_proj(sd):
    sd["visual.transformer.resblocks.1.attn.in_proj_weight"] = torch.zeros(2 * WIDTH, WIDTH)
    return sd


def _drop_block(sd):
    return {k: v for k, v in sd.items() if not k.startswith("visual.transformer.resblocks.0.")}


def _drop_block_key(sd):
    del sd["visual.transformer.resblocks.1.mlp.c_fc.bias"]
    return sd


def _bad_positional(sd):
    sd["visual.positional_embedding"] = torch.zeros(GRID * GRID + 2, WIDTH)
    return sd


def _no_ln_post(sd):
    del sd["visual.ln_post.weight"]
    return sd


def _unknown_visual_key(sd):
    sd["visual.conv1.bias"] = torch.zeros(WIDTH)
    return sd


def _bad_intermediate(sd):
    sd["visual.transformer.resblocks.1.mlp.c_proj.weight"] = torch.zeros(WIDTH, 3 * WIDTH)
    return sd


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (_text_only, r"no 'visual\.\*' keys found"),
        (_resnet, r"only ViT CheXzero/CLIP checkpoints are supported"),
        (
            _bad_in_proj,
            r"'visual\.transformer\.resblocks\.1\.attn\.in_proj_weight' has shape \(256, 128\), expected \(384, 128\)",
        ),
        (_drop_block, r"missing transformer blocks \[0\] of 2"),
        (_drop_block_key, r"transformer block 1: missing visual\.transformer\.resblocks\.1\.mlp\.c_fc\.bias"),
        (_bad_positional, r"'visual\.positional_embedding' has 18 tokens: expected 1 \+ a square grid"),
        (_no_ln_post, r"missing ViT keys: visual\.ln_post\.weight"),
        (_unknown_visual_key, r"unknown visual keys .*visual\.conv1\.bias"),
        (
            _bad_intermediate,
            r"'visual\.transformer\.resblocks\.1\.mlp\.c_proj\.weight' has shape \(128, 384\), expected \(128, 512\)",
        ),
    ],
    ids=lambda x: getattr(x, "__name__", None),
)
def test_bad_checkpoints_raise_naming_file_and_problem(tmp_path, corrupt, message):
    path = tmp_path / "bad.pt"
    torch.save(corrupt(_openai_clip_state_dict()), path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + message):
        convert_chexzero_checkpoint(path, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_head_count_must_divide_width(checkpoint):
    with pytest.raises(ValueError, match=r"width 128 cannot be split into 3 attention heads"):
        convert_chexzero_checkpoint(checkpoint, None, num_attention_heads=3)


def test_unreadable_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"CheXzero checkpoint not found: .*absent\.pt"):
        convert_chexzero_checkpoint(tmp_path / "absent.pt", None)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=re.escape(str(garbage)) + r": cannot be read as a tensor state dict"):
        convert_chexzero_checkpoint(garbage, None)
    not_a_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], not_a_dict)
    with pytest.raises(ValueError, match=re.escape(str(not_a_dict)) + r": expected a state dict .*got list"):
        convert_chexzero_checkpoint(not_a_dict, None)


def test_cli_end_to_end(checkpoint, tmp_path, pixels):
    out_dir = tmp_path / "cli-out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "data_scripts" / "convert_chexzero.py"),
         "--checkpoint", str(checkpoint), "--output_dir", str(out_dir)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    model = CLIPVisionModel.from_pretrained(out_dir).eval()
    assert f"parameters: {model.num_parameters():,}" in result.stdout
    assert f"wrote {out_dir / 'model.safetensors'}" in result.stdout
    tokens, _, _ = _openai_reference(_openai_clip_state_dict(), pixels)
    with torch.no_grad():
        assert _max_diff(model(pixel_values=pixels).last_hidden_state, tokens) <= TOL
