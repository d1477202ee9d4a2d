"""`evaluate` wrapper of `qdistill_hf.evaluation.compute_triage_metrics`: chest X-ray triage metrics with a bootstrap
AUROC confidence interval, operating points and calibration.

Load it offline from the repository root with `evaluate.load("metrics/cxr_triage")` (Hub metrics such as
`evaluate.load("roc_auc")` need the network). One module per import line: `evaluate` scans import lines naively.
"""

import datasets
import evaluate

from qdistill_hf.evaluation.metrics import compute_triage_metrics


_DESCRIPTION = """
Triage metrics of predicted probabilities against class ids: accuracy, macro-F1, AUROC with a percentile bootstrap
confidence interval (seeded, resampling studies; optionally stratified), average precision, sensitivity and
specificity at the decision threshold, sensitivity at 90%/95% specificity and specificity at 90%/95% sensitivity,
expected calibration error, Brier score and the confusion matrix. Values that are undefined (one class only, ...) are
`nan` with their reason in `nan_reasons`. Same numbers as `qdistill_hf.evaluation.compute_triage_metrics`.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[float]` or `list[list[float]]`): probability of class 1 ("urgent") per study, or class
        probability rows summing to 1.
    references (`list[int]`): class ids.
    threshold (`float`, *optional*): decision threshold on p(class 1) in (0, 1); `None` = argmax (p > 0.5).
    n_bootstrap (`int`, *optional*, defaults to 1000): bootstrap resamples of the AUROC CI (0 = none).
    confidence (`float`, *optional*, defaults to 0.95): CI coverage.
    seed (`int`, *optional*, defaults to 0): bootstrap seed.
    stratified (`bool`, *optional*, defaults to `False`): resample each class separately.
    n_bins (`int`, *optional*, defaults to 15): ECE bins.
    label_names (`list[str]`, *optional*): class names used in messages.
Returns:
    `dict`: see `compute_triage_metrics` (`auroc`, `auroc_ci_low`, `auroc_ci_high`, `accuracy`, `macro_f1`, ...).
Examples:
    >>> import evaluate
    >>> metric = evaluate.load("metrics/cxr_triage")
    >>> metric.compute(predictions=[0.1, 0.6, 0.4, 0.9], references=[0, 0, 1, 1], n_bootstrap=0)["auroc"]
    0.75
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CxrTriage(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": datasets.Value("float64"), "references": datasets.Value("int64")}),
                datasets.Features(
                    {
                        "predictions": datasets.Sequence(datasets.Value("float64")),
                        "references": datasets.Value("int64"),
                    }
                ),
            ],
        )

    def _compute(
        self,
        predictions,
        references,
        threshold=None,
        n_bootstrap=1000,
        confidence=0.95,
        seed=0,
        stratified=False,
        n_bins=15,
        label_names=None,
    ):
        return compute_triage_metrics(
            references,
            predictions,
            threshold=threshold,
            n_bootstrap=n_bootstrap,
            confidence=confidence,
            seed=seed,
            stratified=stratified,
            n_bins=n_bins,
            label_names=label_names,
        )
