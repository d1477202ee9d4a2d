"""Hostile inputs (issue 8): every class of bad input gets a clear error naming the file, row or field, or a
documented correct result; nothing is silently read, clamped or replaced."""

import csv
import errno
import importlib.util
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qdistill_hf.data.data_cxr import load_cxr_dataset
from qdistill_hf.labels.priority_llm import write_priority_metadata
from qdistill_hf.models.processing_qdistill import (
    CHEXZERO_MEAN,
    CHEXZERO_STD,
    MIN_IMAGE_SIDE,
    QDistillImageProcessor,
    QDistillProcessor,
    to_eight_bit_film,
)
from qdistill_hf.models.tokenization_qdistill import (
    build_report_tokenizer,
    read_reports_jsonl,
    train_report_tokenizer,
)
from qdistill_hf.reports.pseudo_reports import (
    CLIPImageEmbedder,
    HFPseudoReportGenerator,
    load_rgb_image,
    read_folder_metadata,
)
from qdistill_hf.reports.resumable import part_path, read_jsonl, run_resumable
from qdistill_hf.utils import read_csv_rows, resolve_data_path

from test_convert_chexzero import IMAGE as CKPT_IMAGE, _openai_clip_state_dict
from test_pseudo_reports import _cli_main, _make_folder
from tiny_models import processor_settings

REPO_ROOT = Path(__file__).resolve().parents[1]


def _load_script(name):
    spec = importlib.util.spec_from_file_location(f"{name}_cli_hardening", REPO_ROOT / "data_scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _folder(root: Path, n=4, size=(32, 32)) -> Path:
    """qdistill_folder tree with labels (builder layout): metadata.csv, images/, reports/."""
    (root / "images").mkdir(parents=True)
    (root / "reports").mkdir()
    rows = []
    for i in range(n):
        sid = f"s{i}"
        Image.new("L", size, 40 + 40 * i).save(root / "images" / f"{sid}.png")
        (root / "reports" / f"{sid}.txt").write_text(f"FINDINGS: report {i}.", encoding="utf-8")
        rows.append([sid, f"images/{sid}.png", f"reports/{sid}.txt", ("train", "train", "validation", "test")[i % 4],
                     str(i % 2)])
    _write_csv(root / "metadata.csv", ["study_id", "image_path", "report_path", "split", "priority_label"], rows)
    return root


def _write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def _set_cell(path, row, column, value):
    with open(path, newline="", encoding="utf-8") as fh:
        table = list(csv.reader(fh))
    table[row][table[0].index(column)] = value
    with open(path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(table)


def _load(root, tmp_path, **kwargs):
    return load_cxr_dataset("qdistill_folder", data_dir=str(root), cache_dir=str(tmp_path / "cache"), **kwargs)


# ------------------------------------------------------------------------------------ 1. paths leave the folder
@pytest.fixture
def outside(tmp_path):
    """A film and a 'report' outside the data folder, plus a symlink inside pointing at them."""
    out = tmp_path / "outside"
    out.mkdir()
    Image.new("L", (32, 32), 99).save(out / "film.png")
    (out / "secret.txt").write_text("root:x:0:0:secret", encoding="utf-8")
    return out


@pytest.mark.parametrize("column", ["image_path", "report_path"])
@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_builder_refuses_paths_leaving_the_data_folder(tmp_path, outside, column, kind):
    root = _folder(tmp_path / "data")
    target = outside / ("film.png" if column == "image_path" else "secret.txt")
    if kind == "dotdot":
        value = f"../outside/{target.name}"
    elif kind == "absolute":
        value = str(target)
    else:
        (root / "images" / "link").symlink_to(outside, target_is_directory=True)
        value = f"images/link/{target.name}"
    _set_cell(root / "metadata.csv", 2, column, value)
    pattern = (rf"metadata\.csv line 3 \(study_id 's1'\): {column} '{value}' "
               + ("is an absolute path" if kind == "absolute" else "resolves .*outside the data folder"))
    with pytest.raises(ValueError, match=pattern):
        _load(root, tmp_path)


def test_builder_accepts_external_paths_only_with_the_opt_in(tmp_path, outside):
    root = _folder(tmp_path / "data")
    _set_cell(root / "metadata.csv", 1, "report_path", str(outside / "secret.txt"))
    dd = _load(root, tmp_path, allow_external_paths=True)
    assert dd["train"]["report"][0] == "root:x:0:0:secret"


def test_pseudo_report_index_path_leaving_the_folder_is_refused(tmp_path, outside):
    root = _folder(tmp_path / "data")
    (root / "medgemma_reports").mkdir()
    _write_csv(root / "medgemma_reports" / "metadata.csv", ["study_id", "medgemma_report_path"],
               [["s0", "../../outside/secret.txt"]])
    with pytest.raises(ValueError, match=r"medgemma_reports/metadata\.csv line 2 \(study_id 's0'\): "
                                         r"medgemma_report_path '\.\./\.\./outside/secret\.txt' resolves"):
        _load(root, tmp_path)


def test_iu_parent_image_id_leaving_the_folder_is_refused(tmp_path):
    root = tmp_path / "iu"
    (root / "images").mkdir(parents=True)
    (root / "ecgen-radiology").mkdir()
    Image.new("L", (32, 32)).save(tmp_path / "evil.png")
    (root / "ecgen-radiology" / "1.xml").write_text(
        '<eCitation><uId id="CXR1"/><AbstractText Label="FINDINGS">Clear.</AbstractText>'
        '<parentImage id="../../evil"/></eCitation>', encoding="utf-8")
    with pytest.raises(ValueError, match=r"1\.xml \(study_id 'CXR1'\): parentImage id '\.\./\.\./evil\.png' resolves"):
        load_cxr_dataset("iu_xray", data_dir=str(root), cache_dir=str(tmp_path / "c"))


@pytest.mark.parametrize("value", ["../../../../etc/passwd", "/etc/passwd"])
def test_folder_metadata_reader_and_score_priority_refuse_escaping_report_paths(tmp_path, value):
    data = tmp_path / "data"
    _make_folder(data, n=3, n_train=2, size=(16, 16))
    _set_cell(data / "metadata.csv", 2, "report_path", value)
    with pytest.raises(ValueError, match=rf"metadata\.csv line 3 \(study_id 'st01'\): report_path '{value}'"):
        read_folder_metadata(data)
    score_priority = _load_script("score_priority")
    with pytest.raises(ValueError, match=rf"line 3 \(study_id 'st01'\): report_path '{value}'"):
        score_priority.main(["--data_dir", str(data), "--rank", "0", "--world_size", "1"])
    assert not (data / "priority_scores" / "priority_metadata.csv").exists()
    rows = read_folder_metadata(data, allow_external_paths=True)
    assert rows[1]["report_file"] == (value if value.startswith("/") else str(data / value))


def test_resolve_data_path_keeps_inner_dotdot_and_refuses_nul(tmp_path):
    assert resolve_data_path(tmp_path, "a/../b.png", "f line 2", "image_path") == tmp_path / "a/../b.png"
    with pytest.raises(ValueError, match=r"f line 2: image_path 'a\\x00b' contains a NUL byte"):
        resolve_data_path(tmp_path, "a\x00b", "f line 2", "image_path")
    with pytest.raises(ValueError, match=r"f line 2: empty image_path"):
        resolve_data_path(tmp_path, "", "f line 2", "image_path")


# --------------------------------------------------------------------------------- one metadata.csv reader
def test_folder_metadata_with_byte_order_mark_is_read_like_the_builder(tmp_path):
    data = tmp_path / "data"
    _make_folder(data, n=3, n_train=2, size=(16, 16))
    raw = (data / "metadata.csv").read_bytes()
    (data / "metadata.csv").write_bytes(b"\xef\xbb\xbf" + raw.replace(b"st00,", b" st00 ,"))
    rows = read_folder_metadata(data)
    assert [r["study_id"] for r in rows] == ["st00", "st01", "st02"]
    assert rows[0]["image_file"] == str(data / "images" / "st00.png")


@pytest.mark.parametrize(
    "content, pattern",
    [
        (b"", r"metadata\.csv: the file is empty"),
        (b"\n\n", r"metadata\.csv: the file is empty"),
        (b"study_id,image_path,report_path,split,priority_label\n", r"metadata\.csv: no data rows after the header"),
        (b"study_id,image_path,image_path,report_path,split\na,b,c,d,train\n",
         r"metadata\.csv line 1: column\(s\) \['image_path'\] appear more than once"),
        (b"study_id,,report_path,split\n", r"metadata\.csv line 1: header column\(s\) \[2\] have no name"),
        (b"study_id,image_path,report_path,split\na,b,c,train\nb,x,y\n", r"metadata\.csv line 3: 3 fields, but the header has 4"),
        (b"study_id,image_path,report_path,split\n\xff\xfe,b,c,train\n", r"metadata\.csv line 2: not valid UTF-8"),
        (b"study_id,image_path,report_path,split,priority_label\n,b,c,train,0\n", r"metadata\.csv line 2: empty study_id"),
    ],
    ids=["empty", "blank", "header-only", "duplicate-header", "unnamed-column", "ragged", "not-utf8", "empty-id"],
)
def test_malformed_metadata_is_named_by_both_readers(tmp_path, content, pattern):
    data = tmp_path / "data"
    data.mkdir()
    (data / "metadata.csv").write_bytes(content)
    with pytest.raises(ValueError, match=pattern):
        read_folder_metadata(data)
    with pytest.raises(ValueError, match=pattern):
        _load(data, tmp_path)


def test_directories_where_files_are_expected(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "metadata.csv").mkdir()
    with pytest.raises(ValueError, match=r"metadata\.csv is a directory, expected a CSV file"):
        read_csv_rows(data / "metadata.csv")
    root = _folder(tmp_path / "f")
    (root / "images" / "dir.png").mkdir()
    _set_cell(root / "metadata.csv", 1, "image_path", "images/dir.png")
    with pytest.raises(ValueError, match=r"line 2 \(study_id 's0'\): image path is a directory.*dir\.png"):
        _load(root, tmp_path)
    with pytest.raises(IsADirectoryError, match=r"image path .*dir\.png is a directory"):
        load_rgb_image(root / "images" / "dir.png")


# --------------------------------------------------------------------------------- 4. float / array inputs
def test_float_arrays_in_unit_range_are_not_divided_by_255_twice():
    processor = QDistillImageProcessor(do_normalize=False)
    grey = np.linspace(0, 255, 32 * 40, dtype=np.float64).reshape(32, 40).round().astype(np.uint8)
    reference = processor(grey)["pixel_values"]
    for array in (grey / 255.0, (grey / 255.0).astype(np.float32), grey.astype(np.float32),
                  torch.from_numpy(grey / 255.0)[None], np.stack([grey / 255.0] * 3)):
        torch.testing.assert_close(processor(array)["pixel_values"], reference, rtol=0, atol=0)
    assert float(reference.max()) == 1.0  # a [0, 1] film keeps its white, never ~1/255


@pytest.mark.parametrize(
    "array, pattern",
    [
        (np.full((32, 32), np.nan, dtype=np.float32), r"Image 0 of the batch: the float array holds 1024 NaN or inf"),
        (np.full((32, 32), np.inf), r"holds 1024 NaN or inf"),
        (np.full((32, 32), -0.5), r"float values span \[-0\.5, -0\.5\]; float films must lie in \[0, 1\] or \[0, 255\]"),
        (np.full((32, 32), 300.0), r"float values span \[300, 300\]"),
        (np.zeros((32, 32, 5)), r"array of shape \(32, 32, 5\) has no channel axis"),
        (np.zeros((32,)), r"array of shape \(32,\) is not an image"),
        (np.zeros((0, 32)), r"array of shape \(0, 32\) is not an image"),
        (np.zeros((2, 2, 32, 32, 3)), r"array of shape \(2, 2, 32, 32, 3\) is not an image"),
        (np.zeros((32, 32), dtype=bool), r"arrays of dtype bool are not images"),
        (np.zeros((32, 32), dtype=np.complex64), r"arrays of dtype complex64 are not images"),
        (np.full((32, 32), 70000, dtype=np.int64), r"integer values span \[70000, 70000\]"),
        (np.full((32, 32), -1, dtype=np.int16), r"integer values span \[-1, -1\]"),
        (np.zeros((32, 32, 3), dtype=np.uint16), r"16-bit data with 3 channels is not supported"),
    ],
    ids=["nan", "inf", "negative", "above-255", "5-channels", "1-d", "empty", "5-d", "bool", "complex", "int-too-big",
         "int-negative", "uint16-rgb"],
)
def test_bad_arrays_get_our_message_not_a_flat_list_error(array, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        QDistillImageProcessor()([np.zeros((32, 32), np.uint8), array] if "Image 0" not in pattern else array)
    assert "flat list" not in str(info.value)


def test_greyscale_2d_arrays_batches_and_integer_dtypes():
    processor = QDistillImageProcessor(do_normalize=False)
    grey = (np.arange(32 * 48) % 256).astype(np.uint8).reshape(32, 48)
    reference = processor(grey)["pixel_values"]
    assert reference.shape == (1, 3, 224, 224)
    for variant in (grey.astype(np.int32), grey.astype(np.int64), grey[:, :, None], grey[None], torch.from_numpy(grey)):
        torch.testing.assert_close(processor(variant)["pixel_values"], reference, rtol=0, atol=0)
    sixteen = (np.arange(32 * 48) % 200).astype(np.uint16).reshape(32, 48)  # 16-bit data that happens to stay <= 255
    torch.testing.assert_close(processor(sixteen.astype(">u2"))["pixel_values"], processor(sixteen)["pixel_values"])
    stacked = processor(np.stack([grey, grey]))["pixel_values"]  # a 3-D uint8 (2, H, W) is 2-channel grey+alpha
    assert stacked.shape == (1, 3, 224, 224)
    batch = processor(np.stack([grey[:, :, None]] * 2))["pixel_values"]  # a 4-D array is a batch
    assert batch.shape == (2, 3, 224, 224)
    with pytest.raises(ValueError, match="empty list of images"):
        processor([])


# --------------------------------------------------------------------------------------- 5. transparency
def test_transparent_films_are_composited_on_black():
    processor = QDistillImageProcessor(do_normalize=False)
    white_transparent = Image.new("RGBA", (32, 32), (255, 255, 255, 0))
    assert float(processor(white_transparent)["pixel_values"].max()) == 0.0
    half = processor(Image.new("RGBA", (32, 32), (200, 100, 50, 128)))["pixel_values"][0, :, 112, 112] * 255
    torch.testing.assert_close(half, torch.tensor([100.0, 50.0, 25.0]), rtol=0, atol=0.6)
    opaque = processor(Image.new("RGBA", (32, 32), (10, 20, 30, 255)))["pixel_values"]
    torch.testing.assert_close(opaque, processor(Image.new("RGB", (32, 32), (10, 20, 30)))["pixel_values"])
    la = processor(Image.new("LA", (32, 32), (255, 0)))["pixel_values"]
    assert float(la.max()) == 0.0
    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([255, 255, 255] * 256)
    palette.info["transparency"] = 0
    assert float(processor(palette)["pixel_values"].max()) == 0.0
    rgba_array = np.zeros((32, 32, 4), np.uint8)
    rgba_array[..., :3] = 255
    assert float(processor(rgba_array)["pixel_values"].max()) == 0.0


def test_transparent_png_file_loads_black_for_retrieval_and_hf(tmp_path):
    path = tmp_path / "t.png"
    Image.new("RGBA", (32, 32), (255, 255, 255, 0)).save(path)
    assert np.asarray(load_rgb_image(path)).max() == 0
    assert load_rgb_image(path).mode == "RGB"


def test_cmyk_jpeg_and_sixteen_bit_png_files(tmp_path):
    Image.new("CMYK", (32, 32), (0, 0, 0, 0)).save(tmp_path / "c.jpg")
    assert np.asarray(load_rgb_image(tmp_path / "c.jpg")).min() >= 250  # no ink = white, as PIL converts CMYK
    Image.fromarray(np.linspace(0, 4000, 32 * 32).reshape(32, 32).astype(np.uint16)).save(tmp_path / "f16.png")
    film = np.asarray(load_rgb_image(tmp_path / "f16.png"))
    assert film.min() == 0 and film.max() == 255  # min-max scaled, not saturated to white


# --------------------------------------------------------------------------------------------- 6. tiny films
def test_tiny_films_are_refused_naming_the_file(tmp_path):
    Image.new("L", (1, 1), 200).save(tmp_path / "one.png")
    with pytest.raises(ValueError, match=r"image .*one\.png is 1x1 pixels; films need at least 16 pixels"):
        load_rgb_image(tmp_path / "one.png")
    with pytest.raises(ValueError, match=r"Image 0 of the batch \(file '.*one\.png'\) is 1x1 pixels"):
        QDistillImageProcessor()(Image.open(tmp_path / "one.png"))
    with pytest.raises(ValueError, match=r"Image 1 of the batch is 40x15 pixels"):
        QDistillImageProcessor()([np.zeros((16, 16), np.uint8), np.zeros((15, 40), np.uint8)])
    assert MIN_IMAGE_SIDE == 16
    assert QDistillImageProcessor()(np.zeros((16, 16), np.uint8))["pixel_values"].shape == (1, 3, 224, 224)
    root = _folder(tmp_path / "data")
    Image.new("L", (8, 64)).save(root / "images" / "s2.png")
    with pytest.raises(ValueError, match=r"line 4 \(study_id 's2'\): image .*s2\.png is 8x64 pixels"):
        _load(root, tmp_path)


def test_real_64px_films_still_work(shared_data):
    rows = read_folder_metadata(shared_data / "cxr-paired", limit=2)
    films = [load_rgb_image(r["image_file"]) for r in rows]
    assert QDistillImageProcessor()(films)["pixel_values"].shape == (2, 3, 224, 224)


def test_decompression_bomb_is_a_clear_error(tmp_path, monkeypatch):
    Image.new("L", (64, 64)).save(tmp_path / "big.png")
    root = _folder(tmp_path / "data")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match=r"big\.png: Image size \(4096 pixels\) exceeds limit.*raise PIL\.Image\.MAX"):
        load_rgb_image(tmp_path / "big.png")
    with pytest.raises(ValueError, match=r"line 2 \(study_id 's0'\): image file is not a decodable image: .*s0\.png"):
        _load(root, tmp_path)


def test_text_file_named_png_and_truncated_files(tmp_path):
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(Image.UnidentifiedImageError, match=r"text\.png"):
        load_rgb_image(tmp_path / "text.png")
    Image.new("L", (64, 64), 7).save(tmp_path / "film.png")
    data = (tmp_path / "film.png").read_bytes()
    (tmp_path / "film.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match=r"film\.png: cannot decode the image \(image file is truncated\)"):
        load_rgb_image(tmp_path / "film.png")


# ------------------------------------------------------------------------ 8. files changed after preparation
def test_report_edited_after_preparation_is_not_served_stale(tmp_path, caplog):
    root = _folder(tmp_path / "data")
    assert _load(root, tmp_path)["train"]["report"][0] == "FINDINGS: report 0."
    (root / "reports" / "s0.txt").write_text("FINDINGS: corrected report.", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="qdistill_hf.data.data_cxr"):
        assert _load(root, tmp_path)["train"]["report"][0] == "FINDINGS: corrected report."
    assert any("changed since" in r.getMessage() and "s0.txt" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qdistill_hf.data.data_cxr"):
        _load(root, tmp_path)  # nothing changed: served from the cache without re-preparing
    assert not any("changed since" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_film_truncated_after_preparation_names_the_file(tmp_path, fmt):
    root = _folder(tmp_path / "data")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(root / "images" / f"s1.{fmt}")
    _set_cell(root / "metadata.csv", 2, "image_path", f"images/s1.{fmt}")
    assert _load(root, tmp_path)["train"][1]["image"].size == (64, 64)
    data = (root / "images" / f"s1.{fmt}").read_bytes()
    (root / "images" / f"s1.{fmt}").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"line 3 \(study_id 's1'\): .*s1\.{fmt}"):
        _load(root, tmp_path)


# ------------------------------------------------------------------------------------- tokenizer corpus
def test_empty_jsonl_corpus_names_the_file(tmp_path):
    for content in ("", "\n\n", '{"report": "  "}\n'):
        (tmp_path / "reports.jsonl").write_text(content, encoding="utf-8")
        with pytest.raises(ValueError, match=r"reports\.jsonl: no report to train on"):
            read_reports_jsonl(tmp_path / "reports.jsonl")
    (tmp_path / "reports.jsonl").write_text('{"report": "Lungs clear."}\n[1]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"reports\.jsonl, line 2: no field 'report'"):
        read_reports_jsonl(tmp_path / "reports.jsonl")
    with pytest.raises(ValueError, match=r"The report corpus of my\.jsonl is empty"):
        train_report_tokenizer([], source="my.jsonl")


def test_tokenizer_log_lists_only_the_splits_it_ignored(caplog):
    import datasets

    splits = datasets.DatasetDict({name: datasets.Dataset.from_dict({"report": ["Lungs are clear."] * 3})
                                   for name in ("train", "validation", "test")})
    with caplog.at_level(logging.INFO, logger="qdistill_hf.models.tokenization_qdistill"):
        build_report_tokenizer(splits, vocab_size=200, min_frequency=1)
    (line,) = [r.getMessage() for r in caplog.records if "splits ignored" in r.getMessage()]
    assert line.endswith("(splits ignored: ['validation', 'test']).")
    empty = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"report": ["  "]})})
    with pytest.raises(ValueError, match=r"corpus of the 'train' split \(1 rows, column 'report'\) is empty"):
        build_report_tokenizer(empty)


# ------------------------------------------------------------------------------------------- disk full
def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_appending_results_names_the_file_and_keeps_the_resume_state(tmp_path, monkeypatch):
    items = [{"study_id": f"s{i}"} for i in range(4)]
    done = lambda batch: [{"value": int(item["study_id"][1:])} for item in batch]  # noqa: E731
    run_resumable(items[:2], done, tmp_path, rank=0, world_size=1, merge=False)
    part = part_path(tmp_path, 0, 1)
    before = part.read_bytes()
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(OSError, match=r"cannot append to .*part-00000-of-00001\.jsonl: No space left on device "
                                      r"\(disk full.*records written before are intact") as info:
        run_resumable(items, done, tmp_path, rank=0, world_size=1, merge=False)
    assert info.value.errno == errno.ENOSPC
    assert part.read_bytes() == before  # the half-written line was cut back
    monkeypatch.undo()
    summary = run_resumable(items, done, tmp_path, rank=0, world_size=1)
    assert summary.n_skipped == 2 and summary.n_done == 2
    assert [r["value"] for r in read_jsonl(summary.merged_path)] == [0, 1, 2, 3]


def test_disk_full_while_writing_labels_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "priority_metadata.csv"
    records = [{"study_id": "a", "urgent": 1, "complexity": 3, "split": "train"}]
    write_priority_metadata(path, records, scorer="rules")
    before = path.read_text()
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(OSError, match=r"cannot write .*priority_metadata\.csv: No space left on device.*unchanged"):
        write_priority_metadata(path, records * 0 + [{**records[0], "urgent": 0}], scorer="rules")
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["priority_metadata.csv"]  # no temporary file left behind


# --------------------------------------------------------------------------------------- missing model folders
def test_missing_vision_model_folder_is_named_not_a_hub_error(tmp_path):
    missing = tmp_path / "chexzero-typo"
    with pytest.raises(FileNotFoundError, match=r"vision model folder .*chexzero-typo does not exist"):
        CLIPImageEmbedder(missing)
    data = tmp_path / "data"
    _make_folder(data, n=3, n_train=2, size=(16, 16))
    with pytest.raises(FileNotFoundError, match=r"chexzero-typo does not exist") as info:
        _cli_main(["--data_dir", str(data), "--vision_model", "chexzero-typo", "--output_dir", str(tmp_path / "o"),
                   "--rank", "0", "--world_size", "1"])
    assert "huggingface.co" not in str(info.value)
    with pytest.raises(FileNotFoundError, match=r"model_id_or_path folder not found: \./no-such-medgemma"):
        HFPseudoReportGenerator("./no-such-medgemma")


# --------------------------------------------------------------------------- one CheXzero preprocessing, end to end
def test_documented_retrieval_run_with_converted_chexzero_on_non_square_films(tmp_path):
    ckpt = tmp_path / "chexzero_tiny.pt"
    torch.save(_openai_clip_state_dict(), ckpt)
    convert = _load_script("convert_chexzero")
    folder = tmp_path / "chexzero-tiny"
    assert convert.main(["--checkpoint", str(ckpt), "--output_dir", str(folder)]) == 0
    saved = json.loads((folder / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "QDistillImageProcessor" and saved["resize_mode"] == "pad"
    assert processor_settings(QDistillImageProcessor.from_pretrained(folder)) == processor_settings(
        QDistillImageProcessor.chexzero_preset(size={"height": CKPT_IMAGE, "width": CKPT_IMAGE}))
    assert (saved["image_mean"], saved["image_std"]) == ([CHEXZERO_MEAN] * 3, [CHEXZERO_STD] * 3)

    data = tmp_path / "data"
    rows = _make_folder(data, n=6, n_train=4, size=(80, 64))  # landscape films, as the probe
    Image.new("L", (48, 90), 120).save(data / "images" / "st05.png")  # and a portrait one
    out = tmp_path / "pseudo"
    assert _cli_main(["--data_dir", str(data), "--generator", "retrieval", "--vision_model", str(folder),
                      "--output_dir", str(out), "--batch_size", "4", "--rank", "0", "--world_size", "1"]) == 0
    merged = read_jsonl(out / "pseudo_reports.jsonl")
    assert [r["study_id"] for r in merged] == [r["study_id"] for r in rows]
    assert not read_jsonl(out / "parts" / "errors-00000.jsonl")
    train = {r["study_id"] for r in rows if r["split"] == "train"}
    assert all(r["neighbour_id"] in train and r["neighbour_id"] != r["study_id"] for r in merged)

    # The embedder letterboxes exactly as the saved preset does.
    embedder = CLIPImageEmbedder(folder)
    film = load_rgb_image(data / "images" / "st05.png")
    expected = embedder.model(pixel_values=QDistillImageProcessor.chexzero_preset(
        size={"height": CKPT_IMAGE, "width": CKPT_IMAGE})(film)["pixel_values"]).last_hidden_state[:, 1:].mean(1)
    torch.testing.assert_close(embedder([film]), expected.detach(), rtol=1e-5, atol=1e-5)


def test_embedder_pads_for_a_folder_converted_by_an_older_version(tmp_path, caplog):
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    folder = tmp_path / "old"
    CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     image_size=32, patch_size=8)).save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, do_center_crop=False, do_rescale=False,
                          image_mean=[CHEXZERO_MEAN] * 3, image_std=[CHEXZERO_STD] * 3).save_pretrained(folder)
    with caplog.at_level(logging.WARNING, logger="qdistill_hf.reports.pseudo_reports"):
        embedder = CLIPImageEmbedder(folder)
    assert any("does not pad to square" in r.getMessage() for r in caplog.records)
    assert type(embedder.processor) is QDistillImageProcessor and embedder.processor.resize_mode == "pad"
    assert list(embedder.processor.image_mean) == [CHEXZERO_MEAN] * 3 and embedder.processor.do_rescale is False
    assert embedder([Image.new("L", (80, 64), 3)]).shape == (1, 16)


# ------------------------------------------------------------------------------------------ processor batch
def test_processor_refuses_different_numbers_of_films_and_reports():
    tokenizer = train_report_tokenizer(["Lungs are clear.", "Small effusion."] * 2, vocab_size=100, min_frequency=1)
    processor = QDistillProcessor(image_processor=QDistillImageProcessor(), tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"got 2 images but 3 texts"):
        processor(images=[np.zeros((32, 32), np.uint8)] * 2, text=["a", "b", "c"])


def test_to_eight_bit_film_names_the_image_it_is_given():
    with pytest.raises(ValueError, match=r"^film of study s9 is 4x4 pixels"):
        to_eight_bit_film(np.zeros((4, 4), np.uint8), "film of study s9")


# ------------------------------------------------------------------------------------------------ split values
def test_folder_metadata_checks_and_normalises_split_values(tmp_path):
    data = tmp_path / "data"
    _make_folder(data, n=3, n_train=2, size=(16, 16))
    _set_cell(data / "metadata.csv", 3, "split", "val")
    assert [r["split"] for r in read_folder_metadata(data)] == ["train", "train", "validation"]
    assert [r["study_id"] for r in read_folder_metadata(data, splits=["validate"])] == ["st02"]
    with pytest.raises(ValueError, match=r"splits argument: unknown split 'trian'"):
        read_folder_metadata(data, splits=["trian"])
    _set_cell(data / "metadata.csv", 1, "split", "dev")
    with pytest.raises(ValueError, match=r"metadata\.csv line 2 \(study_id 'st00'\): unknown split 'dev'"):
        read_folder_metadata(data)
    with pytest.raises(ValueError, match=r"limit must be >= 0, got -1"):
        read_folder_metadata(data, limit=-1)


def test_runner_files_that_are_folders_or_not_utf8_are_named(tmp_path):
    (tmp_path / "d.jsonl").mkdir()
    with pytest.raises(ValueError, match=r"d\.jsonl is a directory, expected a JSONL file"):
        read_jsonl(tmp_path / "d.jsonl")
    (tmp_path / "b.jsonl").write_bytes(b'{"study_id": "a"}\n{"x": "\xff"}\n')
    with pytest.raises(ValueError, match=r"b\.jsonl:2: not valid UTF-8 \(byte 0xff\)"):
        read_jsonl(tmp_path / "b.jsonl")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run_info.json").write_text("{broken", encoding="utf-8")
    with pytest.raises(ValueError, match=r"run_info\.json: not a readable run description"):
        run_resumable([{"study_id": "a"}], lambda b: [{}], tmp_path / "run", rank=0, world_size=1, run_info={"k": 1})


def test_converter_names_a_folder_given_as_checkpoint(tmp_path):
    from qdistill_hf.convert.convert_chexzero_to_hf import convert_chexzero_checkpoint

    with pytest.raises(IsADirectoryError, match=r"CheXzero checkpoint .* is a directory; expected the \.pt file"):
        convert_chexzero_checkpoint(tmp_path, tmp_path / "out")


def test_folder_metadata_names_a_missing_or_file_data_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data folder not found: .*nope \(no such directory\)"):
        read_folder_metadata(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"data folder .*file is a file; expected the folder holding metadata"):
        read_folder_metadata(tmp_path / "file")


def test_score_priority_records_a_non_utf8_report_naming_the_file(tmp_path):
    data = tmp_path / "data"
    _make_folder(data, n=3, n_train=2, size=(16, 16))
    rows = read_folder_metadata(data)
    Path(rows[1]["report_file"]).write_bytes(b"FINDINGS: \xff\xfe broken")
    score_priority = _load_script("score_priority")
    score_priority.main(["--data_dir", str(data), "--rank", "0", "--world_size", "1"])
    errors = [r for path in sorted((data / "priority_scores").rglob("errors-*.jsonl")) for r in read_jsonl(path)]
    assert [e["study_id"] for e in errors] == [rows[1]["study_id"]]
    message = json.dumps(errors[0])
    assert "not valid UTF-8" in message and Path(rows[1]["report_file"]).name in message
