"""recall@k on hand-built matrices; the teacher's similarity of image i and report j ignores the rest of the batch."""

import numpy as np
import pytest
import torch

from qdistill_hf import QDistillTeacherModel
from qdistill_hf.evaluation import recall_at_k, teacher_similarity_matrix
from tiny_models import NUM_IMAGE_TOKENS, report_batch, teacher_config


def test_recall_at_k_hand_values():
    # 3 images x 4 texts, image i's text is text i (text 3 is a distractor).
    similarity = np.array([
        [0.9, 0.1, 0.2, 0.3],  # own text first -> rank 1
        [0.8, 0.5, 0.1, 0.7],  # own text (0.5) behind 0.8 and 0.7 -> rank 3
        [0.1, 0.2, 0.3, 0.4],  # own text (0.3) behind 0.4 -> rank 2
    ])
    out = recall_at_k(similarity, ks=(1, 2, 3), image_groups=[0, 1, 2])
    assert out["image_to_text_recall@1"] == pytest.approx(1 / 3)
    assert out["image_to_text_recall@2"] == pytest.approx(2 / 3)
    assert out["image_to_text_recall@3"] == pytest.approx(1.0)
    assert out["image_to_text_median_rank"] == 2.0
    assert out["image_to_text_chance@1"] == pytest.approx(1 / 4)
    assert out["image_to_text_chance@2"] == pytest.approx(2 / 4)
    # Text -> image: text 0 ranks images by column 0 (0.9, 0.8, 0.1): image 0 first -> hit@1.
    # Text 1: column (0.1, 0.5, 0.2): image 1 first -> hit@1. Text 2: (0.2, 0.1, 0.3): image 2 first -> hit@1.
    # Text 3 has no matching image: left out.
    assert out["text_to_image_n_queries"] == 3 and out["text_to_image_n_candidates"] == 3
    assert out["text_to_image_recall@1"] == pytest.approx(1.0)
    assert out["text_to_image_chance@1"] == pytest.approx(1 / 3)


def test_duplicated_texts_count_as_one_group():
    # Texts 0 and 2 are the same report (group 0). Image 0 ranks text 2 first: a hit, not a miss.
    similarity = np.array([
        [0.5, 0.1, 0.9],
        [0.2, 0.8, 0.3],
    ])
    strict = recall_at_k(similarity, ks=(1,), image_groups=[0, 1], text_groups=[0, 1, 2])
    grouped = recall_at_k(similarity, ks=(1,), image_groups=[0, 1], text_groups=[0, 1, 0])
    assert strict["image_to_text_recall@1"] == pytest.approx(0.5)
    assert grouped["image_to_text_recall@1"] == pytest.approx(1.0)
    # Chance with 2 matching texts of 3 for image 0: 1 - C(1,1)/C(3,1) = 2/3; image 1: 1/3 -> mean 0.5.
    assert grouped["image_to_text_chance@1"] == pytest.approx(0.5)


def test_ties_count_against_the_query_and_bad_input():
    out = recall_at_k(np.zeros((4, 4)), ks=(1, 4))
    assert out["image_to_text_recall@1"] == 0.0 and out["image_to_text_recall@4"] == 1.0
    with pytest.raises(ValueError, match="row 1"):
        recall_at_k(np.array([[0.1, 0.2], [np.nan, 0.3]]))
    with pytest.raises(ValueError, match=r"image_groups.*\(3,\)"):
        recall_at_k(np.zeros((3, 3)), image_groups=[0, 1])


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return QDistillTeacherModel(teacher_config()).eval()


def test_teacher_similarity_matches_forward_and_ignores_other_texts(teacher):
    pixel_values, input_ids, attention_mask, _ = report_batch()
    teacher.train()  # restored afterwards
    similarity = teacher_similarity_matrix(teacher, pixel_values, input_ids, attention_mask, batch_size=3)
    assert teacher.training
    teacher.eval()
    assert similarity.shape == (4, 4)
    with torch.no_grad():
        out = teacher(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
    expected = out.logits_per_image / teacher.logit_scale.exp()
    torch.testing.assert_close(similarity, expected, rtol=1e-4, atol=1e-5)
    scaled = teacher_similarity_matrix(teacher, pixel_values, input_ids, attention_mask, scaled=True)
    torch.testing.assert_close(scaled, out.logits_per_image, rtol=1e-4, atol=1e-4)

    # Image i against report j: replacing every *other* report (and the padding length) changes nothing.
    other_ids = torch.tensor([[2, 40, 41, 42, 43, 44, 45, 3], [2, 50, 3, 0, 0, 0, 0, 0]])
    other_mask = (other_ids != 0).long()
    ids = torch.nn.functional.pad(input_ids[1:2], (0, 2))
    mask = torch.nn.functional.pad(attention_mask[1:2], (0, 2))
    mixed = teacher_similarity_matrix(
        teacher, pixel_values, torch.cat([other_ids[:1], ids, other_ids[1:]]),
        torch.cat([other_mask[:1], mask, other_mask[1:]]), batch_size=2,
    )
    torch.testing.assert_close(mixed[:, 1], similarity[:, 1], rtol=1e-4, atol=1e-5)
    # ... and images alone, in any batch, give the same column too.
    alone = teacher_similarity_matrix(teacher, pixel_values[2:3], input_ids[1:2], attention_mask[1:2])
    torch.testing.assert_close(alone[0, 0], similarity[2, 1], rtol=1e-4, atol=1e-5)


def test_teacher_similarity_from_cached_features(teacher):
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(5, NUM_IMAGE_TOKENS, teacher.config.vision_config.hidden_size, generator=generator)
    _, input_ids, attention_mask, _ = report_batch()
    similarity = teacher_similarity_matrix(teacher, features, input_ids, attention_mask, batch_size=2)
    with torch.no_grad():
        out = teacher(image_features=features[:4], input_ids=input_ids, attention_mask=attention_mask)
    torch.testing.assert_close(similarity[:4], out.logits_per_image / teacher.logit_scale.exp(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="Expected image features"):
        teacher_similarity_matrix(teacher, features[0], input_ids, attention_mask)
