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

import ast
import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

# Light on purpose: datasets, tokenizers and qdistill_hf are imported after parsing, so `--help` answers at once.
from transformers import HfArgumentParser


logger = logging.getLogger(__name__)


def builder_config_names() -> tuple[str, ...]:
    """`qdistill_hf.data.data_cxr.CONFIG_NAMES`, read from that module's source without importing it.

    Importing any `qdistill_hf` module imports torch and transformers' models (about 7 s), too slow for `--help`;
    the tuple literal is read with `ast` instead, so the choices stay the builder's own.
    """
    spec = importlib.util.find_spec("qdistill_hf")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("qdistill_hf is not installed: run `pip install -e .` from the repository root")
    source_path = Path(next(iter(spec.submodule_search_locations)), "data", "data_cxr.py")
    for node in ast.parse(source_path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "CONFIG_NAMES" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise RuntimeError(f"{source_path}: no `CONFIG_NAMES = (...)` literal to read the dataset configs from")


@dataclass
class TokenizerArguments:
    """Where the corpus comes from, the tokenizer's settings and where the processor goes."""

    output_dir: str = field(metadata={"help": "Where to save the QDistillProcessor."})
    dataset_name: Literal[builder_config_names()] | None = field(
        default=None, metadata={"help": "Dataset loaded with load_cxr_dataset; its train split is the corpus."}
    )
    reports_jsonl: str | None = field(
        default=None,
        metadata={"help": "JSON-lines corpus with a 'report' field; held-out reports of --dataset_name are removed."},
    )
    data_dir: str | None = field(default=None, metadata={"help": "Data folder for --dataset_name."})
    cache_dir: str | None = field(default=None, metadata={"help": "datasets cache folder for --dataset_name."})
    vocab_size: int = field(default=8000, metadata={"help": "Target vocabulary size."})
    algorithm: Literal["wordpiece", "bpe"] = field(default="wordpiece", metadata={"help": "Tokenizer model."})
    min_frequency: int = field(default=2, metadata={"help": "Minimum count for a sub-word to enter the vocabulary."})
    model_max_length: int = field(default=256, metadata={"help": "Truncation length, [CLS]/[SEP] included."})
    text_column: str = field(default="report", metadata={"help": "Report column (and JSONL field)."})
    resize_mode: Literal["pad", "squash"] = field(
        default="pad", metadata={"help": "QDistillImageProcessor: pad to square, or squash."}
    )

    def __post_init__(self):
        if not (self.dataset_name or self.reports_jsonl):
            raise ValueError("give --dataset_name, --reports_jsonl or both")


def parse_args(argv: list[str] | None = None) -> TokenizerArguments:
    """Parse the command line (see the module docstring)."""
    parser = HfArgumentParser(TokenizerArguments, description=__doc__.split("\n\n")[0])
    (args,) = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    return args


def _normalise(text: str) -> str:
    return " ".join(text.split())


def main(argv: list[str] | None = None):
    """Train the tokenizer, build the processor and save it to `--output_dir`.

    Args:
        argv (`list[str]`, *optional*): command-line arguments; defaults to `sys.argv[1:]`.

    Returns:
        The saved [`QDistillProcessor`].
    """
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from qdistill_hf.models.processing_qdistill import QDistillImageProcessor, QDistillProcessor
    from qdistill_hf.models.tokenization_qdistill import (
        build_report_tokenizer,
        read_reports_jsonl,
        train_report_tokenizer,
    )

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
        tokenizer = train_report_tokenizer(train_reports + kept, source=" + ".join(sources), **tokenizer_kwargs)
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
