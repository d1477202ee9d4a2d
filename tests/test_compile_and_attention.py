"""Attention implementations, activation checkpointing and `torch.compile` of the Q-DISTILL models (tiny, CPU)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from qdistill_hf import QDistillStudentModel, QDistillTeacherModel
from qdistill_hf.models.loss_qdistill import distillation_kl_loss, embedding_alignment_loss
from qdistill_hf.models.modeling_qdistill import QDistillAttention, eager_attention_forward
from tiny_models import NUM_IMAGE_TOKENS, report_batch, student_config, teacher_config

NO_DROPOUT = dict(classifier_dropout=0.0, qformer=dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
# Compile tests trace every layer: one Q-Former layer keeps each of them to a few seconds.
ONE_LAYER = dict(classifier_dropout=0.0, qformer=dict(num_hidden_layers=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def attention_implementations(model):
    return {module.config._attn_implementation for module in model.modules() if isinstance(module, QDistillAttention)}


def text_batch():
    _, input_ids, attention_mask, labels = report_batch()
    features = torch.randn(4, NUM_IMAGE_TOKENS, 32, generator=torch.Generator().manual_seed(7))
    return features, input_ids, attention_mask, labels


class TestAttentionImplementation:
    def test_eager_and_sdpa_give_the_same_outputs(self):
        torch.manual_seed(0)
        model = QDistillTeacherModel(teacher_config()).eval()
        assert attention_implementations(model) == {"sdpa"}
        features, input_ids, attention_mask, _ = text_batch()
        kwargs = dict(image_features=features, input_ids=input_ids, attention_mask=attention_mask)
        with torch.no_grad():
            sdpa = model(**kwargs)
            model.set_attn_implementation("eager")
            assert attention_implementations(model) == {"eager"}
            eager = model(**kwargs)
        for name in ("logits", "itm_logits", "image_embeds", "text_embeds"):
            assert torch.allclose(sdpa[name], eager[name], atol=1e-5), name

    def test_the_configured_implementation_is_the_one_called(self):
        calls = []

        def counting_attention(module, query, key, value, attention_mask, **kwargs):
            calls.append((query.shape, key.shape))
            return eager_attention_forward(module, query, key, value, attention_mask, **kwargs)

        AttentionInterface.register("qdistill_counting", counting_attention)
        model = QDistillStudentModel._from_config(student_config(text_mode="image_only"))
        model.set_attn_implementation({"qformer_config": "qdistill_counting", "vision_config": "eager", "": "eager"})
        assert attention_implementations(model) == {"qdistill_counting"}
        model(image_features=torch.randn(2, NUM_IMAGE_TOKENS, 32))
        # One Q-Former layer: its self-attention over 3 queries, then its cross-attention to the image tokens.
        assert calls == [((2, 2, 3, 8), (2, 2, 3, 8)), ((2, 2, 3, 8), (2, 2, NUM_IMAGE_TOKENS, 8))]

    def test_from_config_and_from_pretrained_propagate_into_the_qformer(self, tmp_path):
        model = QDistillTeacherModel._from_config(teacher_config(), attn_implementation="eager")
        assert attention_implementations(model) == {"eager"} and model.vision_model.config._attn_implementation == "eager"
        model.save_pretrained(tmp_path)
        loaded = QDistillTeacherModel.from_pretrained(
            tmp_path, attn_implementation={"qformer_config": "eager", "vision_config": "sdpa", "": "sdpa"}
        )
        assert attention_implementations(loaded) == {"eager"}
        assert loaded.config.qformer_config._attn_implementation == "eager"
        assert loaded.vision_model.config._attn_implementation == "sdpa"
        assert attention_implementations(QDistillTeacherModel.from_pretrained(tmp_path, attn_implementation="sdpa")) == {"sdpa"}
        with pytest.raises(ValueError, match="flex_attention"):
            QDistillTeacherModel.from_pretrained(tmp_path, attn_implementation="flex_attention")

    def test_output_attentions_under_sdpa_falls_back_to_eager_for_that_call(self):
        torch.manual_seed(0)
        model = QDistillTeacherModel(teacher_config()).eval()
        features, input_ids, attention_mask, _ = text_batch()
        kwargs = dict(image_features=features, input_ids=input_ids, attention_mask=attention_mask, output_attentions=True)
        with torch.no_grad():
            from_sdpa = model(**kwargs)
            model.set_attn_implementation("eager")
            from_eager = model(**kwargs)
        assert from_sdpa.attentions is not None and len(from_sdpa.attentions) == 2
        for a, b in zip(from_sdpa.attentions + from_sdpa.cross_attentions, from_eager.attentions + from_eager.cross_attentions):
            assert torch.equal(a, b)
        assert torch.allclose(from_sdpa.attentions[0].sum(-1), torch.ones(4, 4, 10), atol=1e-5)


class TestGradientCheckpointing:
    @pytest.mark.parametrize("enable", ["gradient_checkpointing_enable", "activation_checkpointing_enable"])
    def test_identical_loss_and_gradients_and_the_layers_are_recomputed(self, enable):
        torch.manual_seed(0)
        model = QDistillTeacherModel(teacher_config(**NO_DROPOUT)).train()
        features, input_ids, attention_mask, labels = text_batch()
        kwargs = dict(image_features=features, input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                      return_loss=True)

        def step():
            model.zero_grad()
            torch.manual_seed(3)  # the same hard negatives in both runs
            out = model(**kwargs)
            out.loss.backward()
            return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

        calls = []
        model.qformer.encoder.layer[0].self_attn_norm.register_forward_hook(lambda *args: calls.append(1))
        plain_loss, plain_grads = step()
        plain_calls = len(calls)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # `gradient_checkpointing_enable` is deprecated in v5
            getattr(model, enable)()
        assert all(layer.gradient_checkpointing for layer in model.qformer.encoder.layer)
        calls.clear()
        checkpointed_loss, checkpointed_grads = step()
        # The backward pass re-runs each checkpointed layer: 3 Q-Former passes per step (queries, report, pairs).
        assert plain_calls == 3 and len(calls) == 6
        assert torch.equal(plain_loss, checkpointed_loss)
        assert plain_grads.keys() == checkpointed_grads.keys() and "query_tokens" in plain_grads
        for name, grad in plain_grads.items():
            assert torch.allclose(grad, checkpointed_grads[name], atol=1e-6, rtol=1e-5), name


def teacher_step(model, features, input_ids, attention_mask, labels):
    out = model(image_features=features, input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                return_loss=True)
    out.loss.backward()
    return out.loss.detach()


def distillation_step(student, features, input_ids, attention_mask, labels, teacher_logits, teacher_queries):
    out = student(image_features=features, input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    mse, cosine = embedding_alignment_loss(out.projected_output, teacher_queries)
    loss = out.loss + distillation_kl_loss(out.logits, teacher_logits, temperature=2.0) + mse + cosine
    loss.backward()
    return loss.detach()


class TestCompile:
    def test_teacher_training_step_has_at_most_two_graph_breaks(self):
        torch._dynamo.reset()
        model = QDistillTeacherModel(teacher_config(**ONE_LAYER)).train()
        explanation = torch._dynamo.explain(teacher_step)(model, *text_batch())
        assert explanation.graph_break_count <= 2, [str(reason.reason)[:200] for reason in explanation.break_reasons]

    def test_distillation_step_has_at_most_two_graph_breaks(self):
        torch._dynamo.reset()
        student = QDistillStudentModel(student_config(**ONE_LAYER)).train()
        explanation = torch._dynamo.explain(distillation_step)(
            student, *text_batch(), torch.randn(4, 2), torch.randn(4, 32)
        )
        assert explanation.graph_break_count <= 2, [str(reason.reason)[:200] for reason in explanation.break_reasons]

    def test_compiled_teacher_gives_the_eager_loss(self):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = QDistillTeacherModel(teacher_config(**ONE_LAYER)).train()
        features, input_ids, attention_mask, labels = text_batch()
        kwargs = dict(image_features=features, input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                      return_loss=True)
        torch.manual_seed(5)
        eager = model(**kwargs)
        torch.manual_seed(5)
        compiled = torch.compile(model, backend="eager", fullgraph=True)(**kwargs)
        for name in ("loss", "loss_itc", "loss_itm", "loss_cls", "itm_logits", "itm_weights"):
            assert torch.allclose(eager[name], compiled[name], atol=1e-6), name
        assert eager.itm_logits.shape == (12, 2)

    def test_compiled_student_gives_the_eager_loss(self):
        torch._dynamo.reset()
        torch.manual_seed(0)
        student = QDistillStudentModel(student_config(**ONE_LAYER)).train()
        features, input_ids, attention_mask, labels = text_batch()
        kwargs = dict(image_features=features, input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        eager = student(**kwargs)
        compiled = torch.compile(student, backend="aot_eager", fullgraph=True)(**kwargs)
        assert torch.allclose(eager.loss, compiled.loss, atol=1e-6)
        assert torch.allclose(eager.projected_output, compiled.projected_output, atol=1e-6)

    def test_compiled_forward_skips_host_checks_which_validate_batch_still_runs(self):
        torch._dynamo.reset()
        student = QDistillStudentModel(student_config(text_mode="image_only", **ONE_LAYER)).eval()
        features = torch.randn(2, NUM_IMAGE_TOKENS, 32)
        features[1, 0, 0] = float("nan")
        with pytest.raises(ValueError, match=r"image_features has non-finite values \(NaN or inf\) in batch rows \[1\]"):
            student(image_features=features)
        compiled = torch.compile(student, backend="eager", fullgraph=True)
        # Under compile the value check is skipped (it would split the graph): the NaN reaches the logits ...
        assert torch.isnan(compiled(image_features=features).logits[1]).all()
        # ... which is why the collator / Trainer calls the same checks once per batch, outside the graph.
        with pytest.raises(ValueError, match=r"in batch rows \[1\]"):
            student.validate_batch(image_features=features, labels=torch.tensor([0, 1]))


class TestFixedShapeItm:
    def old_itm_loss(self, out, batch_size):
        """Today's loss before the fixed shapes: the mean cross-entropy over the positive and the valid negative pairs."""
        keep = torch.cat([torch.ones(batch_size, dtype=torch.bool), out.itm_weights[batch_size:] > 0])
        return F.cross_entropy(out.itm_logits[keep], out.itm_labels[keep])

    def test_every_row_has_a_negative_loss_equals_the_plain_mean(self):
        torch.manual_seed(0)
        model = QDistillTeacherModel(teacher_config()).eval()
        features, input_ids, attention_mask, _ = text_batch()
        out = model(image_features=features, input_ids=input_ids, attention_mask=attention_mask, return_loss=True,
                    generator=torch.Generator().manual_seed(1))
        assert out.itm_logits.shape == (12, 2) and out.itm_weights.tolist() == [1.0] * 12
        assert torch.allclose(out.loss_itm, F.cross_entropy(out.itm_logits, out.itm_labels), atol=1e-6)

    def test_rows_without_a_negative_contribute_nothing(self):
        torch.manual_seed(0)
        model = QDistillTeacherModel(teacher_config()).eval()
        features, input_ids, attention_mask, _ = text_batch()
        # Image 0 and report 0 are declared positives of everything: no negative report for image 0 and no negative
        # image for report 0.
        positives = torch.eye(4, dtype=torch.bool)
        positives[0, :] = positives[:, 0] = True
        out = model(image_features=features, input_ids=input_ids, attention_mask=attention_mask, return_loss=True,
                    positive_mask=positives, generator=torch.Generator().manual_seed(1))
        assert out.itm_logits.shape == (12, 2)
        assert out.itm_weights.tolist() == [1.0] * 4 + [0.0, 1.0, 1.0, 1.0] * 2
        assert torch.allclose(out.loss_itm, self.old_itm_loss(out, 4), atol=1e-6)
        # The placeholder slots (rows 4 and 8) get no gradient at all.
        itm_logits = out.itm_logits.detach().requires_grad_()
        weights = out.itm_weights
        loss = (F.cross_entropy(itm_logits, out.itm_labels, reduction="none") * weights).sum() / weights.sum()
        assert torch.allclose(loss, out.loss_itm, atol=1e-6)
        loss.backward()
        assert itm_logits.grad[[4, 8]].abs().max() == 0 and itm_logits.grad[[5, 9]].abs().max() > 0
