"""The `"cxr-triage"` pipeline and the `AutoModelForImageClassification` entry of the image-only student."""

import io
import logging
import math
import os
import warnings

import numpy as np
import torch
from PIL import Image
from transformers import Pipeline

from .configuration_qdistill import QDistillStudentConfig
from .modeling_qdistill import QDistillStudentModel
from .processing_qdistill import to_eight_bit_film


logger = logging.getLogger(__name__)

CXR_TRIAGE_TASK = "cxr-triage"
DEFAULT_THRESHOLD = 0.5
DEFAULT_THRESHOLD_SOURCE = "default 0.5: not calibrated"
# Cheap plausibility checks of a film (warnings, never errors). A radiograph is grey: saved as RGB its three channels
# are equal, so a mean (max - min) channel spread above this many grey levels (of 255) means a colour picture.
COLOUR_SPREAD_WARNING = 16.0
# Chest films are 14x17, 17x14, 14x14 inch or close; a long side more than twice the short side is no chest film.
ASPECT_RATIO_WARNING = 2.0
ATTENTION_MAP_FORMATS = ("pil", "png")


class FilmCheckWarning(UserWarning):
    """Issued by [`CxrTriagePipeline`] for a film that is probably not a frontal chest radiograph (see
    [`film_check_messages`]); the film is still triaged."""


def film_statistics(film: Image.Image) -> tuple[float, float]:
    """
    The two numbers the plausibility checks read from an 8-bit film.

    Args:
        film (`PIL.Image.Image`): mode `"L"` or `"RGB"`, as returned by `to_eight_bit_film`.

    Returns:
        `tuple[float, float]`: the mean over pixels of the spread between the largest and smallest channel value
        (0 for a grey film) and the spread between the darkest and brightest pixel (0 for a blank film), both in
        grey levels of 255.
    """
    values = np.asarray(film, dtype=np.int16)
    colour = float((values.max(axis=-1) - values.min(axis=-1)).mean()) if values.ndim == 3 else 0.0
    return colour, float(values.max() - values.min())


def film_check_messages(height: int, width: int, colour_spread: float, value_range: float) -> list[str]:
    """
    Messages for a film that is probably not a frontal chest radiograph, from cheap checks that can tell:

    - a strongly coloured image (a photograph or a screenshot): mean channel spread above [`COLOUR_SPREAD_WARNING`];
    - an extreme aspect ratio (a long side more than [`ASPECT_RATIO_WARNING`] times the short side);
    - a blank film (a single grey value).

    A lateral chest film, or a film of another body part with a chest-like shape, cannot be told apart by such a
    check and gets no message: the model was trained on frontal films only, so its output on those is meaningless.

    Args:
        height (`int`), width (`int`): the film's size in pixels.
        colour_spread (`float`), value_range (`float`): from [`film_statistics`].

    Returns:
        `list[str]`, empty for a plausible film.
    """
    messages = []
    if colour_spread > COLOUR_SPREAD_WARNING:
        messages.append(
            f"the image is in colour (mean channel spread {colour_spread:.1f} of 255 grey levels); a radiograph is "
            "grey, so this is probably a photograph or a screenshot, not a chest film"
        )
    ratio = max(height, width) / max(1, min(height, width))
    if ratio > ASPECT_RATIO_WARNING:
        messages.append(
            f"the aspect ratio is {ratio:.2f}:1 ({width}x{height} pixels); chest films are close to square (at most "
            f"{ASPECT_RATIO_WARNING:g}:1), so this is probably not a chest film"
        )
    if value_range == 0:
        messages.append("the film is blank (one grey value everywhere)")
    return messages


def _size_of(size) -> tuple[int, int]:
    """(height, width) from an image processor's `size` (a dict or `SizeDict` with `height`/`width`)."""
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    height, width = get("height"), get("width")
    if not (height and width):
        raise ValueError(f"The image processor's size must give height and width, got {size!r}.")
    return int(height), int(width)


def _reads_text(config) -> bool:
    """Whether the model needs a report: the teacher always, a student in `pseudo_report` mode."""
    text_mode = getattr(config, "text_mode", None)
    return text_mode is None or text_mode == "pseudo_report"


class CxrTriagePipeline(Pipeline):
    r"""
    Chest X-ray triage with a Q-DISTILL student (or teacher): one film in, the priority label, the calibrated
    probability of the urgent class and the operating threshold out.

    Inputs (one, or a list of them for a batch; `batch_size=` batches the forward passes):
        - a local file path (`str` or `os.PathLike`; URLs are refused: download the file first), a `PIL.Image.Image`,
          or a numpy array `(H, W)` / `(H, W, C)` (uint8, uint16, or float in [0, 1] or [0, 255], as documented in
          `to_eight_bit_film`); every film goes through the image processor's checks (non-finite values, bad dtypes
          or shapes, films below `min_image_side`), which raise a `ValueError` naming the film;
        - a dict `{"image": film, "report": text}` to pair a film with its report.

    Reports: a `pseudo_report` student reads a generated pseudo-report and the teacher reads the human report. Pass
    `report="..."` (a list for a list of films), or a `report_generator` (a callable taking the 8-bit PIL film and
    returning the report text) when building the pipeline or calling it. An `image_only` student refuses text.

    Output per film, a dict:
        - `"label"`: the priority label, `id2label` of the decided class;
        - `"probability"`: the calibrated probability of the urgent class, `softmax(logits / T)[1]` with
          `T = config.calibration_temperature` (`model.triage_probabilities`);
        - `"threshold"`: `config.decision_threshold`, or 0.5 when none is stored; the label is urgent iff
          `probability >= threshold` (as `model.triage_decisions`);
        - `"threshold_source"`: `config.decision_rule`, or `"default 0.5: not calibrated"`;
        - `"scores"`: `{label: calibrated probability}` for every class;
        - `"warnings"`: messages of the cheap plausibility checks ([`film_check_messages`]), also issued as
          [`FilmCheckWarning`];
        - `"attention_map"` with `return_attention_map=True`: the last cross-attention layer's query-to-patch
          attention, averaged over queries and heads, mapped back onto the film (letterbox padding removed) and
          upsampled to the film's size, as a mode `"L"` PIL image min-max scaled to 0 (least attended) .. 255
          (`attention_map_format="png"` gives PNG bytes instead). Attention probabilities exist only on the eager
          path; the model computes that call eagerly whatever its `attn_implementation`, so nothing needs switching.

    For more than two classes, `"label"` is the argmax, `"probability"` its probability, and `"threshold"` is `None`.

    Example:

    ```python
    >>> import numpy as np
    >>> from transformers import pipeline
    >>> triage = pipeline("cxr-triage", model="path/to/student", trust_remote_code=True)
    >>> result = triage(np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8))
    >>> result["label"] in triage.model.config.label2id, result["threshold_source"]
    (True, 'default 0.5: not calibrated')
    ```
    """

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.image_processor is None:
            raise ValueError(
                "cxr-triage needs the image processor: save the processor into the model folder "
                "(processor.save_pretrained(folder)) or pass image_processor=... to pipeline()."
            )
        if not hasattr(self.model, "triage_probabilities"):
            raise ValueError(
                f"cxr-triage needs a Q-DISTILL model (with triage_probabilities), got {type(self.model).__name__}."
            )

    def _sanitize_parameters(
        self,
        report_generator=None,
        return_attention_map=None,
        attention_map_format=None,
        timeout=None,
        **kwargs,
    ):
        if kwargs:
            raise TypeError(f"cxr-triage got unexpected arguments {sorted(kwargs)}.")
        preprocess_params, forward_params, postprocess_params = {}, {}, {}
        if report_generator is not None:
            if not callable(report_generator):
                raise ValueError(f"report_generator must be callable, got {type(report_generator).__name__}.")
            preprocess_params["report_generator"] = report_generator
        if return_attention_map is not None:
            forward_params["return_attention_map"] = bool(return_attention_map)
            postprocess_params["return_attention_map"] = bool(return_attention_map)
        if attention_map_format is not None:
            if attention_map_format not in ATTENTION_MAP_FORMATS:
                raise ValueError(
                    f"attention_map_format must be one of {ATTENTION_MAP_FORMATS}, got {attention_map_format!r}."
                )
            postprocess_params["attention_map_format"] = attention_map_format
        if timeout is not None:
            raise ValueError("cxr-triage reads local files only; `timeout` (for URLs) does not apply.")
        return preprocess_params, forward_params, postprocess_params

    def __call__(self, inputs, report=None, **kwargs):
        """
        Triage one film or a list of films.

        Args:
            inputs (path, `PIL.Image.Image`, `np.ndarray`, dict, or a list of them): see the class docstring.
            report (`str` or `list[str]`, *optional*): the report of the film (one per film for a list).
            kwargs: `report_generator`, `return_attention_map`, `attention_map_format`, `batch_size`.

        Returns:
            A dict per film (a list of them for a list input).
        """
        if report is not None:
            if isinstance(inputs, (list, tuple)):
                if not isinstance(report, (list, tuple)) or len(report) != len(inputs):
                    raise ValueError(
                        f"Got {len(inputs)} films: pass report= as a list of {len(inputs)} texts, one per film."
                    )
                inputs = [{"image": film, "report": text} for film, text in zip(inputs, report)]
            else:
                if not isinstance(report, str):
                    raise ValueError(f"report must be a string for a single film, got {type(report).__name__}.")
                inputs = {"image": inputs, "report": report}
        elif isinstance(inputs, tuple):
            inputs = list(inputs)
        return super().__call__(inputs, **kwargs)

    def _open(self, image):
        """A PIL image or array from the input; files are opened here so errors name the file."""
        if isinstance(image, (str, os.PathLike)):
            path = os.fspath(image)
            if path.startswith(("http://", "https://")):
                raise ValueError(f"cxr-triage reads local files only; download {path} first and pass the file path.")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"Film file {path!r} does not exist.")
            try:
                return Image.open(path), f"film {path!r}"
            except OSError as error:
                raise OSError(f"Film file {path!r} is not an image PIL can read ({error}).") from error
        if isinstance(image, (Image.Image, np.ndarray)) or type(image).__module__.startswith("torch"):
            return image, "film"
        raise ValueError(
            f"cxr-triage takes a file path, a PIL image or a numpy array per film, got {type(image).__name__}."
        )

    def preprocess(self, inputs, report_generator=None):
        if isinstance(inputs, dict):
            unknown = set(inputs) - {"image", "report"}
            if "image" not in inputs or unknown:
                raise ValueError(
                    f"A dict input needs the key 'image' (and optionally 'report'), got keys {sorted(inputs)}."
                )
            image, report = inputs["image"], inputs.get("report")
        else:
            image, report = inputs, None
        image, name = self._open(image)
        processor = self.image_processor
        film = to_eight_bit_film(
            image,
            name,
            getattr(processor, "high_bit_depth_scaling", "min_max"),
            getattr(processor, "min_image_side", 1),
        )
        width, height = film.size
        colour_spread, value_range = film_statistics(film)
        for message in film_check_messages(height, width, colour_spread, value_range):
            warnings.warn(f"{name}: {message}; it is triaged anyway.", FilmCheckWarning, stacklevel=2)
        model_inputs = {"pixel_values": processor(film, return_tensors="pt")["pixel_values"]}

        config = self.model.config
        if _reads_text(config):
            if report is None and report_generator is not None:
                report = report_generator(film)
            if report is None:
                kind = "teacher reads the film's report" if getattr(config, "text_mode", None) is None else (
                    "student reads a pseudo-report (text_mode='pseudo_report')"
                )
                raise ValueError(
                    f"This {kind}: pass report='...' or report_generator=<callable(film) -> str> ({name})."
                )
            if not isinstance(report, str) or not report.strip():
                raise ValueError(f"The report of {name} must be a non-empty string, got {report!r}.")
            if self.tokenizer is None:
                raise ValueError(
                    "This model reads a report but the folder has no tokenizer: save the processor (image processor "
                    "+ tokenizer) into the model folder or pass tokenizer=... to pipeline()."
                )
            encoded = self.tokenizer(report, truncation=True, return_tensors="pt", return_token_type_ids=False)
            model_inputs["input_ids"] = encoded["input_ids"]
            model_inputs["attention_mask"] = encoded["attention_mask"]
        elif report is not None:
            raise ValueError(
                f"This student is image_only: it reads no report, but one was given for {name}. Drop the report or "
                "use a pseudo_report student."
            )
        model_inputs["film_stats"] = torch.tensor([[height, width, colour_spread, value_range]], dtype=torch.float64)
        return model_inputs

    def _forward(self, model_inputs, return_attention_map=False):
        film_stats = model_inputs.pop("film_stats")
        outputs = self.model(**model_inputs, output_attentions=return_attention_map, return_dict=True)
        result = {
            "probabilities": self.model.triage_probabilities(outputs.logits),
            "film_stats": film_stats,
        }
        if return_attention_map:
            # (batch, heads, queries, image tokens) of the last layer with cross-attention; token 0 is CLS.
            cross = outputs.cross_attentions[-1].float()
            result["patch_attention"] = cross.mean(dim=(1, 2))[:, 1:]
        return result

    def _attention_image(self, patch_attention: torch.Tensor, height: int, width: int) -> Image.Image:
        """Patch attention `(tokens,)` -> the film's `(height, width)`, with the letterbox padding removed."""
        grid = math.isqrt(patch_attention.numel())
        if grid * grid != patch_attention.numel():
            raise ValueError(f"{patch_attention.numel()} image patches do not form a square grid.")
        in_height, in_width = _size_of(self.image_processor.size)
        attention = patch_attention.reshape(1, 1, grid, grid)
        attention = torch.nn.functional.interpolate(attention, size=(in_height, in_width), mode="bilinear")
        if getattr(self.image_processor, "resize_mode", "squash") == "pad":
            # The processor scales the film to fit and centres it (QDistillImageProcessor.resize_to_target).
            scale = min(in_height / height, in_width / width)
            new_height, new_width = max(1, round(height * scale)), max(1, round(width * scale))
            top, left = (in_height - new_height) // 2, (in_width - new_width) // 2
            attention = attention[..., top : top + new_height, left : left + new_width]
        attention = torch.nn.functional.interpolate(attention, size=(height, width), mode="bilinear")[0, 0]
        low, high = float(attention.min()), float(attention.max())
        scaled = (attention - low) * (255.0 / (high - low)) if high > low else torch.zeros_like(attention)
        return Image.fromarray(np.rint(scaled.numpy()).astype(np.uint8), mode="L")

    def postprocess(self, model_outputs, return_attention_map=False, attention_map_format="pil"):
        config = self.model.config
        probabilities = model_outputs["probabilities"][0].float()
        height, width, colour_spread, value_range = model_outputs["film_stats"][0].tolist()
        height, width = int(height), int(width)
        scores = {config.id2label[index]: float(p) for index, p in enumerate(probabilities.tolist())}
        if probabilities.numel() == 2:
            threshold = config.decision_threshold
            if threshold is None:
                threshold, source = DEFAULT_THRESHOLD, DEFAULT_THRESHOLD_SOURCE
            else:
                source = config.decision_rule or "config.decision_threshold (rule not recorded)"
            probability = float(probabilities[1])
            decided = int(probability >= threshold)
        else:
            decided = int(probabilities.argmax())
            probability, threshold, source = float(probabilities[decided]), None, "argmax (more than two classes)"
        result = {
            "label": config.id2label[decided],
            "probability": probability,
            "threshold": float(threshold) if threshold is not None else None,
            "threshold_source": source,
            "scores": scores,
            "warnings": film_check_messages(height, width, colour_spread, value_range),
        }
        if return_attention_map:
            image = self._attention_image(model_outputs["patch_attention"][0], height, width)
            if attention_map_format == "png":
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                image = buffer.getvalue()
            result["attention_map"] = image
        return result


def _require_image_only(config, source) -> None:
    if getattr(config, "text_mode", None) != "image_only":
        raise ValueError(
            f"{source} is a text_mode={getattr(config, 'text_mode', None)!r} student: it reads a pseudo-report "
            "(input_ids), so it is not an image classifier. Load it with AutoModel.from_pretrained and use the "
            "'cxr-triage' pipeline with report=... ; only image_only students load as AutoModelForImageClassification."
        )


class QDistillImageOnlyStudentLoader:
    """
    The `AutoModelForImageClassification` entry of [`QDistillStudentConfig`] inside the package: it returns a
    [`QDistillStudentModel`] for an `image_only` student and refuses a `pseudo_report` student (which needs
    `input_ids`) with a clear error. Saved folders of image-only students name `QDistillStudentModel` itself in
    their `auto_map`, so remote code needs no such class.
    """

    config_class = QDistillStudentConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        if config is None:
            config = QDistillStudentConfig.from_pretrained(pretrained_model_name_or_path)
        _require_image_only(config, f"The checkpoint {pretrained_model_name_or_path}")
        return QDistillStudentModel.from_pretrained(pretrained_model_name_or_path, *model_args, config=config, **kwargs)

    @classmethod
    def _from_config(cls, config, **kwargs):
        _require_image_only(config, "This config")
        return QDistillStudentModel._from_config(config, **kwargs)

    from_config = _from_config


# transformers' pipelines compare the loaded model's class name with the names of the registered classes and log an
# error when it is missing; the loader returns `QDistillStudentModel` instances, so it is registered under that name.
QDistillImageOnlyStudentLoader.__name__ = QDistillStudentModel.__name__


__all__ = [
    "ASPECT_RATIO_WARNING",
    "COLOUR_SPREAD_WARNING",
    "CXR_TRIAGE_TASK",
    "CxrTriagePipeline",
    "DEFAULT_THRESHOLD_SOURCE",
    "FilmCheckWarning",
    "QDistillImageOnlyStudentLoader",
    "film_check_messages",
    "film_statistics",
]
