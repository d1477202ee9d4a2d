"""Training library pieces without a training loop: arguments, collator, metrics, loss definitions, teacher targets."""


import numpy as np
import pytest
import torch
from transformers import EvalPrediction

from qdistill_hf.training import (
    QDistillDataCollator,
    QDistillTrainingArguments,
    attention_alignment_loss,
    compute_auroc_metrics,
    compute_teacher_targets,
    cross_attention_map,
)
from qdistill_hf.data.feature_cache import features_as_torch
from training_toys import toy_dataset, toy_image_dataset, toy_image_processor, toy_teacher, toy_tokenizer


def _args(tmp_path, **kwargs):
    return QDistillTrainingArguments(output_dir=str(tmp_path), use_cpu=True, **kwargs)


# ---- QDistillTrainingArguments ---------------------------------------------------------------------------------


def test_arguments_defaults_changed(tmp_path):
    args = _args(tmp_path)
    assert args.remove_unused_columns is False
    assert args.report_to == [] or args.report_to == "none"
    assert (args.distill_target, args.kd_temperature, args.kd_temperature_final) == ("bi", 2.0, None)
    assert (args.student_text_column, args.teacher_text_column) == ("pseudo_report", "report")
    assert args.gather_itc_features is False


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"distill_target": "both"}, "distill_target"),
        ({"feature_mse_weight": -1.0}, "feature_mse_weight"),
        ({"attention_alignment_weight": float("nan")}, "attention_alignment_weight"),
        ({"kd_temperature": 0.0}, "kd_temperature"),
        ({"kd_temperature_final": -2.0}, "kd_temperature_final"),
        ({"student_text_column": "report"}, "student_text_column"),
        ({"remove_unused_columns": True}, "remove_unused_columns"),
        (dict(feature_mse_weight=0, feature_cosine_weight=0, logit_kd_weight=0, supervised_weight=0), "all 0"),
    ],
)
def test_arguments_reject_bad_values_naming_the_field(tmp_path, kwargs, field):
    with pytest.raises(ValueError, match=field):
        _args(tmp_path, **kwargs)


def test_temperature_schedule_is_linear(tmp_path):
    args = _args(tmp_path, kd_temperature=4.0, kd_temperature_final=1.0)
    assert [args.kd_temperature_at(step, 6) for step in (0, 2, 3, 6, 9)] == [4.0, 3.0, 2.5, 1.0, 1.0]
    assert _args(tmp_path, kd_temperature=3.0).kd_temperature_at(5, 10) == 3.0


def test_arguments_parse_from_command_line(tmp_path):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(QDistillTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--distill_target", "uni", "--kd_temperature_final", "1", "--use_cpu"]
    )
    assert (args.distill_target, args.kd_temperature_final) == ("uni", 1.0)


# ---- QDistillDataCollator --------------------------------------------------------------------------------------


def test_collator_cached_features_and_texts():
    tokenizer = toy_tokenizer()
    dataset = toy_dataset(4)
    rows = [dataset[i] for i in range(4)]
    batch = QDistillDataCollator(tokenizer, text_column="pseudo_report", teacher_text_column="report")(rows)
    assert set(batch) == {"image_features", "input_ids", "attention_mask", "teacher_input_ids",
                          "teacher_attention_mask", "labels", "study_ids"}
    assert batch["image_features"].dtype == torch.float32
    expected = torch.tensor(np.asarray(dataset["image_features"], dtype=np.float32))
    assert torch.equal(batch["image_features"], expected)
    assert batch["labels"].tolist() == [0, 1, 0, 1] and batch["labels"].dtype == torch.long
    assert batch["study_ids"] == ["s0-000", "s0-001", "s0-002", "s0-003"]
    # Dynamic padding: as long as the longest text of the batch, padded with [PAD]=0 on the right.
    lengths = [len(tokenizer(row["report"])["input_ids"]) for row in rows]
    assert batch["teacher_input_ids"].shape == (4, max(lengths))
    assert batch["teacher_attention_mask"].sum(1).tolist() == lengths
    assert tokenizer.decode(batch["input_ids"][1], skip_special_tokens=True) == rows[1]["pseudo_report"]


def test_collator_torch_formatted_features_match_plain():
    dataset = toy_dataset(4)
    plain = QDistillDataCollator(label_column=None)([dataset[i] for i in range(4)])
    formatted = features_as_torch(dataset)
    torch_rows = QDistillDataCollator(label_column=None)([formatted[i] for i in range(4)])
    assert torch.equal(plain["image_features"], torch_rows["image_features"])


def test_collator_image_only_student_has_no_text(tmp_path):
    from tiny_models import student_config

    args = _args(tmp_path)
    collator = QDistillDataCollator.for_distillation(toy_tokenizer(), args, student_config(text_mode="image_only"))
    batch = collator([toy_dataset(2)[i] for i in range(2)])
    assert "input_ids" not in batch and "teacher_input_ids" in batch
    uni = _args(tmp_path, distill_target="uni")
    batch = QDistillDataCollator.for_distillation(toy_tokenizer(), uni, student_config(text_mode="pseudo_report"))(
        [toy_dataset(2)[i] for i in range(2)]
    )
    assert "input_ids" in batch and "teacher_input_ids" not in batch


def test_collator_pixels_through_image_processor():
    dataset = toy_image_dataset(4)
    processor = toy_image_processor()
    batch = QDistillDataCollator(toy_tokenizer(), image_processor=processor, text_column="report")(
        [dataset[i] for i in range(4)]
    )
    assert batch["pixel_values"].shape == (4, 3, 30, 30) and batch["pixel_values"].dtype == torch.float32
    assert torch.equal(batch["pixel_values"], processor(list(dataset["image"]), return_tensors="pt")["pixel_values"])


def test_collator_missing_column_names_it_and_the_available_ones():
    rows = [toy_dataset(2)[i] for i in range(2)]
    for row in rows:
        del row["pseudo_report"]
    with pytest.raises(KeyError, match=r"'pseudo_report'.*available columns: \['image_features', 'label', 'report'"):
        QDistillDataCollator(toy_tokenizer(), text_column="pseudo_report")(rows)
    with pytest.raises(KeyError, match="no image input"):
        QDistillDataCollator(toy_tokenizer())([{"study_id": "a", "label": 0}])


def test_collator_non_finite_features_name_the_study():
    rows = [toy_dataset(3)[i] for i in range(3)]
    features = np.asarray(rows[1]["image_features"], dtype=np.float32)
    features[5, 3] = np.nan
    rows[1]["image_features"] = features
    with pytest.raises(ValueError, match=r"Non-finite values in 'image_features' for studies \['s0-001'\]"):
        QDistillDataCollator()(rows)


def test_collator_empty_text_names_the_study_and_column():
    rows = [toy_dataset(3)[i] for i in range(3)]
    rows[2]["report"] = "   "
    with pytest.raises(ValueError, match=r"column 'report' for studies \['s0-002'\]"):
        QDistillDataCollator(toy_tokenizer(), text_column="report")(rows)
    rows[2]["report"] = None
    with pytest.raises(ValueError, match=r"s0-002"):
        QDistillDataCollator(toy_tokenizer(), teacher_text_column="report")(rows)


def test_collator_refuses_non_integer_labels():
    rows = [toy_dataset(2)[i] for i in range(2)]
    rows[0]["label"] = 0.5
    with pytest.raises(ValueError, match=r"'label'.*\['s0-000'\]"):
        QDistillDataCollator()(rows)


# ---- metrics -----------------------------------------------------------------------------------------------------


def test_compute_auroc_metrics_hand_values():
    # p(class 1) = sigmoid(z1 - z0): 0.27, 0.5, 0.73, 0.88 for labels 0, 1, 0, 1.
    logits = np.array([[0.0, -1.0], [0.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    labels = np.array([0, 1, 0, 1])
    metrics = compute_auroc_metrics(EvalPrediction(predictions=logits, label_ids=labels))
    # Positive/negative pairs ranked correctly: (0.5 > 0.27), (0.88 > 0.27), (0.88 > 0.73); wrong: (0.5 < 0.73).
    assert metrics["auroc"] == pytest.approx(3 / 4)
    # argmax: 0 (tie -> class 0), 0, 1, 1 -> correct on rows 0 and 3.
    assert metrics["accuracy"] == pytest.approx(2 / 4)
    with pytest.raises(ValueError, match="single class"):
        compute_auroc_metrics(EvalPrediction(predictions=logits, label_ids=np.zeros(4)))


# ---- loss definitions ----------------------------------------------------------------------------------------


def test_cross_attention_map_and_alignment_loss_hand_values():
    # Two layers, batch 1, 2 heads, 2 queries, 3 image tokens.
    layer1 = torch.tensor([[[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[0.0, 0.0, 1.0], [0.5, 0.5, 0.0]]]])
    layer2 = torch.full((1, 2, 2, 3), 1 / 3)
    attention = cross_attention_map((layer1, layer2))
    # layer1 mean over heads and queries: (1 + 0 + 0 + 0.5) / 4, (0 + 1 + 0 + 0.5) / 4, (0 + 0 + 1 + 0) / 4.
    expected = (torch.tensor([[1.5 / 4, 1.5 / 4, 1 / 4]]) + torch.full((1, 3), 1 / 3)) / 2
    assert torch.allclose(attention, expected)
    assert attention.sum().item() == pytest.approx(1.0)
    teacher = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])
    student = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]])
    # T = 3 tokens: row 0 differs by (-0.5, 0.5, 0) -> scaled (-1.5, 1.5, 0) -> squares 2.25, 2.25, 0; row 1 is
    # identical. Mean over the 6 entries: 4.5 / 6.
    assert attention_alignment_loss(student, teacher).item() == pytest.approx(0.75)
    with pytest.raises(ValueError, match="differ in shape"):
        attention_alignment_loss(student[:, :2], teacher)


def test_teacher_targets_bi_and_uni_are_the_teacher_outputs():
    teacher = toy_teacher().eval()
    batch = QDistillDataCollator(toy_tokenizer(), teacher_text_column="report")([toy_dataset(3)[i] for i in range(3)])
    bi = compute_teacher_targets(teacher, batch, "bi", with_attention=True)
    with torch.no_grad():
        out = teacher(image_features=batch["image_features"], input_ids=batch["teacher_input_ids"],
                      attention_mask=batch["teacher_attention_mask"], output_attentions=True)
    assert torch.allclose(bi["pooled"], out.query_output_bidirectional.mean(1))
    assert torch.allclose(bi["logits"], out.logits)
    assert torch.allclose(bi["attention"], cross_attention_map(out.cross_attentions))
    assert torch.allclose(bi["attention"].sum(-1), torch.ones(3))
    uni = compute_teacher_targets(teacher, batch, "uni")
    with torch.no_grad():
        image_only = teacher(image_features=batch["image_features"])
    assert torch.allclose(uni["pooled"], image_only.query_output_unimodal.mean(1), atol=1e-6)
    assert torch.allclose(uni["logits"], teacher.classifier(image_only.query_output_unimodal.mean(1)), atol=1e-6)
    assert not torch.allclose(uni["pooled"], bi["pooled"])
    with pytest.raises(ValueError, match="teacher_input_ids"):
        compute_teacher_targets(teacher, {"image_features": batch["image_features"]}, "bi")


def test_collator_preprocessed_pixel_values_column():
    dataset = toy_image_dataset(3)
    processor = toy_image_processor()
    pixels = processor(list(dataset["image"]), return_tensors="pt")["pixel_values"]
    rows = [{"study_id": f"p{i}", "pixel_values": pixels[i].numpy(), "label": i % 2} for i in range(3)]
    batch = QDistillDataCollator()(rows)
    assert torch.equal(batch["pixel_values"], pixels) and batch["labels"].tolist() == [0, 1, 0]
    rows[2]["pixel_values"] = np.full((3, 30, 30), np.inf, dtype=np.float32)
    with pytest.raises(ValueError, match=r"'pixel_values' for studies \['p2'\]"):
        QDistillDataCollator()(rows)


def test_teacher_targets_cached_from_films_match_the_teacher(tmp_path):
    from qdistill_hf import QDistillProcessor
    from qdistill_hf.training import cache_teacher_targets

    teacher = toy_teacher().eval()
    processor = QDistillProcessor(image_processor=toy_image_processor(), tokenizer=toy_tokenizer())
    dataset = toy_image_dataset(5)
    cached = cache_teacher_targets(dataset, teacher, processor, target="bi", batch_size=2, pooled_dtype=torch.float32,
                                   cache_dir=str(tmp_path))
    assert cached.features["teacher_pooled"].feature.dtype == "float32"
    batch = QDistillDataCollator(processor, teacher_text_column="report")([dataset[i] for i in range(5)])
    live = compute_teacher_targets(teacher, batch, "bi")
    assert torch.allclose(torch.tensor(cached["teacher_pooled"]), live["pooled"], atol=1e-5)
    assert torch.allclose(torch.tensor(cached["teacher_logits"]), live["logits"], atol=1e-5)
    assert cached["teacher_target"] == ["bi"] * 5
