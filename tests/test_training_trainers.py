"""The teacher and distillation Trainers on tiny models and toy data, on CPU."""

import copy
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback
from transformers.utils import logging as hf_logging

from qdistill_hf import QDistillTeacherModel
from qdistill_hf.models.modeling_qdistill import LOGIT_SCALE_MAX
from qdistill_hf.training import (
    QDistillDataCollator,
    QDistillDistillationTrainer,
    QDistillTeacherTrainer,
    QDistillTrainingArguments,
    cache_teacher_targets,
    compute_auroc_metrics,
)
from training_toys import (
    toy_dataset,
    toy_image_dataset,
    toy_image_processor,
    toy_student,
    toy_teacher,
    toy_tokenizer,
)

NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.fixture(autouse=True)
def _quiet():
    hf_logging.set_verbosity_error()
    yield
    hf_logging.set_verbosity_warning()


@pytest.fixture(scope="module")
def tokenizer():
    return toy_tokenizer()


def _args(tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path / "out"), use_cpu=True, per_device_train_batch_size=8, per_device_eval_batch_size=8,
        learning_rate=1e-2, lr_scheduler_type="constant", save_strategy="no", logging_steps=1, disable_tqdm=True,
        seed=0, data_seed=0,
    )
    defaults.update(kwargs)
    return QDistillTrainingArguments(**defaults)


def _fixed_batch(dataset, tokenizer, **collator_kwargs):
    return QDistillDataCollator(tokenizer, **collator_kwargs)([dataset[i] for i in range(len(dataset))])


# ---- teacher -----------------------------------------------------------------------------------------------------


def test_teacher_trainer_reduces_loss_logs_components_and_clamps_scale(tmp_path, tokenizer):
    teacher = toy_teacher(focal_gamma=0.0)
    with torch.no_grad():
        teacher.logit_scale.fill_(math.log(500.0))  # beyond the bound: the callback must bring it back
    train, val = toy_dataset(16), toy_dataset(8, seed=1)
    batch = _fixed_batch(train, tokenizer, text_column="report")
    batch.pop("study_ids")

    def fixed_loss():
        teacher.eval()
        with torch.no_grad():
            generator = torch.Generator().manual_seed(0)
            return float(teacher(**batch, return_loss=True, generator=generator).loss)

    before = fixed_loss()
    args = _args(tmp_path, max_steps=12, eval_strategy="steps", eval_steps=12)
    trainer = QDistillTeacherTrainer(model=teacher, args=args, train_dataset=train, eval_dataset=val,
                                     processing_class=tokenizer, compute_metrics=compute_auroc_metrics)
    trainer.train()
    after = fixed_loss()
    assert after < 0.7 * before, (before, after)
    assert teacher.logit_scale.item() <= LOGIT_SCALE_MAX + 1e-6
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(train_logs) == 12 and all({"loss_itc", "loss_itm", "loss_cls"} <= set(h) for h in train_logs)
    # The logged components combine into the logged loss with the config weights.
    first = train_logs[0]
    weights = teacher.config
    assert first["loss"] == pytest.approx(
        weights.itc_loss_weight * first["loss_itc"] + weights.itm_loss_weight * first["loss_itm"]
        + weights.cls_loss_weight * first["loss_cls"], rel=1e-5
    )
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evals) == 1 and {"eval_auroc", "eval_accuracy", "eval_loss_itc", "eval_loss_itm",
                                "eval_loss_cls"} <= set(evals[0])
    assert evals[0]["eval_auroc"] > 0.9  # the toy validation split is separable


def test_teacher_non_finite_loss_names_step_and_studies(tmp_path, tokenizer):
    teacher = toy_teacher()
    with torch.no_grad():
        teacher.classifier.weight[0, 0] = float("nan")
    trainer = QDistillTeacherTrainer(model=teacher, args=_args(tmp_path, max_steps=2), train_dataset=toy_dataset(8),
                                     processing_class=tokenizer)
    with pytest.raises(FloatingPointError, match=r"global step 0, studies \['s0-0"):
        trainer.train()


def test_gather_itc_features_needs_a_teacher(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="gather_itc_features needs a QDistillTeacherModel"):
        QDistillTeacherTrainer(model=toy_student(), args=_args(tmp_path, gather_itc_features=True),
                               processing_class=tokenizer)


def test_teacher_trainer_from_pixels(tmp_path, tokenizer):
    dataset = toy_image_dataset(8)
    processor = toy_image_processor()
    collator = QDistillDataCollator(tokenizer, image_processor=processor, text_column="report")
    teacher = toy_teacher()
    trainer = QDistillTeacherTrainer(model=teacher, args=_args(tmp_path, max_steps=2, per_device_train_batch_size=4),
                                     train_dataset=dataset, data_collator=collator)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


# ---- distillation ------------------------------------------------------------------------------------------------


def test_distillation_reduces_loss_and_keeps_teacher_frozen(tmp_path, tokenizer):
    teacher = toy_teacher()
    teacher_state = copy.deepcopy(teacher.state_dict())
    student = toy_student(focal_gamma=0.0)
    train, val = toy_dataset(16), toy_dataset(8, seed=1)
    args = _args(tmp_path, max_steps=15, eval_strategy="no", attention_alignment_weight=1.0)
    trainer = QDistillDistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train,
                                          eval_dataset=val, processing_class=tokenizer,
                                          compute_metrics=compute_auroc_metrics)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss"] < 0.6 * before["eval_loss"], (before, after)
    for name in ("kd_mse", "kd_cosine", "loss_supervised"):
        assert after[f"eval_{name}"] < before[f"eval_{name}"], name
    assert after["eval_auroc"] > 0.9
    # The teacher: same object type (no DDP/FSDP wrapper), eval mode, no gradient, unchanged weights.
    assert type(trainer.teacher_model) is QDistillTeacherModel and trainer.teacher_model is teacher
    assert not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(torch.equal(teacher_state[k], v) for k, v in teacher.state_dict().items())
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert all({"kd_mse", "kd_cosine", "kd_logits", "kd_attention", "loss_supervised", "kd_temperature"} <= set(h)
               for h in logged)


def test_attention_alignment_alone_pulls_the_student_maps_to_the_teacher(tmp_path, tokenizer):
    # Cached targets whose attention puts half the mass on the (recognisable) CLS token: far from the near-uniform
    # maps of an untrained student, so only a working alignment loss can bring the student there.
    import datasets
    from tiny_models import NUM_IMAGE_TOKENS

    peaked = [0.5] + [0.5 / (NUM_IMAGE_TOKENS - 1)] * (NUM_IMAGE_TOKENS - 1)
    dataset = toy_dataset(16, cls_offset=3.0)
    dataset = dataset.add_column("teacher_pooled", [[0.0] * 32] * 16).add_column("teacher_logits", [[0.0, 0.0]] * 16)
    dataset = dataset.add_column("teacher_attention", [peaked] * 16).add_column("teacher_target", ["bi"] * 16)
    assert isinstance(dataset, datasets.Dataset)
    student = toy_student()
    args = _args(tmp_path, max_steps=20, feature_mse_weight=0.0, feature_cosine_weight=0.0, logit_kd_weight=0.0,
                 supervised_weight=0.0, attention_alignment_weight=1.0, learning_rate=1e-2)
    trainer = QDistillDistillationTrainer(model=student, args=args, train_dataset=dataset, eval_dataset=dataset,
                                          processing_class=tokenizer)
    before = trainer.evaluate()["eval_kd_attention"]
    trainer.train()
    after = trainer.evaluate()["eval_kd_attention"]
    assert after < 0.5 * before, (before, after)


def test_distillation_components_match_hand_computation(tmp_path, tokenizer):
    student = toy_student(text_mode="pseudo_report", focal_gamma=0.0).eval()
    teacher = toy_teacher()
    args = _args(tmp_path, max_steps=10, feature_mse_weight=0.5, feature_cosine_weight=2.0, logit_kd_weight=3.0,
                 supervised_weight=0.25, kd_temperature=4.0, kd_temperature_final=1.0)
    trainer = QDistillDistillationTrainer(model=student, teacher_model=teacher, args=args,
                                          train_dataset=toy_dataset(4), processing_class=tokenizer)
    trainer.state.global_step, trainer.state.max_steps = 5, 10  # temperature 4 + (1 - 4) * 0.5 = 2.5
    batch = trainer.data_collator([toy_dataset(4)[i] for i in range(4)])
    assert set(batch) >= {"input_ids", "teacher_input_ids", "labels"}
    generator = torch.Generator().manual_seed(3)
    pooled, logits = torch.randn(4, 32, generator=generator), torch.randn(4, 2, generator=generator)
    batch.update(teacher_pooled=pooled, teacher_logits=logits, teacher_target=["bi"] * 4)
    loss, outputs = trainer.compute_loss(student, dict(batch), return_outputs=True)

    with torch.no_grad():
        own = student(image_features=batch["image_features"], input_ids=batch["input_ids"],
                      attention_mask=batch["attention_mask"])
    s = own.projected_output
    mse = ((s - pooled) ** 2).mean()
    cosine = (1 - (s * pooled).sum(-1) / (s.norm(dim=-1) * pooled.norm(dim=-1))).mean()
    t = 2.5
    p_teacher = torch.softmax(logits / t, -1)
    kl = (p_teacher * (p_teacher.log() - torch.log_softmax(own.logits / t, -1))).sum(-1).mean() * t**2
    ce = torch.nn.functional.cross_entropy(own.logits, batch["labels"])  # focal loss with gamma 0, no alpha
    expected = 0.5 * mse + 2.0 * cosine + 3.0 * kl + 0.25 * ce
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    metrics = trainer._metrics["eval"]
    assert float(metrics["kd_mse"][-1]) == pytest.approx(mse.item(), rel=1e-5)
    assert float(metrics["kd_cosine"][-1]) == pytest.approx(cosine.item(), rel=1e-5)
    assert float(metrics["kd_logits"][-1]) == pytest.approx(kl.item(), rel=1e-5)
    assert float(metrics["loss_supervised"][-1]) == pytest.approx(ce.item(), rel=1e-5)
    assert metrics["kd_temperature"][-1] == 2.5
    assert torch.equal(outputs.logits, own.logits)


def test_distillation_non_finite_loss_names_step_and_studies(tmp_path, tokenizer):
    student = toy_student()
    with torch.no_grad():
        student.projection.weight[0, 0] = float("inf")
    trainer = QDistillDistillationTrainer(model=student, teacher_model=toy_teacher(), args=_args(tmp_path, max_steps=2),
                                          train_dataset=toy_dataset(8), processing_class=tokenizer)
    with pytest.raises(FloatingPointError, match=r"global step 0, studies \['s0-0.*kd_mse=(nan|inf)"):
        trainer.train()


def test_input_errors_name_step_and_studies_and_validation_runs_once_when_compiled(tmp_path, tokenizer):
    student = toy_student()
    trainer = QDistillDistillationTrainer(model=student, teacher_model=toy_teacher(), args=_args(tmp_path, max_steps=1),
                                          processing_class=tokenizer)
    batch = trainer.data_collator([toy_dataset(3)[i] for i in range(3)])
    batch["labels"] = torch.tensor([0, 5, 1])  # class 5 does not exist
    with pytest.raises(ValueError, match=r"labels.*At global step 0, studies \['s0-000', 's0-001', 's0-002'\]"):
        trainer.compute_loss(student, dict(batch))
    # A compiled forward skips the value checks, so the trainer calls `validate_batch` itself, once per batch.
    # (Here the model is not really compiled, so its own eager check still runs too; the trainer's call is the one
    # with the batch as keyword arguments.)
    calls, original = [], student.validate_batch

    def spy(*args, **kwargs):
        if not args and "output_attentions" in kwargs:
            calls.append(sorted(kwargs))
        return original(*args, **kwargs)

    student.validate_batch = spy
    batch["labels"] = torch.tensor([0, 1, 1])
    trainer.compute_loss(student, dict(batch))
    assert calls == []
    trainer.args.torch_compile = True
    trainer.compute_loss(student, dict(batch))
    assert calls == [["image_features", "labels", "output_attentions"]]


def test_distillation_from_pixels_with_live_teacher(tmp_path, tokenizer):
    from qdistill_hf import QDistillProcessor

    processor = QDistillProcessor(image_processor=toy_image_processor(), tokenizer=tokenizer)
    student, teacher = toy_student(), toy_teacher()
    student.vision_model.load_state_dict(teacher.vision_model.state_dict())
    args = _args(tmp_path, max_steps=2, per_device_train_batch_size=4)
    trainer = QDistillDistillationTrainer(model=student, teacher_model=teacher, args=args,
                                          train_dataset=toy_image_dataset(8), processing_class=processor)
    assert trainer.data_collator.image_processor is processor.image_processor
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


def test_compatibility_check_names_the_fix(tmp_path, tokenizer):
    args = _args(tmp_path, max_steps=1)
    cases = [
        (toy_student(teacher_hidden_size=24), "teacher_hidden_size=32"),
        (toy_student(id2label={0: "a", 1: "b"}), "id2label=teacher.config.id2label"),
    ]
    for student, fix in cases:
        with pytest.raises(ValueError, match=fix):
            QDistillDistillationTrainer(model=student, teacher_model=toy_teacher(), args=args,
                                        processing_class=tokenizer)
    from qdistill_hf import QDistillStudentModel

    config = toy_student().config
    config.vision_config.num_hidden_layers = 3
    wider = QDistillStudentModel(config)
    with pytest.raises(ValueError, match=r"vision encoders differ \(num_hidden_layers: student 3 vs teacher 2\)"):
        QDistillDistillationTrainer(model=wider, teacher_model=toy_teacher(), args=args, processing_class=tokenizer)
    pseudo = toy_student(text_mode="pseudo_report")
    with pytest.raises(ValueError, match="student_text_column is None"):
        QDistillDistillationTrainer(model=pseudo, teacher_model=toy_teacher(), args=_args(tmp_path,
                                    student_text_column=None), processing_class=tokenizer)


def test_teacher_loaded_from_a_folder_given_as_string_or_argument(tmp_path, tokenizer):
    teacher = toy_teacher()
    teacher.save_pretrained(tmp_path / "teacher")
    for kwargs, extra in (({"teacher_model": str(tmp_path / "teacher")}, {}),
                          ({}, {"teacher_model_name_or_path": str(tmp_path / "teacher")})):
        trainer = QDistillDistillationTrainer(model=toy_student(), args=_args(tmp_path, max_steps=1, **extra),
                                              processing_class=tokenizer, **kwargs)
        loaded = trainer.teacher_model
        assert type(loaded) is QDistillTeacherModel and not loaded.training
        assert all(not p.requires_grad for p in loaded.parameters())
        assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in loaded.state_dict().items())
    # Without a teacher, a batch without cached targets is refused with the fix.
    trainer = QDistillDistillationTrainer(model=toy_student(), args=_args(tmp_path, max_steps=1),
                                          processing_class=tokenizer)
    with pytest.raises(ValueError, match=r"No teacher model and no cached teacher targets.*s0-000"):
        trainer.compute_loss(trainer.model, trainer.data_collator([toy_dataset(2)[i] for i in range(2)]))


# ---- cached teacher targets ---------------------------------------------------------------------------------


def test_cached_targets_reused_and_equal_to_live_teacher(tmp_path, tokenizer):
    teacher = toy_teacher()
    dataset = toy_dataset(8)
    collator = QDistillDataCollator(toy_tokenizer(), teacher_text_column="report")  # a fresh, never-called tokenizer
    cached = cache_teacher_targets(dataset, teacher, collator, target="bi", batch_size=3, with_attention=True,
                                   cache_dir=str(tmp_path / "targets"))
    assert {"teacher_pooled", "teacher_logits", "teacher_attention", "teacher_target"} <= set(cached.column_names)
    assert cached.features["teacher_pooled"].feature.dtype == "float16"
    files = sorted((tmp_path / "targets").glob("teacher-targets-*.arrow"))
    assert len(files) == 1

    # A second call with the same teacher and tokenizer loads the file: no teacher forward at all.
    calls = []
    hook = teacher.register_forward_pre_hook(lambda *a: calls.append(1))
    qformer_hook = teacher.qformer.register_forward_pre_hook(lambda *a: calls.append(1))
    again = cache_teacher_targets(dataset, teacher, collator, target="bi", batch_size=3, with_attention=True,
                                  cache_dir=str(tmp_path / "targets"))
    assert calls == [] and again["teacher_pooled"] == cached["teacher_pooled"]
    # Saving the teacher (which adds `architectures` etc. to its config) does not change the cache key, nor does the
    # padding state a tokenizer keeps after its first call (the first cache call used a fresh tokenizer) ...
    teacher.save_pretrained(tmp_path / "saved_teacher")
    cache_teacher_targets(dataset, teacher, collator, target="bi", batch_size=3, with_attention=True,
                          cache_dir=str(tmp_path / "targets"))
    assert calls == []
    # ... another target kind (or other weights) is a new cache entry and does run the teacher.
    cache_teacher_targets(dataset, teacher, collator, target="uni", cache_dir=str(tmp_path / "targets"))
    assert calls and len(sorted((tmp_path / "targets").glob("teacher-targets-*.arrow"))) == 2
    hook.remove()
    qformer_hook.remove()

    # The trainer uses cached targets without a teacher and gets the live-teacher loss within fp16 rounding.
    args = _args(tmp_path, max_steps=1, attention_alignment_weight=1.0)
    student = toy_student().eval()
    live = QDistillDistillationTrainer(model=student, teacher_model=teacher, args=args, processing_class=tokenizer)
    from_cache = QDistillDistillationTrainer(model=student, teacher_model=None, args=args, processing_class=tokenizer)
    live_batch = live.data_collator([dataset[i] for i in range(8)])
    cached_batch = from_cache.data_collator([cached[i] for i in range(8)])
    assert "teacher_pooled" in cached_batch
    live_loss = live.compute_loss(student, live_batch)
    cached_loss = from_cache.compute_loss(student, cached_batch)
    assert cached_loss.item() == pytest.approx(live_loss.item(), rel=1e-3)
    for name in ("kd_mse", "kd_cosine", "kd_logits", "kd_attention"):
        expected = float(live._metrics["eval"][name][-1])
        assert float(from_cache._metrics["eval"][name][-1]) == pytest.approx(expected, rel=2e-3, abs=1e-6)
    # Targets of the wrong kind are refused.
    uni_args = _args(tmp_path, max_steps=1, distill_target="uni")
    uni_trainer = QDistillDistillationTrainer(model=student, args=uni_args, processing_class=tokenizer)
    with pytest.raises(ValueError, match=r"kind \['bi'\] but distill_target is 'uni'"):
        uni_trainer.compute_loss(student, uni_trainer.data_collator([cached[i] for i in range(2)]))


def test_train_from_cached_targets_without_teacher(tmp_path, tokenizer):
    teacher = toy_teacher()
    dataset = cache_teacher_targets(toy_dataset(16), teacher, tokenizer, target="uni")
    student = toy_student(focal_gamma=0.0)
    args = _args(tmp_path, max_steps=10, distill_target="uni")
    trainer = QDistillDistillationTrainer(model=student, args=args, train_dataset=dataset,
                                          processing_class=tokenizer)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.6 * losses[0]


# ---- checkpoints ------------------------------------------------------------------------------------------------


def test_best_checkpoint_is_chosen_by_validation_auroc(tmp_path, tokenizer):
    # The validation AUROC peaks at the second evaluation (step 4) while the training loss keeps falling to step 8:
    # the checkpoint kept must be step 4's. The AUROC sequence is scripted on top of the real metric so that the
    # test checks the selection itself, not one training trajectory.
    scripted = iter([0.6, 0.9, 0.7, 0.5])

    def metrics(eval_pred):
        real = compute_auroc_metrics(eval_pred)
        assert set(real) >= {"auroc", "accuracy"}
        return {**real, "auroc": next(scripted)}

    student = toy_student(focal_gamma=0.0)
    args = _args(tmp_path, max_steps=8, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                 metric_for_best_model="auroc", load_best_model_at_end=True, learning_rate=3e-4)
    trainer = QDistillDistillationTrainer(model=student, teacher_model=toy_teacher(), args=args,
                                          train_dataset=toy_dataset(16), eval_dataset=toy_dataset(16, seed=1),
                                          processing_class=tokenizer, compute_metrics=metrics)
    trainer.train()
    evals = [(h["step"], h["eval_auroc"]) for h in trainer.state.log_history if "eval_auroc" in h]
    train_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert evals == [(2, 0.6), (4, 0.9), (6, 0.7), (8, 0.5)]
    assert train_losses[-1] < train_losses[0]  # the training loss would have picked the last checkpoint
    assert trainer.state.best_metric == pytest.approx(0.9)
    assert Path(trainer.state.best_model_checkpoint).name == "checkpoint-4"
    saved = load_file(str(Path(trainer.state.best_model_checkpoint) / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in trainer.model.state_dict().items() if k in saved)


class _StopAt(TrainerCallback):
    """Interrupt training after `step` optimizer steps (the run keeps its full-length schedule)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def _run(tmp_path, name, tokenizer, stop_at=None, resume=None):
    teacher = toy_teacher(seed=7)  # dropout on: the resumed run must restore the global RNG
    args = _args(tmp_path, output_dir=str(tmp_path / name), max_steps=6, save_strategy="steps", save_steps=3,
                 learning_rate=3e-3, lr_scheduler_type="linear", per_device_train_batch_size=4)
    callbacks = [_StopAt(stop_at)] if stop_at else None
    trainer = QDistillTeacherTrainer(model=teacher, args=args, train_dataset=toy_dataset(12),
                                     processing_class=tokenizer, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_resume_reproduces_the_uninterrupted_run(tmp_path, tokenizer):
    straight = _run(tmp_path, "straight", tokenizer)
    _run(tmp_path, "interrupted", tokenizer, stop_at=3)
    assert (tmp_path / "interrupted" / "checkpoint-3" / "model.safetensors").is_file()
    assert not (tmp_path / "interrupted" / "checkpoint-6").exists()
    resumed = _run(tmp_path, "interrupted", tokenizer, resume=str(tmp_path / "interrupted" / "checkpoint-3"))
    straight_state, resumed_state = straight.model.state_dict(), resumed.model.state_dict()
    initial = toy_teacher(seed=7).state_dict()
    assert any(not torch.equal(initial[k], straight_state[k]) for k in initial)
    for key, value in straight_state.items():
        assert torch.allclose(value, resumed_state[key], atol=1e-6), key
    straight_losses = [h["loss"] for h in straight.state.log_history if "loss" in h]
    resumed_losses = [h["loss"] for h in resumed.state.log_history if "loss" in h]
    # The resumed trainer's history holds steps 1-3 from the checkpoint and steps 4-6 it ran itself.
    assert len(resumed_losses) == len(straight_losses) == 6
    assert resumed_losses == pytest.approx(straight_losses, rel=1e-5)


def test_gradient_accumulation_matches_the_full_batch(tmp_path, tokenizer):
    def one_update(batch_size, accumulation):
        student = toy_student(focal_gamma=0.0, classifier_dropout=0.0, qformer=dict(NO_DROPOUT))
        args = _args(tmp_path, output_dir=str(tmp_path / f"ga{accumulation}"), max_steps=1, learning_rate=1e-2,
                     per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation, optim="sgd",
                     max_grad_norm=0.0)
        trainer = QDistillDistillationTrainer(model=student, teacher_model=toy_teacher(), args=args,
                                              train_dataset=toy_dataset(8), processing_class=tokenizer)
        trainer.train()
        return student.state_dict(), trainer.state.log_history[0]["loss"]

    full, full_loss = one_update(8, 1)
    accumulated, accumulated_loss = one_update(4, 2)
    assert accumulated_loss == pytest.approx(full_loss, rel=1e-5)
    for key, value in full.items():
        assert torch.allclose(value, accumulated[key], atol=1e-6), key
