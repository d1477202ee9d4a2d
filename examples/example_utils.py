"""Plumbing shared by `run_teacher.py` and `run_distillation.py`.

Importing this module costs only the standard library: torch, transformers' Trainer, datasets and qdistill_hf
(about 7 s together on a 2-core CPU) are imported inside the functions that need them, after the command line is
parsed, so that `--help` answers at once. What lives here:

- `parse_arguments`: `--help` (the script's own options), `--help_all` (every option), a single `.yaml`/`.yml`/
  `.json` argument (`parse_yaml_file` / `parse_json_file`) optionally followed by `--option value` overrides, or
  plain command-line flags;
- `DataArguments`: the dataset options both scripts share;
- `setup_logging`, `load_splits`, `cache_features`: the first steps of both scripts;
- `TRAINING_DEFAULTS`: where the scripts' defaults differ from `QDistillTrainingArguments`' (evaluation and saving
  every epoch, best model by validation AUROC);
- `save_predictions` / `load_predictions`: one model's logits on one split as `predictions_<split>.npz` (study_ids,
  labels, logits), written by the training scripts and the demo, read by `evaluate_triage.py`;
- `finish`: save, log and save metrics, then push to the Hub (guarded: offline it fails with a clear message and
  leaves the local files intact) or write a model card.
"""

import argparse
import ast
import importlib.util
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from transformers import HfArgumentParser  # ~1 s: transformers is lazy until a model or Trainer is touched


logger = logging.getLogger(__name__)

CONFIG_FILE_SUFFIXES = (".yaml", ".yml", ".json")
HELP_ALL_FLAG = "--help_all"


def read_library_constant(relative_path: str, name: str) -> Any:
    """Read a literal constant (`NAME = (...)`) from a qdistill_hf module's source without importing it.

    Importing any qdistill_hf module imports torch and transformers' models (`qdistill_hf/__init__.py` registers the
    Auto classes), which takes seconds; `--help` must not. Reading the literal keeps the choices the library's own.

    Args:
        relative_path (`str`): the module's path inside the package, e.g. `"data/data_cxr.py"`.
        name (`str`): the module-level name assigned a literal.

    Raises:
        ImportError: qdistill_hf is not installed.
        RuntimeError: the module has no such literal assignment.
    """
    spec = importlib.util.find_spec("qdistill_hf")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("qdistill_hf is not installed: run `pip install -e .` from the repository root")
    source_path = Path(next(iter(spec.submodule_search_locations)), relative_path)
    for node in ast.parse(source_path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(target, "id", None) == name for target in node.targets):
            return ast.literal_eval(node.value)
    raise RuntimeError(f"{source_path}: no module-level `{name} = <literal>` to read")


DatasetName = Literal[read_library_constant("data/data_cxr.py", "CONFIG_NAMES")]


@dataclass
class DataArguments:
    """Which dataset to train and evaluate on (`qdistill_hf.load_cxr_dataset`)."""

    _argument_group_name = "data options"

    dataset_name: DatasetName = field(
        default="synthetic",
        metadata={"help": "Config of the qdistill_hf CXR dataset builder (synthetic needs no data_dir)."},
    )
    data_dir: str | None = field(default=None, metadata={"help": "Data folder of the dataset (see data_scripts/)."})
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "datasets cache folder for the prepared Arrow files (and the frozen-feature cache)."},
    )
    class_names: list[str] | None = field(
        default=None,
        metadata={
            "help": "Class names, index = class id: the builder's label_names (TrainingArguments has its own "
            "label_names). Default: the builder's."
        },
    )
    dataset_config: dict | str | None = field(
        default=None,
        metadata={
            "help": "Other CxrBuilderConfig options: a JSON object on the command line, a mapping in a YAML/JSON "
            "config, e.g. '{\"num_train\": 200, \"num_validation\": 50}' for synthetic."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N training studies (quick runs)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N validation studies (quick runs)."}
    )
    max_test_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N test studies (quick runs)."}
    )
    use_feature_cache: bool = field(
        default=False,
        metadata={
            "help": "Run the frozen vision encoder once per film and train on its cached tokens (fp16, beside the "
            "dataset's Arrow files). Also switched on by --feature_cache_dir."
        },
    )

    def __post_init__(self):
        if isinstance(self.dataset_config, str):
            try:
                self.dataset_config = json.loads(self.dataset_config)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"--dataset_config must be a JSON object, got {self.dataset_config!r}: {error}"
                ) from None
        if self.dataset_config is not None and not isinstance(self.dataset_config, dict):
            raise ValueError(
                f"dataset_config must be a mapping of CxrBuilderConfig options, got {self.dataset_config!r}"
            )
        clashes = sorted(set(self.dataset_config or {}) & {"data_dir", "label_names", "cache_dir"})
        if clashes:
            raise ValueError(
                f"dataset_config holds {clashes}: give data_dir and cache_dir as options, label_names as class_names"
            )
        if self.dataset_name != "synthetic" and self.data_dir is None:
            raise ValueError(f"--dataset_name {self.dataset_name} needs --data_dir")
        for name in ("max_train_samples", "max_eval_samples", "max_test_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be >= 1, got {value}")


# ----------------------------------------------------------------------------------------------- parsing


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the option help, description and epilog printed as written."""


def _is_help(argv: Sequence[str]) -> bool:
    return any(arg in ("-h", "--help") for arg in argv)


def parse_arguments(
    script_types: tuple[type, ...],
    training_types: Callable[[], tuple[type, ...]],
    argv: Sequence[str] | None,
    description: str,
    training_epilog: str,
    training_defaults: dict | None = None,
) -> tuple:
    """Parse the command line into the script's dataclasses followed by the training-arguments dataclass(es).

    - `-h`/`--help`: the options of `script_types` plus `training_epilog` (the training options that matter most),
      without importing torch;
    - `--help_all`: every option, training ones included (imports torch and transformers' Trainer);
    - `CONFIG.yaml|.yml|.json [--option value ...]`: the file's mapping (as `parse_yaml_file`/`parse_json_file`
      read it) through `parse_dict`; options after it override the file's values;
    - otherwise `parse_args_into_dataclasses`.

    Args:
        script_types (`tuple[type, ...]`): the script's own dataclasses (standard library only).
        training_types (`Callable[[], tuple[type, ...]]`): returns the training dataclass(es); called only when
            needed, because importing them imports torch.
        argv (`Sequence[str]`, *optional*): the arguments; `None` reads `sys.argv[1:]`.
        description (`str`): the parser's description.
        training_epilog (`str`): text after the script's options in `--help`.
        training_defaults (`dict`, *optional*): the training defaults of this script, instead of
            `TRAINING_DEFAULTS` (e.g. a script without triage logits chooses its checkpoint by `loss`).

    Returns:
        `tuple`: one instance per dataclass, `script_types` first.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if _is_help(argv) and HELP_ALL_FLAG not in argv:
        parser = HfArgumentParser(
            script_types, description=description, epilog=training_epilog, formatter_class=_HelpFormatter
        )
        parser.add_argument(HELP_ALL_FLAG, action="store_true", help="List every option, training ones included.")
        parser.parse_args(argv)  # prints the help and exits
    dataclass_types = (*script_types, *training_types())
    parser = HfArgumentParser(dataclass_types, description=description, formatter_class=_HelpFormatter)
    defaults = TRAINING_DEFAULTS if training_defaults is None else training_defaults
    parser.set_defaults(**defaults)
    if HELP_ALL_FLAG in argv:
        parser.print_help()
        raise SystemExit(0)
    if argv and argv[0].endswith(CONFIG_FILE_SUFFIXES):
        config_file, overrides = argv[0], argv[1:]
        values = {**defaults, **_read_config_file(config_file)}
        if overrides:
            values.update(_parse_overrides(dataclass_types, overrides))
        return parser.parse_dict(values)
    return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)


def _read_config_file(path: str) -> dict:
    """The mapping in a `.json` or `.yaml`/`.yml` file; anything else raises naming the file."""
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith(".json"):
        values = json.loads(text)
    else:
        import yaml

        values = yaml.safe_load(text)
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values, got {type(values).__name__}")
    return values


def _parse_overrides(dataclass_types: tuple[type, ...], overrides: list[str]) -> dict:
    """Only the options given in `overrides`, parsed with the full parser's types (no defaults, nothing required)."""
    parser = HfArgumentParser(dataclass_types)
    for action in parser._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS
            action.required = False
    return vars(parser.parse_args(overrides))


# ----------------------------------------------------------------------------------------------- training args


# The scripts' defaults where they differ from QDistillTrainingArguments': evaluation and checkpoints every epoch, the
# checkpoint with the best validation AUROC reloaded at the end, at most 2 checkpoints kept (the best one included).
TRAINING_DEFAULTS = {
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "load_best_model_at_end": True,
    "metric_for_best_model": "auroc",
    "save_total_limit": 2,
}


def training_arguments_class() -> type:
    """`QDistillTrainingArguments` (imports torch: call it after `--help` is handled)."""
    from qdistill_hf.training import QDistillTrainingArguments

    return QDistillTrainingArguments


def training_epilog(script: str, extra: str = "") -> str:
    """The `--help` text about the training options (the ones that matter most, by name)."""
    return (
        "training options: every QDistillTrainingArguments / transformers.TrainingArguments option is accepted.\n"
        "The ones that matter most:\n"
        "  --output_dir DIR                 where the model, processor, metrics and checkpoints go\n"
        "  --num_train_epochs N, --per_device_train_batch_size N, --per_device_eval_batch_size N\n"
        "  --learning_rate LR, --weight_decay WD, --lr_scheduler_type cosine, --warmup_steps N, --max_grad_norm X\n"
        "  --eval_strategy epoch, --save_strategy epoch, --load_best_model_at_end true, "
        "--metric_for_best_model auroc\n"
        "                                   (these four are the scripts' defaults)\n"
        "  --seed N, --bf16 true, --logging_steps N, --report_to none\n"
        "  --feature_cache_dir DIR          cache frozen-encoder features (and teacher targets) for training\n"
        "  --push_to_hub true --hub_model_id USER/NAME   upload output_dir at the end (fails offline, files kept)\n"
        f"{extra}"
        f"Run `python examples/{script} --help_all` for all of them with their defaults (imports torch: a few "
        "seconds).\n"
        f"A single config file works too: `python examples/{script} examples/configs/FILE.yaml [--option value ...]`."
    )


# ----------------------------------------------------------------------------------------------- steps


def setup_logging(training_args, script_logger: logging.Logger) -> None:
    """`run_clip.py`'s logging set-up: stdout handler; levels from `training_args.get_process_log_level()`."""
    import datasets
    import transformers

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        # The default of training_args.log_level is passive, so we set log level at info here to have that default.
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    for named_logger in (script_logger, logger, logging.getLogger("qdistill_hf")):
        named_logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    script_logger.warning(
        f"Process rank: {training_args.local_process_index}, device: {training_args.device}, "
        f"n_gpu: {training_args.n_gpu}, distributed training: {training_args.parallel_mode.value == 'distributed'}, "
        f"bf16: {training_args.bf16}"
    )


def load_splits(data_args: DataArguments, training_args):
    """The dataset's splits (`load_cxr_dataset`, main process first), trimmed by the `max_*_samples` options.

    Returns:
        `datasets.DatasetDict` with `train`, `validation` and, when the dataset has one, `test`.

    Raises:
        ValueError: no train split, or evaluation asked for without a validation split.
    """
    from qdistill_hf import load_cxr_dataset

    config_kwargs = dict(data_args.dataset_config or {})
    if data_args.class_names is not None:
        config_kwargs["label_names"] = data_args.class_names
    with training_args.main_process_first(desc="preparing the dataset"):
        splits = load_cxr_dataset(
            data_args.dataset_name, data_dir=data_args.data_dir, cache_dir=data_args.cache_dir, **config_kwargs
        )
    if "train" not in splits:
        raise ValueError(f"dataset {data_args.dataset_name!r} has no train split (splits: {list(splits)})")
    if "validation" not in splits and training_args.eval_strategy != "no":
        raise ValueError(
            f"dataset {data_args.dataset_name!r} has no validation split (splits: {list(splits)}), which model "
            "selection needs; add one, or pass --eval_strategy no --load_best_model_at_end false"
        )
    for split, limit in (
        ("train", data_args.max_train_samples),
        ("validation", data_args.max_eval_samples),
        ("test", data_args.max_test_samples),
    ):
        if split in splits and limit is not None and limit < len(splits[split]):
            splits[split] = splits[split].select(range(limit))
    return splits


def cache_features(splits, vision_model, image_processor, training_args):
    """Every split with the frozen encoder's tokens cached as `image_features` (and the films dropped)."""
    import datasets

    from qdistill_hf import cache_image_features

    if training_args.feature_cache_dir is not None:
        # cache_image_features takes no cache_dir (a library change is requested): its Arrow files go beside the
        # dataset's, whatever feature_cache_dir says.
        logger.info("Frozen-feature cache beside the dataset's Arrow files (--cache_dir); feature_cache_dir is used "
                    "for teacher targets only.")
    cached = {}
    for name, split in splits.items():
        with_features = cache_image_features(
            split, vision_model, image_processor, batch_size=training_args.per_device_eval_batch_size
        )
        # The films are not read again: dropping them saves decoding every image at every step.
        cached[name] = with_features.remove_columns("image")
    return datasets.DatasetDict(cached)


def hub_offline() -> bool:
    """Whether huggingface_hub runs offline (`HF_HUB_OFFLINE=1`)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def finish(trainer, processor, splits, training_args, push_to_hub: bool, train_result, kwargs: dict) -> int:
    """Save the model and processor, log and save train/eval/test metrics, write the stand-alone Hub folder
    (`qdistill_hf.sharing.save_for_hub`: cxr-triage pipeline, model card), then push it if asked.

    Returns:
        `int`: the exit status: 0, or 1 when the push to the Hub failed (the local files are kept).
    """
    # Saves the model (config.json, model.safetensors) and, as processing_class, the processor; the processor is
    # saved once more explicitly so the folder is complete even for a Trainer built without processing_class.
    trainer.save_model()
    if trainer.is_world_process_zero():
        processor.save_pretrained(training_args.output_dir)
    metrics = dict(train_result.metrics)
    metrics["train_samples"] = len(splits["train"])
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()

    evaluation = {}
    for split, prefix in (("validation", "eval"), ("test", "test")):
        if split not in splits:
            continue
        logger.info(f"*** Evaluate on {split} ***")
        metrics = trainer.evaluate(eval_dataset=splits[split], metric_key_prefix=prefix)
        metrics[f"{prefix}_samples"] = len(splits[split])
        trainer.log_metrics(prefix, metrics)
        trainer.save_metrics(prefix, metrics)
        evaluation = {key[len(prefix) + 1:]: value for key, value in metrics.items()} | {"split": split}

    repo = training_args.hub_model_id or Path(training_args.output_dir).absolute().name
    # save_for_hub describes Q-DISTILL teachers and students; other models (run_baseline.py's ResNet and probes,
    # run_clip_pretraining.py's CLIPModel) get the Trainer's model card.
    qdistill_model = getattr(trainer.model.config, "model_type", "") in ("qdistill_teacher", "qdistill_student")
    if trainer.is_world_process_zero() and not qdistill_model:
        trainer.create_model_card(**kwargs)
    elif trainer.is_world_process_zero():
        from qdistill_hf.sharing import save_for_hub

        # The Hub folder (pipeline file, custom_pipelines, model card with model-index from the last split evaluated);
        # the Trainer's own card would replace ours, so the push below uploads the folder as it is.
        base = kwargs.get("finetuned_from")
        save_for_hub(trainer.model, processor, training_args.output_dir, training_args=training_args,
                     evaluation={"model": evaluation} if evaluation else None, repo_id=repo if push_to_hub else None,
                     base_model=base, datasets=[kwargs["dataset"]] if kwargs.get("dataset") else None,
                     tags=kwargs.get("tags") or ())
    if not push_to_hub or not trainer.is_world_process_zero():
        return 0
    if hub_offline():
        logger.error(
            f"push_to_hub: HF_HUB_OFFLINE=1, so the Hub cannot be reached and nothing was uploaded to {repo!r}. "
            f"The model, processor and metrics are saved in {training_args.output_dir}; upload them later with "
            f"`hf upload {repo} {training_args.output_dir}`."
        )
        return 1
    try:
        from qdistill_hf.sharing import push_folder_to_hub

        push_folder_to_hub(training_args.output_dir, repo, token=training_args.hub_token,
                           private=training_args.hub_private_repo)
    except Exception as error:  # any Hub/network/auth failure: report it, keep the files, exit non-zero
        logger.error(
            f"push_to_hub to {repo!r} failed ({type(error).__name__}: {error}). The model, processor and metrics "
            f"are saved in {training_args.output_dir}; upload them later with "
            f"`hf upload {repo} {training_args.output_dir}`.",
            exc_info=True,
        )
        return 1
    return 0


def disable_trainer_push(training_args) -> bool:
    """Turn off the Trainer's own Hub calls and return whether a push was asked for.

    A `Trainer` with `push_to_hub=True` creates the Hub repo when it is built and pushes at every save, so offline it
    fails before training. The scripts instead push once, after everything is saved locally (see `finish`).
    """
    asked = bool(training_args.push_to_hub)
    if asked and hub_offline():
        logger.warning(
            "push_to_hub is set but HF_HUB_OFFLINE=1: training runs and saves locally, and the push at the end will "
            "fail (exit status 1)."
        )
    training_args.push_to_hub = False
    return asked


PREDICTIONS_KEYS = ("study_ids", "labels", "logits")


def predictions_path(folder: str | Path, split: str) -> Path:
    """`folder/predictions_<split>.npz`, the file `save_predictions` writes and `evaluate_triage.py` reads."""
    return Path(folder) / f"predictions_{split}.npz"


def save_predictions(folder: str | Path, split: str, study_ids: Sequence[str], labels, logits) -> Path:
    """Write one model's predictions on one split as `folder/predictions_<split>.npz`.

    The file holds `study_ids` (str, `(n,)`), `labels` (int64 class ids, `(n,)`) and `logits` (float32 raw triage
    logits, `(n, num_labels)`, before any temperature), the input of `examples/evaluate_triage.py`.

    Raises:
        ValueError: lengths disagree, logits are not 2-D or not finite, or study ids repeat (naming the split).
    """
    import numpy as np

    study_ids = np.asarray([str(s) for s in study_ids])
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    logits = np.asarray(logits, dtype=np.float32)
    if logits.ndim != 2 or not (len(study_ids) == len(labels) == logits.shape[0]):
        raise ValueError(
            f"predictions of split {split!r}: expected study_ids (n,), labels (n,) and logits (n, num_labels), got "
            f"{study_ids.shape}, {labels.shape} and {logits.shape}"
        )
    if not np.isfinite(logits).all():
        bad = study_ids[~np.isfinite(logits).all(axis=1)]
        raise ValueError(f"predictions of split {split!r}: non-finite logits for {len(bad)} studies, e.g. {bad[:5]}")
    if len(set(study_ids.tolist())) != len(study_ids):
        raise ValueError(f"predictions of split {split!r}: repeated study ids")
    path = predictions_path(folder, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, study_ids=study_ids, labels=labels, logits=logits)
    return path


def load_predictions(path: str | Path) -> dict:
    """Read a `predictions_<split>.npz` written by `save_predictions`.

    Returns:
        `dict` with `study_ids`, `labels` (int64) and `logits` (float64).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a key is missing or the shapes disagree (naming the file).
    """
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no predictions file (written by example_utils.save_predictions)")
    with np.load(path, allow_pickle=False) as data:
        missing = [key for key in PREDICTIONS_KEYS if key not in data.files]
        if missing:
            raise ValueError(f"{path}: missing {missing} (has {sorted(data.files)}; expected {list(PREDICTIONS_KEYS)})")
        out = {"study_ids": data["study_ids"].astype(str), "labels": data["labels"].astype(np.int64),
               "logits": data["logits"].astype(np.float64)}
    n = len(out["study_ids"])
    if out["logits"].ndim != 2 or out["labels"].shape != (n,) or out["logits"].shape[0] != n:
        raise ValueError(
            f"{path}: expected study_ids (n,), labels (n,) and logits (n, num_labels), got {out['study_ids'].shape}, "
            f"{out['labels'].shape} and {out['logits'].shape}"
        )
    return out


def calibrate_on_validation(trainer, splits, output_dir, *, rule: str = "sensitivity", target: float = 0.90):
    """Predictions of the kept model on every evaluation split, then its operating point from the validation split.

    Writes `predictions_<split>.npz` (`save_predictions`) for `validation` and `test` when present, then runs
    `qdistill_hf.evaluation.calibrate_model` on the *validation* logits only: temperature scaling and the threshold
    reaching `target` sensitivity (by default) are stored in `trainer.model.config` (`calibration_temperature`,
    `decision_threshold`, `decision_rule`), so the `save_model` that follows carries them and the pipelines use them.

    Returns:
        `calibrate_model`'s summary, or `None` without a validation split (nothing calibrated; a warning says so).
    """
    import numpy as np

    from qdistill_hf.evaluation import calibrate_model

    logits = {}
    for name in ("validation", "test"):
        if name not in splits:
            continue
        output = trainer.predict(splits[name], metric_key_prefix=f"predict_{name}")
        raw = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
        labels = np.asarray(splits[name]["label"], dtype=np.int64)
        logits[name] = raw
        if trainer.is_world_process_zero():
            path = save_predictions(output_dir, name, splits[name]["study_id"], labels, raw)
            logger.info(f"Predictions written to {path}")
    if "validation" not in logits:
        logger.warning("No validation split: the model keeps calibration_temperature 1 and the argmax decision.")
        return None
    return calibrate_model(trainer.model, logits["validation"], splits["validation"]["label"], rule=rule,
                           target=target, split="validation")


def model_sizes(model_args, names: Sequence[str]) -> dict:
    """The `names` fields of `model_args` that were given (not `None`), as config keyword arguments."""
    return {name: getattr(model_args, name) for name in names if getattr(model_args, name) is not None}


__all__ = [
    "calibrate_on_validation",
    "CONFIG_FILE_SUFFIXES",
    "DataArguments",
    "DatasetName",
    "HELP_ALL_FLAG",
    "cache_features",
    "disable_trainer_push",
    "finish",
    "hub_offline",
    "load_predictions",
    "load_splits",
    "model_sizes",
    "parse_arguments",
    "predictions_path",
    "PREDICTIONS_KEYS",
    "read_library_constant",
    "save_predictions",
    "setup_logging",
    "TRAINING_DEFAULTS",
    "training_arguments_class",
    "training_epilog",
]
