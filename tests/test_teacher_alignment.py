"""The teacher's image-report alignment must not start collapsed: report pooling, encoder-feature standardisation."""

import math

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassClassValidationError

from qdistill_hf import QDistillTeacherModel
from qdistill_hf.models.modeling_qdistill import image_feature_statistics
from tiny_models import NUM_IMAGE_TOKENS, report_batch, teacher_config


def test_mean_pooled_reports_differ_at_init_while_cls_coincides():
    torch.manual_seed(0)
    _, input_ids, attention_mask, _ = report_batch()
    features = torch.randn(4, NUM_IMAGE_TOKENS, 32)
    embeds = {}
    for pooling in ("mean", "cls"):
        torch.manual_seed(0)
        model = QDistillTeacherModel(teacher_config(text_pooling=pooling)).eval()
        embeds[pooling] = model(image_features=features, input_ids=input_ids, attention_mask=attention_mask).text_embeds
    # Reports 0 and 1 differ; reports 0 and 2 are identical.
    assert F.cosine_similarity(embeds["mean"][0], embeds["mean"][1], dim=0) < 0.99
    assert F.cosine_similarity(embeds["mean"][0], embeds["mean"][2], dim=0) > 0.9999
    # The failure this option fixes: the [CLS] output of a from-scratch Q-Former barely depends on the report.
    assert F.cosine_similarity(embeds["cls"][0], embeds["cls"][1], dim=0) > 0.99


def test_mean_pooling_ignores_padding_exactly():
    torch.manual_seed(0)
    model = QDistillTeacherModel(teacher_config()).eval()
    features = torch.randn(2, NUM_IMAGE_TOKENS, 32)
    ids = torch.tensor([[2, 11, 12, 3], [2, 21, 3, 0]])
    mask = (ids != 0).long()
    padded_ids = torch.cat([ids, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    padded_mask = (padded_ids != 0).long()
    short = model(image_features=features, input_ids=ids, attention_mask=mask).text_embeds
    long = model(image_features=features, input_ids=padded_ids, attention_mask=padded_mask).text_embeds
    torch.testing.assert_close(long, short, atol=1e-6, rtol=0)
    # Hand-computed: the pooled vector is the mean of the real tokens' outputs.
    text_output = model.qformer(input_ids=padded_ids, attention_mask=padded_mask).text_output
    expected = torch.stack([text_output[0, :4].mean(0), text_output[1, :3].mean(0)])
    torch.testing.assert_close(model.pool_text(text_output, padded_mask), expected)


def test_unknown_text_pooling_is_refused():
    with pytest.raises((StrictDataclassClassValidationError, ValueError), match="`text_pooling` must be one of"):
        teacher_config(text_pooling="max")


def test_feature_statistics_and_standardisation_break_the_image_symmetry():
    generator = torch.Generator().manual_seed(0)
    # A per-position component shared by every film (as in CLIP tokens) plus a small film-specific part.
    shared = 10 * torch.randn(1, NUM_IMAGE_TOKENS, 32, generator=generator)
    features = shared + 0.1 * torch.randn(64, NUM_IMAGE_TOKENS, 32, generator=generator)
    mean, std = image_feature_statistics(features)
    torch.testing.assert_close(mean, features.mean(0))
    torch.testing.assert_close(std, (features.var(0) + 1e-6).sqrt())
    batches_mean, batches_std = image_feature_statistics([features[:10], features[10:]])
    torch.testing.assert_close(batches_mean, mean)
    torch.testing.assert_close(batches_std, std)

    torch.manual_seed(0)
    model = QDistillTeacherModel(teacher_config()).eval()
    raw = model(image_features=features[:2]).image_embeds.mean(1)
    model.set_image_feature_statistics(mean, std)
    assert model.config.qformer_config.standardize_image_features
    standardised = model(image_features=features[:2]).image_embeds.mean(1)
    # Raw: the shared per-position component swamps the films (1 - cos ~ 1e-8). Standardised: the film-specific
    # part is what the cross-attention reads, orders of magnitude more separated.
    raw_gap = 1 - F.cosine_similarity(raw[0], raw[1], dim=0)
    standardised_gap = 1 - F.cosine_similarity(standardised[0], standardised[1], dim=0)
    assert raw_gap < 1e-6
    assert standardised_gap > 1e-5 and standardised_gap > 100 * raw_gap


def test_feature_statistics_are_validated_and_saved(tmp_path):
    model = QDistillTeacherModel(teacher_config())
    shape = (NUM_IMAGE_TOKENS, 32)
    with pytest.raises(ValueError, match="shape"):
        model.set_image_feature_statistics(torch.zeros(3, 32), torch.ones(3, 32))
    with pytest.raises(ValueError, match="<= 0"):
        model.set_image_feature_statistics(torch.zeros(shape), torch.zeros(shape))
    with pytest.raises(ValueError, match="at least 2 films"):
        image_feature_statistics(torch.zeros(1, *shape))
    mean, std = torch.randn(shape), torch.rand(shape) + 0.5
    model.set_image_feature_statistics(mean, std)
    model.save_pretrained(tmp_path)
    reloaded = QDistillTeacherModel.from_pretrained(tmp_path)
    assert reloaded.config.qformer_config.standardize_image_features
    torch.testing.assert_close(reloaded.qformer.image_feature_mean, mean, atol=0, rtol=0)
    torch.testing.assert_close(reloaded.qformer.image_feature_std, std, atol=0, rtol=0)


def _train_toy_teacher(standardise: bool, steps: int = 30) -> list[float]:
    """Eight films, each with its own report (two tokens per film); ITC losses of `steps` AdamW steps."""
    generator = torch.Generator().manual_seed(0)
    num = 8
    shared = 5 * torch.randn(1, NUM_IMAGE_TOKENS, 32, generator=generator)
    features = shared + torch.randn(num, NUM_IMAGE_TOKENS, 32, generator=generator)
    input_ids = torch.stack([torch.tensor([2, 10 + i, 40 + i, 3]) for i in range(num)])
    attention_mask = torch.ones_like(input_ids)
    labels = torch.arange(num) % 2
    torch.manual_seed(0)
    model = QDistillTeacherModel(teacher_config(qformer=dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)))
    if standardise:
        model.set_image_feature_statistics(*image_feature_statistics(features))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses = []
    for _ in range(steps):
        out = model(image_features=features, input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                    return_loss=True, generator=torch.Generator().manual_seed(1))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.clamp_logit_scale()
        losses.append(float(out.loss_itc.detach()))
    return losses


def test_tiny_teacher_learns_itc_when_each_film_determines_its_report():
    losses = _train_toy_teacher(standardise=True)
    assert losses[0] > math.log(8) - 0.3
    assert losses[-1] < 0.5 * math.log(8)  # measured 0.42 (ln 8 = 2.08)
    # Without the feature statistics the shared per-position component hides the films: still at chance.
    assert _train_toy_teacher(standardise=False)[-1] > math.log(8) - 0.2  # measured 2.07
