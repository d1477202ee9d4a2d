"""Tests for the image processor, report tokenizer, QDistillProcessor and data_scripts/build_tokenizer.py."""

import importlib.util
import json
import sys
import types
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from huggingface_hub.errors import StrictDataclassFieldValidationError
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor

from qdistill_hf.models.processing_qdistill import (
    CHEXZERO_MEAN,
    CHEXZERO_STD,
    QDistillImageProcessor,
    QDistillProcessor,
    register_processing_auto_classes,
)
from qdistill_hf.models.tokenization_qdistill import build_report_tokenizer, train_report_tokenizer


REPO_ROOT = Path(__file__).resolve().parents[1]
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
REPORTS = [
    "Heart size is normal. No pleural effusion.",
    "Small left pleural effusion; no pneumothorax.",
    "Normal heart size. Lungs are clear.",
    "Right lower lobe consolidation, likely pneumonia.",
    "No acute cardiopulmonary process. Lungs are clear.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_report_tokenizer(REPORTS * 2, vocab_size=300, model_max_length=12, min_frequency=1)


def _no_norm(**kwargs):
    # Hand-computed letterboxing on tiny films: the minimum film size is lifted explicitly.
    return QDistillImageProcessor(do_normalize=False, min_image_side=1, **kwargs)


def test_pad_mode_letterboxes_landscape_image_with_centred_content():
    image = Image.new("L", (4, 2), 255)  # width 4, height 2
    pixel_values = _no_norm()(image)["pixel_values"]
    assert pixel_values.shape == (1, 3, 224, 224) and pixel_values.dtype == torch.float32
    expected = torch.zeros(3, 224, 224)
    expected[:, 56:168, :] = 1.0  # 4x2 -> 224x112, 56 black rows above and below
    torch.testing.assert_close(pixel_values[0], expected, rtol=0, atol=0)


def test_pad_mode_letterboxes_portrait_image_and_odd_pad_goes_bottom():
    portrait = _no_norm()(Image.new("L", (2, 4), 255))["pixel_values"][0]
    expected = torch.zeros(3, 224, 224)
    expected[:, :, 56:168] = 1.0
    torch.testing.assert_close(portrait, expected, rtol=0, atol=0)

    odd = _no_norm(size={"height": 4, "width": 4})(Image.new("L", (4, 3), 255))["pixel_values"][0, 0]
    torch.testing.assert_close(odd, torch.tensor([[1.0] * 4] * 3 + [[0.0] * 4]), rtol=0, atol=0)


def test_squash_mode_fills_the_whole_square():
    pixel_values = _no_norm(resize_mode="squash")(Image.new("L", (4, 2), 255))["pixel_values"]
    torch.testing.assert_close(pixel_values, torch.ones(1, 3, 224, 224), rtol=0, atol=0)


def test_default_normalisation_is_clip_and_padding_is_black_before_normalising():
    pixel_values = QDistillImageProcessor(min_image_side=1)(Image.new("L", (4, 2), 255))["pixel_values"][0]
    torch.testing.assert_close(pixel_values[:, 0, 0], torch.from_numpy(-CLIP_MEAN / CLIP_STD))
    torch.testing.assert_close(pixel_values[:, 112, 112], torch.from_numpy((1 - CLIP_MEAN) / CLIP_STD))


def test_chexzero_preset_normalises_raw_grey_values():
    processor = QDistillImageProcessor.chexzero_preset()
    assert processor.do_rescale is False and processor.resize_mode == "pad"
    pixel_values = processor(Image.new("L", (16, 16), 128))["pixel_values"]
    expected = (128 - CHEXZERO_MEAN) / CHEXZERO_STD
    torch.testing.assert_close(pixel_values, torch.full((1, 3, 224, 224), expected), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("scaling", "expected"),
    [("min_max", [0.0, 64.0, 128.0, 255.0]), ("full_range", [0.0, 4.0, 8.0, 16.0])],
)
def test_sixteen_bit_png_is_scaled_to_eight_bit_explicitly(tmp_path, scaling, expected):
    path = tmp_path / "film16.png"
    Image.fromarray(np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)).save(path)
    image = Image.open(path)
    assert image.mode == "I;16"
    processor = QDistillImageProcessor(
        high_bit_depth_scaling=scaling, do_resize=False, do_rescale=False, do_normalize=False, min_image_side=1
    )
    pixel_values = processor(image)["pixel_values"]
    assert pixel_values.shape == (1, 3, 2, 2)
    for channel in range(3):
        torch.testing.assert_close(pixel_values[0, channel].flatten(), torch.tensor(expected), rtol=0, atol=0)


def test_uint16_array_is_scaled_like_a_sixteen_bit_film():
    array = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)[:, :, None]
    processor = QDistillImageProcessor(do_resize=False, do_rescale=False, do_normalize=False, min_image_side=1)
    pixel_values = processor(array)["pixel_values"]
    torch.testing.assert_close(pixel_values[0, 2].flatten(), torch.tensor([0.0, 64.0, 128.0, 255.0]), rtol=0, atol=0)
    assert QDistillImageProcessor(min_image_side=1)(array)["pixel_values"].shape == (1, 3, 224, 224)


def test_bad_inputs_raise_clear_errors():
    processor = QDistillImageProcessor(min_image_side=1)
    with pytest.raises(ValueError, match="open files yourself"):
        processor("film.png")
    with pytest.raises(ValueError, match="Image 1 of the batch is a int"):
        processor([Image.new("L", (4, 4)), 3])
    with pytest.raises(ValueError, match="Unsupported PIL image mode 'LAB'"):
        processor(Image.new("LAB", (4, 4)))
    negative = Image.fromarray(np.array([[-5, 10]], dtype=np.int32))
    with pytest.raises(ValueError, match=r"outside \[0, 65535\]"):
        processor(negative)
    with pytest.raises(ValueError, match="resize_mode must be 'pad' or 'squash', got 'crop'"):
        QDistillImageProcessor(resize_mode="crop")
    with pytest.raises(ValueError, match="high_bit_depth_scaling must be"):
        QDistillImageProcessor(high_bit_depth_scaling="window")
    with pytest.raises(StrictDataclassFieldValidationError, match="resize_mode"):
        processor(Image.new("L", (4, 4)), resize_mode="crop")


def test_image_processor_round_trip_through_auto_class(tmp_path):
    register_processing_auto_classes()
    processor = QDistillImageProcessor(resize_mode="squash", high_bit_depth_scaling="full_range")
    processor.save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is QDistillImageProcessor
    assert loaded.resize_mode == "squash" and loaded.high_bit_depth_scaling == "full_range"
    assert loaded.to_dict() == processor.to_dict()
    image = Image.fromarray((np.arange(600) % 256).astype(np.uint8).reshape(20, 30))
    torch.testing.assert_close(loaded(image)["pixel_values"], processor(image)["pixel_values"], rtol=0, atol=0)


def test_tokenizer_special_ids_wrapping_and_lower_casing(tokenizer):
    assert [tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id] == [0, 1, 2]
    assert [tokenizer.sep_token_id, tokenizer.mask_token_id] == [3, 4]
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert tokenizer.padding_side == "right" and tokenizer.model_max_length == 12
    ids = tokenizer("Heart NORMAL")["input_ids"]
    assert ids[0] == 2 and ids[-1] == 3
    assert ids == tokenizer("heart normal")["input_ids"]
    assert tokenizer("CLÉAR")["input_ids"] == tokenizer("clear")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == ["heart", "normal"]


def test_tokenizer_pads_to_longest_and_truncates(tokenizer):
    batch = tokenizer(["heart", "heart normal lungs clear"], padding="longest", truncation=True, return_tensors="pt")
    assert batch["input_ids"].shape == (2, 6)
    assert batch["input_ids"][0].tolist()[3:] == [0, 0, 0]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6]
    long = tokenizer(" ".join(["normal"] * 40), truncation=True)["input_ids"]
    assert len(long) == 12 and long[0] == 2 and long[-1] == 3


def test_bpe_tokenizer_has_the_same_special_layout():
    bpe = train_report_tokenizer(REPORTS * 2, vocab_size=300, algorithm="bpe", min_frequency=1)
    ids = bpe("Pleural effusion")["input_ids"]
    assert bpe.pad_token_id == 0 and ids[0] == 2 and ids[-1] == 3
    assert bpe.decode(ids, skip_special_tokens=True) == "pleural effusion"


def test_wordpiece_vocabulary_is_deterministic_and_never_unknown_in_alphabet():
    corpus = ["No effusion. No effusion.", "Small effusion, no pneumothorax.", "Pneumothorax."]
    first = train_report_tokenizer(corpus, vocab_size=60, min_frequency=1)
    second = train_report_tokenizer(list(reversed(corpus)), vocab_size=60, min_frequency=1)
    assert first.get_vocab() == second.get_vocab()
    vocab = first.get_vocab()
    # Specials, then the alphabet as first and continuation pieces, then words by (-count, word).
    letters = sorted(set("noeffusionsmallpneumothorax,."))
    assert [token for token, _ in sorted(vocab.items(), key=lambda kv: kv[1])][5 : 5 + len(letters)] == letters
    words = [token for token, index in sorted(vocab.items(), key=lambda kv: kv[1]) if index >= 5 + 2 * len(letters)]
    assert words == ["effusion", "no", "pneumothorax", "small"]  # counts 3, 3, 2, 1; ties alphabetical
    ids = first("Effusions")["input_ids"]  # an unseen word of the alphabet: pieces, not [UNK]
    assert 1 not in ids and first.decode(ids, skip_special_tokens=True) == "effusions"
    assert ids[1] == vocab["effusion"] and len(ids) == 4


def test_tokenizer_trainer_rejects_bad_corpora():
    with pytest.raises(ValueError, match="corpus is empty"):
        train_report_tokenizer([])
    with pytest.raises(ValueError, match="corpus is empty"):
        train_report_tokenizer(["   ", ""])
    with pytest.raises(ValueError, match="Report 1 of the corpus is a NoneType"):
        train_report_tokenizer(["ok", None])
    with pytest.raises(ValueError, match=r"\(2 pieces per character for wordpiece\); use at least 13"):
        train_report_tokenizer(["abcd"], vocab_size=12)
    with pytest.raises(ValueError, match="use at least 9"):
        train_report_tokenizer(["abcd"], vocab_size=8, algorithm="bpe")
    with pytest.raises(ValueError, match="algorithm must be one of"):
        train_report_tokenizer(["abcd"], algorithm="unigram")


def _split_dict():
    return datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"report": REPORTS}),
            "test": datasets.Dataset.from_dict({"report": ["Zygomatic quixotic jjj finding."] * 5}),
        }
    )


def test_build_report_tokenizer_uses_the_train_split_only():
    tokenizer = build_report_tokenizer(_split_dict(), vocab_size=300, min_frequency=1)
    vocab = tokenizer.get_vocab()
    assert "effusion" in vocab
    assert not any(word in vocab for word in ("zygomatic", "quixotic", "jjj"))
    # 'j', 'q', 'x' and 'z' never occur in the train reports, so the test-only word is unknown.
    assert tokenizer("jjj")["input_ids"] == [2, 1, 3]


def test_build_report_tokenizer_errors():
    with pytest.raises(ValueError, match="no 'train' split"):
        build_report_tokenizer(datasets.DatasetDict({"test": datasets.Dataset.from_dict({"report": ["a"]})}))
    with pytest.raises(ValueError, match="no column 'text'"):
        build_report_tokenizer(_split_dict(), text_column="text")
    bad = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"report": ["fine", None]})})
    with pytest.raises(ValueError, match="Row 1 of the 'train' split has field 'report'"):
        build_report_tokenizer(bad)


def test_processor_call_modes(tokenizer):
    processor = QDistillProcessor(image_processor=QDistillImageProcessor(), tokenizer=tokenizer)
    films = [Image.new("L", (40, 30), 100), Image.new("RGB", (30, 40), (10, 20, 30))]
    batch = processor(images=films, text=["heart normal", "small left pleural effusion"])
    assert set(batch.keys()) == {"pixel_values", "input_ids", "attention_mask"}
    assert batch["pixel_values"].shape == (2, 3, 224, 224) and batch["pixel_values"].dtype == torch.float32
    # [CLS] heart normal [SEP] (4) is padded to [CLS] small left pleural effusion [SEP] (6), not to model_max_length.
    assert batch["input_ids"].shape == (2, 6)
    assert tokenizer.convert_ids_to_tokens(batch["input_ids"][1]) == [
        "[CLS]", "small", "left", "pleural", "effusion", "[SEP]"
    ]
    assert batch["input_ids"][0, 4:].tolist() == [0, 0]
    assert batch["attention_mask"].sum(dim=1).tolist() == [4, 6]
    text_only = processor(text="heart normal")
    assert set(text_only.keys()) == {"input_ids", "attention_mask"} and text_only["input_ids"].shape[0] == 1
    images_only = processor(images=films[0])
    assert set(images_only.keys()) == {"pixel_values"} and images_only["pixel_values"].shape == (1, 3, 224, 224)
    assert processor.batch_decode(batch["input_ids"], skip_special_tokens=True)[0] == "heart normal"
    with pytest.raises(ValueError, match="got neither"):
        processor()
    with pytest.raises(ValueError, match=r"`text\[1\]` must be a string"):
        processor(text=["ok", None])


def test_processor_round_trip(tmp_path, tokenizer):
    processor = QDistillProcessor(image_processor=QDistillImageProcessor(resize_mode="squash"), tokenizer=tokenizer)
    processor.save_pretrained(tmp_path)
    films = [Image.fromarray((np.arange(480) % 256).astype(np.uint8).reshape(20, 24))]
    texts = ["Lungs are clear. No effusion."]
    expected = processor(images=films, text=texts)
    for loaded in (QDistillProcessor.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path)):
        assert type(loaded) is QDistillProcessor
        assert type(loaded.image_processor) is QDistillImageProcessor
        assert loaded.image_processor.resize_mode == "squash"
        assert loaded.tokenizer.get_vocab() == tokenizer.get_vocab() and loaded.tokenizer.pad_token_id == 0
        got = loaded(images=films, text=texts)
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def _load_cli():
    path = REPO_ROOT / "data_scripts" / "build_tokenizer.py"
    spec = importlib.util.spec_from_file_location("build_tokenizer_cli", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reports_jsonl(tmp_path):
    cli = _load_cli()
    corpus = tmp_path / "reports.jsonl"
    corpus.write_text("".join(json.dumps({"study_id": i, "report": r}) + "\n" for i, r in enumerate(REPORTS)))
    out = tmp_path / "processor"
    cli.main(["--reports_jsonl", str(corpus), "--output_dir", str(out), "--vocab_size", "200",
              "--min_frequency", "1", "--resize_mode", "squash"])
    loaded = QDistillProcessor.from_pretrained(out)
    assert loaded.image_processor.resize_mode == "squash"
    assert "pleural" in loaded.tokenizer.get_vocab()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"report": "fine"}) + "\n" + json.dumps({"text": "no report"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: no field 'report'"):
        cli.main(["--reports_jsonl", str(bad), "--output_dir", str(out)])


def test_cli_dataset_trains_on_train_split_only(tmp_path, monkeypatch):
    calls = []

    def fake_load_cxr_dataset(name, data_dir=None, cache_dir=None, **config_kwargs):
        calls.append((name, data_dir))
        return _split_dict()

    fake_module = types.ModuleType("qdistill_hf.data.data_cxr")
    fake_module.load_cxr_dataset = fake_load_cxr_dataset
    monkeypatch.setitem(sys.modules, "qdistill_hf.data.data_cxr", fake_module)
    cli = _load_cli()
    out = tmp_path / "processor"
    cli.main(["--dataset_name", "synthetic", "--data_dir", str(tmp_path), "--output_dir", str(out),
              "--vocab_size", "300", "--min_frequency", "1"])
    assert calls == [("synthetic", str(tmp_path))]
    vocab = QDistillProcessor.from_pretrained(out).tokenizer.get_vocab()
    assert "effusion" in vocab and "zygomatic" not in vocab


def test_real_film_and_reports(shared_data):
    folder = shared_data / "cxr-paired"
    film = Image.open(next(iter(sorted((folder / "images").glob("*.png")))))
    pixel_values = QDistillImageProcessor()(film)["pixel_values"]
    assert pixel_values.shape == (1, 3, 224, 224) and torch.isfinite(pixel_values).all()
    with open(folder / "iu_reports_dev.jsonl", encoding="utf-8") as handle:
        reports = [json.loads(line)["report"] for _, line in zip(range(300), handle)]
    tokenizer = train_report_tokenizer(reports, vocab_size=1000)
    ids = tokenizer(reports[0], truncation=True)["input_ids"]
    assert ids[0] == 2 and ids[-1] == 3 and tokenizer.unk_token_id not in ids


def test_cli_jsonl_with_dataset_drops_held_out_reports(tmp_path, monkeypatch):
    fake_module = types.ModuleType("qdistill_hf.data.data_cxr")
    fake_module.load_cxr_dataset = lambda name, data_dir=None, cache_dir=None, **kw: _split_dict()
    monkeypatch.setitem(sys.modules, "qdistill_hf.data.data_cxr", fake_module)
    corpus = tmp_path / "reports.jsonl"
    lines = ["Zygomatic  quixotic jjj\nfinding.", "Bronchiectasis seen.", "Bronchiectasis seen."]
    corpus.write_text("".join(json.dumps({"report": r}) + "\n" for r in lines))
    out = tmp_path / "processor"
    _load_cli().main(["--dataset_name", "synthetic", "--reports_jsonl", str(corpus), "--output_dir", str(out),
                      "--vocab_size", "300", "--min_frequency", "1"])
    vocab = QDistillProcessor.from_pretrained(out).tokenizer.get_vocab()
    # The test-split text (same words, other whitespace) is removed; the new JSONL report and train reports stay.
    assert "bronchiectasis" in vocab and "effusion" in vocab
    assert not any(word in vocab for word in ("zygomatic", "quixotic", "jjj"))
