"""Toy data and tiny models shared by the training tests: a separable batch of cached features and reports."""

import datasets
import numpy as np
import torch

from qdistill_hf import QDistillStudentModel, QDistillTeacherModel, train_report_tokenizer
from tiny_models import NUM_IMAGE_TOKENS, VISION, student_config, teacher_config

REPORTS = {0: ["lungs are clear", "no acute finding", "normal heart size"],
           1: ["large pleural effusion", "tension pneumothorax seen", "free air under diaphragm"]}
PSEUDO = {0: ["clear lungs", "normal study"], 1: ["effusion likely", "pneumothorax likely"]}
ID2LABEL = {0: "routine", 1: "urgent"}


def toy_rows(n: int = 16, seed: int = 0, signal: float = 2.0, cls_offset: float = 0.0) -> dict[str, list]:
    """
    `n` studies, labels alternating 0/1; class 1 films carry `+signal` on the first 4 feature dims (class 0:
    `-signal`); the first (CLS) token carries `+cls_offset` on dims 8-11, which makes it recognisable.
    """
    rng = np.random.default_rng(seed)
    labels = [i % 2 for i in range(n)]
    features = rng.standard_normal((n, NUM_IMAGE_TOKENS, VISION["hidden_size"])).astype(np.float32)
    for i, label in enumerate(labels):
        features[i, :, :4] += signal if label else -signal
    features[:, 0, 8:12] += cls_offset
    return {
        "study_id": [f"s{seed}-{i:03d}" for i in range(n)],
        "image_features": features.astype(np.float16),
        "report": [REPORTS[label][i % 3] for i, label in enumerate(labels)],
        "pseudo_report": [PSEUDO[label][i % 2] for i, label in enumerate(labels)],
        "label": labels,
    }


def toy_dataset(n: int = 16, seed: int = 0, signal: float = 2.0, cls_offset: float = 0.0) -> datasets.Dataset:
    rows = toy_rows(n, seed, signal, cls_offset)
    features = datasets.Features({
        "study_id": datasets.Value("string"),
        "image_features": datasets.Array2D((NUM_IMAGE_TOKENS, VISION["hidden_size"]), "float16"),
        "report": datasets.Value("string"),
        "pseudo_report": datasets.Value("string"),
        "label": datasets.ClassLabel(names=[ID2LABEL[0], ID2LABEL[1]]),
    })
    return datasets.Dataset.from_dict(rows, features=features)


def toy_tokenizer():
    texts = [t for group in (REPORTS, PSEUDO) for texts in group.values() for t in texts]
    return train_report_tokenizer(texts, vocab_size=99, model_max_length=32, min_frequency=1)


def toy_teacher(seed: int = 0, **overrides) -> QDistillTeacherModel:
    torch.manual_seed(seed)
    overrides.setdefault("id2label", dict(ID2LABEL))
    return QDistillTeacherModel(teacher_config(**overrides))


def toy_student(seed: int = 1, text_mode: str = "image_only", **overrides) -> QDistillStudentModel:
    torch.manual_seed(seed)
    overrides.setdefault("id2label", dict(ID2LABEL))
    teacher_hidden_size = overrides.pop("teacher_hidden_size", None)
    config = student_config(text_mode=text_mode, **overrides)
    if teacher_hidden_size is not None:
        config.teacher_hidden_size = teacher_hidden_size
    return QDistillStudentModel(config)


def toy_image_dataset(n: int = 8, seed: int = 0) -> datasets.Dataset:
    """The same studies as `toy_dataset` but with 30 x 30 grey films (class 1 brighter) instead of cached features."""
    from PIL import Image

    rows = toy_rows(n, seed)
    rng = np.random.default_rng(seed + 100)
    images = []
    for label in rows["label"]:
        pixels = rng.integers(0, 100, size=(30, 30)) + (120 if label else 0)
        images.append(Image.fromarray(pixels.astype(np.uint8)))
    rows = {key: value for key, value in rows.items() if key != "image_features"}
    rows["image"] = images
    features = datasets.Features({
        "study_id": datasets.Value("string"), "report": datasets.Value("string"),
        "pseudo_report": datasets.Value("string"), "label": datasets.ClassLabel(names=[ID2LABEL[0], ID2LABEL[1]]),
        "image": datasets.Image(),
    })
    return datasets.Dataset.from_dict(rows, features=features)


def toy_image_processor():
    from qdistill_hf import QDistillImageProcessor

    return QDistillImageProcessor(size={"height": 30, "width": 30}, min_image_side=1)
