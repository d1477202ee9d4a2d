"""examples/run_baseline.py: the ResNet, linear-probe and MLP baselines train with the stock Trainer on tiny synthetic
data, write `predictions_<split>.npz` in dataset order, and reload with the same logits."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from test_example_scripts import _load, _run


REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = REPO_ROOT / "examples"
SIZES = {"num_train": 48, "num_validation": 16, "num_test": 16}
TINY = ["--dataset_name", "synthetic", "--dataset_config", json.dumps(SIZES), "--num_train_epochs", "2",
        "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "16", "--logging_steps", "1",
        "--dataloader_pin_memory", "false", "--report_to", "none", "--save_total_limit", "1"]
TINY_RESNET = ["--image_size", "64", "--embedding_size", "8", "--hidden_sizes", "8", "16", "--depths", "1", "1"]


@pytest.fixture
def run_baseline(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return _load(EXAMPLES / "run_baseline.py", "run_baseline")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("baselines")


@pytest.fixture(scope="module")
def splits(root):
    from qdistill_hf import load_cxr_dataset

    return load_cxr_dataset("synthetic", cache_dir=str(root / "cache"), **SIZES)


def _train(root, baseline, extra=()):
    out = root / baseline
    result = _run([EXAMPLES / "run_baseline.py", "--baseline", baseline, *TINY, "--cache_dir", root / "cache",
                   "--output_dir", out, *extra], cwd=root)
    return out, result.stdout + result.stderr


def _check_run(out, splits):
    """Finite training losses, metrics files, and predictions in dataset order for validation and test."""
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == 6 and all(math.isfinite(loss) for loss in losses)  # 48 films / 16 x 2 epochs
    eval_results = json.loads((out / "eval_results.json").read_text())
    assert eval_results["eval_samples"] == 16 and 0.0 <= eval_results["eval_auroc"] <= 1.0
    assert state["best_metric"] == pytest.approx(eval_results["eval_auroc"])
    predictions = {}
    for name in ("validation", "test"):
        with np.load(out / f"predictions_{name}.npz") as data:
            assert sorted(data.files) == ["labels", "logits", "study_ids"]
            assert data["logits"].shape == (16, 2) and data["labels"].shape == (16,)
            assert data["study_ids"].tolist() == list(splits[name]["study_id"])
            assert data["labels"].tolist() == list(splits[name]["label"])
            predictions[name] = data["logits"]
    return predictions


def test_resnet_baseline_trains_predicts_and_reloads(root, splits):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    import qdistill_hf  # noqa: F401  (registers QDistillImageProcessor with AutoImageProcessor)
    from qdistill_hf.labels.policy import LABEL_NAMES

    out, log = _train(root, "resnet", TINY_RESNET)
    predictions = _check_run(out, splits)
    model = AutoModelForImageClassification.from_pretrained(out).eval()
    processor = AutoImageProcessor.from_pretrained(out)
    assert type(model).__name__ == "ResNetForImageClassification" and model.config.hidden_sizes == [8, 16]
    assert [model.config.id2label[i] for i in range(2)] == list(LABEL_NAMES)
    assert type(processor).__name__ == "QDistillImageProcessor" and processor.size.height == 64
    pixel_values = processor(list(splits["test"]["image"]), return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (16, 3, 64, 64)
    with torch.no_grad():
        logits = model(pixel_values=pixel_values).logits.numpy()
    np.testing.assert_allclose(logits, predictions["test"], atol=1e-5)
    assert "plain cross-entropy" in log
    # The stock image-classification pipeline reads a film through the saved QDistillImageProcessor.
    from transformers import pipeline

    scores = {row["label"]: row["score"] for row in pipeline("image-classification", model=str(out))(
        splits["test"][0]["image"])}
    expected = torch.softmax(torch.tensor(predictions["test"][0]), dim=-1)
    assert scores == pytest.approx({LABEL_NAMES[0]: float(expected[0]), LABEL_NAMES[1]: float(expected[1])}, abs=1e-5)


@pytest.mark.parametrize("baseline", ["linear_probe", "mlp"])
def test_probe_baselines_train_predict_and_reload(root, splits, baseline, run_baseline):
    from run_teacher import stand_in_encoder

    from qdistill_hf import QDistillImageProcessor, cache_image_features

    out, log = _train(root, baseline, ["--mlp_hidden_sizes", "16", "8", "--dropout", "0.1"])
    predictions = _check_run(out, splits)
    assert "random stand-in" in log
    model = run_baseline.FeatureProbeForImageClassification.from_pretrained(out).eval()
    linears = [m for m in model.classifier if isinstance(m, torch.nn.Linear)]
    expected = [(128, 2)] if baseline == "linear_probe" else [(128, 16), (16, 8), (8, 2)]
    assert [(m.in_features, m.out_features) for m in linears] == expected
    assert model.config.pooling == "cls" and "stand-in" in model.config.encoder

    # The saved standardisation is the training films' CLS statistics, and the reloaded head gives the same logits.
    encoder, processor = stand_in_encoder(0), QDistillImageProcessor()
    features = {name: torch.tensor(np.asarray(cache_image_features(splits[name], encoder, processor)["image_features"],
                                              dtype=np.float32)) for name in ("train", "test")}
    cls = features["train"][:, 0].double()
    torch.testing.assert_close(model.feature_mean, cls.mean(0).float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.feature_std, cls.std(0, unbiased=False).float(), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        logits = model(image_features=features["test"]).logits.numpy()
    np.testing.assert_allclose(logits, predictions["test"], atol=1e-4)


def test_probe_head_pools_standardises_and_uses_cross_entropy(run_baseline):
    config_class, model_class = run_baseline._probe_classes()
    features = torch.tensor([[[1.0, 2.0], [3.0, 6.0]], [[0.0, -2.0], [2.0, 0.0]]])  # (2 films, 2 tokens, 2 channels)
    labels = torch.tensor([1, 0])
    for pooling, pooled in (("cls", features[:, 0]), ("mean", features.mean(1))):
        model = model_class(config_class(input_size=2, head="linear", pooling=pooling)).eval()
        mean, std = torch.tensor([1.0, 0.5]), torch.tensor([2.0, 4.0])
        model.set_feature_statistics(mean, std)
        linear = model.classifier[0]
        with torch.no_grad():
            linear.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
            linear.bias.copy_(torch.tensor([0.0, 0.5]))
            out = model(image_features=features, labels=labels)
        expected_logits = (pooled - mean) / std + torch.tensor([0.0, 0.5])
        torch.testing.assert_close(out.logits, expected_logits)
        torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(expected_logits, labels))
    with pytest.raises(ValueError, match=r"image_features must be \(batch, tokens, 2\), got \(2, 2\)"):
        model(image_features=features[:, 0])
    with pytest.raises(ValueError, match="1 feature channels have a non-positive std"):
        model.set_feature_statistics(torch.zeros(2), torch.tensor([1.0, 0.0]))


def test_baseline_arguments_are_checked(run_baseline):
    from example_utils import DataArguments, parse_arguments, training_arguments_class

    def parse(argv):
        return parse_arguments((run_baseline.BaselineArguments, DataArguments),
                               lambda: (training_arguments_class(),), argv, description="", training_epilog="")

    with pytest.raises(ValueError, match=r"--baseline must be one of \['resnet', 'linear_probe', 'mlp'\], got None"):
        parse(["--output_dir", "o"])
    with pytest.raises(ValueError, match="need one value per stage"):
        parse(["--baseline", "resnet", "--hidden_sizes", "8", "16", "--depths", "1"])
    with pytest.raises(ValueError, match="--vision_model_name_or_path is for linear_probe and mlp"):
        parse(["--baseline", "resnet", "--vision_model_name_or_path", "enc"])
    baseline, _, training = parse([str(EXAMPLES / "configs" / "baseline_cpu_synthetic.yaml"), "--baseline", "mlp"])
    assert baseline.baseline == "mlp" and baseline.hidden_sizes == [32, 64, 128, 256]
    assert training.metric_for_best_model == "auroc" and training.load_best_model_at_end
