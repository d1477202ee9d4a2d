"""The web demo (examples/app.py) end to end in a real headless Chromium: upload a film, read the verdict off the page.

Needs Debian's `chromium` (`.ci/run` installs it) and the `app` extra (gradio, playwright; in `dev`). Playwright
drives the system Chromium through `executable_path`; its own browser download is never used.
Set QDISTILL_SCREENSHOT_DIR to keep the page's screenshot outside the test's tmp_path.
"""

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transformers import pipeline

from qdistill_hf import (
    CXR_TRIAGE_TASK,
    QDistillImageProcessor,
    QDistillProcessor,
    QDistillStudentModel,
    train_report_tokenizer,
)
from tiny_models import student_config

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = REPO_ROOT / "examples"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]


def _import_app():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import app
    finally:
        sys.path.remove(str(EXAMPLES))
    return app


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _film(path: Path, seed: int = 3) -> Path:
    """A synthetic film as a PNG: smooth structure plus noise, 48x40 (non-square, so the processor pads)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:40, 0:48]
    pixels = 120 + 60 * np.sin(x / 7.0) * np.cos(y / 5.0) + rng.normal(0, 20, (40, 48))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="L").save(path)
    return path


def _dicom_film(path: Path, seed: int = 5) -> Path:
    """A 12-bit MONOCHROME2 DICOM film (60x52) with a rescale and a window, written with pydicom."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:52, 0:60]
    stored = 2000 + 900 * np.sin(x / 6.0) * np.cos(y / 9.0) + rng.normal(0, 150, (52, 60))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "DX"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 52, 60, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept, ds.WindowCenter, ds.WindowWidth = 1, 0, 2000, 2400
    ds.PixelData = np.clip(stored, 0, 4095).astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _upload_and_read(page, app, url: str, film: Path, screenshot: Path) -> dict:
    """Open the page, upload `film`, wait for the verdict and the attention map; what the page shows."""
    page.goto(url)
    page.locator(f"#{app.FILM_INPUT_ID} input[type=file]").set_input_files(str(film))
    verdict = page.locator(f"#{app.VERDICT_ID}")
    verdict.wait_for(timeout=30_000)
    page.locator(f"#{app.ATTENTION_ID} img").wait_for(timeout=30_000)
    shown = {"label": verdict.get_attribute("data-label"), "text": verdict.inner_text(),
             "card": page.locator(f"#{app.RESULT_ID}").inner_text()}
    page.screenshot(path=str(screenshot), full_page=True)
    return shown


def _student_folder(tmp_path: Path, film: Image.Image) -> tuple[Path, dict]:
    """A tiny image-only student with processor, its operating threshold placed so the stored threshold (not argmax)
    decides the label of `film`; returns the folder and what the page must show."""
    torch.manual_seed(0)
    model = QDistillStudentModel(student_config(text_mode="image_only", calibration_temperature=2.0)).eval()
    tokenizer = train_report_tokenizer(["no acute findings", "large pneumothorax", "small effusion"], vocab_size=60,
                                       min_frequency=1)
    processor = QDistillProcessor(image_processor=QDistillImageProcessor(size={"height": 30, "width": 30}),
                                  tokenizer=tokenizer)
    with torch.no_grad():
        logits = model(**processor(images=[film])).logits
    p_urgent = float(model.triage_probabilities(logits)[0, 1])
    # Argmax would say the opposite of what this threshold says: the page must follow the threshold.
    threshold = round(p_urgent * 0.9, 4) if p_urgent < 0.5 else round((p_urgent + 1) / 2, 4)
    expected_label = "urgent" if p_urgent >= threshold else "non_urgent"
    assert expected_label != model.config.id2label[int(logits.argmax())]
    model.config.decision_threshold = threshold
    model.config.decision_rule = "test rule: threshold placed against argmax on the test film"
    folder = tmp_path / "student"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, {"label": expected_label, "probability": p_urgent, "threshold": threshold}


def _wait_until_serving(url: str, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"app exited with {process.returncode}:\n{process.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"app did not answer on {url} within {timeout:.0f} s")


def test_read_film_names_the_file_it_cannot_read(tmp_path):
    app = _import_app()
    bad = tmp_path / "notes.png"
    bad.write_text("not a film")
    with pytest.raises(ValueError, match="notes.png: not a readable PNG/JPEG film"):
        app.read_film(bad)
    good = _film(tmp_path / "film.png")
    film, description = app.read_film(good)
    assert film.size == (48, 40) and description == "PNG L, 48x40"


def test_attention_overlay_leaves_the_least_attended_pixels_unchanged():
    app = _import_app()
    film = Image.new("RGB", (3, 1), (100, 100, 100))
    attention = Image.fromarray(np.array([[50, 91, 255]], dtype=np.uint8), mode="L")
    pixels = np.asarray(app.attention_overlay(film, attention)).astype(int)
    # Stretched to heat [0, 0.2, 1], opacity 0.6 * heat: 0 -> the film; 0.2 -> 100 * 0.88 + (153, 0, 0) * 0.12;
    # 1 -> 100 * 0.4 + 255 * 0.6 (white).
    assert pixels.tolist() == [[[100, 100, 100], [106, 88, 88], [193, 193, 193]]]


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium browser installed (apt-get install chromium; .ci/run does)")
def test_app_triages_an_uploaded_film_in_headless_chromium(tmp_path):
    if importlib.util.find_spec("gradio") is None:  # find_spec: importing gradio here would only cost seconds
        pytest.skip("the app extra is not installed (pip install -e '.[app]')")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the app extra is not installed (playwright)")
    app = _import_app()
    film_path = _film(tmp_path / "film.png")
    folder, expected = _student_folder(tmp_path, Image.open(film_path))
    dicom_path = _dicom_film(tmp_path / "film.dcm") if app.dicom_supported() else None

    # The server starts in its own process while this one asks the pipeline for the reference answers.
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO_ROOT)}
    server = subprocess.Popen([sys.executable, str(EXAMPLES / "app.py"), "--model", str(folder), "--port", str(port)],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # What the cxr-triage pipeline gives in-process for the same films.
        triage = pipeline(CXR_TRIAGE_TASK, model=str(folder))
        in_process = triage(app.read_film(film_path)[0])
        assert in_process["label"] == expected["label"]
        assert in_process["probability"] == pytest.approx(expected["probability"], abs=1e-6)
        assert in_process["threshold"] == pytest.approx(expected["threshold"])
        in_process_dicom = triage(app.read_film(dicom_path)[0]) if dicom_path else None

        _wait_until_serving(url, server)
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                requested = []
                page.on("request", lambda request: requested.append(request.url))
                screenshot = tmp_path / "app.png"
                shown = _upload_and_read(page, app, url, film_path, screenshot)
                if dicom_path:
                    shown_dicom = _upload_and_read(page, app, url, dicom_path, tmp_path / "app_dicom.png")
                # A file that is no film: the page says so and names it, instead of a verdict.
                not_a_film = tmp_path / "notes.png"
                not_a_film.write_text("not a film")
                page.goto(url)
                page.locator(f"#{app.FILM_INPUT_ID} input[type=file]").set_input_files(str(not_a_film))
                error = page.locator(f"#{app.ERROR_ID}")
                error.wait_for(timeout=30_000)
                error_text = error.inner_text()
                verdicts_after_error = page.locator(f"#{app.VERDICT_ID}").count()
            finally:
                browser.close()
    finally:
        server.terminate()
        server.wait(timeout=10)

    assert shown["label"] == in_process["label"] == expected["label"]
    assert shown["text"] == expected["label"].replace("_", "-").upper()
    assert f"p(urgent) = {in_process['probability']:.3f}" in shown["card"]
    assert f"operating threshold {expected['threshold']:.3f}" in shown["card"]
    assert "test rule: threshold placed against argmax" in shown["card"]
    assert "PNG L, 48x40" in shown["card"]
    if dicom_path:  # a DICOM upload goes through read_dicom_film: 12-bit, windowed
        assert shown_dicom["label"] == in_process_dicom["label"]
        assert f"p(urgent) = {in_process_dicom['probability']:.3f}" in shown_dicom["card"]
        assert "DICOM MONOCHROME2, 12-bit, 60x52, VOI: window C 2000 / W 2400" in shown_dicom["card"]
    assert "notes.png: not a readable PNG/JPEG film" in error_text and verdicts_after_error == 0
    # Everything the page asked for came from the local server (no web fonts, no CDN, no analytics).
    outside = [u for u in requested if not u.startswith((url, "data:", "blob:"))]
    assert requested and outside == []
    assert screenshot.stat().st_size > 10_000
    keep = os.environ.get("QDISTILL_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, Path(keep) / "app_browser_test.png")
        if dicom_path:
            shutil.copy(tmp_path / "app_dicom.png", Path(keep) / "app_browser_test_dicom.png")
