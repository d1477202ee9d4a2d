"""The command-line scripts: `--help` of every script, config-file parsing, run_teacher.py -> run_distillation.py end to
end on tiny synthetic data, and an offline `push_to_hub` that fails cleanly and keeps the local files."""

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = REPO_ROOT / "examples"
DATA_SCRIPTS = REPO_ROOT / "data_scripts"
CONFIGS = EXAMPLES / "configs"

# An option each script's --help must mention (the one that says what the script is about).
KEY_OPTIONS = {
    "build_tokenizer.py": "--reports_jsonl",
    "convert_chexzero.py": "--checkpoint",
    "evaluate_priority_rules.py": "--jsonl",
    "generate_pseudo_reports.py": "--generator",
    "prepare_dataset.py": "--dataset_name",
    "score_priority.py": "--scorer",
    "run_teacher.py": "--vision_model_name_or_path",
    "run_distillation.py": "--pseudo_report_source",
}
SCRIPTS = sorted(DATA_SCRIPTS.glob("*.py")) + sorted(p for p in EXAMPLES.glob("*.py") if p.name != "example_utils.py")

# Tiny model and data sizes shared by the end-to-end runs.
TINY_DATA = ["--dataset_name", "synthetic",
             "--dataset_config", '{"num_train": 48, "num_validation": 16, "num_test": 16}',
             "--use_feature_cache", "true", "--num_train_epochs", "1", "--per_device_train_batch_size", "16",
             "--per_device_eval_batch_size", "32", "--logging_steps", "1", "--dataloader_pin_memory", "false",
             "--report_to", "none"]
TINY_QFORMER = ["--num_query_tokens", "4", "--num_hidden_layers", "1", "--hidden_size", "32", "--num_attention_heads",
                "2", "--intermediate_size", "64"]


def _env():
    # The repository on PYTHONPATH too, so the scripts import this checkout's package even without an editable install.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}


def _run(args, cwd, check=True):
    result = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=_env(), capture_output=True, text=True,
                            timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def examples_on_path(monkeypatch):
    """Import the example scripts (they import their sibling `example_utils`, as when run as scripts)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return {name: _load(EXAMPLES / f"{name}.py", name) for name in ("example_utils", "run_teacher", "run_distillation")}


# ------------------------------------------------------------------------------------------------ --help


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_script_answers_help(script, tmp_path):
    result = _run([script, "--help"], cwd=tmp_path)
    assert result.stdout.startswith("usage:"), result.stdout[:500]
    assert KEY_OPTIONS.get(script.name, "--help") in result.stdout


def test_help_all_lists_the_training_options(examples_on_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parse(examples_on_path, "run_distillation", ["--help_all"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--teacher_model_name_or_path", "--kd_temperature", "--learning_rate", "--pseudo_report_source"):
        assert option in help_text
    # The scripts' own defaults show in the full help.
    assert re.search(r"--metric_for_best_model.*?\(default: auroc\)", help_text, re.S)


def test_short_help_names_only_real_options(examples_on_path):
    """Every `--option` the fast --help mentions (written by hand, without torch) is an option of the full parser."""
    from transformers import HfArgumentParser

    utils = examples_on_path["example_utils"]
    for name, data_type in (("run_teacher", "DataArguments"), ("run_distillation", "DistillationDataArguments")):
        module = examples_on_path[name]
        data_arguments = getattr(module, data_type, utils.DataArguments)
        types = (module.ModelArguments, data_arguments, utils.training_arguments_class())
        parser = HfArgumentParser(types)
        known = {option for action in parser._actions for option in action.option_strings}
        extra = module.__dict__.get("DISTILLATION_EPILOG", "")
        mentioned = set(re.findall(r"--[a-z0-9_]+", utils.training_epilog(f"{name}.py", extra)))
        mentioned -= {utils.HELP_ALL_FLAG, "--option"}  # `--option value`: the generic form
        assert mentioned and mentioned <= known, sorted(mentioned - known)


# ------------------------------------------------------------------------------------------------ light copies


def test_constants_read_without_import_are_the_librarys(examples_on_path):
    from qdistill_hf.data.data_cxr import CONFIG_NAMES
    from qdistill_hf.models.configuration_qdistill import STUDENT_TEXT_MODES

    utils = examples_on_path["example_utils"]
    assert utils.read_library_constant("data/data_cxr.py", "CONFIG_NAMES") == CONFIG_NAMES
    assert utils.DatasetName.__args__ == CONFIG_NAMES
    assert examples_on_path["run_distillation"].StudentTextMode.__args__ == STUDENT_TEXT_MODES
    for script in ("prepare_dataset.py", "build_tokenizer.py"):
        assert _load(DATA_SCRIPTS / script, script[:-3]).builder_config_names() == CONFIG_NAMES
    with pytest.raises(RuntimeError, match=r"data_cxr.py: no module-level `NOT_THERE = <literal>`"):
        utils.read_library_constant("data/data_cxr.py", "NOT_THERE")


@pytest.mark.parametrize("script", ["score_priority.py", "generate_pseudo_reports.py"])
def test_runner_options_match_the_library(script):
    """The scripts declare the runner's options themselves (for a fast --help); they must equal the library's."""
    from qdistill_hf.reports.resumable import add_runner_arguments

    reference = argparse.ArgumentParser()
    add_runner_arguments(reference)
    expected = {a.dest: (a.default, a.type) for a in reference._actions if a.dest != "help"}
    runner = _load(DATA_SCRIPTS / script, script[:-3]).RunnerArguments
    import dataclasses

    declared = {f.name: (f.default, int) for f in dataclasses.fields(runner)}
    assert declared == expected


def test_data_script_arguments_are_checked():
    prepare = _load(DATA_SCRIPTS / "prepare_dataset.py", "prepare_dataset")
    with pytest.raises(SystemExit):  # argparse: not a builder config
        prepare.parse_args(["--dataset_name", "imagenet"])
    with pytest.raises(ValueError, match=r"--split_fractions takes 3 numbers .* got \[0.5, 0.5\]"):
        prepare.parse_args(["--dataset_name", "iu_xray", "--split_fractions", "0.5", "0.5"])
    args, options = prepare.parse_args(["--dataset_name", "synthetic", "--num_train", "7", "--verify_images", "false"])
    assert args.dataset_name == "synthetic" and options.given() == {"num_train": 7, "verify_images": False}
    score = _load(DATA_SCRIPTS / "score_priority.py", "score_priority")
    with pytest.raises(ValueError, match="--scorer llm needs --model_id"):
        score.parse_args(["--data_dir", "d", "--scorer", "llm"])
    generate = _load(DATA_SCRIPTS / "generate_pseudo_reports.py", "generate_pseudo_reports")
    with pytest.raises(ValueError, match="--generator retrieval needs --vision_model"):
        generate.parse_args(["--data_dir", "d"])


# ------------------------------------------------------------------------------------------------ config files


def _parse(examples_on_path, script, argv):
    module = examples_on_path[script]
    utils = examples_on_path["example_utils"]
    data_type = getattr(module, "DistillationDataArguments", utils.DataArguments)
    return utils.parse_arguments((module.ModelArguments, data_type), lambda: (utils.training_arguments_class(),),
                                 argv, description="test", training_epilog="")


def test_paper_configs_hold_the_papers_settings(examples_on_path, tmp_path):
    model, data, training = _parse(examples_on_path, "run_teacher", [str(CONFIGS / "teacher_paper.yaml")])
    assert (training.per_device_train_batch_size, training.learning_rate, training.weight_decay) == (64, 2e-5, 1e-3)
    assert (training.num_train_epochs, training.max_grad_norm, training.lr_scheduler_type) == (
        150, 0.3, "cosine_with_min_lr")
    assert training.lr_scheduler_kwargs == {"min_lr_rate": 0.01} and training.seed == 42
    assert (model.num_query_tokens, model.num_hidden_layers, model.hidden_size, model.num_attention_heads) == (
        12, 4, 768, 12)
    assert (model.itc_loss_weight, model.itm_loss_weight, model.cls_loss_weight, model.focal_gamma) == (
        0.45, 0.45, 0.1, 2.0)
    assert model.focal_alpha_inverse_frequency and data.dataset_name == "qdistill_folder"
    assert training.metric_for_best_model == "auroc" and training.load_best_model_at_end

    model, data, training = _parse(examples_on_path, "run_distillation", [str(CONFIGS / "student_paper.yaml")])
    assert (training.per_device_train_batch_size, training.learning_rate, training.num_train_epochs) == (32, 1e-4, 50)
    assert model.num_query_tokens == 8 and model.text_mode == "pseudo_report" and training.distill_target == "bi"
    assert (training.feature_mse_weight, training.feature_cosine_weight, training.supervised_weight,
            training.logit_kd_weight) == (1.0, 1.0, 1.0, 0.0)

    for name, script in (("teacher_cpu_synthetic", "run_teacher"), ("student_cpu_synthetic", "run_distillation")):
        _, data, training = _parse(examples_on_path, script, [str(CONFIGS / f"{name}.yaml")])
        assert data.dataset_name == "synthetic" and data.use_feature_cache and training.num_train_epochs > 0


def test_config_file_overrides_json_and_defaults(examples_on_path, tmp_path):
    # Options after the file override it; the rest comes from the file.
    model, data, training = _parse(examples_on_path, "run_teacher", [
        str(CONFIGS / "teacher_paper.yaml"), "--learning_rate", "1e-3", "--num_query_tokens", "4",
        "--class_names", "normal", "abnormal", "--focal_alpha_inverse_frequency", "false"])
    assert (training.learning_rate, model.num_query_tokens, training.per_device_train_batch_size) == (1e-3, 4, 64)
    assert data.class_names == ["normal", "abnormal"] and not model.focal_alpha_inverse_frequency

    # The same mapping as JSON parses to the same values; a file without them gets the scripts' defaults.
    values = {"dataset_name": "synthetic", "output_dir": str(tmp_path / "out"), "num_query_tokens": 6,
              "dataset_config": {"num_train": 20}}
    (tmp_path / "run.json").write_text(json.dumps(values))
    import yaml

    (tmp_path / "run.yml").write_text(yaml.safe_dump(values))
    from_json = _parse(examples_on_path, "run_teacher", [str(tmp_path / "run.json")])
    from_yaml = _parse(examples_on_path, "run_teacher", [str(tmp_path / "run.yml")])
    assert from_json[0] == from_yaml[0] and from_json[1] == from_yaml[1]
    assert from_json[1].dataset_config == {"num_train": 20} and from_json[0].num_query_tokens == 6
    training = from_json[2]
    assert (training.eval_strategy, training.save_strategy) == ("epoch", "epoch")
    assert training.metric_for_best_model == "auroc"
    assert training.load_best_model_at_end and training.save_total_limit == 2

    # The same through flags: dataset_config as a JSON string.
    flags = _parse(examples_on_path, "run_teacher", ["--dataset_name", "synthetic", "--output_dir", str(tmp_path / "o"),
                                                     "--dataset_config", '{"num_train": 20}'])
    assert flags[1].dataset_config == {"num_train": 20} and flags[2].eval_strategy == "epoch"

    # Unknown keys and bad values are refused, naming them.
    (tmp_path / "bad.yaml").write_text("dataset_name: synthetic\nnum_queries: 12\n")
    with pytest.raises(ValueError, match="num_queries"):
        _parse(examples_on_path, "run_teacher", [str(tmp_path / "bad.yaml")])
    with pytest.raises(ValueError, match=r"--dataset_name qdistill_folder needs --data_dir"):
        _parse(examples_on_path, "run_teacher", ["--dataset_name", "qdistill_folder"])
    with pytest.raises(ValueError, match=r"--dataset_config must be a JSON object"):
        _parse(examples_on_path, "run_teacher", ["--dataset_config", "num_train=3"])
    with pytest.raises(ValueError, match=r"dataset_config holds \['label_names'\]"):
        _parse(examples_on_path, "run_teacher", ["--dataset_config", '{"label_names": ["a", "b"]}'])
    with pytest.raises(ValueError, match="not both"):
        _parse(examples_on_path, "run_teacher", ["--focal_alpha", "1", "2", "--focal_alpha_inverse_frequency", "true"])


def test_inverse_frequency_alpha(examples_on_path):
    alpha = examples_on_path["run_teacher"].inverse_frequency_alpha([0, 0, 0, 1], 2)
    assert alpha == [4 / (2 * 3), 4 / (2 * 1)]
    with pytest.raises(ValueError, match=r"classes \[1\] have no training example"):
        examples_on_path["run_teacher"].inverse_frequency_alpha([0, 0], 2)


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """run_teacher.py on 48 synthetic films, one epoch, tiny sizes."""
    root = tmp_path_factory.mktemp("example_scripts")
    out = root / "teacher"
    result = _run([EXAMPLES / "run_teacher.py", *TINY_DATA, *TINY_QFORMER, "--cache_dir", root / "cache",
                   "--output_dir", out, "--vocab_size", "300", "--tokenizer_min_frequency", "1",
                   "--model_max_length", "64", "--embed_dim", "16"], cwd=root)
    return root, out, result


def _assert_saved_model(folder, model_type):
    from transformers import AutoModel, AutoProcessor

    import qdistill_hf  # noqa: F401  (registers the Auto classes)

    for name in ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json",
                 "train_results.json", "eval_results.json", "test_results.json", "all_results.json"):
        assert (folder / name).is_file(), name
    model = AutoModel.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    assert model.config.model_type == model_type and type(processor).__name__ == "QDistillProcessor"
    # Operating point fitted on validation and saved with the model; predictions for evaluate_triage.py.
    assert model.config.calibration_temperature > 0 and 0.0 < model.config.decision_threshold < 1.0
    assert model.config.decision_rule.startswith("sensitivity >= 0.90 on validation (n=16")
    for split in ("validation", "test"):
        with np.load(folder / f"predictions_{split}.npz") as predictions:
            assert predictions["logits"].shape == (16, 2) and len(predictions["study_ids"]) == 16
    return model, processor


def test_run_teacher_end_to_end(teacher_run):
    root, out, result = teacher_run
    teacher, processor = _assert_saved_model(out, "qdistill_teacher")
    assert teacher.config.qformer_config.num_query_tokens == 4 and teacher.config.qformer_config.hidden_size == 32
    assert teacher.config.qformer_config.vocab_size == len(processor.tokenizer) <= 300
    assert teacher.config.vision_config.hidden_size == 128  # the random stand-in encoder
    assert teacher.config.qformer_config.standardize_image_features  # training-film token statistics
    eval_results = json.loads((out / "eval_results.json").read_text())
    assert eval_results["eval_samples"] == 16 and 0.0 <= eval_results["eval_auroc"] <= 1.0
    assert json.loads((out / "test_results.json").read_text())["test_samples"] == 16
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["best_metric"] == pytest.approx(eval_results["eval_auroc"])
    assert "No --vision_model_name_or_path" in result.stdout + result.stderr


def test_run_distillation_end_to_end_with_retrieved_pseudo_reports(teacher_run):
    root, teacher_dir, _ = teacher_run
    out = root / "student"
    _run([EXAMPLES / "run_distillation.py", *TINY_DATA, *TINY_QFORMER, "--cache_dir", root / "cache",
          "--teacher_model_name_or_path", teacher_dir, "--output_dir", out, "--text_mode", "pseudo_report",
          "--pseudo_report_source", "retrieval", "--hidden_size", "16"], cwd=root)
    student, processor = _assert_saved_model(out, "qdistill_student")
    teacher_model = _assert_saved_model(teacher_dir, "qdistill_teacher")[0]
    assert student.config.qformer_config.standardize_image_features
    assert (student.qformer.image_feature_mean == teacher_model.qformer.image_feature_mean).all()
    teacher_config = json.loads((teacher_dir / "config.json").read_text())
    assert student.config.text_mode == "pseudo_report" and student.config.qformer_config.hidden_size == 16
    assert student.config.teacher_hidden_size == teacher_config["qformer_config"]["hidden_size"] == 32
    assert student.config.qformer_config.vocab_size == len(processor.tokenizer)
    assert json.loads((out / "eval_results.json").read_text())["eval_samples"] == 16


def test_offline_push_to_hub_fails_clearly_and_keeps_the_files(teacher_run):
    root, teacher_dir, _ = teacher_run
    out = root / "student_push"
    result = _run([EXAMPLES / "run_distillation.py", *TINY_DATA, *TINY_QFORMER, "--cache_dir", root / "cache",
                   "--teacher_model_name_or_path", teacher_dir, "--output_dir", out, "--text_mode", "image_only",
                   "--push_to_hub", "true", "--hub_model_id", "someone/qdistill-student"], cwd=root, check=False)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    log = result.stdout + result.stderr
    assert "HF_HUB_OFFLINE=1" in log and "Hub" in log and "someone/qdistill-student" in log
    student, _ = _assert_saved_model(out, "qdistill_student")
    assert student.config.text_mode == "image_only"


def test_missing_pseudo_reports_are_named(examples_on_path):
    import datasets

    check = examples_on_path["run_distillation"].check_pseudo_reports
    good = datasets.Dataset.from_dict({"study_id": ["a", "b"], "pseudo_report": ["Clear lungs.", "Effusion."]})
    check({"train": good}, "pseudo_report")
    holes = datasets.Dataset.from_dict({"study_id": ["a", "b", "c"], "pseudo_report": ["Clear.", None, "  "]})
    with pytest.raises(ValueError, match=r"2 of 3 studies of the validation split have no 'pseudo_report' "
                                         r"\(e.g. \['b', 'c'\]\); generate them with data_scripts/generate_pseudo"):
        check({"train": good, "validation": holes}, "pseudo_report")
    with pytest.raises(ValueError, match=r"The train split has no column 'pseudo_report'.*--pseudo_report_source"):
        check({"train": good.remove_columns("pseudo_report")}, "pseudo_report")
