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

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qdistill_hf.reports.pseudo_reports import (  # noqa: E402
    DEFAULT_MODEL_ID,
    DEFAULT_PROMPT,
    DEFAULT_SYSTEM_PROMPT,
    load_rgb_image,
    quality_summary,
    read_folder_metadata,
    reports_from_records,
    write_medgemma_layout,
)
from qdistill_hf.reports.resumable import (  # noqa: E402
    add_runner_arguments,
    atomic_write_text,
    read_jsonl,
    run_from_args,
)

logger = logging.getLogger("generate_pseudo_reports")
MERGED_NAME = "pseudo_reports.jsonl"
# Per-study failures that are recorded in the errors file and retried on the next run; anything else is a bug.
IMAGE_ERRORS = (OSError, ValueError)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="qdistill_folder root with metadata.csv")
    p.add_argument("--generator", choices=["hf", "retrieval"], default="retrieval")
    p.add_argument("--model_id", default=DEFAULT_MODEL_ID, help="hf: Hub id or local folder")
    p.add_argument("--prompt_file", default=None, help="hf: text file replacing the default instruction")
    p.add_argument("--system_prompt_file", default=None, help="hf: text file replacing the default system turn")
    p.add_argument("--max_new_tokens", type=int, default=512)
    p.add_argument("--vision_model", default=None, help="retrieval: CLIPVisionModel folder (e.g. converted CheXzero)")
    p.add_argument("--k", type=int, default=1, help="retrieval: neighbours for the majority vote")
    p.add_argument("--output_dir", default=None, help="default <data_dir>/medgemma_reports")
    p.add_argument("--splits", nargs="+", default=None, help="splits to generate for (default all)")
    p.add_argument("--limit", type=int, default=None, help="first N rows after the split filter")
    add_runner_arguments(p)
    return p.parse_args(argv)


def _load_inputs(batch, with_own_report=False):
    """Open each study's film (and own report); a file that cannot be read becomes that study's failure.

    Returns ``(results, images, own_reports, slots)``: ``results`` holds the failures, ``slots`` the indices
    of the studies whose inputs loaded (parallel to ``images`` and ``own_reports``).
    """
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
    if row["report_file"] is None:
        return None
    return Path(row["report_file"]).read_text(encoding="utf-8").strip()


def build_hf_batch_fn(args):
    """Batch function and run description for ``--generator hf``."""
    from qdistill_hf.reports.pseudo_reports import HFPseudoReportGenerator

    prompt = Path(args.prompt_file).read_text(encoding="utf-8") if args.prompt_file else DEFAULT_PROMPT
    system = (Path(args.system_prompt_file).read_text(encoding="utf-8") if args.system_prompt_file
              else DEFAULT_SYSTEM_PROMPT)
    gen = HFPseudoReportGenerator(args.model_id, prompt=prompt, system_prompt=system,
                                  max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)

    def process(batch):
        results, images, _, slots = _load_inputs(batch)
        for i, text in zip(slots, gen.generate(images)):
            results[i] = {"pseudo_report": text, "split": batch[i]["split"], "generator": "hf",
                          "model": str(args.model_id)}
        return results

    info = {"generator": "hf", "model": str(args.model_id), "prompt": prompt, "system_prompt": system,
            "max_new_tokens": args.max_new_tokens, **gen.generation_kwargs}
    return process, info


def build_retrieval_batch_fn(args):
    """Batch function and run description for ``--generator retrieval``."""
    from qdistill_hf.reports.pseudo_reports import CLIPImageEmbedder, RetrievalPseudoReportGenerator

    if not args.vision_model:
        raise SystemExit("--generator retrieval needs --vision_model (a CLIPVisionModel folder)")
    embedder = CLIPImageEmbedder(args.vision_model, batch_size=args.batch_size)
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


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out_dir = Path(args.output_dir) if args.output_dir else Path(args.data_dir) / "medgemma_reports"
    rows = read_folder_metadata(args.data_dir, splits=args.splits, limit=args.limit)
    build = build_hf_batch_fn if args.generator == "hf" else build_retrieval_batch_fn
    fn, info = build(args)
    run_from_args(args, rows, fn, out_dir, merged_name=MERGED_NAME, run_info=info,
                  on_merged=lambda merged: write_outputs(rows, out_dir, merged))
    return 0


if __name__ == "__main__":
    sys.exit(main())
