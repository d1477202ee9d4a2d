#!/usr/bin/env python3
"""Prepare a CXR dataset with the ``data_cxr`` builder and print split sizes and label counts.

Examples::

    python data_scripts/prepare_dataset.py --dataset_name synthetic --num_train 200 --output_dir out/synthetic
    python data_scripts/prepare_dataset.py --dataset_name qdistill_folder --data_dir ../shared/data/cxr-paired \
        --label_names normal abnormal

``--output_dir`` writes ``save_to_disk`` output with the image bytes embedded (reload with
``datasets.load_from_disk``). Options left out keep the ``CxrBuilderConfig`` defaults.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from qdistill_hf.data.data_cxr import CONFIG_NAMES, load_cxr_dataset  # noqa: E402
from qdistill_hf.data.synthetic_cxr import save_contact_sheet  # noqa: E402


def parse_bool(text: str) -> bool:
    """Strict true/false for flags: anything but 1/true/yes/0/false/no is an error, never a silent False."""
    value = text.strip().lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


# (flag, argparse kwargs) for every CxrBuilderConfig option exposed on the command line.
_OPTIONS = {
    "label_names": {"nargs": "+", "help": "class names, index = class id"},
    "verify_images": {"type": parse_bool, "help": "true/false"},
    "metadata_file": {},
    "pseudo_report_dir": {},
    "priority_file": {},
    "require_pseudo_report": {"type": parse_bool, "help": "true/false"},
    "missing_pseudo_report": {"choices": ["error", "drop", "allow"]},
    "images_subdir": {},
    "reports_source": {},
    "frontal_rule": {"choices": ["lowest_suffix", "first"]},
    "projections_csv": {},
    "split_fractions": {"nargs": 3, "type": float},
    "split_seed": {},
    "incomplete_studies": {"choices": ["error", "drop"]},
    "mimic_reports_dir": {},
    "view_preference": {"nargs": "+"},
    "label_source": {"choices": ["auto", "rules", "priority_csv"]},
    "num_train": {"type": int},
    "num_validation": {"type": int},
    "num_test": {"type": int},
    "image_size": {"type": int},
    "seed": {"type": int},
}


def parse_args(argv=None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset_name", required=True, choices=CONFIG_NAMES)
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--cache_dir", default=None)
    parser.add_argument("--output_dir", default=None, help="save_to_disk here (image bytes embedded)")
    parser.add_argument("--contact_sheet", default=None, help="synthetic only: also write a PNG grid of 16 films here")
    group = parser.add_argument_group("builder config options (see qdistill_hf.data.data_cxr.CxrBuilderConfig)")
    for name, kwargs in _OPTIONS.items():
        group.add_argument(f"--{name}", default=None, **kwargs)
    args = parser.parse_args(argv)
    if args.contact_sheet and args.dataset_name != "synthetic":
        parser.error("--contact_sheet is only for --dataset_name synthetic")
    return args


def main(argv=None) -> int:
    """Prepare the dataset, print split sizes and label counts, and optionally save it and a contact sheet."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    config_kwargs = {k: getattr(args, k) for k in _OPTIONS if getattr(args, k) is not None}
    dd = load_cxr_dataset(args.dataset_name, data_dir=args.data_dir, cache_dir=args.cache_dir, **config_kwargs)
    for split, ds in dd.items():
        names = ds.features["label"].names
        counts = collections.Counter(ds["label"])
        pretty = ", ".join(f"{names[i]}={counts.get(i, 0)}" for i in range(len(names)))
        print(f"{split}: {ds.num_rows} studies ({pretty})")
    if args.output_dir:
        dd.save_to_disk(args.output_dir)
        print(f"saved to {args.output_dir}")
    if args.contact_sheet:
        save_contact_sheet(args.contact_sheet, num_cases=16, image_size=args.image_size or 224, seed=args.seed or 0)
        print(f"contact sheet: {args.contact_sheet}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
