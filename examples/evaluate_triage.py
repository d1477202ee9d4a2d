"""Triage evaluation of several models from their saved predictions: metrics JSON, a markdown table and plots.

    python examples/evaluate_triage.py --models teacher=outputs/demo/teacher student=outputs/demo/student \
        --selection_split validation --evaluation_split test --output_dir outputs/demo/evaluation

Input: one `NAME=FOLDER` pair per model. Each folder holds `predictions_<split>.npz` (study_ids, labels, raw logits;
written by `example_utils.save_predictions`: the demo, `run_teacher.py`, `run_distillation.py`, `run_baseline.py`)
for the selection split and the evaluation split, and optionally `config.json` (its `id2label` names the classes) and
`trainer_state.json` (training curves; `--trainer_states NAME=PATH` points elsewhere, a file or a checkpoint folder).

One design, for every model alike: the temperature (`fit_temperature`) and the operating threshold
(`choose_threshold`, default the threshold reaching 90% sensitivity) are fitted on the **selection** split's
predictions, the same functions `calibrate_model` runs before a model is saved, and applied unchanged to the
**evaluation** split, whose labels never touch them. When a folder's `config.json` carries a `decision_threshold`
that differs from the refitted one, a warning says so (the folder was calibrated on other data or another rule).

Writes to `--output_dir`:
- `metrics.json`: `{model: compute_triage_metrics(...) + calibration_temperature, decision_rule,
  ece_before_calibration, selection_split, evaluation_split}` (the shape the model-card builder reads);
- `table.md`: AUROC [95% CI], accuracy, sensitivity and specificity at the chosen threshold, ECE, n;
- `roc.png`: ROC curves of all models on one figure, AUROC and its CI in the legend, the chance diagonal, and each
  model's operating point;
- `reliability.png`: reliability diagram of every model, before and after temperature scaling;
- `confusion_matrices.png`: one confusion matrix per model at its chosen threshold, counts annotated;
- `training_curves.png` (when a trainer state is found): training loss, evaluation loss and evaluation AUROC by step.

`--model_card README.md` also rewrites the `## Evaluation` section of that markdown file with the table (the rest of
the file is left as it is).
"""

import argparse
import json
import logging
import math
import sys
from pathlib import Path


EXAMPLES_DIR = Path(__file__).resolve().parent
if str(EXAMPLES_DIR) not in sys.path:
    sys.path.insert(0, str(EXAMPLES_DIR))  # example_utils

logger = logging.getLogger("evaluate_triage")

RULES = ("sensitivity", "specificity", "youden")
FIGURE_DPI = 130
TABLE_COLUMNS = ("model", "AUROC [95% CI]", "accuracy", "sensitivity", "specificity", "threshold",
                 "ECE (before → after T)", "n (positive)")


def parse_pairs(values, option: str) -> dict[str, str]:
    """`["a=path", ...]` -> `{"a": "path"}`; an error names the option and the malformed item."""
    pairs = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"{option}: expected NAME=PATH, got {value!r}")
        if name in pairs:
            raise SystemExit(f"{option}: the name {name!r} is given twice")
        pairs[name] = path
    return pairs


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--models", nargs="+", required=True, metavar="NAME=FOLDER",
                        help="model name and the folder holding its predictions_<split>.npz files")
    parser.add_argument("--selection_split", default="validation",
                        help="split whose predictions fit the temperature and choose the threshold")
    parser.add_argument("--evaluation_split", default="test", help="split the metrics are reported on")
    parser.add_argument("--output_dir", default="outputs/evaluation")
    parser.add_argument("--rule", choices=RULES, default="sensitivity", help="how the threshold is chosen")
    parser.add_argument("--target", type=float, default=0.90, help="the rule's target (e.g. 0.90 sensitivity)")
    parser.add_argument("--trainer_states", nargs="*", default=None, metavar="NAME=PATH",
                        help="trainer_state.json (or a checkpoint folder holding one) per model, for training curves; "
                             "default: FOLDER/trainer_state.json when it exists")
    parser.add_argument("--n_bootstrap", type=int, default=1000, help="bootstrap resamples of the AUROC CI")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--n_bins", type=int, default=15, help="bins of the ECE and the reliability diagram")
    parser.add_argument("--no_plots", action="store_true", help="metrics.json and table.md only")
    parser.add_argument("--model_card", default=None,
                        help="a markdown model card whose `## Evaluation` section is rewritten with the table")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------------------------------
# Metrics


def label_names_of(folder: Path, num_labels: int) -> list[str]:
    """Class names from the folder's `config.json` (`id2label`), else the package's triage labels."""
    config_path = folder / "config.json"
    if config_path.is_file():
        id2label = json.loads(config_path.read_text()).get("id2label") or {}
        if len(id2label) == num_labels:
            return [id2label[str(i)] if str(i) in id2label else id2label[i] for i in range(num_labels)]
    from qdistill_hf.labels.policy import LABEL_NAMES

    if len(LABEL_NAMES) == num_labels:
        return list(LABEL_NAMES)
    return [f"class {i}" for i in range(num_labels)]


def saved_threshold(folder: Path):
    config_path = folder / "config.json"
    if not config_path.is_file():
        return None
    return json.loads(config_path.read_text()).get("decision_threshold")


def evaluate_model(name: str, folder: Path, selection_split: str, evaluation_split: str, *, rule: str,
                   target: float, n_bootstrap: int, seed: int, n_bins: int) -> dict:
    """Fit T and the threshold on the selection split, then the metrics on the evaluation split at that threshold.

    Returns:
        `dict` with `metrics` (for metrics.json) and the arrays the plots need.
    """
    from example_utils import load_predictions, predictions_path
    from qdistill_hf.evaluation import (
        calibrated_probabilities,
        choose_threshold,
        compute_triage_metrics,
        fit_temperature,
    )

    selection = load_predictions(predictions_path(folder, selection_split))
    evaluation = load_predictions(predictions_path(folder, evaluation_split))
    num_labels = evaluation["logits"].shape[1]
    if selection["logits"].shape[1] != num_labels:
        raise ValueError(f"{name}: {selection_split} logits have {selection['logits'].shape[1]} classes, "
                         f"{evaluation_split} logits {num_labels}")
    if num_labels != 2:
        raise ValueError(f"{name} ({folder}): evaluate_triage.py handles binary triage; the logits have {num_labels} "
                         "classes")
    overlap = set(selection["study_ids"].tolist()) & set(evaluation["study_ids"].tolist())
    if overlap:
        raise ValueError(f"{name} ({folder}): {len(overlap)} studies are in both the {selection_split} and the "
                         f"{evaluation_split} split, e.g. {sorted(overlap)[:5]}")
    label_names = label_names_of(folder, num_labels)

    temperature = float(fit_temperature(selection["logits"], selection["labels"]))
    selection_probs = calibrated_probabilities(selection["logits"], temperature)
    threshold, description = choose_threshold(selection["labels"], selection_probs[:, 1], rule=rule, target=target,
                                              split=selection_split, label_names=label_names)
    threshold = float(threshold)
    stored = saved_threshold(folder)
    if stored is not None and not math.isclose(float(stored), threshold, rel_tol=1e-4, abs_tol=1e-6):
        logger.warning(f"{name}: {folder}/config.json has decision_threshold {stored}, the refit on "
                       f"{selection_split} gives {threshold:.6f}; the table uses the refit")

    raw_probs = calibrated_probabilities(evaluation["logits"])
    probs = calibrated_probabilities(evaluation["logits"], temperature)
    common = dict(n_bootstrap=n_bootstrap, seed=seed, n_bins=n_bins, label_names=label_names)
    metrics = compute_triage_metrics(evaluation["labels"], probs[:, 1], threshold=threshold, **common)
    before = compute_triage_metrics(evaluation["labels"], raw_probs[:, 1], threshold=threshold, **common)
    metrics = {
        **metrics,
        "n_bins": n_bins,
        "ece_before_calibration": before["ece"],
        "brier_before_calibration": before["brier"],
        "calibration_temperature": temperature,
        "decision_rule": description,
        "selection_split": selection_split,
        "n_selection": int(len(selection["labels"])),
        "evaluation_split": evaluation_split,
        "label_names": label_names,
    }
    return {"metrics": metrics, "labels": evaluation["labels"], "raw_probs": raw_probs[:, 1], "probs": probs[:, 1],
            "label_names": label_names}


# --------------------------------------------------------------------------------------------------------------------
# Table and model card


def fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def markdown_table(metrics: dict[str, dict], descriptions: dict[str, str] | None = None,
                   extra_rows: list[tuple[str, ...]] | None = None) -> str:
    """The markdown table of metrics.json: one row per model, in the given order."""
    descriptions = descriptions or {}
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for name, m in metrics.items():
        label = descriptions.get(name, name)
        auroc = f"{fmt(m['auroc'])} [{fmt(m['auroc_ci_low'])}, {fmt(m['auroc_ci_high'])}]"
        ece = f"{fmt(m['ece_before_calibration'])} → {fmt(m['ece'])}"
        cells = (label, auroc, fmt(m["accuracy"]), fmt(m["sensitivity"]), fmt(m["specificity"]), fmt(m["threshold"]),
                 ece, f"{m['n']} ({m['n_positive']})")
        lines.append("| " + " | ".join(cells) + " |")
    for cells in extra_rows or []:
        cells = list(cells) + [""] * (len(TABLE_COLUMNS) - len(cells))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def rule_text(rule: str, target: float) -> str:
    return "max Youden J" if rule == "youden" else f"the highest threshold reaching {rule} ≥ {target:.2f}"


def table_caption(metrics: dict[str, dict], rule: str, target: float) -> str:
    first = next(iter(metrics.values()))
    names = first.get("label_names") or ["class 0", "class 1"]
    return (f"Evaluation split `{first['evaluation_split']}`: {first['n']} studies, {first['n_positive']} "
            f"{names[1]}. Temperature and threshold fitted per model on the `{first['selection_split']}` split "
            f"({first['n_selection']} studies; threshold: {rule_text(rule, target)} there), never on the evaluation "
            f"split. AUROC 95% CI: bootstrap over studies ({first.get('n_bootstrap', '?')} resamples). Sensitivity = "
            f"recall of `{names[1]}`. ECE: {first.get('n_bins', 15)} equal-width bins of p({names[1]}), before → after "
            "temperature scaling.\n")


def write_model_card_section(card_path: Path, section: str) -> None:
    """Replace the `## Evaluation` section of a markdown file (up to the next `## `), or append one."""
    text = card_path.read_text(encoding="utf-8") if card_path.is_file() else ""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.strip() == "## Evaluation"), None)
    body = "## Evaluation\n\n" + section.rstrip("\n") + "\n\n"
    if start is None:
        new = text.rstrip("\n") + ("\n\n" if text else "") + body
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = "".join(lines[:start]) + body + "".join(lines[end:])
    card_path.write_text(new.rstrip("\n") + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------------------------------
# Plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 11, "axes.titlesize": 13, "axes.labelsize": 12, "legend.fontsize": 9.5,
                         "figure.dpi": FIGURE_DPI})
    return plt


def plot_roc(results: dict, path: Path, title: str) -> None:
    from sklearn.metrics import roc_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.6, 9.2), layout="constrained")
    for name, r in results.items():
        m = r["metrics"]
        fpr, tpr, _ = roc_curve(r["labels"], r["probs"])
        label = f"{name}: AUROC {fmt(m['auroc'])} [{fmt(m['auroc_ci_low'])}, {fmt(m['auroc_ci_high'])}]"
        line, = ax.plot(fpr, tpr, lw=2, label=label)
        ax.plot(1 - m["specificity"], m["sensitivity"], "o", color=line.get_color(), ms=7, mec="black")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance (AUROC 0.5)")
    ax.plot([], [], "o", color="white", mec="black", label="operating point (selection threshold)")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="1 − specificity (false positive rate)",
           ylabel="sensitivity (true positive rate)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=1, frameon=False)  # not over the curves
    fig.savefig(path)
    plt.close(fig)


def plot_reliability(results: dict, path: Path, n_bins: int, title: str) -> None:
    from qdistill_hf.evaluation import reliability_curve

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 8.6), sharey=True, layout="constrained")
    for ax, key, subtitle in ((axes[0], "raw_probs", "before (softmax of the logits)"),
                              (axes[1], "probs", "after temperature scaling (T from selection)")):
        for name, r in results.items():
            curve = reliability_curve(r["labels"], r[key], n_bins=n_bins)
            confidence, observed, counts = reliability_points(curve)
            ece = r["metrics"]["ece_before_calibration" if key == "raw_probs" else "ece"]
            extra = f", T={r['metrics']['calibration_temperature']:.2f}" if key == "probs" else ""
            line, = ax.plot(confidence, observed, "-", lw=1.6, label=f"{name} (ECE {fmt(ece)}{extra})")
            # Marker area grows with the studies in the bin: a lone study's 0 or 1 should not look like a trend.
            ax.scatter(confidence, observed, s=12 + 160 * counts / counts.max(), color=line.get_color(),
                       edgecolors="black", linewidths=0.5, zorder=3)
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
        positive = next(iter(results.values()))["label_names"][1]
        ax.set(xlim=(0, 1), ylim=(-0.02, 1.02), xlabel=f"mean predicted p({positive}) in bin",
               title=subtitle)
        ax.grid(alpha=0.3)
        # Below the axes: inside, the legend hid the bins near p = 0 and p = 1.
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=1, fontsize=9.5, frameon=False)
    axes[0].set_ylabel(f"observed fraction {positive}")
    fig.suptitle(f"{title} ({n_bins} equal-width bins; marker area ∝ studies in the bin)")
    fig.savefig(path)
    plt.close(fig)


def reliability_points(curve: dict):
    """(mean predicted probability, observed frequency, count) of the non-empty bins of a `reliability_curve`."""
    import numpy as np

    confidence = np.asarray(curve["mean_confidence"], dtype=float)
    observed = np.asarray(curve["observed_frequency"], dtype=float)
    counts = np.asarray(curve["counts"], dtype=float)
    keep = counts > 0
    return confidence[keep], observed[keep], counts[keep]


def plot_confusion_matrices(results: dict, path: Path, title: str) -> None:
    import numpy as np

    plt = _pyplot()
    n = len(results)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 4.6 * rows + 0.7), squeeze=False, layout="constrained")
    for ax, (name, r) in zip(axes.flat, results.items()):
        m = r["metrics"]
        matrix = np.asarray(m["confusion_matrix"], dtype=int)
        names = r["label_names"]
        ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(1, matrix.max()))
        for i in range(matrix.shape[0]):
            for j in range(matrix.shape[1]):
                share = matrix[i, j] / max(1, matrix[i].sum())
                color = "white" if matrix[i, j] > matrix.max() / 2 else "black"
                ax.text(j, i, f"{matrix[i, j]}\n({share:.0%} of row)", ha="center", va="center", color=color,
                        fontsize=11)
        ax.set_xticks(range(len(names)), names)
        ax.set_yticks(range(len(names)), names, rotation=90, va="center")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{name}\nthreshold {m['threshold']:.3f}: sens {fmt(m['sensitivity'], 2)}, "
                     f"spec {fmt(m['specificity'], 2)}", fontsize=11)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title)
    fig.savefig(path)
    plt.close(fig)


def read_trainer_state(path: Path) -> dict:
    """`trainer_state.json` (or a folder holding one), with an error naming the path when absent or malformed."""
    path = Path(path)
    if path.is_dir():
        path = path / "trainer_state.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no trainer_state.json")
    state = json.loads(path.read_text())
    if "log_history" not in state:
        raise ValueError(f"{path}: no `log_history` (not a Trainer state)")
    return state


LINE_COLORS = {"training loss": "tab:blue", "evaluation loss": "tab:orange", "auroc": "tab:green"}


def first_per_step(history: list[dict], key: str) -> list[tuple[int, float]]:
    """`(step, value)` of `key` in a Trainer log history, the first entry per step: a script's `evaluate()` after
    training logs the kept checkpoint's metrics again at the last step, which is not a point of the curve."""
    points = {}
    for entry in history:
        if key in entry and "step" in entry and entry["step"] not in points:
            points[entry["step"]] = entry[key]
    return sorted(points.items())


def plot_training_curves(states: dict[str, dict], path: Path, title: str) -> None:
    """One panel per model (their losses are different objectives, not comparable across models): training and
    evaluation loss on the left axis, evaluation AUROC on the right one, the kept checkpoint marked."""
    plt = _pyplot()
    n = len(states)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.6 * cols, 4.2 * rows + 0.6), squeeze=False, layout="constrained")
    legend = {}
    for ax, (name, state) in zip(axes.flat, states.items()):
        history = state["log_history"]
        for key, style, label in (("loss", "o-", "training loss"), ("eval_loss", "s--", "evaluation loss")):
            points = first_per_step(history, key)
            if points:
                legend[label] = ax.plot(*zip(*points), style, ms=4, lw=1.6, color=LINE_COLORS[label])[0]
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        right = ax.twinx()
        points = first_per_step(history, "eval_auroc")
        if points:
            legend["evaluation AUROC (right axis)"] = right.plot(*zip(*points), "^-", color=LINE_COLORS["auroc"], ms=5,
                                                                 lw=1.6)[0]
            right.set_ylim(min(0.4, min(v for _, v in points) - 0.05), 1.02)
        right.set_ylabel("AUROC", color=LINE_COLORS["auroc"])
        best = state.get("best_global_step")
        if best is not None:
            legend["kept checkpoint"] = ax.axvline(best, color="black", ls=":", lw=1.3)
        ax.set_title(name, fontsize=12)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.legend(list(legend.values()), list(legend), loc="outside lower center", ncol=len(legend), fontsize=10)
    fig.suptitle(f"{title} (evaluation = the selection split, once per epoch)")
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------------------


def evaluate(models: dict[str, str | Path], selection_split: str, evaluation_split: str, output_dir: str | Path, *,
             rule: str = "sensitivity", target: float = 0.90, trainer_states: dict[str, str | Path] | None = None,
             n_bootstrap: int = 1000, seed: int = 0, n_bins: int = 15, plots: bool = True,
             descriptions: dict[str, str] | None = None, extra_rows: list[tuple[str, ...]] | None = None,
             model_card: str | Path | None = None, title: str | None = None) -> dict[str, dict]:
    """
    Evaluate every model of `models` (name -> folder with `predictions_<split>.npz`) and write metrics.json,
    table.md and the plots into `output_dir`.

    Args:
        models (`dict`): model name -> folder, in table order.
        selection_split (`str`): the split fitting the temperature and the threshold.
        evaluation_split (`str`): the split the metrics are computed on.
        trainer_states (`dict`, *optional*): model name -> trainer_state.json or a folder holding one; by default
            each model folder's own `trainer_state.json` when present.
        descriptions (`dict`, *optional*): model name -> longer label for table.md and the plots.
        extra_rows (`list`, *optional*): rows of cells appended to table.md (e.g. a majority-class line).

    Returns:
        `dict`: `{model name: metrics}` as written to metrics.json.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if not models:
        raise ValueError("no models to evaluate")
    results = {}
    for name, folder in models.items():
        results[name] = evaluate_model(name, Path(folder), selection_split, evaluation_split, rule=rule,
                                       target=target, n_bootstrap=n_bootstrap, seed=seed, n_bins=n_bins)
    metrics = {name: r["metrics"] for name, r in results.items()}
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, default=_json_default))
    table = table_caption(metrics, rule, target) + "\n" + markdown_table(metrics, descriptions, extra_rows)
    (output_dir / "table.md").write_text(table)
    written = [output_dir / "metrics.json", output_dir / "table.md"]

    if plots:
        title = title or f"{evaluation_split} split"
        label = (descriptions or {}).get  # the plots name each model by its description when one is given
        labelled = {label(name, name): r for name, r in results.items()}
        plot_roc(labelled, output_dir / "roc.png", f"ROC, {title}")
        plot_reliability(labelled, output_dir / "reliability.png", n_bins, f"Reliability, {title}")
        plot_confusion_matrices(labelled, output_dir / "confusion_matrices.png",
                                f"Confusion matrices at the {selection_split}-chosen threshold, {title}")
        written += [output_dir / f for f in ("roc.png", "reliability.png", "confusion_matrices.png")]
        states = {}
        for name, folder in models.items():
            given = (trainer_states or {}).get(name)
            if given is not None:
                states[name] = read_trainer_state(Path(given))
            elif (Path(folder) / "trainer_state.json").is_file():
                states[name] = read_trainer_state(Path(folder))
        unknown = set(trainer_states or {}) - set(models)
        if unknown:
            raise ValueError(f"--trainer_states names models not in --models: {sorted(unknown)}")
        if states:
            states = {label(name, name): state for name, state in states.items()}
            plot_training_curves(states, output_dir / "training_curves.png", "Training curves")
            written.append(output_dir / "training_curves.png")
    if model_card is not None:
        write_model_card_section(Path(model_card), table)
        written.append(Path(model_card))
    logger.info("wrote " + ", ".join(str(p) for p in written))
    return metrics


def _json_default(value):
    import numpy as np

    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    models = parse_pairs(args.models, "--models")
    states = parse_pairs(args.trainer_states, "--trainer_states")
    if args.selection_split == args.evaluation_split:
        raise SystemExit("--selection_split and --evaluation_split must differ: the threshold would be tuned on the "
                         "split it is reported on")
    metrics = evaluate(models, args.selection_split, args.evaluation_split, args.output_dir, rule=args.rule,
                       target=args.target, trainer_states=states, n_bootstrap=args.n_bootstrap, seed=args.seed,
                       n_bins=args.n_bins, plots=not args.no_plots, model_card=args.model_card)
    print((Path(args.output_dir) / "table.md").read_text(), flush=True)
    return 0 if metrics else 1


if __name__ == "__main__":
    raise SystemExit(main())
