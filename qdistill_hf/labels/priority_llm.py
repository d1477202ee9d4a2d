"""LLM priority scoring with strict JSON parsing: invalid outputs are retried, then left unscored -- never labelled.

The reference parsed free text with a keyword fallback (so "non-urgent" became urgent) and saved -1 labels for
errors. Here a reply must contain exactly one JSON object
``{"urgent": 0|1, "complexity": 1-5, "rationale": "..."}``:

* Surrounding prose and a Markdown code fence are tolerated only when exactly one JSON object can be
  extracted from the reply (two objects are ambiguous and rejected).
* ``urgent`` must be the integer 0 or 1 and ``complexity`` an integer 1-5 (booleans, floats and strings such
  as ``"1"`` are rejected); ``rationale`` must be a string; no other keys are allowed, and no key may appear
  twice (``json`` would silently keep the last of ``{"urgent": 0, "urgent": 1, ...}``).

A study whose replies all fail becomes a :class:`PriorityParseError` carrying every raw reply; the resumable
runner stores it in the errors file and the study has no label.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .priority_rules import score_report
from ..utils import atomic_write_text, load_pretrained, resolve_device_dtype

logger = logging.getLogger(__name__)

PRIORITY_KEYS = ("urgent", "complexity", "rationale")

PRIORITY_SYSTEM_PROMPT = (
    "You are an expert radiologist triaging chest X-ray reports. Separate findings that need immediate "
    "attention from routine ones. Reply with a single JSON object and nothing else."
)

PRIORITY_USER_TEMPLATE = (
    "Radiology report:\n{report}\n\n"
    "Classify the study.\n"
    "urgent = 1 for severe or critical findings needing immediate action (for example a large or tension "
    "pneumothorax, severe pulmonary oedema, a massive effusion, a malpositioned tube or line, a widened "
    "mediastinum, new consolidation); urgent = 0 for normal studies and mild, chronic or stable findings.\n"
    "complexity = an integer from 1 (normal, nothing to report) to 5 (many interacting abnormalities).\n"
    'Answer with exactly: {{"urgent": 0 or 1, "complexity": 1-5, "rationale": "one short sentence"}}'
)


class PriorityParseError(ValueError):
    """A model reply that is not a valid priority JSON object.

    Attributes:
        raw_output: the offending reply (or the last one, after retries).
        details: JSON-serialisable context stored by the resumable runner (``raw_outputs`` of every attempt).
    """

    def __init__(self, message: str, raw_output: str = "", raw_outputs: Sequence[str] | None = None):
        super().__init__(message)
        self.raw_output = raw_output
        self.details = {"raw_outputs": list(raw_outputs) if raw_outputs is not None else [raw_output]}


@dataclass(frozen=True)
class PriorityResult:
    """A validated priority judgement: ``urgent`` in {0, 1}, ``complexity`` in 1..5, free-text ``rationale``."""

    urgent: int
    complexity: int
    rationale: str

    def to_dict(self) -> dict:
        """Plain dict for JSON output."""
        return asdict(self)


class _DuplicateKeyError(ValueError):
    pass


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    keys = [k for k, _ in pairs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise _DuplicateKeyError(f"duplicate key(s) {dup}")
    return dict(pairs)


def _extract_json_objects(text: str) -> list[Any]:
    """Every top-level JSON object in ``text``; raises _DuplicateKeyError on an object with a repeated key."""
    decoder = json.JSONDecoder(object_pairs_hook=_reject_duplicate_keys)
    found, pos = [], 0
    while True:
        start = text.find("{", pos)
        if start < 0:
            return found
        try:
            obj, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            pos = start + 1
            continue
        found.append(obj)
        pos = end


def _strict_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_priority_json(text: str) -> PriorityResult:
    """Parse one model reply strictly (see the module docstring for the rules).

    Args:
        text: the raw reply.

    Returns:
        The validated :class:`PriorityResult`.

    Raises:
        PriorityParseError: no JSON object, more than one, missing/extra keys, or invalid values; the message
            says which.
    """
    if not isinstance(text, str):
        raise PriorityParseError(f"reply is {type(text).__name__}, not str", raw_output=repr(text))
    try:
        objects = _extract_json_objects(text)
    except _DuplicateKeyError as exc:
        raise PriorityParseError(f"{exc} in the JSON object", raw_output=text) from None
    if not objects:
        raise PriorityParseError("no JSON object found in reply", raw_output=text)
    if len(objects) > 1:
        raise PriorityParseError(f"found {len(objects)} JSON objects in reply; expected exactly one",
                                 raw_output=text)
    obj = objects[0]
    if not isinstance(obj, dict):
        raise PriorityParseError("JSON value is not an object", raw_output=text)
    missing = [k for k in PRIORITY_KEYS if k not in obj]
    if missing:
        raise PriorityParseError(f"missing key(s) {missing}", raw_output=text)
    extra = sorted(set(obj) - set(PRIORITY_KEYS))
    if extra:
        raise PriorityParseError(f"unexpected key(s) {extra}", raw_output=text)
    if not _strict_int(obj["urgent"]) or obj["urgent"] not in (0, 1):
        raise PriorityParseError(f"urgent must be the integer 0 or 1, got {obj['urgent']!r}", raw_output=text)
    if not _strict_int(obj["complexity"]) or not 1 <= obj["complexity"] <= 5:
        raise PriorityParseError(f"complexity must be an integer 1-5, got {obj['complexity']!r}", raw_output=text)
    if not isinstance(obj["rationale"], str):
        raise PriorityParseError(f"rationale must be a string, got {type(obj['rationale']).__name__}",
                                 raw_output=text)
    return PriorityResult(urgent=obj["urgent"], complexity=obj["complexity"], rationale=obj["rationale"].strip())


def build_priority_messages(report: str, system_prompt: str = PRIORITY_SYSTEM_PROMPT,
                            user_template: str = PRIORITY_USER_TEMPLATE) -> list[dict]:
    """Chat messages asking for the priority JSON of one report.

    Args:
        report: the report text (stripped).
        system_prompt: system turn.
        user_template: user turn with a ``{report}`` placeholder.
    """
    return [{"role": "system", "content": system_prompt},
            {"role": "user", "content": user_template.format(report=report.strip())}]


GenerateFn = Callable[[list[list[dict]], int], list[str]]


class HFChatGenerate:
    """Text-only chat generation through ``AutoModelForCausalLM`` + the tokenizer's chat template.

    Attempt 0 decodes greedily; retries sample (``temperature=retry_temperature``) so a retry can differ, from
    a generator seeded with ``seed + attempt`` (the global RNG state is restored afterwards), so a rerun on the
    same batch reproduces the same replies.

    Args:
        model_id_or_path: Hub id or local folder.
        max_new_tokens: generation budget per reply.
        batch_size: conversations per ``generate`` call.
        dtype: default bfloat16 on CUDA, float32 on CPU.
        device: default CUDA when available.
        retry_temperature: sampling temperature for attempts after the first.
        seed: base seed of the retries' sampling.
    """

    def __init__(self, model_id_or_path: str | os.PathLike, max_new_tokens: int = 128, batch_size: int = 8,
                 dtype: Any = None, device: Any = None, retry_temperature: float = 0.7, seed: int = 0):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device, self.dtype = resolve_device_dtype(device, dtype)
        self.tokenizer = load_pretrained(AutoTokenizer, model_id_or_path, "model_id_or_path")
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            raise ValueError(f"{model_id_or_path}: tokenizer has no pad token; batched generation needs one")
        self.model = load_pretrained(AutoModelForCausalLM, model_id_or_path, "model_id_or_path", dtype=self.dtype)
        self.model.to(self.device).eval()
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.retry_temperature = retry_temperature
        self.seed = seed

    def __call__(self, conversations: list[list[dict]], attempt: int = 0) -> list[str]:
        """Generate one reply per conversation.

        Args:
            conversations: chat message lists.
            attempt: 0 for greedy decoding, >= 1 for a seeded sampled retry.
        """
        import torch

        if attempt == 0:
            sampling = {"do_sample": False}
        else:
            sampling = {"do_sample": True, "temperature": self.retry_temperature}
        devices = [self.device] if self.device.type == "cuda" else []
        replies: list[str] = []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed + attempt)
            for start in range(0, len(conversations), self.batch_size):
                chunk = conversations[start:start + self.batch_size]
                inputs = self.tokenizer.apply_chat_template(chunk, add_generation_prompt=True, tokenize=True,
                                                            return_dict=True, return_tensors="pt", padding=True)
                inputs = {k: v.to(self.device) for k, v in inputs.items()}
                with torch.inference_mode():
                    out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens,
                                              pad_token_id=self.tokenizer.pad_token_id, **sampling)
                new = out[:, inputs["input_ids"].shape[1]:]
                replies.extend(t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True))
        return replies


class LLMPriorityScorer:
    """Score reports with a chat LLM; each ends as a :class:`PriorityResult` or a :class:`PriorityParseError`.

    Args:
        generate_fn: ``fn(conversations, attempt) -> replies``; default an :class:`HFChatGenerate` built from
            ``model_id_or_path`` (tests inject a scripted function).
        model_id_or_path: model for the default ``generate_fn``.
        max_attempts: replies tried per report before it is left unscored.
        system_prompt: system turn.
        user_template: user turn; must contain ``{report}``.
        **hf_kwargs: forwarded to :class:`HFChatGenerate`.
    """

    def __init__(self, generate_fn: GenerateFn | None = None, model_id_or_path: str | os.PathLike | None = None,
                 max_attempts: int = 3, system_prompt: str = PRIORITY_SYSTEM_PROMPT,
                 user_template: str = PRIORITY_USER_TEMPLATE, **hf_kwargs: Any):
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        if "{report}" not in user_template:
            raise ValueError("user_template must contain the placeholder {report}")
        self.system_prompt = system_prompt
        self.user_template = user_template
        if generate_fn is None:
            if model_id_or_path is None:
                raise ValueError("give either generate_fn or model_id_or_path")
            generate_fn = HFChatGenerate(model_id_or_path, **hf_kwargs)
        self.generate_fn = generate_fn
        self.max_attempts = max_attempts

    def score_batch(self, reports: Sequence[str]) -> list[PriorityResult | PriorityParseError]:
        """Score reports, retrying only the ones whose reply failed to parse.

        Args:
            reports: report texts.

        Returns:
            Per report, the parsed result, or a :class:`PriorityParseError` whose ``details["raw_outputs"]``
            holds every reply (it is an *unscored* study, not a label).
        """
        results: list[Any] = [None] * len(reports)
        raw: list[list[str]] = [[] for _ in reports]
        last_error: list[str] = [""] * len(reports)
        pending = list(range(len(reports)))
        for attempt in range(self.max_attempts):
            if not pending:
                break
            conversations = [build_priority_messages(reports[i], self.system_prompt, self.user_template)
                             for i in pending]
            replies = self.generate_fn(conversations, attempt)
            if len(replies) != len(pending):
                raise ValueError(f"generate_fn returned {len(replies)} replies for {len(pending)} conversations")
            still = []
            for i, reply in zip(pending, replies):
                raw[i].append(reply)
                try:
                    results[i] = parse_priority_json(reply)
                except PriorityParseError as exc:
                    last_error[i] = str(exc)
                    still.append(i)
            pending = still
        for i in pending:
            results[i] = PriorityParseError(f"unscored after {len(raw[i])} attempt(s): {last_error[i]}",
                                            raw_output=raw[i][-1], raw_outputs=raw[i])
        return results


def rules_score_batch(reports: Sequence[str]) -> list[dict]:
    """Score reports with the rule-based scorer (``qdistill_hf.labels.priority_rules.score_report``).

    Args:
        reports: non-empty report texts (an empty one raises ``ValueError``).

    Returns:
        Per report ``{"urgent", "abnormal", "complexity", "rationale"}``.
    """
    out = []
    for text in reports:
        s = score_report(text)
        out.append({"urgent": int(s.urgent), "abnormal": int(s.abnormal), "complexity": int(s.complexity),
                    "rationale": str(s.rationale)})
    return out


def write_priority_metadata(path: str | os.PathLike, records: Sequence[dict], scorer: str) -> int:
    """Write ``priority_metadata.csv`` (``study_id, priority_label, complexity, split, scorer``) atomically.

    Only scored records are written (``priority_label`` = ``urgent``); unscored studies have no row, so they
    never receive a label.

    Args:
        path: CSV path (parent created).
        records: runner records with ``study_id``, ``urgent`` (0/1), ``complexity`` (1-5), optional ``split``.
        scorer: scorer name written in every row.

    Returns:
        Number of rows written.

    Raises:
        ValueError: a record lacks ``study_id`` or has an invalid ``urgent``/``complexity`` (names the record).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["study_id", "priority_label", "complexity", "split", "scorer"])
    for i, rec in enumerate(records):
        sid = rec.get("study_id")
        if sid is None:
            raise ValueError(f"record {i}: no 'study_id' field")
        urgent, complexity = rec.get("urgent"), rec.get("complexity")
        if not _strict_int(urgent) or urgent not in (0, 1):
            raise ValueError(f"record {i} ({sid}): urgent must be 0 or 1, got {urgent!r}")
        if not _strict_int(complexity) or not 1 <= complexity <= 5:
            raise ValueError(f"record {i} ({sid}): complexity must be an integer 1-5, got {complexity!r}")
        writer.writerow([sid, urgent, complexity, rec.get("split", ""), scorer])
    atomic_write_text(path, buffer.getvalue())
    return len(records)


__all__ = [
    "HFChatGenerate",
    "LLMPriorityScorer",
    "PRIORITY_SYSTEM_PROMPT",
    "PRIORITY_USER_TEMPLATE",
    "PriorityParseError",
    "PriorityResult",
    "build_priority_messages",
    "parse_priority_json",
    "rules_score_batch",
    "write_priority_metadata",
]
