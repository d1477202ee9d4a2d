"""Tests for pseudo-report generation: retrieval, quality gate, writers, tiny Gemma3 end to end, CLI resume."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qdistill_hf.reports.pseudo_reports import (
    DEFAULT_MODEL_ID,
    DEFAULT_PROMPT,
    DEFAULT_SYSTEM_PROMPT,
    HFPseudoReportGenerator,
    RetrievalPseudoReportGenerator,
    add_pseudo_report_column,
    image_embeddings_from_features,
    quality_summary,
    read_folder_metadata,
    read_medgemma_layout,
    reports_from_records,
    write_medgemma_layout,
)
from qdistill_hf.reports.resumable import part_path, read_jsonl

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "data_scripts" / "generate_pseudo_reports.py"

GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = \"\" -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


# ------------------------------------------------------------------------------------------------ fixtures
def build_tiny_gemma3(out):
    """Save a tiny random Gemma3ForConditionalGeneration + Gemma3Processor to ``out`` (OFFLINE_RECIPES §1)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
        Gemma3TextConfig,
        GemmaTokenizer,
        SiglipVisionConfig,
    )

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>",
                "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    bpe.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous")
    corpus = ["findings: the lungs are clear", "impression: no acute cardiopulmonary process",
              "small left pleural effusion", "cardiomegaly with mild edema",
              "you are a board-certified radiologist"] * 10
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=200, special_tokens=specials,
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;?!-'\"()/▁\n")))
    merges = [tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    tok = GemmaTokenizer(vocab=bpe.get_vocab(), merges=merges, add_bos_token=True, extra_special_tokens={
        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>",
        "sot": "<start_of_turn>", "eot": "<end_of_turn>"})
    proc = Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": 16, "width": 16}), tokenizer=tok,
                           chat_template=GEMMA3_TEMPLATE, image_seq_length=1)
    ids = tok.convert_tokens_to_ids
    text = Gemma3TextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=8, sliding_window=16,
                            max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=16, patch_size=8)
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=1,
                       boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
                       image_token_index=ids("<image_soft_token>"), pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(cfg).eval()
    # Never stop early: keeps the number of generated tokens fixed for the assertions below.
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = None
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory):
    return build_tiny_gemma3(tmp_path_factory.mktemp("tiny_gemma3"))


def _make_folder(root, n=6, n_train=4, size=(24, 20)):
    """A tiny qdistill_folder tree: metadata.csv, images/, reports/."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "reports").mkdir()
    rows = []
    for i in range(n):
        sid = f"st{i:02d}"
        Image.new("L", size, color=30 + 35 * i).save(root / "images" / f"{sid}.png")
        (root / "reports" / f"{sid}.txt").write_text(f"FINDINGS: finding number {i}. IMPRESSION: study {i}.")
        rows.append({"study_id": sid, "image_path": f"images/{sid}.png", "report_path": f"reports/{sid}.txt",
                     "split": "train" if i < n_train else "validation"})
    with open(root / "metadata.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return rows


def _cli_main(argv):
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate_pseudo_reports_cli", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


# ------------------------------------------------------------------------------------------------ defaults
def test_defaults_keep_hub_id_and_instruction():
    assert DEFAULT_MODEL_ID == "google/medgemma-4b-it"
    for phrase in ("board-certified radiologist", "FINDINGS:", "IMPRESSION:", "No acute cardiopulmonary process",
                   "Do not write these steps out"):
        assert phrase in DEFAULT_PROMPT + DEFAULT_SYSTEM_PROMPT


# ------------------------------------------------------------------------------------------------ retrieval
def test_retrieval_exact_neighbour_on_hand_built_embeddings():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    gen = RetrievalPseudoReportGenerator(train, ["report A", "report B", "report C"], ["a", "b", "c"])
    # cos(q, a)=0.98, cos(q, c)=0.83 -> a; second query points at b
    hits = gen.retrieve(torch.tensor([[5.0, 1.0], [0.1, 2.0]]), ["q1", "q2"])
    assert [h["neighbour_id"] for h in hits] == ["a", "b"]
    assert hits[0]["report"] == "report A"
    assert hits[0]["similarity"] == pytest.approx(5 / 26 ** 0.5, abs=1e-6)


def test_retrieval_excludes_self_when_query_is_a_training_film():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    gen = RetrievalPseudoReportGenerator(train, ["rep a", "rep b", "rep c"], ["a", "b", "c"])
    hits = gen.retrieve(train, ["a", "b", "c"])
    assert [h["neighbour_id"] for h in hits] == ["b", "a", "b"]
    assert all(h["neighbour_id"] != sid for h, sid in zip(hits, "abc"))


def test_retrieval_skips_neighbours_with_identical_own_report_text():
    train = torch.tensor([[1.0, 0.0], [0.99, 0.01], [0.9, 0.3], [0.0, 1.0]])
    reports = ["No acute process.", "no  ACUTE process. ", "Small effusion.", "Cardiomegaly."]
    gen = RetrievalPseudoReportGenerator(train, reports, ["a", "b", "c", "d"])
    # "a" is a training film whose nearest other film "b" has the same (normalised) text -> skip to "c".
    assert gen.retrieve(train[:1], ["a"])[0]["neighbour_id"] == "c"
    # A validation film with its own report passed in: same rule.
    hit = gen.retrieve(torch.tensor([[1.0, 0.0]]), ["val1"], own_reports=["No acute process."])[0]
    assert hit["neighbour_id"] == "c" and hit["report"] == "Small effusion."
    # Without its own report, a validation film may get the nearest text.
    assert gen.retrieve(torch.tensor([[1.0, 0.0]]), ["val1"])[0]["neighbour_id"] == "a"


def test_retrieval_knn_majority_and_tie_break():
    train = torch.tensor([[1.0, 0.0], [0.95, 0.05], [0.9, 0.1], [0.85, 0.15], [0.0, 1.0]])
    reports = ["Effusion.", "Normal.", "normal.", "Edema.", "Normal."]
    gen3 = RetrievalPseudoReportGenerator(train, reports, list("abcde"), k=3)
    hit = gen3.retrieve(torch.tensor([[1.0, 0.0]]), ["q"])[0]
    # top-3 = a (Effusion), b (Normal), c (normal) -> "normal" wins 2:1 and comes from the nearest of b/c.
    assert hit["report"] == "Normal." and hit["neighbour_id"] == "b" and hit["votes"] == 2
    gen2 = RetrievalPseudoReportGenerator(train, reports, list("abcde"), k=2)
    tie = gen2.retrieve(torch.tensor([[1.0, 0.0]]), ["q"])[0]
    assert tie["neighbour_id"] == "a" and tie["votes"] == 1  # 1:1 tie -> nearest


def test_retrieval_vectorised_on_thousands_of_films():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(3000, 64, generator=g)
    ids = [f"t{i}" for i in range(3000)]
    gen = RetrievalPseudoReportGenerator(train, [f"report {i}" for i in range(3000)], ids, chunk_size=512)
    queries = train[:2000] + 0.01 * torch.randn(2000, 64, generator=g)
    start = time.perf_counter()
    hits = gen.retrieve(queries, [f"q{i}" for i in range(2000)])
    assert time.perf_counter() - start < 5.0
    assert [h["neighbour_id"] for h in hits] == ids[:2000]  # own film under a new id is its nearest neighbour


def test_retrieval_errors():
    with pytest.raises(ValueError, match=r"train_embeddings \(2\), train_reports \(1\)"):
        RetrievalPseudoReportGenerator(torch.zeros(2, 3), ["x"], ["a", "b"])
    gen = RetrievalPseudoReportGenerator(torch.eye(2), ["same", "same"], ["a", "b"])
    with pytest.raises(ValueError, match="study a: no training film is admissible"):
        gen.retrieve(torch.eye(2)[:1], ["a"])
    with pytest.raises(ValueError, match=r"embeddings must have shape \(M, 2\)"):
        gen.retrieve(torch.zeros(1, 3), ["q"])


def test_image_embeddings_from_features():
    feats = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    assert torch.equal(image_embeddings_from_features(feats), torch.tensor([[3.0, 4.0], [9.0, 10.0]]))
    assert torch.equal(image_embeddings_from_features(feats, "cls"), torch.tensor([[0.0, 1.0], [6.0, 7.0]]))
    with pytest.raises(ValueError, match=r"shape \(B, T, H\)"):
        image_embeddings_from_features(torch.zeros(2, 3))


# ------------------------------------------------------------------------------------------------ quality gate
def test_quality_summary_flags_without_editing():
    good = "FINDINGS: The lungs are clear without effusion. IMPRESSION: No acute cardiopulmonary process."
    outputs = {"a": "", "b": "FINDINGS: clear.", "c": "Sure, here is the report you asked for: lungs look fine today.",
               "d": good, "e": good, "f": good, "g": "FINDINGS: Small left effusion noted today. IMPRESSION: effusion."}
    snapshot = dict(outputs)
    q = quality_summary(outputs, min_words=5)
    assert outputs == snapshot
    assert q["flagged"] == {"a": ["empty"], "b": ["too_short"], "c": ["non_report", "chatty"],
                            "d": ["repeated_template"], "e": ["repeated_template"], "f": ["repeated_template"]}
    assert q["counts"] == {"empty": 1, "too_short": 1, "non_report": 1, "chatty": 1, "repeated_template": 3}
    assert q["repeat_threshold"] == 3 and q["top_repeated"] == [[good.lower(), 3]]


# ------------------------------------------------------------------------------------------------ writers
def test_medgemma_layout_round_trip(tmp_path):
    reports = {"s2": "FINDINGS: b", "s1": "FINDINGS: a"}
    meta = write_medgemma_layout(tmp_path, reports, {"s1": "train", "s2": "test"})
    rows = list(csv.DictReader(open(meta)))
    assert rows == [{"study_id": "s2", "medgemma_report_path": "s2_medgemma_report.txt", "split": "test"},
                    {"study_id": "s1", "medgemma_report_path": "s1_medgemma_report.txt", "split": "train"}]
    assert read_medgemma_layout(tmp_path) == reports
    with pytest.raises(ValueError, match="no split for 1 studies"):
        write_medgemma_layout(tmp_path, {"s3": "x"}, {})


def test_dataset_column():
    import datasets

    ds = datasets.Dataset.from_dict({"study_id": ["a", "b"], "x": [1, 2]})
    out = add_pseudo_report_column(ds, {"b": "rb", "a": "ra", "c": "rc"})
    assert out["pseudo_report"] == ["ra", "rb"]
    with pytest.raises(ValueError, match=r"1 studies have no pseudo-report, e.g. \['b'\]"):
        add_pseudo_report_column(ds, {"a": "ra"})


def test_read_folder_metadata_errors(tmp_path):
    (tmp_path / "metadata.csv").write_text("study_id,image_path,split\na,x.png,train\n")
    with pytest.raises(ValueError, match=r"metadata.csv: missing required column\(s\) \['report_path'\]"):
        read_folder_metadata(tmp_path)
    (tmp_path / "metadata.csv").write_text("study_id,image_path,report_path,split\na,x,y,train\na,x,y,test\n")
    with pytest.raises(ValueError, match=r"metadata.csv line 3 \(study_id 'a'\): duplicate study_id, first seen on line 2"):
        read_folder_metadata(tmp_path)


# ------------------------------------------------------------------------------------------------ HF generator
def test_hf_generator_batched_matches_single(tiny_gemma3):
    from PIL import Image

    gen = HFPseudoReportGenerator(tiny_gemma3, max_new_tokens=4, batch_size=3)
    assert gen.processor.tokenizer.padding_side == "left"
    assert gen.dtype == torch.float32 and gen.device.type == "cpu"
    images = [Image.new("L", (20, 30), 10), Image.new("RGB", (16, 16), (200, 10, 10)), Image.new("L", (16, 16), 255)]
    batched = gen.generate(images)
    gen.batch_size = 1
    single = gen.generate(images)
    assert len(batched) == 3 and all(isinstance(t, str) for t in batched)
    assert batched == single  # left padding + greedy: batching does not change the text
    assert all(t == t.strip() for t in batched)


def test_generate_cli_hf_and_kill_resume(tiny_gemma3, tmp_path, capsys):
    data = tmp_path / "data"
    rows = _make_folder(data, n=24, n_train=16, size=(16, 16))
    out = data / "medgemma_reports"
    cmd = [sys.executable, str(SCRIPT), "--data_dir", str(data), "--generator", "hf", "--model_id", str(tiny_gemma3),
           "--batch_size", "1", "--max_new_tokens", "12"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    part = part_path(out, 0, 1)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if part.is_file() and part.read_text().count("\n") >= 2:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_before = len(read_jsonl(part))
    assert 2 <= n_before < 24, f"expected a kill mid-run, found {n_before} finished studies"
    assert not (out / "metadata.csv").exists()

    # Resume in-process (one interpreter start-up is enough for the kill test).
    assert _cli_main(cmd[2:] + ["--batch_size", "8"]) == 0
    stdout = capsys.readouterr().out
    merged = read_jsonl(out / "pseudo_reports.jsonl")
    assert [r["study_id"] for r in merged] == [r["study_id"] for r in rows]
    assert all(r["generator"] == "hf" and isinstance(r["pseudo_report"], str) for r in merged)
    meta = list(csv.DictReader(open(out / "metadata.csv")))
    assert [m["study_id"] for m in meta] == [r["study_id"] for r in rows]
    assert [m["split"] for m in meta] == [r["split"] for r in rows]
    assert read_medgemma_layout(out) == {r["study_id"]: r["pseudo_report"] for r in merged}
    # Random weights produce garbage; the quality gate must say so.
    summary = json.loads(stdout[: stdout.rindex("}") + 1])
    assert summary["n_reports"] == 24 and summary["n_missing"] == 0
    assert summary["counts"]["non_report"] + summary["counts"]["empty"] == 24
    assert json.loads((out / "quality_summary.json").read_text())["n"] == 24


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    vm = tmp_path_factory.mktemp("clip")
    CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     image_size=32, patch_size=8)).save_pretrained(vm)
    return vm


def test_generate_cli_retrieval(tmp_path, tiny_clip):
    data = tmp_path / "data"
    rows = _make_folder(data, n=6, n_train=4)
    vm = tiny_clip
    out = tmp_path / "pr"
    assert _cli_main(["--data_dir", str(data), "--generator", "retrieval", "--vision_model", str(vm),
                      "--output_dir", str(out), "--batch_size", "4", "--rank", "0", "--world_size", "1"]) == 0
    merged = read_jsonl(out / "pseudo_reports.jsonl")
    assert [r["study_id"] for r in merged] == [r["study_id"] for r in rows]
    train_ids = {r["study_id"] for r in rows if r["split"] == "train"}
    for r in merged:
        own = (data / "reports" / f"{r['study_id']}.txt").read_text()
        assert r["neighbour_id"] in train_ids and r["neighbour_id"] != r["study_id"]
        assert r["pseudo_report"] != own
        assert r["pseudo_report"] == (data / "reports" / f"{r['neighbour_id']}.txt").read_text()


def test_generate_cli_unreadable_film_is_an_error_never_a_report_and_is_retried(tmp_path, tiny_clip, capsys):
    data = tmp_path / "data"
    rows = _make_folder(data, n=6, n_train=4)
    good_png = (data / "images" / "st05.png").read_bytes()
    (data / "images" / "st05.png").write_bytes(b"not a png")
    out = tmp_path / "pr"
    argv = ["--data_dir", str(data), "--vision_model", str(tiny_clip), "--output_dir", str(out),
            "--rank", "0", "--world_size", "1"]
    assert _cli_main(argv) == 0
    stdout = capsys.readouterr().out
    assert json.loads(stdout[: stdout.rindex("}") + 1])["n_missing"] == 1
    assert "['st05']" in stdout
    assert [r["study_id"] for r in read_jsonl(out / "pseudo_reports.jsonl")] == [r["study_id"] for r in rows[:5]]
    assert not (out / "st05_medgemma_report.txt").exists()
    assert "st05" not in read_medgemma_layout(out)
    (err,) = read_jsonl(out / "parts" / "errors-00000.jsonl")
    assert err["study_id"] == "st05" and err["error_type"] == "UnidentifiedImageError" and err["attempt"] == 1
    assert "st05.png" in err["message"]

    # Repaired film: the next run retries only the failure and completes the layout in input order.
    (data / "images" / "st05.png").write_bytes(good_png)
    assert _cli_main(argv) == 0
    merged = read_jsonl(out / "pseudo_reports.jsonl")
    assert [r["study_id"] for r in merged] == [r["study_id"] for r in rows]
    assert list(read_medgemma_layout(out)) == [r["study_id"] for r in rows]

    # Resuming into the same folder with another retrieval setting would mix outputs: refused.
    with pytest.raises(ValueError, match=r"fields \['k'\] differ"):
        _cli_main(argv + ["--k", "3"])


def test_generate_cli_retrieval_refuses_empty_training_report(tmp_path, tiny_clip):
    data = tmp_path / "data"
    _make_folder(data, n=4, n_train=2)
    (data / "reports" / "st01.txt").write_text("  \n")
    with pytest.raises(ValueError, match=r"st01.txt: training study st01 has an empty or missing report"):
        _cli_main(["--data_dir", str(data), "--vision_model", str(tiny_clip), "--output_dir", str(tmp_path / "o"),
                   "--rank", "0", "--world_size", "1"])


def test_reports_from_records_names_source_and_record():
    with pytest.raises(ValueError, match=r"m.jsonl: record 1 has no 'pseudo_report' field"):
        reports_from_records([{"study_id": "a", "pseudo_report": "x"}, {"study_id": "b"}], source="m.jsonl")
    with pytest.raises(ValueError, match=r"record 0 \(a\): 'pseudo_report' is NoneType, not str"):
        reports_from_records([{"study_id": "a", "pseudo_report": None}])


def test_retrieval_refuses_non_finite_embeddings():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    generator = RetrievalPseudoReportGenerator(train, ["Report A.", "Report B."], ["a", "b"])
    with pytest.raises(ValueError, match=r"embeddings of studies \['q2'\] contain NaN or inf"):
        generator.retrieve(torch.tensor([[1.0, 0.0], [float("nan"), 1.0]]), ["q1", "q2"])
    with pytest.raises(ValueError, match=r"train_embeddings of studies \['b'\] contain NaN or inf"):
        RetrievalPseudoReportGenerator(torch.tensor([[1.0, 0.0], [float("inf"), 0.0]]), ["A.", "B."], ["a", "b"])
