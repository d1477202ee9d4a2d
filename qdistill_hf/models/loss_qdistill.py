"""Pure loss functions of Q-DISTILL: contrastive (soft positives), hard-negative sampling, focal, distillation.

Every function is stateless, computes in float32 and never clamps or masks non-finite values: divergence must
surface, not be hidden. Checks that read tensor values on the host (label range, diagonal of a positive mask,
finite similarities) run in eager mode only (`torch.compiler.is_compiling()` skips them, so a compiled training
step stays one graph); the models' `validate_batch` runs the input checks outside the graph.
"""

import torch
import torch.nn.functional as F


def report_positive_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """
    Which pairs in a batch share the same report.

    Many chest X-ray reports are identical ("No acute cardiopulmonary process."), so treating every off-diagonal pair
    as a negative would push apart studies that the data says are the same. The tokenizer lower-cases and strips
    accents, so identical token sequences mean identical normalised report text.

    Args:
        input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): report tokens.
        attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*): 1 on real tokens.

    Returns:
        `torch.BoolTensor` of shape `(batch_size, batch_size)`: `True` where reports `i` and `j` are identical
        (always `True` on the diagonal).
    """
    ids = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, -1)
    return (ids[:, None, :] == ids[None, :, :]).all(dim=-1)


def query_text_similarity(
    image_query_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    mode: str = "softmax",
    temperature: float = 0.1,
) -> torch.Tensor:
    """
    Cosine similarity of every image (a set of query embeddings) with every text, computed per pair.

    Args:
        image_query_embeds (`torch.Tensor` of shape `(num_images, num_queries, dim)`): L2-normalised query embeddings.
        text_embeds (`torch.Tensor` of shape `(num_texts, dim)`): L2-normalised text embeddings.
        mode (`str`): `"max"` takes the best query for each pair (BLIP-2). `"softmax"` mixes the queries of image `i`
            with weights `softmax_q(cos(q, text_j) / temperature)`, renormalises the mix and takes its cosine with
            text `j` (the original Q-DISTILL's weighting, but computed for every pair instead of choosing the mix with
            the positive text only, which leaked the positive into the image embedding).
        temperature (`float`): temperature of the `"softmax"` weighting.

    Returns:
        `torch.Tensor` of shape `(num_images, num_texts)` in float32.
    """
    if mode not in ("max", "softmax"):
        raise ValueError(f"Unknown query selection mode {mode!r}; expected 'softmax' or 'max'.")
    queries = image_query_embeds.float()
    texts = text_embeds.float()
    # Autocast would run the einsums in bf16 despite the float32 inputs: ITC logits at scale up to 100 would then be
    # quantised in steps of 0.25-0.5.
    with torch.autocast(queries.device.type, enabled=False):
        per_query = torch.einsum("iqd,jd->ijq", queries, texts)
        if mode == "max":
            return per_query.max(dim=-1).values
        weights = torch.softmax(per_query / temperature, dim=-1)
        # |sum_q w_q e_q|^2 = w^T G w with G the Gram matrix of image i's queries.
        gram = torch.einsum("iqd,ipd->iqp", queries, queries)
        mix_norm_sq = torch.einsum("ijq,iqp,ijp->ij", weights, gram, weights)
        return (weights * per_query).sum(dim=-1) / mix_norm_sq.sqrt()


def image_text_contrastive_loss(logits_per_image: torch.Tensor, positive_mask: torch.Tensor | None = None) -> torch.Tensor:
    """
    Symmetric InfoNCE over a batch, with soft positives.

    Args:
        logits_per_image (`torch.Tensor` of shape `(batch_size, batch_size)`): scaled similarities, image `i` vs text `j`.
        positive_mask (`torch.BoolTensor` of shape `(batch_size, batch_size)`, *optional*): pairs that count as
            positives. Each row's target distribution is uniform over its positives. Defaults to the diagonal.

    Returns:
        Scalar `torch.Tensor`: the mean of the image-to-text and text-to-image cross-entropies.
    """
    logits = logits_per_image.float()
    batch_size = logits.shape[0]
    if positive_mask is None:
        positive_mask = torch.eye(batch_size, dtype=torch.bool, device=logits.device)
    if positive_mask.shape != logits.shape:
        raise ValueError(f"positive_mask has shape {tuple(positive_mask.shape)}, expected {tuple(logits.shape)}.")
    # A host sync: checked in eager mode only (the model validates `positive_mask` before compiled steps too).
    if not torch.compiler.is_compiling() and not bool(positive_mask.diagonal().all()):
        raise ValueError("positive_mask must be True on the diagonal: every image is a positive of its own text.")
    targets = positive_mask.float()
    loss_i2t = -(targets / targets.sum(1, keepdim=True) * logits.log_softmax(dim=1)).sum(1).mean()
    targets_t = targets.t()
    loss_t2i = -(targets_t / targets_t.sum(1, keepdim=True) * logits.t().log_softmax(dim=1)).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2


def sample_hard_negatives(
    similarity: torch.Tensor, positive_mask: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Draw one hard negative per row, with probability `softmax(similarity)` restricted to non-positives (BLIP-2).

    Args:
        similarity (`torch.Tensor` of shape `(num_rows, num_candidates)`): scaled similarities (ITC logits).
        positive_mask (`torch.BoolTensor`, same shape): candidates that must never be drawn.
        generator (`torch.Generator`, *optional*): for reproducible draws.

    Returns:
        `(indices, valid)`: `indices` (`torch.LongTensor` of shape `(num_rows,)`) is the drawn candidate, and
        `valid` (`torch.BoolTensor`) is `False` for rows that have no non-positive candidate at all (batch size 1,
        or a batch of identical reports); their index is -1 and must not be used.
    """
    if similarity.shape != positive_mask.shape:
        raise ValueError(f"positive_mask has shape {tuple(positive_mask.shape)}, expected {tuple(similarity.shape)}.")
    if not torch.compiler.is_compiling():
        bad = (~torch.isfinite(similarity)).any(dim=1)
        if bool(bad.any()):
            # `torch.multinomial` would only say "probability tensor contains either inf, nan or element < 0".
            raise FloatingPointError(
                f"Non-finite similarities in rows {bad.nonzero().flatten().tolist()}: the hard-negative draw is "
                "undefined. The inputs of these rows or the model's weights are non-finite."
            )
    valid = (~positive_mask).any(dim=1)
    # The softmax runs over the candidates only: normalising over the whole row and then zeroing the positives lets a
    # dominant positive (logit gap > ~100 at CLIP's scale bound) underflow every negative weight to 0.
    logits = similarity.detach().float().masked_fill(positive_mask, float("-inf"))
    # Rows without a candidate get uniform dummy weights so one vectorised draw covers the batch; their result is
    # discarded through `valid`.
    logits = torch.where(valid[:, None], logits, torch.zeros_like(logits))
    weights = torch.softmax(logits, dim=1)
    indices = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    return indices.masked_fill(~valid, -1), valid


def focal_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    gamma: float = 2.0,
    alpha: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """
    Multi-class focal loss `-alpha[y] * (1 - p_y) ** gamma * log p_y` (Lin et al., 2017); `gamma=0` and no `alpha`
    is cross-entropy.

    Args:
        logits (`torch.Tensor` of shape `(batch_size, num_labels)`).
        labels (`torch.LongTensor` of shape `(batch_size,)`): class ids in `[0, num_labels)`; anything else raises.
        gamma (`float`): focusing parameter.
        alpha (`torch.Tensor` of shape `(num_labels,)`, *optional*): per-class weights.
        reduction (`str`): `"mean"` (over the batch, as the original), `"sum"` or `"none"`.
    """
    num_labels = logits.shape[-1]
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be a LongTensor of class ids in [0, {num_labels}), got dtype {labels.dtype}.")
    if labels.shape != logits.shape[:1]:
        raise ValueError(
            f"labels has shape {tuple(labels.shape)} but the logits are for {logits.shape[0]} images: give one "
            f"class id in [0, {num_labels}) per image."
        )
    # The range check reads the labels on the host: eager only (the models validate labels before compiled steps).
    if not torch.compiler.is_compiling() and labels.numel():
        outside = (labels < 0) | (labels >= num_labels)
        if bool(outside.any()):
            raise ValueError(f"labels must be class ids in [0, {num_labels}); got {sorted(set(labels[outside].tolist()))}.")
    log_probs = logits.float().log_softmax(dim=-1)
    log_p_true = log_probs.gather(1, labels[:, None]).squeeze(1)
    loss = -((1 - log_p_true.exp()) ** gamma) * log_p_true
    if alpha is not None:
        loss = alpha.to(loss)[labels] * loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"Unknown reduction {reduction!r}; expected 'mean', 'sum' or 'none'.")


def distillation_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """
    Hinton logit distillation: `T**2 * KL(softmax(teacher / T) || softmax(student / T))`, averaged over the batch.
    """
    student = (student_logits.float() / temperature).log_softmax(dim=-1)
    teacher = (teacher_logits.float() / temperature).log_softmax(dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2


def embedding_alignment_loss(student_embeds: torch.Tensor, teacher_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Feature distillation as in the original: `(MSE(s, t), mean(1 - cos(s, t)))` on `(batch_size, dim)` features.
    """
    student = student_embeds.float()
    teacher = teacher_embeds.float()
    mse = F.mse_loss(student, teacher)
    cosine = (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    return mse, cosine


__all__ = [
    "report_positive_mask",
    "query_text_similarity",
    "image_text_contrastive_loss",
    "sample_hard_negatives",
    "focal_loss",
    "distillation_kl_loss",
    "embedding_alignment_loss",
]
