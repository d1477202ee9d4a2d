"""Throughput of one Q-DISTILL teacher training step on cached image features.

One step = forward (unimodal query pass, report pass, bidirectional pass over positives + hard negatives for ITM,
classification) + backward + AdamW, at the original's configuration: batch 64, 12 queries, 4 layers, hidden 768,
50 x 768 frozen-encoder tokens, reports padded to the longest of the batch. FLOPs are counted from the executed ops
(`torch.utils.flop_counter`) and compared with a dense matmul peak measured in the same run (bf16 on GPU, fp32 on CPU).

    python examples/benchmark_qformer.py                       # CPU, smaller defaults for a quick figure
    python examples/benchmark_qformer.py --device cuda --batch_size 64 --steps 50
"""

import argparse
import json
import platform
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from qdistill_hf import QDistillTeacherConfig, QDistillTeacherModel


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 30 on GPU, 3 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5 on GPU, 1 on CPU)")
    parser.add_argument("--min_report_tokens", type=int, default=48)
    parser.add_argument("--max_report_tokens", type=int, default=128)
    parser.add_argument("--vocab_size", type=int, default=10000)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="autocast dtype (default bf16 on GPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def make_batch(args, device, generator):
    batch, longest = args.batch_size, args.max_report_tokens
    lengths = torch.randint(args.min_report_tokens, longest + 1, (batch,), generator=generator)
    lengths[0] = longest  # dynamic padding: the batch is as long as its longest report
    input_ids = torch.randint(5, args.vocab_size, (batch, longest), generator=generator)
    attention_mask = (torch.arange(longest)[None] < lengths[:, None]).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    input_ids[:, 0] = 2
    input_ids[torch.arange(batch), lengths - 1] = 3
    return {
        "image_features": torch.randn(batch, 50, 768, generator=generator).to(device),
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "labels": torch.randint(0, 2, (batch,), generator=generator).to(device),
        "return_loss": True,
    }


def matmul_peak(device, dtype, size, repeats):
    """Dense matmul FLOP/s of this device at this dtype, measured now."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    args = parse_args()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    steps = args.steps or (30 if on_gpu else 3)
    warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 1)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if on_gpu else "fp32")]
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    config = QDistillTeacherConfig(qformer_config={"vocab_size": args.vocab_size})
    model = QDistillTeacherModel(config).to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=on_gpu)
    forward = torch.compile(model) if args.compile else model
    batch = make_batch(args, device, generator)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = forward(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.clamp_logit_scale()
        return loss

    for _ in range(warmup):
        step()
    with FlopCounterMode(display=False) as counter:
        step()
    flops_per_step = counter.get_total_flops()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps

    peak = matmul_peak(device, dtype, 8192 if on_gpu else 2048, 20 if on_gpu else 5)
    result = {
        "device": torch.cuda.get_device_name(device) if on_gpu else f"CPU {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads",
        "dtype": str(dtype).removeprefix("torch."),
        "compile": args.compile,
        "batch_size": args.batch_size,
        "report_tokens": int(batch["attention_mask"].shape[1]),
        "itm_pairs": int(3 * args.batch_size),
        "trainable_params": sum(p.numel() for p in trainable),
        "ms_per_step": round(seconds * 1e3, 2),
        "images_per_s": round(args.batch_size / seconds, 1),
        "tflops_per_step": round(flops_per_step / 1e12, 4),
        "achieved_tflops": round(flops_per_step / seconds / 1e12, 3),
        "matmul_peak_tflops": round(peak / 1e12, 3),
        "mfu": round(flops_per_step / seconds / peak, 4),
        "final_loss": round(float(loss.detach()), 4),
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
