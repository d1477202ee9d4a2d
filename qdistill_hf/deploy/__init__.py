"""Deployment: int8 and pruned students, `torch.export` / ONNX export with calibration and preprocessing metadata.

`quantize.py` needs only torch; `export.py` needs `onnx`, `onnxscript` and `onnxruntime` for the ONNX path
(`pip install "qdistill_hf[deploy]"`).
"""

from .export import (
    EXPORT_FORMATS,
    NOT_TRIAGED,
    OUTPUT_NAMES,
    ImageOnlyTriageModule,
    OnnxTriageModel,
    PseudoReportTriageModule,
    export_metadata,
    export_student,
    load_metadata,
    quantize_onnx_int8,
    triage_module,
)
from .quantize import (
    compression_table,
    count_parameters,
    format_compression_table,
    predict_logits,
    prune_linear_magnitude,
    quantize_dynamic_int8,
    serialized_size,
    single_film_latency_ms,
)


__all__ = [
    "EXPORT_FORMATS",
    "NOT_TRIAGED",
    "OUTPUT_NAMES",
    "ImageOnlyTriageModule",
    "OnnxTriageModel",
    "PseudoReportTriageModule",
    "compression_table",
    "count_parameters",
    "export_metadata",
    "export_student",
    "format_compression_table",
    "load_metadata",
    "predict_logits",
    "prune_linear_magnitude",
    "quantize_dynamic_int8",
    "quantize_onnx_int8",
    "serialized_size",
    "single_film_latency_ms",
    "triage_module",
]
