#!/usr/bin/env python
"""Generate pseudo-reports for a qdistill_folder tree (resumable, shardable).

    # offline default: report of the most similar training film (frozen CLIP/CheXzero embeddings)
    python data_scripts/generate_pseudo_reports.py --data_dir DATA --generator retrieval --vision_model CHEXZERO_DIR
    # MedGemma (or any image-text-to-text chat model), one shard per process
    accelerate launch --num_processes 4 data_scripts/generate_pseudo_reports.py --data_dir DATA --generator hf \\
        --model_id google/medgemma-4b-it --batch_size 8

Writes ``<output_dir>/parts/*.jsonl`` as it goes, then (main process) ``<output_dir>/pseudo_reports.jsonl``,
``<output_dir>/metadata.csv`` + ``<study_id>_medgemma_report.txt`` (original layout) and
``<output_dir>/quality_summary.json``. Rerun the same command to resume; failed studies are retried and never
written as reports.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qdistill_hf.pseudo_reports import (  # noqa: E402
    DEFAULT_MODEL_ID,
    DEFAULT_PROMPT,
    quality_summary,
    read_folder_metadata,
    reports_from_records,
    write_medgemma_layout,
)
from qdistill_hf.resumable import finish_distributed, get_shard_info, read_jsonl, run_resumable  # noqa: E402

logger = logging.getLogger("generate_pseudo_reports")
MERGED_NAME = "pseudo_reports.jsonl"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="qdistill_folder root with metadata.csv")
    p.add_argument("--generator", choices=["hf", "retrieval"], default="retrieval")
    p.add_argument("--model_id", default=DEFAULT_MODEL_ID, help="hf: Hub id or local folder")
    p.add_argument("--prompt_file", default=None, help="hf: text file replacing the default instruction")
    p.add_argument("--system_prompt_file", default=None, help="hf: text file replacing the default system turn")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=512)
    p.add_argument("--vision_model", default=None, help="retrieval: CLIPVisionModel folder (e.g. converted CheXzero)")
    p.add_argument("--k", type=int, default=1, help="retrieval: neighbours for the majority vote")
    p.add_argument("--output_dir", default=None, help="default <data_dir>/medgemma_reports")
    p.add_argument("--splits", nargs="+", default=None, help="splits to generate for (default all)")
    p.add_argument("--limit", type=int, default=None, help="first N rows after the split filter")
    p.add_argument("--rank", type=int, default=None, help="explicit shard index (with --world_size)")
    p.add_argument("--world_size", type=int, default=None, help="explicit number of shards")
    return p.parse_args(argv)


def _load_image(path):
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")


def build_hf_batch_fn(args):
    from qdistill_hf.pseudo_reports import DEFAULT_SYSTEM_PROMPT, HFPseudoReportGenerator

    prompt = Path(args.prompt_file).read_text(encoding="utf-8") if args.prompt_file else DEFAULT_PROMPT
    system = (Path(args.system_prompt_file).read_text(encoding="utf-8") if args.system_prompt_file
              else DEFAULT_SYSTEM_PROMPT)
    gen = HFPseudoReportGenerator(args.model_id, prompt=prompt, system_prompt=system,
                                  max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)

    def process(batch):
        results, images, slots = [None] * len(batch), [], []
        for i, row in enumerate(batch):
            try:
                images.append(_load_image(row["image_file"]))
                slots.append(i)
            except Exception as exc:  # noqa: BLE001 - recorded per study by the runner
                results[i] = exc
        for i, text in zip(slots, gen.generate(images)):
            results[i] = {"pseudo_report": text, "split": batch[i]["split"], "generator": "hf",
                          "model": str(args.model_id)}
        return results

    return process


def build_retrieval_batch_fn(args):
    from qdistill_hf.pseudo_reports import CLIPImageEmbedder, RetrievalPseudoReportGenerator

    if not args.vision_model:
        raise SystemExit("--generator retrieval needs --vision_model (a CLIPVisionModel folder)")
    embedder = CLIPImageEmbedder(args.vision_model, batch_size=max(args.batch_size, 1))
    train = read_folder_metadata(args.data_dir, splits=["train"])
    if not train:
        raise SystemExit(f"{args.data_dir}/metadata.csv has no 'train' rows to retrieve from")
    train_reports = [Path(r["report_file"]).read_text(encoding="utf-8").strip() for r in train]
    train_emb = embedder([_load_image(r["image_file"]) for r in train])
    retriever = RetrievalPseudoReportGenerator(train_emb, train_reports, [r["study_id"] for r in train], k=args.k)

    def process(batch):
        results, images, slots, own = [None] * len(batch), [], [], []
        for i, row in enumerate(batch):
            try:
                images.append(_load_image(row["image_file"]))
                rp = Path(row["report_file"])
                own.append(rp.read_text(encoding="utf-8").strip() if rp.is_file() else None)
                slots.append(i)
            except Exception as exc:  # noqa: BLE001
                results[i] = exc
        if slots:
            hits = retriever.retrieve(embedder(images), [batch[i]["study_id"] for i in slots], own)
            for i, hit in zip(slots, hits):
                results[i] = {"pseudo_report": hit["report"], "split": batch[i]["split"], "generator": "retrieval",
                              "neighbour_id": hit["neighbour_id"], "similarity": round(hit["similarity"], 6)}
        return results

    return process


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out_dir = Path(args.output_dir) if args.output_dir else Path(args.data_dir) / "medgemma_reports"
    rows = read_folder_metadata(args.data_dir, splits=args.splits, limit=args.limit)
    rank, world, state = get_shard_info(args.rank, args.world_size)
    fn = build_hf_batch_fn(args) if args.generator == "hf" else build_retrieval_batch_fn(args)
    # Explicit rank/world_size (or None: accelerate) so the runner also owns the barrier + main-process merge.
    summary = run_resumable(rows, fn, out_dir, batch_size=args.batch_size, rank=args.rank,
                            world_size=args.world_size, merged_name=MERGED_NAME, merge=True)
    logger.info("rank %d/%d: %d generated, %d failed, %d skipped", rank, world, summary.n_done,
                summary.n_failed, summary.n_skipped)
    if summary.merged_path is None or (state is not None and not state.is_main_process):
        finish_distributed(state)
        return 0
    records = read_jsonl(summary.merged_path)
    reports = reports_from_records(records)
    write_medgemma_layout(out_dir, reports, {str(r["study_id"]): r["split"] for r in records})
    quality = quality_summary(reports)
    (out_dir / "quality_summary.json").write_text(json.dumps(quality, indent=2))
    missing = len(rows) - len(reports)
    print(json.dumps({"n_reports": len(reports), "n_missing": missing, "counts": quality["counts"],
                      "n_flagged": quality["n_flagged"], "mean_words": round(quality["mean_words"], 1),
                      "top_repeated": [[t[:80], c] for t, c in quality["top_repeated"]]}, indent=2))
    if missing:
        print(f"{missing} studies have no report yet (see {out_dir}/parts/errors-*.jsonl); rerun to retry.")
    finish_distributed(state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
