#!/usr/bin/env python3
"""Prepare a CXR dataset with the `data_cxr` builder and print split sizes and label counts.

Examples:

    HF_HUB_OFFLINE=1 python data_scripts/prepare_dataset.py --dataset_name synthetic --num_train 200 \
        --output_dir out/synthetic
    HF_HUB_OFFLINE=1 python data_scripts/prepare_dataset.py --dataset_name qdistill_folder \
        --data_dir ../shared/data/cxr-paired --label_names normal abnormal

`--output_dir` writes `save_to_disk` output with the image bytes embedded (reload with `datasets.load_from_disk`).
Builder options left out keep the `CxrBuilderConfig` defaults; their allowed values are checked by the builder
(`CxrBuilderConfig.validate_options`), which names the option and its choices.
"""

import ast
import collections
import dataclasses
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

# Light on purpose: datasets, torch and qdistill_hf are imported after parsing, so `--help` answers at once.
from transformers import HfArgumentParser


os.environ.setdefault("HF_HUB_OFFLINE", "1")


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


DatasetName = Literal[builder_config_names()]


@dataclass
class PrepareArguments:
    """What to build and where to put it."""

    dataset_name: DatasetName = field(metadata={"help": "Builder config of qdistill_hf.data.data_cxr."})
    data_dir: str | None = field(default=None, metadata={"help": "Data folder (not needed for synthetic)."})
    cache_dir: str | None = field(default=None, metadata={"help": "datasets cache folder for the Arrow files."})
    output_dir: str | None = field(default=None, metadata={"help": "save_to_disk here (image bytes embedded)."})
    contact_sheet: str | None = field(
        default=None, metadata={"help": "synthetic only: also write a PNG grid of 16 films here."}
    )

    def __post_init__(self):
        if self.contact_sheet and self.dataset_name != "synthetic":
            raise ValueError("--contact_sheet is only for --dataset_name synthetic")


@dataclass
class BuilderOptions:
    """`CxrBuilderConfig` options; `None` (left out) keeps the builder's default. See that class for each."""

    _argument_group_name = "builder config options (see qdistill_hf.data.data_cxr.CxrBuilderConfig)"

    label_names: list[str] | None = field(default=None, metadata={"help": "Class names, index = class id."})
    verify_images: bool | None = field(default=None, metadata={"help": "true/false."})
    metadata_file: str | None = None
    pseudo_report_dir: str | None = None
    priority_file: str | None = None
    require_pseudo_report: bool | None = field(default=None, metadata={"help": "true/false."})
    missing_pseudo_report: str | None = None
    images_subdir: str | None = None
    reports_source: str | None = None
    frontal_rule: str | None = None
    projections_csv: str | None = None
    split_fractions: list[float] | None = field(default=None, metadata={"help": "train validation test fractions."})
    split_seed: str | None = None
    incomplete_studies: str | None = None
    mimic_reports_dir: str | None = None
    view_preference: list[str] | None = None
    label_source: str | None = None
    num_train: int | None = None
    num_validation: int | None = None
    num_test: int | None = None
    image_size: int | None = None
    seed: int | None = None

    def __post_init__(self):
        if self.split_fractions is not None and len(self.split_fractions) != 3:
            raise ValueError(f"--split_fractions takes 3 numbers (train validation test), got {self.split_fractions}")

    def given(self) -> dict:
        """The options given on the command line, as `load_cxr_dataset` keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


def parse_args(argv: list[str] | None = None) -> tuple[PrepareArguments, BuilderOptions]:
    """Parse the command line (see the module docstring)."""
    parser = HfArgumentParser((PrepareArguments, BuilderOptions), description=__doc__.split("\n")[0])
    return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)


def main(argv: list[str] | None = None) -> int:
    """Prepare the dataset, print split sizes and label counts, and optionally save it and a contact sheet."""
    args, options = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from qdistill_hf.data.data_cxr import load_cxr_dataset
    from qdistill_hf.data.synthetic_cxr import save_contact_sheet

    dd = load_cxr_dataset(args.dataset_name, data_dir=args.data_dir, cache_dir=args.cache_dir, **options.given())
    for split, ds in dd.items():
        names = ds.features["label"].names
        counts = collections.Counter(ds["label"])
        pretty = ", ".join(f"{names[i]}={counts.get(i, 0)}" for i in range(len(names)))
        print(f"{split}: {ds.num_rows} studies ({pretty})")
    if args.output_dir:
        dd.save_to_disk(args.output_dir)
        print(f"saved to {args.output_dir}")
    if args.contact_sheet:
        save_contact_sheet(
            args.contact_sheet, num_cases=16, image_size=options.image_size or 224, seed=options.seed or 0
        )
        print(f"contact sheet: {args.contact_sheet}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
