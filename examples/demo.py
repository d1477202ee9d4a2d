"""End-to-end Q-DISTILL with the Trainer subclasses, on CPU in a few minutes (`make demo`).

    python examples/demo.py                                   # embedded synthetic films, writes outputs/demo/
    python examples/demo.py --num_train 300 --student_epochs 5  # quicker; warns when too small to learn
    python examples/demo.py --data_dir ../shared/data/cxr-paired --baselines --teacher_epochs 16 \
        --teacher_metric auroc --output_dir outputs/real      # the real-data table of examples/README.md
    python examples/demo.py --vision_model chexzero-vit-b32   # a converted CheXzero folder as the frozen encoder

Steps: prepare the data -> train the report tokenizer on the train split -> cache the frozen encoder's features ->
train the teacher on film + human report with `QDistillTeacherTrainer` (ITC + ITM with hard negatives + focal) ->
give every film the report of its most similar *training* film (retrieval pseudo-reports, never its own) -> distil
two students from the frozen teacher with `QDistillDistillationTrainer` (`pseudo_report`: film + retrieved report;
`image_only`: the film alone) -> train the same image-only student on the labels alone (same seed and steps,
distillation weights 0) -> with `--baselines`, `run_baseline.py`'s ResNet from scratch and linear probe on the frozen
features -> the table -> reload the image-only student with `AutoModel.from_pretrained` in a fresh Python process and
triage a few evaluation films from their pixels at its saved operating point.

Three splits with three jobs. `train` fits the weights. The **selection** split (`validation` of the synthetic data)
chooses each run's checkpoint (`load_best_model_at_end=True`: AUROC for the students and baselines, the validation
loss for the teacher, whose AUROC from reading the report is 1.0 from the first epoch), fits its temperature and
chooses its operating threshold (`calibrate_model`, default: the highest threshold reaching 90% sensitivity,
`--threshold_rule` / `--threshold_target`); both are saved in the model's config, so `AutoModel`, the pipelines and
the worklist CLI use them. The **evaluation** split (`test`) only feeds the table: AUROC with a bootstrap 95% CI,
accuracy, sensitivity and specificity at the selection threshold, ECE before and after temperature scaling
(`evaluate_triage.py`, which also draws the ROC, reliability, confusion-matrix and training-curve PNGs).

Every model folder gets `predictions_<selection>.npz` / `predictions_<evaluation>.npz` (study_ids, labels, raw
logits) and `trainer_state.json`; `outputs/demo/evaluation/` holds metrics.json (`{model: metrics}`), table.md and the
PNGs; `outputs/demo/results.json` is the same metrics.json.

Without `--vision_model` the frozen encoder is a small randomly initialised CLIP ViT with CheXzero's geometry
(224 px, patch 32, 50 tokens; `run_teacher.stand_in_encoder`): CheXzero's weights cannot be downloaded here. A random
frozen encoder still carries the drawn findings, so the numbers are about this pipeline on synthetic data, not about
real radiographs.

`--data_dir` reads a `qdistill_folder` dataset with classes (normal, abnormal). With a test split, validation selects
and test evaluates. With only train and validation (../shared/data/cxr-paired), the demo carves a `selection` split
out of *train*, by patient (the study id up to its last `_`, e.g. `nih00000003` for `nih00000003_000`),
deterministically: a patient goes to selection when the first byte of the MD5 of its id is divisible by 4 (about a
quarter of the patients). The untouched `validation` split is then the evaluation split: nothing is trained, chosen
or tuned on it. A patient's films never straddle train and selection.
"""

import argparse
import hashlib
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path


EXAMPLES_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(EXAMPLES_DIR))  # example_utils, run_teacher, run_distillation

logger = logging.getLogger("qdistill_demo")

ITM_CHANCE = -(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3))  # 1 positive : 2 hard negatives -> 0.6365
NUM_TRIAGE_FILMS = 5
EVAL_BATCH_SIZE = 64
TOO_SMALL_AUROC = 0.6

# The fresh-process triage: only the saved folder, AutoModel/AutoProcessor and the PNG films written by the demo.
TRIAGE_SCRIPT = """
import json, sys
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor
from transformers.utils import logging as hf_logging
import qdistill_hf  # registers the Q-DISTILL Auto classes
hf_logging.disable_progress_bar()
folder, manifest = sys.argv[1], json.load(open(sys.argv[2]))
model = AutoModel.from_pretrained(folder).eval()
processor = AutoProcessor.from_pretrained(folder)
print(f"fresh process: {type(model).__name__} ({model.config.text_mode}) and {type(processor).__name__} from {folder}")
print(f"operating point from its config: temperature {model.config.calibration_temperature:.3f}, threshold "
      f"{model.config.decision_threshold:.3f} ({model.config.decision_rule})")
films = [Image.open(row["path"]) for row in manifest]
with torch.no_grad():
    probs = model.triage_probabilities(model(**processor(images=films)).logits)
decisions = model.triage_decisions(probs)
for row, p, decision in zip(manifest, probs, decisions):
    verdict = model.config.id2label[int(decision)]
    print(f"triage {row['study_id']}: {verdict:<10} p({model.config.id2label[1]})={p[1]:.2f}  "
          f"truth={row['truth']:<10} findings={row['findings']}")
"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--data_dir", default=None, help="a qdistill_folder dataset (default: synthetic films)")
    parser.add_argument("--vision_model", default=None, help="folder of a converted CheXzero CLIPVisionModel")
    parser.add_argument("--num_train", type=int, default=1024, help="synthetic films for training")
    parser.add_argument("--num_validation", type=int, default=128, help="synthetic films for validation")
    parser.add_argument("--num_test", type=int, default=256, help="synthetic films for the test table")
    parser.add_argument("--teacher_epochs", type=int, default=4)
    parser.add_argument("--student_epochs", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold_rule", choices=("sensitivity", "specificity", "youden"), default="sensitivity",
                        help="how the operating threshold is chosen on the selection split")
    parser.add_argument("--threshold_target", type=float, default=0.90,
                        help="the rule's target on the selection split (0.90: the threshold reaching 90%% sensitivity)")
    parser.add_argument("--teacher_metric", choices=("loss", "auroc"), default="loss",
                        help="the teacher's checkpoint criterion on the selection split: its loss (synthetic reports "
                             "name the findings, so AUROC is 1.0 from epoch 1), or AUROC (real reports: the ITC/ITM "
                             "loss can rise while the report-reading AUROC still climbs)")
    parser.add_argument("--baselines", action="store_true",
                        help="also train examples/run_baseline.py's ResNet from scratch and linear probe")
    return parser.parse_args(argv)


def patient_id(study_id: str) -> str:
    """The patient of a study: its id up to the last `_` (`nih00000003_000` -> `nih00000003`)."""
    return study_id.rsplit("_", 1)[0]


def is_selection_patient(patient: str) -> bool:
    """About a quarter of the patients, deterministically: the first byte of the MD5 of the id is divisible by 4."""
    return hashlib.md5(patient.encode("utf-8")).digest()[0] % 4 == 0


def load_data(args):
    """
    The splits and the names of the selection and evaluation splits.

    Synthetic films, or a qdistill_folder with a test split: train / validation (selection: checkpoints, temperature,
    threshold) / test (evaluation). A qdistill_folder with only train and validation (../shared/data/cxr-paired): a
    `selection` split is carved out of train by patient, and the untouched `validation` split is the evaluation split.

    Returns:
        `(DatasetDict, selection_split, evaluation_split)`; the DatasetDict's keys are train and those two names.
    """
    import datasets

    from qdistill_hf import load_cxr_dataset

    cache_dir = str(Path(args.output_dir) / "cache")
    if args.data_dir is None:
        splits = load_cxr_dataset(
            "synthetic", cache_dir=cache_dir, num_train=args.num_train, num_validation=args.num_validation,
            num_test=args.num_test, seed=args.seed,
        )
        return splits, "validation", "test"
    splits = load_cxr_dataset(
        "qdistill_folder", data_dir=args.data_dir, cache_dir=cache_dir, label_names=("normal", "abnormal")
    )
    if "test" in splits:
        if "validation" not in splits:
            raise ValueError(f"{args.data_dir}: a test split but no validation split to select on ({list(splits)})")
        return datasets.DatasetDict(train=splits["train"], validation=splits["validation"], test=splits["test"]), \
            "validation", "test"
    if "validation" not in splits:
        raise ValueError(f"{args.data_dir}: no validation split to evaluate on ({list(splits)})")
    train = splits["train"]
    chosen = [is_selection_patient(patient_id(sid)) for sid in train["study_id"]]
    selection_rows = [i for i, c in enumerate(chosen) if c]
    train_rows = [i for i, c in enumerate(chosen) if not c]
    if not selection_rows or not train_rows:
        raise ValueError(f"{args.data_dir}: carving a selection split out of train by patient left "
                         f"{len(train_rows)} train and {len(selection_rows)} selection studies")
    carved = datasets.DatasetDict(train=train.select(train_rows), selection=train.select(selection_rows),
                                  validation=splits["validation"])
    logger.info(
        f"{args.data_dir} has no test split: carved {len(selection_rows)} of {len(train)} train studies into a "
        f"selection split by patient (MD5 of the id before the last '_'), for checkpoints, temperature and threshold; "
        f"the {len(splits['validation'])} validation studies are the evaluation split, on which nothing is tuned"
    )
    return carved, "selection", "validation"


def training_args(args, output_dir: Path, epochs: int, learning_rate: float, metric: str = "auroc", **extra):
    """QDistillTrainingArguments shared by every run: evaluation every epoch, best checkpoint by a validation metric
    (AUROC for the students; the teacher's own validation loss, because a teacher that reads the report reaches
    AUROC 1.0 in its first epoch, long before its ITC alignment has moved)."""
    from qdistill_hf.training import QDistillTrainingArguments

    return QDistillTrainingArguments(
        output_dir=str(output_dir), num_train_epochs=epochs, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=EVAL_BATCH_SIZE, learning_rate=learning_rate, weight_decay=0.01,
        eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True, metric_for_best_model=metric,
        greater_is_better=metric != "loss", save_total_limit=1, logging_strategy="epoch", seed=args.seed, dataloader_num_workers=0,
        dataloader_pin_memory=False, report_to="none", disable_tqdm=False, **{"lr_scheduler_type": "cosine", **extra},
    )


def best_validation(trainer) -> tuple[float | None, int | None]:
    """The best checkpoint's selection-split AUROC and its epoch, from the Trainer's state."""
    state, key = trainer.state, "eval_" + trainer.args.metric_for_best_model
    if state.best_metric is None:
        return None, None
    best = next((e for e in state.log_history if e.get(key) == state.best_metric and "epoch" in e), None)
    return (None, None) if best is None else (best.get("eval_auroc"), round(best["epoch"]))


def predict_and_calibrate(name: str, trainer, splits, selection: str, evaluation: str, folder: Path, args) -> dict:
    """
    The kept checkpoint's logits on the selection and evaluation splits, written as `folder/predictions_<split>.npz`;
    then temperature and threshold fitted on the *selection* logits only (`calibrate_model`, which writes
    `calibration_temperature`, `decision_threshold` and `decision_rule` into the model's config before it is saved).

    Returns:
        `calibrate_model`'s summary.
    """
    from example_utils import save_predictions
    from qdistill_hf.evaluation import calibrate_model

    logits = {}
    for split in (selection, evaluation):
        prediction = trainer.predict(splits[split], metric_key_prefix=split)
        raw = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        logits[split] = raw
        save_predictions(folder, split, splits[split]["study_id"], prediction.label_ids, raw)
    # The baselines (transformers' ResNet, the probe) get the same fit, stored in the same config fields.
    summary = calibrate_model(trainer.model, logits[selection], splits[selection]["label"],
                              rule=args.threshold_rule, target=args.threshold_target, split=selection)
    config = trainer.model.config
    logger.info(f"{name}: temperature {config.calibration_temperature:.3f}, threshold {config.decision_threshold:.3f} "
                f"({config.decision_rule})")
    return summary


def warn_if_too_small(name: str, trainer, folder: Path, evaluation: str, warnings: list) -> None:
    import numpy as np

    from example_utils import load_predictions, predictions_path

    auroc, epoch = best_validation(trainer)
    logger.info(f"{name}: best checkpoint epoch {epoch}, selection AUROC "
                + ("n/a" if auroc is None else f"{auroc:.3f}"))
    if auroc is not None and auroc < TOO_SMALL_AUROC:
        warnings.append(f"{name}: selection AUROC of the best checkpoint is {auroc:.3f} < {TOO_SMALL_AUROC}: "
                        "too small a run to learn the task (more --num_train / epochs)")
    logits = load_predictions(predictions_path(folder, evaluation))["logits"]
    model = trainer.model
    import torch

    decisions = model.triage_decisions(model.triage_probabilities(torch.as_tensor(logits))).numpy()
    if len(np.unique(decisions)) == 1:
        warnings.append(f"{name}: at its threshold it predicts class {int(decisions[0])} for every {evaluation} film: "
                        "too small a run")


def findings_text(findings) -> str:
    if isinstance(findings, str):
        return findings or "-"
    return ", ".join(findings or []) or "-"


def teacher_retrieval(teacher, split, collator, batch_size: int = EVAL_BATCH_SIZE) -> tuple[dict, int]:
    """
    Recall@1/5/10 of the teacher, image->report and report->image, over the split's *distinct* report texts, by
    `qdistill_hf.evaluation.teacher_similarity_matrix` (films and reports embedded separately, so the paired report
    never shapes the image side) and `recall_at_k` (a hit is the film's own report text, or for a report one of its
    films, in the top k; ties count against it). Returns `(recall_at_k's dict with chance levels, distinct)`.
    """
    from qdistill_hf.evaluation import recall_at_k, teacher_similarity_matrix

    rows = split.select_columns([c for c in ("image_features", "report", "study_id", "label") if c in split.column_names])
    reports = list(rows["report"])
    distinct = sorted(set(reports))
    first = [reports.index(text) for text in distinct]
    images = collator([rows[i] for i in range(len(rows))])["image_features"]
    texts = collator([rows[i] for i in first])
    similarity = teacher_similarity_matrix(teacher, images, texts["input_ids"], texts["attention_mask"],
                                           batch_size=batch_size)
    return recall_at_k(similarity, ks=(1, 5, 10), image_groups=[distinct.index(text) for text in reports]), len(distinct)


def save(trainer, processor, folder: Path) -> None:
    from qdistill_hf.sharing import save_for_hub

    trainer.save_model(str(folder))
    # A stand-alone Hub folder: model + processor with auto_map, the cxr-triage pipeline file, a model card.
    save_for_hub(trainer.model, processor, folder, training_args=trainer.args)
    logger.info(f"saved {type(trainer.model).__name__} + processor + cxr-triage pipeline + model card to {folder}/")


def run_baselines(args, film_splits, feature_splits, selection: str, evaluation: str, id2label: dict,
                  output_dir: Path) -> list[tuple[str, str]]:
    """
    `examples/run_baseline.py`'s two baselines on the demo's splits, with the stock `Trainer`, checkpoints chosen by
    selection AUROC, then predictions and calibration on the selection split like every other model:

    - `baseline_resnet`: `ResNetForImageClassification` from scratch on the films (112 px, widths 32-256, one basic
      block per stage: run_baseline.py's CPU config);
    - `baseline_linear_probe`: one linear layer on the frozen encoder's CLS token (the teacher's and students' encoder),
      standardised with the training films' statistics.

    Returns:
        `[(folder name, description)]`.
    """
    import numpy as np
    from transformers import ResNetConfig, ResNetForImageClassification, Trainer, set_seed

    from qdistill_hf import QDistillImageProcessor
    from run_baseline import FeatureCollator, FilmCollator, _probe_classes, compute_metrics_function, pooled_statistics

    label2id = {name: index for index, name in id2label.items()}
    image_processor = QDistillImageProcessor(size={"height": 112, "width": 112})
    runs = []
    set_seed(args.seed)
    resnet = ResNetForImageClassification(ResNetConfig(
        num_channels=3, embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1], layer_type="basic",
        id2label=id2label, label2id=label2id,
    ))
    runs.append(("baseline_resnet", "baseline, ResNet from scratch (films)", resnet, film_splits,
                 FilmCollator(image_processor), image_processor, 1e-3))
    set_seed(args.seed)
    probe_config_class, probe_class = _probe_classes()
    width = np.asarray(feature_splits["train"][0]["image_features"]).shape[-1]
    probe = probe_class(probe_config_class(input_size=int(width), head="linear", pooling="cls",
                                           encoder=args.vision_model or "random stand-in encoder (demo seed)",
                                           id2label=id2label, label2id=label2id))
    probe.set_feature_statistics(*pooled_statistics(probe, feature_splits["train"]))
    runs.append(("baseline_linear_probe", "baseline, linear probe on frozen features", probe, feature_splits,
                 FeatureCollator(), None, 1e-3))
    done = []
    for name, description, model, splits, collator, saved_processor, learning_rate in runs:
        set_seed(args.seed)
        trainer = Trainer(
            model=model,
            args=training_args(args, output_dir / "checkpoints" / name, args.student_epochs, learning_rate),
            train_dataset=splits["train"], eval_dataset=splits[selection], data_collator=collator,
            processing_class=saved_processor, compute_metrics=compute_metrics_function(),
        )
        logger.info(f"training {name} ({description})")
        trainer.train()
        folder = output_dir / name
        predict_and_calibrate(name, trainer, splits, selection, evaluation, folder, args)
        trainer.save_model(str(folder))
        trainer.state.save_to_json(str(folder / "trainer_state.json"))
        done.append((name, description))
    return done


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    started = time.perf_counter()

    import datasets
    import numpy as np
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    from example_utils import cache_features
    from qdistill_hf import (
        QDistillImageProcessor,
        QDistillProcessor,
        QDistillStudentConfig,
        QDistillStudentModel,
        QDistillTeacherConfig,
        QDistillTeacherModel,
        build_report_tokenizer,
    )
    from qdistill_hf.training import QDistillDistillationTrainer, QDistillTeacherTrainer, compute_auroc_metrics
    from run_distillation import retrieval_pseudo_reports
    from run_teacher import stand_in_encoder

    # Trainer and datasets progress bars stay on; transformers' weight-loading/writing bars and info logs are quiet.
    hf_logging.set_verbosity_warning()
    hf_logging.disable_progress_bar()
    datasets.enable_progress_bars()
    output_dir = Path(args.output_dir)
    warnings: list[str] = []
    if "OMP_NUM_THREADS" not in os.environ and os.getloadavg()[0] >= (os.cpu_count() or 1):
        # On a CPU already busy with other jobs torch's spinning threads slow every step several-fold.
        import torch

        torch.set_num_threads(1)
        logger.info(f"load average {os.getloadavg()[0]:.1f} >= {os.cpu_count()} cores: torch uses 1 thread "
                    "(set OMP_NUM_THREADS to choose)")

    # 1. Data: train, a selection split (checkpoints, temperature, threshold) and an evaluation split (the table).
    splits, selection, evaluation = load_data(args)
    label_names = splits["train"].features["label"].names
    logger.info(f"data: { {name: len(split) for name, split in splits.items()} }, classes {label_names}; selection "
                f"split {selection!r}, evaluation split {evaluation!r}")

    # 2. Processor: CXR image processor + a report tokenizer trained on the train split only.
    tokenizer = build_report_tokenizer(splits, vocab_size=2000, min_frequency=1, model_max_length=128)
    processor = QDistillProcessor(image_processor=QDistillImageProcessor(), tokenizer=tokenizer)

    # The triage films: a few evaluation films written as PNG, for the fresh process to read from pixels.
    films_dir = output_dir / "triage_films"
    films_dir.mkdir(parents=True, exist_ok=True)
    manifest = []
    for row in splits[evaluation].select(range(min(NUM_TRIAGE_FILMS, len(splits[evaluation])))):
        path = films_dir / f"{row['study_id']}.png"
        row["image"].save(path)
        manifest.append({"study_id": row["study_id"], "path": str(path.resolve()), "truth": label_names[row["label"]],
                         "findings": findings_text(row.get("findings"))})
    (films_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))

    # 3. Frozen encoder features, computed once per film and cached to Arrow (films dropped afterwards).
    if args.vision_model:
        from transformers import CLIPVisionModel

        encoder = CLIPVisionModel.from_pretrained(args.vision_model)
    else:
        encoder = stand_in_encoder(args.seed)
    encoder.eval().requires_grad_(False)
    film_splits = splits if args.baselines else None  # the CNN baseline reads the films themselves
    splits = cache_features(splits, encoder, processor.image_processor, argparse.Namespace(
        feature_cache_dir=None, per_device_eval_batch_size=EVAL_BATCH_SIZE))
    logger.info(f"feature cache: {splits['train'].cache_files[0]['filename'] if splits['train'].cache_files else '-'}")
    # Per-(token, channel) statistics of the training films' tokens: both Q-Formers standardise the encoder tokens
    # with them (without, every film's queries start identical and the teacher's ITC stays at chance).
    from qdistill_hf.models.modeling_qdistill import image_feature_statistics

    feature_statistics = image_feature_statistics(
        splits["train"].select_columns(["image_features"]).with_format("torch")[:]["image_features"]
    )

    # 4. Teacher: film + human report, QDistillTeacherTrainer.
    set_seed(args.seed)
    id2label = dict(enumerate(label_names))
    vision_config = encoder.config.to_dict()
    teacher = QDistillTeacherModel(QDistillTeacherConfig(
        vision_config=vision_config,
        qformer_config=dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                            max_position_embeddings=tokenizer.model_max_length, hidden_size=128, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=256, num_query_tokens=8),
        embed_dim=64, id2label=id2label, pad_token_id=tokenizer.pad_token_id,
    ))
    teacher.vision_model.load_state_dict(encoder.state_dict())
    teacher.set_image_feature_statistics(*feature_statistics)
    teacher_trainer = QDistillTeacherTrainer(
        model=teacher, args=training_args(args, output_dir / "checkpoints" / "teacher", args.teacher_epochs, 1e-3,
                                          metric=args.teacher_metric, max_grad_norm=1.0,
                                          lr_scheduler_type="constant"),
        train_dataset=splits["train"], eval_dataset=splits[selection], processing_class=processor,
        compute_metrics=compute_auroc_metrics,
    )
    logger.info("training the teacher (film + human report)")
    teacher_trainer.train()
    teacher = teacher_trainer.model.eval()
    validation = teacher_trainer.evaluate()
    # ITC is over each evaluation batch: chance is the mean of ln(batch size) over the selection batches.
    n_val, eval_batch = len(splits[selection]), EVAL_BATCH_SIZE
    sizes = [min(eval_batch, n_val - start) for start in range(0, n_val, eval_batch)]
    itc_chance = sum(math.log(size) for size in sizes) / len(sizes)
    logger.info(
        f"teacher {selection}: loss_itc {validation.get('eval_loss_itc', float('nan')):.3f} (chance ln(eval batch) = "
        f"{itc_chance:.3f}), loss_itm {validation.get('eval_loss_itm', float('nan')):.3f} (chance = entropy of its "
        f"1:2 split = {ITM_CHANCE:.4f}), AUROC {validation['eval_auroc']:.3f}"
    )
    if "image_features" in splits[selection].column_names:
        recall, distinct = teacher_retrieval(teacher, splits[selection], teacher_trainer.data_collator)
        for direction, name in (("image_to_text", "image->report"), ("text_to_image", "report->image")):
            logger.info(f"teacher {selection} {name} recall@1/5/10 over {distinct} distinct reports: "
                        + ", ".join(f"{recall[f'{direction}_recall@{k}']:.3f} (chance "
                                    f"{recall[f'{direction}_chance@{k}']:.3f})" for k in (1, 5, 10)))
    folders = {"teacher": output_dir / "teacher"}
    predict_and_calibrate("teacher", teacher_trainer, splits, selection, evaluation, folders["teacher"], args)
    save(teacher_trainer, processor, folders["teacher"])
    teacher_trainer.state.save_to_json(str(folders["teacher"] / "trainer_state.json"))
    warn_if_too_small("teacher", teacher_trainer, folders["teacher"], evaluation, warnings)

    # 5. Pseudo-reports: each film gets the report of its most similar *training* film (never its own).
    splits = retrieval_pseudo_reports(splits, "pseudo_report", "report")

    # 6. Students: pseudo_report and image_only distilled; image_only on labels alone (same seed and steps).
    runs = (
        ("student_pseudo_report", "pseudo_report", {}),
        ("student", "image_only", {}),
        ("student_image_only_labels_only", "image_only",
         dict(feature_mse_weight=0.0, feature_cosine_weight=0.0, logit_kd_weight=0.0, supervised_weight=1.0)),
    )
    for name, text_mode, weights in runs:
        set_seed(args.seed)
        qformer_config = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                              num_query_tokens=8)
        if text_mode == "pseudo_report":
            qformer_config.update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                  max_position_embeddings=tokenizer.model_max_length)
        student = QDistillStudentModel(QDistillStudentConfig(
            vision_config=vision_config, qformer_config=qformer_config, text_mode=text_mode,
            teacher_hidden_size=teacher.config.qformer_config.hidden_size, id2label=id2label, focal_gamma=0.0,
            pad_token_id=tokenizer.pad_token_id,  # the Trainer would otherwise align it and warn
        ))
        student.vision_model.load_state_dict(encoder.state_dict())
        student.set_image_feature_statistics(*feature_statistics)
        trainer = QDistillDistillationTrainer(
            model=student, teacher_model=teacher,
            args=training_args(args, output_dir / "checkpoints" / name, args.student_epochs, 2e-3,
                               kd_temperature=2.0, **weights),
            train_dataset=splits["train"], eval_dataset=splits[selection], processing_class=processor,
            compute_metrics=compute_auroc_metrics,
        )
        logger.info(f"training {name} ({'labels only' if weights else 'distilled from the teacher'})")
        trainer.train()
        folders[name] = output_dir / name
        predict_and_calibrate(name, trainer, splits, selection, evaluation, folders[name], args)
        save(trainer, processor, folders[name])
        trainer.state.save_to_json(str(folders[name] / "trainer_state.json"))
        warn_if_too_small(name, trainer, folders[name], evaluation, warnings)

    descriptions = {
        "teacher": "teacher, film + human report",
        "student_pseudo_report": "student, film + pseudo-report",
        "student": "student, film only, distilled",
        "student_image_only_labels_only": "student, film only, labels only",
    }

    # 7. Baselines on the same Trainer (examples/run_baseline.py): a ResNet from scratch on the films and a linear
    # probe on the frozen encoder's features, with the same selection split.
    if args.baselines:
        for name, description in run_baselines(args, film_splits, splits, selection, evaluation, id2label, output_dir):
            folders[name] = output_dir / name
            descriptions[name] = description

    # 8. The table: temperature and threshold fitted on the selection split (as saved in each config), metrics on
    # the evaluation split at that threshold (evaluate_triage.py; its plots when matplotlib is installed).
    from evaluate_triage import evaluate

    evaluation_labels = np.asarray(splits[evaluation]["label"])
    majority = int(np.bincount(np.asarray(splits["train"]["label"])).argmax())
    majority_accuracy = float((evaluation_labels == majority).mean())
    try:
        import matplotlib  # noqa: F401

        plots = True
    except ImportError:
        plots = False
        logger.warning("matplotlib is not installed: no plots (pip install -e '.[eval]' for them)")
    metrics = evaluate(
        folders, selection, evaluation, output_dir / "evaluation", rule=args.threshold_rule,
        target=args.threshold_target, seed=args.seed, plots=plots, descriptions=descriptions,
        extra_rows=[(f"majority class ({label_names[majority]}), for reference", "0.500 (constant score)",
                     f"{majority_accuracy:.3f}")],
        title=f"{evaluation} split ({'synthetic films' if args.data_dir is None else Path(args.data_dir).name})",
    )
    width = max(len(d) for d in descriptions.values()) + 2
    table = [f"{evaluation} split ({len(evaluation_labels)} studies), threshold chosen on {selection} "
             f"({args.threshold_rule} {args.threshold_target:.2f})",
             f"  {'':<{width}} AUROC [95% CI]        accuracy  sens   spec   ECE before -> after T"]
    for name, m in metrics.items():
        table.append(
            f"  {descriptions[name]:<{width}} {m['auroc']:.3f} [{m['auroc_ci_low']:.3f}, {m['auroc_ci_high']:.3f}]  "
            f"{m['accuracy']:.3f}     {m['sensitivity']:.3f}  {m['specificity']:.3f}  "
            f"{m['ece_before_calibration']:.3f} -> {m['ece']:.3f}")
    table.append(f"  {'majority class (' + label_names[majority] + ')':<{width}} 0.500                  "
                 f"{majority_accuracy:.3f}")
    print("\n".join(table), flush=True)
    (output_dir / "results.json").write_text(json.dumps(metrics, indent=1))
    from qdistill_hf.sharing import write_model_card

    for name in ("teacher", "student_pseudo_report", "student", "student_image_only_labels_only"):
        write_model_card(folders[name], evaluation=metrics, evaluation_key=name, eval_split=evaluation,
                         eval_dataset="synthetic" if args.data_dir is None else Path(args.data_dir).name)
    for warning in warnings:
        logger.warning(f"WARNING {warning}")

    # 9. A fresh Python process reloads the image-only student with AutoModel and triages films from their pixels,
    # with the temperature and threshold saved in its config.
    folder = output_dir / "student"
    logger.info(f"fresh process: AutoModel.from_pretrained({folder}) and triage of {len(manifest)} {evaluation} films")
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    subprocess.run([sys.executable, "-c", TRIAGE_SCRIPT, str(folder), str(films_dir / "manifest.json")],
                   check=True, env=env)
    logger.info(
        f"artefacts in {output_dir}/: {', '.join(f + '/' for f in folders)} (model + processor + predictions_*.npz + "
        f"trainer_state.json each), evaluation/ (metrics.json, table.md{', PNGs' if plots else ''}), results.json, "
        f"triage_films/, checkpoints/, cache/; total {time.perf_counter() - started:.0f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
