"""DICOM reading: modality LUT, VOI window / LUT, MONOCHROME1, refusals (files built with pydicom, no downloads)."""

import sys

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")  # in the `dev` extra, so CI runs these tests

from pydicom.dataset import Dataset, FileDataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

from qdistill_hf.data.dicom import is_dicom_file, read_dicom_film  # noqa: E402
from qdistill_hf.models.processing_qdistill import QDistillImageProcessor  # noqa: E402

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def write_dicom(path, pixels=None, *, interpretation="MONOCHROME2", bits_stored=12, signed=False, frames=None,
                samples=1, **attributes):
    """A small explicit-VR little-endian DICOM file; `pixels` (int array) stored in 16 bits, or no Pixel Data."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = DX_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "1.2.3.4"
    ds.Modality = "DX"
    if pixels is not None:
        pixels = np.asarray(pixels)
        ds.Rows, ds.Columns = pixels.shape[-2:]
        ds.SamplesPerPixel = samples
        ds.PhotometricInterpretation = interpretation
        ds.BitsAllocated = 16
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.PixelRepresentation = 1 if signed else 0
        if samples > 1:
            ds.PlanarConfiguration = 0
        if frames is not None:
            ds.NumberOfFrames = frames
        ds.PixelData = pixels.astype("<i2" if signed else "<u2").tobytes()
    for key, value in attributes.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


# 12-bit stored values; with slope 2 / intercept -100 they become 700, 750, 900, 1000, 1100, 1250.
STORED = np.array([[400, 425, 500], [550, 600, 675]])
# Window centre 1000, width 501, LINEAR (PS3.3 C.11.2.1.2.1): c' = 999.5, w' = 500; x <= 749.5 -> 0, x > 1249.5 -> 1,
# else (x - 999.5) / 500 + 0.5. By hand: 700 -> 0, 750 -> 0.001, 900 -> 0.301, 1000 -> 0.501, 1100 -> 0.701,
# 1250 -> 1.
WINDOWED = np.array([[0.0, 0.001, 0.301], [0.501, 0.701, 1.0]])
WINDOW = dict(RescaleSlope=2, RescaleIntercept=-100, WindowCenter=1000, WindowWidth=501)


def test_rescale_then_window_matches_hand_computed_values(tmp_path):
    pixels, meta = read_dicom_film(write_dicom(tmp_path / "w.dcm", STORED, **WINDOW))
    assert pixels.dtype == np.float32 and pixels.shape == (2, 3)
    np.testing.assert_allclose(pixels, WINDOWED, atol=1e-6)
    assert meta["voi"] == "window" and meta["modality_lut"] == "rescale" and not meta["inverted"]
    assert (meta["window_center"], meta["window_width"], meta["voi_lut_function"]) == (1000.0, 501.0, "LINEAR")
    assert meta["bits_stored"] == 12 and meta["study_instance_uid"] == "1.2.3.4"


def test_monochrome1_is_inverted_after_the_window(tmp_path):
    pixels, meta = read_dicom_film(write_dicom(tmp_path / "m1.dcm", STORED, interpretation="MONOCHROME1", **WINDOW))
    np.testing.assert_allclose(pixels, 1.0 - WINDOWED, atol=1e-6)
    assert meta["inverted"] and meta["photometric_interpretation"] == "MONOCHROME1"


def test_multi_valued_window_uses_the_first_pair(tmp_path):
    path = write_dicom(tmp_path / "two.dcm", STORED, RescaleSlope=2, RescaleIntercept=-100,
                       WindowCenter=[1000, 40], WindowWidth=[501, 400])
    np.testing.assert_allclose(read_dicom_film(path)[0], WINDOWED, atol=1e-6)


def test_signed_pixels_with_a_window(tmp_path):
    # Signed 12-bit, no rescale; centre 0, width 201: c' = -0.5, w' = 200; x <= -100.5 -> 0, x > 99.5 -> 1,
    # else (x + 0.5) / 200 + 0.5: -2048 -> 0, -100 -> 0.0025, 0 -> 0.5025, 50 -> 0.7525, 99 -> 0.9975, 2047 -> 1.
    stored = np.array([[-2048, -100, 0], [50, 99, 2047]])
    pixels, _ = read_dicom_film(write_dicom(tmp_path / "s.dcm", stored, signed=True, WindowCenter=0, WindowWidth=201))
    np.testing.assert_allclose(pixels, [[0.0, 0.0025, 0.5025], [0.7525, 0.9975, 1.0]], atol=1e-6)


@pytest.mark.parametrize(
    "function, expected",
    [
        # LINEAR_EXACT (C.11.2.1.3.2): (x - c) / w + 0.5, clipped; c = 1000, w = 400: 700 -> 0, 900 -> 0.25,
        # 1000 -> 0.5, 1100 -> 0.75, 1200 -> 1 (x > c + w/2 only above), 1300 -> 1.
        ("LINEAR_EXACT", [[0.0, 0.25, 0.5], [0.75, 1.0, 1.0]]),
        # SIGMOID (C.11.2.1.3.1): 1 / (1 + exp(-4 (x - c) / w)): 700 -> 1/(1+e^3), 900 -> 1/(1+e), 1000 -> 0.5, ...
        ("SIGMOID", [[1 / (1 + np.e**3), 1 / (1 + np.e), 0.5], [1 / (1 + np.e**-1), 1 / (1 + np.e**-2),
                                                                1 / (1 + np.e**-3)]]),
    ],
)
def test_voi_lut_functions(tmp_path, function, expected):
    stored = np.array([[700, 900, 1000], [1100, 1200, 1300]])
    path = write_dicom(tmp_path / "f.dcm", stored, WindowCenter=1000, WindowWidth=400, VOILUTFunction=function)
    pixels, meta = read_dicom_film(path)
    np.testing.assert_allclose(pixels, expected, atol=1e-6)
    assert meta["voi_lut_function"] == function


def test_without_window_min_max_keeps_full_precision(tmp_path):
    stored = np.array([[100, 1000, 1001], [1002, 4000, 4095]])
    pixels, meta = read_dicom_film(write_dicom(tmp_path / "raw.dcm", stored))
    np.testing.assert_allclose(pixels, (stored - 100) / 3995, atol=1e-7)
    assert meta["voi"] == "min_max" and meta["modality_lut"] == "none"
    # 1000, 1001 and 1002 stay three different intensities: no 8-bit rounding inside the reader.
    assert len({float(pixels[0, 1]), float(pixels[0, 2]), float(pixels[1, 0])}) == 3
    inverted, _ = read_dicom_film(write_dicom(tmp_path / "raw1.dcm", stored, interpretation="MONOCHROME1"))
    np.testing.assert_allclose(inverted, 1 - (stored - 100) / 3995, atol=1e-7)


def test_voi_lut_sequence_is_preferred_and_scaled_by_its_bit_depth(tmp_path):
    item = Dataset()
    item.add_new(0x00283002, "US", [4, 0, 12])  # LUT Descriptor: 4 entries, first value mapped 0, 12-bit entries
    item.add_new(0x00283006, "US", [0, 1000, 3000, 4095])  # LUT Data
    stored = np.array([[0, 1], [2, 3], [5, 9]])  # values past the last entry map to the last entry
    path = write_dicom(tmp_path / "lut.dcm", stored, VOILUTSequence=[item], WindowCenter=1, WindowWidth=2)
    pixels, meta = read_dicom_film(path)
    np.testing.assert_allclose(pixels, np.array([[0, 1000], [3000, 4095], [4095, 4095]]) / 4095, atol=1e-7)
    assert meta["voi"] == "lut"


def test_output_goes_through_the_image_processor_as_a_unit_float_film(tmp_path):
    pixels, _ = read_dicom_film(write_dicom(tmp_path / "big.dcm", np.arange(32 * 40).reshape(32, 40) * 3,
                                            WindowCenter=1800, WindowWidth=2400))
    processor = QDistillImageProcessor(size={"height": 30, "width": 30}, do_normalize=False)
    from_float = processor(pixels)["pixel_values"]
    from_uint8 = processor(np.rint(pixels.astype(np.float64) * 255).astype(np.uint8))["pixel_values"]
    assert from_float.shape == (1, 3, 30, 30)
    assert np.array_equal(from_float.numpy(), from_uint8.numpy())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(pixels=None), "has no Pixel Data"),
        (dict(pixels=np.zeros((2, 4, 4), int), frames=2), r"multi-frame DICOM \(2 frames\)"),
        (dict(pixels=np.zeros((4, 4, 3), int), interpretation="RGB", samples=3), "Photometric Interpretation 'RGB'"),
        (dict(pixels=np.full((4, 4), 7)), r"constant \(every pixel 7\)"),
    ],
)
def test_refusals_name_the_file(tmp_path, kwargs, message):
    pixels = kwargs.pop("pixels")
    path = write_dicom(tmp_path / "bad.dcm", pixels, **kwargs)
    with pytest.raises(ValueError, match=message) as info:
        read_dicom_film(path)
    assert str(path) in str(info.value)


def test_files_that_are_not_dicom(tmp_path):
    png = tmp_path / "film.dcm"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 200)
    assert not is_dicom_file(png)
    with pytest.raises(ValueError, match="not a DICOM file") as info:
        read_dicom_film(png)
    assert str(png) in str(info.value)
    good = write_dicom(tmp_path / "good.dcm", STORED, **WINDOW)
    assert is_dicom_file(good)
    truncated = tmp_path / "cut.dcm"
    truncated.write_bytes(good.read_bytes()[:-5])  # pixel data 5 bytes short
    with pytest.raises(ValueError, match="cut.dcm"):
        read_dicom_film(truncated)
    with pytest.raises(FileNotFoundError, match="missing.dcm"):
        read_dicom_film(tmp_path / "missing.dcm")


def test_missing_pydicom_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(ImportError, match=r"pip install qdistill_hf\[dicom\]"):
        read_dicom_film(tmp_path / "any.dcm")
