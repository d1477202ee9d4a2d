"""Tests for the strict LLM priority scorer and the score_priority CLI."""

import csv
import importlib.util
import json
from pathlib import Path

import pytest

from qdistill_hf.labels.priority_llm import (
    LLMPriorityScorer,
    PriorityParseError,
    PriorityResult,
    build_priority_messages,
    parse_priority_json,
    write_priority_metadata,
)
from qdistill_hf.reports.resumable import load_errors, run_resumable

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "data_scripts" / "score_priority.py"
VALID = '{"urgent": 1, "complexity": 4, "rationale": "Large right pneumothorax."}'


def _cli_main(argv):
    spec = importlib.util.spec_from_file_location("score_priority_cli", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


# ------------------------------------------------------------------------------------------------ parsing
def test_valid_json_parses():
    assert parse_priority_json(VALID) == PriorityResult(1, 4, "Large right pneumothorax.")
    fenced = 'Here is my answer:\n```json\n{"urgent": 0, "complexity": 1, "rationale": " normal "}\n```'
    assert parse_priority_json(fenced) == PriorityResult(0, 1, "normal")


@pytest.mark.parametrize(
    "reply, message",
    [
        ("This study is non-urgent.", "no JSON object found"),
        ("PRIORITY: 1\nCATEGORY: urgent", "no JSON object found"),
        ('{"urgent": 1, "complexity": 3, "rationale": "x"', "no JSON object found"),
        ("{'urgent': 1, 'complexity': 3, 'rationale': 'x'}", "no JSON object found"),
        ('{"urgent": 2, "complexity": 3, "rationale": "x"}', r"urgent must be the integer 0 or 1, got 2"),
        ('{"urgent": true, "complexity": 3, "rationale": "x"}', r"urgent must be the integer 0 or 1, got True"),
        ('{"urgent": "1", "complexity": 3, "rationale": "x"}', r"urgent must be the integer 0 or 1, got '1'"),
        ('{"urgent": -1, "complexity": 3, "rationale": "x"}', r"urgent must be the integer 0 or 1, got -1"),
        ('{"urgent": 0, "complexity": 6, "rationale": "x"}', r"complexity must be an integer 1-5, got 6"),
        ('{"urgent": 0, "complexity": 2.0, "rationale": "x"}', r"complexity must be an integer 1-5, got 2.0"),
        ('{"urgent": 0, "complexity": 2, "rationale": 5}', "rationale must be a string, got int"),
        ('{"urgent": 1, "complexity": 3}', r"missing key\(s\) \['rationale'\]"),
        ('{"urgent": 1, "complexity": 3, "rationale": "x", "category": "u"}', r"unexpected key\(s\) \['category'\]"),
        (VALID + " or maybe " + VALID.replace("1,", "0,"), "found 2 JSON objects"),
        ("[1, 2]", "no JSON object found"),
        ('{"urgent": 0, "urgent": 1, "complexity": 3, "rationale": "x"}', r"duplicate key\(s\) \['urgent'\]"),
    ],
)
def test_invalid_replies_raise(reply, message):
    with pytest.raises(PriorityParseError, match=message) as info:
        parse_priority_json(reply)
    assert info.value.raw_output == reply


# ------------------------------------------------------------------------------------------------ retry / unscored
class Scripted:
    """A fake generate_fn replying from a per-report script, one reply per attempt."""

    def __init__(self, script):
        self.script = script
        self.calls = []

    def __call__(self, conversations, attempt):
        self.calls.append((attempt, len(conversations)))
        replies = []
        for conv in conversations:
            report = conv[-1]["content"].split("\n")[1]
            replies.append(self.script[report][attempt])
        return replies


def test_retry_then_unscored_never_a_label():
    script = {
        "r-valid": [VALID],
        "r-retry": ["urgent!", '{"urgent": 0, "complexity": 2, "rationale": "stable"}'],
        "r-nonurgent": ["non-urgent", "Non-urgent study.", "NON-URGENT"],
        "r-two": ['{"urgent": 2}', '{"urgent": 2, "complexity": 1, "rationale": ""}', '{"urgent": 1,'],
    }
    gen = Scripted(script)
    out = LLMPriorityScorer(generate_fn=gen, max_attempts=3).score_batch(list(script))
    assert out[0] == PriorityResult(1, 4, "Large right pneumothorax.")
    assert out[1] == PriorityResult(0, 2, "stable")
    assert isinstance(out[2], PriorityParseError) and isinstance(out[3], PriorityParseError)
    assert str(out[2]) == "unscored after 3 attempt(s): no JSON object found in reply"
    assert out[2].details == {"raw_outputs": ["non-urgent", "Non-urgent study.", "NON-URGENT"]}
    assert out[3].details["raw_outputs"][-1] == '{"urgent": 1,'
    # Only the failing reports are re-asked: 4, then 3, then 2 conversations.
    assert gen.calls == [(0, 4), (1, 3), (2, 2)]


def test_unscored_studies_go_to_errors_file_not_outputs(tmp_path):
    reports = {"s1": "r-valid", "s2": "r-bad"}
    gen = Scripted({"r-valid": [VALID], "r-bad": ["non-urgent", "non-urgent"]})
    scorer = LLMPriorityScorer(generate_fn=gen, max_attempts=2)

    def process(batch):
        return [r if isinstance(r, Exception) else r.to_dict()
                for r in scorer.score_batch([reports[it["study_id"]] for it in batch])]

    run_resumable([{"study_id": "s1"}, {"study_id": "s2"}], process, tmp_path, rank=0, world_size=1)
    merged = [json.loads(x) for x in (tmp_path / "merged.jsonl").read_text().splitlines()]
    assert merged == [{"study_id": "s1", "urgent": 1, "complexity": 4, "rationale": "Large right pneumothorax."}]
    err = load_errors(tmp_path)["s2"]
    assert err["error_type"] == "PriorityParseError" and err["details"]["raw_outputs"] == ["non-urgent", "non-urgent"]
    rows = write_priority_metadata(tmp_path / "pm.csv", merged, scorer="llm")
    assert rows == 1
    assert list(csv.DictReader(open(tmp_path / "pm.csv"))) == [
        {"study_id": "s1", "priority_label": "1", "complexity": "4", "split": "", "scorer": "llm"}]


@pytest.mark.parametrize(
    "record, message",
    [
        ({"study_id": "a", "urgent": -1, "complexity": 1}, r"record 0 \(a\): urgent must be 0 or 1, got -1"),
        ({"study_id": "a", "urgent": True, "complexity": 1}, r"record 0 \(a\): urgent must be 0 or 1, got True"),
        ({"study_id": "a", "urgent": 1, "complexity": 0}, r"record 0 \(a\): complexity must be an integer 1-5, got 0"),
        ({"study_id": "a", "urgent": 1}, r"record 0 \(a\): complexity must be an integer 1-5, got None"),
        ({"urgent": 1, "complexity": 3}, r"record 0: no 'study_id' field"),
    ],
)
def test_write_priority_metadata_rejects_invalid_records(tmp_path, record, message):
    with pytest.raises(ValueError, match=message):
        write_priority_metadata(tmp_path / "x.csv", [record], "llm")
    assert not (tmp_path / "x.csv").exists()


def test_prompt_asks_for_strict_json():
    msgs = build_priority_messages("  FINDINGS: clear.  ")
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert "FINDINGS: clear." in msgs[1]["content"]
    assert '{"urgent": 0 or 1, "complexity": 1-5, "rationale":' in msgs[1]["content"]


# ------------------------------------------------------------------------------------------------ real tiny model
SHORT_SYSTEM = "Triage."
SHORT_TEMPLATE = "Report: {report}"


def _tiny_chat_model(out, reply, reports, steps=80):
    """A tiny Llama chat model overfitted to answer ``reply`` to the priority prompt of ``reports``.

    Built as in OFFLINE_RECIPES §2; ``steps=0`` leaves it random.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([reply] * 20 + ["findings impression urgent complexity rationale report"] * 5,
                            trainers.BpeTrainer(vocab_size=400, special_tokens=["<|pad|>", "<|bos|>", "<|eos|>",
                                                                                 "<|im_start|>", "<|im_end|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    chat = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|bos|>", eos_token="<|im_end|>",
                                  pad_token="<|pad|>", padding_side="left", chat_template=chat)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    prompts = [tok.apply_chat_template(build_priority_messages(r, SHORT_SYSTEM, SHORT_TEMPLATE),
                                       add_generation_prompt=True, tokenize=False) for r in reports]
    batch = tok([p + reply + "<|im_end|>" for p in prompts], return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _folder(root, n=3):
    (root / "reports").mkdir(parents=True)
    rows = []
    for i in range(n):
        (root / "reports" / f"s{i}.txt").write_text(["FINDINGS: Large right pneumothorax.",
                                                     "FINDINGS: Lungs are clear. IMPRESSION: Normal.",
                                                     "FINDINGS: Small effusion."][i % 3])
        rows.append({"study_id": f"s{i}", "image_path": f"images/s{i}.png", "report_path": f"reports/s{i}.txt",
                     "split": "train" if i else "validation"})
    with open(root / "metadata.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return rows


def test_score_priority_cli_llm_end_to_end(tmp_path, capsys):
    data = tmp_path / "data"
    _folder(data)
    reports = [p.read_text() for p in sorted((data / "reports").iterdir())]
    model_dir = _tiny_chat_model(tmp_path / "chat", VALID, reports)
    (tmp_path / "system.txt").write_text(SHORT_SYSTEM)
    (tmp_path / "template.txt").write_text(SHORT_TEMPLATE)
    assert _cli_main(["--data_dir", str(data), "--scorer", "llm", "--model_id", str(model_dir),
                      "--system_prompt_file", str(tmp_path / "system.txt"),
                      "--user_template_file", str(tmp_path / "template.txt"),
                      "--max_new_tokens", "48", "--rank", "0", "--world_size", "1"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[: out.rindex("}") + 1])
    assert summary["n_scored"] + summary["n_unscored"] == 3
    rows = list(csv.DictReader(open(data / "priority_scores" / "priority_metadata.csv")))
    assert summary["n_scored"] == len(rows)
    for row in rows:
        # Whatever the tiny model says, a written row holds a valid label from a parsed JSON reply.
        assert row["priority_label"] in {"0", "1"} and row["complexity"] in set("12345") and row["scorer"] == "llm"
    assert summary["n_scored"] == 3, "the overfitted model should reproduce the JSON reply"
    assert {r["priority_label"] for r in rows} == {"1"}


def test_hf_chat_retries_are_seeded_and_leave_global_rng_alone(tmp_path):
    import torch

    from qdistill_hf.labels.priority_llm import HFChatGenerate

    model_dir = _tiny_chat_model(tmp_path / "chat", VALID, ["FINDINGS: clear."], steps=0)
    gen = HFChatGenerate(model_dir, max_new_tokens=6, batch_size=2, retry_temperature=5.0)
    convs = [build_priority_messages(r, SHORT_SYSTEM, SHORT_TEMPLATE) for r in ("a b", "FINDINGS: clear.")]
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first = gen(convs, attempt=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(999)  # the caller's RNG state does not matter, only seed + attempt
    assert gen(convs, attempt=1) == first
    gen.seed = 5
    assert gen(convs, attempt=1) != first  # the retry really samples (temperature 5 on a random model)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        HFChatGenerate(model_dir, batch_size=0)


def test_score_priority_cli_empty_report_is_unscored_not_labelled(tmp_path, capsys):
    data = tmp_path / "data"
    _folder(data)
    (data / "reports" / "s1.txt").write_text(" \n")
    assert _cli_main(["--data_dir", str(data), "--rank", "0", "--world_size", "1"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[: out.rindex("}") + 1])
    assert (summary["n_scored"], summary["n_unscored"]) == (2, 1)
    rows = list(csv.DictReader(open(data / "priority_scores" / "priority_metadata.csv")))
    assert [r["study_id"] for r in rows] == ["s0", "s2"]
    err = load_errors(data / "priority_scores" / "runs" / "rules")["s1"]
    assert err["error_type"] == "ValueError" and "report file is empty" in err["message"] and "s1.txt" in err["message"]


def test_score_priority_cli_rules(tmp_path, capsys):
    data = tmp_path / "data"
    _folder(data)
    assert _cli_main(["--data_dir", str(data), "--scorer", "rules", "--rank", "0", "--world_size", "1"]) == 0
    rows = list(csv.DictReader(open(data / "priority_scores" / "priority_metadata.csv")))
    assert [r["study_id"] for r in rows] == ["s0", "s1", "s2"]
    assert [r["split"] for r in rows] == ["validation", "train", "train"]
    assert {r["scorer"] for r in rows} == {"rules"}
    assert rows[0]["priority_label"] == "1" and rows[1]["priority_label"] == "0"
