"""Q-DISTILL chest X-ray triage: teacher and student Q-Formers native to Hugging Face transformers.

Layout, by concern (each layer may import the ones above it, never a peer beside it):

- `models/`: what a Hub repo carries (configuration, modeling, loss, processing, tokenization); flat among
  themselves and importing only torch, transformers, tokenizers and each other.
- `utils.py`: the few helpers every tooling layer shares.
- `labels/`: the label policy (what "urgent" means) and the report scorers (rules, LLM).
- `data/`: the `datasets` builder, synthetic films, the frozen-feature cache.
- `reports/`: pseudo-report generation and the resumable sharded runner.
- `convert/`: CheXzero (OpenAI CLIP) -> `CLIPVisionModel`.
- `evaluation/`: triage metrics with confidence intervals, calibration and operating points, retrieval recall.
- `training/`: training arguments, collators, the teacher and distillation Trainers, callbacks.
- `sharing/`: stand-alone Hub folders with model cards, the `qdistill-triage` worklist CLI.
- `deploy/`: int8 and pruned students, `torch.export`/ONNX export.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification
from transformers.pipelines import PIPELINE_REGISTRY

from .models.configuration_qdistill import QDistillStudentConfig, QDistillTeacherConfig, QFormerConfig
from .models.modeling_qdistill import (
    QDistillPreTrainedModel,
    QDistillQFormerModel,
    QDistillStudentModel,
    QDistillStudentOutput,
    QDistillTeacherModel,
    QDistillTeacherOutput,
    build_qformer_attention_mask,
)
from .models.processing_qdistill import QDistillImageProcessor, QDistillProcessor, register_processing_auto_classes
from .models.pipeline_qdistill import CXR_TRIAGE_TASK, CxrTriagePipeline, QDistillImageOnlyStudentLoader
from .models.tokenization_qdistill import build_report_tokenizer, train_report_tokenizer


__version__ = "0.1.0"

# `import qdistill_hf` makes AutoConfig/AutoModel resolve our model types without remote code ...
AutoConfig.register(QFormerConfig.model_type, QFormerConfig, exist_ok=True)
AutoConfig.register(QDistillTeacherConfig.model_type, QDistillTeacherConfig, exist_ok=True)
AutoConfig.register(QDistillStudentConfig.model_type, QDistillStudentConfig, exist_ok=True)
AutoModel.register(QDistillTeacherConfig, QDistillTeacherModel, exist_ok=True)
AutoModel.register(QDistillStudentConfig, QDistillStudentModel, exist_ok=True)
# Only an image_only student is an image classifier (a pseudo_report one needs input_ids): the loader refuses the
# latter, and saved folders carry `AutoModelForImageClassification` in `auto_map` only for the former.
AutoModelForImageClassification.register(QDistillStudentConfig, QDistillImageOnlyStudentLoader, exist_ok=True)
PIPELINE_REGISTRY.register_pipeline(
    CXR_TRIAGE_TASK, pipeline_class=CxrTriagePipeline, pt_model=AutoModel, type="multimodal"
)

# ... and `save_pretrained` writes `auto_map` and copies the flat model files, so a saved folder or Hub repo also
# loads with `trust_remote_code=True` where qdistill_hf is not installed.
QDistillTeacherConfig.register_for_auto_class()
QDistillStudentConfig.register_for_auto_class()
QDistillTeacherModel.register_for_auto_class("AutoModel")
QDistillStudentModel.register_for_auto_class("AutoModel")
register_processing_auto_classes((QDistillTeacherConfig, QDistillStudentConfig))

# Tooling needs `datasets`/`accelerate`; it is imported on first use so `import qdistill_hf` stays light.
_LAZY = {
    "load_cxr_dataset": "data.data_cxr",
    "DataCxr": "data.data_cxr",
    "CxrBuilderConfig": "data.data_cxr",
    "cache_image_features": "data.feature_cache",
    "feature_fingerprint": "data.feature_cache",
    "features_as_torch": "data.feature_cache",
    "score_report": "labels.priority_rules",
    "QDistillTrainingArguments": "training",
    "QDistillDataCollator": "training",
    "QDistillTeacherTrainer": "training",
    "QDistillDistillationTrainer": "training",
    "cache_teacher_targets": "training",
    "compute_auroc_metrics": "training",
    "compute_triage_metrics": "evaluation",
    "make_compute_metrics": "evaluation",
    "fit_temperature": "evaluation",
    "choose_threshold": "evaluation",
    "calibrate_model": "evaluation",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "QFormerConfig",
    "QDistillTeacherConfig",
    "QDistillStudentConfig",
    "QDistillPreTrainedModel",
    "QDistillQFormerModel",
    "QDistillTeacherModel",
    "QDistillStudentModel",
    "QDistillTeacherOutput",
    "QDistillStudentOutput",
    "build_qformer_attention_mask",
    "QDistillImageProcessor",
    "QDistillProcessor",
    "register_processing_auto_classes",
    "CXR_TRIAGE_TASK",
    "CxrTriagePipeline",
    "train_report_tokenizer",
    "build_report_tokenizer",
    *_LAZY,
]
