"""The stock image-classification pipeline and the custom "cxr-triage" pipeline, inside the package.

The same pipelines without the package (remote code, fresh process) are tested in test_standalone_hub_folder.py.
"""

import io
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageClassification, pipeline

from qdistill_hf import CxrTriagePipeline, QDistillProcessor
from qdistill_hf.models.pipeline_qdistill import FilmCheckWarning, film_check_messages
from training_toys import toy_image_processor, toy_student, toy_teacher, toy_tokenizer

FILM = np.random.default_rng(0).integers(0, 256, (40, 36), dtype=np.uint8)


def _save(folder, model, calibrated: bool = True):
    if calibrated:
        model.config.calibration_temperature = 2.0
        model.config.decision_threshold = 0.3
        model.config.decision_rule = "sensitivity >= 0.9 on validation (8 studies)"
    model.eval().save_pretrained(folder)
    QDistillProcessor(image_processor=toy_image_processor(), tokenizer=toy_tokenizer()).save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    models = {
        "image_only": _save(root / "image_only", toy_student(text_mode="image_only")),
        "pseudo_report": _save(root / "pseudo_report", toy_student(text_mode="pseudo_report")),
        "teacher": _save(root / "teacher", toy_teacher(), calibrated=False),
    }
    return root, models


def _expected(model, film, report=None):
    """Calibrated probabilities of the model, by hand: processor -> forward -> softmax(logits / T)."""
    processor = QDistillProcessor(image_processor=toy_image_processor(), tokenizer=toy_tokenizer())
    inputs = processor(images=film, text=report)
    with torch.no_grad():
        logits = model(**inputs).logits
    return torch.softmax(logits / model.config.calibration_temperature, dim=-1)[0], logits[0]


def test_auto_map_offers_image_classification_only_to_the_image_only_student(folders):
    root, _ = folders
    image_only = json.loads((root / "image_only" / "config.json").read_text())["auto_map"]
    pseudo = json.loads((root / "pseudo_report" / "config.json").read_text())["auto_map"]
    assert image_only["AutoModelForImageClassification"] == "modeling_qdistill.QDistillStudentModel"
    assert "AutoModelForImageClassification" not in pseudo
    assert pseudo["AutoModel"] == "modeling_qdistill.QDistillStudentModel"
    assert type(AutoModelForImageClassification.from_pretrained(root / "image_only")).__name__ == "QDistillStudentModel"
    with pytest.raises(ValueError, match=r"pseudo_report.*not an image classifier.*AutoModel\.from_pretrained"):
        AutoModelForImageClassification.from_pretrained(root / "pseudo_report")


def test_stock_image_classification_pipeline_gives_config_labels_and_softmax_of_the_logits(folders, caplog):
    root, models = folders
    classifier = pipeline("image-classification", model=str(root / "image_only"))
    assert "not supported for image-classification" not in caplog.text
    result = classifier(Image.fromarray(FILM))
    _, logits = _expected(models["image_only"], FILM)
    raw = torch.softmax(logits, dim=-1)  # the stock pipeline knows no temperature: uncalibrated scores
    assert {entry["label"] for entry in result} == {"routine", "urgent"}
    for entry in result:
        index = models["image_only"].config.label2id[entry["label"]]
        assert entry["score"] == pytest.approx(float(raw[index]), abs=1e-6)
    assert result[0]["score"] >= result[1]["score"]


def test_cxr_triage_image_only_output_is_calibrated_with_the_stored_threshold(folders):
    root, models = folders
    triage = pipeline("cxr-triage", model=str(root / "image_only"))
    assert isinstance(triage, CxrTriagePipeline)
    out = triage(FILM)
    probabilities, _ = _expected(models["image_only"], FILM)
    assert set(out) == {"label", "probability", "threshold", "threshold_source", "scores", "warnings"}
    assert out["probability"] == pytest.approx(float(probabilities[1]), abs=1e-6)
    expected_scores = {"routine": float(probabilities[0]), "urgent": float(probabilities[1])}
    assert out["scores"] == pytest.approx(expected_scores, abs=1e-6)
    assert out["threshold"] == 0.3 and out["threshold_source"] == "sensitivity >= 0.9 on validation (8 studies)"
    assert out["label"] == ("urgent" if out["probability"] >= 0.3 else "routine")
    assert out["warnings"] == []


def test_cxr_triage_default_threshold_is_said(tmp_path):
    _save(tmp_path, toy_student(text_mode="image_only"), calibrated=False)
    out = pipeline("cxr-triage", model=str(tmp_path))(FILM)
    assert out["threshold"] == 0.5 and out["threshold_source"] == "default 0.5: not calibrated"
    assert out["label"] == ("urgent" if out["probability"] >= 0.5 else "routine")


def test_cxr_triage_input_kinds_and_batches_agree(folders, tmp_path):
    root, _ = folders
    triage = pipeline("cxr-triage", model=str(root / "image_only"))
    path = tmp_path / "film.png"
    Image.fromarray(FILM).save(path)
    reference = triage(FILM)["probability"]
    same = [
        str(path), path, Image.fromarray(FILM), FILM.astype(np.float32) / 255.0, np.repeat(FILM[..., None], 3, axis=2),
        FILM.astype(np.uint16) * 257,  # 16-bit: min-max scaled back to the same 8-bit film (min 0, max 255)
    ]
    assert FILM.min() == 0 and FILM.max() == 255
    for film in same:
        assert triage(film)["probability"] == pytest.approx(reference, abs=1e-6), type(film)
    other = np.flipud(FILM).copy()
    batch = triage([FILM, other, str(path)], batch_size=2)
    assert [item["probability"] for item in batch] == pytest.approx(
        [reference, triage(other)["probability"], reference], abs=1e-6
    )


def test_cxr_triage_pseudo_report_student_reads_the_report_or_a_generator(folders):
    root, models = folders
    triage = pipeline("cxr-triage", model=str(root / "pseudo_report"))
    out = triage(FILM, report="large pleural effusion")
    probabilities, _ = _expected(models["pseudo_report"], FILM, "large pleural effusion")
    assert out["probability"] == pytest.approx(float(probabilities[1]), abs=1e-6)
    seen = []

    def generator(film):
        seen.append(film.size)
        return "large pleural effusion"

    generated = pipeline("cxr-triage", model=str(root / "pseudo_report"), report_generator=generator)(FILM)
    assert seen == [(36, 40)] and generated["probability"] == pytest.approx(out["probability"], abs=1e-6)
    reports = ["clear lungs", "tension pneumothorax seen"]
    batch = triage([FILM, FILM], report=reports, batch_size=2)  # reports of different lengths are padded
    for item, report in zip(batch, reports):
        assert item["probability"] == pytest.approx(triage(FILM, report=report)["probability"], abs=1e-6)
    with pytest.raises(ValueError, match="reads a pseudo-report.*report="):
        triage(FILM)
    with pytest.raises(ValueError, match="pass report= as a list of 2"):
        triage([FILM, FILM], report="clear lungs")
    with pytest.raises(ValueError, match="non-empty string"):
        triage(FILM, report="   ")


def test_cxr_triage_teacher_reads_the_report(folders):
    root, models = folders
    triage = pipeline("cxr-triage", model=str(root / "teacher"))
    out = triage({"image": FILM, "report": "lungs are clear"})
    probabilities, _ = _expected(models["teacher"], FILM, "lungs are clear")
    assert out["probability"] == pytest.approx(float(probabilities[1]), abs=1e-6)
    with pytest.raises(ValueError, match="teacher reads the film's report"):
        triage(FILM)


def test_cxr_triage_refuses_bad_inputs_with_the_processor_checks(folders, tmp_path):
    root, _ = folders
    triage = pipeline("cxr-triage", model=str(root / "image_only"))
    with pytest.raises(ValueError, match="image_only: it reads no report"):
        triage(FILM, report="clear lungs")
    bad = FILM.astype(np.float32) / 255.0
    bad[3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        triage(bad)
    with pytest.raises(ValueError, match="dtype complex128"):
        triage(FILM.astype(np.complex128))
    with pytest.raises(ValueError, match="local files only"):
        triage("https://example.org/film.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        triage(str(tmp_path / "missing.png"))
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(OSError, match="notes.png"):
        triage(str(tmp_path / "notes.png"))
    with pytest.raises(ValueError, match="takes a file path, a PIL image or a numpy array"):
        triage(3.5)
    small = pipeline("cxr-triage", model=str(root / "image_only"))
    small.image_processor.min_image_side = 16
    with pytest.raises(ValueError, match="8x8 pixels; films need at least 16"):
        small(np.zeros((8, 8), np.uint8))


def test_cxr_triage_warns_for_films_a_cheap_check_can_tell(folders):
    root, _ = folders
    triage = pipeline("cxr-triage", model=str(root / "image_only"))
    colour = np.zeros((40, 40, 3), np.uint8)
    colour[..., 0] = 200
    colour[::2, ::2] = 30  # a quarter of the pixels grey (spread 0), the rest spread 200: mean 150
    with pytest.warns(FilmCheckWarning, match="in colour"):
        out = triage(colour)
    assert len(out["warnings"]) == 1 and "mean channel spread 150.0" in out["warnings"][0]
    with pytest.warns(FilmCheckWarning, match=r"aspect ratio is 2\.50:1 \(100x40 pixels\)"):
        assert len(triage(np.tile(FILM[:, :20], (1, 5)))["warnings"]) == 1
    with pytest.warns(FilmCheckWarning, match="blank"):
        triage(np.full((40, 40), 7, np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FilmCheckWarning)
        grey_rgb = np.repeat(FILM[..., None], 3, axis=2)
        assert triage(grey_rgb)["warnings"] == []
        assert triage(np.tile(FILM, (1, 2)))["warnings"] == []  # 72x40, 1.8:1, still within 2:1
    assert film_check_messages(40, 80, 16.0, 1.0) == []  # both limits are inclusive


def test_cxr_triage_attention_map_covers_the_film(folders):
    root, models = folders
    triage = pipeline("cxr-triage", model=str(root / "image_only"))
    square = np.random.default_rng(1).integers(0, 256, (60, 60), dtype=np.uint8)
    out = triage(square, return_attention_map=True)
    attention_map = out["attention_map"]
    assert attention_map.mode == "L" and attention_map.size == (60, 60)
    values = np.asarray(attention_map).astype(np.float64)
    assert values.min() == 0 and values.max() == 255  # min-max scaled
    # A square film fills the 30x30 input: a 5x5 grid of 6x6-pixel patches, each a 12x12 cell of the 60x60 film. The
    # cell of the patch the queries attend to most is brighter than the cell of the least attended one.
    processor = QDistillProcessor(image_processor=toy_image_processor(), tokenizer=toy_tokenizer())
    with torch.no_grad():
        cross = models["image_only"](**processor(images=square), output_attentions=True).cross_attentions[-1]
    patches = cross.mean(dim=(1, 2))[0, 1:]

    def cell(patch):
        row, column = divmod(int(patch), 5)
        return values[row * 12 : row * 12 + 12, column * 12 : column * 12 + 12].mean()

    assert cell(patches.argmax()) > cell(patches.argmin())
    # Cell by cell, the map follows the patch attention (a transposed or flipped map would not).
    means = np.array([cell(patch) for patch in range(25)])
    assert np.corrcoef(means, patches.numpy())[0, 1] > 0.9
    assert np.corrcoef(means, patches.reshape(5, 5).T.flatten().numpy())[0, 1] < 0.9
    wide = triage(np.tile(FILM, (1, 2)), return_attention_map=True, attention_map_format="png")
    decoded = Image.open(io.BytesIO(wide["attention_map"]))
    assert decoded.format == "PNG" and decoded.size == (72, 40)
    assert "attention_map" not in triage(square)
    # Attention probabilities exist on the eager path only; an sdpa model computes that call eagerly by itself.
    assert triage.model.config._attn_implementation == "sdpa"
    eager = pipeline("cxr-triage", model=str(root / "image_only"), model_kwargs={"attn_implementation": "eager"})
    assert eager.model.config._attn_implementation == "eager"
    eager_map = eager(square, return_attention_map=True)["attention_map"]
    assert np.array_equal(np.asarray(eager_map), np.asarray(attention_map))
    with pytest.raises(ValueError, match="attention_map_format"):
        triage(square, return_attention_map=True, attention_map_format="jpeg")


def test_in_package_use_of_a_folder_that_carries_its_own_pipeline(tmp_path):
    from qdistill_hf.sharing import save_for_hub

    model = toy_student(text_mode="image_only").eval()
    save_for_hub(model, QDistillProcessor(image_processor=toy_image_processor(), tokenizer=toy_tokenizer()), tmp_path)
    # transformers asks for trust_remote_code whenever config.json declares custom_pipelines, even with the package.
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        pipeline("cxr-triage", model=str(tmp_path))
    installed = pipeline("cxr-triage", model=str(tmp_path), pipeline_class=CxrTriagePipeline)
    assert type(installed) is CxrTriagePipeline
    assert type(installed.model).__module__ == "qdistill_hf.models.modeling_qdistill"
    remote = pipeline("cxr-triage", model=str(tmp_path), trust_remote_code=True)
    assert type(remote).__module__.startswith("transformers_modules.")
    assert remote(FILM)["probability"] == pytest.approx(installed(FILM)["probability"], abs=1e-6)
