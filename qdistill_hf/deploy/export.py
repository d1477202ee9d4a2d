"""
Export a Q-DISTILL student to a self-describing file: `torch.export` (`.pt2`) or ONNX (`.onnx`, onnxruntime).

The exported graph maps processed films (and, for a `pseudo_report` student, the pseudo-report's token ids and
attention mask) to four outputs:

- `logits` `(batch, num_labels)` float32: the student's triage logits;
- `probabilities` `(batch, num_labels)` float32: the calibrated probabilities `softmax(logits / T)` with the
  model's `config.calibration_temperature` baked in ([`QDistillPreTrainedModel.triage_probabilities`]);
- `decisions` `(batch,)` int64: the class at the stored operating point (`config.decision_threshold` on p(class 1),
  argmax when none; [`QDistillPreTrainedModel.triage_decisions`]), and **-1 for a film that was not triaged** because
  its `pixel_values` (or its logits) are not finite;
- `input_finite` `(batch,)` bool: whether that row's `pixel_values` and logits are all finite.

Input validation. The eager model raises on a non-finite film, an out-of-vocabulary token id or an all-padding
report; those checks read tensor values on the host and are not part of an exported graph (under `torch.export`
`torch.compiler.is_compiling()` is true and the model skips them, as under `torch.compile`). The graph keeps the one
cheap check that matters for triage, in-graph: a NaN probability compared with a threshold would read as
"non-urgent", so such rows get decision -1 and `input_finite = False` instead. Everything else is the caller's job:
feed films through the processor recorded in the metadata (it refuses broken images), and token ids from the
model's tokenizer (ids outside the vocabulary make the ONNX Gather fail or read garbage). Shapes are checked by the
runtimes (dynamic batch; image size fixed).

Metadata. The file carries everything needed to feed it: `image_processor` (the processor's JSON, rebuilt with
`QDistillImageProcessor(**load_metadata(path)["image_processor"])`), and the key constants separately (`image_size`, `image_mean`,
`image_std`, `resample`, `resize_mode`, `do_rescale`, `rescale_factor`), `calibration_temperature`,
`decision_threshold`, `decision_rule`, `id2label`, `text_mode`, `inputs`, `outputs`, `input_validation`. In ONNX they
are `metadata_props` (onnxruntime: `session.get_modelmeta().custom_metadata_map`); in `.pt2` the file
`qdistill_metadata.json` of `torch.export.save(..., extra_files=...)`. Values are JSON strings.
"""

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..models.processing_qdistill import QDistillImageProcessor


logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("onnx", "torch_export")
METADATA_FILE = "qdistill_metadata.json"
OUTPUT_NAMES = ("logits", "probabilities", "decisions", "input_finite")
NOT_TRIAGED = -1


class _TriageOutputs(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def _outputs(self, pixel_values, input_ids=None, attention_mask=None):
        logits = self.model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask).logits
        logits = logits.float()
        probabilities = self.model.triage_probabilities(logits)
        finite = torch.isfinite(pixel_values).flatten(1).all(dim=1) & torch.isfinite(logits).all(dim=1)
        decisions = torch.where(finite, self.model.triage_decisions(probabilities), NOT_TRIAGED)
        return logits, probabilities, decisions, finite


class ImageOnlyTriageModule(_TriageOutputs):
    """`pixel_values -> (logits, probabilities, decisions, input_finite)` of an image-only student (eval mode)."""

    def forward(self, pixel_values: torch.Tensor):
        return self._outputs(pixel_values)


class PseudoReportTriageModule(_TriageOutputs):
    """`(pixel_values, input_ids, attention_mask) -> (logits, probabilities, decisions, input_finite)`."""

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return self._outputs(pixel_values, input_ids, attention_mask)


def triage_module(model: nn.Module) -> nn.Module:
    """The export wrapper of a student: [`ImageOnlyTriageModule`] or [`PseudoReportTriageModule`] by its text mode."""
    text_mode = getattr(model.config, "text_mode", None)
    if text_mode == "image_only":
        return ImageOnlyTriageModule(model)
    if text_mode == "pseudo_report":
        return PseudoReportTriageModule(model)
    raise ValueError(
        f"export_student exports a Q-DISTILL student (config.text_mode 'image_only' or 'pseudo_report'); got a "
        f"{type(model).__name__} with text_mode={text_mode!r}."
    )


def export_metadata(model: nn.Module, image_processor: QDistillImageProcessor | None = None) -> dict[str, str]:
    """
    The metadata written into an exported file (every value a JSON string): preprocessing, calibration, operating
    point, labels and the input/output contract. See the module docstring.

    Args:
        model (`nn.Module`): the student.
        image_processor ([`QDistillImageProcessor`], *optional*): the processor the model was trained with; default
            `QDistillImageProcessor(size=<the model's image size>)` (a warning is logged).
    """
    import qdistill_hf

    config = model.config
    image_size = int(config.vision_config.image_size)
    if image_processor is None:
        logger.warning(
            "export_student: no image processor given; the metadata records the default QDistillImageProcessor "
            "(pad, bicubic, OpenAI-CLIP mean/std) at %d px. Pass the processor the model was trained with.", image_size
        )
        image_processor = QDistillImageProcessor(size={"height": image_size, "width": image_size})
    size = image_processor.size
    height, width = (size.get("height"), size.get("width")) if isinstance(size, dict) else (size.height, size.width)
    if (height, width) != (image_size, image_size):
        raise ValueError(
            f"The image processor resizes to {height}x{width} but the model's vision encoder takes "
            f"{image_size}x{image_size} films; pass the processor saved with this model."
        )
    resample = image_processor.resample
    resample_name = getattr(resample, "name", None) or {0: "NEAREST", 2: "BILINEAR", 3: "BICUBIC"}.get(int(resample))
    text_mode = config.text_mode
    inputs = {"pixel_values": f"float32 (batch, 3, {image_size}, {image_size}), from the image processor"}
    if text_mode == "pseudo_report":
        inputs["input_ids"] = "int64 (batch, text_length), the pseudo-report's token ids ([CLS] ... [SEP], [PAD]=0)"
        inputs["attention_mask"] = "int64 (batch, text_length), 1 on real tokens"
    metadata = {
        "qdistill_hf_version": qdistill_hf.__version__,
        "model_type": config.model_type,
        "text_mode": text_mode,
        "image_size": image_size,
        "image_mean": [float(v) for v in image_processor.image_mean],
        "image_std": [float(v) for v in image_processor.image_std],
        "resample": resample_name,
        "resize_mode": image_processor.resize_mode,
        "do_rescale": bool(image_processor.do_rescale),
        "rescale_factor": float(image_processor.rescale_factor),
        "do_convert_rgb": bool(image_processor.do_convert_rgb),
        "image_processor": image_processor.to_json_string(),
        "calibration_temperature": float(config.calibration_temperature),
        "decision_threshold": config.decision_threshold,
        "decision_rule": config.decision_rule,
        "id2label": {str(k): v for k, v in config.id2label.items()},
        "inputs": inputs,
        "outputs": {
            "logits": "float32 (batch, num_labels)",
            "probabilities": "float32 (batch, num_labels), softmax(logits / calibration_temperature)",
            "decisions": f"int64 (batch,), class id at the operating point; {NOT_TRIAGED} = not triaged (non-finite)",
            "input_finite": "bool (batch,), pixel_values and logits of the row are finite",
        },
        "input_validation": (
            "In-graph: rows with non-finite pixel_values or logits get decisions = -1 and input_finite = False. "
            "Not in the graph (the caller's job): image decoding and range checks (use the recorded image processor), "
            "token ids inside the vocabulary, no all-padding report."
        ),
    }
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()}


def _example_inputs(model: nn.Module, batch_size: int, text_length: int):
    vision = model.config.vision_config
    generator = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    pixel_values = torch.randn(batch_size, 3, vision.image_size, vision.image_size, generator=generator).to(device)
    if model.config.text_mode == "image_only":
        return (pixel_values,)
    qcfg = model.config.qformer_config
    input_ids = torch.randint(5, qcfg.vocab_size, (batch_size, text_length), generator=generator)
    input_ids[:, 0] = 2
    input_ids[:, -1] = 3
    attention_mask = torch.ones_like(input_ids)
    if batch_size > 1:  # one padded row, so the traced graph is the general (masked) one
        input_ids[-1, text_length // 2 :] = 0
        input_ids[-1, text_length // 2 - 1] = 3
        attention_mask[-1, text_length // 2 :] = 0
    return pixel_values, input_ids.to(device), attention_mask.to(device)


def _dynamic_shapes(model: nn.Module, dynamic_batch: bool):
    batch = torch.export.Dim("batch", min=1, max=65536) if dynamic_batch else None
    pixel = {0: batch} if dynamic_batch else {}
    if model.config.text_mode == "image_only":
        return {"pixel_values": pixel}
    max_tokens = int(model.config.qformer_config.max_position_embeddings)
    text = torch.export.Dim("text_length", min=2, max=max_tokens)
    token = {0: batch, 1: text} if dynamic_batch else {1: text}
    return {"pixel_values": pixel, "input_ids": token, "attention_mask": dict(token)}


def export_student(
    model: nn.Module,
    path: str | os.PathLike,
    format: str = "onnx",
    batch_size: int | str = "dynamic",
    image_processor: QDistillImageProcessor | None = None,
    opset_version: int | None = None,
) -> Path:
    """
    Export a student to `path` as an ONNX file (`format="onnx"`, one file, weights inside) or a `torch.export`
    program (`format="torch_export"`, a `.pt2` archive), with its outputs, calibration and preprocessing metadata
    described in the module docstring.

    `image_only` students take `pixel_values`; `pseudo_report` students also take `input_ids` and `attention_mask`
    (dynamic text length from 2 to `max_position_embeddings`). The model is exported in eval mode, in float32, on its
    device (export on CPU for an ONNX Runtime CPU file); its training mode is restored afterwards.

    Args:
        model (`nn.Module`): a [`QDistillStudentModel`].
        path (`str` or `os.PathLike`): output file (`.onnx` or `.pt2` by convention).
        format (`str`, *optional*, defaults to `"onnx"`): `"onnx"` or `"torch_export"`.
        batch_size (`int` or `"dynamic"`, *optional*, defaults to `"dynamic"`): a fixed batch size, or a dynamic
            batch dimension (any batch >= 1).
        image_processor ([`QDistillImageProcessor`], *optional*): recorded in the metadata; see [`export_metadata`].
        opset_version (`int`, *optional*): ONNX opset (default: torch's exporter default).

    Returns:
        `Path` of the written file.

    Raises:
        ValueError: for an unknown format, a bad batch size, a model that is not a student, or a processor whose
            size does not match the model.

    Example:

    ```python
    >>> export_student(student, "student.onnx", image_processor=processor.image_processor)
    >>> session = OnnxTriageModel("student.onnx")
    >>> session(pixel_values)["probabilities"]
    ```
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {EXPORT_FORMATS}, got {format!r}.")
    dynamic_batch = batch_size == "dynamic"
    if not dynamic_batch and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be 'dynamic' or a positive integer, got {batch_size!r}.")
    wrapper = triage_module(model)
    metadata = export_metadata(model, image_processor)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example_batch = 2 if dynamic_batch else batch_size
    text_length = min(8, int(model.config.qformer_config.max_position_embeddings))
    args = _example_inputs(model, example_batch, text_length)
    input_names = ["pixel_values"] if len(args) == 1 else ["pixel_values", "input_ids", "attention_mask"]
    shapes = _dynamic_shapes(model, dynamic_batch)
    was_training = model.training
    model.eval()
    wrapper.eval()
    try:
        # no_grad: the frozen encoder's `set_grad_enabled` block is then a no-op instead of a higher-order op that
        # `torch.export.save` cannot serialise.
        with torch.no_grad():
            if format == "torch_export":
                program = torch.export.export(wrapper, args, dynamic_shapes=shapes)
                torch.export.save(program, path, extra_files={METADATA_FILE: json.dumps(metadata)})
            else:
                _export_onnx(wrapper, args, path, input_names, shapes, metadata, opset_version)
    finally:
        model.train(was_training)
    logger.info("exported %s student to %s (%s, batch %s)", model.config.text_mode, path, format, batch_size)
    return path


def _export_onnx(wrapper, args, path, input_names, shapes, metadata, opset_version):
    try:
        import onnx
        import onnxscript  # noqa: F401 - torch.onnx's dynamo exporter needs it
    except ImportError as error:
        raise ImportError(
            "ONNX export needs onnx and onnxscript: pip install 'qdistill_hf[deploy]' (onnx, onnxruntime, onnxscript)."
        ) from error
    torch.onnx.export(
        wrapper, args, str(path), input_names=input_names, output_names=list(OUTPUT_NAMES), dynamo=True,
        external_data=False, dynamic_shapes=shapes, opset_version=opset_version,
    )
    proto = onnx.load(str(path))
    set_onnx_metadata(proto, metadata)
    onnx.save(proto, str(path))


def set_onnx_metadata(proto, metadata: dict[str, str]):
    """Replace the `metadata_props` of an ONNX `ModelProto` with `metadata` (string values)."""
    import onnx

    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {str(key): str(value) for key, value in metadata.items()})


def load_metadata(path: str | os.PathLike) -> dict:
    """The metadata of an exported file (`.onnx` or `.pt2`), JSON values decoded."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No exported student at {path}.")
    if path.suffix == ".onnx":
        import onnx

        raw = {prop.key: prop.value for prop in onnx.load(str(path), load_external_data=False).metadata_props}
    else:
        extra = {METADATA_FILE: ""}
        torch.export.load(path, extra_files=extra)
        if not extra[METADATA_FILE]:
            raise ValueError(f"{path} has no {METADATA_FILE}: it was not written by export_student.")
        raw = json.loads(extra[METADATA_FILE])
    return {key: _decode(value) for key, value in raw.items()}


def _decode(value: str):
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return value


def quantize_onnx_int8(source: str | os.PathLike, destination: str | os.PathLike) -> Path:
    """
    Dynamic int8 quantization of an exported ONNX student with `onnxruntime.quantization.quantize_dynamic`
    (int8 weights of the MatMul/Gemm nodes, activations quantized at run time), keeping its metadata. Expected
    change: max |delta p| of a few 1e-3 on a random tiny student (the tests bound it by 0.05).

    Args:
        source (`str` or `os.PathLike`): a file from [`export_student`] with `format="onnx"`.
        destination (`str` or `os.PathLike`): the int8 file to write.

    Returns:
        `Path` of the int8 file.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source, destination = Path(source), Path(destination)
    metadata = {prop.key: prop.value for prop in onnx.load(str(source)).metadata_props}
    quantize_dynamic(str(source), str(destination), weight_type=QuantType.QInt8)
    proto = onnx.load(str(destination))
    set_onnx_metadata(proto, {**metadata, "quantization": "onnxruntime quantize_dynamic, QInt8 weights"})
    onnx.save(proto, str(destination))
    return destination


class OnnxTriageModel:
    """
    An ONNX Runtime CPU session over a file from [`export_student`], with its metadata.

    Args:
        path (`str` or `os.PathLike`): the `.onnx` file.
        threads (`int`, *optional*): `intra_op_num_threads` (default: ONNX Runtime's choice).
        providers (`list[str]`, *optional*): execution providers (default `["CPUExecutionProvider"]`).

    Example:

    ```python
    >>> model = OnnxTriageModel("student.onnx", threads=1)
    >>> outputs = model(pixel_values)           # numpy arrays by output name
    >>> outputs["decisions"], model.metadata["id2label"]
    ```
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None, providers: list[str] | None = None):
        import onnxruntime

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"No ONNX file at {self.path}.")
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(
            str(self.path), options, providers=providers or ["CPUExecutionProvider"]
        )
        raw = self.session.get_modelmeta().custom_metadata_map
        self.metadata = {key: _decode(value) for key, value in raw.items()}
        self.input_names = [node.name for node in self.session.get_inputs()]

    def __call__(self, pixel_values, input_ids=None, attention_mask=None) -> dict[str, np.ndarray]:
        """Run the graph; returns `{"logits", "probabilities", "decisions", "input_finite"}` as numpy arrays."""
        feed = {"pixel_values": _numpy(pixel_values, np.float32)}
        if "input_ids" in self.input_names:
            if input_ids is None:
                raise ValueError(f"{self.path} is a pseudo_report student: pass input_ids and attention_mask.")
            feed["input_ids"] = _numpy(input_ids, np.int64)
            feed["attention_mask"] = _numpy(
                attention_mask if attention_mask is not None else np.ones_like(feed["input_ids"]), np.int64
            )
        elif input_ids is not None:
            raise ValueError(f"{self.path} is an image_only student: it takes no input_ids.")
        return dict(zip([node.name for node in self.session.get_outputs()], self.session.run(None, feed)))

    def predict_logits(self, pixel_values) -> torch.Tensor:
        """Float32 logits as a torch tensor (for [`compression_table`]; image-only files)."""
        return torch.from_numpy(self(pixel_values)["logits"])

    def num_parameters(self) -> int:
        """Elements of the graph's initializers (weights and constants; int8 files count their int8 weights)."""
        import onnx

        proto = onnx.load(str(self.path))
        return int(sum(int(np.prod(tensor.dims)) for tensor in proto.graph.initializer))

    def serialized_bytes(self) -> int:
        """Size of the `.onnx` file."""
        return self.path.stat().st_size


def _numpy(value, dtype) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(value, dtype=dtype))


__all__ = [
    "EXPORT_FORMATS",
    "ImageOnlyTriageModule",
    "NOT_TRIAGED",
    "OUTPUT_NAMES",
    "OnnxTriageModel",
    "PseudoReportTriageModule",
    "export_metadata",
    "export_student",
    "load_metadata",
    "quantize_onnx_int8",
    "set_onnx_metadata",
    "triage_module",
]
