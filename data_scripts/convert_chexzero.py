"""Convert a CheXzero checkpoint (OpenAI CLIP state dict) into a transformers CLIPVisionModel folder.

Example:
    HF_HUB_OFFLINE=1 python data_scripts/convert_chexzero.py \
        --checkpoint checkpt/chexzero_best.pt --output_dir chexzero-vit-b32
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

# Allows running from a source checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qdistill_hf.convert.convert_chexzero_to_hf import convert_chexzero_checkpoint  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line.

    Args:
        argv: arguments without the program name; ``None`` reads ``sys.argv``.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="CheXzero .pt state dict")
    parser.add_argument("--output_dir", required=True, type=Path, help="folder for save_pretrained")
    parser.add_argument(
        "--num_attention_heads", type=int, default=None, help="override OpenAI's width // 64 head count"
    )
    parser.add_argument(
        "--with_projection",
        action="store_true",
        help="save CLIPVisionModelWithProjection (keeps visual.proj) instead of CLIPVisionModel",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the conversion and print what was written."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model = convert_chexzero_checkpoint(
        args.checkpoint,
        args.output_dir,
        num_attention_heads=args.num_attention_heads,
        with_projection=args.with_projection,
    )
    config = model.config
    print(f"converted {args.checkpoint} -> {args.output_dir} ({type(model).__name__})")
    print(
        f"config: hidden_size={config.hidden_size} layers={config.num_hidden_layers} "
        f"heads={config.num_attention_heads} patch={config.patch_size} image={config.image_size} "
        f"intermediate={config.intermediate_size} projection_dim={config.projection_dim}"
    )
    print(f"parameters: {model.num_parameters():,}")
    for path in sorted(args.output_dir.iterdir()):
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
