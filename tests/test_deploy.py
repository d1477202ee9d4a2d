"""qdistill_hf.deploy: int8 and pruned students, torch.export / ONNX export with parity, calibration and metadata.

Tolerances (tiny random students, fp32, CPU):
- exported graphs (torch.export, ONNX via onnxruntime) vs eager: max |logit difference| <= 1e-4;
- int8 (torch.ao dynamic, or onnxruntime quantize_dynamic) vs fp32: max |calibrated probability difference| <= 0.05.
"""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from qdistill_hf import QDistillImageProcessor, QDistillStudentModel, QDistillTeacherModel
from qdistill_hf.deploy import (
    NOT_TRIAGED,
    OnnxTriageModel,
    compression_table,
    count_parameters,
    export_student,
    format_compression_table,
    load_metadata,
    prune_linear_magnitude,
    quantize_dynamic_int8,
    quantize_onnx_int8,
    serialized_size,
)
from tiny_models import NUM_IMAGE_TOKENS, VISION, student_config, teacher_config

EXPORT_TOLERANCE = 1e-4
INT8_PROBABILITY_TOLERANCE = 0.05
IMAGE = VISION["image_size"]


def films(batch, seed=1):
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def reports(batch, length, seed=2):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 99, (batch, length), generator=generator)
    input_ids[:, 0] = 2
    input_ids[:, -1] = 3
    attention_mask = torch.ones_like(input_ids)
    input_ids[0, length - 2 :] = 0  # the first report is shorter: padding inside the batch
    input_ids[0, length - 3] = 3
    attention_mask[0, length - 2 :] = 0
    return input_ids, attention_mask


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    model = QDistillStudentModel(student_config(text_mode="image_only", calibration_temperature=2.0,
                                                decision_threshold=0.3, decision_rule="test"))
    # Standardised encoder tokens (buffers saved with the weights) must travel into the exported graphs too.
    generator = torch.Generator().manual_seed(3)
    model.set_image_feature_statistics(torch.randn(NUM_IMAGE_TOKENS, VISION["hidden_size"], generator=generator),
                                       torch.rand(NUM_IMAGE_TOKENS, VISION["hidden_size"], generator=generator) + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def pseudo_student():
    torch.manual_seed(0)
    return QDistillStudentModel(student_config(text_mode="pseudo_report")).eval()


@pytest.fixture(scope="module")
def processor():
    return QDistillImageProcessor(size={"height": IMAGE, "width": IMAGE}, resize_mode="squash")


@pytest.fixture(scope="module")
def onnx_file(student, processor, tmp_path_factory):
    torch.set_num_threads(1)
    return export_student(student, tmp_path_factory.mktemp("onnx") / "student.onnx", image_processor=processor)


def eager(model, pixel_values, **text):
    with torch.no_grad():
        logits = model(pixel_values=pixel_values, **text).logits
    probabilities = model.triage_probabilities(logits)
    return logits, probabilities, model.triage_decisions(probabilities)


# ----------------------------------------------------------------------------------------------------------- int8


def test_quantize_dynamic_int8_replaces_every_linear_and_stays_close(student):
    quantized = quantize_dynamic_int8(student)
    assert quantized is not student
    linears = [name for name, module in student.named_modules() if isinstance(module, nn.Linear)]
    assert any(name.startswith("vision_model.") for name in linears) and "classifier" in linears
    modules = dict(quantized.named_modules())
    for name in linears:
        assert type(modules[name]).__module__.startswith("torch.ao.nn.quantized.dynamic"), name
    assert all(type(m) is nn.Linear for n, m in student.named_modules() if n in linears)  # original untouched

    x = films(8)
    logits, probabilities, _ = eager(student, x)
    q_logits, q_probabilities, _ = eager(quantized, x)
    change = (q_probabilities - probabilities).abs().max().item()
    assert 0 < change <= INT8_PROBABILITY_TOLERANCE  # it changed something, and little
    assert (q_logits - logits).abs().max().item() > 0

    # Same number of weights, stored in fewer bytes.
    assert count_parameters(quantized)[0] == count_parameters(student)[0]
    assert serialized_size(quantized) < serialized_size(student)


def test_quantize_refuses_a_non_float32_model(student):
    with pytest.raises(ValueError, match="float32 model on CPU; parameter .* is torch.float64"):
        quantize_dynamic_int8(QDistillStudentModel(student_config(text_mode="image_only")).double())


def test_prune_linear_magnitude_zeroes_the_smallest_weights_permanently(student):
    pruned = prune_linear_magnitude(student, 0.5)
    for name, module in pruned.named_modules():
        if isinstance(module, nn.Linear):
            original = dict(student.named_modules())[name].weight.detach()
            weight = module.weight.detach()
            assert int((weight == 0).sum()) == round(0.5 * weight.numel()), name
            kept = weight != 0
            assert torch.equal(weight[kept], original[kept]), name  # survivors unchanged
            assert original[~kept].abs().max() <= original[kept].abs().min(), name  # the smallest went
            assert not hasattr(module, "weight_orig") and not module._forward_pre_hooks, name
    assert all(not p.requires_grad for p in pruned.vision_model.parameters())  # still frozen
    assert int((student.classifier.weight == 0).sum()) == 0  # the input model is untouched
    total, nonzero = count_parameters(pruned)
    assert total == count_parameters(student)[0] and nonzero < total

    heads_only = prune_linear_magnitude(student, 0.5, include_vision=False)
    assert torch.equal(heads_only.vision_model.encoder.layers[0].mlp.fc1.weight,
                       student.vision_model.encoder.layers[0].mlp.fc1.weight)
    assert int((heads_only.classifier.weight == 0).sum()) == round(0.5 * heads_only.classifier.weight.numel())
    for bad in (1.0, -0.1, True, "0.5"):
        with pytest.raises(ValueError, match="amount must be a fraction in \\[0, 1\\)"):
            prune_linear_magnitude(student, bad)


def test_compression_table_rows(student, onnx_file):
    x = films(12)
    labels = torch.tensor([0, 1] * 6)
    variants = {"fp32": student, "int8": quantize_dynamic_int8(student), "onnx": OnnxTriageModel(onnx_file, threads=1)}
    rows = compression_table(variants, x, labels, temperature=2.0, latency_repeats=2, batch_size=5)
    assert [row["variant"] for row in rows] == ["fp32", "int8", "onnx"]
    reference, int8, onnx_row = rows
    assert reference["max_abs_logit_change"] == 0 and reference["auroc_change"] == 0
    assert reference["decision_agreement"] == 1.0 and reference["films"] == 12
    assert reference["parameters"] == sum(p.numel() for p in student.parameters())
    assert reference["serialized_bytes"] == serialized_size(student) and reference["cpu_single_film_ms"] > 0
    assert reference["cpu_single_film_process_ms"] > 0
    assert 0 < int8["max_abs_probability_change"] <= INT8_PROBABILITY_TOLERANCE
    assert onnx_row["max_abs_logit_change"] <= EXPORT_TOLERANCE and onnx_row["nonzero_parameters"] is None
    assert onnx_row["serialized_bytes"] == onnx_file.stat().st_size
    # AUROC from the same logits the table computed (hand check with the rank formula).
    with torch.no_grad():
        p1 = student(pixel_values=x).logits.softmax(-1)[:, 1]
    positives, negatives = p1[labels == 1], p1[labels == 0]
    expected = float((positives[:, None] > negatives[None]).float().mean())
    assert reference["auroc"] == pytest.approx(expected)
    table = format_compression_table(rows)
    assert table.splitlines()[0].startswith("| variant | parameters") and "| int8 |" in table and "d AUROC" in table
    assert all(line.count("|") == table.splitlines()[0].count("|") for line in table.splitlines())  # well-formed
    with pytest.raises(ValueError, match="reference 'bf16' is not one of the models"):
        compression_table(variants, x, reference="bf16")


# ---------------------------------------------------------------------------------------------------------- export


def test_torch_export_parity_calibration_and_nan_rows(student, processor, tmp_path):
    path = export_student(student, tmp_path / "student.pt2", format="torch_export", image_processor=processor)
    program = torch.export.load(path).module()
    for batch in (1, 3):
        x = films(batch, seed=batch)
        logits, probabilities, decisions = eager(student, x)
        out_logits, out_probabilities, out_decisions, finite = program(x)
        assert (out_logits - logits).abs().max().item() <= EXPORT_TOLERANCE
        assert torch.allclose(out_probabilities, torch.softmax(logits / 2.0, dim=-1), atol=1e-6)
        assert torch.equal(out_decisions, (out_probabilities[:, 1] >= 0.3).long()) and torch.equal(out_decisions, decisions)
        assert finite.all()
    x = films(3)
    x[1, 0, 2, 2] = float("nan")
    _, _, out_decisions, finite = program(x)
    assert finite.tolist() == [True, False, True]
    assert out_decisions[1].item() == NOT_TRIAGED and out_decisions[0].item() in (0, 1)
    metadata = load_metadata(path)
    assert metadata["calibration_temperature"] == 2.0 and metadata["decision_threshold"] == 0.3
    assert metadata["image_size"] == IMAGE and metadata["resize_mode"] == "squash"


def test_onnx_parity_dynamic_batch_and_metadata(student, onnx_file):
    session = OnnxTriageModel(onnx_file, threads=1)
    for batch in (1, 3):
        x = films(batch, seed=10 + batch)
        logits, probabilities, decisions = eager(student, x)
        out = session(x)
        assert out["logits"].shape == (batch, 2)
        assert np.abs(out["logits"] - logits.numpy()).max() <= EXPORT_TOLERANCE
        assert np.abs(out["probabilities"] - probabilities.numpy()).max() <= EXPORT_TOLERANCE
        assert out["decisions"].tolist() == decisions.tolist() and out["input_finite"].all()
    x = films(2)
    x[0] = float("inf")
    out = session(x)
    assert out["decisions"][0] == NOT_TRIAGED and out["input_finite"].tolist() == [False, True]

    metadata = session.metadata
    assert metadata == load_metadata(onnx_file)
    assert metadata["image_size"] == IMAGE and metadata["resample"] == "BICUBIC"
    assert metadata["image_mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert metadata["image_std"] == pytest.approx([0.26862954, 0.26130258, 0.27577711])
    assert metadata["do_rescale"] is True and metadata["rescale_factor"] == pytest.approx(1 / 255)
    assert metadata["calibration_temperature"] == 2.0 and metadata["decision_threshold"] == 0.3
    assert metadata["decision_rule"] == "test" and metadata["id2label"] == {"0": "non_urgent", "1": "urgent"}
    assert metadata["text_mode"] == "image_only" and "NaN" not in metadata["input_validation"]
    assert "decisions = -1" in metadata["input_validation"]
    # The recorded processor rebuilds one that gives the same pixel_values.
    rebuilt = QDistillImageProcessor(**metadata["image_processor"])
    film = np.random.default_rng(0).integers(0, 256, (40, 50), dtype=np.uint8)
    original = QDistillImageProcessor(size={"height": IMAGE, "width": IMAGE}, resize_mode="squash")
    assert torch.equal(rebuilt(film)["pixel_values"], original(film)["pixel_values"])
    with pytest.raises(ValueError, match="image_only student: it takes no input_ids"):
        session(films(1), input_ids=torch.ones(1, 3, dtype=torch.long))


def test_onnx_int8_parity(student, onnx_file, tmp_path):
    int8_path = quantize_onnx_int8(onnx_file, tmp_path / "student.int8.onnx")
    session = OnnxTriageModel(int8_path, threads=1)
    x = films(4, seed=7)
    _, probabilities, _ = eager(student, x)
    change = np.abs(session(x)["probabilities"] - probabilities.numpy()).max()
    assert 0 < change <= INT8_PROBABILITY_TOLERANCE
    assert session.metadata["quantization"].startswith("onnxruntime quantize_dynamic")
    assert session.metadata["decision_threshold"] == 0.3


def test_onnx_pseudo_report_student_takes_the_report(pseudo_student, tmp_path):
    path = export_student(pseudo_student, tmp_path / "pseudo.onnx")  # default processor: a warning, 30 px
    session = OnnxTriageModel(path, threads=1)
    assert session.input_names == ["pixel_values", "input_ids", "attention_mask"]
    for batch, length in ((1, 5), (3, 11)):
        x = films(batch)
        input_ids, attention_mask = reports(batch, length)
        if batch == 1:
            attention_mask = torch.ones_like(input_ids)
            input_ids = torch.tensor([[2, 7, 8, 9, 3]])
        logits, _, decisions = eager(pseudo_student, x, input_ids=input_ids, attention_mask=attention_mask)
        out = session(x, input_ids, attention_mask)
        assert np.abs(out["logits"] - logits.numpy()).max() <= EXPORT_TOLERANCE, (batch, length)
        assert out["decisions"].tolist() == decisions.tolist()
    assert session.metadata["text_mode"] == "pseudo_report" and "input_ids" in session.metadata["inputs"]
    with pytest.raises(ValueError, match="pseudo_report student: pass input_ids"):
        session(films(1))


def test_export_refuses_what_it_cannot_describe(student, pseudo_student, tmp_path):
    with pytest.raises(ValueError, match="format must be one of"):
        export_student(student, tmp_path / "s.bin", format="tflite")
    with pytest.raises(ValueError, match="batch_size must be 'dynamic' or a positive integer"):
        export_student(student, tmp_path / "s.onnx", batch_size=0)
    teacher = QDistillTeacherModel(teacher_config())
    with pytest.raises(ValueError, match="exports a Q-DISTILL student .* QDistillTeacherModel"):
        export_student(teacher, tmp_path / "t.onnx")
    with pytest.raises(ValueError, match="resizes to 224x224 but the model's vision encoder takes 30x30"):
        export_student(student, tmp_path / "s.onnx", image_processor=QDistillImageProcessor())
    assert not (tmp_path / "s.onnx").exists()


def test_fixed_batch_torch_export(student, tmp_path):
    path = export_student(student, tmp_path / "fixed.pt2", format="torch_export", batch_size=2)
    program = torch.export.load(path).module()
    x = films(2)
    assert (program(x)[0] - eager(student, x)[0]).abs().max().item() <= EXPORT_TOLERANCE
    with pytest.raises(Exception):
        program(films(3))
    assert math.isclose(load_metadata(path)["calibration_temperature"], 2.0)


def test_export_student_script_writes_the_files_and_the_table(student, processor, tmp_path):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "export_student.py"
    spec = importlib.util.spec_from_file_location("export_student", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    folder = tmp_path / "student"
    student.save_pretrained(folder)
    processor.save_pretrained(folder)
    rows = module.main(["--model", str(folder), "--output_dir", str(tmp_path / "out"), "--formats", "onnx",
                        "--table_split", "random:3", "--latency_repeats", "1", "--prune", "0.2"])
    assert [row["variant"] for row in rows] == ["fp32", "int8 (torch.ao dynamic)", "pruned 20% (L1, per layer)",
                                                "onnx", "onnx int8"]
    assert rows[3]["max_abs_logit_change"] <= EXPORT_TOLERANCE and "auroc" not in rows[0]
    saved = json.loads((tmp_path / "out" / "compression.json").read_text())
    assert saved["rows"] == rows and (tmp_path / "out" / "compression.md").read_text().startswith("| variant |")
    assert load_metadata(tmp_path / "out" / "student.int8.onnx")["resize_mode"] == "squash"
