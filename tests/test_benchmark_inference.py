"""examples/benchmark_inference.py at tiny sizes, and the processor's tensor path it uses (one preprocessing definition).

Tolerance of `QDistillImageProcessor.preprocess_tensor` against the PIL path: max |difference| <= 2 grey levels and a
mean below 0.05 level, measured in grey levels (`pixel_values * std / rescale_factor`).
"""

import importlib.util
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from qdistill_hf import QDistillImageProcessor

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "examples" / "benchmark_inference.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_inference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def grey_levels(difference, processor):
    std = torch.tensor(processor.image_std)[:, None, None]
    return difference.abs() * std / processor.rescale_factor


@pytest.mark.parametrize("resize_mode", ["pad", "squash"])
@pytest.mark.parametrize("shape", [(40, 52), (300, 250), (224, 224)])
def test_tensor_preprocessing_matches_the_pil_path(resize_mode, shape):
    processor = QDistillImageProcessor(resize_mode=resize_mode)
    rng = np.random.default_rng(sum(shape))
    films = rng.integers(0, 256, (2, *shape), dtype=np.uint8)
    films[1] = np.linspace(0, 255, shape[1], dtype=np.float64).astype(np.uint8)[None]  # a smooth ramp
    expected = processor(list(films))["pixel_values"]
    for tensor in (torch.from_numpy(films), torch.from_numpy(films)[:, None],
                   torch.from_numpy(films)[:, None].expand(-1, 3, -1, -1)):
        got = processor.preprocess_tensor(tensor)
        assert got.shape == expected.shape == (2, 3, 224, 224) and got.dtype == torch.float32
        levels = grey_levels(got - expected, processor)
        assert levels.max() <= 2.0 + 1e-3 and levels.mean() < 0.05, (levels.max(), levels.mean())
    if resize_mode == "pad" and shape == (40, 52):
        # The letterbox is black before normalisation: -mean/std, on the rows the film does not cover.
        top = processor.preprocess_tensor(torch.from_numpy(films))[0, :, 0, 0]
        assert torch.allclose(top, -torch.tensor(processor.image_mean) / torch.tensor(processor.image_std))


def test_tensor_preprocessing_refuses_what_the_pil_path_must_convert():
    processor = QDistillImageProcessor()
    with pytest.raises(ValueError, match="uint8 torch tensor of decoded 8-bit films, got a torch tensor of torch.float32"):
        processor.preprocess_tensor(torch.rand(1, 64, 64))
    with pytest.raises(ValueError, match="got ndarray"):
        processor.preprocess_tensor(np.zeros((1, 64, 64), dtype=np.uint8))
    with pytest.raises(ValueError, match="got shape \\(1, 4, 64, 64\\)"):
        processor.preprocess_tensor(torch.zeros(1, 4, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="the tensor batch is 12x64 pixels"):
        processor.preprocess_tensor(torch.zeros(1, 64, 12, dtype=torch.uint8))


def test_benchmark_runs_at_tiny_sizes_and_writes_the_json(bench, tmp_path, capsys):
    output = tmp_path / "bench.json"
    variants = ["image_only/model/eager/fp32", "image_only/model/int8/fp32", "image_only/model/onnxruntime*/fp32",
                "image_only/e2e_*/eager/fp32", "pseudo_report/model/eager/fp32", "encoder/model/eager/fp32",
                "original_image_only/model/eager/fp32"]
    bench.main(["--sizes", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "0", "--latency_repeats", "2",
                "--batch_size", "3", "--film_size", "40", "--variants", *variants, "--output", str(output)])
    stdout = capsys.readouterr().out
    report = json.loads(output.read_text())
    assert report["complete"] and report["sizes"] == "tiny" and report["batch_size"] == 3
    assert report["machine"]["torch_threads"] == 1 and report["machine"]["load_average_end"]
    assert report["anchors"]["original_student_image_only_films_per_s_h100_fp16"] == 15422
    results = report["results"]
    assert list(results) == [
        "image_only/model/eager/fp32", "image_only/model/int8/fp32", "image_only/model/onnxruntime/fp32",
        "image_only/model/onnxruntime_int8/fp32", "image_only/e2e_pil/eager/fp32", "image_only/e2e_tensor/eager/fp32",
        "pseudo_report/model/eager/fp32", "encoder/model/eager/fp32", "original_image_only/model/eager/fp32",
    ]
    for name, r in results.items():
        if name.startswith("original"):
            assert r["status"] == "skipped" and "--original_repo not given" in r["reason"]
            continue
        assert r["status"] == "ok", (name, r)
        assert len(r["ms_per_batch_all"]) == 2 and r["batch_size"] == 3
        # ms_per_batch is rounded to 0.001 ms: at tiny sizes (~0.4 ms a batch) that alone is up to 0.13% of it.
        rounding = 0.0005 / r["ms_per_batch"]
        assert r["films_per_s"] == pytest.approx(3 / r["ms_per_batch"] * 1e3, rel=1e-3 + rounding)
        assert 0 < r["single_film_ms"] <= r["single_film_ms_p90"] and r["single_film_cpu_ms"] > 0
    assert results["image_only/model/onnxruntime_int8/fp32"]["onnx_bytes"] > 0
    assert results["encoder/model/eager/fp32"]["parameters"] < results["image_only/model/eager/fp32"]["parameters"]
    # Against the encoder alone on the same backend and dtype (no int8 encoder was run).
    assert set(report["ratios"]["over_encoder_alone"]) == {"image_only/model/eager/fp32", "pseudo_report/model/eager/fp32"}
    assert set(report["ratios"]["e2e_over_model_only"]) == {
        "image_only/e2e_pil/eager/fp32", "image_only/e2e_tensor/eager/fp32"}
    assert report["ratios"]["over_original"] == {}
    assert "| image_only/model/eager/fp32 | 3 |" in stdout and "original_image_only/model/eager/fp32 skipped" in stdout


def test_the_original_runs_from_its_checkout_on_the_same_inputs(bench, tmp_path):
    repo = tmp_path / "original"
    (repo / "model").mkdir(parents=True)
    (repo / "model" / "__init__.py").write_text("")
    (repo / "model" / "student.py").write_text(textwrap.dedent("""
        import torch

        class Student(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.head = torch.nn.Linear(3, 2)

            def forward(self, images, input_ids, attention_mask):
                if int(input_ids.abs().sum()) or int(attention_mask.sum()):
                    raise AssertionError("the image-only (mask_report) original must get zero ids and mask")
                return (self.head(images.mean(dim=(2, 3))), None)

        def create_student_model():
            return Student()
    """))
    output = tmp_path / "bench.json"
    bench.main(["--sizes", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--latency_repeats", "1",
                "--batch_size", "2", "--variants", "image_only/model/eager/fp32", "original_image_only/model/eager/fp32",
                "--original_repo", str(repo), "--output", str(output)])
    report = json.loads(output.read_text())
    assert report["results"]["original_image_only/model/eager/fp32"]["status"] == "ok"
    assert report["results"]["original_image_only/model/eager/fp32"]["parameters"] == 8
    ratio = report["ratios"]["over_original"]["image_only/model/eager/fp32"]
    ours = report["results"]["image_only/model/eager/fp32"]["films_per_s"]
    theirs = report["results"]["original_image_only/model/eager/fp32"]["films_per_s"]
    assert ratio == pytest.approx(ours / theirs, abs=6e-4)  # rounded to 3 decimals

    with pytest.raises(bench.OriginalUnavailable, match="model.nothing:create in .* failed: ModuleNotFoundError"):
        bench.load_original(str(repo), "model.nothing:create")
    with pytest.raises(SystemExit, match="'image_only/model/cudagraphs/\\*' matches no variant on cpu"):
        bench.select_variants(["image_only/model/cudagraphs/*"], "cpu")
    assert "image_only/model/cudagraphs/fp16" in bench.all_variants("cuda")
    assert not any(n.endswith(("/bf16", "/fp16")) for n in bench.all_variants("cpu"))
    assert not any("onnxruntime" in n or "/int8/" in n for n in bench.all_variants("cuda"))
