"""Validate the rule-based report scorer against human labels.

Usage (from the repository root)::

    python data_scripts/evaluate_priority_rules.py --jsonl ../shared/data/cxr-paired/iu_reports_dev.jsonl --errors 10

Each JSONL line needs ``report`` and 0/1 ``urgent`` and ``abnormal`` fields (``study_id`` is
optional and used in messages). Prints accuracy, sensitivity, specificity, F1, balanced accuracy
and the confusion matrix for both labels, and optionally examples of false positives and false
negatives with the scorer's rationale.
"""

import time
from dataclasses import dataclass, field
from pathlib import Path

# Light on purpose: qdistill_hf is imported after parsing, so `--help` answers at once.
from transformers import HfArgumentParser


LABELS = ("urgent", "abnormal")


def format_metrics(name: str, m: dict) -> str:
    """Render one label's metrics as a few text lines."""
    return (
        f"[{name}] n={m['n']}  accuracy={m['accuracy']:.4f}  sensitivity={m['sensitivity']:.4f}  "
        f"specificity={m['specificity']:.4f}  F1={m['f1']:.4f}  balanced_accuracy={m['balanced_accuracy']:.4f}\n"
        f"    confusion (rows = truth, cols = predicted):  truth 0: [TN={m['tn']:5d}  FP={m['fp']:5d}]  "
        f"truth 1: [FN={m['fn']:5d}  TP={m['tp']:5d}]"
    )


@dataclass
class EvaluateArguments:
    """Options of the rule-scorer evaluation."""

    jsonl: Path = field(metadata={"help": "JSONL with report, urgent and abnormal fields."})
    errors: int = field(
        default=0, metadata={"help": "Print up to N false positives and N false negatives per label."}
    )

    def __post_init__(self):
        if self.errors < 0:
            raise ValueError(f"--errors must be >= 0, got {self.errors}")


def main(argv: list[str] | None = None) -> int:
    """Score every report of `--jsonl` with the rules and print the metrics (and errors when asked)."""
    parser = HfArgumentParser(EvaluateArguments, description=__doc__.split("\n\n")[0])
    (args,) = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    from qdistill_hf.labels.priority_rules import evaluate_scorer
    from qdistill_hf.reports.resumable import read_jsonl

    records = read_jsonl(args.jsonl, strict=True)
    start = time.perf_counter()
    result = evaluate_scorer(records, labels=LABELS)
    elapsed = time.perf_counter() - start
    print(f"Scored {len(records)} reports from {args.jsonl} in {elapsed:.2f} s")
    for label in LABELS:
        print(format_metrics(label, result[label]))

    if args.errors:
        for label in LABELS:
            for kind, truth in (("false positives", 0), ("false negatives", 1)):
                shown = 0
                print(f"\n=== {label}: {kind} ===")
                for record, (study_id, score) in zip(records, result["predictions"]):
                    if int(record[label]) == truth and getattr(score, label) != truth:
                        print(f"- {study_id}  mesh={record.get('mesh_major')}")
                        print(f"  report: {record['report']!r}")
                        print(f"  rationale: {score.rationale}")
                        shown += 1
                        if shown >= args.errors:
                            break
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
