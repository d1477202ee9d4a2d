"""A small web demo: upload a chest film, see the student's triage, its calibrated probability and its attention map.

    pip install -e ".[app]"
    python examples/app.py                                   # the image-only student that `make demo` writes
    python examples/app.py --model path/to/student --port 7860

Then open http://127.0.0.1:7860 in a browser on the same machine. The app binds 127.0.0.1 only and talks to nothing
outside it: no share link, no analytics, no web fonts (system fonts), no server-side rendering process.

What the page shows for one uploaded film (PNG, JPEG, or DICOM with pydicom: `pip install -e ".[dicom]"`):

- the triage label at the model's stored operating point (`config.decision_threshold`, 0.5 when none is stored);
- the calibrated probability of `urgent` (`softmax(logits / config.calibration_temperature)`) on a bar with the
  operating threshold marked, and where that threshold came from (`config.decision_rule`);
- what was read (format, bit depth, size; the window for DICOM) and the pipeline's plausibility warnings;
- the film as read, and the attention map of the student's queries blended over it.

The triage itself is the `cxr-triage` pipeline's (`qdistill_hf/models/pipeline_qdistill.py`); this file only reads
the film and lays out the page. Research demo only: not a medical device.
"""

from __future__ import annotations

import argparse
import html
import logging
import os
from pathlib import Path
from typing import Any, Callable

# Before gradio is imported: no usage analytics, no version check, no telemetry, Hub offline.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

logger = logging.getLogger("qdistill_app")

DEFAULT_MODEL = "outputs/demo/student"
FILM_SUFFIXES = (".png", ".jpg", ".jpeg")
DICOM_SUFFIXES = (".dcm", ".dicom")
RESULT_ID = "triage-result"
VERDICT_ID = "triage-verdict"
ERROR_ID = "triage-error"
ATTENTION_ID = "attention-map"
FILM_INPUT_ID = "film-upload"

CSS = """
#triage-result .qd-card {border: 1px solid #c9ced6; border-radius: 8px; padding: 14px 16px; background: #fff;}
#triage-result .qd-verdict {font-size: 2.0rem; font-weight: 700; letter-spacing: .04em; margin: 0 0 6px 0;}
#triage-result .qd-urgent .qd-verdict {color: #b3261e;}
#triage-result .qd-routine .qd-verdict {color: #1e6b3a;}
#triage-result .qd-line {font-size: 1.05rem; margin: 4px 0; color: #1f2328;}
#triage-result .qd-small {font-size: .9rem; color: #4a525c; margin: 4px 0;}
#triage-result .qd-bar {position: relative; height: 22px; background: #eceff3; border-radius: 4px;
  margin: 12px 0 30px 0;}
#triage-result .qd-fill {position: absolute; left: 0; top: 0; bottom: 0; border-radius: 4px;}
#triage-result .qd-urgent .qd-fill {background: #d9534f;}
#triage-result .qd-routine .qd-fill {background: #4c9a6a;}
#triage-result .qd-mark {position: absolute; top: -4px; bottom: -4px; width: 3px; background: #1f2328;}
#triage-result .qd-mark span {position: absolute; top: 30px; left: -60px; width: 120px; text-align: center;
  font-size: .8rem; color: #1f2328; white-space: nowrap;}
#triage-result .qd-scale {position: absolute; top: 26px; font-size: .75rem; color: #4a525c;}
#triage-result .qd-scores {display: grid; grid-template-columns: max-content max-content; column-gap: 18px;
  row-gap: 2px; margin-top: 8px; font-size: .9rem; color: #1f2328;}
#triage-result .qd-scores .qd-head {font-weight: 600; border-bottom: 1px solid #c9ced6;}
#triage-result .qd-empty {color: #4a525c; font-size: 1rem;}
#triage-result .qd-warning {color: #8a5300; background: #fff4e0; border-radius: 4px; padding: 3px 6px; margin: 4px 0;
  font-size: .9rem;}
"""


# --------------------------------------------------------------------------------------------------------------------
# Reading a film
# --------------------------------------------------------------------------------------------------------------------
def dicom_supported() -> bool:
    """Whether DICOM uploads can be read: `qdistill_hf.data.dicom` and pydicom are both installed."""
    import importlib.util

    try:
        import qdistill_hf.data.dicom  # noqa: F401
    except ImportError:
        return False
    return importlib.util.find_spec("pydicom") is not None


def accepted_suffixes() -> list[str]:
    """The file types the upload box accepts: PNG/JPEG always, DICOM when DICOM support is installed."""
    return list(FILM_SUFFIXES) + (list(DICOM_SUFFIXES) if dicom_supported() else [])


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    with open(path, "rb") as handle:
        handle.seek(128)
        return handle.read(4) == b"DICM"


def read_film(path: str | os.PathLike) -> tuple[Any, str]:
    """Open an uploaded film: PNG/JPEG with PIL, DICOM with `qdistill_hf.data.dicom.read_dicom_film`.

    Args:
        path (`str` or `os.PathLike`): the uploaded file.

    Returns:
        `(film, description)`: a decoded PIL image (16-bit PNGs keep their depth; the pipeline's processor scales
        them), or for DICOM the float32 `[0, 1]` display intensities after the modality and VOI LUTs; and a short
        description of what was read (format, mode/bit depth, size; for DICOM the window).

    Raises:
        ValueError: the file is not a readable PNG/JPEG/DICOM film, or DICOM support is missing; the message names
            the file.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if _is_dicom(path):
        if not dicom_supported():
            raise ValueError(f"{path.name}: a DICOM file, but DICOM support is not installed "
                             "(pip install qdistill_hf[dicom]). Upload a PNG or JPEG export instead.")
        from qdistill_hf.data.dicom import read_dicom_film

        pixels, meta = read_dicom_film(path)
        voi = meta.get("voi")
        if voi == "window":
            voi = f"window C {meta['window_center']:g} / W {meta['window_width']:g}"
        description = (f"DICOM {meta.get('photometric_interpretation')}, {meta.get('bits_stored')}-bit, "
                       f"{pixels.shape[1]}x{pixels.shape[0]}, VOI: {voi}")
        return pixels, description
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{path.name}: not a readable PNG/JPEG film ({error}).") from error
    return image, f"{image.format} {image.mode}, {image.width}x{image.height}"


# --------------------------------------------------------------------------------------------------------------------
# Triage: the cxr-triage pipeline's
# --------------------------------------------------------------------------------------------------------------------
def load_triage(model_folder: str | os.PathLike) -> Callable[[Any], dict]:
    """The `cxr-triage` pipeline of `model_folder`, as a function `film -> dict`.

    Args:
        model_folder (`str` or `os.PathLike`): a saved image-only student with its processor.

    Returns:
        A callable returning the pipeline's dict for one film: `label`, `probability` (calibrated p(urgent)),
        `threshold`, `threshold_source`, `scores`, `warnings` and `attention_map` (mode "L", the film's size).
    """
    folder = Path(model_folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"No saved model in {folder} (no config.json). Run `make demo` first, or pass "
                                "--model with a folder written by save_pretrained.")
    from transformers import pipeline

    from qdistill_hf import CXR_TRIAGE_TASK, CxrTriagePipeline  # importing qdistill_hf registers the Auto classes

    # pipeline_class: the installed pipeline, also for folders that carry their own copy (save_for_hub writes
    # custom_pipelines, for which transformers otherwise asks for trust_remote_code=True).
    pipe = pipeline(CXR_TRIAGE_TASK, model=str(folder), pipeline_class=CxrTriagePipeline)

    def triage(film) -> dict:
        return pipe(film, return_attention_map=True)

    return triage


# --------------------------------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------------------------------
def _display_film(film):
    """An 8-bit RGB copy of the film for display, by the processor's own rule (16-bit and float films)."""
    from qdistill_hf.models.processing_qdistill import to_eight_bit_film

    return to_eight_bit_film(film, name="uploaded film").convert("RGB")


def _as_pil(picture):
    """The pipeline's attention map as a PIL image (it may come as PIL or as PNG bytes)."""
    import io

    from PIL import Image

    if picture is None or isinstance(picture, Image.Image):
        return picture
    if isinstance(picture, (bytes, bytearray)):
        return Image.open(io.BytesIO(picture))
    raise TypeError(f"attention_map must be a PIL image or PNG bytes, got {type(picture).__name__}.")


def attention_overlay(film_rgb, attention, strength: float = 0.6):
    """The attention map (mode "L", 255 = most attended) in a black-red-yellow scale, blended over the film.

    Display only: the map is stretched from its least to its most attended pixel (a nearly uniform map would
    otherwise tint the whole film) and opacity grows with attention, so the least attended regions show the film
    unchanged.
    """
    import numpy as np
    from PIL import Image

    attention = _as_pil(attention)
    if attention is None:
        return None
    if attention.size != film_rgb.size:
        attention = attention.resize(film_rgb.size, Image.BILINEAR)
    heat = np.asarray(attention.convert("L"), dtype=np.float32)
    spread = float(heat.max() - heat.min())
    heat = (heat - heat.min()) / spread if spread > 0 else np.zeros_like(heat)
    colour = np.stack([np.clip(3 * heat, 0, 1), np.clip(3 * heat - 1, 0, 1), np.clip(3 * heat - 2, 0, 1)], -1) * 255
    alpha = strength * heat[..., None]
    base = np.asarray(film_rgb, dtype=np.float32)
    return Image.fromarray(np.rint(base * (1 - alpha) + colour * alpha).astype(np.uint8), mode="RGB")


def result_html(result: dict, film_name: str, film_description: str = "") -> str:
    """The verdict card: label, calibrated probability on a bar with the operating threshold, its source, the film's
    plausibility warnings, and every class's calibrated probability."""
    label = str(result["label"])
    probability = float(result["probability"])
    threshold = result.get("threshold")
    source = result.get("threshold_source") or "not recorded in the model's config"
    urgent = label == "urgent"
    kind = "qd-urgent" if urgent else "qd-routine"
    shown_threshold = 0.5 if threshold is None else float(threshold)
    if threshold is None:  # more than two classes: the pipeline decides by argmax
        rule = f"p({html.escape(label)}) = {probability:.3f}, the largest calibrated probability (argmax)"
    else:
        relation = "&ge;" if probability >= float(threshold) else "&lt;"
        rule = f"p(urgent) = {probability:.3f} {relation} operating threshold {float(threshold):.3f}"
    scores = result.get("scores") or {}
    if isinstance(scores, dict):
        score_items = list(scores.items())
    else:  # a list of {"label", "score"} dicts, as transformers' classification pipelines return
        score_items = [(item["label"], item["score"]) for item in scores]
    rows = "".join(f"<span>{html.escape(str(name))}</span><span>{float(score):.3f}</span>"
                   for name, score in score_items)
    warnings = "".join(f'<div class="qd-warning">&#9888; {html.escape(str(message))}</div>'
                       for message in result.get("warnings") or [])
    return (
        f'<div class="qd-card {kind}">'
        f'<div class="qd-verdict" id="{VERDICT_ID}" data-label="{html.escape(label)}">'
        f"{html.escape(label.replace('_', '-').upper())}</div>"
        f'<div class="qd-line">{rule}</div>'
        f'<div class="qd-bar" title="calibrated p(urgent)">'
        f'<div class="qd-fill" style="width:{100 * probability:.1f}%"></div>'
        f'<div class="qd-mark" style="left:{100 * shown_threshold:.1f}%"><span>threshold {shown_threshold:.2f}</span>'
        f'</div><span class="qd-scale" style="left:0">0</span><span class="qd-scale" style="right:0">1</span></div>'
        f'<div class="qd-small"><b>Threshold source:</b> {html.escape(str(source))}</div>'
        f'<div class="qd-small"><b>Film:</b> {html.escape(film_name)}'
        f'{" &middot; " + html.escape(film_description) if film_description else ""}</div>'
        f"{warnings}"
        f'<div class="qd-scores"><span class="qd-head">class</span><span class="qd-head">calibrated probability'
        f"</span>{rows}</div>"
        f"</div>"
    )


def calibration_note(model_folder: str | os.PathLike) -> str:
    """One line on the saved calibration temperature, read from the folder's config.json (display only)."""
    import json

    config = json.loads((Path(model_folder) / "config.json").read_text())
    temperature = float(config.get("calibration_temperature", 1.0))
    if temperature == 1.0:
        return "calibration temperature T = 1 (no temperature fitted)"
    return f"calibration temperature T = {temperature:.3g}"


def error_html(message: str) -> str:
    return f'<div class="qd-card"><div class="qd-warning" id="{ERROR_ID}">{html.escape(message)}</div></div>'


EMPTY_HTML = '<div class="qd-card"><div class="qd-empty">Upload a film to triage it.</div></div>'


def build_app(model_folder: str | os.PathLike = DEFAULT_MODEL, triage: Callable[[Any], dict] | None = None):
    """Build the Gradio app for one saved student.

    Args:
        model_folder (`str` or `os.PathLike`, *optional*, defaults to `outputs/demo/student`): the student folder.
        triage (`Callable`, *optional*): `film -> dict` as [`load_triage`] returns; loaded from `model_folder` when
            not given.

    Returns:
        `gradio.Blocks`, not launched: call `.launch(server_name="127.0.0.1", ...)` or use [`launch`].
    """
    import gradio as gr

    triage = triage if triage is not None else load_triage(model_folder)
    suffixes = accepted_suffixes()
    dicom_note = "DICOM" if any(s in suffixes for s in DICOM_SUFFIXES) else "DICOM not installed"

    def run(file_path):
        if not file_path:
            return EMPTY_HTML, None, None
        name = Path(file_path).name
        try:
            film, description = read_film(file_path)
            result = triage(film)
        except (ValueError, OSError) as error:  # bad input: say so on the page, name the file
            logger.warning(f"{name}: {error}")
            return error_html(str(error) if name in str(error) else f"{name}: {error}"), None, None
        logger.info(f"{name}: {result['label']} p(urgent)={float(result['probability']):.3f}")
        shown = _display_film(film)
        return (result_html(result, name, description), shown,
                attention_overlay(shown, result.get("attention_map")))

    with gr.Blocks(title="Q-DISTILL triage demo", analytics_enabled=False) as app:
        gr.Markdown(
            f"## Q-DISTILL chest X-ray triage &mdash; research demo, not for clinical use\n"
            f"Model: `{Path(model_folder)}` &middot; {calibration_note(model_folder)} &middot; upload a frontal chest "
            f"film (PNG/JPEG, {dicom_note})."
        )
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=280):
                upload = gr.File(label="Film", file_types=suffixes, type="filepath", elem_id=FILM_INPUT_ID,
                                 height=120)
                result = gr.HTML(EMPTY_HTML, elem_id=RESULT_ID)
            with gr.Column(scale=1, min_width=280):
                film = gr.Image(label="Film (as read)", type="pil", interactive=False, height=360,
                                elem_id="film-view")
            with gr.Column(scale=1, min_width=280):
                attention = gr.Image(label="Attention map over the film", type="pil",
                                     interactive=False, height=360, elem_id=ATTENTION_ID)
        gr.Markdown(
            "p(urgent) is `softmax(logits / T)` with the calibration temperature T saved in the model's config "
            "(fitted on the validation split; T = 1 means no calibration was fitted); the label compares it with "
            "the operating threshold saved with the model (0.5 when none is saved). "
            "The attention map is the student's last cross-attention layer, averaged over its queries and heads, "
            "on the frozen encoder's patch grid and mapped back onto the film, shown from its least attended "
            "region (film unchanged) to its most attended (yellow), through red. It shows where the model looked, "
            "not a segmentation of a finding."
        )
        upload.change(run, inputs=upload, outputs=[result, film, attention])
    return app


def theme():
    """Gradio's default look with system fonts (the default pulls web fonts from Google, unreachable offline)."""
    import gradio as gr

    system = ["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "Helvetica", "Arial", "sans-serif"]
    mono = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]
    return gr.themes.Default(font=system, font_mono=mono)


def launch(app, port: int, host: str = "127.0.0.1", block: bool = True):
    """Serve on `host:port` with everything that would reach outside the machine turned off."""
    return app.launch(
        server_name=host, server_port=port, share=False, inbrowser=False, ssr_mode=False, pwa=False,
        mcp_server=False, footer_links=[], quiet=True, prevent_thread_lock=not block, theme=theme(), css=CSS,
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="saved image-only student folder (with processor)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (keep 127.0.0.1 unless you mean it)")
    parser.add_argument("--port", type=int, default=7860)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own start-up probes of the local server
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    app = build_app(args.model)
    logger.info(f"serving {args.model} on http://{args.host}:{args.port}")
    launch(app, args.port, args.host)
    return 0


__all__ = ["accepted_suffixes", "attention_overlay", "build_app", "dicom_supported", "launch", "load_triage",
           "read_film", "result_html"]


if __name__ == "__main__":
    raise SystemExit(main())
