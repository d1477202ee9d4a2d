import math

import pytest
import torch
import torch.nn.functional as F

from qdistill_hf import build_qformer_attention_mask
from qdistill_hf.models.loss_qdistill import (
    distillation_kl_loss,
    embedding_alignment_loss,
    focal_loss,
    image_text_contrastive_loss,
    query_text_similarity,
    report_positive_mask,
    sample_hard_negatives,
)

BLOCK = torch.finfo(torch.float32).min


def test_itc_diagonal_targets_hand_computed():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    # Each row: -log(e^2 / (e^2 + 1)) = log(1 + e^-2), in both directions.
    assert image_text_contrastive_loss(logits).item() == pytest.approx(math.log(1 + math.exp(-2)), abs=1e-6)


def test_itc_soft_positives_hand_computed():
    logits = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    positives = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    # Rows 0 and 1 target (1/2, 1/2, 0): -log(e / (2e + 1)); row 2 targets itself: -log(e / (e + 2)).
    row01 = math.log(2 * math.e + 1) - 1
    row2 = math.log(math.e + 2) - 1
    expected = (2 * row01 + row2) / 3  # the matrix is symmetric, so text-to-image is the same
    assert image_text_contrastive_loss(logits, positives).item() == pytest.approx(expected, abs=1e-6)
    # With identical reports counted as negatives, the image that prefers its twin's report is penalised.
    skewed = torch.tensor([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert image_text_contrastive_loss(skewed, positives).item() < image_text_contrastive_loss(skewed).item()


def test_itc_rejects_bad_positive_masks():
    with pytest.raises(ValueError, match="True on the diagonal"):
        image_text_contrastive_loss(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"expected \(2, 2\)"):
        image_text_contrastive_loss(torch.zeros(2, 2), torch.ones(3, 3, dtype=torch.bool))


def test_query_similarity_max_and_softmax_against_explicit_formulas():
    generator = torch.Generator().manual_seed(0)
    queries = F.normalize(torch.randn(3, 4, 5, generator=generator), dim=-1)
    texts = F.normalize(torch.randn(2, 5, generator=generator), dim=-1)
    sim_max = query_text_similarity(queries, texts, "max")
    sim_soft = query_text_similarity(queries, texts, "softmax", temperature=0.1)
    assert sim_max.shape == sim_soft.shape == (3, 2)
    for i in range(3):
        for j in range(2):
            cos = queries[i] @ texts[j]
            assert sim_max[i, j].item() == pytest.approx(cos.max().item(), abs=1e-6)
            mix = (torch.softmax(cos / 0.1, dim=0)[:, None] * queries[i]).sum(0)
            assert sim_soft[i, j].item() == pytest.approx((F.normalize(mix, dim=0) @ texts[j]).item(), abs=1e-5)


def test_query_similarity_softmax_with_one_query_is_the_cosine():
    queries = F.normalize(torch.tensor([[[3.0, 4.0]]]), dim=-1)
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert query_text_similarity(queries, texts, "softmax")[0].tolist() == pytest.approx([0.6, 0.8], abs=1e-6)
    with pytest.raises(ValueError, match="Unknown query selection mode 'mean'"):
        query_text_similarity(queries, texts, "mean")


@pytest.mark.parametrize("mode", ["softmax", "max"])
def test_query_similarity_stays_float32_under_bf16_autocast(mode):
    generator = torch.Generator().manual_seed(0)
    queries = F.normalize(torch.randn(3, 4, 64, generator=generator), dim=-1)
    texts = F.normalize(torch.randn(5, 64, generator=generator), dim=-1)
    reference = query_text_similarity(queries, texts, mode)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = query_text_similarity(queries, texts, mode)
    assert under_autocast.dtype == torch.float32
    assert torch.allclose(under_autocast, reference, atol=1e-6)


def test_hard_negative_sampler_never_returns_a_positive():
    generator = torch.Generator().manual_seed(0)
    batch = 6
    positives = torch.eye(batch, dtype=torch.bool)
    positives[0, 1] = positives[1, 0] = True  # identical reports
    similarity = torch.randn(batch, batch, generator=generator) * 5
    similarity[0, 1] = similarity[1, 0] = 50.0  # the most similar candidate is a positive: must still be avoided
    for _ in range(200):
        indices, valid = sample_hard_negatives(similarity, positives, generator)
        assert valid.all()
        assert not positives[torch.arange(batch), indices].any()


def test_hard_negative_sampler_follows_the_similarity_and_is_reproducible():
    similarity = torch.tensor([[0.0, 10.0, -10.0], [10.0, 0.0, -10.0], [0.0, 0.0, 0.0]])
    positives = torch.eye(3, dtype=torch.bool)
    first = sample_hard_negatives(similarity, positives, torch.Generator().manual_seed(1))[0]
    second = sample_hard_negatives(similarity, positives, torch.Generator().manual_seed(1))[0]
    assert torch.equal(first, second)
    assert first[:2].tolist() == [1, 0]  # weights e^10 vs e^-10


def test_hard_negative_sampler_keeps_the_hardest_negative_when_the_positive_dominates():
    # Normalised over the whole row, [100, -10, -5] underflows both negatives to 0 in float32. Restricted to the
    # negatives the weights are softmax([-10, -5]) = (0.0067, 0.9933): candidate 2 nearly always, never a coin flip.
    similarity = torch.tensor([[100.0, -10.0, -5.0]]).expand(400, 3)
    positives = torch.tensor([[True, False, False]]).expand(400, 3)
    indices, valid = sample_hard_negatives(similarity, positives, torch.Generator().manual_seed(0))
    assert valid.all() and not (indices == 0).any()
    assert (indices == 2).sum() >= 390


def test_hard_negative_sampler_flags_rows_without_negatives():
    indices, valid = sample_hard_negatives(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool))
    assert indices.tolist() == [-1] and valid.tolist() == [False]
    positives = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    positives[2, :] = True
    indices, valid = sample_hard_negatives(torch.zeros(3, 3), positives, torch.Generator().manual_seed(0))
    assert valid.tolist() == [True, True, False] and indices[:2].tolist() == [2, 2] and indices[2] == -1


def test_focal_loss_hand_computed():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p = (1/4, 3/4)
    labels = torch.tensor([1])
    expected = (1 / 4) ** 2 * -math.log(3 / 4)
    assert focal_loss(logits, labels, gamma=2.0).item() == pytest.approx(expected, abs=1e-7)
    alpha = torch.tensor([0.25, 0.75])
    assert focal_loss(logits, labels, gamma=2.0, alpha=alpha).item() == pytest.approx(0.75 * expected, abs=1e-7)
    batch = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([0, 2, 1, 1, 0])
    assert focal_loss(batch, targets, gamma=0.0).item() == pytest.approx(F.cross_entropy(batch, targets).item(), abs=1e-6)
    assert focal_loss(batch, targets, gamma=0.0, reduction="none").shape == (5,)


@pytest.mark.parametrize("bad", [[-1, 0], [0, 2]])
def test_focal_loss_refuses_labels_outside_the_class_set(bad):
    with pytest.raises(ValueError, match=r"labels must be class ids in \[0, 2\)"):
        focal_loss(torch.zeros(2, 2), torch.tensor(bad))


def test_distillation_losses_hand_computed():
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[0.0, math.log(3.0)]])
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert distillation_kl_loss(student, teacher).item() == pytest.approx(expected, abs=1e-6)
    assert distillation_kl_loss(teacher, teacher, temperature=2.0).item() == pytest.approx(0.0, abs=1e-7)
    mse, cosine = embedding_alignment_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]]))
    assert mse.item() == pytest.approx((1 + 4) / 2) and cosine.item() == pytest.approx(1.0)


def test_report_positive_mask_ignores_padding():
    input_ids = torch.tensor([[2, 5, 3, 0], [2, 5, 3, 0], [2, 5, 3, 7], [2, 6, 3, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0]])
    mask = report_positive_mask(input_ids, attention_mask)
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_attention_mask_helper_unimodal_and_bidirectional():
    text_mask = torch.tensor([[1, 1, 0]])
    o, x = 0.0, BLOCK
    unimodal = build_qformer_attention_mask(2, text_mask, "unimodal")
    expected_uni = torch.tensor(
        [[o, o, x, x, x], [o, o, x, x, x], [x, x, o, o, x], [x, x, o, o, x], [x, x, o, o, x]]
    )
    assert unimodal.shape == (1, 1, 5, 5) and unimodal.dtype == torch.float32
    assert torch.equal(unimodal[0, 0], expected_uni)
    bidirectional = build_qformer_attention_mask(2, text_mask, "bidirectional")
    assert torch.equal(bidirectional[0, 0], torch.tensor([[o, o, o, o, x]] * 5))
    queries_only = build_qformer_attention_mask(2, None, "bidirectional", batch_size=3)
    assert queries_only.shape == (3, 1, 2, 2) and not queries_only.any()
    assert build_qformer_attention_mask(1, text_mask, "unimodal", dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="Unknown attention mode 'causal'"):
        build_qformer_attention_mask(2, text_mask, "causal")
