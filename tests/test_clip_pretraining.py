"""examples/run_clip_pretraining.py: the duplicate-aware contrastive loss (equal to CLIPModel's own loss without
duplicates, hand-computed with them), a few training steps whose loss falls on a repeated batch, and the saved
`vision_model/` plugging into the teacher (run_teacher.py --vision_model_name_or_path) and from it the student."""

import json
import math
from pathlib import Path

import pytest
import torch

from test_example_scripts import TINY_QFORMER, _load, _run


REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = REPO_ROOT / "examples"
COMMON = ["--dataset_name", "synthetic", "--dataloader_pin_memory", "false", "--report_to", "none",
          "--logging_steps", "1", "--save_total_limit", "1"]
TINY_CLIP = ["--image_size", "64", "--vision_hidden_size", "32", "--vision_intermediate_size", "64",
             "--vision_num_hidden_layers", "1", "--vision_num_attention_heads", "2", "--text_hidden_size", "32",
             "--text_intermediate_size", "64", "--text_num_hidden_layers", "1", "--text_num_attention_heads", "2",
             "--projection_dim", "16", "--vocab_size", "300", "--tokenizer_min_frequency", "1"]


@pytest.fixture
def clip_script(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return _load(EXAMPLES / "run_clip_pretraining.py", "run_clip_pretraining")


# ------------------------------------------------------------------------------------------------ the loss


def test_loss_is_clipmodels_own_without_duplicates(clip_script):
    from transformers import CLIPModel

    from qdistill_hf.models.tokenization_qdistill import train_report_tokenizer

    tokenizer = train_report_tokenizer(["clear lungs", "small right effusion", "enlarged heart", "no pneumothorax"],
                                       vocab_size=200, min_frequency=1, model_max_length=16)
    args = clip_script.ClipModelArguments(
        image_size=64, vision_hidden_size=32, vision_intermediate_size=64, vision_num_hidden_layers=1,
        vision_num_attention_heads=2, text_hidden_size=32, text_intermediate_size=64, text_num_hidden_layers=1,
        text_num_attention_heads=2, projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(clip_script.clip_config(args, tokenizer)).eval()
    assert model.config.text_config.vocab_size == len(tokenizer) and model.config.text_config.eos_token_id == 3
    texts = tokenizer(["clear lungs", "small right effusion", "enlarged heart", "no pneumothorax"], padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        outputs = model(input_ids=texts["input_ids"], attention_mask=texts["attention_mask"],
                        pixel_values=torch.randn(4, 3, 64, 64), return_loss=True)
    groups = clip_script.report_groups(texts["input_ids"], texts["attention_mask"])
    assert groups.tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(clip_script.duplicate_aware_loss(outputs, groups), outputs.loss)
    # Under gradient accumulation over 2 such batches, each contributes half.
    torch.testing.assert_close(clip_script.duplicate_aware_loss(outputs, groups, num_items_in_batch=8),
                               outputs.loss / 2)


def test_duplicate_reports_are_positives_hand_computed(clip_script):
    logits = torch.tensor([[2.0, 1.0, 0.0], [1.0, 3.0, 0.0], [0.0, 0.0, 1.0]])  # rows: films, columns: reports
    groups = torch.tensor([0, 0, 2])  # films 0 and 1 carry the same report
    e = math.exp
    # Films: 0 and 1 target reports {0, 1} with 1/2 each; film 2 targets report 2.
    film0 = -0.5 * (math.log(e(2) / (e(2) + e(1) + 1)) + math.log(e(1) / (e(2) + e(1) + 1)))
    film1 = -0.5 * (math.log(e(1) / (e(1) + e(3) + 1)) + math.log(e(3) / (e(1) + e(3) + 1)))
    film2 = -math.log(e(1) / (1 + 1 + e(1)))
    # Reports (columns of logits): the same targets, by symmetry.
    report0 = -0.5 * (math.log(e(2) / (e(2) + e(1) + 1)) + math.log(e(1) / (e(2) + e(1) + 1)))
    report1 = -0.5 * (math.log(e(1) / (e(1) + e(3) + 1)) + math.log(e(3) / (e(1) + e(3) + 1)))
    report2 = -math.log(e(1) / (1 + 1 + e(1)))
    expected = ((film0 + film1 + film2) / 3 + (report0 + report1 + report2) / 3) / 2
    assert clip_script.contrastive_loss_with_duplicates(logits, groups).item() == pytest.approx(expected, rel=1e-6)
    # A model that has learnt nothing scores log(batch) whatever the duplicates.
    flat = clip_script.contrastive_loss_with_duplicates(torch.zeros(3, 3), groups)
    assert flat.item() == pytest.approx(math.log(3))


def test_report_groups_compare_token_ids_not_padding(clip_script):
    input_ids = torch.tensor([[2, 7, 3, 0], [2, 8, 9, 3], [2, 7, 3, 5], [2, 8, 9, 3]])
    attention_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]])
    assert clip_script.report_groups(input_ids, attention_mask).tolist() == [0, 1, 0, 1]
    assert clip_script.chance_loss(20, 16) == pytest.approx((16 * math.log(16) + 4 * math.log(4)) / 20)
    assert clip_script.chance_loss(32, 16) == pytest.approx(math.log(16))


def test_collator_groups_identical_reports_and_names_missing_ones(clip_script):
    from PIL import Image

    from qdistill_hf import QDistillImageProcessor, QDistillProcessor
    from qdistill_hf.models.tokenization_qdistill import train_report_tokenizer

    tokenizer = train_report_tokenizer(["Normal chest.", "Right effusion."], vocab_size=200, min_frequency=1,
                                       model_max_length=16)
    processor = QDistillProcessor(image_processor=QDistillImageProcessor(size={"height": 32, "width": 32}),
                                  tokenizer=tokenizer)
    rows = [{"study_id": f"s{i}", "image": Image.new("L", (40, 40), 60 * i), "report": report}
            for i, report in enumerate(["Normal chest.", "normal  CHEST.", "Right effusion."])]
    batch = clip_script.ClipCollator(processor, "positives")(rows)
    assert batch["pixel_values"].shape == (3, 3, 32, 32) and batch["return_loss"] is True
    assert batch["labels"].tolist() == [0, 0, 2]  # the tokenizer lower-cases: rows 0 and 1 read the same
    plain = clip_script.ClipCollator(processor, "ignore")(rows)
    assert "labels" not in plain and plain["return_loss"] is True
    rows[2]["report"] = "  "
    with pytest.raises(ValueError, match="study 's2' has no report text"):
        clip_script.ClipCollator(processor, "positives")(rows)


def test_arguments_are_checked(clip_script):
    with pytest.raises(ValueError, match="--image_size 100 is not a multiple of --patch_size 32"):
        clip_script.ClipModelArguments(image_size=100)
    with pytest.raises(ValueError, match="--text_hidden_size 30 is not divisible by --text_num_attention_heads 8"):
        clip_script.ClipModelArguments(text_hidden_size=30)


def test_extra_reports_lose_held_out_texts(clip_script, tmp_path):
    import datasets

    path = tmp_path / "extra.jsonl"
    path.write_text("\n".join(json.dumps({"report": text}) for text in ["Clear  lungs.", "Effusion.", "Cardiomegaly."]))
    splits = {"train": datasets.Dataset.from_dict({"report": ["Effusion."]}),
              "validation": datasets.Dataset.from_dict({"report": ["Clear lungs."]})}
    assert clip_script.extra_report_texts(str(path), "report", splits) == ["Effusion.", "Cardiomegaly."]


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    """16 training films in one batch of 16, 10 epochs: the same batch every step."""
    root = tmp_path_factory.mktemp("clip_pretraining")
    out = root / "clip"
    result = _run([EXAMPLES / "run_clip_pretraining.py", *COMMON, *TINY_CLIP,
                "--dataset_config", '{"num_train": 16, "num_validation": 16, "num_test": 16}',
                "--cache_dir", root / "cache", "--output_dir", out, "--num_train_epochs", "10",
                "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "16", "--learning_rate", "2e-3",
                "--warmup_steps", "0", "--lr_scheduler_type", "constant"], cwd=root)
    return root, out, result.stdout + result.stderr


def test_clip_pretraining_loss_falls_on_a_repeated_batch(clip_run):
    from transformers import AutoProcessor, CLIPModel, CLIPVisionModel

    import qdistill_hf  # noqa: F401  (registers the processor classes)

    _, out, log = clip_run
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == 10 and all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0] - 0.5 and losses[-1] < math.log(16) - 0.5, losses  # below chance: it learnt
    retrieval = json.loads((out / "retrieval_results.json").read_text())
    assert retrieval["train_batch_chance_loss"] == pytest.approx(math.log(16))
    assert retrieval["first_logged_train_loss"] == losses[0] and retrieval["last_logged_train_loss"] == losses[-1]
    assert 0.0 <= retrieval["recall_at_5"] <= 1.0 and 1 <= retrieval["distinct_reports"] <= 16
    assert "chance log(16)" in log

    model = CLIPModel.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert model.config.text_config.vocab_size == len(processor.tokenizer)
    assert model.logit_scale.item() <= math.log(100) + 1e-6
    vision = CLIPVisionModel.from_pretrained(out / "vision_model")
    for name, tensor in model.vision_model.state_dict().items():
        assert torch.equal(tensor, vision.state_dict()[name]), name
    assert json.loads((out / "vision_model" / "preprocessor_config.json").read_text())["size"]["height"] == 64


def test_vision_tower_plugs_into_teacher_and_student(clip_run):
    from transformers import AutoModel, AutoProcessor, CLIPVisionModel

    import qdistill_hf  # noqa: F401  (registers the Auto classes)

    root, out, _ = clip_run
    vision = CLIPVisionModel.from_pretrained(out / "vision_model")
    data = [*COMMON, "--dataset_config", '{"num_train": 32, "num_validation": 16, "num_test": 16}',
            "--cache_dir", root / "cache", "--use_feature_cache", "true", "--num_train_epochs", "1",
            "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "16"]
    teacher_dir, student_dir = root / "teacher", root / "student"
    _run([EXAMPLES / "run_teacher.py", *data, *TINY_QFORMER, "--vision_model_name_or_path", out / "vision_model",
          "--output_dir", teacher_dir, "--vocab_size", "300", "--tokenizer_min_frequency", "1",
          "--model_max_length", "64", "--embed_dim", "16"], cwd=root)
    _run([EXAMPLES / "run_distillation.py", *data, *TINY_QFORMER, "--teacher_model_name_or_path", teacher_dir,
          "--output_dir", student_dir, "--text_mode", "image_only"], cwd=root)
    for folder, model_type in ((teacher_dir, "qdistill_teacher"), (student_dir, "qdistill_student")):
        model = AutoModel.from_pretrained(folder)
        assert model.config.model_type == model_type
        assert model.config.vision_config.hidden_size == 32 and model.config.vision_config.image_size == 64
        torch.testing.assert_close(model.vision_model.embeddings.patch_embedding.weight,
                                   vision.embeddings.patch_embedding.weight, rtol=0, atol=0)
        for name, tensor in vision.state_dict().items():
            assert torch.equal(model.vision_model.state_dict()[name], tensor), (folder.name, name)
    # The teacher took the vision folder's image processor (64 px), which the student inherits.
    for folder in (teacher_dir, student_dir):
        assert AutoProcessor.from_pretrained(folder).image_processor.size.height == 64
