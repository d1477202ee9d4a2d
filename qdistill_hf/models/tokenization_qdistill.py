"""Train the radiology-report tokenizer (WordPiece or BPE) used by the Q-DISTILL Q-Former text stream."""

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast


logger = logging.getLogger(__name__)

# Fixed ids: the model configs default to pad_token_id=0, and position 0 of every sequence is [CLS].
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD_TOKEN_ID, UNK_TOKEN_ID, CLS_TOKEN_ID, SEP_TOKEN_ID, MASK_TOKEN_ID = range(len(SPECIAL_TOKENS))
_ALGORITHMS = ("wordpiece", "bpe")
_SUBWORD_PREFIX = "##"


def _report_normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])


def train_report_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 8000,
    algorithm: str = "wordpiece",
    model_max_length: int = 256,
    min_frequency: int = 2,
    source: str | None = None,
) -> PreTrainedTokenizerFast:
    """Train a report tokenizer from scratch with the `tokenizers` library.

    The tokenizer lower-cases and strips accents (NFD + Lowercase + StripAccents), splits on whitespace and
    punctuation (BERT pre-tokenizer), learns a WordPiece (or BPE, with `##` continuation prefixes) vocabulary, wraps
    every text as `[CLS] ... [SEP]` (pairs as `[CLS] A [SEP] B [SEP]`), pads on the right and truncates to
    `model_max_length`. Special tokens have fixed ids: `[PAD]`=0, `[UNK]`=1, `[CLS]`=2, `[SEP]`=3, `[MASK]`=4.

    Vocabularies:
        - `"wordpiece"` (default, deterministic): every character of the corpus alphabet as a first piece and as a
          `##` continuation piece, then whole words by decreasing frequency (at least `min_frequency`; ties broken
          alphabetically) until `vocab_size`. Greedy longest-match WordPiece then encodes a known word as one token
          and any other word of the alphabet as pieces, never `[UNK]`. The same corpus always gives the same ids.
        - `"bpe"`: a BPE vocabulary learned by the `tokenizers` trainer. That trainer breaks ties between equally
          frequent merges in hash-map order, so two trainings on one corpus can differ in a few tokens and ids: train
          once and ship the saved tokenizer with the model.

    Args:
        texts (`Iterable[str]`): the training corpus, one report per item (read once into memory).
        vocab_size (`int`, *optional*, defaults to 8000): upper bound on the vocabulary size, specials included.
        algorithm (`str`, *optional*, defaults to `"wordpiece"`): `"wordpiece"` or `"bpe"`.
        model_max_length (`int`, *optional*, defaults to 256): truncation length, `[CLS]`/`[SEP]` included.
        min_frequency (`int`, *optional*, defaults to 2): minimum count for a merge/sub-word to enter the vocabulary.
        source (`str`, *optional*): where the corpus came from (a file, a split), named in error messages.

    Returns:
        `PreTrainedTokenizerFast` with `pad_token_id == 0`.

    Raises:
        ValueError: on an unknown algorithm, a non-string item, an empty corpus, or a `vocab_size` smaller than the
            special tokens plus the corpus alphabet.
    """
    if algorithm not in _ALGORITHMS:
        raise ValueError(f"algorithm must be one of {list(_ALGORITHMS)}, got {algorithm!r}.")
    if model_max_length < 2:
        raise ValueError(f"model_max_length must be at least 2 ([CLS] and [SEP]), got {model_max_length}.")
    origin = f" of {source}" if source else ""
    corpus = []
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"Report {index} of the corpus{origin} is a {type(text).__name__}, not a string.")
        corpus.append(text)
    normalizer = _report_normalizer()
    alphabet = set()
    for text in corpus:
        alphabet.update(char for char in normalizer.normalize_str(text) if not char.isspace())
    if not alphabet:
        raise ValueError(
            f"The report corpus{origin} is empty ({len(corpus)} texts, none with a non-space character)."
        )
    # WordPiece holds every character twice: as a first piece and as a "##" continuation piece.
    pieces_per_character = 2 if algorithm == "wordpiece" else 1
    minimum = len(SPECIAL_TOKENS) + pieces_per_character * len(alphabet)
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size={vocab_size} is smaller than the {len(SPECIAL_TOKENS)} special tokens plus the "
            f"{len(alphabet)}-character alphabet of the corpus ({pieces_per_character} pieces per character for "
            f"{algorithm}); use at least {minimum}."
        )

    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    if algorithm == "wordpiece":
        backend = Tokenizer(
            models.WordPiece(
                _deterministic_wordpiece_vocab(corpus, normalizer, pre_tokenizer, alphabet, vocab_size, min_frequency),
                unk_token="[UNK]",
                continuing_subword_prefix=_SUBWORD_PREFIX,
                max_input_chars_per_word=100,
            )
        )
        backend.normalizer = normalizer
        backend.pre_tokenizer = pre_tokenizer
    else:
        backend = Tokenizer(models.BPE(unk_token="[UNK]", continuing_subword_prefix=_SUBWORD_PREFIX))
        backend.normalizer = normalizer
        backend.pre_tokenizer = pre_tokenizer
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=SPECIAL_TOKENS,
            continuing_subword_prefix=_SUBWORD_PREFIX,
            show_progress=False,
        )
        backend.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    vocab = backend.get_vocab()
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if vocab.get(token) != expected_id:
            raise RuntimeError(f"Special token {token} got id {vocab.get(token)}, expected {expected_id}.")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", CLS_TOKEN_ID), ("[SEP]", SEP_TOKEN_ID)],
    )
    backend.decoder = decoders.WordPiece(prefix=_SUBWORD_PREFIX)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
        padding_side="right",
        truncation_side="right",
        model_input_names=["input_ids", "attention_mask"],
    )
    logger.info(
        "Trained a %s report tokenizer: %d tokens from %d reports (alphabet %d).",
        algorithm,
        backend.get_vocab_size(),
        len(corpus),
        len(alphabet),
    )
    return tokenizer


def _deterministic_wordpiece_vocab(corpus, normalizer, pre_tokenizer, alphabet, vocab_size, min_frequency):
    """Specials, the alphabet (first and `##` continuation pieces), then whole words by (-count, word)."""
    counts = Counter()
    for text in corpus:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    tokens = list(SPECIAL_TOKENS)
    characters = sorted(alphabet)
    tokens += characters + [_SUBWORD_PREFIX + char for char in characters]
    known = set(tokens)
    for word, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if len(tokens) >= vocab_size or count < min_frequency:
            break
        if word not in known:
            tokens.append(word)
            known.add(word)
    return {token: index for index, token in enumerate(tokens)}


def build_report_tokenizer(
    dataset_dict: Any,
    vocab_size: int = 8000,
    text_column: str = "report",
    algorithm: str = "wordpiece",
    model_max_length: int = 256,
    min_frequency: int = 2,
) -> PreTrainedTokenizerFast:
    """Train the report tokenizer on the **train split only** of a `datasets.DatasetDict`.

    The original Q-DISTILL built its vocabulary from every split, so test reports leaked into it; here validation and
    test reports are never read.

    Args:
        dataset_dict (`datasets.DatasetDict`): must contain a `"train"` split with a string `text_column`.
        vocab_size (`int`, *optional*, defaults to 8000): see [`train_report_tokenizer`].
        text_column (`str`, *optional*, defaults to `"report"`): column holding the report text.
        algorithm (`str`, *optional*, defaults to `"wordpiece"`): `"wordpiece"` or `"bpe"`.
        model_max_length (`int`, *optional*, defaults to 256): truncation length.
        min_frequency (`int`, *optional*, defaults to 2): minimum sub-word frequency.

    Returns:
        `PreTrainedTokenizerFast`, as [`train_report_tokenizer`].

    Raises:
        ValueError: if there is no `"train"` split, the column is missing, or a report is not a string.
    """
    splits = list(dataset_dict.keys())
    if "train" not in splits:
        raise ValueError(
            f"The dataset has no 'train' split (splits: {splits}); the tokenizer is trained on train only."
        )
    train = dataset_dict["train"]
    if text_column not in train.column_names:
        raise ValueError(f"The 'train' split has no column {text_column!r} (columns: {train.column_names}).")
    reports = train[text_column]
    for row, report in enumerate(reports):
        if not isinstance(report, str):
            raise ValueError(
                f"Row {row} of the 'train' split has field {text_column!r} of type {type(report).__name__}, "
                "expected a string."
            )
    ignored = [split for split in splits if split != "train"]
    logger.info("Training the report tokenizer on %d train reports (splits ignored: %s).", len(reports), ignored)
    return train_report_tokenizer(
        reports,
        vocab_size=vocab_size,
        algorithm=algorithm,
        model_max_length=model_max_length,
        min_frequency=min_frequency,
        source=f"the 'train' split ({len(reports)} rows, column {text_column!r})",
    )


def read_reports_jsonl(path: str | os.PathLike, field: str = "report") -> list[str]:
    """Read the `field` string of every line of a JSON-lines report corpus.

    Args:
        path (`str` or `os.PathLike`): the `.jsonl` file.
        field (`str`, *optional*, defaults to `"report"`): the text field.

    Returns:
        `list[str]`, one report per non-blank line.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the path is a folder; the file is not UTF-8; a line is not a JSON object, lacks `field` or holds
            a non-string there; or the file has no report with a non-space character. Every message names the file
            (and the line).
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"Reports file {path} is a directory, expected a JSON-lines file.")
    if not path.is_file():
        raise FileNotFoundError(f"Reports file not found: {path}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ValueError(f"{path}, line {line}: not valid UTF-8 (byte {data[error.start]:#04x}).") from None
    reports = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {line_number}: not valid JSON ({error}).") from None
        if not isinstance(record, dict) or field not in record:
            raise ValueError(f"{path}, line {line_number}: no field {field!r}.")
        if not isinstance(record[field], str):
            raise ValueError(
                f"{path}, line {line_number}: field {field!r} is {type(record[field]).__name__}, expected a string."
            )
        reports.append(record[field])
    if not any(report.strip() for report in reports):
        raise ValueError(
            f"{path}: no report to train on ({len(reports)} lines with a {field!r} field, none with text); "
            "the file is empty or holds only blank reports."
        )
    return reports


__all__ = [
    "CLS_TOKEN_ID",
    "MASK_TOKEN_ID",
    "PAD_TOKEN_ID",
    "SEP_TOKEN_ID",
    "SPECIAL_TOKENS",
    "UNK_TOKEN_ID",
    "build_report_tokenizer",
    "read_reports_jsonl",
    "train_report_tokenizer",
]
