"""End-to-end Q-DISTILL with the Trainer subclasses, on CPU in a few minutes (`make demo`).

    python examples/demo.py                                   # embedded synthetic films, writes outputs/demo/
    python examples/demo.py --num_train 300 --student_epochs 5  # quicker; warns when too small to learn
    python examples/demo.py --data_dir ../shared/data/cxr-paired  # the same pipeline on a qdistill_folder dataset
    python examples/demo.py --vision_model chexzero-vit-b32   # a converted CheXzero folder as the frozen encoder

Steps: prepare the data -> train the report tokenizer on the train split -> cache the frozen encoder's features ->
train the teacher on film + human report with `QDistillTeacherTrainer` (ITC + ITM with hard negatives + focal) ->
give every film the report of its most similar *training* film (retrieval pseudo-reports, never its own) -> distil
two students from the frozen teacher with `QDistillDistillationTrainer` (`pseudo_report`: film + retrieved report;
`image_only`: the film alone) -> train the same image-only student on the labels alone (same seed and steps,
distillation weights 0) -> evaluate everything on the test split -> save the teacher and the students with their
processor -> reload the image-only student with `AutoModel.from_pretrained` in a fresh Python process and triage a
few test films from their pixels.

Every Trainer evaluates on validation each epoch and keeps its best checkpoint by a validation metric
(`load_best_model_at_end=True`): AUROC for the students, the validation loss for the teacher (whose AUROC from reading
the report is 1.0 from the first epoch); the test split is used only for the final table.

Without `--vision_model` the frozen encoder is a small randomly initialised CLIP ViT with CheXzero's geometry
(224 px, patch 32, 50 tokens; `run_teacher.stand_in_encoder`): CheXzero's weights cannot be downloaded here. A random
frozen encoder still carries the drawn findings, so the numbers are about this pipeline on synthetic data, not about
real radiographs.

`--data_dir` reads a `qdistill_folder` dataset with classes (normal, abnormal). Such a folder may have only train and
validation splits (../shared/data/cxr-paired does): the demo then carves a test split out of validation, by patient
(the study id up to its last `_`, e.g. `nih00000003` for `nih00000003_000`), deterministically: a patient goes to
test when the first byte of the MD5 of its id is odd. A patient's films never straddle validation and test.
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
films = [Image.open(row["path"]) for row in manifest]
with torch.no_grad():
    probs = model(**processor(images=films)).logits.softmax(-1)
for row, p in zip(manifest, probs):
    verdict = model.config.id2label[int(p.argmax())]
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
    return parser.parse_args(argv)


def patient_id(study_id: str) -> str:
    """The patient of a study: its id up to the last `_` (`nih00000003_000` -> `nih00000003`)."""
    return study_id.rsplit("_", 1)[0]


def is_test_patient(patient: str) -> bool:
    return hashlib.md5(patient.encode("utf-8")).digest()[0] % 2 == 1


def load_data(args):
    """train / validation / test splits: synthetic films, or a qdistill_folder (test carved from validation)."""
    import datasets

    from qdistill_hf import load_cxr_dataset

    cache_dir = str(Path(args.output_dir) / "cache")
    if args.data_dir is None:
        return load_cxr_dataset(
            "synthetic", cache_dir=cache_dir, num_train=args.num_train, num_validation=args.num_validation,
            num_test=args.num_test, seed=args.seed,
        )
    splits = load_cxr_dataset(
        "qdistill_folder", data_dir=args.data_dir, cache_dir=cache_dir, label_names=("normal", "abnormal")
    )
    if "test" not in splits:
        if "validation" not in splits:
            raise ValueError(f"{args.data_dir}: no validation split to carve a test split from ({list(splits)})")
        validation = splits["validation"]
        to_test = [is_test_patient(patient_id(sid)) for sid in validation["study_id"]]
        test_rows = [i for i, t in enumerate(to_test) if t]
        val_rows = [i for i, t in enumerate(to_test) if not t]
        splits = datasets.DatasetDict(
            train=splits["train"], validation=validation.select(val_rows), test=validation.select(test_rows)
        )
        logger.info(
            f"{args.data_dir} has no test split: carved {len(test_rows)} of {len(validation)} validation studies "
            f"into test, by patient (MD5 of the id before the last '_')"
        )
    return splits


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
    """The best checkpoint's validation AUROC and its epoch, from the Trainer's state."""
    state, key = trainer.state, "eval_" + trainer.args.metric_for_best_model
    if state.best_metric is None:
        return None, None
    best = next((e for e in state.log_history if e.get(key) == state.best_metric and "epoch" in e), None)
    return (None, None) if best is None else (best.get("eval_auroc"), round(best["epoch"]))


def test_metrics(trainer, test) -> tuple[dict, "np.ndarray"]:
    """AUROC and accuracy on the test split, plus the predicted class of every film."""
    from qdistill_hf.training import compute_auroc_metrics

    prediction = trainer.predict(test, metric_key_prefix="test")
    metrics = compute_auroc_metrics(prediction)
    return metrics, prediction.predictions.argmax(-1)


def warn_if_too_small(name: str, trainer, predictions, warnings: list) -> None:
    auroc, epoch = best_validation(trainer)
    logger.info(f"{name}: best checkpoint epoch {epoch}, validation AUROC "
                + ("n/a" if auroc is None else f"{auroc:.3f}"))
    if auroc is not None and auroc < TOO_SMALL_AUROC:
        warnings.append(f"{name}: validation AUROC of the best checkpoint is {auroc:.3f} < {TOO_SMALL_AUROC}: "
                        "too small a run to learn the task (more --num_train / epochs)")
    if len(set(predictions.tolist())) == 1:
        warnings.append(f"{name}: predicts class {int(predictions[0])} for every test film: too small a run")


def findings_text(findings) -> str:
    if isinstance(findings, str):
        return findings or "-"
    return ", ".join(findings or []) or "-"


def report_recall_at_5(teacher, split, collator, batch_size: int = EVAL_BATCH_SIZE) -> tuple[float, float, int]:
    """
    Image->report recall@5 of the teacher over the split's *distinct* report texts, by
    `qdistill_hf.evaluation.teacher_similarity_matrix` (films and reports embedded separately, so the paired report
    never shapes the image side) and `recall_at_k` (a hit is the film's own report text in the top 5; ties count
    against it). Returns `(recall, chance = 5 / distinct, distinct)`.
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
    recall = recall_at_k(similarity, ks=(5,), image_groups=[distinct.index(text) for text in reports])
    return recall["image_to_text_recall@5"], recall["image_to_text_chance@5"], len(distinct)


def save(trainer, processor, folder: Path) -> None:
    trainer.save_model(str(folder))
    processor.save_pretrained(str(folder))
    logger.info(f"saved {type(trainer.model).__name__} + processor to {folder}/")


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

    # 1. Data.
    splits = load_data(args)
    label_names = splits["train"].features["label"].names
    logger.info(f"data: { {name: len(split) for name, split in splits.items()} }, classes {label_names}")

    # 2. Processor: CXR image processor + a report tokenizer trained on the train split only.
    tokenizer = build_report_tokenizer(splits, vocab_size=2000, min_frequency=1, model_max_length=128)
    processor = QDistillProcessor(image_processor=QDistillImageProcessor(), tokenizer=tokenizer)

    # The triage films: a few test films written as PNG, for the fresh process to read from pixels.
    films_dir = output_dir / "triage_films"
    films_dir.mkdir(parents=True, exist_ok=True)
    manifest = []
    for row in splits["test"].select(range(min(NUM_TRIAGE_FILMS, len(splits["test"])))):
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
                                          metric="loss", max_grad_norm=1.0,
                                          lr_scheduler_type="constant"),
        train_dataset=splits["train"], eval_dataset=splits["validation"], processing_class=processor,
        compute_metrics=compute_auroc_metrics,
    )
    logger.info("training the teacher (film + human report)")
    teacher_trainer.train()
    teacher = teacher_trainer.model.eval()
    validation = teacher_trainer.evaluate()
    # ITC is over each evaluation batch: chance is the mean of ln(batch size) over the validation batches.
    n_val, eval_batch = len(splits["validation"]), EVAL_BATCH_SIZE
    sizes = [min(eval_batch, n_val - start) for start in range(0, n_val, eval_batch)]
    itc_chance = sum(math.log(size) for size in sizes) / len(sizes)
    logger.info(
        f"teacher validation: loss_itc {validation.get('eval_loss_itc', float('nan')):.3f} (chance ln(eval batch) = "
        f"{itc_chance:.3f}), loss_itm {validation.get('eval_loss_itm', float('nan')):.3f} (chance = entropy of its "
        f"1:2 split = {ITM_CHANCE:.4f}), AUROC {validation['eval_auroc']:.3f}"
    )
    if "image_features" in splits["validation"].column_names:
        recall, recall_chance, distinct = report_recall_at_5(teacher, splits["validation"], teacher_trainer.data_collator)
        logger.info(f"teacher validation image->report recall@5 over {distinct} distinct reports: {recall:.3f} "
                    f"(chance {recall_chance:.3f})")
    teacher_test, teacher_pred = test_metrics(teacher_trainer, splits["test"])
    warn_if_too_small("teacher", teacher_trainer, teacher_pred, warnings)
    save(teacher_trainer, processor, output_dir / "teacher")

    # 5. Pseudo-reports: each film gets the report of its most similar *training* film (never its own).
    splits = retrieval_pseudo_reports(splits, "pseudo_report", "report")

    # 6. Students: pseudo_report and image_only distilled; image_only on labels alone (same seed and steps).
    students = {}
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
            train_dataset=splits["train"], eval_dataset=splits["validation"], processing_class=processor,
            compute_metrics=compute_auroc_metrics,
        )
        logger.info(f"training {name} ({'labels only' if weights else 'distilled from the teacher'})")
        trainer.train()
        metrics, predictions = test_metrics(trainer, splits["test"])
        warn_if_too_small(name, trainer, predictions, warnings)
        save(trainer, processor, output_dir / name)
        students[name] = metrics

    # 7. The test table.
    test_labels = np.asarray(splits["test"]["label"])
    majority = int(np.bincount(np.asarray(splits["train"]["label"])).argmax())
    rows = [
        ("teacher, film + human report", teacher_test),
        ("student, film + pseudo-report", students["student_pseudo_report"]),
        ("student, film only, distilled", students["student"]),
        ("student, film only, labels only", students["student_image_only_labels_only"]),
        (f"majority class ({label_names[majority]})",
         {"auroc": 0.5, "accuracy": float((test_labels == majority).mean())}),
    ]
    table = [f"test split ({len(test_labels)} studies)                 AUROC  accuracy"]
    table += [f"  {name:<40} {m['auroc']:.3f}  {m['accuracy']:.3f}" for name, m in rows]
    print("\n".join(table), flush=True)
    (output_dir / "results.json").write_text(json.dumps({name: m for name, m in rows}, indent=1))
    for warning in warnings:
        logger.warning(f"WARNING {warning}")

    # 8. A fresh Python process reloads the image-only student with AutoModel and triages films from their pixels.
    folder = output_dir / "student"
    logger.info(f"fresh process: AutoModel.from_pretrained({folder}) and triage of {len(manifest)} test films")
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    subprocess.run([sys.executable, "-c", TRIAGE_SCRIPT, str(folder), str(films_dir / "manifest.json")],
                   check=True, env=env)
    logger.info(
        f"artefacts in {output_dir}/: teacher/, student/ (image-only, distilled), student_pseudo_report/, "
        f"student_image_only_labels_only/ (model + processor each), results.json, triage_films/, checkpoints/, "
        f"cache/; total {time.perf_counter() - started:.0f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
