"""Pseudo-report generation: a Hugging Face image-text-to-text model (MedGemma-style) or offline retrieval.

Two generators share one output contract, ``{study_id: report_text}``:

* :class:`HFPseudoReportGenerator` -- ``AutoProcessor`` + ``AutoModelForImageTextToText`` with the chat
  template, batched greedy generation with left padding (the original called the model one image at a time).
* :class:`RetrievalPseudoReportGenerator` -- the offline default: the report of the most similar *training*
  film by cosine similarity of frozen-encoder image embeddings, never the film's own report.

:func:`quality_summary` flags suspicious outputs (empty, too short, repeated template, not a report, chatty
preamble) without editing them; the writers produce a ``datasets`` column and the original
``medgemma_reports/`` folder layout.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..utils import (
    atomic_write_text,
    load_pretrained,
    normalise_split,
    open_image_file,
    read_keyed_csv,
    resolve_data_path,
    resolve_device_dtype,
)

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "google/medgemma-4b-it"

DEFAULT_SYSTEM_PROMPT = (
    "You are a board-certified radiologist. Write the chest X-ray report directly, "
    "without greetings, explanations or any conversational framing."
)

DEFAULT_PROMPT = (
    "Review the chest radiograph below. First, silently work through an anatomy-guided scan in seven steps: "
    "(1) airway, (2) bones, (3) heart and mediastinum, (4) diaphragm and costophrenic angles, (5) lung zones, "
    "(6) pleura, (7) soft tissues, lines and devices. Do not write these steps out.\n"
    "Then output exactly two sections and nothing else:\n"
    "FINDINGS: a detailed, systematic description in precise radiological terminology.\n"
    "IMPRESSION: a short numbered summary. If the study is normal, state \"No acute cardiopulmonary process\"."
)

# Preambles of a chat model talking to the user instead of writing a report.
_CHATTY_RE = re.compile(
    r"^\s*(sure|certainly|of course|okay|ok\b|here is|here's|here are|as an ai|i am |i'm |i cannot|i can't|"
    r"i'd be happy|hello|hi\b)",
    re.IGNORECASE,
)
_REPORT_RE = re.compile(r"\b(findings?|impressions?)\s*:", re.IGNORECASE)


def normalize_report_text(text: str) -> str:
    """Lower-case and collapse whitespace; used for identity comparisons between report texts."""
    return " ".join(str(text).split()).lower()


# --------------------------------------------------------------------------------------------------------------
# Hugging Face image-text-to-text generator
# --------------------------------------------------------------------------------------------------------------
class HFPseudoReportGenerator:
    """Batched pseudo-report generation with an image-text-to-text chat model (MedGemma or any compatible one).

    Args:
        model_id_or_path: Hub id (default :data:`DEFAULT_MODEL_ID`) or a local folder with model + processor.
        prompt: user instruction placed before the image in the user turn.
        system_prompt: system turn; None or "" to omit it.
        max_new_tokens: generation budget per report.
        batch_size: images per ``generate`` call.
        dtype: torch dtype; default bfloat16 on CUDA, float32 on CPU.
        device: torch device; default CUDA when available, else CPU.
        generation_kwargs: extra ``generate`` kwargs (default greedy, ``do_sample=False``).
    """

    def __init__(
        self,
        model_id_or_path: str | os.PathLike = DEFAULT_MODEL_ID,
        prompt: str = DEFAULT_PROMPT,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        max_new_tokens: int = 512,
        batch_size: int = 8,
        dtype: Any = None,
        device: Any = None,
        generation_kwargs: dict | None = None,
    ):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device, self.dtype = resolve_device_dtype(device, dtype)
        self.prompt = prompt
        self.system_prompt = system_prompt
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.generation_kwargs = {"do_sample": False, **(generation_kwargs or {})}
        self.processor = load_pretrained(AutoProcessor, model_id_or_path, "model_id_or_path")
        # Decoder-only batched generation needs the prompts aligned on the right.
        self.processor.tokenizer.padding_side = "left"
        self.model = load_pretrained(AutoModelForImageTextToText, model_id_or_path, "model_id_or_path", dtype=self.dtype)
        self.model.to(self.device).eval()

    def build_conversation(self, image: Any) -> list[dict]:
        """Chat messages for one image: optional system turn, then the instruction and the image in one user turn.

        Args:
            image: a PIL image.
        """
        messages = []
        if self.system_prompt:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        messages.append({"role": "user", "content": [{"type": "text", "text": self.prompt},
                                                     {"type": "image", "image": image}]})
        return messages

    def generate(self, images: Sequence[Any]) -> list[str]:
        """Generate one report per film, in chunks of ``batch_size``.

        Args:
            images: PIL images (or arrays); each goes through
                :func:`~qdistill_hf.models.processing_qdistill.to_eight_bit_film` (transparency composited on black,
                16-bit scaled, too-small or non-finite films refused) and is then converted to RGB.

        Returns:
            The decoded new tokens of each image, special tokens skipped, whitespace stripped.
        """
        import torch

        from ..models.processing_qdistill import to_eight_bit_film

        films = [to_eight_bit_film(img, f"image {i}").convert("RGB") for i, img in enumerate(images)]
        reports: list[str] = []
        for start in range(0, len(films), self.batch_size):
            chunk = films[start:start + self.batch_size]
            inputs = self.processor.apply_chat_template(
                [self.build_conversation(img) for img in chunk], add_generation_prompt=True, tokenize=True,
                return_dict=True, return_tensors="pt", processor_kwargs={"padding": True},
            ).to(self.device, dtype=self.dtype)
            with torch.inference_mode():
                out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, **self.generation_kwargs)
            new_tokens = out[:, inputs["input_ids"].shape[1]:]
            reports.extend(t.strip() for t in self.processor.batch_decode(new_tokens, skip_special_tokens=True))
        return reports


# --------------------------------------------------------------------------------------------------------------
# Retrieval generator (offline default)
# --------------------------------------------------------------------------------------------------------------
def image_embeddings_from_features(image_features: Any, pooling: str = "mean_patch") -> Any:
    """One vector per film from cached frozen-encoder tokens.

    The default is the mean of the patch tokens (index 1 onwards, CLS excluded) of the raw
    ``last_hidden_state``: it summarises the whole film, whereas the pre-``post_layernorm`` CLS token of a
    CLIP ViT carries outlier channels that dominate cosine similarity.

    Args:
        image_features: float tensor/array of shape (B, T, H), token 0 being CLS.
        pooling: ``"mean_patch"`` (default) or ``"cls"``.

    Returns:
        A float32 ``torch.Tensor`` of shape (B, H).
    """
    import torch

    feats = torch.as_tensor(image_features).float()
    if feats.ndim != 3:
        raise ValueError(f"image_features must have shape (B, T, H), got {tuple(feats.shape)}")
    if pooling == "mean_patch":
        if feats.shape[1] < 2:
            raise ValueError("mean_patch pooling needs at least one patch token after CLS")
        return feats[:, 1:].mean(dim=1)
    if pooling == "cls":
        return feats[:, 0]
    raise ValueError(f"pooling must be 'mean_patch' or 'cls', got {pooling!r}")


class CLIPImageEmbedder:
    """Frozen ``CLIPVisionModel`` (e.g. a converted CheXzero folder) turning films into one vector each.

    Preprocessing is always a :class:`~qdistill_hf.models.processing_qdistill.QDistillImageProcessor` (aspect ratio
    kept, zero-padded to a square), so non-square films work and the retrieval embeddings see the same pixels as
    the teacher and student:

    * the folder's own ``preprocessor_config.json`` when it is a ``QDistillImageProcessor`` (what
      ``convert_chexzero.py`` writes: ``QDistillImageProcessor.chexzero_preset()``);
    * any other image-processor config (e.g. a ``CLIPImageProcessor`` from an older conversion, which does not pad):
      its rescale/normalisation settings in a ``QDistillImageProcessor`` at the model's image size (WARNING);
    * no config: ``QDistillImageProcessor.chexzero_preset()`` at the model's image size (WARNING).

    Args:
        vision_model_path: folder with a ``CLIPVisionModel`` checkpoint.
        batch_size: images per forward pass.
        pooling: see :func:`image_embeddings_from_features`.
        device: torch device; default CUDA when available.
        image_processor: explicit ``QDistillImageProcessor`` overriding the folder's.

    Raises:
        FileNotFoundError: the folder or its ``config.json`` does not exist (names the folder).
        ValueError: the folder's processor produces another size than the model expects.
    """

    def __init__(self, vision_model_path: str | os.PathLike, batch_size: int = 32, pooling: str = "mean_patch",
                 device: Any = None, image_processor: Any = None):
        from transformers import CLIPVisionModel

        path = Path(vision_model_path)
        if not path.is_dir():
            what = "is a file, not a folder" if path.exists() else "does not exist"
            raise FileNotFoundError(f"vision model folder {path} {what} (expected a CLIPVisionModel folder, e.g. "
                                    "one written by convert_chexzero.py)")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path / 'config.json'} not found (expected a CLIPVisionModel folder)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device, _ = resolve_device_dtype(device)
        self.model = load_pretrained(CLIPVisionModel, path, "vision model folder").to(self.device).eval()
        self.model.requires_grad_(False)
        size = int(self.model.config.image_size)
        self.processor = image_processor if image_processor is not None else embedder_image_processor(path, size)
        got = (self.processor.size["height"], self.processor.size["width"])
        if got != (size, size):
            raise ValueError(f"{path}: the image processor resizes to {got[0]}x{got[1]} but the model expects "
                             f"{size}x{size} (config.json image_size)")
        self.batch_size = batch_size
        self.pooling = pooling

    def __call__(self, images: Sequence[Any]) -> Any:
        """Embed films.

        Args:
            images: PIL images (or arrays), any aspect ratio.

        Returns:
            A (len(images), hidden_size) float32 CPU tensor of pooled ``last_hidden_state`` tokens.
        """
        import torch

        chunks = []
        for start in range(0, len(images), self.batch_size):
            batch = list(images[start:start + self.batch_size])
            pixels = self.processor(batch, return_tensors="pt")["pixel_values"].to(self.device)
            with torch.inference_mode():
                hidden = self.model(pixel_values=pixels).last_hidden_state
            chunks.append(image_embeddings_from_features(hidden.float().cpu(), self.pooling))
        if not chunks:
            return torch.zeros(0, self.model.config.hidden_size)
        return torch.cat(chunks)

    def embed_files(self, paths: Sequence[str | os.PathLike]) -> Any:
        """Embed image files, opening only ``batch_size`` of them at a time (a training split can be large).

        Args:
            paths: image files.

        Returns:
            A (len(paths), hidden_size) float32 CPU tensor.

        Raises:
            FileNotFoundError / PIL.UnidentifiedImageError / OSError / ValueError: a file is missing, not an image,
                truncated, too large or too small (names the file).
        """
        import torch

        chunks = [self([load_rgb_image(p) for p in paths[start:start + self.batch_size]])
                  for start in range(0, len(paths), self.batch_size)]
        return torch.cat(chunks) if chunks else torch.zeros(0, self.model.config.hidden_size)


def embedder_image_processor(folder: str | os.PathLike, image_size: int) -> Any:
    """The ``QDistillImageProcessor`` used to embed films for ``folder`` (see :class:`CLIPImageEmbedder`).

    Args:
        folder: the vision model folder.
        image_size: the model's input side (``config.image_size``).
    """
    from ..models.processing_qdistill import QDistillImageProcessor

    folder = Path(folder)
    config_file = folder / "preprocessor_config.json"
    size = {"height": image_size, "width": image_size}
    if not config_file.is_file():
        logger.warning("%s has no preprocessor_config.json; embedding with QDistillImageProcessor.chexzero_preset() "
                       "at %d px (pad to square)", folder, image_size)
        return QDistillImageProcessor.chexzero_preset(size=size)
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{config_file}: not a valid JSON image-processor config ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
    kind = config.get("image_processor_type")
    if kind == "QDistillImageProcessor":
        return QDistillImageProcessor.from_pretrained(str(folder))
    keep = {k: config[k] for k in ("do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std")
            if k in config}
    logger.warning("%s holds a %s config, which does not pad to square; embedding with QDistillImageProcessor at %d "
                   "px (pad to square) and its normalisation %s. Re-run convert_chexzero.py to save the processor.",
                   config_file, kind, image_size, keep)
    return QDistillImageProcessor(size=size, **keep)


def load_rgb_image(path: str | os.PathLike, min_side: int | None = None) -> Any:
    """Open an image file fully (so the file handle is closed) and return it as an 8-bit RGB PIL image.

    The film goes through :func:`~qdistill_hf.models.processing_qdistill.to_eight_bit_film`: 16-bit films are scaled
    (not saturated), transparent pixels are composited on black, films below the minimum size are refused.

    Args:
        path: image file.
        min_side: minimum short side in pixels (default
            :data:`~qdistill_hf.models.processing_qdistill.MIN_IMAGE_SIDE`).

    Raises:
        FileNotFoundError / IsADirectoryError: the path is missing or a folder.
        PIL.UnidentifiedImageError: the file is not an image (names the file).
        OSError: the file is truncated or corrupt (names the file).
        ValueError: the image is above PIL's decompression-bomb limit, too small, or of an unsupported mode (names the
            file).
    """
    from ..models.processing_qdistill import MIN_IMAGE_SIDE, to_eight_bit_film

    image = open_image_file(path)
    return to_eight_bit_film(image, f"image {path}", min_side=min_side or MIN_IMAGE_SIDE).convert("RGB")


class RetrievalPseudoReportGenerator:
    """Nearest-training-film report retrieval by cosine similarity of image embeddings.

    For each query film the candidates are the training films minus (a) the film itself (same study id) and
    (b) every training film whose normalised report text equals the query's own report, so the retrieved text
    is never the query's ground truth. With ``k > 1`` the most frequent normalised text among the k nearest
    valid neighbours wins; ties go to the text whose first occurrence is nearest.

    Args:
        train_embeddings: (N, H) float array/tensor.
        train_reports: N report texts.
        train_ids: N study ids (unique).
        k: neighbours to vote over.
        chunk_size: query rows per similarity matrix block (bounds memory to chunk_size x N).
    """

    def __init__(self, train_embeddings: Any, train_reports: Sequence[str], train_ids: Sequence[str],
                 k: int = 1, chunk_size: int = 1024):
        import torch

        emb = torch.as_tensor(train_embeddings).float()
        if emb.ndim != 2:
            raise ValueError(f"train_embeddings must be 2-D (N, H), got shape {tuple(emb.shape)}")
        if not (len(train_reports) == len(train_ids) == emb.shape[0]):
            raise ValueError(f"train_embeddings ({emb.shape[0]}), train_reports ({len(train_reports)}) and "
                             f"train_ids ({len(train_ids)}) must have the same length")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        bad_rows = (~torch.isfinite(emb)).any(dim=1).nonzero().flatten().tolist()
        if bad_rows:
            raise ValueError(f"train_embeddings of studies {[str(train_ids[r]) for r in bad_rows[:10]]} contain NaN "
                             "or inf values")
        self.train_ids = [str(s) for s in train_ids]
        if len(set(self.train_ids)) != len(self.train_ids):
            raise ValueError("train_ids must be unique")
        self.train_reports = list(train_reports)
        self.k = k
        self.chunk_size = chunk_size
        self._train = torch.nn.functional.normalize(emb, dim=1)
        norm = [normalize_report_text(r) for r in self.train_reports]
        self._codebook: dict[str, int] = {}
        self._train_codes = torch.tensor([self._codebook.setdefault(t, len(self._codebook)) for t in norm])
        self._train_norm = norm
        self._id_to_row = {s: i for i, s in enumerate(self.train_ids)}

    def retrieve(self, embeddings: Any, ids: Sequence[str],
                 own_reports: Sequence[str | None] | None = None) -> list[dict]:
        """Retrieve a report for each query film.

        Args:
            embeddings: (M, H) query embeddings.
            ids: M query study ids.
            own_reports: the queries' own report texts (None entries allowed); a query that is itself a
                training film falls back to its training report.

        Returns:
            One dict per query: ``report``, ``neighbour_id`` (the training film the text came from),
            ``similarity`` (its cosine similarity), ``votes`` (neighbours sharing the text).

        Raises:
            ValueError: shapes disagree, or a query has no admissible neighbour.
        """
        import torch

        q = torch.as_tensor(embeddings).float()
        if q.ndim != 2 or q.shape[1] != self._train.shape[1]:
            raise ValueError(f"embeddings must have shape (M, {self._train.shape[1]}), got {tuple(q.shape)}")
        ids = [str(s) for s in ids]
        if len(ids) != q.shape[0]:
            raise ValueError(f"got {q.shape[0]} embeddings but {len(ids)} ids")
        if own_reports is not None and len(own_reports) != len(ids):
            raise ValueError(f"got {len(ids)} ids but {len(own_reports)} own_reports")
        bad_rows = (~torch.isfinite(q)).any(dim=1).nonzero().flatten().tolist()
        if bad_rows:
            raise ValueError(f"embeddings of studies {[ids[r] for r in bad_rows[:10]]} contain NaN or inf values")
        q = torch.nn.functional.normalize(q, dim=1)
        n_train = self._train.shape[0]
        k = min(self.k, n_train)
        results: list[dict] = []
        for start in range(0, len(ids), self.chunk_size):
            qi = q[start:start + self.chunk_size]
            chunk_ids = ids[start:start + self.chunk_size]
            sims = qi @ self._train.T
            own_codes = torch.full((len(chunk_ids),), -1, dtype=torch.long)
            for r, sid in enumerate(chunk_ids):
                row = self._id_to_row.get(sid)
                if row is not None:
                    sims[r, row] = -math.inf
                own = own_reports[start + r] if own_reports is not None else None
                if own is None and row is not None:
                    own = self.train_reports[row]
                if own is not None:
                    own_codes[r] = self._codebook.get(normalize_report_text(own), -1)
            sims.masked_fill_(own_codes[:, None] == self._train_codes[None, :], -math.inf)
            top_sim, top_idx = sims.topk(k, dim=1)
            for r, sid in enumerate(chunk_ids):
                # -inf marks the excluded neighbours (the film itself, its own report text).
                valid = [(float(s), int(i)) for s, i in zip(top_sim[r], top_idx[r]) if float(s) != -math.inf]
                if not valid:
                    raise ValueError(f"study {sid}: no training film is admissible as a neighbour "
                                     "(all share its id or its report text)")
                counts = Counter(self._train_norm[i] for _, i in valid)
                best = max(counts.values())
                # valid is sorted by similarity, so the first text reaching the top count is the nearest.
                sim, idx = next((s, i) for s, i in valid if counts[self._train_norm[i]] == best)
                results.append({"report": self.train_reports[idx], "neighbour_id": self.train_ids[idx],
                                "similarity": sim, "votes": best})
        return results

    def generate(self, embeddings: Any, ids: Sequence[str],
                 own_reports: Sequence[str | None] | None = None) -> list[str]:
        """The retrieved report texts only; arguments as for :meth:`retrieve`."""
        return [r["report"] for r in self.retrieve(embeddings, ids, own_reports)]


# --------------------------------------------------------------------------------------------------------------
# Quality gate
# --------------------------------------------------------------------------------------------------------------
def quality_summary(outputs: Mapping[str, str], min_words: int = 8, repeat_fraction: float = 0.1,
                    repeat_min_count: int = 3) -> dict:
    """Flag suspicious pseudo-reports; nothing is edited or dropped.

    Flags per study:
        ``empty``: no non-whitespace text.
        ``too_short``: fewer than ``min_words`` whitespace-separated words (and not empty).
        ``non_report``: no ``FINDINGS:`` / ``IMPRESSION:``-style section header.
        ``chatty``: starts like a chat reply ("Sure, here is", "As an AI", ...).
        ``repeated_template``: the same normalised text is shared by at least
            ``max(repeat_min_count, ceil(repeat_fraction * n))`` studies (default: 3 studies and 10 %).
            Retrieval legitimately repeats common normal reports, so read this flag as "check the diversity",
            not as an error.

    Args:
        outputs: ``{study_id: report}``.
        min_words: minimum word count before ``too_short``.
        repeat_fraction: share of studies above which one identical text counts as a template.
        repeat_min_count: absolute minimum count for the template flag.

    Returns:
        ``{"n", "counts": {flag: n}, "n_flagged", "flagged": {study_id: [flags]}, "top_repeated":
        [[text, count], ...] (up to 5), "mean_words", "repeat_threshold"}``.
    """
    n = len(outputs)
    norm = {sid: normalize_report_text(t) for sid, t in outputs.items()}
    text_counts = Counter(norm.values())
    threshold = max(repeat_min_count, math.ceil(repeat_fraction * n))
    flags_by_id: dict[str, list[str]] = {}
    counts = dict.fromkeys(["empty", "too_short", "non_report", "chatty", "repeated_template"], 0)
    words_total = 0
    for sid, text in outputs.items():
        text = text or ""
        n_words = len(text.split())
        words_total += n_words
        flags = []
        if n_words == 0:
            flags.append("empty")
        else:
            if n_words < min_words:
                flags.append("too_short")
            if not _REPORT_RE.search(text):
                flags.append("non_report")
            if _CHATTY_RE.match(text):
                flags.append("chatty")
            if text_counts[norm[sid]] >= threshold:
                flags.append("repeated_template")
        for f in flags:
            counts[f] += 1
        if flags:
            flags_by_id[sid] = flags
    top = [[t, c] for t, c in text_counts.most_common(5) if c > 1]
    return {"n": n, "counts": counts, "n_flagged": len(flags_by_id), "flagged": flags_by_id,
            "top_repeated": top, "mean_words": (words_total / n) if n else 0.0, "repeat_threshold": threshold}


# --------------------------------------------------------------------------------------------------------------
# qdistill_folder metadata
# --------------------------------------------------------------------------------------------------------------
REQUIRED_METADATA_COLUMNS = ("study_id", "image_path", "report_path", "split")


def read_folder_metadata(data_dir: str | os.PathLike, splits: Sequence[str] | None = None,
                         limit: int | None = None, allow_external_paths: bool = False) -> list[dict]:
    """Rows of ``<data_dir>/metadata.csv`` (qdistill_folder layout) with ``image_file``/``report_file`` paths.

    The CSV is read by :func:`qdistill_hf.utils.read_keyed_csv` (the same reader as the dataset builder: UTF-8 with
    or without a byte-order mark, values stripped). ``image_path``/``report_path`` must stay inside ``data_dir``
    (see :func:`qdistill_hf.utils.resolve_data_path`); ``report_file`` is None when the row's ``report_path`` is
    empty (a film without a report). ``split`` values are checked and normalised as by the builder (``validate`` and
    ``val`` become ``validation``; anything else outside ``train``/``validation``/``test`` is an error).

    Args:
        data_dir: folder holding ``metadata.csv``; ``image_path``/``report_path`` are relative to it.
        splits: keep only these splits (None: all); aliases are accepted, unknown names are an error.
        limit: keep at most this many rows after the split filter (>= 0).
        allow_external_paths: accept absolute paths and paths leaving ``data_dir`` (explicit opt-in).

    Raises:
        FileNotFoundError: ``data_dir`` or metadata.csv is missing.
        ValueError: the CSV is empty or malformed, a required column is missing, a row has an empty/duplicate
            ``study_id`` or an empty ``image_path``, or a path leaves ``data_dir`` (every message names the file and
            line).
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        if data_dir.exists():
            raise NotADirectoryError(f"data folder {data_dir} is a file; expected the folder holding metadata.csv")
        raise FileNotFoundError(f"data folder not found: {data_dir} (no such directory)")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if isinstance(splits, str):
        splits = [splits]
    wanted = None if splits is None else {normalise_split(s, "splits argument") for s in splits}
    meta = data_dir / "metadata.csv"
    rows = []
    for sid, (line, row) in read_keyed_csv(meta, REQUIRED_METADATA_COLUMNS[1:]).items():
        where = f"{meta} line {line} (study_id {sid!r})"
        row["split"] = normalise_split(row["split"], where)
        if wanted is not None and row["split"] not in wanted:
            continue
        image = resolve_data_path(data_dir, row["image_path"], where, "image_path", allow_external_paths)
        report = (resolve_data_path(data_dir, row["report_path"], where, "report_path", allow_external_paths)
                  if row["report_path"] else None)
        rows.append({**row, "study_id": sid, "image_file": str(image),
                     "report_file": str(report) if report is not None else None})
    return rows[:limit] if limit is not None else rows


# --------------------------------------------------------------------------------------------------------------
# Writers / readers
# --------------------------------------------------------------------------------------------------------------
def reports_from_records(records: Sequence[Mapping[str, Any]], field: str = "pseudo_report",
                         source: str = "records") -> dict[str, str]:
    """``{study_id: text}`` from runner records (e.g. the merged JSONL).

    Args:
        records: dicts with ``study_id`` and ``field``.
        field: the text field.
        source: name of where the records came from, for error messages (e.g. the file path).

    Raises:
        ValueError: a record lacks a field or its text is not a string (names the source and record).
    """
    out = {}
    for i, rec in enumerate(records):
        for name in ("study_id", field):
            if name not in rec:
                raise ValueError(f"{source}: record {i} has no '{name}' field")
        if not isinstance(rec[field], str):
            raise ValueError(f"{source}: record {i} ({rec['study_id']}): '{field}' is "
                             f"{type(rec[field]).__name__}, not str")
        out[str(rec["study_id"])] = rec[field]
    return out


def add_pseudo_report_column(dataset: Any, reports: Mapping[str, str], id_column: str = "study_id",
                             column: str = "pseudo_report") -> Any:
    """Return ``dataset`` (a ``datasets.Dataset``) with a ``column`` of pseudo-reports looked up by study id.

    Args:
        dataset: the dataset; must have ``id_column``.
        reports: ``{study_id: report}``; every study of the dataset must be present.
        id_column: study-id column name.
        column: new column name.

    Raises:
        ValueError: the id column is missing, the column already exists, or studies have no pseudo-report
            (their ids are listed; nothing is filled in silently).
    """
    if id_column not in dataset.column_names:
        raise ValueError(f"dataset has no '{id_column}' column (columns: {dataset.column_names})")
    if column in dataset.column_names:
        raise ValueError(f"dataset already has a '{column}' column")
    ids = [str(s) for s in dataset[id_column]]
    missing = [s for s in ids if s not in reports]
    if missing:
        raise ValueError(f"{len(missing)} studies have no pseudo-report, e.g. {missing[:5]}")
    return dataset.add_column(column, [reports[s] for s in ids])


def write_medgemma_layout(out_dir: str | os.PathLike, reports: Mapping[str, str],
                          splits: Mapping[str, str]) -> Path:
    """Write the original ``medgemma_reports/`` layout.

    ``<out_dir>/<study_id>_medgemma_report.txt`` per study plus ``metadata.csv`` with columns
    ``study_id, medgemma_report_path, split`` (paths relative to ``out_dir``), rows in ``reports`` order.
    Every file is replaced atomically, so a kill at any point leaves each file old or new, never torn.

    Args:
        out_dir: destination folder (created).
        reports: ``{study_id: report}``.
        splits: ``{study_id: split}``; must cover every study in ``reports``.

    Returns:
        Path of ``metadata.csv``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    missing = [s for s in reports if s not in splits]
    if missing:
        raise ValueError(f"no split for {len(missing)} studies, e.g. {missing[:5]}")
    unsafe = [s for s in reports if not re.fullmatch(r"[\w.\-]+", s)]
    if unsafe:
        raise ValueError(f"study_id {unsafe[0]!r} is not a safe file name ({len(unsafe)} such ids)")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["study_id", "medgemma_report_path", "split"], lineterminator="\n")
    writer.writeheader()
    for sid, text in reports.items():
        rel = f"{sid}_medgemma_report.txt"
        atomic_write_text(out_dir / rel, text)
        writer.writerow({"study_id": sid, "medgemma_report_path": rel, "split": splits[sid]})
    return atomic_write_text(out_dir / "metadata.csv", buffer.getvalue())


def read_medgemma_layout(out_dir: str | os.PathLike) -> dict[str, str]:
    """Read ``{study_id: report}`` back from a folder written by :func:`write_medgemma_layout`.

    Args:
        out_dir: the ``medgemma_reports/`` folder.

    Raises:
        FileNotFoundError: ``metadata.csv`` or a listed report file is missing (names the row).
        ValueError: the index is malformed (empty, repeated or empty ``study_id``...), a path leaves ``out_dir`` or a
            report is not UTF-8 (names the file and row).
    """
    out_dir = Path(out_dir)
    meta = out_dir / "metadata.csv"
    reports = {}
    for sid, (line, row) in read_keyed_csv(meta, ("medgemma_report_path",)).items():
        where = f"{meta} line {line} (study_id {sid!r})"
        path = resolve_data_path(out_dir, row["medgemma_report_path"], where, "medgemma_report_path")
        if not path.is_file():
            raise FileNotFoundError(f"{where}: medgemma_report_path {str(path)!r} not found")
        try:
            reports[sid] = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{where}: {path} is not valid UTF-8 ({exc})") from None
    return reports


__all__ = [
    "DEFAULT_MODEL_ID",
    "DEFAULT_PROMPT",
    "DEFAULT_SYSTEM_PROMPT",
    "CLIPImageEmbedder",
    "HFPseudoReportGenerator",
    "RetrievalPseudoReportGenerator",
    "add_pseudo_report_column",
    "embedder_image_processor",
    "image_embeddings_from_features",
    "load_rgb_image",
    "normalize_report_text",
    "quality_summary",
    "read_folder_metadata",
    "read_medgemma_layout",
    "reports_from_records",
    "write_medgemma_layout",
]
