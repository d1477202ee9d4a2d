"""PyTorch Q-DISTILL models: a BLIP-2 style Q-Former teacher over a frozen CheXzero encoder, and its student."""

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionModel, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, logging

from .configuration_qdistill import ATTENTION_MODES, QDistillStudentConfig, QDistillTeacherConfig, QFormerConfig
from .loss_qdistill import (
    focal_loss,
    image_text_contrastive_loss,
    query_text_similarity,
    report_positive_mask,
    sample_hard_negatives,
)


logger = logging.get_logger(__name__)

# CLIP's bound on the learned contrastive scale: temperature never goes below 1/100.
LOGIT_SCALE_MAX = math.log(100)


def build_qformer_attention_mask(
    query_length: int,
    text_attention_mask: torch.Tensor | None,
    mode: str,
    dtype: torch.dtype = torch.float32,
    batch_size: int | None = None,
) -> torch.Tensor:
    """
    The additive self-attention mask of a Q-Former over the sequence `[queries; text]`.

    Modes:
        - `"unimodal"`: queries attend to queries only and text to text only (ITC: the image and the report are
          encoded independently).
        - `"bidirectional"`: every position attends to every query and every text token (ITM, classification).

    In both modes, padded text positions (`text_attention_mask == 0`) are never attended to. The mask is additive:
    0 where attention is allowed and `torch.finfo(dtype).min` where it is blocked (a boolean 4-D mask would be added
    as 0/1 by eager attention and silently do nothing).

    Args:
        query_length (`int`): number of query tokens at the start of the sequence.
        text_attention_mask (`torch.Tensor` of shape `(batch_size, text_length)`, *optional*): 1 on real tokens.
        mode (`str`): `"unimodal"` or `"bidirectional"`.
        dtype (`torch.dtype`): dtype of the returned mask.
        batch_size (`int`, *optional*): needed only when there is no text.

    Returns:
        `torch.Tensor` of shape `(batch_size, 1, query_length + text_length, query_length + text_length)`.

    Example:

    ```python
    >>> build_qformer_attention_mask(1, torch.tensor([[1, 0]]), "unimodal")[0, 0] == 0
    tensor([[ True, False, False],
            [False,  True, False],
            [False,  True, False]])
    ```
    """
    if mode not in ATTENTION_MODES:
        raise ValueError(f"Unknown attention mode {mode!r}; expected one of {ATTENTION_MODES}.")
    if text_attention_mask is None:
        if batch_size is None:
            raise ValueError("Pass `batch_size` when there is no text attention mask.")
        text_attention_mask = torch.zeros(batch_size, 0, dtype=torch.long)
    batch_size, text_length = text_attention_mask.shape
    device = text_attention_mask.device
    length = query_length + text_length
    is_query = torch.arange(length, device=device) < query_length
    key_is_real = torch.cat(
        [torch.ones(batch_size, query_length, dtype=torch.bool, device=device), text_attention_mask.bool()], dim=1
    )
    allowed = key_is_real[:, None, :].expand(batch_size, length, length)
    if mode == "unimodal":
        same_stream = is_query[:, None] == is_query[None, :]
        allowed = allowed & same_stream
    blocked = torch.zeros(batch_size, 1, length, length, dtype=dtype, device=device)
    return blocked.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


def _rows(flags: torch.Tensor) -> list[int]:
    """Indices of the `True` entries of a per-row flag (a host sync: used by eager-only checks)."""
    return flags.nonzero().flatten().tolist()


def _check_input_ids_values(input_ids: torch.Tensor, vocab_size: int):
    if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be a LongTensor of token ids, got dtype {input_ids.dtype}.")
    if input_ids.numel() == 0:
        return
    outside = (input_ids < 0) | (input_ids >= vocab_size)
    if bool(outside.any()):
        raise ValueError(
            f"input_ids contain ids outside the vocabulary [0, {vocab_size}) in batch rows {_rows(outside.any(dim=1))}: "
            f"min {int(input_ids.min())}, max {int(input_ids.max())}. Was the model built for this tokenizer?"
        )


def _check_attention_mask_values(attention_mask: torch.Tensor):
    empty = _rows(attention_mask.sum(dim=1) == 0)
    if empty:
        # A row that attends to nothing has no defined softmax (NaN once the mask reaches bf16 as -inf).
        raise ValueError(
            f"Reports at batch rows {empty} have no real token (attention_mask is all zero); the processor "
            "always adds [CLS] and [SEP], so these rows are broken inputs."
        )


def _check_finite_rows(name: str, values: torch.Tensor):
    bad = _rows(~torch.isfinite(values).flatten(1).all(dim=1))
    if bad:
        raise ValueError(
            f"{name} has non-finite values (NaN or inf) in batch rows {bad}. These films cannot be triaged: drop or "
            "re-extract them (a broken DICOM or a feature cache written from a diverged run)."
        )


def validate_model_inputs(
    config: "QDistillTeacherConfig | QDistillStudentConfig",
    pixel_values: torch.Tensor | None = None,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    image_features: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    positive_mask: torch.Tensor | None = None,
    check_values: bool = True,
):
    """
    Check one batch for a Q-DISTILL teacher or student and raise a `ValueError` naming the field, the sizes or the
    batch rows at fault. The models run it at the start of every eager `forward`; under `torch.compile` only the shape
    and dtype checks run there (they cost nothing), so a data collator or the Trainer should call this once per batch
    (on CPU tensors, before moving them to the device) to keep the value checks.

    Shape and dtype checks (never synchronise with the device): batch sizes of `pixel_values` / `image_features`,
    `input_ids`, `attention_mask`, `labels` and `positive_mask` agree; `attention_mask` has the shape of `input_ids`;
    `labels` is an integer tensor of shape `(batch_size,)`.

    Value checks (`check_values=True`; each reads tensor values on the host): `pixel_values` and `image_features`
    are finite in every row; `input_ids` lie in the Q-Former's vocabulary; no report has an all-zero
    `attention_mask`; `labels` lie in `[0, num_labels)`; `positive_mask` is `True` on its diagonal.

    Args:
        config ([`QDistillTeacherConfig`] or [`QDistillStudentConfig`]): the model's configuration.
        pixel_values, input_ids, attention_mask, image_features, labels, positive_mask (`torch.Tensor`, *optional*):
            The model's inputs, as passed to `forward`.
        check_values (`bool`, *optional*, defaults to `True`): also run the value checks.

    Example:

    ```python
    >>> validate_model_inputs(model.config, image_features=torch.full((2, 50, 768), float("nan")))
    ValueError: image_features has non-finite values (NaN or inf) in batch rows [0, 1]. ...
    ```
    """
    images = pixel_values if pixel_values is not None else image_features
    batch_size = None if images is None else images.shape[0]
    if input_ids is not None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch_size, text_length), got {tuple(input_ids.shape)}.")
        if batch_size is not None and input_ids.shape[0] != batch_size:
            raise ValueError(f"input_ids has batch size {input_ids.shape[0]} but the images have {batch_size}.")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has {tuple(input_ids.shape)}."
            )
        batch_size = input_ids.shape[0] if batch_size is None else batch_size
    if labels is not None:
        num_labels = config.num_labels
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(
                f"labels must be a LongTensor of class ids in [0, {num_labels}) (one per image), got dtype "
                f"{labels.dtype}; soft or one-hot targets are not supported."
            )
        if labels.dim() != 1:
            raise ValueError(
                f"labels must have shape (batch_size,) with one class id in [0, {num_labels}) per image, got shape "
                f"{tuple(labels.shape)}."
            )
        if batch_size is not None and labels.shape[0] != batch_size:
            raise ValueError(f"labels has {labels.shape[0]} entries but the batch has {batch_size} images.")
    if positive_mask is not None and batch_size is not None and positive_mask.shape != (batch_size, batch_size):
        raise ValueError(
            f"positive_mask has shape {tuple(positive_mask.shape)}, expected ({batch_size}, {batch_size})."
        )
    if not check_values:
        return
    if pixel_values is not None:
        _check_finite_rows("pixel_values", pixel_values)
    if image_features is not None:
        _check_finite_rows("image_features", image_features)
    if input_ids is not None:
        _check_input_ids_values(input_ids, config.qformer_config.vocab_size)
        if attention_mask is not None:
            _check_attention_mask_values(attention_mask)
    if labels is not None and labels.numel():
        outside = (labels < 0) | (labels >= config.num_labels)
        if bool(outside.any()):
            raise ValueError(
                f"labels must be class ids in [0, {config.num_labels}); got {sorted(set(labels[outside].tolist()))} "
                f"in batch rows {_rows(outside)}."
            )
    if positive_mask is not None and not bool(positive_mask.diagonal().all()):
        raise ValueError("positive_mask must be True on the diagonal: every image is a positive of its own report.")


@dataclass
class QDistillQFormerModelOutput(ModelOutput):
    """
    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, num_queries + text_length, hidden_size)`):
            Final states, queries first.
        query_output (`torch.FloatTensor` of shape `(batch_size, num_queries, hidden_size)`): the query slice.
        text_output (`torch.FloatTensor` of shape `(batch_size, text_length, hidden_size)`): the text slice.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): input of each layer plus the final output.
        attentions (`tuple(torch.FloatTensor)`, *optional*): self-attention probabilities of each layer.
        cross_attentions (`tuple(torch.FloatTensor)`, *optional*): cross-attention probabilities of each layer
            that has cross-attention.
    """

    last_hidden_state: torch.FloatTensor | None = None
    query_output: torch.FloatTensor | None = None
    text_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    cross_attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class QDistillTeacherOutput(ModelOutput):
    """
    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): weighted sum of the computed loss components.
        loss_itc (`torch.FloatTensor`, *optional*): image-text contrastive loss (with soft positives).
        loss_itm (`torch.FloatTensor`, *optional*): image-text matching loss over positives and hard negatives.
        loss_cls (`torch.FloatTensor`, *optional*): focal classification loss.
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`, *optional*): triage logits from the
            bidirectional (image + report) pooled queries.
        logits_per_image (`torch.FloatTensor` of shape `(batch_size, batch_size)`, *optional*): scaled ITC
            similarities, image `i` vs report `j`.
        logits_per_text (`torch.FloatTensor` of shape `(batch_size, batch_size)`, *optional*): its transpose.
        itm_logits (`torch.FloatTensor` of shape `(num_pairs, 2)`, *optional*): match / no-match logits of the
            `batch_size` positive pairs, followed, when ITM is trained (`return_loss=True`), by one hard-negative
            report per image and one hard-negative image per report: always `num_pairs = 3 * batch_size` then.
        itm_labels (`torch.LongTensor` of shape `(num_pairs,)`, *optional*): 1 for a positive pair, 0 for a
            negative pair.
        itm_weights (`torch.FloatTensor` of shape `(3 * batch_size,)`, *optional*, returned when ITM is trained):
            weight of each pair in `loss_itm` (a weighted mean). 0 for a negative slot whose row has no non-positive
            candidate (its placeholder pair is the row's own positive and must be ignored by metrics too), and 0 for
            the positives of a batch that has no negative at all.
        image_embeds (`torch.FloatTensor` of shape `(batch_size, num_queries, embed_dim)`): normalised ITC query
            embeddings.
        text_embeds (`torch.FloatTensor` of shape `(batch_size, embed_dim)`, *optional*): normalised ITC report
            embeddings (pooled by `config.text_pooling`: mean over real tokens, or `[CLS]`).
        query_output_unimodal (`torch.FloatTensor` of shape `(batch_size, num_queries, hidden_size)`): queries that
            saw the image only.
        query_output_bidirectional (`torch.FloatTensor` of shape `(batch_size, num_queries, hidden_size)`,
            *optional*): queries that saw the image and the report.
        text_output (`torch.FloatTensor` of shape `(batch_size, text_length, hidden_size)`, *optional*): the
            report encoded alone.
        image_features (`torch.FloatTensor` of shape `(batch_size, num_patches + 1, vision_hidden_size)`): the
            frozen encoder's `last_hidden_state` that the queries cross-attended to.
        attentions (`tuple(torch.FloatTensor)`, *optional*, returned with `output_attentions=True`): self-attention
            probabilities of each Q-Former layer in the bidirectional (image + report, positive pairs) pass, `(batch_size, num_heads, rows, keys)`;
            the last layer keeps the query rows only.
        cross_attentions (`tuple(torch.FloatTensor)`, *optional*, returned with `output_attentions=True`): the
            queries' attention over the image tokens in each cross-attention layer, `(batch_size, num_heads,
            num_queries, image_tokens)`.
    """

    loss: torch.FloatTensor | None = None
    loss_itc: torch.FloatTensor | None = None
    loss_itm: torch.FloatTensor | None = None
    loss_cls: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    itm_logits: torch.FloatTensor | None = None
    itm_labels: torch.LongTensor | None = None
    itm_weights: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    query_output_unimodal: torch.FloatTensor | None = None
    query_output_bidirectional: torch.FloatTensor | None = None
    text_output: torch.FloatTensor | None = None
    image_features: torch.FloatTensor | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    cross_attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class QDistillStudentOutput(ModelOutput):
    """
    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): focal classification loss, when `labels` are given.
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`): triage logits.
        pooled_output (`torch.FloatTensor` of shape `(batch_size, hidden_size)`): mean of the student's queries.
        projected_output (`torch.FloatTensor` of shape `(batch_size, teacher_hidden_size)`): the pooled queries
            projected into the teacher's query space (the distillation target space).
        query_output (`torch.FloatTensor` of shape `(batch_size, num_queries, hidden_size)`): the student's queries.
        image_features (`torch.FloatTensor` of shape `(batch_size, num_patches + 1, vision_hidden_size)`): the
            frozen encoder's `last_hidden_state`.
        attentions (`tuple(torch.FloatTensor)`, *optional*, returned with `output_attentions=True`): self-attention
            probabilities of each Q-Former layer in the student's pass, `(batch_size, num_heads, rows, keys)`;
            the last layer keeps the query rows only.
        cross_attentions (`tuple(torch.FloatTensor)`, *optional*, returned with `output_attentions=True`): the
            queries' attention over the image tokens in each cross-attention layer, `(batch_size, num_heads,
            num_queries, image_tokens)`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    pooled_output: torch.FloatTensor | None = None
    projected_output: torch.FloatTensor | None = None
    query_output: torch.FloatTensor | None = None
    image_features: torch.FloatTensor | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    cross_attentions: tuple[torch.FloatTensor, ...] | None = None


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Plain attention (`softmax(q k^T * scaling + mask) v`), the `"eager"` entry of the attention interface; the only
    one that returns the attention probabilities. Scores are computed in float32.

    Returns:
        `(attn_output, attn_weights)` with `attn_output` of shape `(batch_size, rows, num_heads, head_dim)` and
        `attn_weights` of shape `(batch_size, num_heads, rows, keys)`.
    """
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scaling
    if attention_mask is not None:
        scores = scores + attention_mask.float()
    weights = scores.softmax(dim=-1).to(query.dtype)
    attn_output = torch.matmul(F.dropout(weights, p=dropout, training=module.training), value)
    return attn_output.transpose(1, 2).contiguous(), weights


class QDistillAttention(nn.Module):
    """
    Multi-head attention (self- or cross-), dispatched through transformers' attention interface by
    `config._attn_implementation` (`"eager"`, `"sdpa"`, or a registered kernel). Attention probabilities exist only on
    the eager path: a call with `output_attentions=True` runs eager for that call whatever the implementation.
    """

    def __init__(self, config: QFormerConfig, kv_hidden_size: int | None = None):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        kv_hidden_size = kv_hidden_size or config.hidden_size
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(kv_hidden_size, config.hidden_size)
        self.value = nn.Linear(kv_hidden_size, config.hidden_size)
        self.output = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = config.attention_probs_dropout_prob

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        kv = hidden_states if key_value_states is None else key_value_states
        query, key, value = self._heads(self.query(hidden_states)), self._heads(self.key(kv)), self._heads(self.value(kv))
        if output_attentions or self.config._attn_implementation in (None, "eager"):
            attention_interface = eager_attention_forward
        else:
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )
        if attention_mask is not None:
            attention_mask = attention_mask.to(query.dtype)
        context, weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.dropout if self.training else 0.0,
            scaling=self.scaling,
        )
        context = context.reshape(hidden_states.shape[0], hidden_states.shape[1], -1)
        return self.output(context), weights if output_attentions else None


class QDistillMLP(nn.Module):
    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.act(self.fc1(hidden_states))))


class QDistillQFormerLayer(GradientCheckpointingLayer):
    """
    One pre-LayerNorm Q-Former layer: shared self-attention over `[queries; text]`, cross-attention to the image for
    the queries only (on layers selected by `cross_attention_frequency`), and separate feed-forward blocks for query
    and text positions.

    Pre-LN rather than BERT's post-LN because the Q-Former is trained from scratch (not from BERT weights): pre-LN
    trains stably without the clamps the original needed.
    """

    def __init__(self, config: QFormerConfig, layer_idx: int):
        super().__init__()
        self.self_attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = QDistillAttention(config)
        self.has_cross_attention = layer_idx % config.cross_attention_frequency == 0
        if self.has_cross_attention:
            self.cross_attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            self.cross_attn = QDistillAttention(config, kv_hidden_size=config.encoder_hidden_size)
        self.query_mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.query_mlp = QDistillMLP(config)
        is_last = layer_idx == config.num_hidden_layers - 1
        self.has_text_mlp = config.use_text_input and (config.last_layer_text_output or not is_last)
        if self.has_text_mlp:
            self.text_mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            self.text_mlp = QDistillMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        hidden_states: torch.Tensor,
        query_length: int,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        output_attentions: bool = False,
        queries_only: bool = False,
        text_token_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        normed = self.self_attn_norm(hidden_states)
        if queries_only:
            # Only the query rows are computed: the text rows' attention and feed-forward would be discarded.
            attn_out, self_weights = self.self_attn(
                normed[:, :query_length],
                key_value_states=normed,
                attention_mask=None if attention_mask is None else attention_mask[:, :, :query_length],
                output_attentions=output_attentions,
            )
            hidden_states = hidden_states[:, :query_length]
        else:
            attn_out, self_weights = self.self_attn(
                normed, attention_mask=attention_mask, output_attentions=output_attentions
            )
        hidden_states = hidden_states + self.dropout(attn_out)
        queries, text = hidden_states[:, :query_length], hidden_states[:, query_length:]
        cross_weights = None
        if query_length > 0:
            if self.has_cross_attention and encoder_hidden_states is not None:
                cross_out, cross_weights = self.cross_attn(
                    self.cross_attn_norm(queries),
                    key_value_states=encoder_hidden_states,
                    output_attentions=output_attentions,
                )
                queries = queries + self.dropout(cross_out)
            queries = queries + self.query_mlp(self.query_mlp_norm(queries))
        if text.shape[1] > 0:
            if text_token_index is None:
                text = text + self.text_mlp(self.text_mlp_norm(text))
            else:
                # Padding positions are never attended to, so the feed-forward runs on the real tokens only.
                flat = text.reshape(-1, text.shape[-1])
                real = flat.index_select(0, text_token_index)
                real = real + self.text_mlp(self.text_mlp_norm(real))
                text = flat.index_copy(0, text_token_index, real).view(text.shape)
        return torch.cat([queries, text], dim=1), self_weights, cross_weights


class QDistillQFormerEncoder(nn.Module):
    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.layer = nn.ModuleList([QDistillQFormerLayer(config, i) for i in range(config.num_hidden_layers)])

    def forward(
        self,
        hidden_states,
        query_length,
        attention_mask,
        encoder_hidden_states,
        output_attentions,
        output_hidden_states,
        query_output_only=False,
        text_token_index=None,
    ):
        all_hidden, all_self, all_cross = [], [], []
        last = len(self.layer) - 1
        for index, layer in enumerate(self.layer):
            if output_hidden_states:
                all_hidden.append(hidden_states)
            # Positional arguments: the checkpointing wrapper of `GradientCheckpointingLayer` (enabled by
            # `model.gradient_checkpointing_enable()`) replays the layer with them.
            hidden_states, self_w, cross_w = layer(
                hidden_states, query_length, attention_mask, encoder_hidden_states, output_attentions,
                query_output_only and index == last, text_token_index,
            )
            if output_attentions:
                all_self.append(self_w)
                if cross_w is not None:
                    all_cross.append(cross_w)
        return hidden_states, all_hidden, all_self, all_cross


def _weights_file_name(pretrained_model_name_or_path) -> str:
    """The `.safetensors` file(s) a `from_pretrained` call reads, for error messages."""
    folder = os.fspath(pretrained_model_name_or_path)
    if os.path.isdir(folder):
        files = sorted(name for name in os.listdir(folder) if name.endswith(".safetensors"))
        if len(files) == 1:
            return os.path.join(folder, files[0])
        return f"the .safetensors files in {folder} ({', '.join(files)})"
    return f"{folder} (model.safetensors)"


class QDistillPreTrainedModel(PreTrainedModel):
    """Weight initialisation, the frozen-encoder contract and the `from_pretrained` re-freeze, shared by all models."""

    config: QDistillTeacherConfig
    base_model_prefix = "qdistill"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["QDistillQFormerLayer", "CLIPEncoderLayer"]
    _supports_sdpa = True
    # Our attention masks are 4-D additive float masks built per call (unimodal / bidirectional, padding); they are
    # not translated into flex-attention block masks, so "flex_attention" is refused at load time.
    _supports_flex_attn = False

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, QDistillQFormerModel):
            if module.word_embeddings is not None:
                init.normal_(module.position_embeddings.weight, mean=0.0, std=std)
                init.normal_(module.word_embeddings.weight, mean=0.0, std=std)
        if isinstance(module, (QDistillTeacherModel, QDistillStudentModel)):
            # LAVIS initialises the queries with N(0, std); transformers' BLIP-2 port zero-fills them, which is only
            # harmless when a checkpoint always overwrites them. We train from scratch.
            init.normal_(module.query_tokens, mean=0.0, std=std)
        if isinstance(module, QDistillTeacherModel):
            init.constant_(module.logit_scale, math.log(1 / module.config.temperature_init))

    def triage_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """
        Calibrated class probabilities, `softmax(logits / config.calibration_temperature)`.

        The temperature is fitted on the validation split (`qdistill_hf.evaluation.fit_temperature`) and saved in the
        config, so a loaded model and the pipelines give the same calibrated probabilities.

        Args:
            logits (`torch.Tensor` of shape `(batch_size, num_labels)`): triage logits of this model.

        Returns:
            `torch.FloatTensor` of shape `(batch_size, num_labels)`.
        """
        return torch.softmax(logits.float() / float(self.config.calibration_temperature), dim=-1)

    def triage_decisions(self, probabilities: torch.Tensor) -> torch.LongTensor:
        """
        Class ids at the stored operating point: for binary triage, class 1 when its calibrated probability reaches
        `config.decision_threshold`; argmax when no threshold is stored (or for more than two classes).

        Args:
            probabilities (`torch.Tensor` of shape `(batch_size, num_labels)`): from `triage_probabilities`.

        Returns:
            `torch.LongTensor` of shape `(batch_size,)`.
        """
        threshold = self.config.decision_threshold
        if threshold is None or probabilities.shape[-1] != 2:
            return probabilities.argmax(dim=-1)
        return (probabilities[..., 1] >= threshold).long()

    def _focal_alpha(self, logits: torch.Tensor) -> torch.Tensor | None:
        alpha = getattr(self.config, "focal_alpha", None)
        return None if alpha is None else torch.tensor(alpha, dtype=torch.float32, device=logits.device)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        try:
            model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except Exception as error:
            # A truncated or garbage weights file otherwise surfaces as safetensors' bare "Error while deserializing
            # header", which names neither the file nor the fix.
            if type(error).__name__ != "SafetensorError":
                raise
            raise OSError(
                f"Could not read the weights of {_weights_file_name(pretrained_model_name_or_path)}: {error}. The file "
                "is truncated or corrupt (an interrupted download or save); re-download or re-save the checkpoint."
            ) from error
        # The loader re-creates every parameter with `requires_grad=True`, so freezing done in `__init__` is lost.
        model._apply_trainability()
        return model

    def _apply_trainability(self):
        """Set `requires_grad` from the config (frozen parts); called at the end of `__init__` and after loading."""


class QDistillQFormerModel(QDistillPreTrainedModel):
    """
    The bare Q-Former: embeddings for the text stream, the layers, and a final LayerNorm. Queries are passed in as
    `query_embeds` (the owning model holds them), so the same module serves the teacher and the student.
    """

    config: QFormerConfig
    config_class = QFormerConfig
    main_input_name = "input_ids"
    input_modalities = ("text",)

    def __init__(self, config: QFormerConfig):
        super().__init__(config)
        self.word_embeddings = (
            nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
            if config.use_text_input
            else None
        )
        self.position_embeddings = (
            nn.Embedding(config.max_position_embeddings, config.hidden_size) if config.use_text_input else None
        )
        self.embed_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.embed_dropout = nn.Dropout(config.hidden_dropout_prob)
        # The frozen encoder's features are its raw residual stream (before `post_layernorm`), whose scale is
        # uncontrolled (CLIP ViTs have outlier channels; the original clamped them to +-10). A learned LayerNorm
        # normalises them once before every cross-attention, as a pre-LN decoder expects a normalised memory.
        self.encoder_norm = nn.LayerNorm(config.encoder_hidden_size, eps=config.layer_norm_eps)
        if config.standardize_image_features:
            self._register_image_feature_buffers()
        self.encoder = QDistillQFormerEncoder(config)
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def _register_image_feature_buffers(self):
        shape = (self.config.num_image_tokens, self.config.encoder_hidden_size)
        device = self.encoder_norm.weight.device
        self.register_buffer("image_feature_mean", torch.zeros(shape, device=device))
        self.register_buffer("image_feature_std", torch.ones(shape, device=device))

    @torch.no_grad()
    def set_image_feature_statistics(self, mean: torch.Tensor, std: torch.Tensor):
        """
        Standardise the frozen encoder's tokens from now on: `(x - mean) / std` per (token, channel), before the
        cross-attention LayerNorm. The statistics become buffers saved with the weights, and
        `config.standardize_image_features` becomes `True`. Compute them from the *training* films' features with
        [`image_feature_statistics`].

        Why: the raw tokens of a CLIP ViT (random or CheXzero) are dominated by a per-position component shared by
        every film. After the per-token LayerNorm the cross-attention then reads nearly the same memory for every film,
        so the queries (and the ITC image embeddings) of different films start identical and ITC has no gradient to
        separate them.

        Args:
            mean (`torch.Tensor` of shape `(num_image_tokens, encoder_hidden_size)`): per-(token, channel) mean.
            std (`torch.Tensor` of the same shape): per-(token, channel) standard deviation, every entry > 0.
        """
        shape = (self.config.num_image_tokens, self.config.encoder_hidden_size)
        for name, value in (("mean", mean), ("std", std)):
            if tuple(value.shape) != shape:
                raise ValueError(
                    f"image feature {name} has shape {tuple(value.shape)}, expected {shape} (num_image_tokens, "
                    "encoder_hidden_size) of this model's vision encoder."
                )
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"image feature {name} has non-finite values.")
        if not bool((std > 0).all()):
            raise ValueError(
                f"image feature std has {int((std <= 0).sum())} entries <= 0; compute it with "
                "`image_feature_statistics`, which adds a small epsilon to the variance."
            )
        if not self.config.standardize_image_features or not hasattr(self, "image_feature_mean"):
            self._register_image_feature_buffers()
            self.config.standardize_image_features = True
        self.image_feature_mean.copy_(mean.to(self.image_feature_mean))
        self.image_feature_std.copy_(std.to(self.image_feature_std))

    def get_input_embeddings(self):
        return self.word_embeddings

    def set_input_embeddings(self, value):
        self.word_embeddings = value

    def embed_text(self, input_ids: torch.LongTensor) -> torch.Tensor:
        if self.word_embeddings is None:
            raise ValueError("This Q-Former has no text stream (`use_text_input=False`); do not pass `input_ids`.")
        length = input_ids.shape[1]
        if length > self.config.max_position_embeddings:
            raise ValueError(
                f"input_ids has {length} tokens but the Q-Former accepts at most max_position_embeddings="
                f"{self.config.max_position_embeddings}; truncate the reports in the processor."
            )
        if not torch.compiler.is_compiling():  # a host sync; `validate_model_inputs` runs it outside the graph
            _check_input_ids_values(input_ids, self.config.vocab_size)
        positions = torch.arange(length, device=input_ids.device)
        return self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]

    def forward(
        self,
        query_embeds: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mode: str = "bidirectional",
        query_output_only: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> QDistillQFormerModelOutput | tuple:
        r"""
        Args:
            query_embeds (`torch.FloatTensor` of shape `(batch_size, num_queries, hidden_size)`, *optional*):
                The learnable queries (expanded to the batch). Omit for a text-only pass.
            input_ids (`torch.LongTensor` of shape `(batch_size, text_length)`, *optional*): report tokens.
            attention_mask (`torch.Tensor` of shape `(batch_size, text_length)`, *optional*): 1 on real text tokens
                (covers the text only; queries are always visible).
            encoder_hidden_states (`torch.FloatTensor` of shape `(batch_size, image_tokens, encoder_hidden_size)`,
                *optional*): image features the queries cross-attend to.
            attention_mode (`str`): `"bidirectional"` or `"unimodal"`, see [`build_qformer_attention_mask`].
            query_output_only (`bool`): only the query outputs are needed. The last layer then skips the text rows
                (their self-attention and feed-forward), which is exact for the queries; `text_output` is `None`.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if query_embeds is None and input_ids is None:
            raise ValueError("The Q-Former needs `query_embeds`, `input_ids` or both.")
        if input_ids is not None and not (query_output_only or self.config.last_layer_text_output):
            raise ValueError(
                "This Q-Former was built with `last_layer_text_output=False` (it reads its queries only): "
                "pass `query_output_only=True`."
            )
        parts = []
        if query_embeds is not None:
            parts.append(query_embeds)
        if input_ids is not None:
            text_embeds = self.embed_text(input_ids)
            parts.append(text_embeds.to(query_embeds.dtype) if query_embeds is not None else text_embeds)
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            elif attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has {tuple(input_ids.shape)}."
                )
            if not torch.compiler.is_compiling():
                _check_attention_mask_values(attention_mask)
        else:
            attention_mask = None
        hidden_states = self.embed_dropout(self.embed_norm(torch.cat(parts, dim=1)))
        query_length = 0 if query_embeds is None else query_embeds.shape[1]
        batch_size = hidden_states.shape[0]
        if encoder_hidden_states is not None:
            if self.config.standardize_image_features:
                if encoder_hidden_states.shape[1:] != self.image_feature_mean.shape:
                    raise ValueError(
                        f"encoder_hidden_states has {tuple(encoder_hidden_states.shape[1:])} (tokens, channels) per "
                        f"film but the image-feature statistics are for {tuple(self.image_feature_mean.shape)}."
                    )
                encoder_hidden_states = (encoder_hidden_states.float() - self.image_feature_mean) / self.image_feature_std
            encoder_hidden_states = self.encoder_norm(encoder_hidden_states.to(hidden_states.dtype))

        mask = text_token_index = None
        if torch.compiler.is_compiling():
            # Fixed shapes: the mask is always built and the text feed-forward runs on every position (padding is
            # never attended to, so the real positions are the same as in eager).
            has_padding = attention_mask is not None
        else:
            has_padding = attention_mask is not None and not bool(attention_mask.all())
            if has_padding:
                text_token_index = attention_mask.flatten().nonzero().squeeze(1)
        if attention_mask is not None and (attention_mode == "unimodal" and query_length > 0 or has_padding):
            mask = build_qformer_attention_mask(
                query_length, attention_mask, attention_mode, dtype=hidden_states.dtype, batch_size=batch_size
            )
        elif attention_mode not in ATTENTION_MODES:
            raise ValueError(f"Unknown attention mode {attention_mode!r}; expected one of {ATTENTION_MODES}.")

        hidden_states, all_hidden, all_self, all_cross = self.encoder(
            hidden_states,
            query_length,
            mask,
            encoder_hidden_states,
            bool(output_attentions),
            bool(output_hidden_states),
            query_output_only,
            text_token_index,
        )
        hidden_states = self.final_norm(hidden_states)
        output = QDistillQFormerModelOutput(
            last_hidden_state=hidden_states,
            query_output=hidden_states[:, :query_length],
            text_output=None if query_output_only else hidden_states[:, query_length:],
            hidden_states=tuple(all_hidden) + (hidden_states,) if output_hidden_states else None,
            attentions=tuple(all_self) if output_attentions else None,
            cross_attentions=tuple(all_cross) if output_attentions else None,
        )
        return output if return_dict else output.to_tuple()


class _FrozenVisionMixin:
    """Builds the CLIP vision encoder child and keeps it frozen (no gradients, eval mode) when configured so."""

    def _build_vision_model(self, config):
        self.vision_model = CLIPVisionModel._from_config(config.vision_config)

    def freeze_vision_encoder(self, freeze: bool = True):
        """Freeze (or unfreeze) the vision encoder; called again after `from_pretrained`, which re-enables gradients."""
        self.config.freeze_vision_encoder = freeze
        self.vision_model.requires_grad_(not freeze)
        if freeze:
            self.vision_model.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.config.freeze_vision_encoder:
            self.vision_model.eval()
        return self

    def validate_batch(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        positive_mask: torch.Tensor | None = None,
        check_values: bool = True,
        **unused,
    ):
        """
        Raise a `ValueError` naming the field, sizes or batch rows if this batch is not valid for this model: see
        [`validate_model_inputs`]. `forward` runs it itself in eager mode; under `torch.compile` only its free shape
        checks run there, so call `model.validate_batch(**batch)` from the data collator or the training step (on
        CPU tensors) to keep the value checks. Keys the model does not validate are ignored.
        """
        validate_model_inputs(
            self.config, pixel_values, input_ids, attention_mask, image_features, labels, positive_mask, check_values
        )

    def set_image_feature_statistics(self, mean: torch.Tensor, std: torch.Tensor):
        """
        Standardise the frozen encoder's tokens per (token, channel) before the Q-Former's cross-attention, with
        statistics of the training films (see [`image_feature_statistics`] and
        [`QDistillQFormerModel.set_image_feature_statistics`]). Saved with the weights; sets
        `config.qformer_config.standardize_image_features=True`.
        """
        self.qformer.set_image_feature_statistics(mean, std)

    def get_image_features(
        self, pixel_values: torch.FloatTensor | None = None, image_features: torch.FloatTensor | None = None
    ) -> torch.FloatTensor:
        """
        The frozen encoder's `last_hidden_state` (CLS + patch tokens, before `post_layernorm`; the same tensor as the
        original's features and as the feature cache), from `pixel_values` or passed through from `image_features`.
        """
        if (pixel_values is None) == (image_features is None):
            raise ValueError("Pass exactly one of `pixel_values` or `image_features` (cached encoder outputs).")
        if image_features is not None:
            expected = self.config.vision_config.hidden_size
            if image_features.dim() != 3 or image_features.shape[-1] != expected:
                raise ValueError(
                    f"image_features must have shape (batch_size, tokens, {expected}), got {tuple(image_features.shape)}."
                )
            return image_features
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_vision_encoder):
            return self.vision_model(pixel_values=pixel_values).last_hidden_state


class QDistillTeacherModel(_FrozenVisionMixin, QDistillPreTrainedModel):
    """
    The multimodal Q-DISTILL teacher: frozen CheXzero encoder, Q-Former with learnable queries and a text stream for
    the radiology report, ITC / ITM / focal classification heads.

    Example:

    ```python
    >>> import torch
    >>> from qdistill_hf import QDistillTeacherConfig, QDistillTeacherModel
    >>> model = QDistillTeacherModel(QDistillTeacherConfig())
    >>> out = model(image_features=torch.randn(2, 50, 768), input_ids=torch.tensor([[2, 7, 3], [2, 9, 3]]),
    ...             labels=torch.tensor([0, 1]), return_loss=True)
    >>> out.loss_itc, out.loss_itm, out.loss_cls, out.logits.shape
    ```
    """

    config_class = QDistillTeacherConfig

    def __init__(self, config: QDistillTeacherConfig):
        super().__init__(config)
        qcfg = config.qformer_config
        self._build_vision_model(config)
        self.query_tokens = nn.Parameter(torch.zeros(1, qcfg.num_query_tokens, qcfg.hidden_size))
        self.qformer = QDistillQFormerModel(qcfg)
        self.vision_projection = nn.Linear(qcfg.hidden_size, config.embed_dim)
        self.text_projection = nn.Linear(qcfg.hidden_size, config.embed_dim)
        self.itm_head = nn.Linear(qcfg.hidden_size, 2)
        self.classifier_dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(qcfg.hidden_size, config.num_labels)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / config.temperature_init)))
        self.post_init()
        self._apply_trainability()

    def _apply_trainability(self):
        self.freeze_vision_encoder(self.config.freeze_vision_encoder)
        self.logit_scale.requires_grad_(self.config.learnable_temperature)

    def pool_text(self, text_output: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """
        One vector per report from the text-only pass, by `config.text_pooling`: the mean over real tokens
        (`attention_mask == 1`; padding never counts) or the `[CLS]` position.
        """
        if self.config.text_pooling == "cls":
            return text_output[:, 0]
        weights = attention_mask.to(text_output.dtype).unsqueeze(-1)
        return (text_output * weights).sum(dim=1) / weights.sum(dim=1)

    def clamp_logit_scale(self):
        """Apply the one documented bound: the ITC temperature never drops below 1/100 (CLIP)."""
        with torch.no_grad():
            self.logit_scale.clamp_(max=LOGIT_SCALE_MAX)

    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_features: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        positive_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> QDistillTeacherOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, image_size, image_size)`, *optional*):
                Films from the processor. Give this or `image_features`.
            input_ids (`torch.LongTensor` of shape `(batch_size, text_length)`, *optional*): report tokens
                (`[CLS] ... [SEP]`), padded to the longest report of the batch.
            attention_mask (`torch.Tensor` of shape `(batch_size, text_length)`, *optional*): 1 on real tokens.
            image_features (`torch.FloatTensor` of shape `(batch_size, tokens, vision_hidden_size)`, *optional*):
                Cached `last_hidden_state` of the frozen encoder, instead of `pixel_values`.
            labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*): triage class ids; adds `loss_cls`.
            return_loss (`bool`, *optional*): compute ITC and ITM (needs the report and a batch of at least 2).
            positive_mask (`torch.BoolTensor` of shape `(batch_size, batch_size)`, *optional*): which image-report
                pairs are positives. Defaults to pairs with identical reports.
            generator (`torch.Generator`, *optional*): makes the ITM hard-negative draw reproducible. Leave it
                `None` under `torch.compile` (a generator object splits the graph; seed with `torch.manual_seed`).
            output_attentions (`bool`, *optional*): also return the attention probabilities of the bidirectional
                pass over the positive pairs (computed by the eager path).

        Under `torch.compile` the training step is one graph: the checks that read tensor values (non-finite
        films, vocabulary, empty reports, label range, positive-mask diagonal, non-finite loss) are skipped, so call
        `validate_batch` on each batch outside the graph and check the loss in the training
        loop. A batch without any hard negative then gives `loss_itm = 0` (all `itm_weights` 0) instead of `None`.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        has_text = input_ids is not None
        if (return_loss or labels is not None) and not has_text:
            raise ValueError("The teacher's losses need the report: pass `input_ids` (and `attention_mask`).")
        self.validate_batch(
            pixel_values, input_ids, attention_mask, image_features, labels, positive_mask,
            check_values=not torch.compiler.is_compiling(),
        )
        image_features = self.get_image_features(pixel_values, image_features)
        batch_size = image_features.shape[0]
        queries = self.query_tokens.expand(batch_size, -1, -1)
        if has_text and attention_mask is None:
            attention_mask = torch.ones_like(input_ids)

        # Unimodal pass, as two independent passes (identical to one pass with the unimodal mask, cheaper).
        query_uni = self.qformer(query_embeds=queries, encoder_hidden_states=image_features).query_output
        image_embeds = F.normalize(self.vision_projection(query_uni), dim=-1)

        text_output = text_embeds = logits_per_image = logits_per_text = None
        itm_logits = itm_labels = itm_weights = query_bi = logits = attentions = cross_attentions = None
        loss_itc = loss_itm = loss_cls = None
        if has_text:
            text_output = self.qformer(input_ids=input_ids, attention_mask=attention_mask).text_output
            text_embeds = F.normalize(self.text_projection(self.pool_text(text_output, attention_mask)), dim=-1)
            similarity = query_text_similarity(
                image_embeds, text_embeds, self.config.query_selection, self.config.query_selection_temperature
            )
            logits_per_image = similarity * self.logit_scale.exp().float()
            logits_per_text = logits_per_image.t()
            if positive_mask is None:
                positive_mask = report_positive_mask(input_ids, attention_mask)

            # Bidirectional pass: positives, plus hard negatives when ITM is trained.
            pair_images, pair_ids, pair_mask = image_features, input_ids, attention_mask
            itm_labels = torch.ones(batch_size, dtype=torch.long, device=image_features.device)
            train_itm = return_loss and self.config.itm_hard_negatives and self.config.itm_loss_weight > 0
            if train_itm:
                neg_text, text_valid = sample_hard_negatives(logits_per_image, positive_mask, generator)
                neg_image, image_valid = sample_hard_negatives(logits_per_text, positive_mask.t(), generator)
                # Always 3B pairs (fixed shapes, one compiled graph): a row without any non-positive candidate keeps
                # a placeholder pair (its own image and report) with weight 0 instead of being dropped.
                rows = torch.arange(batch_size, device=image_features.device)
                neg_text = torch.where(text_valid, neg_text, rows)
                neg_image = torch.where(image_valid, neg_image, rows)
                pair_images = torch.cat([image_features, image_features, image_features[neg_image]])
                pair_ids = torch.cat([input_ids, input_ids[neg_text], input_ids])
                pair_mask = torch.cat([attention_mask, attention_mask[neg_text], attention_mask])
                itm_labels = torch.cat([itm_labels, itm_labels.new_zeros(2 * batch_size)])
                # Positives count only when the batch has some negative: ITM on positives alone teaches nothing.
                any_negative = (text_valid.any() | image_valid.any()).to(torch.float32)
                itm_weights = torch.cat(
                    [any_negative.expand(batch_size), text_valid.to(torch.float32), image_valid.to(torch.float32)]
                )
            pair_queries = self.query_tokens.expand(pair_images.shape[0], -1, -1)
            pair_output = self.qformer(
                query_embeds=pair_queries,
                input_ids=pair_ids,
                attention_mask=pair_mask,
                encoder_hidden_states=pair_images,
                attention_mode="bidirectional",
                query_output_only=True,
                output_attentions=output_attentions,
            )
            query_pairs = pair_output.query_output
            if output_attentions:
                attentions = tuple(weights[:batch_size] for weights in pair_output.attentions)
                cross_attentions = tuple(weights[:batch_size] for weights in pair_output.cross_attentions)
            itm_logits = self.itm_head(query_pairs).mean(dim=1)
            query_bi = query_pairs[:batch_size]
            logits = self.classifier(self.classifier_dropout(query_bi.mean(dim=1)))

            if return_loss:
                if batch_size > 1:
                    loss_itc = image_text_contrastive_loss(logits_per_image, positive_mask)
                else:
                    logger.warning_once("ITC skipped: a batch of one has no negatives.")
                if train_itm:
                    per_pair = F.cross_entropy(itm_logits.float(), itm_labels, reduction="none")
                    total_weight = itm_weights.sum()
                    # A batch without any negative has total weight 0: the loss is then 0 with no gradient.
                    loss_itm = (per_pair * itm_weights).sum() / torch.where(total_weight > 0, total_weight, 1.0)
                    if not torch.compiler.is_compiling() and not bool(total_weight > 0):
                        # Eager reports the skipped loss as None; compiled code keeps the (zero) tensor.
                        logger.warning_once(
                            "ITM skipped: no hard negative in this batch (batch size 1 or every report identical)."
                        )
                        loss_itm = None
        if labels is not None:
            loss_cls = focal_loss(logits, labels, self.config.focal_gamma, self._focal_alpha(logits))

        loss = _weighted_sum(
            (loss_itc, self.config.itc_loss_weight),
            (loss_itm, self.config.itm_loss_weight),
            (loss_cls, self.config.cls_loss_weight),
        )
        output = QDistillTeacherOutput(
            loss=loss,
            loss_itc=loss_itc,
            loss_itm=loss_itm,
            loss_cls=loss_cls,
            logits=logits,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_text,
            itm_logits=itm_logits,
            itm_labels=itm_labels if has_text else None,
            itm_weights=itm_weights,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            query_output_unimodal=query_uni,
            query_output_bidirectional=query_bi,
            text_output=text_output,
            image_features=image_features,
            attentions=attentions,
            cross_attentions=cross_attentions,
        )
        return output if return_dict else output.to_tuple()


class QDistillStudentModel(_FrozenVisionMixin, QDistillPreTrainedModel):
    """
    The lightweight Q-DISTILL student: the same frozen encoder, a small Q-Former over the image and (in
    `pseudo_report` mode) a generated pseudo-report, a triage classifier, and a projection into the teacher's query
    space used by distillation. It never reads a human report.

    Example:

    ```python
    >>> import torch
    >>> from qdistill_hf import QDistillStudentConfig, QDistillStudentModel
    >>> model = QDistillStudentModel(QDistillStudentConfig(text_mode="image_only"))
    >>> model(pixel_values=torch.randn(1, 3, 224, 224)).logits.shape
    torch.Size([1, 2])
    ```
    """

    config_class = QDistillStudentConfig
    input_modalities = ("image", "text")

    def __init__(self, config: QDistillStudentConfig):
        super().__init__(config)
        qcfg = config.qformer_config
        self._build_vision_model(config)
        self.query_tokens = nn.Parameter(torch.zeros(1, qcfg.num_query_tokens, qcfg.hidden_size))
        self.qformer = QDistillQFormerModel(qcfg)
        self.classifier_dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(qcfg.hidden_size, config.num_labels)
        self.projection = nn.Linear(qcfg.hidden_size, config.teacher_hidden_size)
        self.post_init()
        self._apply_trainability()

    def _apply_trainability(self):
        self.freeze_vision_encoder(self.config.freeze_vision_encoder)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, with `AutoModelForImageClassification` in the saved `auto_map` only for an
        `image_only` student: a `pseudo_report` student needs `input_ids` and is no image classifier."""
        auto_map = {k: v for k, v in (getattr(self.config, "auto_map", None) or {}).items()
                    if k != "AutoModelForImageClassification"}
        if self._auto_class is not None and self.config.text_mode == "image_only":
            auto_map["AutoModelForImageClassification"] = f"{type(self).__module__.split('.')[-1]}.{type(self).__name__}"
        self.config.auto_map = auto_map or None
        return super().save_pretrained(save_directory, *args, **kwargs)

    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_features: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> QDistillStudentOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, image_size, image_size)`, *optional*):
                Films from the processor. Give this or `image_features`.
            input_ids (`torch.LongTensor` of shape `(batch_size, text_length)`, *optional*): pseudo-report tokens;
                required in `pseudo_report` mode, refused in `image_only` mode.
            attention_mask (`torch.Tensor` of shape `(batch_size, text_length)`, *optional*): 1 on real tokens.
            image_features (`torch.FloatTensor` of shape `(batch_size, tokens, vision_hidden_size)`, *optional*):
                Cached `last_hidden_state` of the frozen encoder.
            labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*): triage class ids; adds the focal loss.
            output_attentions (`bool`, *optional*): also return the Q-Former's attention probabilities.

        Under `torch.compile` the value checks (non-finite films, vocabulary, empty reports, label range, non-finite
        loss) are skipped to keep one graph: call `validate_batch` on each batch outside
        the graph and check the loss in the training loop.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        self.validate_batch(
            pixel_values, input_ids, attention_mask, image_features, labels,
            check_values=not torch.compiler.is_compiling(),
        )
        image_features = self.get_image_features(pixel_values, image_features)
        if self.config.text_mode == "image_only" and input_ids is not None:
            raise ValueError("This student is `image_only`: it takes no `input_ids`. Drop the text or use a "
                             "`pseudo_report` student.")
        if self.config.text_mode == "pseudo_report" and input_ids is None:
            raise ValueError("This student reads a pseudo-report (`text_mode='pseudo_report'`): pass `input_ids` of "
                             "the generated report, or use an `image_only` student.")
        queries = self.query_tokens.expand(image_features.shape[0], -1, -1)
        qformer_output = self.qformer(
            query_embeds=queries,
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_features,
            attention_mode="bidirectional",
            query_output_only=True,
            output_attentions=output_attentions,
        )
        query_output = qformer_output.query_output
        pooled = query_output.mean(dim=1)
        logits = self.classifier(self.classifier_dropout(pooled))
        loss = None
        if labels is not None:
            loss = _weighted_sum((focal_loss(logits, labels, self.config.focal_gamma, self._focal_alpha(logits)), 1.0))
        output = QDistillStudentOutput(
            loss=loss,
            logits=logits,
            pooled_output=pooled,
            projected_output=self.projection(pooled),
            query_output=query_output,
            image_features=image_features,
            attentions=qformer_output.attentions,
            cross_attentions=qformer_output.cross_attentions,
        )
        return output if return_dict else output.to_tuple()


@torch.no_grad()
def image_feature_statistics(features, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Per-(token, channel) mean and standard deviation of frozen-encoder tokens, for
    `model.set_image_feature_statistics(mean, std)`. Use the training films only.

    Args:
        features (`torch.Tensor` of shape `(num_films, num_tokens, hidden)`, or an iterable of such batches):
            cached `last_hidden_state`s (any float dtype; accumulated in float64).
        eps (`float`, *optional*, defaults to 1e-6): added to the variance, so a channel that is constant over the
            films gets std `sqrt(eps)` instead of 0.

    Returns:
        `(mean, std)`, float32 tensors of shape `(num_tokens, hidden)`.
    """
    batches = [features] if isinstance(features, torch.Tensor) else features
    count, total, total_sq = 0, None, None
    for batch in batches:
        batch = torch.as_tensor(batch).to(torch.float64)
        if batch.dim() != 3:
            raise ValueError(f"features must be (num_films, num_tokens, hidden), got shape {tuple(batch.shape)}.")
        if not bool(torch.isfinite(batch).all()):
            raise ValueError("features have non-finite values.")
        total = batch.sum(0) if total is None else total + batch.sum(0)
        total_sq = (batch**2).sum(0) if total_sq is None else total_sq + (batch**2).sum(0)
        count += batch.shape[0]
    if count < 2:
        raise ValueError(f"Need at least 2 films to estimate feature statistics, got {count}.")
    mean = total / count
    var = (total_sq - count * mean**2) / (count - 1)
    return mean.float(), (var + eps).sqrt().float()


def _weighted_sum(*terms: tuple[torch.Tensor | None, float]) -> torch.Tensor | None:
    """
    Sum of `weight * loss` over the computed components. In eager mode a non-finite total raises
    `FloatingPointError` instead of being hidden; under `torch.compile` the check is skipped (it would split the
    graph) and is the training loop's job.
    """
    present = [(loss, weight) for loss, weight in terms if loss is not None]
    if not present:
        return None
    total = sum(weight * loss for loss, weight in present)
    # Eager only (a host sync): under `torch.compile` the caller (the Trainer) checks the loss after each step.
    if not torch.compiler.is_compiling() and not torch.isfinite(total):
        raise FloatingPointError(
            "Non-finite loss: " + ", ".join(f"{float(loss.detach()):.6g} (weight {weight})" for loss, weight in present)
        )
    return total


__all__ = [
    "LOGIT_SCALE_MAX",
    "build_qformer_attention_mask",
    "image_feature_statistics",
    "eager_attention_forward",
    "validate_model_inputs",
    "QDistillPreTrainedModel",
    "QDistillQFormerModel",
    "QDistillTeacherModel",
    "QDistillStudentModel",
    "QDistillQFormerModelOutput",
    "QDistillTeacherOutput",
    "QDistillStudentOutput",
]
