"""The data_cxr builder: every config on tiny on-the-fly trees, every bad-input error, and the real folder."""

import csv
import gzip
import json
import logging
import sys
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qdistill_hf.labels.policy import urgent_from_mesh
from qdistill_hf.data.data_cxr import (
    CORE_COLUMNS,
    hash_split,
    iu_frontal_order,
    load_cxr_dataset,
    mimic_report_text,
)


def _png(path: Path, value: int = 100, size=(16, 16), fmt="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, dtype=np.uint8), mode="L").save(path, format=fmt)


def _csv(path: Path, header, rows, gz=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if gz else open
    with opener(path, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


# ------------------------------------------------------------------------------------------ qdistill_folder

ROWS = [
    # study_id, split, label, extra
    ("s1", "train", "0", "site A"),
    ("s2", "train", "1", "site B"),
    ("s3", "validate", "1", ""),
    ("s4", "test", "0", "site A"),
]


def make_folder(root: Path, rows=ROWS, pseudo=("s1", "s2", "s3", "s4")) -> Path:
    for sid, *_ in rows:
        _png(root / "images" / f"{sid}.png", value=10 * len(sid))
        (root / "reports").mkdir(parents=True, exist_ok=True)
        (root / "reports" / f"{sid}.txt").write_text(f"FINDINGS: report of {sid}.\nIMPRESSION: none.\n")
    _csv(
        root / "metadata.csv",
        ["study_id", "image_path", "report_path", "split", "priority_label", "site"],
        [[sid, f"images/{sid}.png", f"reports/{sid}.txt", split, label, extra] for sid, split, label, extra in rows],
    )
    if pseudo:
        md = root / "medgemma_reports"
        md.mkdir(parents=True, exist_ok=True)
        for sid in pseudo:
            (md / f"{sid}_medgemma_report.txt").write_text(f"FINDINGS: pseudo {sid}.")
        _csv(md / "metadata.csv", ["study_id", "medgemma_report_path", "split"], [[sid, f"{sid}_medgemma_report.txt", "x"] for sid in pseudo])
    return root


def load_folder(root: Path, tmp_path: Path, **kw):
    return load_cxr_dataset("qdistill_folder", data_dir=str(root), cache_dir=str(tmp_path / "cache"), **kw)


def test_qdistill_folder_columns_and_values(tmp_path):
    root = make_folder(tmp_path / "data")
    dd = load_folder(root, tmp_path)
    assert set(dd) == {"train", "validation", "test"}
    assert [dd[s].num_rows for s in ("train", "validation", "test")] == [2, 1, 1]
    train = dd["train"]
    assert tuple(train.column_names[:6]) == CORE_COLUMNS
    assert train.column_names[6:] == ["source", "view_position", "findings", "mesh_major", "site"]
    assert train.features["label"].names == ["non_urgent", "urgent"]
    assert train["study_id"] == ["s1", "s2"] and train["label"] == [0, 1]
    assert train["report"][0] == "FINDINGS: report of s1.\nIMPRESSION: none."
    assert train["pseudo_report"] == ["FINDINGS: pseudo s1.", "FINDINGS: pseudo s2."]
    assert train["site"] == ["site A", "site B"]
    assert dd["validation"][0]["split"] == "validation"  # "validate" alias
    assert dd["validation"][0]["site"] is None
    img = train[1]["image"]
    assert img.size == (16, 16) and np.asarray(img)[0, 0] == 20


def test_qdistill_folder_label_names_and_priority_override(tmp_path):
    root = make_folder(tmp_path / "data", pseudo=())
    _csv(root / "priority_scores" / "priority_metadata.csv", ["study_id", "priority_label", "category", "split"], [["s1", "1", "c", "train"], ["s4", "normal", "c", "test"]])
    dd = load_folder(root, tmp_path, label_names=("normal", "abnormal"))
    assert dd["train"].features["label"].names == ["normal", "abnormal"]
    assert dd["train"]["label"] == [1, 1]  # s1 overridden 0 -> 1, s2 from metadata.csv
    assert dd["test"]["label"] == [0]  # label given by name
    assert dd["train"]["pseudo_report"] == [None, None]


@pytest.mark.parametrize(
    "mutate, exc, pattern",
    [
        (lambda r: _rewrite(r, drop_col="priority_label"), ValueError, r"metadata\.csv: missing required column\(s\) \['priority_label'\]"),
        (lambda r: _rewrite(r, row=2, col=3, value="dev"), ValueError, r"metadata\.csv line 3 \(study_id 's2'\): unknown split 'dev'"),
        (lambda r: _rewrite(r, row=1, col=4, value="-1"), ValueError, r"metadata\.csv line 2 \(study_id 's1'\): label '-1' is outside the class set"),
        (lambda r: _rewrite(r, row=4, col=4, value="2"), ValueError, r"metadata\.csv line 5 \(study_id 's4'\): label '2' is outside"),
        (lambda r: _rewrite(r, row=3, col=0, value="s1"), ValueError, r"metadata\.csv line 4 \(study_id 's1'\): duplicate study_id, first seen on line 2"),
        (lambda r: (r / "images" / "s2.png").unlink(), FileNotFoundError, r"line 3 \(study_id 's2'\): image file not found: .*s2\.png"),
        (lambda r: (r / "images" / "s3.png").write_bytes(b"not a png"), ValueError, r"line 4 \(study_id 's3'\): image file is not a decodable image: .*s3\.png"),
        (lambda r: (r / "reports" / "s4.txt").write_text("  \n"), ValueError, r"line 5 \(study_id 's4'\): report file is empty: .*s4\.txt"),
        (lambda r: (r / "reports" / "s1.txt").unlink(), FileNotFoundError, r"line 2 \(study_id 's1'\): report file not found: .*s1\.txt"),
    ],
    ids=["missing-col", "bad-split", "label-minus-one", "label-too-big", "duplicate", "no-image", "bad-image", "empty-report", "no-report"],
)
def test_qdistill_folder_bad_inputs(tmp_path, mutate, exc, pattern):
    root = make_folder(tmp_path / "data")
    mutate(root)
    with pytest.raises(exc, match=pattern):
        load_folder(root, tmp_path)


def _rewrite(root: Path, row=None, col=None, value=None, drop_col=None):
    path = root / "metadata.csv"
    with open(path, newline="") as f:
        table = list(csv.reader(f))
    if drop_col:
        i = table[0].index(drop_col)
        table = [r[:i] + r[i + 1 :] for r in table]
    if row is not None:
        table[row][col] = value
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(table)


def test_qdistill_folder_bad_priority_label_names_its_file(tmp_path):
    root = make_folder(tmp_path / "data")
    _csv(root / "priority_scores" / "priority_metadata.csv", ["study_id", "priority_label"], [["s1", "1"], ["s2", "-1"]])
    with pytest.raises(ValueError, match=r"priority_metadata\.csv line 3 \(study_id 's2'\): label '-1' is outside"):
        load_folder(root, tmp_path)


def test_missing_data_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_dir does not exist.*nope"):
        load_cxr_dataset("qdistill_folder", data_dir=str(tmp_path / "nope"), cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown CXR dataset config 'x'"):
        load_cxr_dataset("x", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="missing_pseudo_report='maybe' must be one of"):
        load_cxr_dataset("synthetic", cache_dir=str(tmp_path), missing_pseudo_report="maybe")


def test_pseudo_report_policies(tmp_path, caplog):
    root = make_folder(tmp_path / "data", pseudo=("s1", "s3", "s4"))
    with pytest.raises(ValueError, match=r"1 studies of .*metadata\.csv have no pseudo-report .*first study_id 's2'"):
        load_folder(root, tmp_path / "a", require_pseudo_report=True)
    with caplog.at_level(logging.WARNING, logger="qdistill_hf.data.data_cxr"):
        dd = load_folder(root, tmp_path / "b", require_pseudo_report=True, missing_pseudo_report="drop")
    assert dd["train"]["study_id"] == ["s1"]
    assert any("dropped 1 studies without a pseudo-report" in r.getMessage() for r in caplog.records)
    dd = load_folder(root, tmp_path / "c", require_pseudo_report=True, missing_pseudo_report="allow")
    assert dd["train"]["pseudo_report"] == ["FINDINGS: pseudo s1.", None]
    bare = make_folder(tmp_path / "bare", pseudo=())
    with pytest.raises(FileNotFoundError, match=r"pseudo-report index is missing: .*medgemma_reports/metadata\.csv"):
        load_folder(bare, tmp_path / "d", require_pseudo_report=True)
    (root / "medgemma_reports" / "s4_medgemma_report.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"medgemma_reports/metadata\.csv line 4 \(study_id 's4'\): pseudo-report file not found"):
        load_folder(root, tmp_path / "e")


def test_metadata_edit_invalidates_cache(tmp_path):
    root = make_folder(tmp_path / "data")
    assert load_folder(root, tmp_path)["train"]["label"] == [0, 1]
    _rewrite(root, row=1, col=4, value="1")
    assert load_folder(root, tmp_path)["train"]["label"] == [1, 1]


# ------------------------------------------------------------------------------------------ iu_xray

IU_XML = """<?xml version="1.0" encoding="utf-8"?>
<eCitation>
  <meta type="rr"/>
  <uId id="{sid}"/>
  <MedlineCitation Owner="Indiana University" Status="supplied">
    <Article PubModel="Electronic">
      <Abstract>
        <AbstractText Label="COMPARISON">None.</AbstractText>
        <AbstractText Label="INDICATION">{indication}</AbstractText>
        <AbstractText Label="FINDINGS">{findings}</AbstractText>
        <AbstractText Label="IMPRESSION">{impression}</AbstractText>
      </Abstract>
    </Article>
  </MedlineCitation>
  <MeSH>{mesh}</MeSH>
  {images}
</eCitation>
"""

IU_STUDIES = [
    # sid, findings, impression, mesh majors, image ids in XML order
    ("CXR1", "Heart size normal.", "Normal chest.", ["normal"], ["CXR1_1_IM-0001-4001", "CXR1_1_IM-0001-3001"]),
    ("CXR2", "Right effusion.", "Small effusion.", ["Pleural Effusion/right/small", "Cardiomegaly"], ["CXR2_1_IM-0652-1001", "CXR2_1_IM-0652-2001"]),
    ("CXR10", "", "Clear lungs.", ["Cardiomegaly/mild"], ["CXR10_1_IM-0016-1001"]),
]


def make_iu(root: Path, studies=IU_STUDIES, archive=False) -> Path:
    xml_dir = root / "ecgen-radiology"
    xml_dir.mkdir(parents=True)
    for k, (sid, findings, impression, mesh, images) in enumerate(studies):
        for j, image_id in enumerate(images):
            _png(root / "NLMCXR_png" / f"{image_id}.png", value=50 + j)
        (xml_dir / f"{sid[3:]}.xml").write_text(
            IU_XML.format(
                sid=sid,
                indication=f"ind {k}",
                findings=findings,
                impression=impression,
                mesh="".join(f"<major>{m}</major>" for m in mesh),
                images="".join(f'<parentImage id="{i}"><caption>Xray Chest PA and Lateral</caption></parentImage>' for i in images),
            )
        )
    if archive:
        with tarfile.open(root / "NLMCXR_reports.tgz", "w:gz") as tar:
            tar.add(xml_dir, arcname="ecgen-radiology")
        for p in xml_dir.iterdir():
            p.unlink()
        xml_dir.rmdir()
    return root


def _all_rows(dd):
    return sorted((r for split in dd.values() for r in split), key=lambda r: r["study_id"])


@pytest.mark.parametrize("archive", [False, True], ids=["xml-folder", "tgz"])
def test_iu_xray(tmp_path, archive):
    root = make_iu(tmp_path / "iu", archive=archive)
    dd = load_cxr_dataset("iu_xray", data_dir=str(root), cache_dir=str(tmp_path / "c"), split_fractions=(0.5, 0.25, 0.25))
    rows = _all_rows(dd)
    assert [r["study_id"] for r in rows] == ["CXR1", "CXR10", "CXR2"]
    r1, r10, r2 = rows
    assert r1["report"] == "FINDINGS: Heart size normal.\nIMPRESSION: Normal chest."
    assert r10["report"] == "IMPRESSION: Clear lungs."  # empty findings section is left out
    assert r1["image_id"] == "CXR1_1_IM-0001-3001"  # lowest suffix, though listed second
    assert r2["mesh_major"] == ["Pleural Effusion/right/small", "Cardiomegaly"]
    assert [r1["label"], r2["label"], r10["label"]] == [0, 1, 0]
    assert r1["indication"] == "ind 0" and r1["source"] == "iu_xray"
    for r in rows:
        assert r["split"] == hash_split(r["study_id"], (0.5, 0.25, 0.25), "qdistill-iu")
        assert tuple(dd[r["split"]].column_names[:6]) == CORE_COLUMNS


def test_iu_frontal_rule_first_and_projections_csv(tmp_path):
    root = make_iu(tmp_path / "iu")
    dd = load_cxr_dataset("iu_xray", data_dir=str(root), cache_dir=str(tmp_path / "a"), frontal_rule="first")
    assert {r["study_id"]: r["image_id"] for r in _all_rows(dd)}["CXR1"] == "CXR1_1_IM-0001-4001"
    _csv(
        root / "indiana_projections.csv",
        ["uid", "filename", "projection"],
        [[1, "CXR1_1_IM-0001-4001.dcm.png", "Frontal"], [1, "CXR1_1_IM-0001-3001.dcm.png", "Lateral"],
         [2, "CXR2_1_IM-0652-1001.dcm.png", "Frontal"], [10, "CXR10_1_IM-0016-1001.dcm.png", "Frontal"]],
    )
    dd = load_cxr_dataset("iu_xray", data_dir=str(root), cache_dir=str(tmp_path / "b"), projections_csv="indiana_projections.csv")
    rows = {r["study_id"]: r for r in _all_rows(dd)}
    assert rows["CXR1"]["image_id"] == "CXR1_1_IM-0001-4001" and rows["CXR1"]["view_position"] == "frontal"


def test_iu_incomplete_studies(tmp_path, caplog):
    studies = IU_STUDIES + [("CXR5", "", "", ["normal"], ["CXR5_1_IM-0002-1001"]), ("CXR6", "Ok.", "Ok.", ["normal"], [])]
    root = make_iu(tmp_path / "iu", studies=studies)
    with pytest.raises(ValueError, match=r"2 incomplete IU studies; first: .*5\.xml \(study_id 'CXR5'\): empty FINDINGS and IMPRESSION"):
        load_cxr_dataset("iu_xray", data_dir=str(root), cache_dir=str(tmp_path / "a"))
    with caplog.at_level(logging.WARNING, logger="qdistill_hf.data.data_cxr"):
        dd = load_cxr_dataset("iu_xray", data_dir=str(root), cache_dir=str(tmp_path / "b"), incomplete_studies="drop")
    assert [r["study_id"] for r in _all_rows(dd)] == ["CXR1", "CXR10", "CXR2"]
    assert any("dropped 2 incomplete IU studies" in r.getMessage() for r in caplog.records)
    (root / "NLMCXR_png" / "CXR2_1_IM-0652-1001.png").write_bytes(b"broken")
    with pytest.raises(ValueError, match=r"2\.xml \(study_id 'CXR2'\): image file is not a decodable image"):
        load_cxr_dataset("iu_xray", data_dir=str(root), cache_dir=str(tmp_path / "c"), incomplete_studies="drop")


def test_iu_helpers():
    assert iu_frontal_order(["a-4001", "a-3001", "a-1001"], "lowest_suffix") == ["a-1001", "a-3001", "a-4001"]
    assert iu_frontal_order(["a-4001", "a-3001"], "first") == ["a-4001", "a-3001"]
    assert urgent_from_mesh(["Pulmonary Congestion/mild"]) == 1
    assert urgent_from_mesh(["Mass/lung/upper lobe/left"]) == 1
    assert urgent_from_mesh(["Cardiomegaly/mild", "normal"]) == 0
    splits = [hash_split(f"CXR{i}", (0.8, 0.1, 0.1), "qdistill-iu") for i in range(2000)]
    assert splits == [hash_split(f"CXR{i}", (0.8, 0.1, 0.1), "qdistill-iu") for i in range(2000)]
    assert 0.76 < splits.count("train") / 2000 < 0.84 and 0.07 < splits.count("test") / 2000 < 0.13


# ------------------------------------------------------------------------------------------ mimic_cxr

MIMIC_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  Cough.

 FINDINGS:
 There is a small left pleural effusion.  No pneumothorax.

 IMPRESSION:
 Small left effusion.
"""


def make_mimic(root: Path, studies=None) -> Path:
    # (subject, study, split, [(dicom, view)], report text or None)
    studies = studies or [
        ("10000032", "50414267", "train", [("d1", "AP"), ("d2", "PA"), ("d3", "LATERAL")], MIMIC_REPORT),
        ("10000764", "57375967", "validate", [("d4", "AP")], "FINAL REPORT\n CONCLUSION: No acute process.\n"),
        ("11000011", "51111111", "test", [("d5", "PA")], "FINAL REPORT\n Lungs are clear.\n"),
    ]
    split_rows, meta_rows = [], []
    for subject, study, split, dicoms, report in studies:
        folder = root / "files" / f"p{subject[:2]}" / f"p{subject}"
        for dicom, view in dicoms:
            _png(folder / f"s{study}" / f"{dicom}.jpg", value=len(dicom) * 30, fmt="JPEG")
            split_rows.append([dicom, study, subject, split])
            meta_rows.append([dicom, subject, study, "CHEST (PA AND LAT)", view, 8, 8])
        if report is not None:
            (folder / f"s{study}.txt").write_text(report)
    _csv(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"], split_rows, gz=True)
    _csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows", "Columns"], meta_rows, gz=True)
    return root


def test_mimic_with_priority_csv(tmp_path):
    root = make_mimic(tmp_path / "m")
    _csv(root / "priority_scores" / "priority_metadata.csv", ["study_id", "priority_label"], [["50414267", "1"], ["57375967", "0"], ["51111111", "0"]])
    dd = load_cxr_dataset("mimic_cxr", data_dir=str(root), cache_dir=str(tmp_path / "c"))
    assert {s: dd[s].num_rows for s in dd} == {"train": 1, "validation": 1, "test": 1}
    row = dd["train"][0]
    assert tuple(dd["train"].column_names[:6]) == CORE_COLUMNS
    assert row["study_id"] == "50414267" and row["dicom_id"] == "d2" and row["view_position"] == "PA"
    assert row["subject_id"] == "10000032" and row["label"] == 1
    assert row["report"] == "FINDINGS: There is a small left pleural effusion. No pneumothorax.\nIMPRESSION: Small left effusion."
    assert dd["validation"][0]["report"] == "No acute process." and dd["validation"][0]["view_position"] == "AP"
    assert dd["test"][0]["report"] == "Lungs are clear."
    assert dd["train"][0]["image"].size == (16, 16)


def test_mimic_with_rules(tmp_path, monkeypatch):
    calls = []

    def score_report(text):
        calls.append(text)
        return types.SimpleNamespace(urgent=int("effusion" in text), abnormal=1)

    monkeypatch.setitem(sys.modules, "qdistill_hf.labels.priority_rules", types.SimpleNamespace(score_report=score_report))
    root = make_mimic(tmp_path / "m")
    dd = load_cxr_dataset("mimic_cxr", data_dir=str(root), cache_dir=str(tmp_path / "c"), label_source="rules")
    assert [dd[s][0]["label"] for s in ("train", "validation", "test")] == [1, 0, 0]
    assert len(calls) == 3


def test_mimic_incomplete_and_bad(tmp_path, caplog):
    studies = [
        ("10000032", "50414267", "train", [("d1", "PA")], MIMIC_REPORT),
        ("10000033", "50000002", "train", [("d6", "LATERAL")], MIMIC_REPORT),
        ("10000034", "50000003", "test", [("d7", "AP")], None),
    ]
    root = make_mimic(tmp_path / "m", studies)
    _csv(root / "priority_scores" / "priority_metadata.csv", ["study_id", "priority_label"], [["50414267", "1"], ["50000002", "0"], ["50000003", "0"]])
    with pytest.raises(ValueError, match=r"2 incomplete MIMIC-CXR studies; first: .*split\.csv\.gz line 3 \(study_id '50000002'\): no \['PA', 'AP'\] image"):
        load_cxr_dataset("mimic_cxr", data_dir=str(root), cache_dir=str(tmp_path / "a"))
    with caplog.at_level(logging.WARNING, logger="qdistill_hf.data.data_cxr"):
        dd = load_cxr_dataset("mimic_cxr", data_dir=str(root), cache_dir=str(tmp_path / "b"), incomplete_studies="drop")
    assert list(dd) == ["train"] and dd["train"]["study_id"] == ["50414267"]
    assert any("dropped 2 incomplete MIMIC-CXR studies" in r.getMessage() for r in caplog.records)

    bad = make_mimic(tmp_path / "bad", [("10000032", "50414267", "dev", [("d1", "PA")], MIMIC_REPORT)])
    with pytest.raises(ValueError, match=r"split\.csv\.gz line 2 \(study_id '50414267'\): unknown split 'dev'"):
        load_cxr_dataset("mimic_cxr", data_dir=str(bad), cache_dir=str(tmp_path / "d"), label_source="priority_csv")
    (bad / "mimic-cxr-2.0.0-metadata.csv.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"none of \['mimic-cxr-2\.0\.0-metadata\.csv\.gz'"):
        load_cxr_dataset("mimic_cxr", data_dir=str(bad), cache_dir=str(tmp_path / "e"))


def test_mimic_report_text_fallbacks():
    assert mimic_report_text("FINDINGS: a\n b.\nIMPRESSION: c.") == "FINDINGS: a b.\nIMPRESSION: c."
    assert mimic_report_text("INDICATION: x.\nIMPRESSION: only this.") == "IMPRESSION: only this."
    assert mimic_report_text("  FINAL REPORT\n  Lungs  clear. ") == "Lungs clear."
    assert mimic_report_text("   ") == ""


# ------------------------------------------------------------------------------------------ real data


def test_real_cxr_paired_folder(shared_data, tmp_path):
    dd = load_cxr_dataset(
        "qdistill_folder", data_dir=str(shared_data / "cxr-paired"), cache_dir=str(tmp_path), label_names=("normal", "abnormal")
    )
    assert {s: dd[s].num_rows for s in dd} == {"train": 625, "validation": 210}
    assert dd["train"].features["label"].names == ["normal", "abnormal"]
    row = dd["train"][0]
    assert row["image"].size == (64, 64) and row["report"].startswith("FINDINGS:")
    assert "nih_findings" in dd["train"].column_names


def test_iu_mesh_rule_matches_human_urgent_labels(shared_data):
    with open(shared_data / "cxr-paired" / "iu_reports_dev.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) > 3000
    assert sum(urgent_from_mesh(r["mesh_major"]) != r["urgent"] for r in rows) == 0


# ------------------------------------------------------------------------------------------ CSV reading and cache keys


def test_csv_with_byte_order_mark_quoted_newline_and_ragged_row(tmp_path):
    root = make_folder(tmp_path / "data")
    path = root / "metadata.csv"
    text = path.read_text()
    path.write_text("\ufeff" + text.replace("site A", '"site\nA"', 1), encoding="utf-8")
    dd = load_folder(root, tmp_path / "a")
    assert dd["train"]["study_id"] == ["s1", "s2"] and dd["train"]["site"][0] == "site\nA"
    # s2 starts on line 4 because s1's quoted field spans lines 2-3.
    _rewrite(root, row=2, col=3, value="dev")
    with pytest.raises(ValueError, match=r"metadata\.csv line 4 \(study_id 's2'\): unknown split 'dev'"):
        load_folder(root, tmp_path / "b")
    with open(path, "a") as f:
        f.write("s9,images/s9.png,reports/s9.txt,train\n")
    with pytest.raises(ValueError, match=r"metadata\.csv line 7: 4 fields, but the header has 6"):
        load_folder(root, tmp_path / "c")


def test_report_that_is_not_utf8_is_an_error_naming_the_file(tmp_path):
    root = make_folder(tmp_path / "data")
    (root / "reports" / "s2.txt").write_bytes(b"FINDINGS: caf\xe9.")
    with pytest.raises(ValueError, match=r"line 3 \(study_id 's2'\): report file is not valid UTF-8: .*s2\.txt"):
        load_folder(root, tmp_path)


def test_side_files_with_unknown_study_ids_are_logged(tmp_path, caplog):
    root = make_folder(tmp_path / "data")
    _csv(root / "priority_scores" / "priority_metadata.csv", ["study_id", "priority_label"], [["s1", "1"], ["zz", "0"]])
    with caplog.at_level(logging.WARNING, logger="qdistill_hf.data.data_cxr"):
        load_folder(root, tmp_path)
    assert any("priority_metadata.csv: 1 study ids are not in the main index" in r.getMessage() and "'zz'" in r.getMessage() for r in caplog.records)


def test_edit_of_a_configured_index_file_invalidates_cache(tmp_path):
    root = make_folder(tmp_path / "data")
    (root / "metadata.csv").rename(root / "index.csv")
    assert load_folder(root, tmp_path, metadata_file="index.csv")["train"]["label"] == [0, 1]
    table = (root / "index.csv").read_text().replace("images/s1.png,reports/s1.txt,train,0", "images/s1.png,reports/s1.txt,train,1")
    (root / "index.csv").write_text(table)
    assert load_folder(root, tmp_path, metadata_file="index.csv")["train"]["label"] == [1, 1]


def test_iu_xml_edit_invalidates_cache(tmp_path):
    root = make_iu(tmp_path / "iu")
    rows = {r["study_id"]: r for r in _all_rows(load_cxr_dataset("iu_xray", data_dir=str(root), cache_dir=str(tmp_path / "c")))}
    assert rows["CXR2"]["label"] == 1
    xml = root / "ecgen-radiology" / "2.xml"
    xml.write_text(xml.read_text().replace("<major>Pleural Effusion/right/small</major>", ""))
    rows = {r["study_id"]: r for r in _all_rows(load_cxr_dataset("iu_xray", data_dir=str(root), cache_dir=str(tmp_path / "c")))}
    assert rows["CXR2"]["label"] == 0
