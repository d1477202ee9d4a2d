#!/usr/bin/env python
"""Generate pseudo-reports for a qdistill_folder tree (resumable, shardable).

    # offline default: report of the most similar training film (frozen CLIP/CheXzero embeddings)
    python data_scripts/generate_pseudo_reports.py --data_dir DATA --generator retrieval --vision_model CHEXZERO_DIR
    # MedGemma (or any image-text-to-text chat model), one shard per process
    accelerate launch --multi_gpu --num_processes 4 data_scripts/generate_pseudo_reports.py --data_dir DATA \
        --generator hf --model_id google/medgemma-4b-it --batch_size 8

Writes ``<output_dir>/parts/*.jsonl`` as it goes, then (main process) ``<output_dir>/pseudo_reports.jsonl``,
``<output_dir>/metadata.csv`` + ``<study_id>_medgemma_report.txt`` (original layout) and
``<output_dir>/quality_summary.json``. Rerun the same command to resume; failed studies are retried and never
written as reports. A rerun with another generator, model or prompt into the same folder is refused.
"""

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

# Light on purpose: torch, accelerate and qdistill_hf are imported after parsing, so `--help` answers at once.
from transformers import HfArgumentParser


logger = logging.getLogger("generate_pseudo_reports")
MERGED_NAME = "pseudo_reports.jsonl"
# Per-study failures that are recorded in the errors file and retried on the next run; anything else is a bug.
IMAGE_ERRORS = (OSError, ValueError)


@dataclass
class GenerateArguments:
    """What to generate for and how."""

    data_dir: str = field(metadata={"help": "qdistill_folder root with metadata.csv."})
    generator: Literal["hf", "retrieval"] = field(
        default="retrieval",
        metadata={"help": "retrieval: report of the most similar training film; hf: an image-text-to-text model."},
    )
    model_id: str | None = field(
        default=None,
        metadata={
            "help": "hf: Hub id or local folder (default: DEFAULT_MODEL_ID of qdistill_hf.reports.pseudo_reports, "
            "MedGemma 4B instruct)."
        },
    )
    prompt_file: str | None = field(default=None, metadata={"help": "hf: text file replacing the default instruction."})
    system_prompt_file: str | None = field(
        default=None, metadata={"help": "hf: text file replacing the default system turn."}
    )
    max_new_tokens: int = field(default=512, metadata={"help": "hf: tokens generated per report."})
    vision_model: str | None = field(
        default=None, metadata={"help": "retrieval: CLIPVisionModel folder (e.g. converted CheXzero)."}
    )
    k: int = field(default=1, metadata={"help": "retrieval: neighbours for the majority vote."})
    output_dir: str | None = field(default=None, metadata={"help": "Default: <data_dir>/medgemma_reports."})
    splits: list[str] | None = field(default=None, metadata={"help": "Splits to generate for (default: all)."})
    limit: int | None = field(default=None, metadata={"help": "First N rows after the split filter."})

    def __post_init__(self):
        if self.generator == "retrieval" and not self.vision_model:
            raise ValueError("--generator retrieval needs --vision_model (a CLIPVisionModel folder)")


@dataclass
class RunnerArguments:
    """The resumable runner's options: the fields of `qdistill_hf.reports.resumable.add_runner_arguments`.

    Declared here (not imported) because importing qdistill_hf takes seconds and `--help` must not;
    tests/test_example_scripts.py checks that both stay the same.
    """

    batch_size: int = field(default=8, metadata={"help": "Studies per batch."})
    rank: int | None = field(
        default=None,
        metadata={"help": "Explicit shard index (with --world_size, e.g. a SLURM array); default: accelerate."},
    )
    world_size: int | None = field(default=None, metadata={"help": "Explicit number of shards (with --rank)."})


def parse_args(argv: list[str] | None = None) -> tuple[GenerateArguments, RunnerArguments]:
    """Parse the command line (see the module docstring)."""
    parser = HfArgumentParser((GenerateArguments, RunnerArguments), description=__doc__.split("\n\n")[0])
    return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)


def _load_inputs(batch, with_own_report=False):
    """Open each study's film (and own report); a file that cannot be read becomes that study's failure.

    Returns ``(results, images, own_reports, slots)``: ``results`` holds the failures, ``slots`` the indices
    of the studies whose inputs loaded (parallel to ``images`` and ``own_reports``).
    """
    from qdistill_hf.reports.pseudo_reports import load_rgb_image

    results, images, own_reports, slots = [None] * len(batch), [], [], []
    for i, row in enumerate(batch):
        try:
            image = load_rgb_image(row["image_file"])
            own = _own_report(row) if with_own_report else None
        except IMAGE_ERRORS as exc:
            results[i] = exc
            continue
        images.append(image)
        own_reports.append(own)
        slots.append(i)
    return results, images, own_reports, slots


def _own_report(row):
    """The study's own report text (to exclude it from retrieval), or None for a film without one."""
    from qdistill_hf.utils import read_text_file

    if row["report_file"] is None:
        return None
    return read_text_file(row["report_file"], f"study {row['study_id']}", "report", allow_empty=True)


def build_hf_batch_fn(args: GenerateArguments, batch_size: int):
    """Batch function and run description for `--generator hf`."""
    from qdistill_hf.reports.pseudo_reports import (
        DEFAULT_MODEL_ID,
        DEFAULT_PROMPT,
        DEFAULT_SYSTEM_PROMPT,
        HFPseudoReportGenerator,
    )

    model_id = args.model_id or DEFAULT_MODEL_ID

    prompt = Path(args.prompt_file).read_text(encoding="utf-8") if args.prompt_file else DEFAULT_PROMPT
    system = (Path(args.system_prompt_file).read_text(encoding="utf-8") if args.system_prompt_file
              else DEFAULT_SYSTEM_PROMPT)
    gen = HFPseudoReportGenerator(model_id, prompt=prompt, system_prompt=system,
                                  max_new_tokens=args.max_new_tokens, batch_size=batch_size)

    def process(batch):
        results, images, _, slots = _load_inputs(batch)
        for i, text in zip(slots, gen.generate(images)):
            results[i] = {"pseudo_report": text, "split": batch[i]["split"], "generator": "hf",
                          "model": str(model_id)}
        return results

    info = {"generator": "hf", "model": str(model_id), "prompt": prompt, "system_prompt": system,
            "max_new_tokens": args.max_new_tokens, **gen.generation_kwargs}
    return process, info


def build_retrieval_batch_fn(args: GenerateArguments, batch_size: int):
    """Batch function and run description for `--generator retrieval`."""
    from qdistill_hf.reports.pseudo_reports import (
        CLIPImageEmbedder,
        RetrievalPseudoReportGenerator,
        read_folder_metadata,
    )

    embedder = CLIPImageEmbedder(args.vision_model, batch_size=batch_size)
    train = read_folder_metadata(args.data_dir, splits=["train"])
    if not train:
        raise SystemExit(f"{args.data_dir}/metadata.csv has no 'train' rows to retrieve from")
    train_reports = []
    for row in train:
        text = _own_report(row)
        if not text:
            raise ValueError(f"{row['report_file'] or 'metadata.csv'}: training study {row['study_id']} has an "
                             "empty or missing report; retrieval would hand it out as a pseudo-report")
        train_reports.append(text)
    train_emb = embedder.embed_files([r["image_file"] for r in train])
    retriever = RetrievalPseudoReportGenerator(train_emb, train_reports, [r["study_id"] for r in train], k=args.k)

    def process(batch):
        results, images, own, slots = _load_inputs(batch, with_own_report=True)
        if slots:
            hits = retriever.retrieve(embedder(images), [batch[i]["study_id"] for i in slots], own)
            for i, hit in zip(slots, hits):
                results[i] = {"pseudo_report": hit["report"], "split": batch[i]["split"], "generator": "retrieval",
                              "neighbour_id": hit["neighbour_id"], "similarity": round(hit["similarity"], 6)}
        return results

    info = {"generator": "retrieval", "vision_model": str(Path(args.vision_model).resolve()), "k": args.k,
            "pooling": embedder.pooling}
    return process, info


def write_outputs(rows, out_dir, merged_path):
    """Original layout + quality summary from the merged file; prints a summary; returns the missing count."""
    from qdistill_hf.reports.pseudo_reports import quality_summary, reports_from_records, write_medgemma_layout
    from qdistill_hf.reports.resumable import atomic_write_text, read_jsonl

    records = read_jsonl(merged_path)
    reports = reports_from_records(records, source=str(merged_path))
    write_medgemma_layout(out_dir, reports, {str(r["study_id"]): r["split"] for r in records})
    quality = quality_summary(reports)
    atomic_write_text(out_dir / "quality_summary.json", json.dumps(quality, indent=2) + "\n")
    missing = [r["study_id"] for r in rows if r["study_id"] not in reports]
    print(json.dumps({"n_reports": len(reports), "n_missing": len(missing), "counts": quality["counts"],
                      "n_flagged": quality["n_flagged"], "mean_words": round(quality["mean_words"], 1),
                      "top_repeated": [[t[:80], c] for t, c in quality["top_repeated"]]}, indent=2))
    if missing:
        print(f"{len(missing)} studies have no report yet, e.g. {missing[:5]} "
              f"(see {out_dir}/parts/errors-*.jsonl); rerun to retry.")
    return len(missing)


def main(argv: list[str] | None = None) -> int:
    """Generate a pseudo-report for every study of `--data_dir` (see the module docstring)."""
    args, runner_args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from qdistill_hf.reports.pseudo_reports import read_folder_metadata
    from qdistill_hf.reports.resumable import run_from_args

    out_dir = Path(args.output_dir) if args.output_dir else Path(args.data_dir) / "medgemma_reports"
    rows = read_folder_metadata(args.data_dir, splits=args.splits, limit=args.limit)
    build = build_hf_batch_fn if args.generator == "hf" else build_retrieval_batch_fn
    fn, info = build(args, runner_args.batch_size)
    run_from_args(runner_args, rows, fn, out_dir, merged_name=MERGED_NAME, run_info=info,
                  on_merged=lambda merged: write_outputs(rows, out_dir, merged))
    return 0


if __name__ == "__main__":
    sys.exit(main())
