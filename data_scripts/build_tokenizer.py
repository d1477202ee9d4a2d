"""Train the report tokenizer on the train split only and save a full QDistillProcessor (image processor + tokenizer).

Examples (from the repository root):

    HF_HUB_OFFLINE=1 python data_scripts/build_tokenizer.py --dataset_name qdistill_folder \
        --data_dir ../shared/data/cxr-paired --output_dir runs/processor --vocab_size 4000

    HF_HUB_OFFLINE=1 python data_scripts/build_tokenizer.py \
        --reports_jsonl ../shared/data/cxr-paired/iu_reports_dev.jsonl \
        --dataset_name qdistill_folder --data_dir ../shared/data/cxr-paired --output_dir runs/processor_iu

`--reports_jsonl` reads one JSON object per line with a string `report` field. The file has no splits, so when
`--dataset_name` is given too, the corpus is the dataset's train reports plus the JSONL reports, minus every
JSONL report whose text (whitespace-normalised) is a validation or test report of the dataset; the count removed
is logged. (All 210 validation reports of `cxr-paired` are in `iu_reports_dev.jsonl`.) `--reports_jsonl` alone
trains on every line and logs a warning.
"""

import argparse
import json
import logging
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qdistill_hf.models.processing_qdistill import QDistillImageProcessor, QDistillProcessor  # noqa: E402
from qdistill_hf.models.tokenization_qdistill import build_report_tokenizer, train_report_tokenizer  # noqa: E402


logger = logging.getLogger(__name__)

DATASET_NAMES = ("qdistill_folder", "iu_xray", "mimic_cxr", "synthetic")


def read_reports_jsonl(path: str | Path, field: str = "report") -> list[str]:
    """Read the `field` string of every line of a JSON-lines file.

    Args:
        path (`str` or `Path`): the `.jsonl` file.
        field (`str`, *optional*, defaults to `"report"`): the text field.

    Returns:
        `list[str]`, one report per non-blank line.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: on a line that is not JSON, lacks `field`, or whose `field` is not a string.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Reports file not found: {path}")
    reports = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {line_number}: not valid JSON ({error}).") from error
            if not isinstance(record, dict) or field not in record:
                raise ValueError(f"{path}, line {line_number}: no field {field!r}.")
            if not isinstance(record[field], str):
                raise ValueError(
                    f"{path}, line {line_number}: field {field!r} is {type(record[field]).__name__}, expected a string."
                )
            reports.append(record[field])
    return reports


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_name", choices=DATASET_NAMES, help="dataset loaded with load_cxr_dataset")
    parser.add_argument(
        "--reports_jsonl", help="JSON-lines corpus with a 'report' field; held-out reports of --dataset_name are removed"
    )
    parser.add_argument("--data_dir", default=None, help="data folder for --dataset_name")
    parser.add_argument("--cache_dir", default=None, help="datasets cache folder for --dataset_name")
    parser.add_argument("--output_dir", required=True, help="where to save the QDistillProcessor")
    parser.add_argument("--vocab_size", type=int, default=8000)
    parser.add_argument("--algorithm", choices=("wordpiece", "bpe"), default="wordpiece")
    parser.add_argument("--min_frequency", type=int, default=2)
    parser.add_argument("--model_max_length", type=int, default=256)
    parser.add_argument("--text_column", default="report")
    parser.add_argument("--resize_mode", choices=("pad", "squash"), default="pad")
    args = parser.parse_args(argv)
    if not (args.dataset_name or args.reports_jsonl):
        parser.error("give --dataset_name, --reports_jsonl or both")
    return args


def _normalise(text: str) -> str:
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> QDistillProcessor:
    """Train the tokenizer, build the processor and save it to `--output_dir`.

    Args:
        argv (`list[str]`, *optional*): command-line arguments; defaults to `sys.argv[1:]`.

    Returns:
        The saved [`QDistillProcessor`].
    """
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    tokenizer_kwargs = {
        "vocab_size": args.vocab_size,
        "algorithm": args.algorithm,
        "model_max_length": args.model_max_length,
        "min_frequency": args.min_frequency,
    }

    # 1. The dataset's train reports only; its validation/test reports are only used to filter the JSONL corpus.
    train_reports, held_out, sources = [], set(), []
    if args.dataset_name:
        from qdistill_hf.data.data_cxr import load_cxr_dataset

        dataset_dict = load_cxr_dataset(args.dataset_name, data_dir=args.data_dir, cache_dir=args.cache_dir)
        train_reports = list(dataset_dict["train"][args.text_column])
        for split in dataset_dict:
            if split != "train":
                held_out.update(_normalise(text) for text in dataset_dict[split][args.text_column])
        sources.append(f"{len(train_reports)} train reports of {args.dataset_name} (splits: {list(dataset_dict)})")

    # 2. Optional JSONL corpus, minus any report that is held out in the dataset.
    if args.reports_jsonl:
        reports = read_reports_jsonl(args.reports_jsonl, field=args.text_column)
        kept = [text for text in reports if _normalise(text) not in held_out]
        if args.dataset_name:
            logger.info("Removed %d reports of %s that are validation/test reports of %s.",
                        len(reports) - len(kept), args.reports_jsonl, args.dataset_name)
        else:
            logger.warning("%s has no splits and no --dataset_name was given: training on all %d reports; keep "
                           "held-out reports out of it yourself.", args.reports_jsonl, len(reports))
        sources.append(f"{len(kept)} of {len(reports)} reports from {args.reports_jsonl}")
        tokenizer = train_report_tokenizer(train_reports + kept, **tokenizer_kwargs)
    else:
        # build_report_tokenizer re-checks that only the train split is read and names bad rows.
        tokenizer = build_report_tokenizer(dataset_dict, text_column=args.text_column, **tokenizer_kwargs)
    corpus_description = " + ".join(sources)

    # 3. Bundle with the image processor and save.
    image_processor = QDistillImageProcessor(resize_mode=args.resize_mode)
    processor = QDistillProcessor(image_processor=image_processor, tokenizer=tokenizer)
    processor.save_pretrained(args.output_dir)
    print(
        f"Saved QDistillProcessor to {args.output_dir}: vocabulary {len(tokenizer)} tokens "
        f"({args.algorithm}) from {corpus_description}; resize_mode={args.resize_mode}."
    )
    return processor


if __name__ == "__main__":
    main()
