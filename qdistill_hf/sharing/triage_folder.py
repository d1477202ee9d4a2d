"""`qdistill-triage`: triage a worklist of chest films with a trained student, resumably.

    qdistill-triage --model STUDENT_DIR --input FILMS_DIR --output results.csv
    qdistill-triage --model STUDENT_DIR --input worklist.csv --output results.csv --batch_size 32 --device cuda
    python -m qdistill_hf.sharing.triage_folder ...            # the same without the console script

Input: one film, a folder (every PNG, JPEG, TIFF, BMP, 16-bit PNG and DICOM file below it, recursively, hidden files and
folders excepted; DICOM is recognised by its ``.dcm``/``.dicom`` suffix or, for files without a suffix, by its
``DICM`` marker), or a CSV with an ``image_path`` (or ``path``) column and an optional ``study_id`` column (a
``qdistill_folder`` ``metadata.csv`` works as it is). Paths in a CSV are relative to the CSV's folder and may not
leave it (``..``, absolute paths, symlinks pointing outside are refused) unless ``--allow_external_paths`` is given.
The study id is the ``study_id`` column, else the path as written in the CSV, else (folders) the file's path
relative to the folder.

Output, in input order: ``results.csv`` with ``study_id,label,probability,threshold``: the label at the model's
stored operating point (``model.triage_decisions``), the calibrated probability of the urgent class
(``model.triage_probabilities``) and the threshold (``config.decision_threshold``; a model without one is
uncalibrated: its labels are the argmax, threshold 0.5, and a warning says so). Films that cannot be read (missing,
corrupt, not an image, too small, an unsupported DICOM) are listed in ``results.errors.csv``
(``study_id,path,error``) and the run goes on; the exit status is 1 when that list is not empty.

Resuming: every finished film is appended to ``results.work/parts/*.jsonl`` at once (the resumable runner of
``qdistill_hf.reports.resumable``), so after a crash or kill the same command carries on without losing or
repeating a row; failed films are retried on every rerun. A rerun with another model (weights or config changed)
or input is refused; delete ``results.work`` to start afresh. ``--rank/--world_size`` split the worklist over
processes (e.g. one per GPU with ``CUDA_VISIBLE_DEVICES``); a final run without them writes the CSV files.

A ``pseudo_report`` student also reads a generated report: pass ``--reports`` (a CSV with ``study_id`` and
``pseudo_report`` or ``report`` columns); the worklist use-case is the ``image_only`` student.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import logging
import os
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FILM_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_SUFFIXES = (".dcm", ".dicom")
OUTPUT_COLUMNS = ("study_id", "label", "probability", "threshold")
ERROR_COLUMNS = ("study_id", "path", "error")
PATH_COLUMNS = ("image_path", "path")
REPORT_COLUMNS = ("pseudo_report", "report")
MERGED_NAME = "triage.jsonl"
# transformers 5 writes the image processor's settings to processor_config.json when a whole processor is saved, to
# preprocessor_config.json when the image processor is saved alone.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
UNCALIBRATED_THRESHOLD = 0.5
# Per-film failures: recorded in the errors list, retried on the next run. Anything else is a bug and stops the run.
FILM_ERRORS = (OSError, ValueError, ImportError)


def work_dir_for(output: str | os.PathLike) -> Path:
    """The resumable runner's folder beside the output CSV: ``results.csv`` -> ``results.work``."""
    return Path(output).with_suffix(".work")


def errors_csv_for(output: str | os.PathLike) -> Path:
    """The list of films that failed: ``results.csv`` -> ``results.errors.csv``."""
    return Path(output).with_suffix(".errors.csv")


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="qdistill-triage",
        description="\n\n".join(__doc__.split("\n\n")[:2]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Details: python -c 'import qdistill_hf.sharing.triage_folder as m; help(m)'",
    )
    parser.add_argument("--model", required=True, help="student folder (config.json, weights and the saved processor)")
    parser.add_argument("--input", required=True, help="folder of films, one film, or CSV (.csv, .csv.gz) with an "
                        "image_path (or path) column")
    parser.add_argument("--output", required=True, help="CSV to write (study_id,label,probability,threshold)")
    parser.add_argument("--batch_size", type=int, default=16, help="films per forward pass (default 16)")
    parser.add_argument("--device", default="auto", help="torch device: auto (CUDA when present, else CPU), cpu, cuda, "
                        "cuda:1...")
    parser.add_argument("--reports", default=None, help="pseudo_report students only: CSV with study_id and "
                        "pseudo_report (or report) columns")
    parser.add_argument("--allow_external_paths", action="store_true",
                        help="accept CSV paths that are absolute or leave the CSV's folder")
    parser.add_argument("--rank", type=int, default=None, help="shard index (with --world_size)")
    parser.add_argument("--world_size", type=int, default=None, help="number of shards (with --rank)")
    return parser


# ------------------------------------------------------------------------------------------------ inputs


def list_folder_films(folder: str | os.PathLike) -> list[dict[str, str]]:
    """Every film below ``folder`` (see the module docstring), sorted, as ``{"study_id", "path"}`` items.

    Raises:
        ValueError: the folder holds no film.
    """
    from ..data.dicom import is_dicom_file

    folder = Path(folder)
    items, ignored = [], 0
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        suffix = path.suffix.lower()
        if suffix in FILM_SUFFIXES or suffix in DICOM_SUFFIXES or (not suffix and is_dicom_file(path)):
            items.append({"study_id": relative.as_posix(), "path": str(path)})
        else:
            ignored += 1
    if ignored:
        logger.info("%s: ignored %d file(s) that are neither images (%s) nor DICOM", folder, ignored,
                    ", ".join(FILM_SUFFIXES))
    if not items:
        raise ValueError(f"{folder}: no films found (looked for {', '.join(FILM_SUFFIXES + DICOM_SUFFIXES)} and "
                         "DICOM files without a suffix)")
    return items


def read_worklist_csv(path: str | os.PathLike, allow_external: bool = False) -> list[dict[str, str]]:
    """The films of a worklist CSV as ``{"study_id", "path"}`` items, paths resolved against the CSV's folder.

    Raises:
        ValueError: no ``image_path``/``path`` column, an empty value, a duplicate study id, or a path leaving the
            CSV's folder; the message names the file and line.
    """
    from ..utils import read_csv_rows, resolve_data_path

    path = Path(path)
    header, rows = read_csv_rows(path)
    column = next((c for c in PATH_COLUMNS if c in header), None)
    if column is None:
        raise ValueError(f"{path}: no {' or '.join(PATH_COLUMNS)} column; found {header}")
    items, seen = [], {}
    for line, row in rows:
        where = f"{path} line {line}"
        film = resolve_data_path(path.parent, row[column], where, column, allow_external=allow_external)
        study_id = row.get("study_id", "") if "study_id" in header else row[column]
        if not study_id:
            raise ValueError(f"{where}: empty study_id")
        if study_id in seen:
            raise ValueError(f"{where}: duplicate study_id {study_id!r}, first seen on line {seen[study_id]}")
        seen[study_id] = line
        items.append({"study_id": study_id, "path": str(film)})
    return items


def read_reports(path: str | os.PathLike) -> dict[str, str]:
    """``study_id -> report text`` from a CSV with ``study_id`` and ``pseudo_report`` (or ``report``) columns."""
    from ..utils import read_keyed_csv

    path = Path(path)
    rows = read_keyed_csv(path)
    header = next(iter(rows.values()))[1].keys()
    column = next((c for c in REPORT_COLUMNS if c in header), None)
    if column is None:
        raise ValueError(f"{path}: no {' or '.join(REPORT_COLUMNS)} column; found {list(header)}")
    return {sid: row[column] for sid, (_, row) in rows.items()}


LATERAL_VIEWS = ("LL", "RL", "LAT", "LATERAL", "LLD", "RLD")


def warn_if_not_frontal_chest(meta: dict[str, Any]) -> bool:
    """Log a warning when a DICOM film's own tags say it is lateral or not of the chest; the film is still triaged.

    The models learned from frontal (PA/AP) chest films. Only the tags are read (*View Position*, *Body Part
    Examined*); a film without them gets no warning.

    Args:
        meta: the metadata of :func:`~qdistill_hf.data.dicom.read_dicom_film`.

    Returns:
        Whether a warning was logged.
    """
    view = meta.get("view_position", "").strip().upper()
    body = meta.get("body_part_examined", "").strip().upper()
    problems = []
    if view in LATERAL_VIEWS:
        problems.append(f"View Position {view!r} (lateral)")
    if body and body not in ("CHEST", "THORAX"):
        problems.append(f"Body Part Examined {body!r}")
    if problems:
        logger.warning("%s: %s; the model was trained on frontal chest films, so this result means little",
                       meta.get("path"), " and ".join(problems))
    return bool(problems)


def load_film(path: str | os.PathLike, min_side: int, high_bit_depth_scaling: str) -> Any:
    """Open one film (image file or DICOM) as the 8-bit PIL image the processor takes; errors name the file.

    DICOM goes through :func:`~qdistill_hf.data.dicom.read_dicom_film` (modality and VOI LUT at full precision);
    other files through ``open_image_file`` and ``to_eight_bit_film`` (16-bit PNGs scaled, not saturated).
    """
    from ..data.dicom import is_dicom_file, read_dicom_film
    from ..models.processing_qdistill import to_eight_bit_film
    from ..utils import open_image_file

    path = Path(path)
    name = f"image {path}"
    if path.suffix.lower() in DICOM_SUFFIXES or is_dicom_file(path):
        pixels, meta = read_dicom_film(path)
        warn_if_not_frontal_chest(meta)
        return to_eight_bit_film(pixels, name, high_bit_depth_scaling, min_side)
    return to_eight_bit_film(open_image_file(path), name, high_bit_depth_scaling, min_side)


# ------------------------------------------------------------------------------------------------ model


def fingerprint(paths: list[Path]) -> str:
    """SHA-256 over the names and bytes of ``paths`` (the files that decide the outputs)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class TriageModel:
    """A student, its processor and its operating point, loaded from a folder for batched inference.

    Args:
        model_dir: the student folder (config, weights, the saved processor: ``processor_config.json`` or
            ``preprocessor_config.json``; tokenizer files too for a ``pseudo_report`` student).
        device: ``"auto"`` or a torch device name.
        reports: ``study_id -> pseudo-report`` (required for a ``pseudo_report`` student, refused otherwise).

    Raises:
        ValueError: the folder is not a binary student, a ``pseudo_report`` student without ``reports``, or no image
            processor is saved in it.
    """

    def __init__(self, model_dir: str | os.PathLike, device: str = "auto", reports: dict[str, str] | None = None):
        import torch
        from transformers import AutoConfig

        import qdistill_hf  # noqa: F401 - registers the Auto classes

        from ..labels.policy import LABEL_NAMES
        from ..models.configuration_qdistill import QDistillStudentConfig
        from ..models.modeling_qdistill import QDistillStudentModel
        from ..models.processing_qdistill import QDistillImageProcessor, QDistillProcessor
        from ..utils import load_pretrained

        self.model_dir = Path(model_dir)
        config = load_pretrained(AutoConfig, model_dir, "--model")
        if config.model_type != QDistillStudentConfig.model_type:
            raise ValueError(f"--model {model_dir}: a {config.model_type!r} model; the worklist runs a Q-DISTILL "
                             f"student ({QDistillStudentConfig.model_type!r}); the teacher reads the radiologist's "
                             "report, which a worklist does not have")
        if config.num_labels != 2:
            raise ValueError(f"--model {model_dir}: {config.num_labels} labels; triage is binary "
                             f"({', '.join(LABEL_NAMES)})")
        self.text_mode = config.text_mode
        if self.text_mode == "pseudo_report" and reports is None:
            raise ValueError(f"--model {model_dir} is a pseudo_report student: it reads a generated report with each "
                             "film. Pass --reports (CSV with study_id and pseudo_report columns, e.g. written by "
                             "data_scripts/generate_pseudo_reports.py), or use an image_only student, the one meant "
                             "for worklists.")
        if self.text_mode != "pseudo_report" and reports is not None:
            raise ValueError(f"--reports given, but --model {model_dir} is an {self.text_mode} student that reads no "
                             "text")
        self.reports = reports
        processor_files = [name for name in PROCESSOR_FILES if (self.model_dir / name).is_file()]
        if not processor_files:
            raise ValueError(f"--model {model_dir}: no {' or '.join(PROCESSOR_FILES)}; save the processor with the "
                             "model (processor.save_pretrained(folder)) so films are prepared as in training")
        if self.text_mode == "pseudo_report":
            self.processor = QDistillProcessor.from_pretrained(model_dir)
            self.image_processor = self.processor.image_processor
        else:
            self.image_processor = QDistillImageProcessor.from_pretrained(model_dir)
            self.processor = self.image_processor
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = load_pretrained(QDistillStudentModel, model_dir, "--model").to(self.device).eval()
        self.id2label = {int(k): v for k, v in self.model.config.id2label.items()}
        stored = self.model.config.decision_threshold
        self.calibrated = stored is not None
        self.threshold = float(stored) if stored is not None else UNCALIBRATED_THRESHOLD
        if not self.calibrated:
            logger.warning("%s stores no decision_threshold: labels are the argmax of the probabilities "
                           "(threshold %.1f), an uncalibrated operating point; choose one on validation data "
                           "(qdistill_hf.evaluation) and save it in the config", model_dir, UNCALIBRATED_THRESHOLD)
        files = [p for p in sorted(self.model_dir.iterdir()) if p.is_file()
                 and (p.suffix in (".safetensors", ".bin") or p.name in ("config.json", *PROCESSOR_FILES))]
        self.run_info = {"task": "qdistill-triage", "model": str(self.model_dir.resolve()),
                         "model_sha256": fingerprint(files)}

    def __call__(self, batch: list[dict]) -> list[Any]:
        """The runner's batch function: a result dict or the exception per item (films that fail go on the list)."""
        import torch

        results: list[Any] = [None] * len(batch)
        films, texts, slots = [], [], []
        for i, item in enumerate(batch):
            try:
                film = load_film(item["path"], self.image_processor.min_image_side,
                                 self.image_processor.high_bit_depth_scaling)
                if self.reports is not None:
                    text = self.reports.get(item["study_id"])
                    if not text:
                        raise ValueError(f"study {item['study_id']!r}: no pseudo-report in --reports"
                                         if text is None else f"study {item['study_id']!r}: empty pseudo-report")
                    texts.append(text)
            except FILM_ERRORS as exc:
                results[i] = exc
                continue
            films.append(film)
            slots.append(i)
        if not slots:
            return results
        if self.reports is not None:
            inputs = self.processor(images=films, text=texts, return_tensors="pt")
        else:
            inputs = self.processor(films, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with torch.inference_mode():
            probabilities = self.model.triage_probabilities(self.model(**inputs).logits)
            decisions = self.model.triage_decisions(probabilities)
        for i, p_urgent, decision in zip(slots, probabilities[:, 1].tolist(), decisions.tolist()):
            results[i] = {"label": self.id2label[decision], "probability": p_urgent, "threshold": self.threshold}
        return results


# ------------------------------------------------------------------------------------------------ outputs


def _csv_text(columns: tuple[str, ...], rows: list[tuple]) -> str:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return buffer.getvalue()


def write_outputs(items: list[dict], work_dir: Path, output: Path) -> tuple[int, int]:
    """Write the results CSV (input order) and the errors CSV from the runner's records.

    Returns:
        ``(number of results, number of failed films)``.
    """
    from ..reports.resumable import load_errors, load_finished
    from ..utils import atomic_write_text

    finished = load_finished(work_dir, MERGED_NAME)
    errors = load_errors(work_dir)
    rows, failed = [], []
    for item in items:
        sid = item["study_id"]
        if sid in finished:
            rec = finished[sid]
            rows.append((sid, rec["label"], f"{rec['probability']:.6f}", f"{rec['threshold']:g}"))
        elif sid in errors:
            err = errors[sid]
            failed.append((sid, item["path"], f"{err['error_type']}: {err['message']}"))
    atomic_write_text(output, _csv_text(OUTPUT_COLUMNS, rows))
    atomic_write_text(errors_csv_for(output), _csv_text(ERROR_COLUMNS, failed))
    return len(rows), len(failed)


# ------------------------------------------------------------------------------------------------ main


def run(args: argparse.Namespace) -> int:
    """Triage the worklist of ``args`` (parsed by :func:`build_parser`); returns the exit status."""
    from tqdm import tqdm

    from ..data.dicom import is_dicom_file
    from ..reports.resumable import load_finished, run_resumable, shard_items

    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    if (args.rank is None) != (args.world_size is None):
        raise ValueError("--rank and --world_size go together")
    rank, world_size = (0, 1) if args.rank is None else (args.rank, args.world_size)
    source = Path(args.input)
    if source.is_dir():
        items = list_folder_films(source)
    elif source.is_file() and source.name.lower().endswith((".csv", ".csv.gz")):
        items = read_worklist_csv(source, allow_external=args.allow_external_paths)
    elif source.is_file() and (source.suffix.lower() in FILM_SUFFIXES + DICOM_SUFFIXES or is_dicom_file(source)):
        items = [{"study_id": source.name, "path": str(source)}]
    elif source.is_file():
        raise ValueError(f"--input {source}: neither a worklist CSV (.csv, .csv.gz) nor a film "
                         f"({', '.join(FILM_SUFFIXES + DICOM_SUFFIXES)} or DICOM)")
    else:
        raise FileNotFoundError(f"--input {source}: no such folder or file")
    output = Path(args.output)
    if output.is_dir():
        raise ValueError(f"--output {output} is a folder; give the CSV file to write")
    output.parent.mkdir(parents=True, exist_ok=True)
    reports = read_reports(args.reports) if args.reports else None
    triage = TriageModel(args.model, args.device, reports)
    run_info = {**triage.run_info, "input": str(source.resolve()),
                "reports": fingerprint([Path(args.reports)]) if args.reports else None}
    work_dir = work_dir_for(output)

    shard_ids = {item["study_id"] for item in shard_items(items, rank, world_size)}
    done = sum(sid in shard_ids for sid in load_finished(work_dir, MERGED_NAME)) if work_dir.is_dir() else 0
    logger.info("%d films (%d in this shard, %d already done) on %s; work folder %s", len(items), len(shard_ids),
                done, triage.device, work_dir)
    with tqdm(total=len(shard_ids), initial=done, unit="film", desc="triage") as bar:
        def process(batch):
            results = triage(batch)
            bar.update(len(batch))
            return results

        summary = run_resumable(items, process, work_dir, batch_size=args.batch_size, rank=rank,
                                world_size=world_size, merged_name=MERGED_NAME, run_info=run_info)
    if summary.merged_path is None:
        logger.info("shard %d/%d done (%d films, %d failed); run once more without --rank/--world_size, after every "
                    "shard has finished, to write %s", rank, world_size, summary.n_done, summary.n_failed, output)
        return 1 if summary.n_failed else 0
    n_rows, n_failed = write_outputs(items, work_dir, output)
    logger.info("wrote %d of %d films to %s (threshold %g%s)", n_rows, len(items), output, triage.threshold,
                "" if triage.calibrated else ", uncalibrated")
    if n_failed:
        logger.warning("%d film(s) could not be triaged: see %s; rerun the same command to retry them", n_failed,
                       errors_csv_for(output))
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``qdistill-triage`` (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except (ValueError, OSError) as exc:
        sys.stderr.write(f"qdistill-triage: error: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "ERROR_COLUMNS",
    "OUTPUT_COLUMNS",
    "DICOM_SUFFIXES",
    "FILM_SUFFIXES",
    "LATERAL_VIEWS",
    "TriageModel",
    "build_parser",
    "errors_csv_for",
    "list_folder_films",
    "load_film",
    "main",
    "warn_if_not_frontal_chest",
    "read_reports",
    "read_worklist_csv",
    "run",
    "work_dir_for",
    "write_outputs",
]
