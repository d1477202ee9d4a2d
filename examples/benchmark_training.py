"""Training-step throughput and peak memory of the Q-DISTILL teacher and of the distillation step.

Variants (every combination is run unless `--variants` narrows them):

* `teacher/<input>/<mode>`: one teacher training step = forward with `return_loss=True` and labels (unimodal query
  pass, report pass, bidirectional pass over positives + hard negatives for ITM, focal classification), backward,
  AdamW step, `clamp_logit_scale`.
* `distill/<input>/<targets>/<mode>`: one distillation step = student forward with labels (focal) + KD
  (`embedding_alignment_loss`, MSE + cosine, between `student.projected_output` and the teacher's pooled
  bidirectional queries, + `distillation_kl_loss` on the logits at T=2), backward, AdamW step.
  `<targets>` is `live` (the frozen teacher runs inside the step, under `no_grad`, on the image and the human report)
  or `cached` (the teacher's pooled queries and logits were precomputed once, as the training helper's teacher-target
  cache provides them; no teacher is in memory during the step).
* `<input>` is `features` (cached frozen-encoder features, `image_features=`) or `pixels` (the frozen CheXzero
  ViT-B/32 runs inside the step under `no_grad`; with a live teacher its features are computed once and fed to both
  models, which share the same frozen encoder).
* `<mode>` is `eager` or `compiled` (`torch.compile` of the step's forward + loss; backward and the optimizer step
  stay eager). A compiled variant that fails is skipped with its reason logged and kept in the JSON.

`--sizes paper` is the original's configuration: teacher batch 64, 12 queries, 4 layers, hidden 768, 12 heads;
CheXzero ViT-B/32 geometry (224 px, patch 32 -> 50 x 768 features); student batch 32 with the package's student
defaults (8 queries, 2 layers, hidden 384, reading a pseudo-report); reports of 48-128 tokens padded to the longest of
the batch. `--sizes tiny` is a smoke run of the same code (about 30 s with `--compile_backend eager`).

GPU: bf16 autocast, fused AdamW, peak memory = `torch.cuda.max_memory_allocated` over the timed steps. CPU: fp32,
peak memory = peak resident set size of the whole process over the timed steps (Linux `VmHWM`, reset before the
timed steps through `/proc/self/clear_refs`; it includes the weights of every model alive in the variant, the Python
interpreter and the torch libraries; where the reset is refused, `ru_maxrss`, the process-lifetime peak).
Throughput is `batch / median step time` at the stated batch. FLOPs are counted from the executed ops of one eager
step (`torch.utils.flop_counter`) and the model FLOPs utilisation (`mfu`) is taken against a dense matmul peak
measured in the same run (bf16 on GPU, fp32 on CPU).

    python examples/benchmark_training.py --sizes tiny --compile_backend eager  # smoke run, ~30 s
    python examples/benchmark_training.py --device cuda --steps 30              # paper sizes, all variants
    python examples/benchmark_training.py --device cpu --threads 2 --batch_size_teacher 8 --batch_size_student 8 \\
        --steps 3 --warmup 1 --variants 'teacher/features/*'
"""

import argparse
import ctypes
import datetime
import fnmatch
import gc
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import time
from pathlib import Path

import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

from qdistill_hf import QDistillStudentConfig, QDistillStudentModel, QDistillTeacherConfig, QDistillTeacherModel
from qdistill_hf.models.loss_qdistill import distillation_kl_loss, embedding_alignment_loss

logger = logging.getLogger("benchmark_training")

DISTILLATION_TEMPERATURE = 2.0
# H100 with AMP, from the issue that set the goals (measured elsewhere; printed next to the results for comparison).
ANCHORS = {
    "original_teacher_images_per_s_h100_amp": 450,
    "original_student_images_per_s_h100_amp": 290,
    "vit_b32_fp16_forward_images_per_s_h100": 18500,
    "goal_teacher_images_per_s_h100_cached_features": 4000,
    "goal_distillation_images_per_s_h100_cached_features": 5000,
}
SIZES = {
    "paper": {
        "vision": {},  # CheXzero ViT-B/32: the configuration's default
        "teacher_qformer": {},  # 12 queries, 4 layers, hidden 768, 12 heads: the configuration's default
        "teacher": {},
        "student_qformer": {},  # 8 queries, 2 layers, hidden 384, 6 heads: the student's defaults
        "student": {},
        "vocab_size": 10000,
        "report_tokens": (48, 128),
        "batch_size_teacher": 64,
        "batch_size_student": 32,
    },
    "tiny": {
        "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                   "image_size": 32, "patch_size": 8, "projection_dim": 16},
        "teacher_qformer": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                            "intermediate_size": 64, "num_query_tokens": 4, "max_position_embeddings": 64},
        "teacher": {"embed_dim": 16},
        "student_qformer": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                            "intermediate_size": 32, "num_query_tokens": 4, "max_position_embeddings": 64},
        "student": {"teacher_hidden_size": 32},
        "vocab_size": 100,
        "report_tokens": (8, 16),
        "batch_size_teacher": 4,
        "batch_size_student": 4,
    },
}


def all_variants():
    """Every variant name, eager before compiled (a compile failure then costs nothing already measured)."""
    names = []
    for mode in ("eager", "compiled"):
        for source in ("features", "pixels"):
            names.append(f"teacher/{source}/{mode}")
            for targets in ("live", "cached"):
                names.append(f"distill/{source}/{targets}/{mode}")
    return names


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", choices=sorted(SIZES), default="paper")
    parser.add_argument("--batch_size_teacher", type=int, default=None, help="default: 64 (paper), 4 (tiny)")
    parser.add_argument("--batch_size_student", type=int, default=None, help="default: 32 (paper), 4 (tiny)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 30 on GPU, 3 on CPU)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps (default 5 on GPU, 1 on CPU); at least one always runs: it counts the "
                             "FLOPs (eager) or compiles (compiled)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the torch.compile'd variants (--no-compile: eager only)")
    parser.add_argument("--compile_backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument("--compile_mode", default=None, help="torch.compile mode, e.g. max-autotune")
    parser.add_argument("--variants", nargs="+", default=["*"],
                        help="glob patterns over variant names, e.g. 'teacher/*' 'distill/features/*/eager'")
    parser.add_argument("--student_text_mode", choices=["pseudo_report", "image_only"], default="pseudo_report",
                        help="the student reads a pseudo-report (the configuration's default) or the film only")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="autocast dtype (default bf16 on GPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--output", default="outputs/benchmark_training.json", help="where the JSON is written")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("batch_size_teacher", "batch_size_student", "steps", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    if args.warmup is not None and args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.batch_size_teacher is not None and args.batch_size_teacher < 2:
        parser.error("--batch_size_teacher must be >= 2: ITC and ITM need negatives within the batch")
    return args


def select_variants(patterns, with_compile):
    names = [n for n in all_variants() if with_compile or not n.endswith("/compiled")]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise SystemExit(f"--variants {pattern!r} matches no variant; available: {', '.join(names)}")
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


# ----------------------------------------------------------------------------------------------- inputs and models


def make_reports(batch_size, min_tokens, max_tokens, vocab_size, generator):
    """
    Random reports of `min_tokens..max_tokens` tokens (`[CLS]=2 ... [SEP]=3`, padding 0), padded to the longest of the
    batch; one report has the maximum length, as dynamic padding over a realistic batch gives.
    """
    lengths = torch.randint(min_tokens, max_tokens + 1, (batch_size,), generator=generator)
    lengths[0] = max_tokens
    attention_mask = (torch.arange(max_tokens)[None] < lengths[:, None]).long()
    input_ids = torch.randint(5, vocab_size, (batch_size, max_tokens), generator=generator)
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    input_ids[:, 0] = 2
    input_ids[torch.arange(batch_size), lengths - 1] = 3
    return input_ids, attention_mask


def build_models(sizes, student_text_mode, which):
    vision = dict(sizes["vision"])
    models = {}
    if "teacher" in which:
        models["teacher"] = QDistillTeacherModel(QDistillTeacherConfig(
            vision_config=vision, qformer_config={**sizes["teacher_qformer"], "vocab_size": sizes["vocab_size"]},
            **sizes["teacher"],
        ))
    if "student" in which:
        models["student"] = QDistillStudentModel(QDistillStudentConfig(
            vision_config=vision, text_mode=student_text_mode,
            qformer_config={**sizes["student_qformer"], "vocab_size": sizes["vocab_size"]}, **sizes["student"],
        ))
    return models


def image_inputs(model, batch_size, source, generator):
    vision = model.config.vision_config
    if source == "pixels":
        return {"pixel_values": torch.randn(batch_size, 3, vision.image_size, vision.image_size, generator=generator)}
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    return {"image_features": torch.randn(batch_size, tokens, vision.hidden_size, generator=generator)}


def to_device(batch, device):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------------- the steps


def teacher_setup(args, sizes, source, device, generator):
    models = build_models(sizes, args.student_text_mode, ("teacher",))
    teacher = models["teacher"].to(device).train()
    batch_size = args.batch_size_teacher
    input_ids, attention_mask = make_reports(batch_size, *sizes["report_tokens"], sizes["vocab_size"], generator)
    batch = to_device({
        **image_inputs(teacher, batch_size, source, generator),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": torch.randint(0, teacher.config.num_labels, (batch_size,), generator=generator),
    }, device)

    def forward_loss(batch):
        return teacher(**batch, return_loss=True).loss

    def after_step():
        teacher.clamp_logit_scale()

    info = {"batch_size": batch_size, "report_tokens": int(input_ids.shape[1])}
    return teacher, forward_loss, (batch,), after_step, info


def distill_setup(args, sizes, source, targets, device, generator):
    models = build_models(sizes, args.student_text_mode, ("teacher", "student"))
    teacher, student = models["teacher"].to(device).eval(), models["student"].to(device).train()
    teacher.requires_grad_(False)
    batch_size = args.batch_size_student
    images = to_device(image_inputs(student, batch_size, source, generator), device)
    report_ids, report_mask = make_reports(batch_size, *sizes["report_tokens"], sizes["vocab_size"], generator)
    teacher_text = to_device({"input_ids": report_ids, "attention_mask": report_mask}, device)
    student_text = {}
    if student.config.text_mode == "pseudo_report":
        pseudo_ids, pseudo_mask = make_reports(batch_size, *sizes["report_tokens"], sizes["vocab_size"], generator)
        student_text = to_device({"input_ids": pseudo_ids, "attention_mask": pseudo_mask}, device)
    labels = torch.randint(0, student.config.num_labels, (batch_size,), generator=generator).to(device)
    dtype = autocast_dtype(args, device)

    def teacher_targets(image_features, teacher_text):
        with torch.no_grad():
            out = teacher(image_features=image_features, **teacher_text)
        return out.query_output_bidirectional.mean(dim=1), out.logits

    def kd_loss(out, pooled, logits):
        mse, cosine = embedding_alignment_loss(out.projected_output, pooled)
        return out.loss + distillation_kl_loss(out.logits, logits, DISTILLATION_TEMPERATURE) + mse + cosine

    if targets == "cached":
        # What the teacher-target cache holds: the teacher's pooled bidirectional queries and logits, computed once.
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            features = student.get_image_features(**images)
            pooled, logits = teacher_targets(features, teacher_text)
        cached = (pooled.float(), logits.float())
        del teacher, models["teacher"], features  # the cached variant holds no teacher during the step

        def forward_loss(images, student_text, labels, pooled, logits):
            out = student(**images, **student_text, labels=labels)
            return kd_loss(out, pooled, logits)

        inputs = (images, student_text, labels, *cached)
    else:

        def forward_loss(images, student_text, teacher_text, labels):
            features = student.get_image_features(**images)  # frozen: no graph kept through the encoder
            pooled, logits = teacher_targets(features, teacher_text)
            out = student(image_features=features, **student_text, labels=labels)
            return kd_loss(out, pooled, logits)

        inputs = (images, student_text, teacher_text, labels)

    info = {
        "batch_size": batch_size,
        "report_tokens": int(report_ids.shape[1]),
        "student_text_mode": student.config.text_mode,
    }
    return student, forward_loss, inputs, None, info


def autocast_dtype(args, device):
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]


# ------------------------------------------------------------------------------------------------ measurement


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_kb(field):
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """
    Memory of one variant: CUDA allocator on GPU; on CPU the process resident set (`VmRSS`, and `VmHWM`, its peak,
    resettable on Linux). Freed heap is handed back to the OS (`malloc_trim`) before a variant, so that its baseline
    does not carry the previous variant's freed memory.
    """

    def __init__(self, device):
        self.device = device
        self.kind = None

    def release(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            return
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc: the baseline may include freed memory
            pass

    def current_mb(self):
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**20
        rss = _proc_status_kb("VmRSS")
        return None if rss is None else rss / 1024

    def reset(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "torch.cuda.max_memory_allocated over the timed steps"
            return
        self.release()  # e.g. the teacher that computed the cached targets, freed but still resident
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.kind = "process peak RSS over the timed steps (VmHWM after reset)"
        except OSError:
            self.kind = "process-lifetime peak RSS (ru_maxrss; /proc/self/clear_refs refused)"

    def peak_mb(self):
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        hwm = _proc_status_kb("VmHWM") if self.kind.startswith("process peak") else None
        if hwm is None:  # Linux reports ru_maxrss in KiB
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return hwm / 1024


class CompileFailed(RuntimeError):
    """A compiled step raised: the variant is reported as skipped with this reason."""


def graph_break_count():
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def unique_graph_count():
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def graph_break_reasons():
    from torch._dynamo.utils import counters

    return dict(counters["graph_break"])


def run_variant(name, args, sizes, device, steps, warmup, flops_cache):
    parts = name.split("/")
    kind, source, mode = parts[0], parts[1], parts[-1]
    dtype = autocast_dtype(args, device)
    memory = PeakMemory(device)
    memory.release()
    baseline_mb = memory.current_mb()
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    if kind == "teacher":
        model, forward_loss, inputs, after_step, info = teacher_setup(args, sizes, source, device, generator)
    else:
        model, forward_loss, inputs, after_step, info = distill_setup(args, sizes, source, parts[2], device, generator)
    trainable = [p for p in model.parameters() if p.requires_grad]
    fused = device.type == "cuda"
    if kind == "teacher":
        optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=fused)
    else:
        optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=1e-4, fused=fused)

    compiled = mode == "compiled"
    if compiled:
        from torch import _dynamo
        from torch._dynamo.utils import counters

        _dynamo.reset()
        counters.clear()
        forward_loss = torch.compile(forward_loss, backend=args.compile_backend, mode=args.compile_mode)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = forward_loss(*inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
        return loss

    result = {"status": "ok", **info, "trainable_params": sum(p.numel() for p in trainable)}
    flops_key = name.removesuffix("/" + mode)
    compile_s = None
    for index in range(max(warmup, 1)):  # the first untimed step counts FLOPs (eager) or compiles (compiled)
        synchronize(device)
        start = time.perf_counter()
        if index == 0 and not compiled:
            with FlopCounterMode(display=False) as counter:
                step()
            flops_cache[flops_key] = counter.get_total_flops()
        elif index == 0:
            try:  # the first call compiles: its failures are the compile's
                step()
            except Exception as error:  # noqa: BLE001 - reported as a skipped variant
                message = str(error).strip().splitlines()[0] if str(error).strip() else ""
                raise CompileFailed(f"{type(error).__name__}: {message}"[:1000]) from error
        else:
            step()
        synchronize(device)
        if index == 0 and compiled:
            compile_s = time.perf_counter() - start
    if compiled:
        result["compile_s"] = round(compile_s, 2)
        result["graph_breaks"] = graph_break_count()
        result["graph_break_reasons"] = {k.strip().splitlines()[0][:200]: v for k, v in graph_break_reasons().items()}
        result["graphs"] = unique_graph_count()

    memory.reset()
    times, loss = [], None
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        loss = step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    final_loss = float(loss.detach())
    if not torch.isfinite(torch.tensor(final_loss)):
        raise FloatingPointError(f"{name}: non-finite loss {final_loss}")
    result.update({
        "ms_per_step": round(median * 1e3, 3),
        "ms_per_step_all": [round(t * 1e3, 3) for t in times],
        "images_per_s": round(info["batch_size"] / median, 2),
        "peak_memory_mb": round(memory.peak_mb(), 1),
        "memory_before_variant_mb": None if baseline_mb is None else round(baseline_mb, 1),
        "peak_memory_over_baseline_mb": None if baseline_mb is None else round(memory.peak_mb() - baseline_mb, 1),
        "peak_memory_kind": memory.kind,
        "final_loss": round(final_loss, 4),
    })
    flops = flops_cache.get(flops_key)
    if flops is not None:
        result["flops_per_step"] = int(flops)
        result["achieved_tflops"] = round(flops / median / 1e12, 6)
    if compiled:
        from torch import _dynamo

        _dynamo.reset()  # drop the compiled code and the models its guards hold
    return result  # the models and optimizer go with this frame; the next variant's `release` frees their memory


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


# --------------------------------------------------------------------------------------------------- reporting


def machine_facts(device):
    cpu_model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                                capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    facts = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {cpu_model}",
        "git_commit": commit,
    }
    return facts


def ratios(results):
    """Compile speed-ups, cached-vs-live teacher targets and features-vs-pixels, from the measured variants."""
    ok = {n: r for n, r in results.items() if r.get("status") == "ok"}
    out = {"compile_speedup": {}, "cached_over_live_teacher": {}, "features_over_pixels": {}}
    for name, r in ok.items():
        if name.endswith("/eager") and name.replace("/eager", "/compiled") in ok:
            out["compile_speedup"][name.removesuffix("/eager")] = round(
                ok[name.replace("/eager", "/compiled")]["images_per_s"] / r["images_per_s"], 3)
        if "/live/" in name and name.replace("/live/", "/cached/") in ok:
            out["cached_over_live_teacher"][name.replace("/live/", "/*/")] = round(
                ok[name.replace("/live/", "/cached/")]["images_per_s"] / r["images_per_s"], 3)
        if "/pixels/" in name and name.replace("/pixels/", "/features/") in ok:
            out["features_over_pixels"][name.replace("/pixels/", "/*/")] = round(
                ok[name.replace("/pixels/", "/features/")]["images_per_s"] / r["images_per_s"], 3)
    return out


def format_table(report):
    rows = [("variant", "batch", "ms/step", "images/s", "peak MB", "+MB", "GFLOP/step", "MFU", "compile s", "breaks")]
    skipped = []
    peak = report["matmul_peak_tflops"]
    for name, r in report["results"].items():
        if r.get("status") != "ok":
            rows.append((name, "-", "skipped", "", "", "", "", "", "", ""))
            skipped.append(f"{name} skipped: {r.get('reason', '')[:200]}")
            continue
        flops = r.get("flops_per_step")
        mfu = f"{r['mfu']:.3f}" if "mfu" in r else "-"
        rows.append((name, str(r["batch_size"]), f"{r['ms_per_step']:,.1f}", f"{r['images_per_s']:,.1f}",
                     f"{r['peak_memory_mb']:,.0f}",
                     "-" if r["peak_memory_over_baseline_mb"] is None else f"{r['peak_memory_over_baseline_mb']:,.0f}",
                     f"{flops / 1e9:,.4g}" if flops is not None else "-", mfu,
                     f"{r['compile_s']:.1f}" if "compile_s" in r else "-", str(r.get("graph_breaks", "-"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    facts = report["machine"]
    lines.insert(0, f"{facts['device_name']}, {facts['torch_threads']} threads, torch {facts['torch']}, "
                    f"{report['dtype']}, {facts['date_utc']}, load {facts['load_average_start']} -> "
                    f"{facts['load_average_end']}; images/s = batch / median step time at the stated batch")
    lines.extend(skipped)
    for group, values in report["ratios"].items():
        for key, value in values.items():
            lines.append(f"{group:>26}  {key}: {value:.2f}x")
    lines.append(f"matmul peak ({report['dtype']}): {peak:.3f} TFLOP/s; peak memory: {report['peak_memory_kind']}; "
                 "+MB: peak minus the memory in use before the variant built its models")
    a = report["anchors"]
    lines.append(
        f"anchors (H100, AMP, measured elsewhere): original teacher {a['original_teacher_images_per_s_h100_amp']} / "
        f"student {a['original_student_images_per_s_h100_amp']} images/s; ViT-B/32 fp16 forward alone "
        f"{a['vit_b32_fp16_forward_images_per_s_h100']:,} images/s; goals: teacher >= "
        f"{a['goal_teacher_images_per_s_h100_cached_features']:,}, distillation >= "
        f"{a['goal_distillation_images_per_s_h100_cached_features']:,} images/s from cached features"
    )
    return "\n".join(lines)


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    sizes = SIZES[args.sizes]
    args.batch_size_teacher = args.batch_size_teacher or sizes["batch_size_teacher"]
    args.batch_size_student = args.batch_size_student or sizes["batch_size_student"]
    steps = args.steps or (30 if on_gpu else 3)
    warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 1)
    names = select_variants(args.variants, args.compile)
    dtype = autocast_dtype(args, device)
    facts = machine_facts(device)

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)

    def report_of(results, peak):
        """The JSON report; written after every variant (`complete: false`) so an interrupted run keeps its figures."""
        for r in results.values():
            if "flops_per_step" in r and peak is not None:
                r["mfu"] = round(r["flops_per_step"] / (r["ms_per_step"] / 1e3) / peak, 5)
        kinds = sorted({r["peak_memory_kind"] for r in results.values() if "peak_memory_kind" in r})
        return {
            "complete": peak is not None,
            "machine": facts,
            "sizes": args.sizes,
            "dtype": str(dtype).removeprefix("torch."),
            "optimizer": "AdamW, fused" if on_gpu else "AdamW, foreach (default)",
            "steps": steps,
            "warmup": max(warmup, 1),
            "batch_size_teacher": args.batch_size_teacher,
            "batch_size_student": args.batch_size_student,
            "compile_backend": args.compile_backend if args.compile else None,
            "compile_mode": args.compile_mode,
            "student_text_mode": args.student_text_mode,
            "throughput_note": "images/s = batch / median step time at the stated batch (per-step throughput)",
            "peak_memory_kind": "; ".join(kinds),
            "matmul_peak_tflops": None if peak is None else round(peak / 1e12, 4),
            "anchors": ANCHORS,
            "results": results,
            "ratios": ratios(results),
        }

    results, flops_cache = {}, {}
    for name in names:
        logger.info("running %s", name)
        try:
            results[name] = run_variant(name, args, sizes, device, steps, warmup, flops_cache)
        except CompileFailed as error:
            logger.warning("%s skipped: torch.compile failed (%s)", name, error)
            results[name] = {"status": "skipped", "reason": str(error)}
            gc.collect()
        logger.info("%s: %s", name, {k: v for k, v in results[name].items() if k not in ("graph_break_reasons",)})
        facts["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        output.write_text(json.dumps(report_of(results, None), indent=2) + "\n")

    peak = matmul_peak(device, dtype, 8192 if on_gpu else 1024 if args.sizes == "tiny" else 2048,
                       20 if on_gpu else 5)
    facts["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    report = report_of(results, peak)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(report))
    print(f"JSON written to {output}")
    return report


__all__ = ["all_variants", "select_variants", "make_reports", "ratios", "main"]


if __name__ == "__main__":
    main()
