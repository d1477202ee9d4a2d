"""Q-DISTILL configurations: the Q-Former sub-config and the teacher / student composites."""

import math

from huggingface_hub.dataclasses import strict
from transformers import CLIPVisionConfig, PreTrainedConfig


# CheXzero is OpenAI's CLIP ViT-B/32 fine-tuned on chest X-rays; its visual tower as a `CLIPVisionConfig`.
CHEXZERO_VISION_CONFIG = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 224,
    "patch_size": 32,
    "num_channels": 3,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 512,
}

ATTENTION_MODES = ("unimodal", "bidirectional")
QUERY_SELECTION_MODES = ("softmax", "max")
TEXT_POOLING_MODES = ("mean", "cls")
STUDENT_TEXT_MODES = ("pseudo_report", "image_only")
DEFAULT_TRIAGE_LABELS = {0: "non_urgent", 1: "urgent"}
STUDENT_QFORMER_DEFAULTS = {
    "hidden_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 6,
    "intermediate_size": 1536,
    "num_query_tokens": 8,
}


def _vision_config(vision_config):
    """Fill a missing vision config with CheXzero's ViT-B/32 rather than CLIPVisionConfig's own defaults."""
    if vision_config is None:
        return CLIPVisionConfig(**CHEXZERO_VISION_CONFIG)
    if isinstance(vision_config, dict):
        return CLIPVisionConfig(**{**CHEXZERO_VISION_CONFIG, **vision_config})
    return vision_config


def _post_init_composite(config, kwargs):
    """Shared `__post_init__` of the teacher and student: CheXzero vision default, triage labels, derived sizes."""
    config.vision_config = _vision_config(config.vision_config)
    if config.id2label is None and kwargs.get("num_labels") is None:
        config.id2label = dict(DEFAULT_TRIAGE_LABELS)
    PreTrainedConfig.__post_init__(config, **kwargs)
    if config.id2label is not None and config.label2id is None:
        config.label2id = {name: idx for idx, name in config.id2label.items()}
    config.qformer_config.encoder_hidden_size = config.vision_config.hidden_size
    config.qformer_config.num_image_tokens = (config.vision_config.image_size // config.vision_config.patch_size) ** 2 + 1


def _check_model_type(cls, config_dict):
    """Refuse a `config.json` of another model type instead of building this model from it with random weights."""
    found = config_dict.get("model_type")
    if found is not None and found != cls.model_type:
        raise ValueError(
            f"This configuration has model_type `{found}`, but {cls.__name__} is model_type `{cls.model_type}`: the "
            f"checkpoint holds another model. Load it with the class of its own type (AutoModel picks it from "
            f"config.json), or point to a `{cls.model_type}` checkpoint."
        )


def _check_positive_ints(config, *names):
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def _check_labels_and_alpha(config):
    if not config.calibration_temperature > 0:
        raise ValueError(f"`calibration_temperature` must be > 0, got {config.calibration_temperature}.")
    if config.decision_threshold is not None:
        if config.num_labels != 2:
            raise ValueError(
                f"`decision_threshold` applies to binary triage only; this config has {config.num_labels} labels. "
                "Set it to None (argmax)."
            )
        # 1.0 is allowed: a model that separates its selection split with saturated float32 probabilities gets the
        # threshold 1.0 (only films with p(urgent) == 1 are flagged); 0 would flag every film.
        if not 0.0 < config.decision_threshold <= 1.0:
            raise ValueError(f"`decision_threshold` must lie in (0, 1], got {config.decision_threshold}.")
    if config.focal_gamma < 0:
        raise ValueError(f"`focal_gamma` must be >= 0, got {config.focal_gamma}.")
    if config.focal_alpha is not None:
        if len(config.focal_alpha) != config.num_labels:
            raise ValueError(
                f"`focal_alpha` has {len(config.focal_alpha)} entries but `num_labels` is {config.num_labels}: "
                "give one weight per class (in `id2label` order) or set `focal_alpha=None`."
            )
        if any(a <= 0 for a in config.focal_alpha):
            raise ValueError(f"`focal_alpha` weights must be > 0, got {list(config.focal_alpha)}.")
    if sorted(config.id2label) != list(range(config.num_labels)):
        raise ValueError(
            f"`id2label` keys must be 0..{config.num_labels - 1}, got {sorted(config.id2label)}: "
            "pass a label map with consecutive ids starting at 0."
        )


@strict
class QFormerConfig(PreTrainedConfig):
    r"""
    Configuration of the Q-DISTILL Q-Former, a BLIP-2 style querying transformer: learnable query tokens and text
    tokens share self-attention, only the queries cross-attend to the frozen image features, and query and text
    positions have separate feed-forward blocks.

    Args:
        vocab_size (`int`, *optional*, defaults to 10000):
            Size of the report tokenizer's vocabulary (the model's `input_ids` must be below it).
        hidden_size (`int`, *optional*, defaults to 768):
            Width of the Q-Former.
        num_hidden_layers (`int`, *optional*, defaults to 4):
            Number of Q-Former layers.
        num_attention_heads (`int`, *optional*, defaults to 12):
            Attention heads in self- and cross-attention; must divide `hidden_size`.
        intermediate_size (`int`, *optional*, defaults to 3072):
            Width of the feed-forward blocks.
        hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Feed-forward activation.
        hidden_dropout_prob (`float`, *optional*, defaults to 0.1):
            Dropout on embeddings and residual branches.
        attention_probs_dropout_prob (`float`, *optional*, defaults to 0.1):
            Dropout on attention probabilities.
        max_position_embeddings (`int`, *optional*, defaults to 512):
            Longest report (in tokens) the text stream accepts.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialiser (query tokens included).
        layer_norm_eps (`float`, *optional*, defaults to 1e-6):
            LayerNorm epsilon.
        pad_token_id (`int`, *optional*, defaults to 0):
            Id of the padding token (`[PAD]` of the report tokenizer).
        num_query_tokens (`int`, *optional*, defaults to 12):
            Number of learnable queries.
        cross_attention_frequency (`int`, *optional*, defaults to 1):
            A layer cross-attends to the image when `layer_index % cross_attention_frequency == 0` (1 = every layer,
            as in the original Q-DISTILL; BLIP-2 uses 2).
        encoder_hidden_size (`int`, *optional*, defaults to 768):
            Width of the image features. Derived from the parent's vision config; never set it by hand.
        use_text_input (`bool`, *optional*, defaults to `True`):
            Whether the Q-Former has a text stream (word embeddings and text feed-forward blocks).
        num_image_tokens (`int`, *optional*, defaults to 50):
            Number of frozen-encoder tokens (CLS + patches). Derived from the parent's vision config; never set it by
            hand.
        standardize_image_features (`bool`, *optional*, defaults to `False`):
            Standardise the frozen encoder's tokens per (token, channel) with training-set statistics before the
            cross-attention LayerNorm: `(x - image_feature_mean) / image_feature_std` (two buffers saved with the
            weights). Set by `set_image_feature_statistics(...)` on the teacher or student, which fills the buffers;
            do not set it by hand. Without it, a random or CLIP encoder's tokens are dominated by a per-position
            component shared by every film, so the queries of different films start (and stay) nearly identical.
        last_layer_text_output (`bool`, *optional*, defaults to `True`):
            Whether the last layer computes text outputs. A model that only ever reads the queries (the student)
            sets it to False: the last layer then has no text feed-forward block, so no parameter goes unused (DDP
            with `find_unused_parameters=False` requires that).

    Example:

    ```python
    >>> from qdistill_hf import QFormerConfig
    >>> QFormerConfig(hidden_size=384, num_attention_heads=6).num_query_tokens
    12
    ```
    """

    model_type = "qdistill_qformer"
    base_config_key = "qformer_config"

    vocab_size: int = 10000
    hidden_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float | int = 0.1
    attention_probs_dropout_prob: float | int = 0.1
    max_position_embeddings: int = 512
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-6
    pad_token_id: int | None = 0
    num_query_tokens: int = 12
    cross_attention_frequency: int = 1
    encoder_hidden_size: int = 768
    use_text_input: bool = True
    num_image_tokens: int = 50
    standardize_image_features: bool = False
    last_layer_text_output: bool = True

    def validate_architecture(self):
        """Checks run when the config is built (part of `@strict` validation)."""
        _check_positive_ints(
            self,
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "num_query_tokens",
            "cross_attention_frequency",
            "encoder_hidden_size",
            "num_image_tokens",
        )
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads}); e.g. use num_attention_heads={math.gcd(self.hidden_size, 64) or 1} "
                "or change hidden_size."
            )
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(
                f"`pad_token_id` ({self.pad_token_id}) must be in [0, vocab_size={self.vocab_size}); "
                "set it to the tokenizer's pad id."
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be in [0, 1), got {getattr(self, name)}.")


@strict
class QDistillTeacherConfig(PreTrainedConfig):
    r"""
    Configuration of the multimodal Q-DISTILL teacher: a frozen CheXzero `CLIPVisionModel`, a Q-Former whose text
    stream encodes the radiology report, and ITC / ITM / focal classification losses.

    Args:
        vision_config (`dict` or `CLIPVisionConfig`, *optional*):
            The frozen image encoder. Defaults to CheXzero's ViT-B/32 (224 px, patch 32, 768 wide, 12 layers,
            12 heads, QuickGELU, projection 512).
        qformer_config (`dict` or `QFormerConfig`, *optional*):
            The Q-Former. Defaults to the original's effective teacher: 12 queries, 4 layers, 12 heads, 768 wide.
            Its `encoder_hidden_size` is always taken from `vision_config.hidden_size`.
        embed_dim (`int`, *optional*, defaults to 256):
            Size of the normalised image / text embeddings compared by ITC.
        itc_loss_weight (`float`, *optional*, defaults to 0.45):
            Weight of the image-text contrastive loss (the original's 0.45).
        itm_loss_weight (`float`, *optional*, defaults to 0.45):
            Weight of the image-text matching loss (the original's 0.45).
        cls_loss_weight (`float`, *optional*, defaults to 0.1):
            Weight of the focal classification loss (the original's 0.1).
        focal_gamma (`float`, *optional*, defaults to 2.0):
            Focal-loss focusing parameter (0 gives cross-entropy).
        focal_alpha (`list[float]`, *optional*):
            Per-class weights, one per label in `id2label` order (the original uses inverse class frequency).
        temperature_init (`float`, *optional*, defaults to 0.07):
            Initial ITC temperature. It is learned and stored as `logit_scale = log(1 / temperature)`, clamped
            at `log(100)` as in CLIP.
        learnable_temperature (`bool`, *optional*, defaults to `True`):
            Whether `logit_scale` is trained (the original kept 0.07 fixed).
        query_selection (`str`, *optional*, defaults to `"softmax"`):
            How the per-query similarities of an image-text pair become one ITC similarity: `"softmax"`
            (softmax-weighted mix of the normalised queries with temperature `query_selection_temperature`, as in
            the original, but computed per pair so the positive report never leaks into the image embedding) or
            `"max"` (the best query, as in BLIP-2).
        query_selection_temperature (`float`, *optional*, defaults to 0.1):
            Temperature of the `"softmax"` query selection.
        text_pooling (`str`, *optional*, defaults to `"mean"`):
            How the report's token outputs become its ITC embedding: `"mean"` (mean over the real tokens, padding
            excluded) or `"cls"` (the `[CLS]` position, as BLIP-2). A from-scratch Q-Former's `[CLS]` output barely
            depends on the report at initialisation (every report's embedding coincides, cosine 1.000), so ITC
            starts at chance and stays there; the mean differs between reports from the first step. `"cls"` is kept
            to reproduce earlier runs.
        itm_hard_negatives (`bool`, *optional*, defaults to `True`):
            Train ITM on ITC-similarity-weighted hard negatives (one negative report per image and one negative
            image per report). The original trained ITM on positive pairs only, which teaches nothing; setting this
            to `False` disables the ITM loss rather than reproducing that.
        freeze_vision_encoder (`bool`, *optional*, defaults to `True`):
            Keep the vision encoder frozen (no gradients, always in eval mode).
        classifier_dropout (`float`, *optional*, defaults to 0.1):
            Dropout before the classification head.
        calibration_temperature (`float`, *optional*, defaults to 1.0):
            Temperature scaling of the triage logits, `softmax(logits / calibration_temperature)`, fitted on the
            validation split by the evaluation tools (`qdistill_hf.evaluation`); 1.0 means uncalibrated.
        decision_threshold (`float`, *optional*):
            Operating threshold on the calibrated probability of the last class (`"urgent"`) for binary triage,
            chosen on the validation split (e.g. the one reaching 90% sensitivity). `None` means argmax, i.e. 0.5.
        decision_rule (`str`, *optional*):
            How `decision_threshold` was chosen (rule, split and number of studies), for the model card and users.

    Example:

    ```python
    >>> from qdistill_hf import QDistillTeacherConfig
    >>> config = QDistillTeacherConfig()
    >>> config.qformer_config.encoder_hidden_size, config.vision_config.patch_size
    (768, 32)
    ```
    """

    model_type = "qdistill_teacher"
    sub_configs_defaults = {"vision_config": CLIPVisionConfig, "qformer_config": QFormerConfig}

    vision_config: dict | PreTrainedConfig | None = None
    qformer_config: dict | PreTrainedConfig | None = None
    embed_dim: int = 256
    itc_loss_weight: float | int = 0.45
    itm_loss_weight: float | int = 0.45
    cls_loss_weight: float | int = 0.1
    focal_gamma: float | int = 2.0
    focal_alpha: list[float] | None = None
    temperature_init: float = 0.07
    learnable_temperature: bool = True
    query_selection: str = "softmax"
    query_selection_temperature: float = 0.1
    text_pooling: str = "mean"
    itm_hard_negatives: bool = True
    freeze_vision_encoder: bool = True
    classifier_dropout: float | int = 0.1
    initializer_range: float = 0.02
    calibration_temperature: float | int = 1.0
    decision_threshold: float | None = None
    decision_rule: str | None = None

    def __post_init__(self, **kwargs):
        _post_init_composite(self, kwargs)

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """Build the config from a dict (as `from_pretrained` does); a dict of another `model_type` raises."""
        _check_model_type(cls, config_dict)
        return super().from_dict(config_dict, **kwargs)

    def validate_architecture(self):
        """Checks run when the config is built (part of `@strict` validation)."""
        _check_positive_ints(self, "embed_dim")
        self.qformer_config.validate_architecture()
        if not self.qformer_config.use_text_input:
            raise ValueError("The teacher reads reports: `qformer_config.use_text_input` must be True.")
        if self.text_pooling not in TEXT_POOLING_MODES:
            raise ValueError(f"`text_pooling` must be one of {TEXT_POOLING_MODES}, got {self.text_pooling!r}.")
        if self.query_selection not in QUERY_SELECTION_MODES:
            raise ValueError(f"`query_selection` must be one of {QUERY_SELECTION_MODES}, got {self.query_selection!r}.")
        if self.query_selection_temperature <= 0 or self.temperature_init <= 0:
            raise ValueError("`query_selection_temperature` and `temperature_init` must be > 0.")
        if self.temperature_init < 0.01:
            raise ValueError(
                f"`temperature_init` ({self.temperature_init}) is below the logit-scale bound 1/100; use >= 0.01."
            )
        for name in ("itc_loss_weight", "itm_loss_weight", "cls_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")
        _check_labels_and_alpha(self)


@strict
class QDistillStudentConfig(PreTrainedConfig):
    r"""
    Configuration of the lightweight Q-DISTILL student: the same frozen vision encoder, a small Q-Former that reads
    either a generated pseudo-report or no text at all, a triage classifier and a projection into the teacher's
    query space for distillation.

    Args:
        vision_config (`dict` or `CLIPVisionConfig`, *optional*):
            The frozen image encoder; defaults to CheXzero's ViT-B/32 (must match the teacher's for distillation).
        qformer_config (`dict` or `QFormerConfig`, *optional*):
            The student Q-Former. Defaults to 8 queries, 2 layers, 6 heads, 384 wide, intermediate 1536 (the
            original's student was as large as its teacher); a dict that sets only some fields (e.g. `vocab_size`)
            keeps these student sizes for the others.
        text_mode (`str`, *optional*, defaults to `"pseudo_report"`):
            `"pseudo_report"`: queries and pseudo-report tokens attend to each other (bidirectional).
            `"image_only"`: no text at all; the Q-Former has no text stream, so the film can be triaged before any
            report exists.
        teacher_hidden_size (`int`, *optional*, defaults to 768):
            Width of the teacher's Q-Former; `projection` maps the pooled student queries into that space.
        focal_gamma (`float`, *optional*, defaults to 2.0):
            Focal-loss focusing parameter of the supervised loss.
        focal_alpha (`list[float]`, *optional*):
            Per-class weights of the supervised loss.
        freeze_vision_encoder (`bool`, *optional*, defaults to `True`):
            Keep the vision encoder frozen.
        classifier_dropout (`float`, *optional*, defaults to 0.1):
            Dropout before the classification head.
        calibration_temperature (`float`, *optional*, defaults to 1.0):
            Temperature scaling of the triage logits, `softmax(logits / calibration_temperature)`, fitted on the
            validation split by the evaluation tools (`qdistill_hf.evaluation`); 1.0 means uncalibrated.
        decision_threshold (`float`, *optional*):
            Operating threshold on the calibrated probability of the last class (`"urgent"`) for binary triage,
            chosen on the validation split (e.g. the one reaching 90% sensitivity). `None` means argmax, i.e. 0.5.
        decision_rule (`str`, *optional*):
            How `decision_threshold` was chosen (rule, split and number of studies), for the model card and users.
    """

    model_type = "qdistill_student"
    sub_configs_defaults = {"vision_config": CLIPVisionConfig, "qformer_config": QFormerConfig}

    vision_config: dict | PreTrainedConfig | None = None
    qformer_config: dict | PreTrainedConfig | None = None
    text_mode: str = "pseudo_report"
    teacher_hidden_size: int = 768
    focal_gamma: float | int = 2.0
    focal_alpha: list[float] | None = None
    freeze_vision_encoder: bool = True
    classifier_dropout: float | int = 0.1
    initializer_range: float = 0.02
    calibration_temperature: float | int = 1.0
    decision_threshold: float | None = None
    decision_rule: str | None = None

    def __post_init__(self, **kwargs):
        # A partial dict (typically just `vocab_size`) is completed from the student's sizes, not from
        # `QFormerConfig`'s teacher-sized defaults, which would silently give a student as large as the teacher.
        if self.qformer_config is None:
            self.qformer_config = dict(STUDENT_QFORMER_DEFAULTS)
        elif isinstance(self.qformer_config, dict):
            self.qformer_config = {**STUDENT_QFORMER_DEFAULTS, **self.qformer_config}
        _post_init_composite(self, kwargs)
        self.qformer_config.use_text_input = self.text_mode == "pseudo_report"
        # The student reads its queries only; its last layer needs no text feed-forward block.
        self.qformer_config.last_layer_text_output = False

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """Build the config from a dict (as `from_pretrained` does); a dict of another `model_type` raises."""
        _check_model_type(cls, config_dict)
        return super().from_dict(config_dict, **kwargs)

    def validate_architecture(self):
        """Checks run when the config is built (part of `@strict` validation)."""
        if self.text_mode not in STUDENT_TEXT_MODES:
            raise ValueError(f"`text_mode` must be one of {STUDENT_TEXT_MODES}, got {self.text_mode!r}.")
        _check_positive_ints(self, "teacher_hidden_size")
        self.qformer_config.validate_architecture()
        _check_labels_and_alpha(self)


__all__ = ["QFormerConfig", "QDistillTeacherConfig", "QDistillStudentConfig", "CHEXZERO_VISION_CONFIG"]
