"""Model cards with Hugging Face metadata, and `save_for_hub`: one call that writes a folder a Hub repo can serve."""

import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers.dynamic_module_utils import custom_object_save
from transformers.pipelines import PIPELINE_REGISTRY

from ..models.pipeline_qdistill import CXR_TRIAGE_TASK, CxrTriagePipeline, DEFAULT_THRESHOLD_SOURCE


logger = logging.getLogger(__name__)

# Keys of `qdistill_hf.evaluation.compute_triage_metrics` -> (metric id for the card metadata, readable name).
CARD_METRICS = {
    "auroc": ("roc_auc", "AUROC"),
    "average_precision": ("average_precision", "Average precision"),
    "accuracy": ("accuracy", "Accuracy"),
    "macro_f1": ("f1", "Macro F1"),
    "sensitivity": ("recall", "Sensitivity (urgent recall)"),
    "specificity": ("specificity", "Specificity"),
    "brier": ("brier_score", "Brier score"),
    "ece": ("expected_calibration_error", "Expected calibration error"),
}
BASE_TAGS = ("chest-x-ray", "radiology", "triage", "knowledge-distillation", "q-former", "medical-imaging", "qdistill")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _is_hub_id(name: str) -> bool:
    """A Hub repo id (`owner/name`) that is not a local path; local paths are never written into card metadata."""
    return bool(_HUB_ID.match(name)) and not os.path.exists(name)


def load_evaluation(evaluation) -> dict[str, dict[str, Any]]:
    """
    Read evaluation results for the card: `{model_name: {metric: value, ...}}`, as written by the evaluation tools
    (the keys of `compute_triage_metrics`: `auroc`, `auroc_ci_low`, `auroc_ci_high`, `accuracy`, ...; optional
    `dataset` and `split` name the data). A single metrics dict (with an `auroc` key at the top) is read as one
    entry named `"model"`.

    Args:
        evaluation (`dict`, `str` or `os.PathLike`): the dict or the path of its JSON file.

    Returns:
        `dict[str, dict]`, possibly empty.

    Raises:
        ValueError: the JSON cannot be parsed, or an entry or metric has the wrong type (the message names the file,
            the entry and the field).
    """
    source = "the evaluation dict"
    if isinstance(evaluation, (str, os.PathLike)):
        source = f"evaluation file {os.fspath(evaluation)!r}"
        try:
            evaluation = json.loads(Path(evaluation).read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{source} is not valid JSON: {error}") from error
    if not isinstance(evaluation, Mapping):
        raise ValueError(
            f"{source} must be a JSON object {{model_name: {{metric: value}}}}, got {type(evaluation).__name__}."
        )
    if "auroc" in evaluation and not isinstance(evaluation["auroc"], Mapping):
        evaluation = {"model": evaluation}
    entries = {}
    for name, metrics in evaluation.items():
        if not isinstance(metrics, Mapping):
            raise ValueError(f"{source}: entry {name!r} must be an object of metrics, got {type(metrics).__name__}.")
        for key in (*CARD_METRICS, "auroc_ci_low", "auroc_ci_high", "threshold"):
            value = metrics.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{source}: entry {name!r} field {key!r} must be a number, got {value!r}.")
        entries[str(name)] = dict(metrics)
    return entries


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _eval_results(metrics: dict, dataset: str, split: str, pipeline_tag: str) -> list[EvalResult]:
    results = []
    for key, (metric_type, readable) in CARD_METRICS.items():
        value = metrics.get(key)
        if not _finite(value):
            continue  # a NaN (e.g. AUROC of a one-class split) has no place in model-index; the table says n/a
        name = readable
        if key == "auroc" and _finite(metrics.get("auroc_ci_low")) and _finite(metrics.get("auroc_ci_high")):
            name = f"AUROC (95% bootstrap CI {metrics['auroc_ci_low']:.3f}-{metrics['auroc_ci_high']:.3f})"
        results.append(EvalResult(
            task_type=pipeline_tag if pipeline_tag != "other" else "image-classification",
            task_name="Chest X-ray triage (urgent vs non-urgent)",
            dataset_type=dataset, dataset_name=dataset, dataset_split=split,
            metric_type=metric_type, metric_name=name, metric_value=round(float(value), 4),
        ))
    return results


def _format(value) -> str:
    return f"{value:.3f}" if _finite(value) else "n/a"


def _evaluation_section(entries: dict, chosen: str | None, default_data: str = "not recorded") -> str:
    if not entries:
        return (
            "<!-- EVALUATION: filled from the evaluation JSON (save_for_hub(..., evaluation=...)) -->\n"
            "No evaluation was recorded with this checkpoint. Evaluate it on a test split never used for training, "
            "tokenizer building, model selection, calibration or threshold choice before drawing any conclusion."
        )
    lines = [
        "<!-- EVALUATION: filled from the evaluation JSON (save_for_hub(..., evaluation=...)) -->",
        "| model | data | AUROC (95% CI) | AP | accuracy | macro F1 | sensitivity | specificity | threshold |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in entries.items():
        ci = (f" ({_format(m.get('auroc_ci_low'))}-{_format(m.get('auroc_ci_high'))})"
              if _finite(m.get("auroc_ci_low")) else "")
        data = " / ".join(str(m[k]) for k in ("dataset", "split") if m.get(k)) or default_data
        marker = " (this checkpoint)" if name == chosen else ""
        lines.append(
            f"| {name}{marker} | {data} | {_format(m.get('auroc'))}{ci} | {_format(m.get('average_precision'))} | "
            f"{_format(m.get('accuracy'))} | {_format(m.get('macro_f1'))} | {_format(m.get('sensitivity'))} | "
            f"{_format(m.get('specificity'))} | {_format(m.get('threshold'))} |"
        )
    lines += [
        "",
        "Figures as recorded by the evaluation run, on its data only; the confidence interval is a bootstrap over "
        "studies of that split. They say nothing about other hospitals, scanners or populations.",
    ]
    return "\n".join(lines)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _describe(model) -> dict[str, Any]:
    config = model.config
    qformer = config.qformer_config
    vision = config.vision_config
    text_mode = getattr(config, "text_mode", None)
    if text_mode is None:
        kind, reads = "teacher", "the film and its radiology report"
    elif text_mode == "image_only":
        kind, reads = "image-only student", "the film only"
    else:
        kind, reads = "pseudo-report student", "the film and a pseudo-report generated from it"
    return {
        "kind": kind,
        "reads": reads,
        "text_mode": text_mode,
        "pipeline_tag": "image-classification" if text_mode == "image_only" else "other",
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "frozen": sum(p.numel() for p in model.parameters() if not p.requires_grad),
        "qformer": f"{qformer.num_query_tokens} queries, {_count(qformer.num_hidden_layers, 'layer')}, "
                   f"{qformer.num_attention_heads} heads, {qformer.hidden_size} wide",
        "vision": f"CLIP ViT ({_count(vision.num_hidden_layers, 'layer')}, {vision.hidden_size} wide, "
                  f"{vision.image_size} px, patch {vision.patch_size})",
    }


def _loss_section(model, training_args) -> str:
    config = model.config
    if getattr(config, "text_mode", None) is None:
        text = (f"Teacher loss `{config.itc_loss_weight} · ITC + {config.itm_loss_weight} · ITM + "
                f"{config.cls_loss_weight} · focal` (focal γ = {config.focal_gamma}).")
    else:
        text = f"Student focal loss on the labels (γ = {config.focal_gamma})."
        if training_args is not None and getattr(training_args, "logit_kd_weight", None) is not None:
            names = ("supervised_weight", "logit_kd_weight", "kd_temperature", "feature_mse_weight",
                     "feature_cosine_weight", "attention_alignment_weight")
            values = ", ".join(f"`{n}` = {getattr(training_args, n)}" for n in names if hasattr(training_args, n))
            text += f" Distilled from the frozen teacher with {values}."
    return text + " The vision encoder is frozen; only the Q-Former and the heads are trained."


def build_model_card(
    model,
    *,
    evaluation=None,
    evaluation_key: str | None = None,
    model_name: str | None = None,
    repo_id: str | None = None,
    license: str = "mit",
    base_model: str | None = None,
    datasets: Sequence[str] | str | None = None,
    training_data: str | None = None,
    training_args=None,
    compute: str | None = None,
    tags: Sequence[str] = (),
    eval_dataset: str | None = None,
    eval_split: str | None = None,
    training_procedure: str | None = None,
) -> ModelCard:
    """
    Build the Hub model card (README.md with YAML metadata) of a Q-DISTILL teacher or student.

    Metadata: `library_name: transformers`, `pipeline_tag` (`image-classification` for an image-only student, which
    the stock pipeline serves; `other` for models that also read text, served by the `cxr-triage` pipeline),
    `license`, `tags`, `datasets` and `base_model` (Hub ids only: local paths are named in the text instead),
    `metrics`, and `model-index` from the evaluation of this checkpoint.

    Args:
        model ([`QDistillTeacherModel`] or [`QDistillStudentModel`]): the model (its config fills the card).
        evaluation (`dict`, `str` or `os.PathLike`, *optional*): results, see [`load_evaluation`].
        evaluation_key (`str`, *optional*): the entry of `evaluation` that is this checkpoint (for `model-index`);
            defaults to the only entry, or the one named `model_name`. Every entry appears in the card's table.
        model_name (`str`, *optional*): the card's title and `model-index` name; defaults to the repo or class name.
        repo_id (`str`, *optional*): the Hub repo the usage snippet loads; defaults to `"<this folder>"`.
        license (`str`, *optional*, defaults to `"mit"`): the license of the weights.
        base_model (`str`, *optional*): the model this one was trained from (the teacher of a student, the encoder).
        datasets (`str` or `list[str]`, *optional*): training data names.
        training_data (`str`, *optional*): a paragraph on the training data (source, split, labels).
        training_args (*optional*): the `QDistillTrainingArguments` used; its distillation weights are listed.
        compute (`str`, *optional*): hardware and time of training.
        tags (`list[str]`, *optional*): extra tags.
        eval_dataset (`str`, *optional*), eval_split (`str`, *optional*): the data of the evaluation, when its
            entries carry no `dataset` / `split` (defaults: the first of `datasets` or `"custom"`, and `"test"`).
        training_procedure (`str`, *optional*): the text of the training-procedure section, instead of the one
            built from the config and `training_args`.

    Returns:
        `huggingface_hub.ModelCard`.
    """
    info = _describe(model)
    config = model.config
    entries = load_evaluation(evaluation) if evaluation is not None else {}
    name = model_name or (repo_id.split("/")[-1] if repo_id else f"qdistill-{info['kind'].replace(' ', '-')}")
    if evaluation_key is None and entries:
        evaluation_key = name if name in entries else (next(iter(entries)) if len(entries) == 1 else None)
        if evaluation_key is None:
            logger.warning(
                "The evaluation holds %d entries (%s) and none is named %r: model-index is left empty; pass "
                "evaluation_key= to choose this checkpoint's entry.", len(entries), ", ".join(entries), name,
            )
    elif evaluation_key is not None and evaluation_key not in entries:
        raise ValueError(f"evaluation_key {evaluation_key!r} is not in the evaluation entries {sorted(entries)}.")
    chosen = entries.get(evaluation_key) if evaluation_key else None
    datasets = [datasets] if isinstance(datasets, str) else list(datasets or [])
    hub_datasets = [d for d in datasets if _is_hub_id(d)]
    eval_results = None
    if chosen is not None:
        eval_results = _eval_results(
            chosen, str(chosen.get("dataset") or eval_dataset or (datasets[0] if datasets else "custom")),
            str(chosen.get("split") or eval_split or "test"), info["pipeline_tag"],
        ) or None
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag=info["pipeline_tag"],
        license=license,
        tags=list(dict.fromkeys(
            [*BASE_TAGS, info["kind"].split()[-1], *([info["text_mode"]] if info["text_mode"] else []), *tags]
        )),
        datasets=hub_datasets or None,
        base_model=base_model if base_model and _is_hub_id(base_model) else None,
        metrics=[metric_id for metric_id, _ in CARD_METRICS.values()],
        model_name=name,
        eval_results=eval_results,
    )
    repo = repo_id or "<this folder>"
    threshold = config.decision_threshold
    if threshold is not None:
        operating = (f"`decision_threshold` = {threshold} on the calibrated p(urgent), chosen by: "
                     f"{config.decision_rule or 'not recorded'}")
    else:
        operating = f"no stored threshold: the pipeline uses 0.5 and says so ({DEFAULT_THRESHOLD_SOURCE!r})"
    report_arg = "" if info["text_mode"] == "image_only" else ', report="..."'
    stock = (
        f'\n# the stock pipeline works too (softmax of the raw logits, no temperature):\n'
        f'print(pipeline("image-classification", model="{repo}", trust_remote_code=True)(film))'
        if info["text_mode"] == "image_only" else ""
    )
    lineage = f"\nTrained from: `{base_model}`." if base_model else ""
    body = f"""
# {name}

A Q-DISTILL chest X-ray triage **{info['kind']}** (`{type(model).__name__}`), built with
`qdistill_hf` and loadable with plain transformers (`trust_remote_code=True`). It reads
{info['reads']} and gives the probability that the film holds an urgent finding.{lineage}

> Research only. Not a medical device; not for clinical decisions, diagnosis or the exclusion of disease.

## How to use

```python
import numpy as np
from transformers import pipeline

triage = pipeline("cxr-triage", model="{repo}", trust_remote_code=True)
film = np.random.default_rng(0).integers(0, 256, (512, 512), dtype=np.uint8)  # your grey film: path, PIL or array
print(triage(film{report_arg}))  # label, calibrated probability, threshold and its source, per-class scores{stock}
```

`return_attention_map=True` adds the queries' attention over the film. Pin `revision=` when loading remote code.

## Model details

- Frozen vision encoder: {info['vision']}; {info['frozen']:,} frozen parameters.
- Q-Former: {info['qformer']}; {info['trainable']:,} trainable parameters.
- Labels: {', '.join(f"{k} = {v}" for k, v in sorted(config.id2label.items()))}.
- Calibration: `calibration_temperature` = {config.calibration_temperature} (`softmax(logits / T)`); operating point:
  {operating}.

## Intended use and out-of-scope use

Intended: research on report-supervised distillation for worklist triage, studied retrospectively. Out of scope:
any clinical use; lateral films, children, other body parts and modalities (the model was trained on frontal adult
chest films; a cheap check in the pipeline warns only for colour images, extreme aspect ratios and blank films).

## Training data

{training_data or "Not recorded with this checkpoint."}{(" Data: " + ", ".join(datasets) + ".") if datasets else ""}

## Training procedure

{training_procedure or _loss_section(model, training_args)}

## Evaluation

{_evaluation_section(entries, evaluation_key, " / ".join(x for x in (eval_dataset, eval_split) if x) or "not recorded")}

## Bias, risks and limitations

Labels scored from reports inherit the reports' and the scorer's errors; pseudo-reports can invent findings; the
encoder and the data come from specific hospitals and populations, and performance elsewhere is unknown. Binary
urgency is a coarse simplification of triage. A stored temperature and threshold were fitted on a validation split
of the training data; on other data they need refitting.

## Compute

{compute or "Not recorded."}

## Citation

Cite the original Q-DISTILL work, CheXzero (Tiu et al., *Nature Biomedical Engineering*, 2022) and BLIP-2 (Li et
al., ICML 2023).
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def write_model_card(folder, **card_kwargs) -> Path:
    """
    (Re)write `folder/README.md` for the model saved in `folder`, e.g. once the evaluation has run.

    Args:
        folder (`str` or `os.PathLike`): a folder saved by [`save_for_hub`] (or `save_pretrained`).
        card_kwargs: passed to [`build_model_card`] (`evaluation=`, `evaluation_key=`, ...). Without
            `training_args`, the training-procedure section of the existing README.md is kept.

    Returns:
        `Path`: the README.md written.
    """
    from transformers import AutoModel

    folder = Path(folder)
    model = AutoModel.from_pretrained(folder)
    path = folder / "README.md"
    if path.is_file() and card_kwargs.get("training_args") is None and "training_procedure" not in card_kwargs:
        # Keep what the first card said about training (its distillation weights came from the training arguments).
        match = re.search(r"^## Training procedure\n\n(.*?)\n\n## ", ModelCard.load(path).text, re.S | re.M)
        if match:
            card_kwargs["training_procedure"] = match.group(1).strip()
    build_model_card(model, **card_kwargs).save(path)
    return path


def _write_custom_pipeline(folder: Path) -> None:
    """Copy the pipeline file (and its relative imports) and declare the task in config.json's `custom_pipelines`."""
    info = PIPELINE_REGISTRY.supported_tasks[CXR_TRIAGE_TASK]
    custom_object_save(CxrTriagePipeline, folder)
    module = CxrTriagePipeline.__module__.split(".")[-1]
    entry = {"impl": f"{module}.{CxrTriagePipeline.__name__}", "pt": [c.__name__ for c in info["pt"]]}
    if "type" in info:
        entry["type"] = info["type"]
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["custom_pipelines"] = {CXR_TRIAGE_TASK: entry}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def push_folder_to_hub(folder, repo_id: str, *, token: str | None = None, private: bool | None = None,
                       commit_message: str = "Upload Q-DISTILL checkpoint", endpoint: str | None = None) -> str:
    """
    Upload a saved folder to the Hub (creating the repo if needed), or fail with a message that says nothing was
    uploaded and the local files are kept.

    Args:
        folder (`str` or `os.PathLike`): the folder written by [`save_for_hub`].
        repo_id (`str`): `owner/name`.
        token (`str`, *optional*), private (`bool`, *optional*), commit_message (`str`, *optional*),
        endpoint (`str`, *optional*): passed to `huggingface_hub.HfApi`.

    Returns:
        `str`: the URL of the commit.

    Raises:
        RuntimeError: offline (`HF_HUB_OFFLINE=1`) or any Hub/network/auth failure; the message names the repo and
            the folder, whose files are left as they are.
    """
    from huggingface_hub import HfApi, constants

    folder = Path(folder)
    keep = (f"Nothing was uploaded to {repo_id!r}; the files are kept in {folder}. Upload them later with "
            f"`hf upload {repo_id} {folder}`.")
    if constants.HF_HUB_OFFLINE:
        raise RuntimeError(f"push to the Hub: HF_HUB_OFFLINE=1, so the Hub cannot be reached. {keep}")
    try:
        api = HfApi(endpoint=endpoint, token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                                 ignore_patterns=["checkpoint-*", "_*"])
    except Exception as error:  # any Hub/network/auth failure: say so, keep the files
        raise RuntimeError(f"push to the Hub failed ({type(error).__name__}: {error}). {keep}") from error
    return str(getattr(info, "commit_url", info))


def save_for_hub(
    model,
    processor,
    folder,
    *,
    evaluation=None,
    push_to_hub: bool = False,
    repo_id: str | None = None,
    token: str | None = None,
    private: bool | None = None,
    **card_kwargs,
) -> Path:
    """
    Write everything a Hub repo needs to serve a Q-DISTILL model without `qdistill_hf`, in one call:

    - `model.safetensors` and `config.json` with `auto_map` (`AutoConfig`, `AutoModel`, and
      `AutoModelForImageClassification` for an image-only student) and the model files (`configuration_qdistill.py`,
      `modeling_qdistill.py`, `loss_qdistill.py`);
    - the processor: `processor_config.json` (image processor settings and `auto_map` for `AutoProcessor` /
      `AutoImageProcessor`), `processing_qdistill.py`, `tokenizer.json`, `tokenizer_config.json`;
    - the `cxr-triage` pipeline: `pipeline_qdistill.py` and `custom_pipelines` in `config.json`, so
      `pipeline("cxr-triage", model=repo, trust_remote_code=True)` works;
    - `README.md`: the model card from [`build_model_card`] (metadata and `model-index` from `evaluation`).

    Args:
        model: the teacher or student.
        processor ([`QDistillProcessor`]): image processor + tokenizer.
        folder (`str` or `os.PathLike`): output folder (created; files of the same names are overwritten).
        evaluation (*optional*): see [`load_evaluation`].
        push_to_hub (`bool`, *optional*): then upload the folder with [`push_folder_to_hub`] to `repo_id`.
        repo_id (`str`, *optional*): the Hub repo (also named in the card's usage snippet).
        token (`str`, *optional*), private (`bool`, *optional*): for the upload.
        card_kwargs: passed to [`build_model_card`].

    Returns:
        `Path`: the folder.

    Raises:
        RuntimeError: the push failed (the local files are complete and kept).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    _write_custom_pipeline(folder)
    card = build_model_card(model, evaluation=evaluation, repo_id=repo_id, **card_kwargs)
    card.save(folder / "README.md")
    logger.info("saved %s, its processor, the cxr-triage pipeline and the model card to %s",
                type(model).__name__, folder)
    if push_to_hub:
        if not repo_id:
            raise ValueError("push_to_hub=True needs repo_id='owner/name'.")
        push_folder_to_hub(folder, repo_id, token=token, private=private)
    return folder


__all__ = [
    "CARD_METRICS",
    "build_model_card",
    "load_evaluation",
    "push_folder_to_hub",
    "save_for_hub",
    "write_model_card",
]
