"""PyTorch Q-DISTILL models: a BLIP-2 style Q-Former teacher over a frozen CheXzero encoder, and its student."""

import math
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionModel, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
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
        itm_logits (`torch.FloatTensor` of shape `(num_pairs, 2)`, *optional*): match / no-match logits, positives
            first, then (when training ITM) one hard-negative report per image and one hard-negative image per report.
        itm_labels (`torch.LongTensor` of shape `(num_pairs,)`, *optional*): 1 for a matching pair, 0 otherwise.
        image_embeds (`torch.FloatTensor` of shape `(batch_size, num_queries, embed_dim)`): normalised ITC query
            embeddings.
        text_embeds (`torch.FloatTensor` of shape `(batch_size, embed_dim)`, *optional*): normalised ITC report
            embeddings (from the `[CLS]` position).
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


class QDistillAttention(nn.Module):
    """Multi-head attention (self- or cross-) on `F.scaled_dot_product_attention`, with an eager path for weights."""

    def __init__(self, config: QFormerConfig, kv_hidden_size: int | None = None):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
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
        dropout = self.dropout if self.training else 0.0
        weights = None
        if output_attentions:
            scores = torch.matmul(query, key.transpose(-1, -2)).float() / math.sqrt(self.head_dim)
            if attention_mask is not None:
                scores = scores + attention_mask.float()
            weights = scores.softmax(dim=-1).to(query.dtype)
            context = torch.matmul(F.dropout(weights, dropout, self.training), value)
        else:
            mask = None if attention_mask is None else attention_mask.to(query.dtype)
            context = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout)
        context = context.transpose(1, 2).reshape(hidden_states.shape[0], hidden_states.shape[1], -1)
        return self.output(context), weights


class QDistillMLP(nn.Module):
    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.act(self.fc1(hidden_states))))


class QDistillQFormerLayer(nn.Module):
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
        if config.use_text_input:
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
        self.gradient_checkpointing = False

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
            args = (hidden_states, query_length, attention_mask, encoder_hidden_states, output_attentions,
                    query_output_only and index == last, text_token_index)
            if self.gradient_checkpointing and self.training:
                hidden_states, self_w, cross_w = torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
            else:
                hidden_states, self_w, cross_w = layer(*args)
            if output_attentions:
                all_self.append(self_w)
                if cross_w is not None:
                    all_cross.append(cross_w)
        return hidden_states, all_hidden, all_self, all_cross


class QDistillPreTrainedModel(PreTrainedModel):
    """Weight initialisation, the frozen-encoder contract and the `from_pretrained` re-freeze, shared by all models."""

    config: QDistillTeacherConfig
    base_model_prefix = "qdistill"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["QDistillQFormerLayer", "CLIPEncoderLayer"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, QDistillQFormerModel):
            init.normal_(module.position_embeddings.weight, mean=0.0, std=std)
            if module.word_embeddings is not None:
                init.normal_(module.word_embeddings.weight, mean=0.0, std=std)
        if isinstance(module, (QDistillTeacherModel, QDistillStudentModel)):
            # LAVIS initialises the queries with N(0, std); transformers' BLIP-2 port zero-fills them, which is only
            # harmless when a checkpoint always overwrites them. We train from scratch.
            init.normal_(module.query_tokens, mean=0.0, std=std)
        if isinstance(module, QDistillTeacherModel):
            init.constant_(module.logit_scale, math.log(1 / module.config.temperature_init))

    def _focal_alpha(self, logits: torch.Tensor) -> torch.Tensor | None:
        alpha = getattr(self.config, "focal_alpha", None)
        return None if alpha is None else torch.tensor(alpha, dtype=torch.float32, device=logits.device)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # The loader re-creates every parameter with `requires_grad=True`, so freezing done in `__init__` is lost.
        model = super().from_pretrained(*args, **kwargs)
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
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.embed_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.embed_dropout = nn.Dropout(config.hidden_dropout_prob)
        # The frozen encoder's features are its raw residual stream (before `post_layernorm`), whose scale is
        # uncontrolled (CLIP ViTs have outlier channels; the original clamped them to +-10). A learned LayerNorm
        # normalises them once before every cross-attention, as a pre-LN decoder expects a normalised memory.
        self.encoder_norm = nn.LayerNorm(config.encoder_hidden_size, eps=config.layer_norm_eps)
        self.encoder = QDistillQFormerEncoder(config)
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

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
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
            raise ValueError(
                f"input_ids contain ids outside the vocabulary [0, {self.config.vocab_size}): min "
                f"{int(input_ids.min())}, max {int(input_ids.max())}. Was the model built for this tokenizer?"
            )
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
            empty = (attention_mask.sum(dim=1) == 0).nonzero().flatten().tolist()
            if empty:
                # A row that attends to nothing has no defined softmax (NaN once the mask reaches bf16 as -inf).
                raise ValueError(
                    f"Reports at batch rows {empty} have no real token (attention_mask is all zero); the processor "
                    "always adds [CLS] and [SEP], so these rows are broken inputs."
                )
        else:
            attention_mask = None
        hidden_states = self.embed_dropout(self.embed_norm(torch.cat(parts, dim=1)))
        query_length = 0 if query_embeds is None else query_embeds.shape[1]
        batch_size = hidden_states.shape[0]
        if encoder_hidden_states is not None:
            encoder_hidden_states = self.encoder_norm(encoder_hidden_states.to(hidden_states.dtype))

        mask = text_token_index = None
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
            generator (`torch.Generator`, *optional*): makes the ITM hard-negative draw reproducible.
            output_attentions (`bool`, *optional*): also return the attention probabilities of the bidirectional
                pass over the positive pairs (computed by the eager path).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        image_features = self.get_image_features(pixel_values, image_features)
        batch_size = image_features.shape[0]
        queries = self.query_tokens.expand(batch_size, -1, -1)
        has_text = input_ids is not None
        if (return_loss or labels is not None) and not has_text:
            raise ValueError("The teacher's losses need the report: pass `input_ids` (and `attention_mask`).")
        if has_text and input_ids.shape[0] != batch_size:
            raise ValueError(f"input_ids has batch size {input_ids.shape[0]} but the images have {batch_size}.")
        if has_text and attention_mask is None:
            attention_mask = torch.ones_like(input_ids)

        # Unimodal pass, as two independent passes (identical to one pass with the unimodal mask, cheaper).
        query_uni = self.qformer(query_embeds=queries, encoder_hidden_states=image_features).query_output
        image_embeds = F.normalize(self.vision_projection(query_uni), dim=-1)

        text_output = text_embeds = logits_per_image = logits_per_text = None
        itm_logits = itm_labels = query_bi = logits = attentions = cross_attentions = None
        loss_itc = loss_itm = loss_cls = None
        if has_text:
            text_output = self.qformer(input_ids=input_ids, attention_mask=attention_mask).text_output
            text_embeds = F.normalize(self.text_projection(text_output[:, 0]), dim=-1)
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
                rows_t, rows_i = text_valid.nonzero().squeeze(1), image_valid.nonzero().squeeze(1)
                if rows_t.numel() + rows_i.numel() == 0:
                    logger.warning_once(
                        "ITM skipped: no hard negative in this batch (batch size 1 or every report identical)."
                    )
                    train_itm = False
                else:
                    pair_images = torch.cat([image_features, image_features[rows_t], image_features[neg_image[rows_i]]])
                    pair_ids = torch.cat([input_ids, input_ids[neg_text[rows_t]], input_ids[rows_i]])
                    pair_mask = torch.cat([attention_mask, attention_mask[neg_text[rows_t]], attention_mask[rows_i]])
                    itm_labels = torch.cat(
                        [itm_labels, itm_labels.new_zeros(rows_t.numel() + rows_i.numel())]
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
                    loss_itm = F.cross_entropy(itm_logits.float(), itm_labels)
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
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
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


def _weighted_sum(*terms: tuple[torch.Tensor | None, float]) -> torch.Tensor | None:
    """Sum of `weight * loss` over the computed components; a non-finite loss raises instead of being hidden."""
    present = [(loss, weight) for loss, weight in terms if loss is not None]
    if not present:
        return None
    total = sum(weight * loss for loss, weight in present)
    if not torch.isfinite(total):
        raise FloatingPointError(
            "Non-finite loss: " + ", ".join(f"{float(loss.detach()):.6g} (weight {weight})" for loss, weight in present)
        )
    return total


__all__ = [
    "LOGIT_SCALE_MAX",
    "build_qformer_attention_mask",
    "QDistillPreTrainedModel",
    "QDistillQFormerModel",
    "QDistillTeacherModel",
    "QDistillStudentModel",
    "QDistillQFormerModelOutput",
    "QDistillTeacherOutput",
    "QDistillStudentOutput",
]
