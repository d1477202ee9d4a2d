#!/usr/bin/env python
"""Score triage priority for every report of a qdistill_folder tree (resumable, shardable).

    python data_scripts/score_priority.py --data_dir DATA --scorer rules
    accelerate launch --multi_gpu --num_processes 2 data_scripts/score_priority.py --data_dir DATA --scorer llm --model_id MODEL

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

from qdistill_hf.pseudo_reports import read_folder_metadata  # noqa: E402
from qdistill_hf.resumable import finish_distributed, get_shard_info, load_errors, read_jsonl, run_resumable  # noqa: E402

logger = logging.getLogger("score_priority")
MERGED_NAME = "priority_scores.jsonl"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="qdistill_folder root with metadata.csv")
    p.add_argument("--scorer", choices=["rules", "llm"], default="rules")
    p.add_argument("--model_id", default=None, help="llm: Hub id or local folder of a text chat model")
    p.add_argument("--output_dir", default=None, help="default <data_dir>/priority_scores")
    p.add_argument("--splits", nargs="+", default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--max_attempts", type=int, default=3, help="llm: replies tried per report before unscored")
    p.add_argument("--system_prompt_file", default=None, help="llm: text file replacing the system turn")
    p.add_argument("--user_template_file", default=None,
                   help="llm: text file replacing the user turn; must contain {report}")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--world_size", type=int, default=None)
    return p.parse_args(argv)


def _read_reports(batch):
    texts, errors = [], []
    for row in batch:
        try:
            texts.append(Path(row["report_file"]).read_text(encoding="utf-8"))
            errors.append(None)
        except OSError as exc:
            texts.append(None)
            errors.append(exc)
    return texts, errors


def build_batch_fn(args):
    from qdistill_hf.priority_llm import (
        PRIORITY_SYSTEM_PROMPT,
        PRIORITY_USER_TEMPLATE,
        LLMPriorityScorer,
        rules_score_batch,
    )

    if args.scorer == "rules":
        def score(texts):
            return rules_score_batch(texts)
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

        def score(texts):
            return [r if isinstance(r, Exception) else r.to_dict() for r in scorer.score_batch(texts)]

    def process(batch):
        texts, errors = _read_reports(batch)
        ok = [i for i, e in enumerate(errors) if e is None]
        results = list(errors)
        for i, res in zip(ok, score([texts[i] for i in ok])):
            results[i] = res if isinstance(res, Exception) else {**res, "split": batch[i]["split"], "scorer": args.scorer}
        return results

    return process


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from qdistill_hf.priority_llm import write_priority_metadata

    out_dir = Path(args.output_dir) if args.output_dir else Path(args.data_dir) / "priority_scores"
    rows = read_folder_metadata(args.data_dir, splits=args.splits, limit=args.limit)
    rank, world, state = get_shard_info(args.rank, args.world_size)
    # One run folder per scorer, so rules and LLM results never satisfy each other's resume check.
    run_dir = out_dir / "runs" / args.scorer
    summary = run_resumable(rows, build_batch_fn(args), run_dir, batch_size=args.batch_size, rank=args.rank,
                            world_size=args.world_size, merged_name=MERGED_NAME, merge=True)
    if summary.merged_path is None or (state is not None and not state.is_main_process):
        finish_distributed(state)
        return 0
    records = read_jsonl(summary.merged_path)
    n = write_priority_metadata(out_dir / "priority_metadata.csv", records, scorer=args.scorer)
    scored = {r["study_id"] for r in records}
    unscored = sorted(s for s in load_errors(run_dir) if s not in scored)
    print(json.dumps({"n_studies": len(rows), "n_scored": n, "n_unscored": len(unscored),
                      "n_urgent": sum(r["urgent"] for r in records), "scorer": args.scorer,
                      "priority_metadata": str(out_dir / "priority_metadata.csv")}, indent=2))
    if unscored:
        print(f"{len(unscored)} studies unscored (see {run_dir}/parts/errors-*.jsonl), e.g. {unscored[:5]}")
    finish_distributed(state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
