"""examples/benchmark_training.py: every variant runs at tiny sizes and the JSON carries the figures (no timing bar)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "examples" / "benchmark_training.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_training", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_variant_runs_at_tiny_sizes_and_writes_the_json(bench, tmp_path, capsys):
    output = tmp_path / "bench.json"
    # The `eager` compile backend exercises the dynamo path (tracing, graph-break counting) without inductor's codegen,
    # which takes minutes on two cores.
    bench.main(["--sizes", "tiny", "--steps", "2", "--warmup", "0", "--threads", "1", "--compile_backend", "eager",
                "--output", str(output)])
    stdout = capsys.readouterr().out
    report = json.loads(output.read_text())
    machine = report["machine"]
    for key in ("date_utc", "cpu_model", "torch_threads", "torch", "transformers", "device_name",
                "load_average_start", "load_average_end"):
        assert machine[key] not in (None, ""), key
    assert machine["torch"] == torch.__version__ and machine["torch_threads"] == 1
    assert report["complete"] and report["sizes"] == "tiny" and report["dtype"] == "float32" and report["steps"] == 2
    assert report["batch_size_teacher"] == report["batch_size_student"] == 4
    assert report["anchors"]["goal_teacher_images_per_s_h100_cached_features"] == 4000
    assert report["anchors"]["goal_distillation_images_per_s_h100_cached_features"] == 5000
    assert report["matmul_peak_tflops"] > 0

    results = report["results"]
    assert list(results) == bench.all_variants() and len(results) == 12
    for name, figures in results.items():
        if name.endswith("/compiled") and figures["status"] == "skipped":
            assert figures["reason"], name  # a skipped compile says why
            continue
        assert figures["status"] == "ok", (name, figures)
        assert len(figures["ms_per_step_all"]) == 2 and figures["ms_per_step"] > 0, name
        assert figures["images_per_s"] == pytest.approx(figures["batch_size"] / figures["ms_per_step"] * 1e3, rel=1e-3)
        assert figures["peak_memory_mb"] > 0 and figures["trainable_params"] > 0, name
        assert figures["report_tokens"] == 16, name  # tiny reports are 8-16 tokens, padded to the longest (16)
        if name.endswith("/compiled"):
            assert figures["compile_s"] > 0 and figures["graph_breaks"] >= 0 and figures["graphs"] >= 1, name
    for name in ("teacher/features/eager", "distill/features/live/eager", "distill/pixels/cached/eager"):
        assert results[name]["flops_per_step"] > 0 and 0 < results[name]["mfu"], name
    # The distillation step trains only the student: its trainable count is the same whether the teacher runs live.
    assert results["distill/features/live/eager"]["trainable_params"] == results[
        "distill/features/cached/eager"]["trainable_params"] < results["teacher/features/eager"]["trainable_params"]
    # A live teacher adds its forward to the step, and pixels add the frozen encoder's; cached targets add nothing.
    live, cached = results["distill/features/live/eager"], results["distill/features/cached/eager"]
    assert live["flops_per_step"] > cached["flops_per_step"]
    assert results["distill/pixels/cached/eager"]["flops_per_step"] > cached["flops_per_step"]
    assert results["teacher/features/eager"]["batch_size"] == 4
    assert set(report["ratios"]["cached_over_live_teacher"]) >= {"distill/features/*/eager", "distill/pixels/*/eager"}
    assert "teacher/features/eager" in stdout and "images/s" in stdout and "goals: teacher >= 4,000" in stdout


def test_variant_filter_batch_sizes_and_bad_pattern(bench, tmp_path, capsys):
    output = tmp_path / "bench.json"
    bench.main(["--sizes", "tiny", "--steps", "1", "--warmup", "0", "--threads", "1", "--no-compile",
                "--variants", "distill/features/*", "--batch_size_student", "3", "--student_text_mode",
                "image_only", "--output", str(output)])
    report = json.loads(output.read_text())
    assert list(report["results"]) == ["distill/features/live/eager", "distill/features/cached/eager"]
    assert all(r["batch_size"] == 3 and r["student_text_mode"] == "image_only" for r in report["results"].values())
    assert report["compile_backend"] is None

    with pytest.raises(SystemExit, match="'student/\\*' matches no variant"):
        bench.select_variants(["student/*"], with_compile=True)
    eager_teacher = bench.select_variants(["teacher/*"], with_compile=False)
    assert eager_teacher == ["teacher/features/eager", "teacher/pixels/eager"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--batch_size_teacher", "1"])  # ITC and ITM need a second film


def test_reports_are_padded_to_the_longest_with_cls_and_sep(bench):
    input_ids, attention_mask = bench.make_reports(5, 3, 7, 50, torch.Generator().manual_seed(0))
    assert input_ids.shape == attention_mask.shape == (5, 7)
    lengths = attention_mask.sum(1)
    assert lengths[0] == 7 and bool(((lengths >= 3) & (lengths <= 7)).all())
    for row, mask, length in zip(input_ids, attention_mask, lengths.tolist()):
        assert row[0] == 2 and row[length - 1] == 3  # [CLS] ... [SEP]
        assert bool((row[1:length - 1] >= 5).all()) and bool((row[length:] == 0).all())
        assert bool(mask[:length].all()) and not bool(mask[length:].any())


def test_ratios_pair_the_right_variants(bench):
    results = {
        "distill/features/live/eager": {"status": "ok", "images_per_s": 10.0},
        "distill/features/cached/eager": {"status": "ok", "images_per_s": 25.0},
        "distill/features/live/compiled": {"status": "ok", "images_per_s": 20.0},
        "distill/features/cached/compiled": {"status": "skipped", "reason": "x"},
        "distill/pixels/live/eager": {"status": "ok", "images_per_s": 4.0},
    }
    ratios = bench.ratios(results)
    assert ratios["cached_over_live_teacher"] == {"distill/features/*/eager": 2.5}
    assert ratios["compile_speedup"] == {"distill/features/live": 2.0}
    assert ratios["features_over_pixels"] == {"distill/*/live/eager": 2.5}
