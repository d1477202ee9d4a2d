"""Read a chest film from a DICOM file at full precision (optional extra: ``pip install qdistill_hf[dicom]``).

:func:`read_dicom_film` turns the stored pixel values into display intensities the way a DICOM viewer does
(PS3.3 C.11, C.8.11.3), all in floating point so no 12- or 16-bit precision is lost before the image processor:

1. **Modality LUT** (``pydicom.pixels.apply_modality_lut``): *Modality LUT Sequence* or *Rescale Slope* /
   *Rescale Intercept*.
2. **VOI LUT** (``pydicom.pixels.apply_voi_lut``): the *VOI LUT Sequence* when present (preferred, as pydicom
   does), otherwise the *Window Center* / *Window Width* (the first pair when several are stored) with the
   *VOI LUT Function* (``LINEAR`` by default, ``LINEAR_EXACT``, ``SIGMOID``). The output is divided by its range,
   so the window maps to ``[0, 1]``. Without either, the film is min-max scaled per image (as the image processor
   does for 16-bit PNGs by default).
3. ``MONOCHROME1`` (white = low values) is inverted (``1 - v``), so 1.0 is always white on display.

The result is a ``float32`` array in ``[0, 1]`` that [`~qdistill_hf.models.processing_qdistill.QDistillImageProcessor`]
(or ``to_eight_bit_film``) accepts as a ``[0, 1]`` float film. Note that the processor (the PIL backend of the
CheXzero CLIP processor, on which the encoder was trained with 8-bit films) quantises to 8 bits as its first step:
that single quantisation happens *after* the window, so the window is resolved in 256 levels, as on an 8-bit
display; the modality LUT, the window and the inversion never see rounded values.

Refused, with a message naming the file: objects without *Pixel Data* (structured reports, presentation states...),
multi-frame objects (*Number of Frames* > 1), colour or palette images (anything but ``MONOCHROME1`` /
``MONOCHROME2``, one sample per pixel), constant films, and pixel data pydicom cannot decode.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

DICOM_INSTALL_HINT = "pip install qdistill_hf[dicom]"
GREY_INTERPRETATIONS = ("MONOCHROME1", "MONOCHROME2")
# The "DICM" marker after the 128-byte preamble of a DICOM Part 10 file.
_MAGIC_OFFSET = 128
_MAGIC = b"DICM"


def is_dicom_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a DICOM Part 10 file (the ``DICM`` marker after the 128-byte preamble).

    Needs no pydicom. A file that cannot be opened or is shorter than 132 bytes is not DICOM.

    Args:
        path: the file.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(_MAGIC_OFFSET + len(_MAGIC))
    except OSError:
        return False
    return head[_MAGIC_OFFSET:] == _MAGIC


def _import_pydicom():
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError as exc:
        raise ImportError(f"Reading DICOM files needs pydicom: `{DICOM_INSTALL_HINT}` ({exc})") from exc
    return pydicom, apply_modality_lut, apply_voi_lut


def _first(value: Any) -> float:
    """First value of a possibly multi-valued DS element."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return float(value[0])
    return float(value)


def _window_output_range(ds: Any) -> tuple[float, float]:
    """The ``(y_min, y_max)`` that ``pydicom.pixels.apply_windowing`` maps a window onto.

    pydicom uses the range of the stored values (``BitsStored``, signed or not; the modality LUT's bit depth when a
    Modality LUT Sequence is present) passed through the rescale; dividing by it brings the window to [0, 1].
    """
    if ds.get("ModalityLUTSequence"):
        y_min, y_max = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif int(ds.PixelRepresentation) == 0:
        y_min, y_max = 0.0, float(2 ** int(ds.BitsStored) - 1)
    else:
        y_min, y_max = float(-(2 ** (int(ds.BitsStored) - 1))), float(2 ** (int(ds.BitsStored) - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        y_min, y_max = y_min * float(slope) + float(intercept), y_max * float(slope) + float(intercept)
    return y_min, y_max


def read_dicom_film(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """Read one single-frame greyscale DICOM film as display intensities in ``[0, 1]`` (see the module docstring).

    Args:
        path: a DICOM Part 10 file.

    Returns:
        ``(pixels, metadata)``: ``pixels`` is a ``float32`` array of shape ``(Rows, Columns)`` in ``[0, 1]``, 1.0 =
        white on display (``MONOCHROME1`` already inverted); ``metadata`` holds ``path``,
        ``photometric_interpretation``, ``bits_stored``, ``modality_lut`` (``"lut"``, ``"rescale"`` or ``"none"``),
        ``voi`` (``"lut"``, ``"window"`` or ``"min_max"``), ``window_center`` / ``window_width`` /
        ``voi_lut_function`` (when windowed), ``inverted`` and, when present, ``study_instance_uid``,
        ``sop_instance_uid``, ``view_position``, ``modality`` and ``body_part_examined``.

    Raises:
        ImportError: pydicom is not installed (the message says ``pip install qdistill_hf[dicom]``).
        FileNotFoundError: the file does not exist.
        ValueError: the file is not DICOM, holds no pixel data, is multi-frame, not greyscale, constant, or its
            pixel data cannot be decoded; every message names the file.
    """
    pydicom, apply_modality_lut, apply_voi_lut = _import_pydicom()
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"DICOM path {path} is a directory, expected a file")
    if not path.is_file():
        raise FileNotFoundError(f"DICOM file not found: {path}")
    try:
        ds = pydicom.dcmread(path)
    except pydicom.errors.InvalidDicomError as exc:
        raise ValueError(f"{path}: not a DICOM file ({exc})") from None
    except (EOFError, OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: cannot parse the DICOM file ({type(exc).__name__}: {exc}); it is truncated or "
                         "corrupt") from exc
    if "PixelData" not in ds:
        sop = ds.get("SOPClassUID")
        kind = f" (SOP class {sop.name if hasattr(sop, 'name') else sop})" if sop else ""
        raise ValueError(f"{path}: DICOM object{kind} has no Pixel Data (7FE0,0010); it is not an image, nothing to "
                         "triage")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise ValueError(f"{path}: multi-frame DICOM ({frames} frames) is not supported; a chest film is one frame. "
                         "Split the frames into single-frame files if each is a film.")
    interpretation = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    samples = int(ds.get("SamplesPerPixel") or 1)
    if interpretation not in GREY_INTERPRETATIONS or samples != 1:
        raise ValueError(f"{path}: Photometric Interpretation {interpretation or 'missing'!r} with {samples} "
                         f"sample(s) per pixel; only greyscale films ({' or '.join(GREY_INTERPRETATIONS)}, one sample "
                         "per pixel) are supported")
    try:
        stored = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - pydicom raises several types for undecodable data; all are this file's
        raise ValueError(f"{path}: cannot decode the pixel data ({type(exc).__name__}: {exc}). Compressed transfer "
                         "syntaxes need a pydicom pixel-data plugin (e.g. pylibjpeg).") from exc
    if stored.ndim != 2:
        raise ValueError(f"{path}: pixel data of shape {tuple(stored.shape)}; expected one 2-D frame")

    meta: dict[str, Any] = {
        "path": str(path),
        "photometric_interpretation": interpretation,
        "bits_stored": int(ds.get("BitsStored") or stored.dtype.itemsize * 8),
    }
    for key, tag in (("study_instance_uid", "StudyInstanceUID"), ("sop_instance_uid", "SOPInstanceUID"),
                     ("view_position", "ViewPosition"), ("modality", "Modality"),
                     ("body_part_examined", "BodyPartExamined")):
        if ds.get(tag) is not None:
            meta[key] = str(ds.get(tag))

    if ds.get("ModalityLUTSequence"):
        meta["modality_lut"] = "lut"
    elif "RescaleSlope" in ds and "RescaleIntercept" in ds:
        meta["modality_lut"] = "rescale"
    else:
        meta["modality_lut"] = "none"
    values = apply_modality_lut(stored, ds)

    has_lut = bool(ds.get("VOILUTSequence")) and ds.VOILUTSequence[0].get("LUTDescriptor") is not None \
        and ds.VOILUTSequence[0].get("LUTData") is not None
    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    try:
        if has_lut:
            if values.dtype.kind == "f" and np.array_equal(values, np.round(values)):
                values = values.astype(np.int64)  # the table is indexed by integers; pydicom warns on floats
            depth = int(ds.VOILUTSequence[0].LUTDescriptor[2])
            shown = apply_voi_lut(values, ds).astype(np.float64) / float(2**depth - 1)
            meta["voi"] = "lut"
        elif has_window:
            y_min, y_max = _window_output_range(ds)
            shown = (apply_voi_lut(values, ds).astype(np.float64) - y_min) / (y_max - y_min)
            meta.update(voi="window", window_center=_first(ds.WindowCenter), window_width=_first(ds.WindowWidth),
                        voi_lut_function=str(ds.get("VOILUTFunction", "LINEAR")).upper())
        else:
            values = values.astype(np.float64)
            low, high = float(values.min()), float(values.max())
            if high == low:
                raise ValueError(f"{path}: the film is constant (every pixel {low:g}) and has no window; nothing to "
                                 "triage")
            shown = (values - low) / (high - low)
            meta["voi"] = "min_max"
    except (ValueError, NotImplementedError, AttributeError, IndexError) as exc:
        if str(path) in str(exc):
            raise
        raise ValueError(f"{path}: cannot apply the VOI LUT / window ({type(exc).__name__}: {exc})") from exc
    if not np.isfinite(shown).all():
        raise ValueError(f"{path}: the VOI LUT / window produced non-finite values (check Window Width and the "
                         "rescale)")
    low, high = float(shown.min()), float(shown.max())
    if low < -1e-9 or high > 1 + 1e-9:
        raise ValueError(f"{path}: display values span [{low:g}, {high:g}] after the VOI LUT, outside [0, 1]; the "
                         "LUT descriptor's bit depth does not match its data")
    # Only float rounding noise (< 1e-9, just checked) lies outside [0, 1] here; keep it from becoming a negative pixel.
    np.clip(shown, 0.0, 1.0, out=shown)
    meta["inverted"] = interpretation == "MONOCHROME1"
    if meta["inverted"]:
        shown = 1.0 - shown
    return shown.astype(np.float32), meta


__all__ = ["DICOM_INSTALL_HINT", "GREY_INTERPRETATIONS", "is_dicom_file", "read_dicom_film"]
