"""Folders written by `save_for_hub` stand alone: a fresh process that cannot import qdistill_hf loads the model,
processor, image processor and both pipelines with `trust_remote_code=True` and gets the in-package outputs; the
model card's metadata parses; a push without network fails clearly and keeps the files; README's snippet runs."""

import io
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from transformers import AutoProcessor, pipeline

from qdistill_hf import QDistillProcessor
from qdistill_hf.sharing import build_model_card, load_evaluation, push_folder_to_hub, save_for_hub, write_model_card
from training_toys import toy_image_processor, toy_student, toy_teacher, toy_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
FILM = np.random.default_rng(3).integers(0, 256, (44, 38), dtype=np.uint8)
REPORT = "large pleural effusion"
EVALUATION = {
    "image_only": {"auroc": 0.8125, "auroc_ci_low": 0.7, "auroc_ci_high": 0.9, "accuracy": 0.75,
                   "macro_f1": float("nan"), "dataset": "cxr-paired", "split": "test"},
    "labels_only": {"auroc": 0.6},
}
HUB_FILES = {
    "README.md", "config.json", "model.safetensors", "configuration_qdistill.py", "modeling_qdistill.py",
    "loss_qdistill.py", "processing_qdistill.py", "pipeline_qdistill.py", "processor_config.json", "tokenizer.json",
    "tokenizer_config.json",
}


def _processor():
    return QDistillProcessor(image_processor=toy_image_processor(), tokenizer=toy_tokenizer())


@pytest.fixture(scope="module")
def hub_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    models = {
        "image_only": toy_student(text_mode="image_only"),
        "pseudo_report": toy_student(text_mode="pseudo_report"),
        "teacher": toy_teacher(),
    }
    models["image_only"].config.calibration_temperature = 2.0
    models["image_only"].config.decision_threshold = 0.3
    models["image_only"].config.decision_rule = "sensitivity >= 0.9 on validation (8 studies)"
    for name, model in models.items():
        save_for_hub(model.eval(), _processor(), root / name, evaluation=EVALUATION if name == "image_only" else None,
                     evaluation_key="image_only" if name == "image_only" else None, repo_id=f"someone/qdistill-{name}")
    return root, models


def _in_package_outputs(folder: Path, name: str, model) -> dict:
    """What the package itself gives for FILM: logits, pixel values, both pipelines (with the attention map)."""
    processor = _processor()
    text = None if name == "image_only" else REPORT
    inputs = processor(images=FILM, text=text)
    with torch.no_grad():
        logits = model(**inputs).logits
    triage = pipeline("cxr-triage", model=model, image_processor=processor.image_processor,
                      tokenizer=processor.tokenizer)
    kwargs = {} if name == "image_only" else {"report": REPORT}
    result = triage(FILM, return_attention_map=True, attention_map_format="png", **kwargs)
    out = {"logits": logits, "pixel_values": inputs["pixel_values"], "triage": result}
    if name == "image_only":
        out["classification"] = pipeline("image-classification", model=str(folder))(Image.fromarray(FILM))
    return out


BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "qdistill_hf" or name.startswith("qdistill_hf."):
                raise ImportError("qdistill_hf must not be imported in this process")
    sys.meta_path.insert(0, Block())
    """
)
# One fresh process for every check without the package (each start costs ~10 s of imports on the shared CPU).
REMOTE_SCRIPT = BLOCKER + textwrap.dedent(
    """
    import contextlib, io, json, os, traceback
    import numpy as np, torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification, AutoProcessor, pipeline
    from transformers.utils import logging
    logging.disable_progress_bar()
    torch.set_num_threads(1)
    root, report, out, film_path, snippet_path, snippet_cwd = sys.argv[1:7]
    film = np.load(film_path)
    for name in ("image_only", "pseudo_report", "teacher"):
        folder = os.path.join(root, name)
        text = None if name == "image_only" else report
        model = AutoModel.from_pretrained(folder, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        image_processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
        inputs = processor(images=film, text=text)
        assert torch.equal(image_processor(film)["pixel_values"], inputs["pixel_values"])
        with torch.no_grad():
            logits = model(**inputs).logits
        triage = pipeline("cxr-triage", model=folder, trust_remote_code=True)
        kwargs = {} if text is None else {"report": report}
        result = triage(film, return_attention_map=True, attention_map_format="png", **kwargs)
        attention_map = np.asarray(Image.open(io.BytesIO(result.pop("attention_map")))).copy()
        saved = {"logits": logits, "pixel_values": inputs["pixel_values"],
                 "attention_map": torch.from_numpy(attention_map)}
        info = {"triage": result, "classes": [type(o).__module__ + "." + type(o).__name__
                                              for o in (model, processor, image_processor, triage)]}
        if name == "image_only":
            info["classification"] = pipeline("image-classification", model=folder, trust_remote_code=True)(
                Image.fromarray(film))
        else:
            try:
                AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)
                info["image_classifier"] = "loaded"
            except ValueError as error:
                info["image_classifier"] = str(error).splitlines()[0]
        torch.save(saved, os.path.join(out, name + ".pt"))
        with open(os.path.join(out, name + ".json"), "w") as f:
            json.dump(info, f)
    os.chdir(snippet_cwd)
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            exec(compile(open(snippet_path).read(), "README.md", "exec"), {})
    except Exception:
        stdout.write("SNIPPET FAILED\\n" + traceback.format_exc())
    with open(os.path.join(out, "snippet.txt"), "w") as f:
        f.write(stdout.getvalue())
    with open(os.path.join(out, "imported.txt"), "w") as f:
        f.write(str("qdistill_hf" in sys.modules))
    """
)


@pytest.fixture(scope="module")
def remote(hub_folders, tmp_path_factory):
    """Run REMOTE_SCRIPT once over the three folders and README's cxr-triage snippet; return its output folder."""
    root, _ = hub_folders
    work = tmp_path_factory.mktemp("remote")
    np.save(work / "film.npy", FILM)
    (work / "snippet.py").write_text(_readme_snippet("cxr-triage"))
    snippet_cwd = work / "snippet_cwd"
    (snippet_cwd / "outputs" / "demo").mkdir(parents=True)
    os.symlink(root / "image_only", snippet_cwd / "outputs" / "demo" / "student")
    (work / "out").mkdir()
    script = work / "remote_script.py"
    script.write_text(REMOTE_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(work / "hf_home"), "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, str(script), str(root), REPORT, str(work / "out"), str(work / "film.npy"),
         str(work / "snippet.py"), str(snippet_cwd)],
        cwd=work, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (work / "out" / "imported.txt").read_text() == "False"
    return work


def test_save_for_hub_writes_every_file_a_repo_needs(hub_folders):
    root, _ = hub_folders
    for name in ("image_only", "pseudo_report", "teacher"):
        folder = root / name
        assert HUB_FILES <= set(os.listdir(folder)), name
        config = json.loads((folder / "config.json").read_text())
        assert config["custom_pipelines"] == {
            "cxr-triage": {"impl": "pipeline_qdistill.CxrTriagePipeline", "pt": ["AutoModel"], "type": "multimodal"}
        }
        expected = {"AutoConfig", "AutoModel"}
        if name == "image_only":
            expected.add("AutoModelForImageClassification")
        assert set(config["auto_map"]) == expected
        processor_config = json.loads((folder / "processor_config.json").read_text())
        assert processor_config["auto_map"] == {"AutoProcessor": "processing_qdistill.QDistillProcessor"}
        assert processor_config["image_processor"]["auto_map"]["AutoImageProcessor"] == (
            "processing_qdistill.QDistillImageProcessor"
        )
    # In the package the folder loads as before (the saved config is a normal config plus custom_pipelines).
    assert type(AutoProcessor.from_pretrained(root / "image_only")).__name__ == "QDistillProcessor"


@pytest.mark.parametrize("name", ["image_only", "pseudo_report", "teacher"])
def test_fresh_process_without_the_package_matches_the_package(hub_folders, remote, name):
    root, models = hub_folders
    folder = root / name
    saved = torch.load(remote / "out" / f"{name}.pt", weights_only=True)
    info = json.loads((remote / "out" / f"{name}.json").read_text())
    assert all(cls.startswith("transformers_modules.") for cls in info["classes"][:3]), info["classes"]
    assert info["classes"][3].endswith("pipeline_qdistill.CxrTriagePipeline")
    remote_map = saved["attention_map"]

    local = _in_package_outputs(folder, name, models[name])
    assert torch.equal(saved["pixel_values"], local["pixel_values"])
    assert torch.allclose(saved["logits"], local["logits"], atol=1e-6)
    local_triage = dict(local["triage"])
    local_map = np.asarray(Image.open(io.BytesIO(local_triage.pop("attention_map"))))
    assert info["triage"]["label"] == local_triage["label"]
    assert info["triage"]["threshold"] == local_triage["threshold"]
    assert info["triage"]["threshold_source"] == local_triage["threshold_source"]
    assert info["triage"]["probability"] == pytest.approx(local_triage["probability"], abs=1e-6)
    assert info["triage"]["scores"] == pytest.approx(local_triage["scores"], abs=1e-6)
    assert remote_map.shape == (44, 38)
    assert np.abs(remote_map.numpy().astype(int) - local_map.astype(int)).max() <= 1
    if name == "image_only":
        assert info["triage"]["threshold"] == 0.3
        assert info["triage"]["threshold_source"] == "sensitivity >= 0.9 on validation (8 studies)"
        remote_scores = {entry["label"]: entry["score"] for entry in info["classification"]}
        local_scores = {entry["label"]: entry["score"] for entry in local["classification"]}
        assert remote_scores == pytest.approx(local_scores, abs=1e-6) and set(remote_scores) == {"routine", "urgent"}
    else:
        assert info["triage"]["threshold_source"] == "default 0.5: not calibrated"
        # A model that reads text is no image classifier: its folder offers no AutoModelForImageClassification.
        assert "AutoModelForImageClassification" in info["image_classifier"], info["image_classifier"]


def test_model_card_metadata_parses_and_follows_the_evaluation(hub_folders, tmp_path):
    root, models = hub_folders
    card = ModelCard.load(root / "image_only" / "README.md")
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "image-classification"
    assert data.license == "mit" and {"chest-x-ray", "triage", "image_only"} <= set(data.tags)
    assert "roc_auc" in data.metrics and data.model_name == "qdistill-image_only"
    results = {r.metric_type: r for r in data.eval_results}
    assert set(results) == {"roc_auc", "accuracy"}  # macro_f1 is NaN: left out of model-index
    assert results["roc_auc"].metric_value == 0.8125 and results["roc_auc"].dataset_split == "test"
    assert results["roc_auc"].metric_name == "AUROC (95% bootstrap CI 0.700-0.900)"
    assert results["roc_auc"].dataset_name == "cxr-paired"
    assert "| labels_only | not recorded | 0.600 |" in card.text
    assert 'pipeline("cxr-triage", model="someone/qdistill-image_only", trust_remote_code=True)' in card.text
    assert "sensitivity >= 0.9 on validation (8 studies)" in card.text
    for name in ("pseudo_report", "teacher"):
        other = ModelCard.load(root / name / "README.md")
        assert other.data.pipeline_tag == "other" and other.data.eval_results is None
        assert "No evaluation was recorded" in other.text and 'report="..."' in other.text

    path = tmp_path / "evaluation.json"
    path.write_text(json.dumps(EVALUATION["image_only"]))
    single = build_model_card(models["image_only"], evaluation=path, base_model="openai/clip-vit-base-patch32")
    assert single.data.base_model == "openai/clip-vit-base-patch32"
    assert {r.metric_type for r in single.data.eval_results} == {"roc_auc", "accuracy"}
    local = build_model_card(models["image_only"], base_model=str(tmp_path))  # a local path is no Hub id
    assert local.data.base_model is None and f"Trained from: `{tmp_path}`" in local.text
    # The card is rewritten once the evaluation exists, keeping what the first card said about training.
    folder = tmp_path / "distilled"
    args = type("Args", (), {"logit_kd_weight": 1.0, "kd_temperature": 2.0, "supervised_weight": 0.5})()
    save_for_hub(models["image_only"], _processor(), folder, training_args=args)
    first = (folder / "README.md").read_text()
    assert "`supervised_weight` = 0.5, `logit_kd_weight` = 1.0, `kd_temperature` = 2.0" in first
    write_model_card(folder, evaluation=EVALUATION["labels_only"], eval_dataset="synthetic", eval_split="validation")
    rewritten = ModelCard.load(folder / "README.md")
    assert [(r.metric_type, r.metric_value, r.dataset_name, r.dataset_split) for r in rewritten.data.eval_results] == [
        ("roc_auc", 0.6, "synthetic", "validation")
    ]
    assert "`logit_kd_weight` = 1.0" in rewritten.text
    assert "| model (this checkpoint) | synthetic / validation |" in rewritten.text
    path.write_text("{not json")
    with pytest.raises(ValueError, match="evaluation file .*evaluation.json.* is not valid JSON"):
        load_evaluation(path)
    with pytest.raises(ValueError, match="entry 'student' field 'auroc' must be a number"):
        load_evaluation({"student": {"auroc": "high"}})
    with pytest.raises(ValueError, match="evaluation_key 'missing'"):
        build_model_card(models["image_only"], evaluation=EVALUATION, evaluation_key="missing")


def test_push_without_network_fails_clearly_and_keeps_the_files(hub_folders, tmp_path, monkeypatch):
    _, models = hub_folders
    folder = tmp_path / "push"
    with pytest.raises(RuntimeError, match=r"HF_HUB_OFFLINE=1.*Nothing was uploaded to 'someone/x'.*kept in .*push"):
        save_for_hub(models["image_only"], _processor(), folder, push_to_hub=True, repo_id="someone/x")
    assert HUB_FILES <= set(os.listdir(folder))
    assert pipeline("cxr-triage", model=str(folder), trust_remote_code=True)(FILM)["label"] in {"routine", "urgent"}
    # Online mode but no reachable Hub (a closed local port): the same promise.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(RuntimeError, match=r"push to the Hub failed .*Nothing was uploaded.*hf upload someone/x"):
        push_folder_to_hub(folder, "someone/x", token="hf_not_a_token", endpoint="http://127.0.0.1:9")
    assert HUB_FILES <= set(os.listdir(folder))


def _readme_snippet(marker: str) -> str:
    text = (REPO_ROOT / "README.md").read_text()
    match = re.search(rf"<!-- snippet: {marker} -->\s*```python\n(.*?)```", text, re.S)
    assert match, f"README.md has no code block after <!-- snippet: {marker} -->"
    return match.group(1)


def test_readme_usage_snippet_runs_as_pasted_without_the_package(remote):
    snippet = _readme_snippet("cxr-triage")
    assert "outputs/demo/student" in snippet and "trust_remote_code=True" in snippet
    output = (remote / "out" / "snippet.txt").read_text()
    assert "SNIPPET FAILED" not in output, output
    last = output.strip().splitlines()[-1]
    pattern = r"(routine|urgent) (0\.\d+) threshold: 0\.3 sensitivity >= 0\.9 on validation \(8 studies\)"
    match = re.fullmatch(pattern, last)
    assert match, last
    assert Image.open(remote / "snippet_cwd" / "attention.png").size == (512, 512)


def test_readme_automodel_snippet_runs_as_pasted(hub_folders, tmp_path, monkeypatch, capsys):
    root, models = hub_folders
    snippet = _readme_snippet("automodel")
    (tmp_path / "outputs" / "demo").mkdir(parents=True)
    os.symlink(root / "image_only", tmp_path / "outputs" / "demo" / "student")
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "README.md", "exec"), {})
    label, probability = capsys.readouterr().out.split()[-2:]
    film = np.random.default_rng(0).integers(0, 256, (512, 512), dtype=np.uint8)
    with torch.no_grad():
        logits = models["image_only"](**_processor()(images=[film])).logits
    expected = torch.softmax(logits / 2.0, dim=-1)[0, 1]
    assert float(probability) == pytest.approx(float(expected), abs=1e-6)
    assert label == ("urgent" if float(expected) >= 0.3 else "routine")


def test_repository_model_card_metadata_parses_and_repeats_figures_of_its_text():
    card = ModelCard.load(REPO_ROOT / "MODEL_CARD.md")
    data = card.data
    assert data.library_name == "transformers" and data.license == "mit" and data.pipeline_tag == "image-classification"
    assert data.base_model == "openai/clip-vit-base-patch32" and data.datasets == ["synthetic", "cxr-paired"]
    assert "roc_auc" in data.metrics and "chest-x-ray" in data.tags
    assert {r.metric_type for r in data.eval_results} == {"roc_auc", "accuracy"}
    for result in data.eval_results:  # model-index repeats figures the card's text states, never others
        assert f"{result.metric_value:.3f}" in card.text
    for section in ("Model description", "How to use", "Intended use", "Out-of-scope use", "Training data",
                    "Training procedure", "Evaluation", "Bias, risks and limitations", "Compute", "Citation"):
        assert f"\n## {section}\n" in card.text, section
    assert "**Real data, pipeline check**" in card.text and "Not for clinical use" in card.text
