"""
Smaller students for CPU deployment: dynamic int8 quantization, magnitude pruning, and a table that compares them.

Choice of int8 path (measured on torch 2.13 CPU, see `/work/shared/docs/OFFLINE_RECIPES.md` section 7):

- PyTorch eager: `torch.ao.quantization.quantize_dynamic` on every `nn.Linear` (the frozen CLIP ViT's attention and
  MLP projections, the Q-Former's, the classifier and the projection). It is deprecated in favour of torchao but still
  present and correct in torch 2.13, needs no new dependency, and returns an ordinary module whose `forward` is the
  student's own (so `triage_probabilities` and the pipelines keep working). torchao's `quantize_` works too, but once
  installed it makes every transformers import print load errors of its CUDA kernels; it is not used here.
- Deployment files: `onnxruntime.quantization.quantize_dynamic` on the exported ONNX graph
  ([`qdistill_hf.deploy.quantize_onnx_int8`]), which does not depend on torch's deprecated API at all.

Weights are int8 with one scale per tensor; activations are quantized per batch at run time (dynamic), so no
calibration data is needed. Convolutions (the ViT's patch embedding), LayerNorms and embeddings stay float32.
"""

import copy
import io
import logging
import statistics
import time
import warnings
from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn


logger = logging.getLogger(__name__)


def _dynamic_quantized_linear_class():
    try:
        from torch.ao.nn.quantized.dynamic import Linear as QuantizedLinear
    except ImportError:  # pragma: no cover - a torch without torch.ao quantization
        return None
    return QuantizedLinear


def quantize_dynamic_int8(model: nn.Module) -> nn.Module:
    """
    A copy of `model` whose `nn.Linear` layers (frozen vision encoder, Q-Former, classifier, projection) run with int8
    weights and dynamically quantized int8 activations, for eager CPU inference.

    The input model is left untouched. The result runs on CPU only (quantized kernels: fbgemm / x86 / onednn), in eval
    mode, and cannot be saved with `save_pretrained` (its packed weights are not safetensors tensors): save its
    `state_dict` with `torch.save`, or export the float model to ONNX and quantize that file
    ([`quantize_onnx_int8`]). Expected change on a random tiny student: max |delta p| of a few 1e-3 (the tests
    bound it by 0.05); on trained students check [`compression_table`] on the validation split.

    Args:
        model (`nn.Module`): a Q-DISTILL student (or any module) on CPU, in float32.

    Returns:
        `nn.Module`: the quantized copy, in eval mode.

    Raises:
        ValueError: if the model has parameters outside the CPU or not in float32.
        ImportError: if this torch no longer ships `torch.ao.quantization` (use the ONNX path).

    Example:

    ```python
    >>> q = quantize_dynamic_int8(student)
    >>> q(pixel_values=pixel_values).logits
    ```
    """
    for name, parameter in model.named_parameters():
        if parameter.device.type != "cpu" or parameter.dtype != torch.float32:
            raise ValueError(
                f"quantize_dynamic_int8 needs a float32 model on CPU; parameter {name} is {parameter.dtype} on "
                f"{parameter.device}. Call model.float().cpu() first."
            )
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError as error:  # pragma: no cover - future torch
        raise ImportError(
            "This torch has no torch.ao.quantization.quantize_dynamic; export the student to ONNX and use "
            "qdistill_hf.deploy.quantize_onnx_int8 instead."
        ) from error
    copied = copy.deepcopy(model).eval()
    with warnings.catch_warnings():
        # "torch.ao.quantization is deprecated ..." and "torch.quantize_per_tensor ... deprecated": known, see docstring.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        quantized = quantize_dynamic(copied, {nn.Linear}, dtype=torch.qint8, inplace=True)
    replaced = sum(1 for module in quantized.modules() if isinstance(module, _dynamic_quantized_linear_class()))
    left = sum(1 for module in quantized.modules() if type(module) is nn.Linear)
    if left:
        raise RuntimeError(f"quantize_dynamic_int8 left {left} nn.Linear layers in float32 (replaced {replaced}).")
    logger.info("int8 dynamic quantization: %d linear layers replaced", replaced)
    return quantized


def prune_linear_magnitude(model: nn.Module, amount: float, include_vision: bool = True) -> nn.Module:
    """
    A copy of `model` with the smallest-magnitude fraction `amount` of each `nn.Linear` weight set to zero (per-layer
    L1 unstructured pruning, `torch.nn.utils.prune.l1_unstructured`), made permanent (`prune.remove`: plain weight
    tensors, no masks or hooks left).

    Unstructured zeros do not shrink a dense file nor speed up dense kernels: the gain is only realised by sparse
    storage or kernels. [`compression_table`] reports the nonzero count next to the dense size for that reason.
    Biases, LayerNorms, embeddings and the patch convolution are not pruned.

    Args:
        model (`nn.Module`): the student.
        amount (`float`): fraction in `[0, 1)` of each weight matrix to zero.
        include_vision (`bool`, *optional*, defaults to `True`): also prune the frozen vision encoder's linear
            layers (a module named `vision_model`); `False` prunes the Q-Former and heads only.

    Returns:
        `nn.Module`: the pruned copy, in eval mode, with the model's frozen parts frozen again.
    """
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0 <= amount < 1:
        raise ValueError(f"amount must be a fraction in [0, 1), got {amount!r}.")
    from torch.nn.utils import prune

    copied = copy.deepcopy(model).eval()
    pruned = 0
    for name, module in copied.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if not include_vision and (name == "vision_model" or name.startswith("vision_model.")):
            continue
        prune.l1_unstructured(module, name="weight", amount=float(amount))
        prune.remove(module, "weight")
        pruned += 1
    if pruned == 0:
        raise ValueError("prune_linear_magnitude found no nn.Linear layer to prune.")
    if hasattr(copied, "_apply_trainability"):
        copied._apply_trainability()  # prune.remove re-creates weights as trainable Parameters
    logger.info("magnitude pruning: %d linear layers at amount %.3f", pruned, amount)
    return copied


def count_parameters(model) -> tuple[int, int]:
    """
    `(parameters, nonzero)` of a module, counting the int8 weights of dynamically quantized linear layers (which
    `parameters()` does not list) and their biases, or of an object with a `num_parameters()` method
    (e.g. [`qdistill_hf.deploy.OnnxTriageModel`]; its nonzero count is `None`).
    """
    if not isinstance(model, nn.Module):
        return int(model.num_parameters()), None
    total = nonzero = 0
    for parameter in model.parameters():
        total += parameter.numel()
        nonzero += int(torch.count_nonzero(parameter.detach()))
    quantized_linear = _dynamic_quantized_linear_class()
    if quantized_linear is not None:
        for module in model.modules():
            if isinstance(module, quantized_linear):
                weight = module.weight()
                total += weight.numel()
                nonzero += int(torch.count_nonzero(weight.int_repr()))
                bias = module.bias()
                if bias is not None:
                    total += bias.numel()
                    nonzero += int(torch.count_nonzero(bias))
    return total, nonzero


def serialized_size(model) -> int:
    """
    Bytes of the saved weights: `torch.save(model.state_dict())` for a module (the same format for float, pruned and
    int8 students, buffers included), or `serialized_bytes()` of another object (the ONNX file's size).
    """
    if not isinstance(model, nn.Module):
        return int(model.serialized_bytes())
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def _logits_fn(model) -> Callable[[torch.Tensor], torch.Tensor]:
    if isinstance(model, nn.Module):
        model.eval()

        def run(pixel_values):
            with torch.inference_mode():
                return model(pixel_values=pixel_values).logits.float()

        return run
    return lambda pixel_values: torch.as_tensor(model.predict_logits(pixel_values)).float()


def single_film_latency_ms(
    model, pixel_values: torch.Tensor, repeats: int = 20, warmup: int = 3, clock: str = "wall"
) -> float:
    """
    Median time in milliseconds of one forward on a single film (`pixel_values[:1]`), on the current torch thread
    setting (ONNX Runtime sessions use their own `intra_op_num_threads`).

    Args:
        clock (`str`, *optional*, defaults to `"wall"`): `"wall"` (`time.perf_counter`) or `"process"`
            (`time.process_time`, the CPU time of every thread of this process: on a shared machine it leaves out the
            time spent waiting for a core).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}.")
    if clock not in ("wall", "process"):
        raise ValueError(f"clock must be 'wall' or 'process', got {clock!r}.")
    timer = time.perf_counter if clock == "wall" else time.process_time
    run = _logits_fn(model)
    film = pixel_values[:1]
    for _ in range(warmup):
        run(film)
    times = []
    for _ in range(repeats):
        start = timer()
        run(film)
        times.append(timer() - start)
    return statistics.median(times) * 1e3


def predict_logits(model, pixel_values: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Float32 logits of `model` on `pixel_values`, in batches of `batch_size` (no gradients)."""
    run = _logits_fn(model)
    chunks = [run(pixel_values[start : start + batch_size]) for start in range(0, len(pixel_values), batch_size)]
    return torch.cat(chunks)


def compression_table(
    models: Mapping[str, object],
    pixel_values: torch.Tensor,
    labels: torch.Tensor | None = None,
    reference: str | None = None,
    temperature: float = 1.0,
    threads: int | None = 1,
    latency_repeats: int = 20,
    batch_size: int = 32,
) -> list[dict]:
    """
    Compare variants of one student (float32, int8, pruned, an ONNX file...) on the same films.

    For every variant: parameters (int8 weights counted), nonzero parameters, serialized size in bytes, CPU latency
    for one film (median, `threads` torch threads; wall time and process CPU time), and against the `reference` variant on `pixel_values`: max
    |logit change|, max |change of the calibrated probability| (`softmax(logits / temperature)`, every class),
    agreement of the argmax decisions, and with `labels` the binary AUROC of p(class 1) and its change.

    Args:
        models (`Mapping[str, nn.Module | OnnxTriageModel]`): variants by name; modules are called as
            `model(pixel_values=...)`, other objects must provide `predict_logits`, `num_parameters` and
            `serialized_bytes`.
        pixel_values (`torch.Tensor` of shape `(n, 3, H, W)`): processed films (e.g. the validation split).
        labels (`torch.Tensor` of shape `(n,)`, *optional*): class ids for the AUROC columns (binary only).
        reference (`str`, *optional*): the variant the changes are measured against (default: the first).
        temperature (`float`, *optional*, defaults to 1.0): the calibration temperature (`config.calibration_temperature`).
        threads (`int`, *optional*, defaults to 1): torch threads for the latency column (restored afterwards);
            `None` keeps the current setting.
        latency_repeats (`int`, *optional*, defaults to 20): timed single-film forwards per variant.
        batch_size (`int`, *optional*, defaults to 32): batch size for the logits over `pixel_values`.

    Returns:
        `list[dict]`, one row per variant in the order given.
    """
    if not models:
        raise ValueError("compression_table needs at least one model.")
    reference = reference or next(iter(models))
    if reference not in models:
        raise ValueError(f"reference {reference!r} is not one of the models {list(models)}.")
    if labels is not None and len(labels) != len(pixel_values):
        raise ValueError(f"labels has {len(labels)} entries but pixel_values has {len(pixel_values)} films.")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        logits = {name: predict_logits(model, pixel_values, batch_size) for name, model in models.items()}
        latency = {name: single_film_latency_ms(model, pixel_values, latency_repeats) for name, model in models.items()}
        process = {name: single_film_latency_ms(model, pixel_values, latency_repeats, warmup=1, clock="process")
                   for name, model in models.items()}
    finally:
        torch.set_num_threads(previous_threads)
    for name, values in logits.items():
        if not bool(torch.isfinite(values).all()):
            raise FloatingPointError(f"variant {name!r} produced non-finite logits on these films.")
    probabilities = {name: torch.softmax(values / temperature, dim=-1) for name, values in logits.items()}
    auroc = {}
    if labels is not None:
        from ..training.metrics import compute_auroc_metrics

        for name, values in logits.items():
            eval_pred = type("EvalPrediction", (), {"predictions": values.numpy(), "label_ids": np.asarray(labels)})
            auroc[name] = compute_auroc_metrics(eval_pred)["auroc"]
    rows = []
    ref_logits, ref_probs = logits[reference], probabilities[reference]
    for name, model in models.items():
        total, nonzero = count_parameters(model)
        row = {
            "variant": name,
            "parameters": total,
            "nonzero_parameters": nonzero,
            "serialized_bytes": serialized_size(model),
            "cpu_single_film_ms": round(latency[name], 3),
            "cpu_single_film_process_ms": round(process[name], 3),
            "cpu_threads": threads if threads is not None else previous_threads,
            "max_abs_logit_change": float((logits[name] - ref_logits).abs().max()),
            "max_abs_probability_change": float((probabilities[name] - ref_probs).abs().max()),
            "decision_agreement": float((logits[name].argmax(-1) == ref_logits.argmax(-1)).float().mean()),
            "films": len(pixel_values),
        }
        if labels is not None:
            row["auroc"] = auroc[name]
            row["auroc_change"] = auroc[name] - auroc[reference]
        rows.append(row)
    return rows


def format_compression_table(rows: list[dict]) -> str:
    """The rows of [`compression_table`] as a markdown table."""
    has_auroc = any("auroc" in row for row in rows)
    header = ["variant", "parameters", "nonzero", "size MB", "1 film ms (wall)", "1 film ms (CPU time)",
              "max abs d logit", "max abs d p", "agree"]
    if has_auroc:
        header += ["AUROC", "d AUROC"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            row["variant"], f"{row['parameters']:,}",
            "-" if row["nonzero_parameters"] is None else f"{row['nonzero_parameters']:,}",
            f"{row['serialized_bytes'] / 1e6:.2f}", f"{row['cpu_single_film_ms']:.1f}",
            f"{row['cpu_single_film_process_ms']:.1f}",
            f"{row['max_abs_logit_change']:.2e}", f"{row['max_abs_probability_change']:.2e}",
            f"{row['decision_agreement']:.3f}",
        ]
        if has_auroc:
            cells += [f"{row['auroc']:.4f}", f"{row['auroc_change']:+.4f}"] if "auroc" in row else ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = [
    "compression_table",
    "count_parameters",
    "format_compression_table",
    "predict_logits",
    "prune_linear_magnitude",
    "quantize_dynamic_int8",
    "serialized_size",
    "single_film_latency_ms",
]
