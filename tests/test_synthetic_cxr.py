"""Synthetic CXR films: determinism, labels, report wording, and a real learnable image signal."""

import datasets
import numpy as np
import pytest
from PIL import Image

from qdistill_hf.data import synthetic_cxr
from qdistill_hf.data.data_cxr import load_cxr_dataset
from qdistill_hf.data.synthetic_cxr import build_report, generate_case, is_urgent, png_bytes, render_case


def test_render_case_is_deterministic_and_seed_dependent():
    a_img, a_txt = render_case(7, ("pneumothorax",), 96)
    b_img, b_txt = render_case(7, ("pneumothorax",), 96)
    c_img, _ = render_case(8, ("pneumothorax",), 96)
    assert a_img.mode == "L" and a_img.size == (96, 96)
    assert png_bytes(a_img) == png_bytes(b_img) and a_txt == b_txt
    assert png_bytes(a_img) != png_bytes(c_img)


def test_film_is_stamped_synthetic_in_the_corner():
    arr = np.asarray(render_case(3, (), 128)[0])
    assert arr.shape == (128, 128)
    # The stamp is drawn bright over the dark background of the top-left corner; the top-right one stays dark.
    assert (arr[:10, :55] >= 200).sum() >= 20
    assert (arr[:10, -55:] >= 200).sum() == 0


def test_labels_follow_the_urgent_rule():
    assert is_urgent(()) == 0
    assert is_urgent(("cardiomegaly",)) == 0
    for f in ("pneumothorax", "pleural_effusion", "consolidation"):
        assert is_urgent((f,)) == 1
        assert is_urgent(("cardiomegaly", f)) == 1
    with pytest.raises(ValueError, match="unknown synthetic finding.*'fracture'"):
        is_urgent(("fracture",))


def test_report_negations_and_impression():
    normal = build_report(())
    assert normal.startswith("FINDINGS: Heart size is normal.")
    assert "No pleural effusion." in normal and "No pneumothorax." in normal and "No focal consolidation." in normal
    assert normal.endswith("IMPRESSION: No acute cardiopulmonary process.")
    sick = build_report(
        ("cardiomegaly", "pneumothorax"), {"cardiomegaly": {"scale": 1.4}, "pneumothorax": {"side": "left", "depth": 0.5}}
    )
    assert "Heart size is normal." not in sick and "No pneumothorax." not in sick and "No pleural effusion." in sick
    assert sick.endswith("IMPRESSION: 1. Cardiomegaly. 2. Moderate left pneumothorax.")


def test_generate_case_stream_and_urgent_fraction():
    cases = [generate_case(0, "train", i, 32) for i in range(200)]
    assert cases[5]["study_id"] == "synthetic-train-0-000005"
    assert all(c["label"] == is_urgent(c["findings"]) for c in cases)
    frac = np.mean([c["label"] for c in cases])
    assert 0.3 <= frac <= 0.55
    # Splits are independent streams.
    assert png_bytes(generate_case(0, "test", 0, 32)["image"]) != png_bytes(cases[0]["image"])
    with pytest.raises(ValueError, match="split must be one of"):
        generate_case(0, "dev", 0, 32)


def test_synthetic_builder_same_seed_same_bytes(tmp_path):
    kw = dict(num_train=6, num_validation=2, num_test=0, image_size=48)
    a = load_cxr_dataset("synthetic", cache_dir=str(tmp_path / "a"), seed=1, **kw)
    b = load_cxr_dataset("synthetic", cache_dir=str(tmp_path / "b"), seed=1, **kw)
    c = load_cxr_dataset("synthetic", cache_dir=str(tmp_path / "c"), seed=2, **kw)
    assert set(a) == {"train", "validation"}  # empty test split is absent
    assert a["train"].num_rows == 6 and a["validation"].num_rows == 2
    def raw(dd):
        return [r["bytes"] for r in dd["train"].cast_column("image", datasets.Image(decode=False))["image"]]

    assert raw(a) == raw(b)
    assert raw(a) != raw(c)
    row = a["train"][0]
    assert row["image"].size == (48, 48) and row["split"] == "train" and row["source"] == "synthetic"
    assert row["pseudo_report"] is None and row["report"].startswith("FINDINGS: ")
    case = generate_case(1, "train", 0, 48)
    assert row["study_id"] == case["study_id"] and row["label"] == case["label"]
    assert row["findings"] == list(case["findings"])


def test_contact_sheet(tmp_path):
    path = synthetic_cxr.save_contact_sheet(str(tmp_path / "sheet.png"), num_cases=6, image_size=40, columns=3)
    with Image.open(path) as im:
        assert im.size == (3 * 40, 2 * (40 + 14))


def test_image_only_logistic_regression_beats_majority():
    from sklearn.linear_model import LogisticRegression

    def featurise(split, n):
        xs, ys = [], []
        for i in range(n):
            case = generate_case(0, split, i, 64)
            xs.append(np.asarray(case["image"].resize((32, 32), Image.BILINEAR), dtype=np.float32).ravel() / 255.0)
            ys.append(case["label"])
        return np.stack(xs), np.array(ys)

    x_train, y_train = featurise("train", 400)
    x_test, y_test = featurise("test", 200)
    majority = max(y_test.mean(), 1 - y_test.mean())
    acc = LogisticRegression(C=1.0, max_iter=2000).fit(x_train, y_train).score(x_test, y_test)
    assert acc >= majority + 0.10, (acc, majority)
