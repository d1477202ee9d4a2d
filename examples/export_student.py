"""Export a saved student (ONNX, torch.export, int8) and print the compression table on a validation split.

    python examples/export_student.py --model outputs/demo/student --output_dir outputs/deploy
    python examples/export_student.py --model outputs/demo/student --output_dir outputs/deploy --prune 0.3 \\
        --table_split validation --demo_dir outputs/demo      # the demo's synthetic validation films (default)

Writes `student.onnx` (fp32), `student.int8.onnx` (onnxruntime dynamic int8), `student.pt2` (torch.export) and
`compression.json` + `compression.md` to `--output_dir`. The table compares the float student, its torch.ao int8 copy,
the magnitude-pruned copy (`--prune`), and the two ONNX files on the films of `--table_split` (the demo's dataset:
synthetic films, or `--data_dir` a qdistill_folder dataset, split as demo.py splits it), with CPU single-film latency
at `--threads` threads. Every exported file carries the calibration temperature, the decision threshold and the
preprocessing constants (see qdistill_hf/deploy/export.py).
"""

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # demo (the one definition of the demo's splits)

logger = logging.getLogger("export_student")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="outputs/demo/student",
                        help="a saved student folder, or 'random-paper' for a randomly initialised image-only student "
                             "at the paper's sizes (CheXzero ViT-B/32 geometry; sizes and latency only)")
    parser.add_argument("--output_dir", default="outputs/deploy")
    parser.add_argument("--formats", nargs="+", choices=["onnx", "torch_export"], default=["onnx", "torch_export"])
    parser.add_argument("--no_int8", action="store_true", help="skip the int8 variants")
    parser.add_argument("--prune", type=float, default=None, help="also a magnitude-pruned copy at this amount")
    parser.add_argument("--table_split", default="validation",
                        help="split for the table, 'random:N' for N random films without labels (no AUROC), or "
                             "'none' to skip the table")
    parser.add_argument("--demo_dir", default="outputs/demo", help="where demo.py cached its dataset")
    parser.add_argument("--data_dir", default=None, help="a qdistill_folder dataset instead of the synthetic films")
    parser.add_argument("--max_films", type=int, default=None, help="at most this many films in the table")
    parser.add_argument("--threads", type=int, default=1, help="torch / ONNX Runtime threads for the latency column")
    parser.add_argument("--latency_repeats", type=int, default=20)
    return parser.parse_args(argv)


def split_films(args, image_processor):
    """`(pixel_values, labels)` of the table split, from the demo's dataset definition."""
    import demo

    demo_argv = ["--output_dir", args.demo_dir] + (["--data_dir", args.data_dir] if args.data_dir else [])
    splits = demo.load_data(demo.parse_args(demo_argv))
    if isinstance(splits, tuple):  # (DatasetDict, selection split name, evaluation split name)
        splits = splits[0]
    if args.table_split not in splits:
        raise SystemExit(f"--table_split {args.table_split!r} is not a split of the dataset: {list(splits)}")
    split = splits[args.table_split]
    if args.max_films is not None:
        split = split.select(range(min(args.max_films, len(split))))
    pixel_values = image_processor(list(split["image"]), return_tensors="pt")["pixel_values"]
    return pixel_values, torch.tensor(split["label"])


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for chatty in ("onnx_ir", "onnxscript"):  # one INFO line per deduplicated initializer of the ONNX export
        logging.getLogger(chatty).setLevel(logging.WARNING)
    args = parse_args(argv)
    from transformers import AutoImageProcessor, AutoModel

    import qdistill_hf  # noqa: F401 - registers the Auto classes
    from qdistill_hf.deploy import (
        OnnxTriageModel,
        compression_table,
        export_student,
        format_compression_table,
        prune_linear_magnitude,
        quantize_dynamic_int8,
        quantize_onnx_int8,
    )

    if args.model == "random-paper":
        from qdistill_hf import QDistillImageProcessor, QDistillStudentConfig, QDistillStudentModel

        torch.manual_seed(0)
        model = QDistillStudentModel(QDistillStudentConfig(text_mode="image_only")).eval()
        image_processor = QDistillImageProcessor()
    elif not Path(args.model).is_dir():
        raise SystemExit(f"--model {args.model} is not a folder; run `make demo` first or pass a saved student")
    else:
        model = AutoModel.from_pretrained(args.model).eval()
        image_processor = AutoImageProcessor.from_pretrained(args.model)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    if "onnx" in args.formats:
        files["onnx"] = export_student(model, output_dir / "student.onnx", image_processor=image_processor)
        if not args.no_int8:
            files["onnx_int8"] = quantize_onnx_int8(files["onnx"], output_dir / "student.int8.onnx")
    if "torch_export" in args.formats:
        files["torch_export"] = export_student(model, output_dir / "student.pt2", format="torch_export",
                                               image_processor=image_processor)
    for name, path in files.items():
        print(f"{name}: {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if args.table_split == "none":
        return None
    if model.config.text_mode != "image_only":
        raise SystemExit("The compression table feeds films only; export a pseudo_report student with --table_split none")
    variants = {"fp32": model}
    if not args.no_int8:
        variants["int8 (torch.ao dynamic)"] = quantize_dynamic_int8(model)
    if args.prune is not None:
        variants[f"pruned {args.prune:.0%} (L1, per layer)"] = prune_linear_magnitude(model, args.prune)
    for name in ("onnx", "onnx_int8"):
        if name in files:
            variants[name.replace("_", " ")] = OnnxTriageModel(files[name], threads=args.threads)
    if args.table_split.startswith("random:"):
        side = model.config.vision_config.image_size
        count = int(args.table_split.split(":", 1)[1])
        pixel_values = torch.randn(count, 3, side, side, generator=torch.Generator().manual_seed(0))
        labels = None
    else:
        pixel_values, labels = split_films(args, image_processor)
    rows = compression_table(variants, pixel_values, labels, temperature=float(model.config.calibration_temperature),
                             threads=args.threads, latency_repeats=args.latency_repeats)
    table = format_compression_table(rows)
    (output_dir / "compression.json").write_text(json.dumps({"model": args.model, "split": args.table_split,
                                                             "rows": rows}, indent=2) + "\n")
    (output_dir / "compression.md").write_text(table + "\n")
    print(table)
    return rows


if __name__ == "__main__":
    main()
