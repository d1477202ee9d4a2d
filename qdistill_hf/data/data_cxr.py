"""`datasets` builder for paired chest X-ray films and reports, with four configs.

The builder lives in the package because datasets 5 refuses loading scripts. Its name is ``data_cxr``
(datasets derives it from this module's file name); prepared Arrow files go to
``<cache_dir>/data_cxr/<config>-<hash>/<version>``.

Columns (the same core columns, in the same order, for every config)::

    study_id (string), image (Image), report (string), pseudo_report (string or None),
    label (ClassLabel(names=label_names)), split (string),
    source (string), view_position (string or None), findings (List(string)), mesh_major (List(string)),

followed by config-specific metadata (``qdistill_folder``: the extra CSV columns as strings; ``iu_xray``:
``image_id``, ``indication``; ``mimic_cxr``: ``subject_id``, ``dicom_id``). Splits are ``train``,
``validation`` and ``test``; a split with no rows is absent from the returned ``DatasetDict``.

Split values: ``train``, ``validation``, ``test``, and the aliases ``validate`` (MIMIC-CXR's spelling) and
``val`` for ``validation``; anything else is an error naming the row.

Configs:

- ``qdistill_folder``: the original Q-DISTILL layout (``metadata.csv``, ``images/``, ``reports/``, optional
  ``medgemma_reports/`` and ``priority_scores/priority_metadata.csv``). Paths are relative to ``data_dir``.
- ``iu_xray``: Indiana University / Open-i (``NLMCXR_png/`` + ``NLMCXR_reports.tgz`` or ``ecgen-radiology/``).
- ``mimic_cxr``: MIMIC-CXR-JPG files and CSVs plus MIMIC-CXR report text files, one frontal film per study.
- ``synthetic``: procedurally drawn films from :mod:`qdistill_hf.data.synthetic_cxr`; needs no ``data_dir``.

Everything is validated in ``_split_generators`` (before any Arrow is written) so errors surface as plain
``ValueError``/``FileNotFoundError`` naming the file and the row, not as datasets' wrapped generation error.

Images of the folder-based configs are stored as paths (datasets keeps only the path for local files);
``save_to_disk`` embeds the bytes. Synthetic films are stored as PNG bytes.

CSV indexes are read by :func:`qdistill_hf.utils.read_csv_rows` (the one CSV reader of the package: UTF-8, a
byte-order mark accepted, empty files, repeated header names and ragged rows refused); line numbers in errors are the
line where the row starts. Report text files must be UTF-8: undecodable bytes are an error, never replaced.

Paths read from data files (``image_path``, ``report_path``, ``medgemma_report_path``, IU ``parentImage`` ids, MIMIC
subject/study/dicom ids) must stay inside ``data_dir`` (the MIMIC reports inside ``mimic_reports_dir``): ``..``,
absolute paths and symlinks resolving outside are refused naming the row, unless ``allow_external_paths=True``.

Films are checked at prepare time (``verify_images=True``, the default): the file must be an image PIL can open,
below PIL's decompression-bomb limit, at least ``MIN_IMAGE_SIDE`` (16) pixels on its short side, pass PIL's
``verify()`` (PNG checksums) and, for JPEG, end with the end-of-image marker (a truncated JPEG does not).

Cache: the config id includes ``data_dir`` and the size/mtime of every index file the config reads, at its
configured path (``metadata_file``, the pseudo-report index, ``priority_file``, ``projections_csv``, the MIMIC CSVs,
the IU archive or each IU XML file), so editing any of them triggers a rebuild. :func:`load_cxr_dataset` also records
the size and mtime of every film, report and pseudo-report file a prepared dataset was built from
(``qdistill_source_files.json`` next to the Arrow files) and, on every later load, re-prepares the dataset when any
of them changed or disappeared (logging the first changed file), so an edited report is never served stale and a
film truncated after preparation is reported by the re-preparation, naming the row and the file. A file changed
*while* a loaded dataset is in use is not detected.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tarfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import datasets
from PIL import Image as PILImage

from ..labels.policy import LABEL_NAMES, urgent_from_mesh
from ..models.processing_qdistill import MIN_IMAGE_SIDE
from ..utils import (
    SPLIT_ALIASES,
    SPLITS,
    atomic_write_text,
    normalise_split,
    open_image_file,
    read_csv_rows,
    read_keyed_csv,
    read_text_file,
    resolve_data_path,
)
from . import synthetic_cxr

logger = logging.getLogger(__name__)

CONFIG_NAMES = ("qdistill_folder", "iu_xray", "mimic_cxr", "synthetic")
CORE_COLUMNS = ("study_id", "image", "report", "pseudo_report", "label", "split")


_QDISTILL_KNOWN_COLUMNS = ("study_id", "image_path", "report_path", "split", "priority_label")
_RESERVED = set(CORE_COLUMNS) | {"source", "view_position", "findings", "mesh_major"}
_MIMIC_SPLIT_CSVS = ("mimic-cxr-2.0.0-split.csv.gz", "mimic-cxr-2.0.0-split.csv")
_MIMIC_METADATA_CSVS = ("mimic-cxr-2.0.0-metadata.csv.gz", "mimic-cxr-2.0.0-metadata.csv")


@dataclass
class CxrBuilderConfig(datasets.BuilderConfig):
    """Options of the CXR builder. Options of other configs are ignored.

    Shared:
        label_names: class names of ``label`` (ClassLabel), index = class id.
        verify_images: open every image with PIL at prepare time: decompression-bomb limit, minimum size
            (``MIN_IMAGE_SIDE`` pixels on the short side), ``verify()`` and the JPEG end-of-image marker.
        allow_external_paths: accept absolute paths and paths leaving ``data_dir`` in the data files (explicit
            opt-in; refused by default, naming the row).

    ``qdistill_folder``:
        metadata_file: main index CSV, relative to ``data_dir``.
        pseudo_report_dir: folder of the pseudo-report index ``metadata.csv`` (``study_id, medgemma_report_path``,
            paths relative to this folder), relative to ``data_dir``; absent folder = no pseudo-reports.
        priority_file: optional ``study_id, priority_label`` CSV; where present its labels override/provide
            ``priority_label`` (a study missing from it falls back to ``metadata.csv``'s own label).
        require_pseudo_report: when True the pseudo-report index must exist and ``missing_pseudo_report`` decides
            what happens to studies without one; when False such studies get ``pseudo_report=None``.
        missing_pseudo_report: "error" (raise, naming the study), "drop" (remove them, WARNING with the count)
            or "allow" (keep with None, WARNING with the count).

    ``iu_xray``:
        images_subdir: folder of ``<image id>.png``; None = ``NLMCXR_png`` if present, else ``images``.
        reports_source: ``.tgz`` archive or folder of XML reports; None = ``NLMCXR_reports.tgz`` if present, else
            ``ecgen-radiology``.
        frontal_rule: how to pick one frontal film per report (Open-i has no view field, so this is a heuristic):
            "lowest_suffix" (default: among the report's ``parentImage`` ids whose PNG exists, the one with the
            smallest trailing number, e.g. ``-1001`` before ``-2001``/``-3001``/``-4001``; in IU the frontal film
            is usually acquired first) or "first" (the first listed ``parentImage`` whose PNG exists).
        projections_csv: optional CSV (e.g. the common ``indiana_projections.csv``: ``filename, projection``)
            that overrides the heuristic: the first image (by ``frontal_rule`` order) whose projection is
            "Frontal" is taken; a study with no frontal image listed is incomplete.
        split_fractions: (train, validation, test) fractions of the deterministic hash split by study id.
        split_seed: string mixed into the split hash (change it to draw another split).
        incomplete_studies: "error" or "drop" (WARNING with the count) for studies with no usable image or an
            empty findings+impression.

    ``mimic_cxr``:
        mimic_reports_dir: root holding ``files/pXX/pYYYYYYY/sZZZZZZZ.txt``; None = ``data_dir``.
        view_preference: ViewPosition values in order of preference (PA before AP); other views are never used.
        label_source: "auto" (``priority_file`` under data_dir if present, else rules), "rules"
            (``qdistill_hf.labels.priority_rules.score_report(report).urgent``) or "priority_csv".
        incomplete_studies: as for ``iu_xray`` (no frontal film, missing report file, empty report).

    ``synthetic``:
        num_train, num_validation, num_test: number of films per split.
        image_size: side of the square grayscale films.
        seed: dataset seed; same seed, same bytes.
    """

    label_names: tuple = LABEL_NAMES
    verify_images: bool = True
    allow_external_paths: bool = False
    # qdistill_folder
    metadata_file: str = "metadata.csv"
    pseudo_report_dir: str = "medgemma_reports"
    priority_file: str = "priority_scores/priority_metadata.csv"
    require_pseudo_report: bool = False
    missing_pseudo_report: str = "error"
    # iu_xray
    images_subdir: str | None = None
    reports_source: str | None = None
    frontal_rule: str = "lowest_suffix"
    projections_csv: str | None = None
    split_fractions: tuple = (0.8, 0.1, 0.1)
    split_seed: str = "qdistill-iu"
    incomplete_studies: str = "error"
    # mimic_cxr
    mimic_reports_dir: str | None = None
    view_preference: tuple = ("PA", "AP")
    label_source: str = "auto"
    # synthetic
    num_train: int = 200
    num_validation: int = 50
    num_test: int = 50
    image_size: int = 224
    seed: int = 0

    def create_config_id(self, config_kwargs: dict, custom_features=None) -> str:
        """Config id for the cache folder: the datasets default plus a fingerprint of the index files."""
        if self.data_dir:
            config_kwargs = {**config_kwargs, "_index_fingerprint": self.index_fingerprint()}
        return super().create_config_id(config_kwargs, custom_features)

    def iu_reports_source(self, data_dir: Path) -> Path:
        """The IU report archive or XML folder this config reads (see ``reports_source``)."""
        default = "NLMCXR_reports.tgz" if (data_dir / "NLMCXR_reports.tgz").is_file() else "ecgen-radiology"
        return data_dir / (self.reports_source or default)

    def index_fingerprint(self) -> str:
        """Hash of the size and mtime of every index file this config reads (CSVs, IU report XML/archive).

        Uses the configured paths (``metadata_file``, ``priority_file``, ...), so an edit to any of them changes
        the config id and forces a rebuild instead of serving stale Arrow files.
        """
        data_dir = Path(self.data_dir)
        names = [
            self.metadata_file,
            f"{self.pseudo_report_dir}/metadata.csv",
            self.priority_file,
            *_MIMIC_SPLIT_CSVS,
            *_MIMIC_METADATA_CSVS,
        ]
        if self.projections_csv:
            names.append(self.projections_csv)
        paths = [data_dir / name for name in names]
        if self.name == "iu_xray":
            source = self.iu_reports_source(data_dir)
            paths.extend(sorted(source.rglob("*.xml")) if source.is_dir() else [source])
        parts = []
        for path in paths:
            if path.is_file():
                st = path.stat()
                parts.append(f"{path}:{st.st_size}:{st.st_mtime_ns}")
        return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]

    def validate_options(self) -> None:
        """Raise ValueError for option values outside their allowed set."""
        choices = {
            "missing_pseudo_report": ("error", "drop", "allow"),
            "frontal_rule": ("lowest_suffix", "first"),
            "incomplete_studies": ("error", "drop"),
            "label_source": ("auto", "rules", "priority_csv"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"config option {key}={getattr(self, key)!r} must be one of {allowed}")
        names = tuple(self.label_names)
        if len(names) < 2 or len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"label_names must be >= 2 distinct non-empty strings, got {self.label_names!r}")
        fr = tuple(float(f) for f in self.split_fractions)
        if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
            raise ValueError(f"split_fractions must be 3 non-negative numbers summing to 1, got {self.split_fractions!r}")
        for key in ("num_train", "num_validation", "num_test"):
            if int(getattr(self, key)) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if int(self.image_size) < 32:
            raise ValueError(f"image_size must be >= 32, got {self.image_size}")


# ----------------------------------------------------------------------------------------------- helpers


def _csv_header(path: Path) -> list[str]:
    """Column names of a CSV (see :func:`qdistill_hf.utils.read_csv_rows`)."""
    return read_csv_rows(path, require_rows=False)[0]


def _read_csv(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict]]:
    """Rows of a CSV as ``(line where the row starts, row)`` (see :func:`qdistill_hf.utils.read_csv_rows`)."""
    return read_csv_rows(path, required)[1]


def _read_keyed_csv(path: Path, required: tuple[str, ...], key: str = "study_id") -> dict[str, tuple[int, dict]]:
    """Rows by ``key`` (see :func:`qdistill_hf.utils.read_keyed_csv`)."""
    return read_keyed_csv(path, required, key=key)


def _warn_unknown(ids, known, path: Path) -> None:
    """Log, rather than silently ignore, study ids of a side file that the main index lacks."""
    unknown = [i for i in ids if i not in known]
    if unknown:
        logger.warning("%s: %d study ids are not in the main index and are ignored; first %r", path, len(unknown), unknown[0])


_normalise_split = normalise_split


def _parse_label(value, label_names: tuple[str, ...], where: str) -> int:
    """A class id from an int-like string or a class name; anything else (e.g. -1) is an error."""
    text = "" if value is None else str(value).strip()
    if text in label_names:
        return label_names.index(text)
    try:
        as_float = float(text)
    except ValueError:
        raise ValueError(f"{where}: label {text!r} is neither a class id nor a name in {list(label_names)}") from None
    if not as_float.is_integer() or not 0 <= int(as_float) < len(label_names):
        raise ValueError(f"{where}: label {text!r} is outside the class set 0..{len(label_names) - 1} {list(label_names)}")
    return int(as_float)


def _check_image(path: Path, where: str, verify: bool) -> None:
    """Existence and (``verify``) header, size, checksum and JPEG-end checks of one film; errors name row and file."""
    if path.is_dir():
        raise ValueError(f"{where}: image path is a directory, not an image file: {path}")
    if not path.is_file():
        raise FileNotFoundError(f"{where}: image file not found: {path}")
    if not verify:
        return
    try:
        with open_image_file(path, load=False) as im:
            width, height = im.size
            fmt = im.format
            im.verify()
    except Exception as exc:  # PIL raises several unrelated types for broken files
        raise ValueError(f"{where}: image file is not a decodable image: {path} ({exc})") from exc
    if min(width, height) < MIN_IMAGE_SIDE:
        raise ValueError(
            f"{where}: image {path} is {width}x{height} pixels; films need at least {MIN_IMAGE_SIDE} pixels on the "
            "short side"
        )
    if fmt in ("JPEG", "MPO"):
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - 4096))
            if b"\xff\xd9" not in fh.read():
                raise ValueError(f"{where}: JPEG image {path} has no end-of-image marker: the file is truncated")


def _read_text(path: Path, where: str, what: str, allow_empty: bool = False) -> str:
    """Stripped UTF-8 text of a report file (see :func:`qdistill_hf.utils.read_text_file`)."""
    return read_text_file(path, where, what, allow_empty)


def _apply_incomplete(problems: list[str], policy: str, what: str) -> None:
    if not problems:
        return
    if policy == "error":
        raise ValueError(f"{len(problems)} incomplete {what}; first: {problems[0]} (set incomplete_studies='drop' to skip them)")
    logger.warning("dropped %d incomplete %s (incomplete_studies='drop'); first: %s", len(problems), what, problems[0])


def iu_frontal_order(image_ids: list[str], rule: str) -> list[str]:
    """Order IU image ids by preference as frontal film under ``rule`` ("lowest_suffix" or "first").

    Args:
        image_ids: parentImage ids in the order listed in the report XML.
        rule: see ``CxrBuilderConfig.frontal_rule``.
    """
    if rule == "first":
        return list(image_ids)

    def suffix(i_and_id):
        i, image_id = i_and_id
        m = re.search(r"-(\d+)$", image_id)
        return (int(m.group(1)) if m else float("inf"), i)

    return [image_id for _, image_id in sorted(enumerate(image_ids), key=suffix)]


def hash_split(study_id: str, fractions: tuple, salt: str) -> str:
    """Deterministic split of a study id: sha256(salt/study_id) mapped to [0,1) and cut at the fractions.

    Args:
        study_id: the study identifier.
        fractions: (train, validation, test) fractions summing to 1.
        salt: string mixed into the hash.
    """
    u = int(hashlib.sha256(f"{salt}/{study_id}".encode()).hexdigest()[:15], 16) / 16**15
    train, val, _ = (float(f) for f in fractions)
    if u < train:
        return "train"
    return "validation" if u < train + val else "test"


_SECTION_RE = re.compile(r"^[ \t]*([A-Z][A-Z &/()-]{2,40}):", re.MULTILINE)


def mimic_sections(text: str) -> dict[str, str]:
    """Split MIMIC-CXR free text into ``{HEADER: body}`` by upper-case ``HEADER:`` at line start.

    Args:
        text: the raw report.
    """
    matches = list(_SECTION_RE.finditer(text))
    sections: dict[str, str] = {}
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        body = " ".join(text[m.end() : end].split())
        if body:
            sections[m.group(1).strip()] = body
    return sections


def mimic_report_text(text: str) -> str:
    """Report used for MIMIC-CXR: "FINDINGS: … IMPRESSION: …" from the free text.

    Uses whichever of FINDINGS and IMPRESSION exist. Fallback when neither exists: the last non-empty
    section (MIMIC puts the conclusion last, e.g. "CONCLUSION:"), else the whole text with whitespace
    normalised (the "FINAL REPORT" banner removed). Returns "" for an empty report.

    Args:
        text: the raw report.
    """
    sections = mimic_sections(text)
    parts = [f"{name}: {sections[name]}" for name in ("FINDINGS", "IMPRESSION") if name in sections]
    if parts:
        return "\n".join(parts)
    if sections:
        return list(sections.values())[-1]
    return " ".join(text.replace("FINAL REPORT", " ").split())


# ----------------------------------------------------------------------------------------------- builder


class DataCxr(datasets.GeneratorBasedBuilder):
    """Paired chest X-ray film + report builder (configs ``qdistill_folder``, ``iu_xray``, ``mimic_cxr``, ``synthetic``)."""

    VERSION = datasets.Version("1.0.0")
    BUILDER_CONFIG_CLASS = CxrBuilderConfig
    BUILDER_CONFIGS = [
        CxrBuilderConfig(name="qdistill_folder", version=VERSION, description="Original Q-DISTILL folder layout."),
        CxrBuilderConfig(name="iu_xray", version=VERSION, description="Indiana University / Open-i chest X-rays."),
        CxrBuilderConfig(name="mimic_cxr", version=VERSION, description="MIMIC-CXR-JPG with MIMIC-CXR reports."),
        CxrBuilderConfig(name="synthetic", version=VERSION, description="Procedurally drawn synthetic films."),
    ]
    DEFAULT_CONFIG_NAME = "synthetic"

    # -- schema

    def _extra_columns(self) -> list[str]:
        name = self.config.name
        if name == "iu_xray":
            return ["image_id", "indication"]
        if name == "mimic_cxr":
            return ["subject_id", "dicom_id"]
        if name == "qdistill_folder" and self.config.data_dir:
            path = Path(self.config.data_dir) / self.config.metadata_file
            if path.is_file():
                return [_extra_name(c) for c in _csv_header(path) if c not in _QDISTILL_KNOWN_COLUMNS]
        return []

    def _info(self) -> datasets.DatasetInfo:
        self.config.validate_options()
        features = {
            "study_id": datasets.Value("string"),
            "image": datasets.Image(),
            "report": datasets.Value("string"),
            "pseudo_report": datasets.Value("string"),
            "label": datasets.ClassLabel(names=list(self.config.label_names)),
            "split": datasets.Value("string"),
            "source": datasets.Value("string"),
            "view_position": datasets.Value("string"),
            "findings": datasets.List(datasets.Value("string")),
            "mesh_major": datasets.List(datasets.Value("string")),
        }
        for col in self._extra_columns():
            features[col] = datasets.Value("string")
        return datasets.DatasetInfo(description=__doc__.split("\n")[0], features=datasets.Features(features))

    # -- splits

    def _split_generators(self, dl_manager):
        name = self.config.name
        if name == "synthetic":
            examples = None
        else:
            if not self.config.data_dir:
                raise ValueError(f"config {name!r} needs data_dir")
            data_dir = Path(self.config.data_dir)
            if not data_dir.is_dir():
                raise FileNotFoundError(f"data_dir does not exist or is not a directory: {data_dir}")
            loader = {"qdistill_folder": self._qdistill_examples, "iu_xray": self._iu_examples, "mimic_cxr": self._mimic_examples}[name]
            self._source_files: list[Path] = []
            examples = loader(data_dir)
            # Files of the studies kept; load_cxr_dataset records their size/mtime to detect later edits.
            self.prepared_source_files = sorted({str(p) for p in self._source_files})
            by_split = {s: [e for e in examples if e["split"] == s] for s in SPLITS}
            counts = {s: len(v) for s, v in by_split.items()}
            logger.info("%s: %s", name, counts)
        generators = []
        for split in SPLITS:
            if examples is None:
                n = int(getattr(self.config, {"train": "num_train", "validation": "num_validation", "test": "num_test"}[split]))
                if n == 0:
                    continue
                generators.append(datasets.SplitGenerator(name=split, gen_kwargs={"examples": None, "split": split, "n": n}))
            elif by_split[split]:
                generators.append(datasets.SplitGenerator(name=split, gen_kwargs={"examples": by_split[split], "split": split, "n": 0}))
        if not generators:
            raise ValueError(f"config {name!r}: no examples in any split")
        return generators

    def _generate_examples(self, examples, split, n):
        if examples is None:
            for i in range(n):
                case = synthetic_cxr.generate_case(int(self.config.seed), split, i, int(self.config.image_size))
                yield case["study_id"], {
                    "study_id": case["study_id"],
                    "image": {"bytes": synthetic_cxr.png_bytes(case["image"]), "path": None},
                    "report": case["report"],
                    "pseudo_report": None,
                    "label": case["label"],
                    "split": split,
                    "source": "synthetic",
                    "view_position": "PA",
                    "findings": list(case["findings"]),
                    "mesh_major": [],
                }
            return
        for ex in examples:
            yield ex["study_id"], ex

    # -- qdistill_folder

    def _qdistill_examples(self, data_dir: Path) -> list[dict]:
        cfg = self.config
        label_names = tuple(cfg.label_names)
        meta_path = data_dir / cfg.metadata_file
        priority_path = data_dir / cfg.priority_file
        has_priority = priority_path.is_file()
        required = ("image_path", "report_path", "split") + (() if has_priority else ("priority_label",))
        rows = _read_keyed_csv(meta_path, required)

        priority: dict[str, int] = {}
        if has_priority:
            for sid, (line, row) in _read_keyed_csv(priority_path, ("priority_label",)).items():
                where = f"{priority_path} line {line} (study_id {sid!r})"
                priority[sid] = _parse_label(row["priority_label"], label_names, where)
            _warn_unknown(priority, rows, priority_path)
            logger.info("labels from %s override metadata.csv for %d studies", priority_path, len(priority))

        pseudo_dir = data_dir / cfg.pseudo_report_dir
        pseudo_index = pseudo_dir / "metadata.csv"
        pseudo: dict[str, str] = {}
        if pseudo_index.is_file():
            for sid, (line, row) in _read_keyed_csv(pseudo_index, ("medgemma_report_path",)).items():
                where = f"{pseudo_index} line {line} (study_id {sid!r})"
                path = resolve_data_path(data_dir, row["medgemma_report_path"], where, "medgemma_report_path",
                                         cfg.allow_external_paths, base=pseudo_dir)
                pseudo[sid] = _read_text(path, where, "pseudo-report")
                self._source_files.append(path)
            _warn_unknown(pseudo, rows, pseudo_index)
        elif cfg.require_pseudo_report:
            raise FileNotFoundError(f"require_pseudo_report=True but the pseudo-report index is missing: {pseudo_index}")

        extra = [c for c in _csv_header(meta_path) if c not in _QDISTILL_KNOWN_COLUMNS]
        examples, missing_pseudo = [], []
        for sid, (line, row) in rows.items():
            where = f"{meta_path} line {line} (study_id {sid!r})"
            split = _normalise_split(row["split"], where)
            if sid in priority:
                label = priority[sid]
            elif row.get("priority_label"):
                label = _parse_label(row["priority_label"], label_names, where)
            else:
                raise ValueError(f"{where}: no label (empty priority_label and not in {priority_path})")
            image_path = resolve_data_path(data_dir, row["image_path"], where, "image_path", cfg.allow_external_paths)
            _check_image(image_path, where, cfg.verify_images)
            report_path = resolve_data_path(data_dir, row["report_path"], where, "report_path", cfg.allow_external_paths)
            report = _read_text(report_path, where, "report")
            self._source_files.extend([image_path, report_path])
            if sid not in pseudo:
                missing_pseudo.append(sid)
            ex = {
                "study_id": sid,
                "image": str(image_path),
                "report": report,
                "pseudo_report": pseudo.get(sid),
                "label": label,
                "split": split,
                "source": "qdistill_folder",
                "view_position": None,
                "findings": [],
                "mesh_major": [],
            }
            for col in extra:
                ex[_extra_name(col)] = row[col] or None
            examples.append(ex)

        if missing_pseudo and (pseudo_index.is_file() or cfg.require_pseudo_report):
            policy = cfg.missing_pseudo_report if cfg.require_pseudo_report else "allow"
            if policy == "error":
                raise ValueError(
                    f"{len(missing_pseudo)} studies of {meta_path} have no pseudo-report in {pseudo_index}; "
                    f"first study_id {missing_pseudo[0]!r} (missing_pseudo_report='error')"
                )
            if policy == "drop":
                drop = set(missing_pseudo)
                examples = [e for e in examples if e["study_id"] not in drop]
                logger.warning("dropped %d studies without a pseudo-report (missing_pseudo_report='drop'); first %r", len(drop), missing_pseudo[0])
            else:
                logger.warning("%d studies have no pseudo-report (pseudo_report=None); first %r", len(missing_pseudo), missing_pseudo[0])
        return examples

    # -- iu_xray

    def _iu_examples(self, data_dir: Path) -> list[dict]:
        cfg = self.config
        label_names = tuple(cfg.label_names)
        if len(label_names) != 2:
            raise ValueError(f"iu_xray labels are binary (non-urgent/urgent); got label_names={label_names!r}")
        images_dir = data_dir / (cfg.images_subdir or ("NLMCXR_png" if (data_dir / "NLMCXR_png").is_dir() else "images"))
        if not images_dir.is_dir():
            raise FileNotFoundError(f"IU image folder not found: {images_dir}")
        source = cfg.iu_reports_source(data_dir)
        projections = self._iu_projections(data_dir) if cfg.projections_csv else None

        examples, problems, seen = [], [], {}
        for xml_name, xml_bytes in _iu_xml_documents(source):
            where = f"{source}::{xml_name}"
            try:
                root = ET.fromstring(xml_bytes)
            except ET.ParseError as exc:
                raise ValueError(f"{where}: not well-formed XML ({exc})") from exc
            uid = root.find("uId")
            sid = uid.get("id") if uid is not None and uid.get("id") else Path(xml_name).stem
            where = f"{where} (study_id {sid!r})"
            if sid in seen:
                raise ValueError(f"{where}: duplicate study_id, first seen in {seen[sid]}")
            seen[sid] = xml_name
            sections = {}
            for node in root.iter("AbstractText"):
                sections[(node.get("Label") or "").upper()] = " ".join("".join(node.itertext()).split())
            parts = [f"{k}: {sections[k]}" for k in ("FINDINGS", "IMPRESSION") if sections.get(k)]
            mesh = [" ".join((m.text or "").split()) for m in root.iter("major") if (m.text or "").strip()]
            image_ids = [p.get("id") for p in root.iter("parentImage") if p.get("id")]
            image_files = {
                i: resolve_data_path(data_dir, f"{i}.png", where, "parentImage id", cfg.allow_external_paths,
                                     base=images_dir)
                for i in image_ids
            }
            candidates = [i for i in iu_frontal_order(image_ids, cfg.frontal_rule) if image_files[i].is_file()]
            if projections is not None:
                candidates = [i for i in candidates if projections.get(i) == "frontal"]
            if not parts:
                problems.append(f"{where}: empty FINDINGS and IMPRESSION")
                continue
            if not candidates:
                problems.append(f"{where}: no usable frontal image among {image_ids} in {images_dir}")
                continue
            image_path = image_files[candidates[0]]
            _check_image(image_path, where, cfg.verify_images)
            self._source_files.append(image_path)
            examples.append(
                {
                    "study_id": sid,
                    "image": str(image_path),
                    "report": "\n".join(parts),
                    "pseudo_report": None,
                    "label": urgent_from_mesh(mesh),
                    "split": hash_split(sid, cfg.split_fractions, cfg.split_seed),
                    "source": "iu_xray",
                    "view_position": "frontal" if projections is not None else None,
                    "findings": [],
                    "mesh_major": mesh,
                    "image_id": candidates[0],
                    "indication": sections.get("INDICATION") or None,
                }
            )
        if not seen:
            raise FileNotFoundError(f"no IU report XML files found in {source}")
        _apply_incomplete(problems, cfg.incomplete_studies, "IU studies")
        return examples

    def _iu_projections(self, data_dir: Path) -> dict[str, str]:
        path = Path(self.config.projections_csv)
        path = path if path.is_absolute() else data_dir / path
        out = {}
        for line, row in _read_csv(path, ("filename", "projection")):
            image_id = re.sub(r"\.dcm$", "", re.sub(r"\.(png|jpg)$", "", row["filename"]))
            out[image_id] = row["projection"].strip().lower()
        return out

    # -- mimic_cxr

    def _mimic_examples(self, data_dir: Path) -> list[dict]:
        cfg = self.config
        label_names = tuple(cfg.label_names)
        split_path = _first_existing(data_dir, _MIMIC_SPLIT_CSVS)
        meta_path = _first_existing(data_dir, _MIMIC_METADATA_CSVS)
        views = {dicom: row["ViewPosition"] for dicom, (_, row) in _read_keyed_csv(meta_path, ("ViewPosition",), key="dicom_id").items()}
        studies: dict[str, dict] = {}
        for line, row in _read_csv(split_path, ("dicom_id", "study_id", "subject_id", "split")):
            where = f"{split_path} line {line} (study_id {row['study_id']!r})"
            split = _normalise_split(row["split"], where)
            if row["dicom_id"] not in views:
                raise ValueError(f"{where}: dicom_id {row['dicom_id']!r} is not in {meta_path}")
            st = studies.setdefault(row["study_id"], {"subject_id": row["subject_id"], "split": split, "dicoms": [], "line": line})
            if st["split"] != split or st["subject_id"] != row["subject_id"]:
                raise ValueError(f"{where}: study has rows with different split/subject_id (first on line {st['line']})")
            st["dicoms"].append(row["dicom_id"])

        label_source = cfg.label_source
        priority_path = data_dir / cfg.priority_file
        if label_source == "auto":
            label_source = "priority_csv" if priority_path.is_file() else "rules"
        priority: dict[str, int] = {}
        if label_source == "priority_csv":
            for sid, (line, row) in _read_keyed_csv(priority_path, ("priority_label",)).items():
                where = f"{priority_path} line {line} (study_id {sid!r})"
                priority[sid] = _parse_label(row["priority_label"], label_names, where)
            _warn_unknown(priority, studies, priority_path)
        else:
            if len(label_names) != 2:
                raise ValueError(f"label_source='rules' gives binary labels; got label_names={label_names!r}")
            from ..labels.priority_rules import score_report
        logger.info("mimic_cxr labels from %s", label_source if label_source == "rules" else priority_path)

        reports_root = Path(cfg.mimic_reports_dir) if cfg.mimic_reports_dir else data_dir
        preference = [v.upper() for v in cfg.view_preference]
        examples, problems = [], []
        for study_id, st in studies.items():
            subject = st["subject_id"]
            where = f"{split_path} line {st['line']} (study_id {study_id!r})"
            rel = Path("files") / f"p{subject[:2]}" / f"p{subject}"
            ranked = sorted(
                (preference.index(views[d].upper()), d) for d in st["dicoms"] if (views[d] or "").upper() in preference
            )
            if not ranked:
                problems.append(f"{where}: no {preference} image among {len(st['dicoms'])} dicoms")
                continue
            dicom = ranked[0][1]
            image_path = resolve_data_path(data_dir, str(rel / f"s{study_id}" / f"{dicom}.jpg"), where,
                                           "image path built from subject_id/study_id/dicom_id",
                                           cfg.allow_external_paths)
            _check_image(image_path, where, cfg.verify_images)
            report_path = resolve_data_path(reports_root, str(rel / f"s{study_id}.txt"), where,
                                            "report path built from subject_id/study_id", cfg.allow_external_paths)
            self._source_files.extend([image_path, report_path])
            if not report_path.is_file():
                problems.append(f"{where}: report file not found: {report_path}")
                continue
            report = mimic_report_text(_read_text(report_path, where, "report", allow_empty=True))
            if not report:
                problems.append(f"{where}: report file is empty: {report_path}")
                continue
            if label_source == "priority_csv":
                if study_id not in priority:
                    raise ValueError(f"{where}: study has no label in {priority_path}")
                label = priority[study_id]
            else:
                label = int(score_report(report).urgent)
            examples.append(
                {
                    "study_id": study_id,
                    "image": str(image_path),
                    "report": report,
                    "pseudo_report": None,
                    "label": label,
                    "split": st["split"],
                    "source": "mimic_cxr",
                    "view_position": views[dicom],
                    "findings": [],
                    "mesh_major": [],
                    "subject_id": subject,
                    "dicom_id": dicom,
                }
            )
        _apply_incomplete(problems, cfg.incomplete_studies, "MIMIC-CXR studies")
        return examples


def _extra_name(column: str) -> str:
    """Feature name of an extra metadata.csv column (prefixed when it clashes with a standard column)."""
    return f"csv_{column}" if column in _RESERVED else column


def _first_existing(data_dir: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        if (data_dir / name).is_file():
            return data_dir / name
    raise FileNotFoundError(f"none of {list(names)} found in {data_dir}")


def _iu_xml_documents(source: Path):
    """Yield ``(name, bytes)`` of every ``*.xml`` in a folder (recursively) or a .tgz/.tar.gz archive, sorted by name."""
    if source.is_dir():
        for path in sorted(source.rglob("*.xml"), key=lambda p: _natural_key(p.name)):
            yield path.name, path.read_bytes()
    elif source.is_file() and (source.name.endswith(".tgz") or source.name.endswith(".tar.gz")):
        with tarfile.open(source, "r:gz") as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".xml")), key=lambda m: _natural_key(m.name))
            for m in members:
                yield m.name, tar.extractfile(m).read()
    else:
        raise FileNotFoundError(f"IU reports not found (expected a folder of XML or a .tgz): {source}")


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


SOURCE_MANIFEST_NAME = "qdistill_source_files.json"


def _file_state(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _changed_source_files(manifest_path: Path) -> list[str] | None:
    """Files of the manifest whose size/mtime changed (or that vanished); None when there is no readable manifest."""
    try:
        recorded = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(recorded, dict):
        return None
    return [path for path, state in recorded.items() if _file_state(path) != state]


def load_cxr_dataset(
    name: str, data_dir: str | None = None, cache_dir: str | None = None, **config_kwargs
) -> datasets.DatasetDict:
    """Prepare (or reuse from cache) and return a CXR dataset as a ``DatasetDict`` of its non-empty splits.

    A cached preparation is reused only while every film, report and pseudo-report file it was built from keeps
    its size and mtime; otherwise the dataset is prepared again (WARNING naming the first changed file), which
    re-reads edited reports and re-checks changed films.

    Args:
        name: config name, one of ``CONFIG_NAMES``.
        data_dir: the data folder (not needed for ``synthetic``).
        cache_dir: where prepared Arrow files go (default: the datasets cache).
        **config_kwargs: ``CxrBuilderConfig`` options, e.g. ``label_names=("normal", "abnormal")``.
    """
    if name not in CONFIG_NAMES:
        raise ValueError(f"unknown CXR dataset config {name!r}; available: {list(CONFIG_NAMES)}")
    if data_dir is not None and not Path(data_dir).is_dir():
        raise FileNotFoundError(f"data_dir does not exist or is not a directory: {data_dir}")
    for key in ("label_names", "split_fractions", "view_preference"):
        if key in config_kwargs and not isinstance(config_kwargs[key], str):
            config_kwargs[key] = tuple(config_kwargs[key])
    builder = DataCxr(config_name=name, data_dir=str(data_dir) if data_dir is not None else None, cache_dir=cache_dir, **config_kwargs)
    builder.download_and_prepare()
    if name != "synthetic":
        manifest = Path(builder.cache_dir) / SOURCE_MANIFEST_NAME
        built = getattr(builder, "prepared_source_files", None) is not None
        if not built:
            changed = _changed_source_files(manifest)
            if changed is None or changed:
                if changed:
                    logger.warning("%d source file(s) changed since %s was prepared (first: %s); preparing it again",
                                   len(changed), builder.cache_dir, changed[0])
                else:
                    logger.warning("%s has no readable %s; preparing it again", builder.cache_dir, SOURCE_MANIFEST_NAME)
                builder.download_and_prepare(download_mode="force_redownload")
                built = True
        if built:
            states = {path: _file_state(path) for path in builder.prepared_source_files}
            atomic_write_text(manifest, json.dumps(states, sort_keys=True))
    return builder.as_dataset()


__all__ = [
    "CONFIG_NAMES",
    "CORE_COLUMNS",
    "CxrBuilderConfig",
    "DataCxr",
    "SOURCE_MANIFEST_NAME",
    "hash_split",
    "iu_frontal_order",
    "load_cxr_dataset",
    "mimic_report_text",
    "mimic_sections",
]
