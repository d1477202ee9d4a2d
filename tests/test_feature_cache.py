"""Tests for the frozen-feature cache (qdistill_hf/feature_cache.py)."""

import copy

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModel

from qdistill_hf.data.feature_cache import cache_image_features, feature_fingerprint, features_as_torch
from qdistill_hf.models.processing_qdistill import QDistillImageProcessor


NUM_TOKENS, HIDDEN = 17, 32  # (32 / 8)**2 patches + CLS


class ForwardCounter:
    def __init__(self, model):
        self.calls = 0
        model.register_forward_hook(self._hook)

    def _hook(self, *args):
        self.calls += 1


@pytest.fixture
def vision_model():
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=HIDDEN,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    return CLIPVisionModel(config).eval()


@pytest.fixture
def image_processor():
    return QDistillImageProcessor(size={"height": 32, "width": 32})


@pytest.fixture
def film_dataset(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for index, (height, width) in enumerate([(20, 30), (30, 20), (32, 32), (16, 40), (25, 25)]):
        path = tmp_path / f"film{index}.png"
        grey = rng.integers(0, 256, size=(height, width), dtype=np.uint8)
        Image.fromarray(grey if index % 2 else np.stack([grey] * 3, axis=-1)).save(path)
        paths.append(str(path))
    dataset = datasets.Dataset.from_dict(
        {"image": paths, "label": [0, 1, 2, 1, 0], "study_id": [f"s{i}" for i in range(5)]}
    ).cast_column("image", datasets.Image())
    dataset.save_to_disk(str(tmp_path / "films"))
    return datasets.load_from_disk(str(tmp_path / "films"))


def test_cached_features_match_the_encoder_last_hidden_state(film_dataset, vision_model, image_processor):
    cached = cache_image_features(film_dataset, vision_model, image_processor, batch_size=2)
    assert cached.num_rows == 5
    assert cached.column_names == ["image", "label", "study_id", "image_features"]
    assert cached.features["image_features"] == datasets.Array2D(shape=(NUM_TOKENS, HIDDEN), dtype="float16")
    assert cached["label"] == [0, 1, 2, 1, 0] and cached["study_id"] == ["s0", "s1", "s2", "s3", "s4"]

    torch_view = features_as_torch(cached)
    features = torch.stack([torch_view[i]["image_features"] for i in range(5)])
    assert features.dtype == torch.float16 and features.shape == (5, NUM_TOKENS, HIDDEN)
    assert torch_view[0]["label"] == 0 and isinstance(torch_view[0]["label"], int)
    assert torch_view[:2]["image_features"].dtype == torch.float16

    pixel_values = image_processor([film_dataset[i]["image"] for i in range(5)])["pixel_values"]
    with torch.no_grad():
        outputs = vision_model(pixel_values=pixel_values)
    torch.testing.assert_close(features.float(), outputs.last_hidden_state, rtol=1e-3, atol=2e-3)
    # Raw tokens, not post_layernorm'd ones.
    post_ln = vision_model.post_layernorm(outputs.last_hidden_state)
    assert (features.float() - post_ln).abs().max() > 0.1


def test_second_call_is_served_from_the_arrow_cache(film_dataset, vision_model, image_processor):
    counter = ForwardCounter(vision_model)
    first = cache_image_features(film_dataset, vision_model, image_processor, batch_size=2)
    assert counter.calls == 3
    second = cache_image_features(film_dataset, vision_model, image_processor, batch_size=2)
    assert counter.calls == 3
    assert second.cache_files == first.cache_files
    np.testing.assert_array_equal(np.asarray(second["image_features"]), np.asarray(first["image_features"]))

    with torch.no_grad():
        vision_model.post_layernorm.bias.add_(1.0)  # even a weight the cache does not use re-keys it
    cache_image_features(film_dataset, vision_model, image_processor, batch_size=2)
    assert counter.calls == 6


def test_fingerprint_tracks_weights_and_preprocessing(vision_model, image_processor):
    reference = feature_fingerprint(vision_model, image_processor)
    assert feature_fingerprint(copy.deepcopy(vision_model), QDistillImageProcessor(size={"height": 32, "width": 32})) \
        == reference
    changed = copy.deepcopy(vision_model)
    with torch.no_grad():
        changed.embeddings.patch_embedding.weight[0, 0, 0, 0] += 1e-3
    assert feature_fingerprint(changed, image_processor) != reference
    squash = QDistillImageProcessor(size={"height": 32, "width": 32}, resize_mode="squash")
    assert feature_fingerprint(vision_model, squash) != reference


def test_explicit_fingerprint_float32_and_mode_restored(film_dataset, vision_model, image_processor):
    vision_model.train()
    cached = cache_image_features(
        film_dataset, vision_model, image_processor, fingerprint="tiny-v1", dtype=torch.float32, feature_column="tokens"
    )
    assert vision_model.training
    assert cached.features["tokens"] == datasets.Array2D(shape=(NUM_TOKENS, HIDDEN), dtype="float32")


def test_bad_arguments_raise(film_dataset, vision_model, image_processor):
    with pytest.raises(ValueError, match="no column 'pixels'"):
        cache_image_features(film_dataset, vision_model, image_processor, image_column="pixels")
    with pytest.raises(ValueError, match="already has a column 'label'"):
        cache_image_features(film_dataset, vision_model, image_processor, feature_column="label")
    with pytest.raises(ValueError, match="dtype must be"):
        cache_image_features(film_dataset, vision_model, image_processor, dtype=torch.bfloat16)
    wrong_size = QDistillImageProcessor(size={"height": 64, "width": 64})
    with pytest.raises(ValueError, match="Input image size"):
        cache_image_features(film_dataset, vision_model, wrong_size)
    with pytest.raises(ValueError, match="no column 'image_features'"):
        features_as_torch(film_dataset)
