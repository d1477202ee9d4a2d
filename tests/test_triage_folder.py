"""The worklist CLI `qdistill-triage`: mixed film formats against the model itself, the stored operating point, bad
files on the error list, CSV path confinement, and resume after SIGKILL without lost or duplicated rows."""

import csv
import os
import subprocess
import sys
import time
from importlib.metadata import entry_points

import numpy as np
import pytest
import torch
from PIL import Image

from qdistill_hf import QDistillImageProcessor, QDistillProcessor, QDistillStudentModel, train_report_tokenizer
from qdistill_hf.data.dicom import read_dicom_film
from qdistill_hf.reports.resumable import read_jsonl
from qdistill_hf.sharing.triage_folder import ERROR_COLUMNS, OUTPUT_COLUMNS, main
from test_dicom import write_dicom
from tiny_models import student_config


def _tokenizer():
    texts = ["no acute findings", "large right pleural effusion", "normal heart size", "small pneumothorax"]
    return train_report_tokenizer(texts * 3, vocab_size=80, min_frequency=1, model_max_length=40)


def _save_student(folder, threshold=None, text_mode="image_only", full_processor=False):
    """A tiny student with its image processor alone, or (`full_processor`, as the demo and Trainers save it) with
    the whole processor, whose image settings then live in processor_config.json."""
    torch.manual_seed(0)
    model = QDistillStudentModel(student_config(text_mode=text_mode, decision_threshold=threshold)).eval()
    model.save_pretrained(folder)
    image_processor = QDistillImageProcessor(size={"height": 30, "width": 30})
    if full_processor:
        QDistillProcessor(image_processor=image_processor, tokenizer=_tokenizer()).save_pretrained(folder)
    else:
        image_processor.save_pretrained(folder)
    return model


def _expected_probability(model, film):
    """p(urgent) computed directly: the saved processor on the film, the model, `triage_probabilities`."""
    pixel_values = QDistillImageProcessor(size={"height": 30, "width": 30})(film)["pixel_values"]
    with torch.no_grad():
        return model.triage_probabilities(model(pixel_values=pixel_values).logits)[0, 1].item()


def _png(path, seed, size=(40, 32)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size[::-1], dtype=np.uint8)).save(path)
    return path


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


@pytest.fixture(scope="module")
def films(tmp_path_factory):
    """A folder of every supported kind of film, a nested one, three unreadable files and a non-image file."""
    root = tmp_path_factory.mktemp("films")
    rng = np.random.default_rng(1)
    _png(root / "a_grey.png", 1)
    Image.fromarray(rng.integers(0, 256, (36, 44, 3), dtype=np.uint8)).save(root / "b_colour.jpg", quality=95)
    Image.fromarray(rng.integers(0, 4096, (32, 32), dtype=np.uint16)).save(root / "c_sixteen.png")  # 12-bit in 16
    write_dicom(root / "d_film.dcm", rng.integers(0, 4096, (34, 30)), WindowCenter=2000, WindowWidth=3000)
    write_dicom(root / "e_noext", rng.integers(0, 4096, (32, 32)), interpretation="MONOCHROME1")  # DICOM, no suffix
    (root / "sub").mkdir()
    _png(root / "sub" / "f_nested.png", 2)
    (root / "x_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    _png(root / "y_tiny.png", 3, size=(8, 8))
    truncated = write_dicom(root / "z_cut.dcm", rng.integers(0, 4096, (32, 32)))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    (root / "notes.txt").write_text("not a film")
    (root / ".hidden.png").write_bytes(b"")
    return root


GOOD = ["a_grey.png", "b_colour.jpg", "c_sixteen.png", "d_film.dcm", "e_noext", "sub/f_nested.png"]
BAD = ["x_corrupt.png", "y_tiny.png", "z_cut.dcm"]


def _load_for_check(path):
    return read_dicom_film(path)[0] if path.suffix in (".dcm", "") else Image.open(path)


def test_console_script_is_registered():
    (script,) = entry_points(group="console_scripts", name="qdistill-triage")
    assert script.value == "qdistill_hf.sharing.triage_folder:main"


def test_folder_of_mixed_films_matches_the_model_at_its_operating_point(films, tmp_path):
    model = _save_student(tmp_path / "uncalibrated")
    expected = {name: _expected_probability(model, _load_for_check(films / name)) for name in GOOD}
    threshold = float(np.median(list(expected.values())))  # both labels occur
    model = _save_student(tmp_path / "student", threshold=threshold)
    out = tmp_path / "out" / "results.csv"
    status = main(["--model", str(tmp_path / "student"), "--input", str(films), "--output", str(out),
                   "--batch_size", "4", "--device", "cpu"])
    assert status == 1  # some films failed
    header, rows = _read_csv(out)
    assert tuple(header) == OUTPUT_COLUMNS
    assert [r[0] for r in rows] == GOOD
    for sid, label, probability, row_threshold in rows:
        assert float(probability) == pytest.approx(expected[sid], abs=2e-6), sid
        assert label == ("urgent" if expected[sid] >= threshold else "non_urgent"), sid
        assert float(row_threshold) == pytest.approx(threshold, rel=1e-5)
    assert {r[1] for r in rows} == {"urgent", "non_urgent"}

    header, errors = _read_csv(tmp_path / "out" / "results.errors.csv")
    assert tuple(header) == ERROR_COLUMNS
    assert [e[0] for e in errors] == BAD
    for sid, path, error in errors:
        assert path == str(films / sid) and sid in error
    assert "16 pixels" in errors[1][2] and "truncated or corrupt" in errors[0][2]


def test_uncalibrated_model_uses_argmax_and_says_so(films, tmp_path, caplog):
    model = _save_student(tmp_path / "student", full_processor=True)
    assert not (tmp_path / "student" / "preprocessor_config.json").exists()
    single = tmp_path / "single"
    single.mkdir()
    for name in ("a_grey.png", "sub/f_nested.png"):
        (single / name.split("/")[-1]).write_bytes((films / name).read_bytes())
    out = tmp_path / "r.csv"
    with caplog.at_level("WARNING"):
        assert main(["--model", str(tmp_path / "student"), "--input", str(single), "--output", str(out)]) == 0
    assert "stores no decision_threshold" in caplog.text and "uncalibrated" in caplog.text
    _, rows = _read_csv(out)
    for sid, label, probability, threshold in rows:
        p = _expected_probability(model, Image.open(single / sid))
        assert threshold == "0.5" and label == ("urgent" if p > 0.5 else "non_urgent")
    assert _read_csv(tmp_path / "r.errors.csv")[1] == []


def test_csv_worklist_paths_stay_in_its_folder(films, tmp_path, capsys):
    _save_student(tmp_path / "student")
    work = tmp_path / "worklist"
    work.mkdir()
    _png(work / "one.png", 5)
    _png(tmp_path / "outside.png", 6)
    (work / "list.csv").write_text("study_id,image_path\ns1,one.png\ns2,missing.png\n")
    args = ["--model", str(tmp_path / "student"), "--output", str(tmp_path / "res.csv")]
    assert main([*args, "--input", str(work / "list.csv")]) == 1
    assert [r[0] for r in _read_csv(tmp_path / "res.csv")[1]] == ["s1"]
    (error,) = _read_csv(tmp_path / "res.errors.csv")[1]
    assert error[0] == "s2" and "missing.png" in error[2]

    (work / "escape.csv").write_text("image_path\none.png\n../outside.png\n")
    args[-1] = str(tmp_path / "res2.csv")
    assert main([*args, "--input", str(work / "escape.csv")]) == 2
    message = capsys.readouterr().err
    assert "escape.csv line 3" in message and "../outside.png" in message
    assert main([*args, "--input", str(work / "escape.csv"), "--allow_external_paths"]) == 0
    assert [r[0] for r in _read_csv(tmp_path / "res2.csv")[1]] == ["one.png", "../outside.png"]


def test_pseudo_report_student_reads_reports_and_refuses_without(tmp_path, capsys):
    model = _save_student(tmp_path / "student", text_mode="pseudo_report", full_processor=True)
    _png(tmp_path / "f.png", 0)
    args = ["--model", str(tmp_path / "student"), "--output", str(tmp_path / "r.csv")]
    assert main([*args, "--input", str(tmp_path / "f.png")]) == 2
    message = capsys.readouterr().err
    assert "is a pseudo_report student" in message and "Pass --reports" in message

    films = tmp_path / "films"
    films.mkdir()
    _png(films / "s1.png", 1)
    _png(films / "s2.png", 2)
    (tmp_path / "reports.csv").write_text("study_id,pseudo_report\ns1.png,small pneumothorax\n")
    assert main([*args, "--input", str(films), "--reports", str(tmp_path / "reports.csv")]) == 1
    (row,) = _read_csv(tmp_path / "r.csv")[1]
    processor = QDistillProcessor.from_pretrained(tmp_path / "student")
    with torch.no_grad():
        logits = model(**processor(images=[Image.open(films / "s1.png")], text=["small pneumothorax"])).logits
    assert row[0] == "s1.png" and float(row[2]) == pytest.approx(model.triage_probabilities(logits)[0, 1].item(),
                                                                   abs=2e-6)
    (error,) = _read_csv(tmp_path / "r.errors.csv")[1]
    assert error[0] == "s2.png" and "no pseudo-report" in error[2]
    assert main(["--model", str(tmp_path / "student"), "--input", str(tmp_path / "student" / "config.json"),
                 "--output", str(tmp_path / "r.csv")]) == 2
    assert "neither a worklist CSV" in capsys.readouterr().err


SLOW_RUN = """
import sys, time
from qdistill_hf.models.modeling_qdistill import QDistillStudentModel
forward = QDistillStudentModel.forward
def slow_forward(self, *args, **kwargs):
    time.sleep(0.2)
    return forward(self, *args, **kwargs)
QDistillStudentModel.forward = slow_forward
from qdistill_hf.sharing.triage_folder import main
sys.exit(main(sys.argv[1:]))
"""


def test_resume_after_sigkill_loses_and_repeats_nothing(tmp_path):
    _save_student(tmp_path / "student", threshold=0.5)
    folder = tmp_path / "films"
    folder.mkdir()
    for i in range(40):
        _png(folder / f"film_{i:02d}.png", 100 + i)
    common = ["--model", str(tmp_path / "student"), "--input", str(folder), "--batch_size", "2", "--device", "cpu"]
    assert main([*common, "--output", str(tmp_path / "reference.csv")]) == 0

    (tmp_path / "slow.py").write_text(SLOW_RUN)
    out = tmp_path / "killed" / "results.csv"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(tmp_path / "slow.py"), *common, "--output", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    part = tmp_path / "killed" / "results.work" / "parts" / "part-00000-of-00001.jsonl"
    deadline = time.monotonic() + 300
    while not (part.is_file() and part.read_bytes().count(b"\n") >= 1):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the killed run produced no row in time"
        time.sleep(0.02)
    proc.kill()  # SIGKILL: no cleanup, no flush
    proc.wait()
    proc.stderr.close()
    done_before = len(read_jsonl(part))
    assert 1 <= done_before < 40 and not out.exists()

    assert main([*common, "--output", str(out)]) == 0
    records = read_jsonl(part)
    ids = [r["study_id"] for r in records]
    assert len(ids) == 40 and len(set(ids)) == 40  # nothing redone, nothing lost
    _, reference = _read_csv(tmp_path / "reference.csv")
    _, resumed = _read_csv(out)
    assert [r[0] for r in resumed] == [r[0] for r in reference] == [f"film_{i:02d}.png" for i in range(40)]
    for ref, got in zip(reference, resumed):
        assert got[1] == ref[1] and got[3] == ref[3]
        assert float(got[2]) == pytest.approx(float(ref[2]), abs=2e-6)


def test_shards_then_a_final_run_write_every_film_once(tmp_path):
    _save_student(tmp_path / "student", threshold=0.5)
    folder = tmp_path / "films"
    folder.mkdir()
    for i in range(5):
        _png(folder / f"f{i}.png", 200 + i)
    common = ["--model", str(tmp_path / "student"), "--input", str(folder), "--output", str(tmp_path / "r.csv")]
    assert main([*common, "--rank", "0", "--world_size", "2"]) == 0
    assert not (tmp_path / "r.csv").exists()  # a shard writes parts only
    assert main([*common, "--rank", "1", "--world_size", "2"]) == 0
    parts = tmp_path / "r.work" / "parts"
    assert [len(read_jsonl(parts / f"part-0000{r}-of-00002.jsonl")) for r in (0, 1)] == [3, 2]
    assert main(common) == 0  # merges; redoes nothing
    assert read_jsonl(parts / "part-00000-of-00001.jsonl") == []
    assert [r[0] for r in _read_csv(tmp_path / "r.csv")[1]] == [f"f{i}.png" for i in range(5)]
    assert main([*common, "--rank", "0"]) == 2  # --rank without --world_size


def test_rerun_with_another_model_into_the_same_output_is_refused(tmp_path, capsys):
    _save_student(tmp_path / "student", threshold=0.5)
    _save_student(tmp_path / "other", threshold=0.3)
    _png(tmp_path / "f.png", 0)
    common = ["--input", str(tmp_path / "f.png"), "--output", str(tmp_path / "r.csv")]
    assert main(["--model", str(tmp_path / "student"), *common]) == 0
    capsys.readouterr()
    assert main(["--model", str(tmp_path / "other"), *common]) == 2
    message = capsys.readouterr().err
    assert "outputs of another configuration" in message and "model" in message
    assert _read_csv(tmp_path / "r.csv")[1][0][3] == "0.5"  # the first run's results are untouched


def test_lateral_or_non_chest_dicom_is_triaged_with_a_warning(tmp_path, caplog):
    _save_student(tmp_path / "student", threshold=0.5)
    folder = tmp_path / "films"
    folder.mkdir()
    rng = np.random.default_rng(7)
    write_dicom(folder / "lateral.dcm", rng.integers(0, 4096, (32, 32)), ViewPosition="LL", BodyPartExamined="CHEST")
    write_dicom(folder / "hand.dcm", rng.integers(0, 4096, (32, 32)), ViewPosition="PA", BodyPartExamined="HAND")
    write_dicom(folder / "frontal.dcm", rng.integers(0, 4096, (32, 32)), ViewPosition="PA", BodyPartExamined="CHEST")
    with caplog.at_level("WARNING"):
        assert main(["--model", str(tmp_path / "student"), "--input", str(folder),
                     "--output", str(tmp_path / "r.csv")]) == 0
    assert len(_read_csv(tmp_path / "r.csv")[1]) == 3
    warned = [r.getMessage() for r in caplog.records if "trained on frontal chest films" in r.getMessage()]
    assert len(warned) == 2
    assert any("lateral.dcm: View Position 'LL'" in m for m in warned)
    assert any("hand.dcm: Body Part Examined 'HAND'" in m for m in warned)
