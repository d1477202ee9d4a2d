"""End-to-end Q-DISTILL on the embedded synthetic films, on CPU in a couple of minutes (`make demo`).

    python examples/demo.py                                   # everything offline, writes outputs/demo/
    python examples/demo.py --vision_model chexzero-vit-b32   # a converted CheXzero folder as the frozen encoder

Steps: draw a synthetic chest-film dataset -> train the report tokenizer on the train split -> cache the frozen
encoder's features -> retrieve a pseudo-report for every film from the *training* films -> train the teacher on
film + human report (ITC + ITM with hard negatives + focal) -> distil an image-only student from the frozen teacher
-> evaluate on the test split -> save both, reload the student with `AutoModel.from_pretrained` and triage films.

Without `--vision_model` the frozen encoder is a small randomly initialised CLIP ViT with CheXzero's geometry
(224 px, patch 32, 50 tokens): CheXzero's weights cannot be downloaded here. A random frozen encoder still carries
the drawn findings, so every number below is about this pipeline on synthetic data, not about real radiographs.
"""

import argparse
import logging
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from transformers import AutoModel, CLIPVisionConfig, CLIPVisionModel
from transformers.utils import logging as hf_logging

from qdistill_hf import (
    QDistillImageProcessor,
    QDistillProcessor,
    QDistillStudentConfig,
    QDistillStudentModel,
    QDistillTeacherConfig,
    QDistillTeacherModel,
    build_report_tokenizer,
    cache_image_features,
    load_cxr_dataset,
)
from qdistill_hf.models.loss_qdistill import distillation_kl_loss, embedding_alignment_loss
from qdistill_hf.reports.pseudo_reports import RetrievalPseudoReportGenerator, image_embeddings_from_features


logger = logging.getLogger("qdistill_demo")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--vision_model", default=None, help="folder of a converted CheXzero CLIPVisionModel")
    parser.add_argument("--num_train", type=int, default=1200)
    parser.add_argument("--num_validation", type=int, default=200)
    parser.add_argument("--num_test", type=int, default=300)
    parser.add_argument("--teacher_epochs", type=int, default=4)
    parser.add_argument("--student_epochs", type=int, default=30)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def stand_in_encoder(seed: int) -> CLIPVisionModel:
    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, image_size=224,
        patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=64,
    )
    return CLIPVisionModel(config).eval()


def batches(split, tokenizer, batch_size, shuffle, generator=None, text_column="report"):
    """Yield model inputs from a cached split: fp16 features, dynamically padded report tokens, labels, ids."""
    order = torch.randperm(len(split), generator=generator) if shuffle else torch.arange(len(split))
    for start in range(0, len(split), batch_size):
        rows = split[order[start : start + batch_size].tolist()]
        text = tokenizer(rows[text_column], padding="longest", truncation=True, return_tensors="pt")
        yield {
            "image_features": torch.tensor(np.asarray(rows["image_features"]), dtype=torch.float32),
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            "labels": torch.tensor(rows["label"]),
            "study_ids": rows["study_id"],
        }


def train_teacher(teacher, train, tokenizer, args):
    optimizer = torch.optim.AdamW([p for p in teacher.parameters() if p.requires_grad], lr=3e-4, weight_decay=0.01)
    generator = torch.Generator().manual_seed(args.seed)
    teacher.train()
    for epoch in range(args.teacher_epochs):
        sums = {"loss": 0.0, "loss_itc": 0.0, "loss_itm": 0.0, "loss_cls": 0.0}
        steps = 0
        for batch in batches(train, tokenizer, args.batch_size, True, generator):
            study_ids = batch.pop("study_ids")
            try:
                out = teacher(**batch, return_loss=True, generator=generator)
            except FloatingPointError as error:
                raise FloatingPointError(f"teacher epoch {epoch} step {steps}, studies {study_ids}: {error}") from error
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            teacher.clamp_logit_scale()
            for key in sums:
                if out[key] is not None:
                    sums[key] += float(out[key].detach())
            steps += 1
        logger.info("teacher epoch %d: %s", epoch + 1, ", ".join(f"{k} {v / steps:.3f}" for k, v in sums.items()))
    return teacher.eval()


def distil_student(student, teacher, train, validation, tokenizer, args, temperature=2.0):
    """
    Focal loss on labels + KL to the teacher's triage logits + alignment with the teacher's pooled queries; the
    weights of the epoch with the best validation AUROC are kept.
    """
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(args.seed + 1)
    student.train()
    best = None
    for epoch in range(args.student_epochs):
        total, steps = 0.0, 0
        for batch in batches(train, tokenizer, args.batch_size, True, generator):
            study_ids = batch.pop("study_ids")
            with torch.no_grad():
                target = teacher(**batch)
            out = student(image_features=batch["image_features"], labels=batch["labels"])
            mse, cosine = embedding_alignment_loss(out.projected_output, target.query_output_bidirectional.mean(1))
            loss = out.loss + distillation_kl_loss(out.logits, target.logits, temperature) + mse + cosine
            if not torch.isfinite(loss):
                raise FloatingPointError(f"student epoch {epoch} step {steps}, studies {study_ids}: loss {loss}")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            total += float(loss.detach())
            steps += 1
        student.eval()
        metrics = evaluate(validation, tokenizer, lambda b: student(image_features=b["image_features"]).logits, 256)
        logger.info("student epoch %d: loss %.3f, validation %s", epoch + 1, total / steps, metrics)
        if best is None or metrics["auroc"] > best[0]:
            best = (metrics["auroc"], epoch + 1, {k: v.clone() for k, v in student.state_dict().items()})
        student.train()
    logger.info("student: keeping epoch %d (validation AUROC %.3f)", best[1], best[0])
    student.load_state_dict(best[2])
    return student.eval()


@torch.no_grad()
def evaluate(split, tokenizer, predict, batch_size):
    probs, labels = [], []
    for batch in batches(split, tokenizer, batch_size, False):
        probs.append(predict(batch).softmax(-1)[:, 1])
        labels.append(batch["labels"])
    probs, labels = torch.cat(probs).numpy(), torch.cat(labels).numpy()
    accuracy = float(((probs > 0.5) == labels).mean())
    return {"accuracy": round(accuracy, 3), "auroc": round(float(roc_auc_score(labels, probs)), 3)}


def main():
    args = parse_args()
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    output_dir = Path(args.output_dir)
    started = time.perf_counter()

    # 1. Data: procedurally drawn films with paired reports (deterministic by seed).
    data = load_cxr_dataset(
        "synthetic", cache_dir=str(output_dir / "cache"), num_train=args.num_train,
        num_validation=args.num_validation, num_test=args.num_test, seed=args.seed,
    )
    label_names = data["train"].features["label"].names
    logger.info("data: %s", {name: len(split) for name, split in data.items()})

    # 2. Processor: CXR image processor + a report tokenizer trained on the train split only.
    tokenizer = build_report_tokenizer(data, vocab_size=2000, min_frequency=1)
    processor = QDistillProcessor(image_processor=QDistillImageProcessor(), tokenizer=tokenizer)

    # 3. Frozen encoder features, computed once per film and cached to Arrow.
    encoder = CLIPVisionModel.from_pretrained(args.vision_model) if args.vision_model else stand_in_encoder(args.seed)
    encoder.eval().requires_grad_(False)
    data = {name: cache_image_features(split, encoder, processor.image_processor) for name, split in data.items()}

    # 4. Pseudo-reports: each film gets the report of its most similar *training* film (never its own).
    train_embeds = image_embeddings_from_features(np.asarray(data["train"]["image_features"], dtype=np.float32))
    retriever = RetrievalPseudoReportGenerator(train_embeds, data["train"]["report"], data["train"]["study_id"])
    for name, split in data.items():
        embeds = image_embeddings_from_features(np.asarray(split["image_features"], dtype=np.float32))
        reports = retriever.generate(embeds, split["study_id"], own_reports=split["report"])
        data[name] = split.remove_columns("pseudo_report").add_column("pseudo_report", reports)

    # 5. Teacher: film + human report.
    id2label = dict(enumerate(label_names))
    vision_config = encoder.config.to_dict()
    teacher = QDistillTeacherModel(
        QDistillTeacherConfig(
            vision_config=vision_config,
            qformer_config=dict(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=256, num_query_tokens=8, max_position_embeddings=256),
            embed_dim=64, id2label=id2label,
        )
    )
    teacher.vision_model.load_state_dict(encoder.state_dict())
    teacher = train_teacher(teacher, data["train"], tokenizer, args)

    # 6. Student: image only, distilled from the frozen teacher.
    student = QDistillStudentModel(
        QDistillStudentConfig(
            vision_config=vision_config, text_mode="image_only", teacher_hidden_size=128, id2label=id2label,
            focal_gamma=0.0,
            qformer_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                num_query_tokens=8),
        )
    )
    student.vision_model.load_state_dict(encoder.state_dict())
    student = distil_student(student, teacher, data["train"], data["validation"], tokenizer, args)

    # 7. Test split: the teacher reads the human report (an oracle); the student sees the film alone.
    test = data["test"]
    majority = max(np.mean(test["label"]), 1 - np.mean(test["label"]))
    results = {
        "majority class accuracy": round(float(majority), 3),
        "teacher (film + human report)": evaluate(test, tokenizer, lambda b: teacher(
            image_features=b["image_features"], input_ids=b["input_ids"], attention_mask=b["attention_mask"]
        ).logits, 256),
        "student (film only)": evaluate(test, tokenizer, lambda b: student(image_features=b["image_features"]).logits, 256),
    }
    for name, value in results.items():
        logger.info("test  %-32s %s", name, value)

    # 8. Save in the Hub layout, reload with AutoModel, triage a few test films from their pixels.
    teacher.save_pretrained(output_dir / "teacher")
    student.save_pretrained(output_dir / "student")
    processor.save_pretrained(output_dir / "student")
    reloaded = AutoModel.from_pretrained(output_dir / "student")
    raw_test = load_cxr_dataset(
        "synthetic", cache_dir=str(output_dir / "cache"), num_train=args.num_train,
        num_validation=args.num_validation, num_test=args.num_test, seed=args.seed,
    )["test"].select(range(5))
    pixel_values = processor(images=list(raw_test["image"]))["pixel_values"]
    with torch.no_grad():
        probs = reloaded(pixel_values=pixel_values).logits.softmax(-1)
    for row, p in zip(raw_test, probs):
        verdict = reloaded.config.id2label[int(p.argmax())]
        print(f"{row['study_id']}: {verdict:<10} p(urgent)={p[1]:.2f}  truth={label_names[row['label']]:<10} "
              f"findings={row['findings'] or 'none'}")
    print(f"saved teacher and student to {output_dir}/ in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
