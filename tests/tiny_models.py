"""Tiny random configurations shared by the model tests (odd sizes catch shape bugs)."""

import torch

from qdistill_hf import QDistillStudentConfig, QDistillTeacherConfig

VISION = dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=30, patch_size=6,
    projection_dim=16,
)
NUM_IMAGE_TOKENS = (30 // 6) ** 2 + 1
VOCAB = 99


def teacher_config(**overrides) -> QDistillTeacherConfig:
    qformer = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        num_query_tokens=4, max_position_embeddings=40,
    )
    qformer.update(overrides.pop("qformer", {}))
    return QDistillTeacherConfig(vision_config=dict(VISION), qformer_config=qformer, embed_dim=16, **overrides)


def student_config(**overrides) -> QDistillStudentConfig:
    qformer = dict(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
        num_query_tokens=3, max_position_embeddings=40,
    )
    qformer.update(overrides.pop("qformer", {}))
    return QDistillStudentConfig(vision_config=dict(VISION), qformer_config=qformer, teacher_hidden_size=32, **overrides)


def report_batch(seed: int = 0):
    """Four reports of different lengths, right-padded with [PAD]=0; reports 0 and 2 are identical."""
    input_ids = torch.tensor(
        [[2, 11, 12, 3, 0, 0], [2, 21, 22, 23, 24, 3], [2, 11, 12, 3, 0, 0], [2, 31, 3, 0, 0, 0]]
    )
    attention_mask = (input_ids != 0).long()
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(4, 3, 30, 30, generator=generator)
    labels = torch.tensor([0, 1, 0, 1])
    return pixel_values, input_ids, attention_mask, labels


def processor_settings(processor) -> dict:
    """A processor's settings without `auto_map`, which saving writes (the class is registered for its Auto class)."""
    settings = processor.to_dict()
    settings.pop("auto_map", None)
    return settings
