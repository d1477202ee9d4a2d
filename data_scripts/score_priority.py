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

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

# Light on purpose: torch, accelerate and qdistill_hf are imported after parsing, so `--help` answers at once.
from transformers import HfArgumentParser


logger = logging.getLogger("score_priority")
MERGED_NAME = "priority_scores.jsonl"


@dataclass
class ScoreArguments:
    """What to score and how."""

    data_dir: str = field(metadata={"help": "qdistill_folder root with metadata.csv."})
    scorer: Literal["rules", "llm"] = field(default="rules", metadata={"help": "Rule-based scorer or a chat LLM."})
    model_id: str | None = field(default=None, metadata={"help": "llm: Hub id or local folder of a text chat model."})
    output_dir: str | None = field(default=None, metadata={"help": "Default: <data_dir>/priority_scores."})
    splits: list[str] | None = field(default=None, metadata={"help": "Splits to score (default: all)."})
    limit: int | None = field(default=None, metadata={"help": "First N rows after the split filter."})
    max_new_tokens: int = field(default=128, metadata={"help": "llm: tokens generated per reply."})
    max_attempts: int = field(default=3, metadata={"help": "llm: replies tried per report before unscored."})
    system_prompt_file: str | None = field(
        default=None, metadata={"help": "llm: text file replacing the system turn."}
    )
    user_template_file: str | None = field(
        default=None, metadata={"help": "llm: text file replacing the user turn; must contain {report}."}
    )

    def __post_init__(self):
        if self.scorer == "llm" and not self.model_id:
            raise ValueError("--scorer llm needs --model_id")


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


def parse_args(argv: list[str] | None = None) -> tuple[ScoreArguments, RunnerArguments]:
    """Parse the command line (see the module docstring)."""
    parser = HfArgumentParser((ScoreArguments, RunnerArguments), description=__doc__.split("\n\n")[0])
    return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)


def _read_report(row):
    """The study's report text; a missing, unreadable or empty report is that study's recorded failure."""
    from qdistill_hf.utils import read_text_file

    if row["report_file"] is None:
        raise ValueError(f"metadata.csv: study {row['study_id']} has an empty report_path")
    return read_text_file(row["report_file"], f"study {row['study_id']}", "report")


def build_batch_fn(args: ScoreArguments, batch_size: int):
    """Batch function and run description for `args.scorer`."""
    from qdistill_hf.labels.priority_llm import (
        PRIORITY_SYSTEM_PROMPT,
        PRIORITY_USER_TEMPLATE,
        LLMPriorityScorer,
        rules_score_batch,
    )

    if args.scorer == "rules":
        score = rules_score_batch
        info = {"scorer": "rules"}
    else:
        system = (Path(args.system_prompt_file).read_text(encoding="utf-8") if args.system_prompt_file
                  else PRIORITY_SYSTEM_PROMPT)
        template = (Path(args.user_template_file).read_text(encoding="utf-8") if args.user_template_file
                    else PRIORITY_USER_TEMPLATE)
        scorer = LLMPriorityScorer(model_id_or_path=args.model_id, max_attempts=args.max_attempts,
                                   system_prompt=system, user_template=template,
                                   max_new_tokens=args.max_new_tokens, batch_size=batch_size)
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
    """`priority_metadata.csv` from the merged file; prints a summary; returns the unscored count."""
    from qdistill_hf.labels.priority_llm import write_priority_metadata
    from qdistill_hf.reports.resumable import read_jsonl

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


def main(argv: list[str] | None = None) -> int:
    """Score every study of `--data_dir` and write `priority_metadata.csv` (see the module docstring)."""
    args, runner_args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from qdistill_hf.reports.pseudo_reports import read_folder_metadata
    from qdistill_hf.reports.resumable import run_from_args

    out_dir = Path(args.output_dir) if args.output_dir else Path(args.data_dir) / "priority_scores"
    rows = read_folder_metadata(args.data_dir, splits=args.splits, limit=args.limit)
    fn, info = build_batch_fn(args, runner_args.batch_size)
    # One run folder per scorer, so rules and LLM results never satisfy each other's resume check.
    run_dir = out_dir / "runs" / args.scorer
    run_from_args(runner_args, rows, fn, run_dir, merged_name=MERGED_NAME, run_info=info,
                  on_merged=lambda merged: write_outputs(rows, out_dir, run_dir, merged, args.scorer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
