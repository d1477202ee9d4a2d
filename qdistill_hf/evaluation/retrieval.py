"""Image <-> report retrieval of the teacher: recall@k in both directions, from similarities that never let the
paired report into the image embedding.

The original Q-DISTILL chose the mix of an image's query embeddings with its *paired* report and then compared that
mix with every report, so the image side of every comparison already carried the answer. Here
[`teacher_similarity_matrix`] embeds images (unimodal query pass, no text) and reports (text pass, no image)
separately, in batches, and scores every pair with `query_text_similarity` (the per-pair query mix the ITC loss
uses): the similarity of image `i` with report `j` depends on `i` and `j` only.
"""

import logging
import math
from collections.abc import Sequence

import numpy as np


logger = logging.getLogger(__name__)


def _groups(groups, size: int, name: str) -> np.ndarray:
    if groups is None:
        return np.arange(size)
    groups = np.asarray(groups)
    if groups.shape != (size,):
        raise ValueError(f"`{name}` must have shape ({size},) to match the similarity matrix, got {groups.shape}.")
    return groups


def _chance(positives: np.ndarray, candidates: int, k: int) -> float:
    """Mean over queries of P(a random ranking puts at least one of the query's positives in the top k)."""
    k = min(k, candidates)
    misses = [math.comb(candidates - m, k) / math.comb(candidates, k) for m in positives.tolist()]
    return float(1.0 - np.mean(misses))


def _one_direction(similarity: np.ndarray, query_groups, candidate_groups, ks, prefix: str, out: dict):
    match = query_groups[:, None] == candidate_groups[None, :]
    has_positive = match.any(axis=1)
    if not has_positive.all():
        logger.warning(
            "%s: %d of %d queries have no matching candidate and are left out of the recall (counted in %s_n_queries).",
            prefix, int((~has_positive).sum()), has_positive.size, prefix,
        )
    similarity, match = similarity[has_positive], match[has_positive]
    best_positive = np.where(match, similarity, -np.inf).max(axis=1)
    # Rank of the best positive, counting every non-matching candidate scoring at least as high (ties against it).
    rank = 1 + ((similarity >= best_positive[:, None]) & ~match).sum(axis=1)
    out[f"{prefix}_n_queries"] = int(has_positive.sum())
    out[f"{prefix}_n_candidates"] = int(similarity.shape[1])
    out[f"{prefix}_median_rank"] = float(np.median(rank)) if rank.size else math.nan
    for k in ks:
        out[f"{prefix}_recall@{k}"] = float(np.mean(rank <= k)) if rank.size else math.nan
        out[f"{prefix}_chance@{k}"] = _chance(match.sum(axis=1), similarity.shape[1], k) if rank.size else math.nan


def recall_at_k(
    similarity,
    *,
    ks: Sequence[int] = (1, 5, 10),
    image_groups=None,
    text_groups=None,
) -> dict:
    """
    Recall@k of image -> text and text -> image retrieval over an image x text similarity matrix, with chance levels.

    A hit for a query is any candidate of the same group in its top `k`: with `image_groups[i]` the group of image
    `i`'s report and `text_groups[j]` that of text `j`, identical report texts can share one group, so a film whose
    report is the common "No acute cardiopulmonary process." is not penalised for ranking an identical copy first.
    The rank of a query is 1 + the number of non-matching candidates scoring at least as high as its best match
    (ties count against it, so a constant similarity never scores a hit by luck). Queries without any matching
    candidate are left out (counted in `*_n_queries`, logged). Chance is the expected recall of a random ranking:
    the mean over queries of `1 - C(N - m, k) / C(N, k)` for `m` matching among `N` candidates (`k / N` when `m = 1`).
    With `k >= N` both recall and chance are 1 by definition.

    Args:
        similarity (array-like or `torch.Tensor` of shape `(num_images, num_texts)`): higher = more similar.
        ks (`Sequence[int]`, *optional*, defaults to `(1, 5, 10)`): cut-offs.
        image_groups (array-like of shape `(num_images,)`, *optional*): group of each image; defaults to
            `arange(num_images)` (image `i` matches text `i`, or text `image_groups[i]` when `text_groups` is `None`).
        text_groups (array-like of shape `(num_texts,)`, *optional*): group of each text; defaults to
            `arange(num_texts)`.

    Returns:
        `dict` with `image_to_text_recall@k`, `image_to_text_chance@k`, `text_to_image_recall@k`,
        `text_to_image_chance@k` for each `k`, and per direction `*_n_queries`, `*_n_candidates`, `*_median_rank`.

    Raises:
        ValueError: a matrix that is not 2-D, non-finite similarities (row named), groups of the wrong shape, a
            cut-off below 1.
    """
    if hasattr(similarity, "detach"):
        similarity = similarity.detach().float().cpu().numpy()
    similarity = np.asarray(similarity, dtype=np.float64)
    if similarity.ndim != 2 or 0 in similarity.shape:
        raise ValueError(f"`similarity` must be a non-empty (num_images, num_texts) matrix, got {similarity.shape}.")
    finite = np.isfinite(similarity).all(axis=1)
    if not finite.all():
        raise ValueError(f"`similarity` row {int(np.flatnonzero(~finite)[0])} (image) holds non-finite values.")
    bad = [k for k in ks if not isinstance(k, (int, np.integer)) or k < 1]
    if bad:
        raise ValueError(f"`ks` must be positive integers, got {list(ks)}.")
    image_groups = _groups(image_groups, similarity.shape[0], "image_groups")
    text_groups = _groups(text_groups, similarity.shape[1], "text_groups")
    out: dict = {}
    _one_direction(similarity, image_groups, text_groups, ks, "image_to_text", out)
    _one_direction(similarity.T, text_groups, image_groups, ks, "text_to_image", out)
    return out


def teacher_similarity_matrix(
    teacher,
    image_features_or_pixel_values,
    input_ids,
    attention_mask=None,
    *,
    batch_size: int = 64,
    scaled: bool = False,
):
    """
    Similarity of every image with every report under the teacher's ITC head, without the paired text leaking in.

    Images go through the teacher's unimodal query pass alone (`teacher(image_features=...)` or
    `teacher(pixel_values=...)` without a report) and reports through the text pass alone; the pair score is
    `query_text_similarity(image_embeds_i, text_embeds_j, config.query_selection, ...)`, the cosine the ITC loss
    scales by `logit_scale`. The teacher runs in eval mode (restored afterwards) without gradients.

    Args:
        teacher ([`QDistillTeacherModel`]): the teacher.
        image_features_or_pixel_values (`torch.Tensor`): cached encoder features `(num_images, tokens, hidden)` or
            films `(num_images, 3, H, W)` (told apart by their number of dimensions).
        input_ids (`torch.LongTensor` of shape `(num_texts, length)`): report tokens.
        attention_mask (`torch.Tensor` of shape `(num_texts, length)`, *optional*): 1 on real tokens.
        batch_size (`int`, *optional*, defaults to 64): images or reports per forward pass.
        scaled (`bool`, *optional*, defaults to `False`): multiply by `logit_scale.exp()` (the ITC logits).

    Returns:
        `torch.FloatTensor` of shape `(num_images, num_texts)` on the CPU.
    """
    import torch
    import torch.nn.functional as F

    from ..models.loss_qdistill import query_text_similarity

    images = torch.as_tensor(image_features_or_pixel_values)
    if images.ndim == 3:
        key = "image_features"
    elif images.ndim == 4:
        key = "pixel_values"
    else:
        raise ValueError(
            "Expected image features (num_images, tokens, hidden) or films (num_images, 3, H, W), got shape "
            f"{tuple(images.shape)}."
        )
    input_ids = torch.as_tensor(input_ids)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = torch.as_tensor(attention_mask)
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"Expected input_ids and attention_mask of shape (num_texts, length), got {tuple(input_ids.shape)} and "
            f"{tuple(attention_mask.shape)}."
        )
    device = teacher.device
    was_training = teacher.training
    teacher.eval()
    try:
        with torch.no_grad():
            image_embeds = torch.cat([
                teacher(**{key: images[start:start + batch_size].to(device)}).image_embeds.float()
                for start in range(0, images.shape[0], batch_size)
            ])
            text_embeds = []
            for start in range(0, input_ids.shape[0], batch_size):
                ids = input_ids[start:start + batch_size].to(device)
                mask = attention_mask[start:start + batch_size].to(device)
                # The same text path as QDistillTeacherModel.forward (a text-only Q-Former pass, pooled, projected).
                teacher.validate_batch(input_ids=ids, attention_mask=mask)  # vocabulary, empty reports
                text_output = teacher.qformer(input_ids=ids, attention_mask=mask).text_output
                text_embeds.append(
                    F.normalize(teacher.text_projection(teacher.pool_text(text_output, mask)), dim=-1).float()
                )
            text_embeds = torch.cat(text_embeds)
            similarity = torch.cat([
                query_text_similarity(
                    image_embeds[start:start + batch_size], text_embeds, teacher.config.query_selection,
                    teacher.config.query_selection_temperature,
                )
                for start in range(0, image_embeds.shape[0], batch_size)
            ])
            if scaled:
                similarity = similarity * teacher.logit_scale.exp().float()
    finally:
        teacher.train(was_training)
    return similarity.cpu()


__all__ = ["recall_at_k", "teacher_similarity_matrix"]
