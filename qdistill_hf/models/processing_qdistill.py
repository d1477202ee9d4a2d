"""Image processor and processor (image processor + report tokenizer) for Q-DISTILL chest X-ray triage."""

import logging
from collections.abc import Iterable
from typing import Literal

import numpy as np
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor, BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling, SizeDict
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.processing_utils import ImagesKwargs, ProcessorMixin


logger = logging.getLogger(__name__)

# CheXzero (rajpurkarlab/CheXzero, zero_shot.py) normalises raw 0-255 grey values with these constants.
CHEXZERO_MEAN = 101.48761
CHEXZERO_STD = 83.43944

_HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA")
_TO_RGB_MODES = ("CMYK", "YCbCr", "RGBX")
_CONVERTIBLE_MODES = ("1", "L", "P", "RGB") + _ALPHA_MODES + _TO_RGB_MODES
_UINT16_MAX = 65535

# Films whose short side is below this many pixels are refused: upscaled to 224 they become a few flat blocks (a
# 1x1 image becomes a constant film) and carry nothing to triage. The shared real films are 64x64.
MIN_IMAGE_SIDE = 16


class QDistillImageProcessorKwargs(ImagesKwargs, total=False):
    """Keyword arguments of [`QDistillImageProcessor`] on top of the standard `ImagesKwargs`.

    Attributes:
        resize_mode (`str`): `"pad"` (keep aspect ratio, zero-pad to the target size) or `"squash"`.
        high_bit_depth_scaling (`str`): how 16-bit films become 8-bit: `"min_max"` or `"full_range"`.
        min_image_side (`int`): smallest accepted short side in pixels (default [`MIN_IMAGE_SIDE`] = 16).
    """

    resize_mode: Literal["pad", "squash"]
    high_bit_depth_scaling: Literal["min_max", "full_range"]
    min_image_side: int


def scale_high_bit_depth(array: np.ndarray, scaling: str, name: str = "") -> np.ndarray:
    """Map a 16-bit (or 32-bit integer holding 16-bit data) grey image to `uint8`.

    Args:
        array (`np.ndarray`): integer grey image of shape `(H, W)` (or `(H, W, 1)`), values in `[0, 65535]`.
        scaling (`str`):
            - `"min_max"`: `round((v - min) * 255 / (max - min))` per image. Right for films that store 10-, 12- or
              14-bit detector data in a 16-bit container, which `"full_range"` would turn almost black.
            - `"full_range"`: `round(v * 255 / 65535)`, a fixed map of the whole 16-bit range (no per-image statistics).
        name (`str`, *optional*): text naming the image, used in error messages.

    Returns:
        `np.ndarray` of dtype `uint8` and the same shape.

    Raises:
        ValueError: if a value lies outside `[0, 65535]` or `scaling` is unknown.
    """
    values = array.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if low < 0 or high > _UINT16_MAX:
        raise ValueError(
            f"16-bit image{name} has values in [{low:g}, {high:g}], outside [0, {_UINT16_MAX}]; "
            "convert it to 8-bit yourself."
        )
    if scaling == "full_range":
        scaled = values * 255.0 / _UINT16_MAX
    elif scaling == "min_max":
        if high == low:
            logger.warning("16-bit image%s is constant (value %g); min-max scaling maps it to 0.", name, low)
            scaled = np.zeros_like(values)
        else:
            scaled = (values - low) * 255.0 / (high - low)
    else:
        raise ValueError(f"high_bit_depth_scaling must be 'min_max' or 'full_range', got {scaling!r}.")
    return np.rint(scaled).astype(np.uint8)


def _composite_on_black(values: np.ndarray) -> np.ndarray:
    """`(H, W, C+1)` float values in [0, 255] with a trailing alpha channel -> `(H, W, C)` composited on black."""
    colour, alpha = values[..., :-1], values[..., -1:]
    return colour * (alpha / 255.0)


def _check_size(width: int, height: int, name: str, min_side: int) -> None:
    if min(width, height) < min_side:
        raise ValueError(
            f"{name} is {width}x{height} pixels; films need at least {min_side} pixels on the short side "
            "(upscaled to the model's input, a smaller image is a few flat blocks with nothing to read). "
            "Pass min_image_side=... to the image processor to change the limit."
        )


def _array_to_eight_bit(array: np.ndarray, name: str, scaling: str) -> np.ndarray:
    """Validate a numpy image and return it as `(H, W)` or `(H, W, 3)` uint8 (alpha composited on black)."""
    if array.size == 0 or array.ndim not in (2, 3):
        raise ValueError(
            f"{name}: an array of shape {tuple(array.shape)} is not an image; expected (H, W), (H, W, C) or (C, H, W) "
            "with C = 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA)."
        )
    if array.ndim == 3:
        if array.shape[-1] in (1, 2, 3, 4):
            pass
        elif array.shape[0] in (1, 2, 3, 4):
            array = np.moveaxis(array, 0, -1)
        else:
            raise ValueError(
                f"{name}: an array of shape {tuple(array.shape)} has no channel axis of size 1, 2, 3 or 4 first or "
                "last; expected (H, W), (H, W, C) or (C, H, W)."
            )
        if array.shape[-1] == 1:
            array = array[..., 0]
    channels = 1 if array.ndim == 2 else array.shape[-1]
    dtype = array.dtype
    if dtype == np.uint8:
        values = array.astype(np.float64)
    elif dtype.kind == "f":
        values = array.astype(np.float64)
        bad = int((~np.isfinite(values)).sum())
        if bad:
            raise ValueError(f"{name}: the float array holds {bad} NaN or inf value(s); a film must be finite.")
        low, high = float(values.min()), float(values.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"{name}: float values span [{low:g}, {high:g}]; float films must lie in [0, 1] or [0, 255] "
                "(normalised pixel_values cannot be re-processed; cast 16-bit data to uint16)."
            )
        if high <= 1.0:
            # [0, 1] intensities. The one misread case is a [0, 255] float film whose brightest pixel is <= 1, i.e.
            # an all-black film; pass such data as uint8 (documented in to_eight_bit_film).
            values = values * 255.0
    elif dtype.kind in "iu":
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > _UINT16_MAX:
            raise ValueError(
                f"{name}: integer values span [{low}, {high}]; expected [0, 255] (8-bit) or [0, {_UINT16_MAX}] (16-bit)."
            )
        if (dtype.kind == "u" and dtype.itemsize == 2) or high > 255:  # uint16 of either byte order
            if channels != 1:
                raise ValueError(
                    f"{name}: 16-bit data with {channels} channels is not supported; pass one grey channel."
                )
            return scale_high_bit_depth(array, scaling, f" ({name})")
        values = array.astype(np.float64)
    else:
        raise ValueError(
            f"{name}: arrays of dtype {dtype} are not images; expected uint8, uint16, another integer type holding "
            "0-255 or 0-65535, or float in [0, 1] or [0, 255]."
        )
    if channels in (2, 4):
        values = _composite_on_black(values)
        if channels == 2:
            values = values[..., 0]
    return np.rint(values).astype(np.uint8)


def to_eight_bit_film(
    image,
    name: str = "image",
    high_bit_depth_scaling: str = "min_max",
    min_side: int = MIN_IMAGE_SIDE,
) -> Image.Image:
    """Turn one input film into an 8-bit PIL image of mode `"L"` or `"RGB"`, refusing what cannot be a film.

    Rules (the image processor and the pseudo-report loaders all go through this function):

    - PIL images: `"L"`/`"RGB"` as they are; `"1"`, `"CMYK"`, `"YCbCr"`, `"RGBX"`, `"P"` converted by PIL; 16-bit
      modes (`"I;16*"`, `"I"`) by [`scale_high_bit_depth`]; `"F"` (float) by the float rule below. Images with
      transparency (`"RGBA"`, `"LA"`, `"PA"`, `"P"` with a transparency key) are **composited on black**, the
      background of a radiograph: a fully transparent pixel becomes black, never white.
    - Arrays (numpy, or torch tensors, moved to CPU): shape `(H, W)`, `(H, W, C)` or `(C, H, W)` with C = 1 (grey),
      2 (grey + alpha), 3 (RGB) or 4 (RGBA; alpha composited on black). `uint8` as is; `uint16` (and other integer
      types holding values above 255) by [`scale_high_bit_depth`]; other integer types with values in [0, 255] as
      8-bit; **float arrays are read as [0, 1] intensities when their maximum is <= 1, else as [0, 255]** (so a
      [0, 255] float film whose brightest pixel is <= 1, an all-black film, would be stretched: pass it as uint8);
      NaN/inf, negative values or values above 255 are errors.
    - Every film must have at least `min_side` pixels on its short side ([`MIN_IMAGE_SIDE`] = 16 by default).

    Args:
        image (`PIL.Image.Image`, `np.ndarray` or `torch.Tensor`): the film.
        name (`str`, *optional*): text naming the image in error messages (a PIL image's file name is added).
        high_bit_depth_scaling (`str`, *optional*, defaults to `"min_max"`): see [`scale_high_bit_depth`].
        min_side (`int`, *optional*, defaults to 16): minimum short side in pixels.

    Returns:
        `PIL.Image.Image` of mode `"L"` or `"RGB"`.

    Raises:
        ValueError: an unsupported type, mode, shape, dtype or value range, non-finite values, or a film below the
            minimum size; the message names the image (and its file when known).
        OSError: a lazily opened file fails to decode (e.g. truncated); the message names the file.
    """
    if isinstance(image, Image.Image):
        filename = getattr(image, "filename", "") or ""
        name = f"{name} (file {filename!r})" if filename and str(filename) not in name else name
        width, height = image.size
        _check_size(width, height, name, min_side)
        try:
            image.load()
        except OSError as exc:
            raise OSError(f"{name}: cannot decode the image ({exc}); the file is truncated or corrupt") from exc
        mode = image.mode
        if mode in _HIGH_BIT_DEPTH_MODES:
            return Image.fromarray(scale_high_bit_depth(np.asarray(image), high_bit_depth_scaling, f" ({name})"), mode="L")
        if mode == "F":
            return Image.fromarray(_array_to_eight_bit(np.asarray(image, dtype=np.float32), name, high_bit_depth_scaling))
        if mode not in _CONVERTIBLE_MODES:
            raise ValueError(
                f"Unsupported PIL image mode {mode!r} for {name}; expected one of "
                f"{list(_CONVERTIBLE_MODES + _HIGH_BIT_DEPTH_MODES + ('F',))}."
            )
        if mode == "P":
            mode = "PA" if "transparency" in image.info else "RGB"
            image = image.convert("RGBA" if mode == "PA" else "RGB")
            mode = image.mode
        if mode in _ALPHA_MODES:
            grey = mode == "LA"
            values = np.asarray(image.convert("LA" if grey else "RGBA"), dtype=np.float64)
            return Image.fromarray(np.rint(_composite_on_black(values)[..., 0] if grey else _composite_on_black(values))
                                   .astype(np.uint8), mode="L" if grey else "RGB")
        if mode == "1":
            return image.convert("L")
        if mode in _TO_RGB_MODES:
            return image.convert("RGB")
        return image
    if type(image).__module__.startswith("torch"):
        import torch

        if not isinstance(image, torch.Tensor):
            raise ValueError(f"{name} is a {type(image).__name__}, not a PIL image, numpy array or torch tensor.")
        tensor = image.detach().cpu()
        if tensor.is_floating_point() and tensor.dtype != torch.float64:
            tensor = tensor.float()
        image = tensor.numpy()
    if not isinstance(image, np.ndarray):
        raise ValueError(
            f"{name} is a {type(image).__name__}, not a PIL image, numpy array or torch tensor; open files yourself "
            "(PIL.Image.open) so errors name the file."
        )
    array = _array_to_eight_bit(image, name, high_bit_depth_scaling)
    _check_size(array.shape[1], array.shape[0], name, min_side)
    return Image.fromarray(array, mode="L" if array.ndim == 2 else "RGB")


class QDistillImageProcessor(CLIPImageProcessorPil):
    r"""
    Chest X-ray image processor for the frozen CheXzero (CLIP ViT-B/32) encoder, on the PIL backend.

    Pipeline: convert to 8-bit RGB (grey films are repeated to 3 channels), resize to 224x224 according to
    `resize_mode`, rescale to [0, 1], normalise, and return `pixel_values` of shape `(batch, 3, 224, 224)`, float32.
    There is no horizontal flip or any other augmentation: flipping a chest film swaps its laterality (heart side,
    left-sided devices) and contradicts the report read with it.

    Resize modes:
        - `"pad"` (default): scale so the longer side fits 224 keeping the aspect ratio, then zero-pad (black,
          before normalisation) to 224x224 with the content centred; an odd pad leaves the extra row/column at the
          bottom/right. This follows CheXzero's own pipeline, and squashing a non-square film distorts the
          cardiothoracic ratio the triage labels depend on.
        - `"squash"`: plain non-aspect-preserving resize to 224x224, which reproduces the original Q-DISTILL.

    Normalisation defaults to the OpenAI-CLIP mean/std on [0, 1] values, as the original Q-DISTILL does. CheXzero's
    own pipeline instead keeps raw 0-255 values and normalises them with mean 101.48761 and std 83.43944 on every
    channel; [`QDistillImageProcessor.chexzero_preset`] builds that configuration explicitly (it resizes once, straight
    to 224, where CheXzero pads at 320 and then resizes, so values differ by resampling rounding).

    16-bit films (PIL modes `I;16*`, or `I` holding values in [0, 65535], or `uint16` arrays) are mapped to 8-bit
    explicitly by `high_bit_depth_scaling` (see [`scale_high_bit_depth`]), because PIL's own conversion saturates
    every value above 255 to white. Every input goes through [`to_eight_bit_film`] first: float arrays in [0, 1] are
    scaled to [0, 255] (never divided by 255 twice), transparent pixels are composited on black, and NaN/inf values,
    unsupported shapes, dtypes or modes and films under `min_image_side` pixels (default 16) are errors naming the
    batch index and the file.

    Args:
        resize_mode (`str`, *optional*, defaults to `"pad"`): `"pad"` or `"squash"`, see above.
        high_bit_depth_scaling (`str`, *optional*, defaults to `"min_max"`): `"min_max"` or `"full_range"`.
        min_image_side (`int`, *optional*, defaults to 16): smallest accepted short side of an input film, in pixels.
        kwargs: any `CLIPImageProcessorPil` argument (`size`, `resample`, `image_mean`, `image_std`, `do_rescale`, ...).

    Example:

    ```python
    >>> from PIL import Image
    >>> processor = QDistillImageProcessor()
    >>> processor(Image.new("L", (64, 48)))["pixel_values"].shape
    torch.Size([1, 3, 224, 224])
    ```
    """

    valid_kwargs = QDistillImageProcessorKwargs
    size = {"height": 224, "width": 224}
    default_to_square = True
    crop_size = None
    do_center_crop = False
    resample = PILImageResampling.BICUBIC
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    do_convert_rgb = True
    return_tensors = "pt"
    resize_mode = "pad"
    high_bit_depth_scaling = "min_max"
    min_image_side = MIN_IMAGE_SIDE
    model_input_names = ["pixel_values"]

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.resize_mode not in ("pad", "squash"):
            raise ValueError(f"resize_mode must be 'pad' or 'squash', got {self.resize_mode!r}.")
        if self.high_bit_depth_scaling not in ("min_max", "full_range"):
            raise ValueError(
                f"high_bit_depth_scaling must be 'min_max' or 'full_range', got {self.high_bit_depth_scaling!r}."
            )
        if isinstance(self.min_image_side, bool) or not isinstance(self.min_image_side, int) or self.min_image_side < 1:
            raise ValueError(f"min_image_side must be a positive integer, got {self.min_image_side!r}.")

    @classmethod
    def chexzero_preset(cls, **kwargs) -> "QDistillImageProcessor":
        """Build the processor with CheXzero's own normalisation: raw 0-255 values, mean 101.48761, std 83.43944.

        Args:
            kwargs: overrides passed to the constructor (e.g. `resize_mode="squash"`).

        Returns:
            [`QDistillImageProcessor`] with `do_rescale=False`, `image_mean=[101.48761]*3`, `image_std=[83.43944]*3`
            and `resize_mode="pad"` unless overridden.
        """
        settings = {
            "resize_mode": "pad",
            "do_rescale": False,
            "image_mean": [CHEXZERO_MEAN] * 3,
            "image_std": [CHEXZERO_STD] * 3,
        }
        settings.update(kwargs)
        return cls(**settings)

    @staticmethod
    def _as_batch(images) -> list:
        """A flat list of images from one image, a list/tuple of images, or a 4-D array/tensor (a stacked batch)."""
        if isinstance(images, (list, tuple)):
            batch = list(images)
            if not batch:
                raise ValueError("QDistillImageProcessor got an empty list of images.")
            for index, image in enumerate(batch):
                if isinstance(image, (list, tuple)):
                    raise ValueError(
                        f"Image {index} of the batch is a {type(image).__name__}; pass a flat list of images."
                    )
            return batch
        if getattr(images, "ndim", None) == 4 and (
            isinstance(images, np.ndarray) or type(images).__module__.startswith("torch")
        ):
            return list(images)
        return [images]

    def _prepare_image_like_inputs(self, images, *args, expected_ndims: int = 3, **kwargs) -> list[np.ndarray]:
        """Validate and convert every film with [`to_eight_bit_film`], then to channels-first `uint8` RGB."""
        scaling = kwargs.get("high_bit_depth_scaling") or self.high_bit_depth_scaling
        min_side = kwargs.get("min_image_side") or self.min_image_side
        films = [
            to_eight_bit_film(image, f"Image {index} of the batch", scaling, min_side)
            for index, image in enumerate(self._as_batch(images))
        ]
        return [super(QDistillImageProcessor, self).process_image(film, do_convert_rgb=True) for film in films]

    def resize_to_target(self, image: np.ndarray, size: SizeDict, resample, resize_mode: str) -> np.ndarray:
        """Resize a channels-first image to `size` by letterboxing (`"pad"`) or squashing (`"squash"`).

        Args:
            image (`np.ndarray`): `(C, H, W)` image.
            size (`SizeDict`): target with `height` and `width`.
            resample (`PILImageResampling`): resampling filter.
            resize_mode (`str`): `"pad"` or `"squash"`.

        Returns:
            `np.ndarray` of shape `(C, size.height, size.width)`.
        """
        if not (size.height and size.width):
            raise ValueError(f"QDistillImageProcessor needs size={{'height': H, 'width': W}}, got {dict(size)}.")
        if resize_mode == "squash":
            return self.resize(image, size=size, resample=resample)
        if resize_mode != "pad":
            raise ValueError(f"resize_mode must be 'pad' or 'squash', got {resize_mode!r}.")
        channels, height, width = image.shape
        scale = min(size.height / height, size.width / width)
        new_height = max(1, round(height * scale))
        new_width = max(1, round(width * scale))
        resized = self.resize(image, size=SizeDict(height=new_height, width=new_width), resample=resample)
        canvas = np.zeros((channels, size.height, size.width), dtype=resized.dtype)
        top = (size.height - new_height) // 2
        left = (size.width - new_width) // 2
        canvas[:, top : top + new_height, left : left + new_width] = resized
        return canvas

    def preprocess_tensor(self, images, resize_mode: str | None = None):
        """The same preprocessing as `__call__`, on a batch of decoded 8-bit films held in a torch tensor, on the
        tensor's device (e.g. CUDA, so a GPU server does not wait on PIL). One definition: the size, resize mode,
        resampling filter, rescale factor and mean/std are this processor's own.

        It matches the PIL path within 2 grey levels (mean difference about 0.01 level): PIL resamples an 8-bit image
        in two separable passes in fixed point, storing 8 bits after each; this path runs the same two passes in
        float32 with torch's antialiased kernel (PIL's `BICUBIC`/`BILINEAR` filter) and rounds and saturates to
        8 bits after each pass the way PIL stores them (an emulation of PIL's uint8 storage, not a repair of the
        input). `tests/test_benchmark_inference.py` checks max |difference| <= 2 grey levels (2 * `rescale_factor /
        min(image_std)`, about 0.03, on `pixel_values`) and a mean below 0.05 level.

        Args:
            images (`torch.Tensor` of dtype `uint8`): `(batch, height, width)` grey films, or `(batch, 1, height,
                width)` / `(batch, 3, height, width)`; every film of the batch has the same size. Other inputs (16-bit,
                float, alpha, odd shapes) go through `__call__`, whose rules convert them.
            resize_mode (`str`, *optional*): `"pad"` or `"squash"`; defaults to `self.resize_mode`.

        Returns:
            `torch.FloatTensor` of shape `(batch, 3, height, width)` of the target size, on the input's device.
        """
        import torch
        import torch.nn.functional as F

        resize_mode = resize_mode or self.resize_mode
        if resize_mode not in ("pad", "squash"):
            raise ValueError(f"resize_mode must be 'pad' or 'squash', got {resize_mode!r}.")
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
            found = f"a torch tensor of {images.dtype}" if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(
                f"preprocess_tensor takes a uint8 torch tensor of decoded 8-bit films, got {found}; pass other films "
                "to the processor's __call__."
            )
        if images.dim() == 3:
            images = images[:, None]
        if images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
            raise ValueError(
                f"preprocess_tensor takes (batch, H, W), (batch, 1, H, W) or (batch, 3, H, W) films, got shape "
                f"{tuple(images.shape)}."
            )
        if self.do_center_crop:
            raise ValueError("preprocess_tensor does not implement center cropping; use __call__.")
        modes = {PILImageResampling.BICUBIC: "bicubic", PILImageResampling.BILINEAR: "bilinear"}
        mode = modes.get(PILImageResampling(self.resample))
        if mode is None:
            raise ValueError(f"preprocess_tensor supports BICUBIC and BILINEAR resampling, not {self.resample!r}.")
        height, width = images.shape[-2:]
        _check_size(width, height, "the tensor batch", self.min_image_side)
        size = self.size
        target_height, target_width = (size["height"], size["width"]) if isinstance(size, dict) else (size.height, size.width)
        values = images.float().expand(-1, 3, -1, -1)  # grey films are repeated to RGB, as do_convert_rgb does
        if self.do_resize:
            if resize_mode == "squash":
                new_height, new_width = target_height, target_width
            else:
                scale = min(target_height / height, target_width / width)
                new_height, new_width = max(1, round(height * scale)), max(1, round(width * scale))
            # Two separable passes, horizontal then vertical, each stored as 8-bit, as PIL resamples an 8-bit image.
            for pass_size in ((height, new_width), (new_height, new_width)):
                if pass_size != tuple(values.shape[-2:]):
                    values = F.interpolate(values, size=pass_size, mode=mode, antialias=True, align_corners=False)
                    values = values.round().clamp(0, 255)  # PIL's 8-bit storage (see the docstring)
            if resize_mode == "pad":
                canvas = values.new_zeros(values.shape[0], 3, target_height, target_width)
                top, left = (target_height - new_height) // 2, (target_width - new_width) // 2
                canvas[:, :, top : top + new_height, left : left + new_width] = values
                values = canvas
        if self.do_rescale:
            values = values * self.rescale_factor
        if self.do_normalize:
            mean = torch.tensor(self.image_mean, dtype=values.dtype, device=values.device)[:, None, None]
            std = torch.tensor(self.image_std, dtype=values.dtype, device=values.device)[:, None, None]
            values = (values - mean) / std
        return values.contiguous()

    def _preprocess(
        self,
        images: list[np.ndarray],
        do_resize: bool,
        size: SizeDict,
        resample,
        do_center_crop: bool,
        crop_size: SizeDict,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean,
        image_std,
        do_pad: bool | None,
        pad_size: SizeDict | None,
        return_tensors,
        resize_mode: str | None = None,
        **kwargs,
    ) -> BatchFeature:
        resize_mode = resize_mode or self.resize_mode
        processed_images = []
        for image in images:
            if do_resize:
                image = self.resize_to_target(image, size=size, resample=resample, resize_mode=resize_mode)
            if do_center_crop:
                image = self.center_crop(image, crop_size)
            if do_rescale:
                image = self.rescale(image, rescale_factor)
            if do_normalize:
                image = self.normalize(image, image_mean, image_std)
            processed_images.append(image.astype(np.float32))
        if do_pad:
            processed_images = self.pad(processed_images, pad_size=pad_size)
        return BatchFeature(data={"pixel_values": processed_images}, tensor_type=return_tensors)


class QDistillProcessor(ProcessorMixin):
    r"""
    Wraps a [`QDistillImageProcessor`] and the report tokenizer (a `PreTrainedTokenizerFast` built by
    `train_report_tokenizer`) into one processor that saves and loads with `save_pretrained`/`from_pretrained`.

    Args:
        image_processor ([`QDistillImageProcessor`]): the image processor.
        tokenizer (`PreTrainedTokenizerBase`): the report tokenizer (`[PAD]`=0, texts wrapped as `[CLS] ... [SEP]`).

    Example:

    ```python
    >>> processor = QDistillProcessor(image_processor=QDistillImageProcessor(), tokenizer=tokenizer)
    >>> batch = processor(images=[film], text=["No acute cardiopulmonary process."])
    >>> sorted(batch.keys())
    ['attention_mask', 'input_ids', 'pixel_values']
    ```
    """

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "QDistillProcessor":
        """Load a saved processor; registers the Auto classes first, since sub-processors load through them."""
        register_processing_auto_classes()
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["pixel_values", "input_ids", "attention_mask"]

    def __call__(
        self,
        images=None,
        text: str | list[str] | None = None,
        padding: bool | str = "longest",
        truncation: bool = True,
        max_length: int | None = None,
        return_tensors: str | None = "pt",
        **images_kwargs,
    ) -> BatchFeature:
        """Process films and/or reports into model inputs.

        Args:
            images (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them, *optional*): chest films.
            text (`str` or `list[str]`, *optional*): reports (or pseudo-reports).
            padding (`bool` or `str`, *optional*, defaults to `"longest"`): tokenizer padding; the default pads to
                the longest report in the batch, never to a fixed length.
            truncation (`bool`, *optional*, defaults to `True`): truncate to `max_length`.
            max_length (`int`, *optional*): defaults to the tokenizer's `model_max_length`.
            return_tensors (`str`, *optional*, defaults to `"pt"`): tensor type.
            images_kwargs: overrides for the image processor (e.g. `resize_mode="squash"`).

        Returns:
            [`BatchFeature`] with `pixel_values` (`(B, 3, 224, 224)`, float32) when images are given and
            `input_ids`/`attention_mask` (`(B, T)`) when text is given.
        """
        if images is None and text is None:
            raise ValueError("QDistillProcessor needs `images`, `text` or both; got neither.")
        data = {}
        if text is not None:
            texts = [text] if isinstance(text, str) else text
            if not isinstance(texts, (list, tuple)):
                raise ValueError(f"`text` must be a string or a list of strings, got {type(text).__name__}.")
            for index, item in enumerate(texts):
                if not isinstance(item, str):
                    raise ValueError(f"`text[{index}]` must be a string, got {type(item).__name__}.")
            encoded = self.tokenizer(
                list(texts),
                padding=padding,
                truncation=truncation,
                max_length=max_length,
                return_tensors=return_tensors,
                return_token_type_ids=False,
            )
            data.update(encoded)
        if images is not None:
            pixel_values = self.image_processor(images, return_tensors=return_tensors, **images_kwargs)["pixel_values"]
            if text is not None and len(pixel_values) != len(data["input_ids"]):
                raise ValueError(
                    f"QDistillProcessor got {len(pixel_values)} images but {len(data['input_ids'])} texts; pass one "
                    "report per film (or call it with images only)."
                )
            data["pixel_values"] = pixel_values
        return BatchFeature(data=data, tensor_type=return_tensors)

    def batch_decode(self, *args, **kwargs) -> list[str]:
        """Forward to the tokenizer's `batch_decode`."""
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs) -> str:
        """Forward to the tokenizer's `decode`."""
        return self.tokenizer.decode(*args, **kwargs)


_AUTO_REGISTRATION_KEY = "qdistill"


def register_processing_auto_classes(config_classes: Iterable[type] = ()) -> None:
    """Register [`QDistillImageProcessor`] with `AutoImageProcessor` and [`QDistillProcessor`] with `AutoProcessor`.

    Saved folders name their classes (`image_processor_type`, `processor_class`), and the Auto classes resolve such
    names through their registered extra content. The classes are therefore always registered under the key
    `"qdistill"`, which makes `AutoImageProcessor.from_pretrained(dir)` and `AutoProcessor.from_pretrained(dir)`
    work on any folder saved by these classes; passing the model config classes also registers them for folders
    that only carry a `config.json`. Both classes are also registered for their Auto class, so saved folders carry
    `processing_qdistill.py` and an `auto_map` (remote code). Calling this twice is harmless.

    Args:
        config_classes (`Iterable[type]`, *optional*): model config classes (teacher, student) to map to these classes.
    """
    # `save_pretrained` then copies this file next to the processor files and writes `auto_map` into
    # processor_config.json, so AutoProcessor / AutoImageProcessor load them with `trust_remote_code=True` where the
    # package is not installed.
    QDistillImageProcessor.register_for_auto_class("AutoImageProcessor")
    QDistillProcessor.register_for_auto_class("AutoProcessor")
    keys = [_AUTO_REGISTRATION_KEY, *config_classes]
    for key in keys:
        AutoImageProcessor.register(key, image_processor_classes={"pil": QDistillImageProcessor}, exist_ok=True)
        AutoProcessor.register(key, QDistillProcessor, exist_ok=True)


__all__ = [
    "CHEXZERO_MEAN",
    "CHEXZERO_STD",
    "MIN_IMAGE_SIDE",
    "QDistillImageProcessor",
    "QDistillImageProcessorKwargs",
    "QDistillProcessor",
    "register_processing_auto_classes",
    "scale_high_bit_depth",
    "to_eight_bit_film",
]
