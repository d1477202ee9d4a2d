"""Convert a CheXzero checkpoint (OpenAI CLIP state dict) into a transformers CLIPVisionModel folder.

Example:
    HF_HUB_OFFLINE=1 python data_scripts/convert_chexzero.py \
        --checkpoint checkpt/chexzero_best.pt --output_dir chexzero-vit-b32
"""

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Light on purpose: torch and qdistill_hf are imported after parsing, so `--help` answers at once.
from transformers import HfArgumentParser


@dataclass
class ConvertArguments:
    """Options of the CheXzero conversion."""

    checkpoint: Path = field(metadata={"help": "CheXzero .pt state dict (OpenAI CLIP)."})
    output_dir: Path = field(metadata={"help": "Folder for save_pretrained."})
    num_attention_heads: int | None = field(
        default=None, metadata={"help": "Override OpenAI's width // 64 head count."}
    )
    with_projection: bool = field(
        default=False,
        metadata={"help": "Save CLIPVisionModelWithProjection (keeps visual.proj) instead of CLIPVisionModel."},
    )


def parse_args(argv: list[str] | None = None) -> ConvertArguments:
    """Parse the command line.

    Args:
        argv (`list[str]`, *optional*): arguments without the program name; `None` reads `sys.argv`.
    """
    parser = HfArgumentParser(ConvertArguments, description=__doc__.splitlines()[0])
    (args,) = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the conversion and print what was written."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from qdistill_hf.convert.convert_chexzero_to_hf import convert_chexzero_checkpoint

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
