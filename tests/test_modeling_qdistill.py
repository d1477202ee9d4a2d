import json
import re

import pytest
import torch
import torch.nn.functional as F

from qdistill_hf import (
    QDistillQFormerModel,
    QDistillStudentConfig,
    QDistillStudentModel,
    QDistillTeacherConfig,
    QDistillTeacherModel,
)
from qdistill_hf.models.loss_qdistill import report_positive_mask, sample_hard_negatives
from tiny_models import NUM_IMAGE_TOKENS, report_batch, student_config, teacher_config


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.fixture
def teacher():
    torch.manual_seed(0)
    return QDistillTeacherModel(teacher_config())


class TestTeacher:
    def test_shapes_with_pixels_report_labels_and_losses(self, teacher):
        pixel_values, input_ids, attention_mask, labels = report_batch()
        out = teacher(
            pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, labels=labels,
            return_loss=True, generator=torch.Generator().manual_seed(0),
        )
        assert out.image_features.shape == (4, NUM_IMAGE_TOKENS, 32)
        assert out.query_output_unimodal.shape == out.query_output_bidirectional.shape == (4, 4, 32)
        assert out.image_embeds.shape == (4, 4, 16) and out.text_embeds.shape == (4, 16)
        assert torch.allclose(out.image_embeds.norm(dim=-1), torch.ones(4, 4), atol=1e-5)
        assert out.text_output.shape == (4, 6, 32)
        assert out.logits.shape == (4, 2) and out.logits_per_image.shape == (4, 4)
        assert torch.equal(out.logits_per_text, out.logits_per_image.t())
        # Reports 0 and 2 are identical, so every image and every report still has a hard negative: 4 + 4 + 4 pairs.
        assert out.itm_logits.shape == (12, 2) and out.itm_labels.tolist() == [1] * 4 + [0] * 8
        for part in (out.loss_itc, out.loss_itm, out.loss_cls):
            assert part.ndim == 0 and torch.isfinite(part)
        expected = 0.45 * out.loss_itc + 0.45 * out.loss_itm + 0.1 * out.loss_cls
        assert torch.allclose(out.loss, expected)

    def test_cached_features_give_the_same_outputs_as_pixels(self, teacher):
        teacher.eval()
        pixel_values, input_ids, attention_mask, _ = report_batch()
        from_pixels = teacher(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
        features = teacher.vision_model(pixel_values=pixel_values).last_hidden_state
        from_cache = teacher(image_features=features, input_ids=input_ids, attention_mask=attention_mask)
        assert torch.allclose(from_pixels.logits, from_cache.logits, atol=1e-6)
        assert from_pixels.loss is None and from_pixels.itm_logits.shape == (4, 2)

    def test_image_only_call_returns_queries_and_no_text_outputs(self, teacher):
        out = teacher(image_features=torch.randn(3, NUM_IMAGE_TOKENS, 32))
        assert out.query_output_unimodal.shape == (3, 4, 32)
        assert out.logits is None and out.text_embeds is None and out.loss is None
        with pytest.raises(ValueError, match="losses need the report"):
            teacher(image_features=torch.randn(3, NUM_IMAGE_TOKENS, 32), labels=torch.tensor([0, 1, 0]))

    def test_padding_does_not_change_outputs(self, teacher):
        teacher.eval()
        features = torch.randn(2, NUM_IMAGE_TOKENS, 32, generator=torch.Generator().manual_seed(1))
        ids = torch.tensor([[2, 11, 12, 3], [2, 21, 3, 0]])
        padded = torch.cat([ids, torch.zeros(2, 5, dtype=torch.long)], dim=1)
        short = teacher(image_features=features, input_ids=ids, attention_mask=(ids != 0).long())
        long = teacher(image_features=features, input_ids=padded, attention_mask=(padded != 0).long())
        assert torch.allclose(short.logits, long.logits, atol=1e-5)
        assert torch.allclose(short.text_embeds, long.text_embeds, atol=1e-5)
        assert torch.allclose(short.query_output_bidirectional, long.query_output_bidirectional, atol=1e-5)

    def test_text_feed_forward_skips_padding_exactly(self, teacher):
        from torch.utils.flop_counter import FlopCounterMode

        teacher.eval()
        ids = torch.tensor([[2, 11, 12, 13, 3]])
        padded = torch.cat([ids, torch.zeros(1, 7, dtype=torch.long)], dim=1)
        dense = teacher.qformer(input_ids=ids)  # no padding: the feed-forward runs on every position
        with FlopCounterMode(display=False) as counter:
            sparse = teacher.qformer(input_ids=padded, attention_mask=(padded != 0).long())
        assert torch.allclose(dense.text_output, sparse.text_output[:, :5], atol=1e-6)
        with FlopCounterMode(display=False) as full_counter:
            teacher.qformer(input_ids=padded, attention_mask=torch.ones_like(padded))
        # 2 layers x text FFN (32 -> 37 -> 32) x 7 padding positions x 2 FLOPs per multiply-add, never computed.
        assert full_counter.get_total_flops() - counter.get_total_flops() >= 2 * 7 * 2 * (2 * 32 * 37)

    def test_unimodal_mask_equals_independent_passes(self, teacher):
        teacher.eval()
        qformer = teacher.qformer
        features = torch.randn(2, NUM_IMAGE_TOKENS, 32)
        queries = teacher.query_tokens.expand(2, -1, -1)
        ids = torch.tensor([[2, 11, 12, 3], [2, 21, 3, 0]])
        mask = (ids != 0).long()
        joint = qformer(query_embeds=queries, input_ids=ids, attention_mask=mask, encoder_hidden_states=features,
                        attention_mode="unimodal")
        alone_q = qformer(query_embeds=queries, encoder_hidden_states=features).query_output
        alone_t = qformer(input_ids=ids, attention_mask=mask).text_output
        assert torch.allclose(joint.query_output, alone_q, atol=1e-5)
        assert torch.allclose(joint.text_output[0], alone_t[0], atol=1e-5)
        assert torch.allclose(joint.text_output[1, :3], alone_t[1, :3], atol=1e-5)
        bidirectional = qformer(query_embeds=queries, input_ids=ids, attention_mask=mask, encoder_hidden_states=features)
        assert not torch.allclose(bidirectional.query_output, alone_q, atol=1e-3)

    def test_attentions_on_request(self, teacher):
        teacher.eval()
        pixel_values, input_ids, attention_mask, _ = report_batch()
        out = teacher(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                      output_attentions=True)
        assert len(out.attentions) == 2 and len(out.cross_attentions) == 2
        assert out.attentions[0].shape == (4, 4, 10, 10) and out.attentions[1].shape == (4, 4, 4, 10)
        assert out.cross_attentions[0].shape == (4, 4, 4, NUM_IMAGE_TOKENS)
        assert torch.allclose(out.attentions[0].sum(-1), torch.ones(4, 4, 10), atol=1e-5)
        # Padding keys get no attention: report 0 has 4 real tokens of 6.
        assert out.attentions[0][0, :, :, 4 + 4 :].abs().max() == 0
        plain = teacher(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
        assert plain.attentions is None and torch.allclose(plain.logits, out.logits, atol=1e-5)
        student = QDistillStudentModel(student_config(text_mode="image_only")).eval()
        student_out = student(pixel_values=pixel_values, output_attentions=True)
        assert student_out.cross_attentions[0].shape == (4, 2, 3, NUM_IMAGE_TOKENS)

    def test_query_output_only_is_exact(self, teacher):
        teacher.eval()
        queries = teacher.query_tokens.expand(2, -1, -1)
        ids = torch.tensor([[2, 11, 12, 3], [2, 21, 3, 0]])
        kwargs = dict(query_embeds=queries, input_ids=ids, attention_mask=(ids != 0).long(),
                      encoder_hidden_states=torch.randn(2, NUM_IMAGE_TOKENS, 32))
        full = teacher.qformer(**kwargs, output_attentions=True)
        fast = teacher.qformer(**kwargs, query_output_only=True, output_attentions=True)
        assert fast.text_output is None and fast.last_hidden_state.shape == (2, 4, 32)
        assert torch.allclose(fast.query_output, full.query_output, atol=1e-6)
        assert torch.allclose(fast.attentions[-1], full.attentions[-1][:, :, :4], atol=1e-6)
        assert torch.equal(fast.attentions[0], full.attentions[0])

    def test_itm_pairs_are_image_with_negative_report_and_negative_image_with_report(self, teacher):
        teacher.eval()
        _, input_ids, attention_mask, labels = report_batch()
        features = torch.randn(4, NUM_IMAGE_TOKENS, 32, generator=torch.Generator().manual_seed(2))
        out = teacher(image_features=features, input_ids=input_ids, attention_mask=attention_mask, return_loss=True,
                      generator=torch.Generator().manual_seed(3))
        # The same draws, in the model's order: a negative report per image, then a negative image per report.
        positives = report_positive_mask(input_ids, attention_mask)
        generator = torch.Generator().manual_seed(3)
        neg_text = sample_hard_negatives(out.logits_per_image, positives, generator)[0]
        neg_image = sample_hard_negatives(out.logits_per_text, positives.t(), generator)[0]
        assert not positives[torch.arange(4), neg_text].any() and not positives[neg_image, torch.arange(4)].any()
        pairs = [(i, i) for i in range(4)] + [(i, int(neg_text[i])) for i in range(4)]
        pairs += [(int(neg_image[j]), j) for j in range(4)]
        # Each pair scored on its own (image a, report b) must give the batched ITM logits.
        for row, (a, b) in enumerate(pairs):
            alone = teacher(image_features=features[a : a + 1], input_ids=input_ids[b : b + 1],
                            attention_mask=attention_mask[b : b + 1]).itm_logits[0]
            assert torch.allclose(out.itm_logits[row], alone, atol=1e-5), (row, a, b)
        assert out.itm_labels.tolist() == [1] * 4 + [0] * 8

    def test_itm_is_skipped_not_trained_on_positives_when_no_negative_exists(self, teacher):
        features = torch.randn(3, NUM_IMAGE_TOKENS, 32)
        same = torch.tensor([[2, 11, 3]] * 3)
        out = teacher(image_features=features, input_ids=same, return_loss=True)
        # Fixed shapes: the 3B pair slots exist, all with weight 0, and the loss is reported as skipped.
        assert out.loss_itm is None and out.itm_logits.shape == (9, 2)
        assert out.itm_weights.tolist() == [0.0] * 9
        assert torch.allclose(out.loss, 0.45 * out.loss_itc)
        single = teacher(image_features=features[:1], input_ids=same[:1], labels=torch.tensor([1]), return_loss=True)
        assert single.loss_itc is None and single.loss_itm is None
        assert torch.allclose(single.loss, 0.1 * single.loss_cls)

    def test_gradients_reach_queries_and_heads_never_the_frozen_encoder(self, teacher, tmp_path):
        def check(model):
            model.train()
            assert not model.vision_model.training
            model.zero_grad()
            pixel_values, input_ids, attention_mask, labels = report_batch()
            model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                  return_loss=True).loss.backward()
            for name in ("query_tokens", "logit_scale", "itm_head.weight", "classifier.weight",
                         "vision_projection.weight", "text_projection.weight", "qformer.word_embeddings.weight"):
                grad = model.get_parameter(name).grad
                assert grad is not None and grad.abs().sum() > 0, name
            assert all(p.grad is None and not p.requires_grad for p in model.vision_model.parameters())

        check(teacher)
        teacher.save_pretrained(tmp_path)
        check(QDistillTeacherModel.from_pretrained(tmp_path))

    def test_unfreezing_the_encoder(self):
        model = QDistillTeacherModel(teacher_config(freeze_vision_encoder=False))
        model.train()
        assert model.vision_model.training and all(p.requires_grad for p in model.vision_model.parameters())
        pixel_values, input_ids, attention_mask, labels = report_batch()
        model(pixel_values=pixel_values, input_ids=input_ids, labels=labels).loss.backward()
        assert model.vision_model.embeddings.patch_embedding.weight.grad is not None

    def test_save_and_load_give_identical_outputs(self, teacher, tmp_path):
        teacher.save_pretrained(tmp_path)
        loaded = QDistillTeacherModel.from_pretrained(tmp_path)
        teacher.eval()
        pixel_values, input_ids, attention_mask, _ = report_batch()
        with torch.no_grad():
            a = teacher(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
            b = loaded(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
        for name in ("logits", "logits_per_image", "itm_logits", "image_embeds", "text_embeds"):
            assert torch.allclose(a[name], b[name], atol=1e-6), name

    def test_eval_is_deterministic_and_tuple_output_matches(self, teacher):
        teacher.eval()
        pixel_values, input_ids, attention_mask, _ = report_batch()
        a = teacher(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
        b = teacher(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, return_dict=False)
        assert isinstance(b, tuple) and torch.equal(a.logits, b[0])

    def test_bad_inputs_raise_clear_errors(self, teacher):
        pixel_values, input_ids, attention_mask, labels = report_batch()
        with pytest.raises(ValueError, match="exactly one of `pixel_values` or `image_features`"):
            teacher(pixel_values=pixel_values, image_features=torch.randn(4, NUM_IMAGE_TOKENS, 32))
        with pytest.raises(ValueError, match=r"image_features must have shape \(batch_size, tokens, 32\)"):
            teacher(image_features=torch.randn(4, NUM_IMAGE_TOKENS, 31))
        with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 99\)"):
            teacher(pixel_values=pixel_values, input_ids=input_ids + 95)
        with pytest.raises(ValueError, match="at most max_position_embeddings=40"):
            teacher(pixel_values=pixel_values[:1], input_ids=torch.ones(1, 41, dtype=torch.long))
        with pytest.raises(ValueError, match=r"labels must be class ids in \[0, 2\)"):
            teacher(pixel_values=pixel_values, input_ids=input_ids, labels=torch.tensor([0, 1, -1, 0]))
        with pytest.raises(ValueError, match=r"Reports at batch rows \[1\] have no real token"):
            teacher(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask * torch.tensor([[1], [0], [1], [1]]))
        with pytest.raises(ValueError, match="input_ids has batch size 2 but the images have 4"):
            teacher(pixel_values=pixel_values, input_ids=input_ids[:2])

    def test_non_finite_loss_raises(self, teacher):
        with torch.no_grad():
            teacher.classifier.weight.fill_(float("inf"))
        pixel_values, input_ids, attention_mask, labels = report_batch()
        with pytest.raises(FloatingPointError, match="Non-finite loss"):
            teacher(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def test_logit_scale_has_one_named_bound(self, teacher):
        with torch.no_grad():
            teacher.logit_scale.fill_(10.0)
        teacher.clamp_logit_scale()
        assert teacher.logit_scale.item() == pytest.approx(torch.log(torch.tensor(100.0)).item())
        assert QDistillTeacherModel(teacher_config(learnable_temperature=False)).logit_scale.requires_grad is False

    def test_fixed_temperature_stays_fixed_after_from_pretrained(self, tmp_path):
        QDistillTeacherModel(teacher_config(learnable_temperature=False)).save_pretrained(tmp_path)
        loaded = QDistillTeacherModel.from_pretrained(tmp_path)
        assert loaded.logit_scale.requires_grad is False
        assert "logit_scale" not in {name for name, p in loaded.named_parameters() if p.requires_grad}

    def test_query_tokens_are_initialised_randomly(self, teacher):
        assert teacher.query_tokens.std() > 0.005
        assert teacher.logit_scale.item() == pytest.approx(torch.log(torch.tensor(1 / 0.07)).item(), abs=1e-6)


class TestStudent:
    @pytest.mark.parametrize("text_mode", ["pseudo_report", "image_only"])
    def test_shapes_and_loss(self, text_mode):
        model = QDistillStudentModel(student_config(text_mode=text_mode))
        pixel_values, input_ids, attention_mask, labels = report_batch()
        text = dict(input_ids=input_ids, attention_mask=attention_mask) if text_mode == "pseudo_report" else {}
        out = model(pixel_values=pixel_values, labels=labels, **text)
        assert out.logits.shape == (4, 2) and out.pooled_output.shape == (4, 16)
        assert out.projected_output.shape == (4, 32) and out.query_output.shape == (4, 3, 16)
        assert out.loss.ndim == 0
        out.loss.backward()
        assert model.query_tokens.grad is not None and model.classifier.weight.grad is not None
        assert all(p.grad is None for p in model.vision_model.parameters())
        assert (model.qformer.word_embeddings is None) == (text_mode == "image_only")

    def test_text_mode_contract(self):
        pixel_values, input_ids, _, _ = report_batch()
        with pytest.raises(ValueError, match="is `image_only`: it takes no `input_ids`"):
            QDistillStudentModel(student_config(text_mode="image_only"))(pixel_values=pixel_values, input_ids=input_ids)
        with pytest.raises(ValueError, match="pass `input_ids` of the generated report"):
            QDistillStudentModel(student_config())(pixel_values=pixel_values)

    def test_save_and_load_round_trip_keeps_encoder_frozen(self, tmp_path):
        model = QDistillStudentModel(student_config(text_mode="image_only")).eval()
        model.save_pretrained(tmp_path)
        loaded = QDistillStudentModel.from_pretrained(tmp_path)
        assert not any(p.requires_grad for p in loaded.vision_model.parameters())
        pixel_values = report_batch()[0]
        with torch.no_grad():
            assert torch.allclose(model(pixel_values=pixel_values).logits, loaded(pixel_values=pixel_values).logits)


def test_default_student_is_at_least_four_times_smaller_than_the_teacher():
    with torch.device("meta"):
        teacher = QDistillTeacherModel(QDistillTeacherConfig())
        student = QDistillStudentModel(QDistillStudentConfig())
        image_only = QDistillStudentModel(QDistillStudentConfig(text_mode="image_only"))
    assert trainable(teacher) >= 4 * trainable(student)
    assert trainable(student) > trainable(image_only)
    frozen = sum(p.numel() for p in teacher.vision_model.parameters())
    assert frozen == sum(p.numel() for p in student.vision_model.parameters()) and trainable(teacher.vision_model) == 0


def test_bare_qformer_needs_some_input():
    model = QDistillQFormerModel(teacher_config().qformer_config)
    with pytest.raises(ValueError, match="needs `query_embeds`, `input_ids` or both"):
        model()
    with pytest.raises(ValueError, match="Unknown attention mode"):
        model(input_ids=torch.tensor([[2, 3]]), attention_mode="causal")


class TestHardening:
    """Bad films, labels, batches and checkpoints fail with a message naming the rows, sizes, types or file."""

    @pytest.mark.parametrize("model_class, factory", [(QDistillTeacherModel, teacher_config), (QDistillStudentModel, student_config)])
    def test_non_finite_pixels_or_features_are_refused_naming_the_rows(self, model_class, factory):
        model = model_class(factory())
        pixel_values, input_ids, attention_mask, labels = report_batch()
        text = dict(input_ids=input_ids, attention_mask=attention_mask)
        pixel_values[1, 0, 3, 4] = float("nan")
        pixel_values[3, 2, 0, 0] = float("inf")
        with pytest.raises(ValueError, match=r"pixel_values has non-finite values \(NaN or inf\) in batch rows \[1, 3\]"):
            model(pixel_values=pixel_values, **text)
        features = torch.randn(4, NUM_IMAGE_TOKENS, 32)
        features[2, 5] = float("-inf")
        with pytest.raises(ValueError, match=r"image_features has non-finite values \(NaN or inf\) in batch rows \[2\]"):
            model(image_features=features, **text)

    def test_training_on_nan_features_names_the_rows_instead_of_dying_in_multinomial(self, teacher):
        _, input_ids, attention_mask, labels = report_batch()
        features = torch.randn(4, NUM_IMAGE_TOKENS, 32)
        features[0] = float("nan")
        with pytest.raises(ValueError, match=r"image_features has non-finite values .* in batch rows \[0\]"):
            teacher(image_features=features, input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                    return_loss=True)

    def test_a_diverged_teacher_raises_floating_point_error_before_the_hard_negative_draw(self, teacher):
        _, input_ids, attention_mask, labels = report_batch()
        with torch.no_grad():
            teacher.vision_projection.weight[0, 0] = float("nan")
        with pytest.raises(FloatingPointError, match=r"Non-finite similarities in rows \[0, 1, 2, 3\]"):
            teacher(image_features=torch.randn(4, NUM_IMAGE_TOKENS, 32), input_ids=input_ids,
                    attention_mask=attention_mask, labels=labels, return_loss=True)

    @pytest.mark.parametrize("model_class, factory", [(QDistillTeacherModel, teacher_config), (QDistillStudentModel, student_config)])
    def test_bad_labels_name_sizes_dtype_and_values(self, model_class, factory):
        model = model_class(factory())
        pixel_values, input_ids, attention_mask, labels = report_batch()
        kwargs = dict(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
        with pytest.raises(ValueError, match="labels has 3 entries but the batch has 4 images"):
            model(**kwargs, labels=labels[:3])
        with pytest.raises(ValueError, match="labels has 5 entries but the batch has 4 images"):
            model(**kwargs, labels=torch.tensor([0, 1, 0, 1, 1]))
        with pytest.raises(ValueError, match=r"labels must be a LongTensor of class ids in \[0, 2\) .* got dtype torch.float32"):
            model(**kwargs, labels=labels.float())
        with pytest.raises(ValueError, match=r"labels must have shape \(batch_size,\)"):
            model(**kwargs, labels=F.one_hot(labels, 2))
        with pytest.raises(ValueError, match=r"labels must be class ids in \[0, 2\); got \[5\] in batch rows \[2\]"):
            model(**kwargs, labels=torch.tensor([0, 1, 5, 1]))

    def test_student_batch_size_and_mask_shape_mismatches_name_both_sizes(self):
        model = QDistillStudentModel(student_config())
        pixel_values, input_ids, attention_mask, _ = report_batch()
        with pytest.raises(ValueError, match="input_ids has batch size 2 but the images have 4"):
            model(pixel_values=pixel_values, input_ids=input_ids[:2], attention_mask=attention_mask[:2])
        with pytest.raises(ValueError, match="input_ids has batch size 4 but the images have 3"):
            model(image_features=torch.randn(3, NUM_IMAGE_TOKENS, 32), input_ids=input_ids)
        with pytest.raises(ValueError, match=r"attention_mask has shape \(4, 5\) but input_ids has \(4, 6\)"):
            model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask[:, :5])
        with pytest.raises(ValueError, match=r"attention_mask has shape \(3, 6\) but input_ids has \(4, 6\)"):
            model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask[:3])

    def test_validate_batch_is_the_same_check_for_collators(self, teacher):
        pixel_values, input_ids, attention_mask, labels = report_batch()
        teacher.validate_batch(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                               labels=labels, study_ids=["a", "b", "c", "d"])  # unknown keys are ignored
        with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 99\) in batch rows \[1\]"):
            teacher.validate_batch(input_ids=input_ids.index_put((torch.tensor([1]), torch.tensor([2])), torch.tensor(120)))
        # Shape checks alone (what a compiled forward keeps) do not read values.
        teacher.validate_batch(pixel_values=pixel_values * float("nan"), labels=labels + 7, check_values=False)
        with pytest.raises(ValueError, match="labels has 3 entries"):
            teacher.validate_batch(pixel_values=pixel_values, labels=labels[:3], check_values=False)

    def test_loading_a_folder_of_the_other_model_type_names_both_types(self, tmp_path):
        QDistillTeacherModel(teacher_config()).save_pretrained(tmp_path / "teacher")
        QDistillStudentModel(student_config()).save_pretrained(tmp_path / "student")
        with pytest.raises(ValueError, match="model_type `qdistill_teacher`, but QDistillStudentConfig is model_type `qdistill_student`"):
            QDistillStudentModel.from_pretrained(tmp_path / "teacher")
        with pytest.raises(ValueError, match="model_type `qdistill_student`, but QDistillTeacherConfig is model_type `qdistill_teacher`"):
            QDistillTeacherModel.from_pretrained(tmp_path / "student")

    def test_our_classes_refuse_a_config_json_of_another_model_type(self, tmp_path):
        QDistillTeacherModel(teacher_config()).save_pretrained(tmp_path)
        config = json.loads((tmp_path / "config.json").read_text())
        config["model_type"] = "bert"
        (tmp_path / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match="model_type `bert`, but QDistillTeacherConfig is model_type `qdistill_teacher`"):
            QDistillTeacherModel.from_pretrained(tmp_path)

    @pytest.mark.parametrize("damage", ["truncated", "garbage"])
    def test_a_broken_weights_file_is_named_with_the_fix(self, tmp_path, damage):
        QDistillStudentModel(student_config(text_mode="image_only")).save_pretrained(tmp_path)
        weights = tmp_path / "model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a checkpoint" * 64)
        with pytest.raises(OSError, match=re.escape(str(weights)) + r".*re-download or re-save the checkpoint"):
            QDistillStudentModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("text_mode", ["image_only", "pseudo_report"])
def test_every_trainable_student_parameter_gets_a_gradient(text_mode):
    # DDP with find_unused_parameters=False fails on a parameter that takes no part in the loss.
    torch.manual_seed(0)
    model = QDistillStudentModel(student_config(text_mode=text_mode)).train()
    pixel_values, input_ids, attention_mask, labels = report_batch()
    kwargs = dict(pixel_values=pixel_values, labels=labels)
    if text_mode == "pseudo_report":
        kwargs.update(input_ids=input_ids, attention_mask=attention_mask)
    out = model(**kwargs)
    (out.loss + out.projected_output.sum()).backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []
    if text_mode == "image_only":
        assert model.qformer.position_embeddings is None and model.qformer.word_embeddings is None
    assert not model.qformer.encoder.layer[-1].has_text_mlp
    if text_mode == "pseudo_report":
        with pytest.raises(ValueError, match="last_layer_text_output=False"):
            model.qformer(input_ids=input_ids, attention_mask=attention_mask)
