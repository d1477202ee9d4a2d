"""Inference throughput and single-film latency of the Q-DISTILL students (and of the original's student, when given).

Variants are named `<model>/<path>/<backend>/<dtype>`; every valid combination of the selected options runs unless
`--variants` narrows them (glob patterns):

* `<model>`: `image_only` (the film alone), `pseudo_report` (film + a pre-tokenized pseudo-report of 48-128 tokens
  at paper sizes; generating the report is not timed), `encoder` (the frozen CheXzero ViT-B/32 forward alone, the
  floor of both students), and with `--original_repo` `original_pseudo_report` / `original_image_only` (the
  original's student on the same inputs, model-only path; image-only = its `mask_report` mode, all-zero token
  ids and mask).
* `<path>`: `model` (processed `pixel_values` already on the device), `e2e_pil` (decoded 8-bit films, `--film_size`
  pixels square, through the processor's PIL path on the CPU, copied to the device, then the model) or `e2e_tensor`
  (the same decoded films as a uint8 tensor, copied to the device and preprocessed there by
  `QDistillImageProcessor.preprocess_tensor`, which matches the PIL path within 2 grey levels).
* `<backend>`: `eager`; `compiled` (`torch.compile`, default inductor and mode, no CUDA graphs); `cudagraphs` (CUDA only:
  `torch.compile(mode="reduce-overhead")`, inductor with CUDA graphs); CPU only: `int8`
  (`qdistill_hf.deploy.quantize_dynamic_int8`, torch.ao dynamic int8 on every Linear), `onnxruntime` and
  `onnxruntime_int8` (the student exported with `qdistill_hf.deploy.export_student`, int8 by onnxruntime's
  `quantize_dynamic`; ONNX Runtime CPU with `--threads` intra-op threads).
* `<dtype>`: `fp32`; on CUDA also `bf16` and `fp16` (autocast).

Each variant reports films/s at `--batch_size` (default 256: `batch / median time of a batch`) and the single-film
latency (batch 1, median and p90 over `--latency_repeats`); on CPU also the process CPU time of a single film (on a
shared machine the wall time includes waiting for a core, the CPU time does not). Eager forwards run the model's
input checks (host syncs: non-finite films, vocabulary); compiled ones skip them, as in training (the processor refuses broken films, and a
uint8 film cannot be NaN). CPU runs use `--threads` torch threads (default 1: the single-film goal is one core).

The original's student: `--original_repo PATH` (a checkout of the original Q-DISTILL code, not in this repository)
and `--original_factory MODULE:FUNCTION` (default `model.student:create_student_model`, called with no arguments; it
must return an `nn.Module` called as `model(pixel_values, input_ids, attention_mask)` returning logits or a tuple
starting with them; if the original's signature differs, point `--original_factory` at a small adapter of yours).
Without `--original_repo` those variants are reported as skipped with the reason, and no ratio to the original is
computed.

    python examples/benchmark_inference.py --sizes tiny --compile_backend eager  # smoke run, 45 s on 2 cores
    python examples/benchmark_inference.py --device cuda                      # paper sizes, every GPU variant
    python examples/benchmark_inference.py --device cpu --threads 1 --batch_size 16 \\
        --variants 'image_only/model/*' 'pseudo_report/model/eager/*' 'encoder/model/eager/*'
"""

import argparse
import fnmatch
import gc
import importlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmark_training (shared sizes and machine facts)

from benchmark_training import SIZES, build_models, machine_facts, make_reports, synchronize  # noqa: E402

from qdistill_hf import QDistillImageProcessor  # noqa: E402

logger = logging.getLogger("benchmark_inference")

# H100, fp16 autocast, model only, batch 256 (measured elsewhere; printed next to the results for comparison).
ANCHORS = {
    "original_student_pseudo_report_films_per_s_h100_fp16": 10481,
    "original_student_image_only_films_per_s_h100_fp16": 15422,
    "original_student_single_film_ms_h100": 15,
    "vit_b32_fp16_forward_films_per_s_h100": 18500,
}
GOALS = {
    "gpu_model_only_fraction_of_encoder_rate": 0.9,
    "gpu_end_to_end_films_per_s": 5000,
    "gpu_single_film_ms": 5,
    "cpu_single_film_ms_image_only_one_core": 100,
    "cpu_single_film_ms_int8_or_onnx": 30,
}
MODELS = ("image_only", "pseudo_report", "encoder", "original_pseudo_report", "original_image_only")
PATHS = ("model", "e2e_pil", "e2e_tensor")
BACKENDS = ("eager", "compiled", "cudagraphs", "int8", "onnxruntime", "onnxruntime_int8")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_ONLY = ("int8", "onnxruntime", "onnxruntime_int8")
DEFAULT_BATCH = {"paper": 256, "tiny": 8}


def all_variants(device_type, models=MODELS, paths=PATHS, backends=BACKENDS, dtypes=tuple(DTYPES)):
    """Every valid variant name for a device type, in a stable order."""
    names = []
    for model in models:
        for path in paths:
            if model == "encoder" and path != "model":
                continue
            for backend in backends:
                if backend == "cudagraphs" and device_type != "cuda":
                    continue
                if backend in CPU_ONLY and device_type != "cpu":
                    continue
                if model.startswith("original") and (path != "model" or backend not in ("eager", "compiled", "cudagraphs")):
                    continue
                if model == "encoder" and backend.startswith("onnxruntime"):
                    continue
                for dtype in dtypes:
                    if dtype != "fp32" and (device_type != "cuda" or backend in CPU_ONLY):
                        continue
                    names.append(f"{model}/{path}/{backend}/{dtype}")
    return names


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", choices=sorted(SIZES), default="paper")
    parser.add_argument("--batch_size", type=int, default=None, help="throughput batch (default 256 paper, 8 tiny)")
    parser.add_argument("--film_size", type=int, default=None,
                        help="side of the decoded films of the e2e paths (default 1024 paper, 48 tiny)")
    parser.add_argument("--steps", type=int, default=None, help="timed batches (default 20 on GPU, 3 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed batches (default 5 on GPU, 1 on CPU)")
    parser.add_argument("--latency_repeats", type=int, default=None,
                        help="timed single-film forwards (default 100 on GPU, 10 on CPU)")
    parser.add_argument("--measure", nargs="+", choices=["throughput", "latency"], default=["throughput", "latency"])
    parser.add_argument("--variants", nargs="+", default=["*"], help="glob patterns over variant names")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 1 on CPU)")
    parser.add_argument("--compile_backend", default="inductor")
    parser.add_argument("--compile_mode", default=None,
                        help="torch.compile mode of the `compiled` backend (e.g. max-autotune-no-cudagraphs; never a "
                             "CUDA-graph mode: that is the `cudagraphs` backend)")
    parser.add_argument("--original_repo", default=None, help="checkout of the original Q-DISTILL code (optional)")
    parser.add_argument("--original_factory", default="model.student:create_student_model",
                        help="MODULE:FUNCTION inside --original_repo returning the original's student")
    parser.add_argument("--output", default="outputs/benchmark_inference.json")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("batch_size", "film_size", "steps", "latency_repeats", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    if args.warmup is not None and args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return args


def select_variants(patterns, device_type):
    names = all_variants(device_type)
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise SystemExit(f"--variants {pattern!r} matches no variant on {device_type}; available: {', '.join(names)}")
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


# ----------------------------------------------------------------------------------------------------- the models


class OriginalUnavailable(RuntimeError):
    """The original's student cannot be run: the variant is reported as skipped with this reason."""


def load_original(repo, factory):
    """The original's student from its checkout (`--original_repo`), through `--original_factory`."""
    if repo is None:
        raise OriginalUnavailable(
            "--original_repo not given: the original Q-DISTILL code is not part of this repository, so its student "
            "is not run and no ratio to it is computed"
        )
    if not Path(repo).is_dir():
        raise OriginalUnavailable(f"--original_repo {repo} is not a directory")
    module_name, _, function_name = factory.partition(":")
    if not function_name:
        raise OriginalUnavailable(f"--original_factory must be MODULE:FUNCTION, got {factory!r}")
    sys.path.insert(0, str(Path(repo).resolve()))
    try:
        module = importlib.import_module(module_name)
        model = getattr(module, function_name)()
    except Exception as error:  # noqa: BLE001 - any failure of foreign code is reported, not raised
        raise OriginalUnavailable(f"{factory} in {repo} failed: {type(error).__name__}: {error}") from error
    finally:
        sys.path.remove(str(Path(repo).resolve()))
    if not isinstance(model, torch.nn.Module):
        raise OriginalUnavailable(f"{factory} returned a {type(model).__name__}, not an nn.Module")
    return model


def build_model(kind, args, sizes, device):
    """`(module, takes_text)` for a model kind, in eval mode on the device."""
    if kind == "encoder":
        student = build_models(sizes, "image_only", ("student",))["student"]
        return student.vision_model.to(device).eval(), False
    if kind.startswith("original"):
        return load_original(args.original_repo, args.original_factory).to(device).eval(), True
    return build_models(sizes, kind, ("student",))["student"].to(device).eval(), kind == "pseudo_report"


def forward_fn(kind, model):
    """A function of `(pixel_values, input_ids, attention_mask)` returning the logits (or the encoder's tokens)."""
    if kind == "encoder":
        return lambda pixel_values, input_ids, attention_mask: model(pixel_values=pixel_values).last_hidden_state
    if kind.startswith("original"):

        def original(pixel_values, input_ids, attention_mask):
            if kind == "original_image_only":  # the original's mask_report mode
                input_ids, attention_mask = torch.zeros_like(input_ids), torch.zeros_like(attention_mask)
            out = model(pixel_values, input_ids, attention_mask)
            return out[0] if isinstance(out, (tuple, list)) else out

        return original
    if kind == "image_only":
        return lambda pixel_values, input_ids, attention_mask: model(pixel_values=pixel_values).logits
    return lambda pixel_values, input_ids, attention_mask: model(
        pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask
    ).logits


def onnx_runner(model, int8, threads, workdir):
    """A function like `forward_fn` that runs the exported student in ONNX Runtime (CPU)."""
    from qdistill_hf.deploy import OnnxTriageModel, export_student, quantize_onnx_int8

    # One export per student mode and run: every variant builds the same weights (same seed).
    path = Path(workdir) / f"{model.config.text_mode}.onnx"
    if not path.is_file():
        export_student(model, path)
    if int8:
        fp32_path, path = path, Path(workdir) / f"{model.config.text_mode}.int8.onnx"
        if not path.is_file():
            quantize_onnx_int8(fp32_path, path)
    session = OnnxTriageModel(path, threads=threads)
    takes_text = model.config.text_mode == "pseudo_report"

    def run(pixel_values, input_ids, attention_mask):
        if takes_text:
            return torch.from_numpy(session(pixel_values, input_ids, attention_mask)["logits"])
        return torch.from_numpy(session(pixel_values)["logits"])

    return run, path.stat().st_size


# ----------------------------------------------------------------------------------------------------- the inputs


def make_inputs(kind, path, batch_size, args, sizes, device, generator):
    """Host-side inputs of one batch: decoded films (e2e paths) or pixel_values, and the pseudo-report tokens."""
    side = sizes["vision"].get("image_size", 224)
    if path == "model":
        images = torch.randn(batch_size, 3, side, side, generator=generator)
    else:
        images = torch.randint(0, 256, (batch_size, args.film_size, args.film_size), generator=generator,
                               dtype=torch.uint8)
    input_ids, attention_mask = make_reports(batch_size, *sizes["report_tokens"], sizes["vocab_size"], generator)
    return images, input_ids, attention_mask


def preprocess_fn(path, processor, device):
    """Host inputs -> `pixel_values` on the device, by the path's preprocessing (timed as part of the variant)."""
    if path == "model":
        return lambda images: images.to(device, non_blocking=True)
    if path == "e2e_pil":
        return lambda images: processor(list(images.numpy()), return_tensors="pt")["pixel_values"].to(
            device, non_blocking=True)
    return lambda images: processor.preprocess_tensor(images.to(device, non_blocking=True))


# -------------------------------------------------------------------------------------------------- measurement


def timed(fn, repeats, warmup, device):
    """Wall times and process CPU times (all threads of this process) of `repeats` calls, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times, cpu_times = [], []
    for _ in range(repeats):
        synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return times, cpu_times


def run_variant(name, args, sizes, device, workdir):
    kind, path, backend, dtype_name = name.split("/")
    dtype = DTYPES[dtype_name]
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model, takes_text = build_model(kind, args, sizes, device)
    side = sizes["vision"].get("image_size", 224)
    processor = QDistillImageProcessor(size={"height": side, "width": side})
    result = {"status": "ok", "model": kind, "path": path, "backend": backend, "dtype": dtype_name}
    result["parameters"] = sum(p.numel() for p in model.parameters())

    if backend == "int8":
        from qdistill_hf.deploy import quantize_dynamic_int8

        model = quantize_dynamic_int8(model)
    forward = forward_fn(kind, model)
    if backend.startswith("onnxruntime"):
        forward, result["onnx_bytes"] = onnx_runner(model, backend.endswith("int8"), torch.get_num_threads(), workdir)
    elif backend == "compiled":
        forward = torch.compile(forward, backend=args.compile_backend, mode=args.compile_mode)
    elif backend == "cudagraphs":
        forward = torch.compile(forward, backend=args.compile_backend, mode="reduce-overhead")
    prepare = preprocess_fn(path, processor, device)

    def step_fn(images, input_ids, attention_mask):
        def step():
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                pixel_values = prepare(images)
                ids = input_ids.to(device, non_blocking=True) if takes_text else None
                mask = attention_mask.to(device, non_blocking=True) if takes_text else None
                return forward(pixel_values, ids, mask)

        return step

    if "throughput" in args.measure:
        batch = make_inputs(kind, path, args.batch_size, args, sizes, device, generator)
        if path != "model" and device.type == "cuda":
            batch = tuple(t.pin_memory() for t in batch)
        start = time.perf_counter()
        out = step_fn(*batch)()
        synchronize(device)
        result["first_batch_s"] = round(time.perf_counter() - start, 3)  # includes compilation for compiled backends
        if not bool(torch.isfinite(out.float()).all()):
            raise FloatingPointError(f"{name}: non-finite outputs")
        times, cpu_times = timed(step_fn(*batch), args.steps, args.warmup, device)
        median = statistics.median(times)
        result.update({
            "batch_size": args.batch_size,
            "ms_per_batch": round(median * 1e3, 3),
            "ms_per_batch_all": [round(t * 1e3, 3) for t in times],
            "films_per_s": round(args.batch_size / median, 2),
        })
        if device.type == "cpu":
            result["cpu_ms_per_batch"] = round(statistics.median(cpu_times) * 1e3, 3)
    if "latency" in args.measure:
        single = make_inputs(kind, path, 1, args, sizes, device, generator)
        times, cpu_times = timed(step_fn(*single), args.latency_repeats, max(args.warmup, 2), device)
        result.update({
            "single_film_ms": round(statistics.median(times) * 1e3, 3),
            "single_film_ms_p90": round(float(np.percentile(np.array(times) * 1e3, 90)), 3),
        })
        if device.type == "cpu":
            # On a shared machine the wall time includes waiting for a core; the process CPU time does not (with one
            # thread it is the single-core latency an idle machine would show, give or take cache effects).
            result["single_film_cpu_ms"] = round(statistics.median(cpu_times) * 1e3, 3)
    if backend in ("compiled", "cudagraphs"):
        torch._dynamo.reset()
    return result


# --------------------------------------------------------------------------------------------------- reporting


def ratios(results):
    """Model-only rate over the encoder-alone rate, and ours over the original's, for matching backend/dtype."""
    ok = {n: r for n, r in results.items() if r.get("status") == "ok" and "films_per_s" in r}
    out = {"over_encoder_alone": {}, "over_original": {}, "e2e_over_model_only": {}}
    for name, r in ok.items():
        kind, path, backend, dtype = name.split("/")
        if kind in ("image_only", "pseudo_report") and path == "model":
            encoder = ok.get(f"encoder/model/{backend}/{dtype}")
            if encoder:
                out["over_encoder_alone"][name] = round(r["films_per_s"] / encoder["films_per_s"], 3)
            original = ok.get(f"original_{kind}/model/{backend}/{dtype}")
            if original:
                out["over_original"][name] = round(r["films_per_s"] / original["films_per_s"], 3)
        if path != "model" and f"{kind}/model/{backend}/{dtype}" in ok:
            out["e2e_over_model_only"][name] = round(r["films_per_s"] / ok[f"{kind}/model/{backend}/{dtype}"]["films_per_s"], 3)
    return out


def format_table(report):
    rows = [("variant", "batch", "ms/batch", "films/s", "1 film ms", "p90 ms", "1 film CPU ms")]
    skipped = []
    for name, r in report["results"].items():
        if r.get("status") != "ok":
            rows.append((name, "-", "skipped", "", "", "", ""))
            skipped.append(f"{name} skipped: {r.get('reason', '')[:300]}")
            continue
        rows.append((
            name, str(r.get("batch_size", "-")),
            f"{r['ms_per_batch']:,.1f}" if "ms_per_batch" in r else "-",
            f"{r['films_per_s']:,.1f}" if "films_per_s" in r else "-",
            f"{r['single_film_ms']:,.2f}" if "single_film_ms" in r else "-",
            f"{r['single_film_ms_p90']:,.2f}" if "single_film_ms_p90" in r else "-",
            f"{r['single_film_cpu_ms']:,.2f}" if "single_film_cpu_ms" in r else "-",
        ))
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "---|" * len(rows[0]))
    facts = report["machine"]
    lines.insert(0, f"{facts['device_name']}, {facts['torch_threads']} torch threads, torch {facts['torch']}, sizes "
                    f"{report['sizes']}, films {report['film_size']} px (e2e), {facts['date_utc']}, load "
                    f"{facts['load_average_start']} -> {facts.get('load_average_end')}")
    lines.append("")
    lines.extend(skipped)
    for group, values in report["ratios"].items():
        for key, value in values.items():
            lines.append(f"{group}: {key} {value:.2f}x")
    a = report["anchors"]
    lines.append(
        f"anchors (H100, fp16 autocast, model only, batch 256, measured elsewhere): original student "
        f"{a['original_student_pseudo_report_films_per_s_h100_fp16']:,} films/s with a pseudo-report, "
        f"{a['original_student_image_only_films_per_s_h100_fp16']:,} image-only, "
        f"{a['original_student_single_film_ms_h100']} ms single film; ViT-B/32 alone "
        f"{a['vit_b32_fp16_forward_films_per_s_h100']:,} films/s"
    )
    return "\n".join(lines)


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for chatty in ("onnx_ir", "onnxscript"):  # one INFO line per deduplicated initializer of the ONNX export
        logging.getLogger(chatty).setLevel(logging.WARNING)
    args = parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if args.threads is None and not on_gpu:
        args.threads = 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sizes = SIZES[args.sizes]
    args.batch_size = args.batch_size or DEFAULT_BATCH[args.sizes]
    args.film_size = args.film_size or (1024 if args.sizes == "paper" else 48)
    args.steps = args.steps or (20 if on_gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 1)
    args.latency_repeats = args.latency_repeats or (100 if on_gpu else 10)
    names = select_variants(args.variants, device.type)
    facts = machine_facts(device)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)

    def report_of(results, complete):
        return {
            "complete": complete,
            "machine": facts,
            "sizes": args.sizes,
            "batch_size": args.batch_size,
            "film_size": args.film_size,
            "steps": args.steps,
            "warmup": args.warmup,
            "latency_repeats": args.latency_repeats,
            "measure": args.measure,
            "compile_backend": args.compile_backend,
            "compile_mode": args.compile_mode,
            "original_repo": args.original_repo,
            "throughput_note": "films/s = batch / median time of a batch at the stated batch; single-film latency = "
                               "median (and p90) of batch-1 forwards, including the path's preprocessing",
            "anchors": ANCHORS,
            "goals": GOALS,
            "results": results,
            "ratios": ratios(results),
        }

    results = {}
    with tempfile.TemporaryDirectory(prefix="benchmark_inference_") as workdir:
        for name in names:
            logger.info("running %s", name)
            try:
                results[name] = run_variant(name, args, sizes, device, workdir)
            except OriginalUnavailable as error:
                logger.warning("%s skipped: %s", name, error)
                results[name] = {"status": "skipped", "reason": str(error)}
            except Exception as error:  # noqa: BLE001 - a compile or export failure is reported, the rest still runs
                if name.split("/")[2] not in ("compiled", "cudagraphs", "onnxruntime", "onnxruntime_int8"):
                    raise
                message = str(error).strip().splitlines()[0] if str(error).strip() else ""
                logger.warning("%s skipped: %s: %s", name, type(error).__name__, message)
                results[name] = {"status": "skipped", "reason": f"{type(error).__name__}: {message}"[:1000]}
            gc.collect()
            logger.info("%s: %s", name, {k: v for k, v in results[name].items() if not k.endswith("_all")})
            facts["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
            output.write_text(json.dumps(report_of(results, False), indent=2) + "\n")
    report = report_of(results, True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(report))
    print(f"JSON written to {output}")
    return report


__all__ = ["all_variants", "select_variants", "load_original", "ratios", "main"]


if __name__ == "__main__":
    main()
