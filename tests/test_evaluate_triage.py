"""examples/evaluate_triage.py: metrics.json, table.md and plots from saved predictions; the operating point comes from
the selection split only."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "examples"))

import evaluate_triage  # noqa: E402
from example_utils import save_predictions  # noqa: E402

from qdistill_hf.evaluation import calibrated_probabilities  # noqa: E402


def write_model(folder: Path, separation: float, seed: int, n_selection: int = 80, n_evaluation: int = 120,
                flip_evaluation: bool = False) -> None:
    """Binary logits whose class-1 margin grows with the label by `separation`; ids differ between splits."""
    rng = np.random.default_rng(seed)
    for split, n, prefix in (("selection", n_selection, "sel"), ("evaluation", n_evaluation, "ev")):
        labels = np.arange(n) % 2
        margin = separation * labels + rng.normal(0.0, 1.0, n) - separation / 2
        # The calibrated log-odds of these Gaussians is separation * margin: three times that is over-confident (T ~ 3).
        logits = np.stack([np.zeros(n), 3.0 * separation * margin], axis=1)
        if split == "evaluation" and flip_evaluation:
            labels = 1 - labels
        save_predictions(folder, split, [f"{prefix}-{i:03d}" for i in range(n)], labels, logits)


@pytest.fixture
def models(tmp_path):
    folders = {}
    for name, separation, seed in (("strong", 3.0, 0), ("weak", 1.0, 1)):
        folders[name] = tmp_path / name
        write_model(folders[name], separation, seed)
    state = {"log_history": [{"loss": 0.9, "step": 5, "epoch": 1.0},
                             {"eval_loss": 0.8, "eval_auroc": 0.7, "step": 5},
                             {"loss": 0.6, "step": 10, "epoch": 2.0},
                             {"eval_loss": 0.7, "eval_auroc": 0.8, "step": 10}],
             "best_global_step": 10}
    (folders["strong"] / "trainer_state.json").write_text(json.dumps(state))
    return folders


def run(models, out, *extra):
    pairs = [f"{name}={folder}" for name, folder in models.items()]
    return evaluate_triage.main(["--models", *pairs, "--selection_split", "selection", "--evaluation_split",
                                 "evaluation", "--output_dir", str(out), "--n_bootstrap", "200", *extra])


def test_writes_metrics_table_and_plots(models, tmp_path):
    from PIL import Image
    from sklearn.metrics import roc_auc_score

    from example_utils import load_predictions
    from qdistill_hf.evaluation import choose_threshold, fit_temperature

    out = tmp_path / "eval"
    assert run(models, out) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["strong", "weak"]
    for name, m in metrics.items():
        evaluation = load_predictions(models[name] / "predictions_evaluation.npz")
        selection = load_predictions(models[name] / "predictions_selection.npz")
        # AUROC does not depend on the temperature: sklearn on the raw logit margin gives the same number.
        margin = evaluation["logits"][:, 1] - evaluation["logits"][:, 0]
        assert m["auroc"] == pytest.approx(roc_auc_score(evaluation["labels"], margin), abs=1e-9)
        assert m["auroc_ci_low"] <= m["auroc"] <= m["auroc_ci_high"]
        # Temperature and threshold: the library's fit on the selection split, recomputed here.
        temperature = fit_temperature(selection["logits"], selection["labels"])
        assert m["calibration_temperature"] == pytest.approx(temperature)
        assert 1.5 < temperature < 6.0  # the logits were made 3x over-confident
        calibrated = calibrated_probabilities(selection["logits"], temperature)[:, 1]
        threshold, _ = choose_threshold(selection["labels"], calibrated)
        assert m["threshold"] == pytest.approx(threshold)
        # Sensitivity at that threshold, counted by hand on the evaluation split.
        p = calibrated_probabilities(evaluation["logits"], temperature)[:, 1]
        positives = evaluation["labels"] == 1
        assert m["sensitivity"] == pytest.approx(float((p[positives] >= threshold).mean()))
        assert m["n"] == 120 and m["n_selection"] == 80
        assert m["selection_split"] == "selection" and m["evaluation_split"] == "evaluation"
    assert metrics["strong"]["auroc"] > metrics["weak"]["auroc"]
    # The weak model's over-confidence is visible in its ECE, which temperature scaling lowers (the strong one's
    # studies sit near 0 and 1, where its ECE is small either way).
    assert metrics["weak"]["ece"] < metrics["weak"]["ece_before_calibration"] - 0.03

    table = (out / "table.md").read_text()
    assert "| model | AUROC [95% CI] |" in table
    strong = metrics["strong"]
    assert (f"| strong | {strong['auroc']:.3f} [{strong['auroc_ci_low']:.3f}, {strong['auroc_ci_high']:.3f}] | "
            f"{strong['accuracy']:.3f} | {strong['sensitivity']:.3f} | {strong['specificity']:.3f} |") in table
    assert "`selection` split (80 studies" in table

    for png in ("roc.png", "reliability.png", "confusion_matrices.png", "training_curves.png"):
        path = out / png
        assert path.stat().st_size > 10_000, png
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 600 and image.height > 400, png
            # Not a blank canvas: a plot has many distinct colours.
            assert len(image.convert("RGB").getcolors(maxcolors=1_000_000)) > 50, png


def test_threshold_comes_from_the_selection_split_only(models, tmp_path):
    run(models, tmp_path / "a", "--no_plots")
    # The same selection predictions, evaluation labels flipped: temperature and threshold must not move.
    flipped = {name: tmp_path / f"flipped_{name}" for name in models}
    for (name, folder), seed, separation in zip(flipped.items(), (0, 1), (3.0, 1.0)):
        write_model(folder, separation, seed, flip_evaluation=True)
    run(flipped, tmp_path / "b", "--no_plots")
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    for name in models:
        assert b[name]["threshold"] == a[name]["threshold"]
        assert b[name]["calibration_temperature"] == a[name]["calibration_temperature"]
        assert b[name]["auroc"] == pytest.approx(1.0 - a[name]["auroc"])  # the evaluation labels did change
    assert not (tmp_path / "a" / "roc.png").exists()  # --no_plots


def test_bad_inputs_give_clear_errors(models, tmp_path):
    with pytest.raises(SystemExit, match="must differ"):
        evaluate_triage.main(["--models", f"strong={models['strong']}", "--selection_split", "evaluation",
                              "--evaluation_split", "evaluation", "--output_dir", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="expected NAME=PATH"):
        evaluate_triage.main(["--models", str(models["strong"]), "--output_dir", str(tmp_path / "x")])
    with pytest.raises(FileNotFoundError, match="predictions_test.npz"):
        evaluate_triage.main(["--models", f"strong={models['strong']}", "--selection_split", "selection",
                              "--output_dir", str(tmp_path / "x"), "--no_plots"])
    # A study in both splits: the threshold would have seen an evaluation study.
    leaky = tmp_path / "leaky"
    save_predictions(leaky, "selection", ["a", "b", "c", "d"], [0, 1, 0, 1], np.eye(2)[[0, 1, 1, 0]])
    save_predictions(leaky, "evaluation", ["d", "e", "f", "g"], [0, 1, 0, 1], np.eye(2)[[0, 1, 1, 0]])
    with pytest.raises(ValueError, match="1 studies are in both"):
        run({"leaky": leaky}, tmp_path / "x", "--no_plots")


def test_model_card_evaluation_section_is_replaced_in_place(models, tmp_path):
    card = tmp_path / "README.md"
    card.write_text("---\nlicense: mit\n---\n# Model\n\n## Evaluation\n\nold numbers\n\n## Limitations\n\nkeep me\n")
    run(models, tmp_path / "eval", "--no_plots", "--model_card", str(card))
    text = card.read_text()
    assert text.startswith("---\nlicense: mit\n---\n# Model\n\n## Evaluation\n\nEvaluation split `evaluation`")
    assert "old numbers" not in text and "| strong |" in text
    assert text.endswith("## Limitations\n\nkeep me\n") and text.count("## Evaluation") == 1
