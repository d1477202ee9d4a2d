import pytest
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
from transformers import AutoConfig, CLIPVisionConfig

from qdistill_hf import QDistillStudentConfig, QDistillTeacherConfig, QFormerConfig
from tiny_models import student_config, teacher_config


def test_teacher_defaults_match_chexzero_and_the_original():
    config = QDistillTeacherConfig()
    vision = config.vision_config
    assert isinstance(vision, CLIPVisionConfig)
    assert (vision.image_size, vision.patch_size, vision.hidden_size, vision.num_hidden_layers) == (224, 32, 768, 12)
    assert (vision.num_attention_heads, vision.intermediate_size, vision.hidden_act, vision.projection_dim) == (
        12, 3072, "quick_gelu", 512,
    )
    qformer = config.qformer_config
    assert (qformer.num_query_tokens, qformer.num_hidden_layers, qformer.num_attention_heads, qformer.hidden_size) == (
        12, 4, 12, 768,
    )
    assert (config.itc_loss_weight, config.itm_loss_weight, config.cls_loss_weight) == (0.45, 0.45, 0.1)
    assert config.focal_gamma == 2.0 and config.temperature_init == 0.07 and config.query_selection == "softmax"
    assert config.id2label == {0: "non_urgent", 1: "urgent"} and config.label2id == {"non_urgent": 0, "urgent": 1}


def test_encoder_hidden_size_is_derived_from_the_vision_config():
    config = QDistillTeacherConfig(vision_config={"hidden_size": 64, "num_attention_heads": 4}, qformer_config={"encoder_hidden_size": 5})
    assert config.qformer_config.encoder_hidden_size == 64
    student = QDistillStudentConfig(vision_config={"hidden_size": 48, "num_attention_heads": 4})
    assert student.qformer_config.encoder_hidden_size == 48


def test_student_defaults_are_lightweight_and_text_mode_sets_the_text_stream():
    config = QDistillStudentConfig()
    assert (config.qformer_config.hidden_size, config.qformer_config.num_hidden_layers) == (384, 2)
    assert config.qformer_config.num_query_tokens == 8 and config.qformer_config.use_text_input
    assert not QDistillStudentConfig(text_mode="image_only").qformer_config.use_text_input


def test_partial_student_qformer_dict_keeps_the_student_sizes():
    # Setting only the tokenizer's vocabulary must not fall back to QFormerConfig's teacher-sized defaults.
    qformer = QDistillStudentConfig(qformer_config={"vocab_size": 2000, "num_query_tokens": 4}).qformer_config
    assert (qformer.vocab_size, qformer.num_query_tokens) == (2000, 4)
    assert (qformer.hidden_size, qformer.num_hidden_layers, qformer.num_attention_heads) == (384, 2, 6)
    assert qformer.intermediate_size == 1536
    assert QDistillTeacherConfig(qformer_config={"vocab_size": 2000}).qformer_config.hidden_size == 768


@pytest.mark.parametrize("factory", [teacher_config, student_config])
def test_round_trip_with_sub_configs(tmp_path, factory):
    config = factory(focal_alpha=[0.25, 0.75], id2label={0: "routine", 1: "urgent"})
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is type(config)
    assert loaded.to_diff_dict() == config.to_diff_dict()
    assert loaded.vision_config.to_dict() == config.vision_config.to_dict()
    assert isinstance(loaded.vision_config, CLIPVisionConfig) and isinstance(loaded.qformer_config, QFormerConfig)
    assert loaded.id2label == {0: "routine", 1: "urgent"} and loaded.focal_alpha == [0.25, 0.75]
    # The Q-Former sub-config can be extracted on its own through `base_config_key`.
    sub = QFormerConfig.from_pretrained(tmp_path)
    assert sub.to_dict() == config.qformer_config.to_dict()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"qformer_config": {"hidden_size": 100}}, r"`hidden_size` \(100\) must be divisible by `num_attention_heads`"),
        ({"focal_alpha": [1.0]}, r"`focal_alpha` has 1 entries but `num_labels` is 2"),
        ({"focal_alpha": [1.0, -1.0]}, r"`focal_alpha` weights must be > 0"),
        ({"query_selection": "mean"}, r"`query_selection` must be one of"),
        ({"temperature_init": 0.001}, r"below the logit-scale bound"),
        ({"itm_loss_weight": -1.0}, r"`itm_loss_weight` must be >= 0"),
        ({"qformer_config": {"num_query_tokens": 0}}, r"`num_query_tokens` must be a positive integer"),
        ({"qformer_config": {"pad_token_id": 500, "vocab_size": 99}}, r"`pad_token_id` \(500\) must be in"),
        ({"id2label": {0: "a", 2: "b"}}, r"`id2label` keys must be 0..1"),
    ],
)
def test_bad_teacher_configs_name_the_field(kwargs, message):
    with pytest.raises((StrictDataclassClassValidationError, ValueError), match=message):
        QDistillTeacherConfig(**kwargs)


def test_bad_types_and_student_modes_raise():
    with pytest.raises(StrictDataclassFieldValidationError, match="embed_dim"):
        QDistillTeacherConfig(embed_dim="big")
    with pytest.raises(StrictDataclassClassValidationError, match="`text_mode` must be one of"):
        QDistillStudentConfig(text_mode="report")


def test_a_config_dict_of_another_model_type_is_refused_naming_both_types():
    teacher_dict = teacher_config().to_dict()
    assert type(QDistillTeacherConfig.from_dict(teacher_dict)) is QDistillTeacherConfig
    with pytest.raises(ValueError, match="model_type `qdistill_teacher`, but QDistillStudentConfig is model_type `qdistill_student`"):
        QDistillStudentConfig.from_dict(teacher_dict)
    with pytest.raises(ValueError, match="model_type `bert`, but QDistillTeacherConfig"):
        QDistillTeacherConfig.from_dict({**teacher_dict, "model_type": "bert"})


def test_calibration_fields_round_trip_and_drive_decisions(tmp_path):
    import torch

    from qdistill_hf import QDistillStudentModel
    from tiny_models import student_config

    config = student_config(text_mode="image_only")
    config.calibration_temperature = 2.0
    config.decision_threshold = 0.3
    config.decision_rule = "sensitivity >= 0.90 on validation (n=10)"
    model = QDistillStudentModel(config)
    model.save_pretrained(tmp_path)
    loaded = QDistillStudentModel.from_pretrained(tmp_path)
    assert loaded.config.calibration_temperature == 2.0
    assert loaded.config.decision_threshold == 0.3
    assert loaded.config.decision_rule == config.decision_rule
    logits = torch.tensor([[0.0, 2.0], [1.0, 0.0], [0.0, -1.0]])
    probs = loaded.triage_probabilities(logits)
    # softmax(logits / 2): p(class 1) = sigmoid((l1 - l0) / 2)
    expected = torch.sigmoid(torch.tensor([1.0, -0.5, -0.5]))
    torch.testing.assert_close(probs[:, 1], expected)
    # threshold 0.3: sigmoid(-0.5) = 0.378 >= 0.3 -> urgent, although argmax says class 0
    assert loaded.triage_decisions(probs).tolist() == [1, 1, 1]
    loaded.config.decision_threshold = None
    assert loaded.triage_decisions(probs).tolist() == [1, 0, 0]


def test_calibration_fields_are_checked():
    import pytest

    from tiny_models import student_config

    with pytest.raises(StrictDataclassClassValidationError, match="calibration_temperature"):
        student_config(calibration_temperature=0.0)
    with pytest.raises(StrictDataclassClassValidationError, match="decision_threshold"):
        student_config(decision_threshold=1.5)
