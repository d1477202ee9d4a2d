"""Q-DISTILL chest X-ray triage: teacher and student Q-Formers native to Hugging Face transformers."""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from .configuration_qdistill import QDistillStudentConfig, QDistillTeacherConfig, QFormerConfig
from .modeling_qdistill import (
    QDistillPreTrainedModel,
    QDistillQFormerModel,
    QDistillStudentModel,
    QDistillStudentOutput,
    QDistillTeacherModel,
    QDistillTeacherOutput,
    build_qformer_attention_mask,
)


__version__ = "0.1.0"

# `import qdistill_hf` makes AutoConfig/AutoModel resolve our model types without remote code ...
AutoConfig.register(QFormerConfig.model_type, QFormerConfig, exist_ok=True)
AutoConfig.register(QDistillTeacherConfig.model_type, QDistillTeacherConfig, exist_ok=True)
AutoConfig.register(QDistillStudentConfig.model_type, QDistillStudentConfig, exist_ok=True)
AutoModel.register(QDistillTeacherConfig, QDistillTeacherModel, exist_ok=True)
AutoModel.register(QDistillStudentConfig, QDistillStudentModel, exist_ok=True)
AutoModelForImageClassification.register(QDistillStudentConfig, QDistillStudentModel, exist_ok=True)

# ... and `save_pretrained` writes `auto_map` and copies the flat model files, so a saved folder or Hub repo also
# loads with `trust_remote_code=True` where qdistill_hf is not installed.
QDistillTeacherConfig.register_for_auto_class()
QDistillStudentConfig.register_for_auto_class()
QDistillTeacherModel.register_for_auto_class("AutoModel")
QDistillStudentModel.register_for_auto_class("AutoModel")

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
]
