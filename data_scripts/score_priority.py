#!/usr/bin/env python
"""Score triage priority for every report of a qdistill_folder tree (resumable, shardable).

    python data_scripts/score_priority.py --data_dir DATA --scorer rules
    accelerate launch --multi_gpu --num_processes 2 data_scripts/score_priority.py --data_dir DATA \
        --scorer llm --model_id MODEL

Writes ``<output_dir>/runs/<scorer>/parts/*.jsonl`` as it goes, then (main process)
``<output_dir>/runs/<scorer>/priority_scores.jsonl`` and ``<output_dir>/priority_metadata.csv``
(``study_id, priority_label, complexity, split, scorer``), which the ``qdistill_folder`` dataset config reads.
LLM replies that never parse as the strict priority JSON stay *unscored*: they appear only in
``runs/<scorer>/parts/errors-*.jsonl`` with their raw replies, never as a label.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qdistill_hf.labels.priority_llm import (  # noqa: E402
    PRIORITY_SYSTEM_PROMPT,
    PRIORITY_USER_TEMPLATE,
    LLMPriorityScorer,
    rules_score_batch,
    write_priority_metadata,
)
from qdistill_hf.reports.pseudo_reports import read_folder_metadata  # noqa: E402
from qdistill_hf.reports.resumable import add_runner_arguments, read_jsonl, run_from_args  # noqa: E402

logger = logging.getLogger("score_priority")
MERGED_NAME = "priority_scores.jsonl"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="qdistill_folder root with metadata.csv")
    p.add_argument("--scorer", choices=["rules", "llm"], default="rules")
    p.add_argument("--model_id", default=None, help="llm: Hub id or local folder of a text chat model")
    p.add_argument("--output_dir", default=None, help="default <data_dir>/priority_scores")
    p.add_argument("--splits", nargs="+", default=None, help="splits to score (default all)")
    p.add_argument("--limit", type=int, default=None, help="first N rows after the split filter")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--max_attempts", type=int, default=3, help="llm: replies tried per report before unscored")
    p.add_argument("--system_prompt_file", default=None, help="llm: text file replacing the system turn")
    p.add_argument("--user_template_file", default=None,
                   help="llm: text file replacing the user turn; must contain {report}")
    add_runner_arguments(p)
    return p.parse_args(argv)


def _read_report(row):
    """The study's report text; a missing, unreadable or empty report is that study's recorded failure."""
    if row["report_file"] is None:
        raise ValueError(f"metadata.csv: study {row['study_id']} has an empty report_path")
    path = Path(row["report_file"])
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{path}: empty report (study {row['study_id']})")
    return text


def build_batch_fn(args):
    """Batch function and run description for ``args.scorer``."""
    if args.scorer == "rules":
        score = rules_score_batch
        info = {"scorer": "rules"}
    else:
        if not args.model_id:
            raise SystemExit("--scorer llm needs --model_id")
        system = (Path(args.system_prompt_file).read_text(encoding="utf-8") if args.system_prompt_file
                  else PRIORITY_SYSTEM_PROMPT)
        template = (Path(args.user_template_file).read_text(encoding="utf-8") if args.user_template_file
                    else PRIORITY_USER_TEMPLATE)
        scorer = LLMPriorityScorer(model_id_or_path=args.model_id, max_attempts=args.max_attempts,
                                   system_prompt=system, user_template=template,
                                   max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        info = {"scorer": "llm", "model": str(args.model_id), "system_prompt": system, "user_template": template,
                "max_new_tokens": args.max_new_tokens}

        def score(texts):
            return [r if isinstance(r, Exception) else r.to_dict() for r in scorer.score_batch(texts)]

    def process(batch):
        results, texts, slots = [None] * len(batch), [], []
        for i, row in enumerate(batch):
            try:
                texts.append(_read_report(row))
            except (OSError, ValueError) as exc:
                results[i] = exc
            else:
                slots.append(i)
        for i, res in zip(slots, score(texts)):
            results[i] = res if isinstance(res, Exception) else {**res, "split": batch[i]["split"],
                                                                  "scorer": args.scorer}
        return results

    return process, info


def write_outputs(rows, out_dir, run_dir, merged_path, scorer):
    """``priority_metadata.csv`` from the merged file; prints a summary; returns the unscored count."""
    records = read_jsonl(merged_path)
    n = write_priority_metadata(out_dir / "priority_metadata.csv", records, scorer=scorer)
    scored = {r["study_id"] for r in records}
    unscored = [r["study_id"] for r in rows if r["study_id"] not in scored]
    print(json.dumps({"n_studies": len(rows), "n_scored": n, "n_unscored": len(unscored),
                      "n_urgent": sum(r["urgent"] for r in records), "scorer": scorer,
                      "priority_metadata": str(out_dir / "priority_metadata.csv")}, indent=2))
    if unscored:
        print(f"{len(unscored)} studies unscored (see {run_dir}/parts/errors-*.jsonl), e.g. {unscored[:5]}")
    return len(unscored)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out_dir = Path(args.output_dir) if args.output_dir else Path(args.data_dir) / "priority_scores"
    rows = read_folder_metadata(args.data_dir, splits=args.splits, limit=args.limit)
    fn, info = build_batch_fn(args)
    # One run folder per scorer, so rules and LLM results never satisfy each other's resume check.
    run_dir = out_dir / "runs" / args.scorer
    run_from_args(args, rows, fn, run_dir, merged_name=MERGED_NAME, run_info=info,
                  on_merged=lambda merged: write_outputs(rows, out_dir, run_dir, merged, args.scorer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
