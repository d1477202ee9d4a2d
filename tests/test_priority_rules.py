"""Tests for the rule-based report scorer (qdistill_hf.labels.priority_rules)."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from qdistill_hf.labels.priority_rules import (
    FINDING_LEXICON,
    ReportScore,
    binary_metrics,
    evaluate_scorer,
    score_report,
    split_sentences,
)


def _status(score: ReportScore, name: str) -> str:
    statuses = {f.status for f in score.findings if f.name == name}
    assert len(statuses) == 1, f"{name}: {statuses}"
    return statuses.pop()


# --- negation, uncertainty, scope ---------------------------------------------------------------


def test_negated_pneumothorax_is_not_urgent():
    score = score_report("No pneumothorax.")
    assert (score.urgent, score.abnormal, score.complexity) == (0, 0, 1)
    assert _status(score, "pneumothorax") == "negated"


def test_negated_list_is_normal():
    score = score_report("No pleural effusion or pneumothorax.")
    assert (score.urgent, score.abnormal, score.complexity) == (0, 0, 1)
    assert _status(score, "pleural_effusion") == "negated"
    assert _status(score, "pneumothorax") == "negated"


def test_small_effusion_is_urgent():
    score = score_report("Small left pleural effusion.")
    assert (score.urgent, score.abnormal, score.complexity) == (1, 1, 4)
    assert score.findings[0].name == "pleural_effusion"
    assert score.findings[0].urgency == "urgent"
    assert score.findings[0].sentence == "Small left pleural effusion."


@pytest.mark.parametrize(
    "text",
    ["Pneumothorax has resolved.", "Pleural effusion is not seen.", "Interval resolution of the pneumonia."],
)
def test_post_negation_and_resolution(text):
    score = score_report(text)
    assert (score.urgent, score.abnormal) == (0, 0)


def test_uncertain_pneumonia_follows_documented_policy():
    # Default policy "differential": a "cannot exclude" hedge is uncertain, abnormal, not urgent.
    score = score_report("Cannot exclude pneumonia.")
    assert _status(score, "pneumonia") == "uncertain"
    assert score.findings[0].hedge == "cannot exclude"
    assert (score.urgent, score.abnormal, score.complexity) == (0, 1, 3)
    assert score_report("Cannot exclude pneumonia.", uncertain_urgent="all").urgent == 1
    assert score_report("Pneumonia cannot be excluded.", uncertain_urgent="all").urgent == 1
    # "not excluded" must read as uncertainty, not as the negation "not".
    assert _status(score_report("Effusion is not excluded."), "pleural_effusion") == "uncertain"


def test_versus_differential_counts_as_urgent():
    score = score_report("Left basilar atelectasis versus infiltrate.")
    assert _status(score, "infiltrate") == "uncertain"
    assert _status(score, "atelectasis") == "uncertain"
    assert (score.urgent, score.complexity) == (1, 4)
    assert score_report("Left basilar atelectasis versus infiltrate.", uncertain_urgent="none").urgent == 0


def test_pseudo_negation_no_change_keeps_mass_present():
    score = score_report("No change in the right upper lobe mass.")
    assert _status(score, "mass") == "present"
    assert score.urgent == 1


def test_normal_report_has_complexity_one():
    score = score_report("Heart size normal. Lungs clear.")
    assert (score.urgent, score.abnormal, score.complexity) == (0, 0, 1)
    assert score.findings == ()
    assert score.rationale.startswith("normal")


def test_scope_ends_at_but():
    score = score_report("No effusion, but there is a right lower lobe consolidation.")
    assert _status(score, "pleural_effusion") == "negated"
    assert _status(score, "consolidation") == "present"
    assert score.urgent == 1


def test_negation_does_not_cross_sentence_boundary():
    score = score_report("No pneumothorax. Right pleural effusion.")
    assert _status(score, "pneumothorax") == "negated"
    assert _status(score, "pleural_effusion") == "present"


@pytest.mark.parametrize(
    "text",
    [
        "Non-urgent follow-up recommended.",
        "Findings are non-urgent. No acute disease.",
        "NON-URGENT: heart size normal, lungs clear.",
        "This is not urgent or critical; no emergency findings.",
    ],
)
def test_non_urgent_wording_never_makes_urgent(text):
    assert score_report(text).urgent == 0


def test_complexity_tiers():
    assert score_report("Calcified granuloma.").complexity == 2
    assert score_report("Mild cardiomegaly.").complexity == 3
    assert score_report("Large right pneumothorax.").complexity == 5
    assert score_report("Large right pleural effusion.").complexity == 5


def test_sentence_splitting():
    text = "FINDINGS: Heart is 2.5 cm wide. No edema.\nIMPRESSION: 1. Clear lungs. 2. No effusion.There is a nodule."
    assert split_sentences(text) == [
        "Heart is 2.5 cm wide.",
        "No edema.",
        "Clear lungs.",
        "No effusion.",
        "There is a nodule.",
    ]


def test_lexicon_entries_are_well_formed():
    assert {"pneumothorax", "pleural_effusion", "pneumonia", "mass", "pneumoperitoneum"} <= set(FINDING_LEXICON)
    for name, rule in FINDING_LEXICON.items():
        assert rule.urgency in ("urgent", "significant", "incidental"), name
        assert 1 <= rule.weight <= 4, name
        assert rule.patterns, name


# --- bad input ------------------------------------------------------------------------------


def test_non_string_raises_type_error():
    with pytest.raises(TypeError, match="str, got NoneType"):
        score_report(None)
    with pytest.raises(TypeError, match="got bytes"):
        score_report(b"No pneumothorax.")


@pytest.mark.parametrize("text", ["", "   \n\t"])
def test_empty_text_raises_value_error(text):
    with pytest.raises(ValueError, match="empty report text"):
        score_report(text)


def test_unknown_policy_raises():
    with pytest.raises(ValueError, match="uncertain_urgent must be one of"):
        score_report("No pneumothorax.", uncertain_urgent="sometimes")


# --- metrics ------------------------------------------------------------------------------


def test_binary_metrics_hand_computed():
    # truth 1 1 1 0 0 0 0 0 ; pred 1 1 0 1 0 0 0 0 -> TP=2 FN=1 FP=1 TN=4
    m = binary_metrics([1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 0, 1, 0, 0, 0, 0])
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (2, 1, 1, 4)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(4 / 5)
    assert m["f1"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 4 / 5) / 2)


def test_binary_metrics_undefined_ratio_is_nan_and_bad_input_raises():
    m = binary_metrics([0, 0], [0, 0])
    assert math.isnan(m["sensitivity"]) and m["specificity"] == 1.0
    with pytest.raises(ValueError, match="3 labels but y_pred has 2"):
        binary_metrics([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="row 1 has y_true=2"):
        binary_metrics([0, 2], [0, 1])


RECORDS = [
    {"study_id": "a", "report": "Small left pleural effusion.", "urgent": 1, "abnormal": 1},  # TP / TP
    {"study_id": "b", "report": "No pneumothorax.", "urgent": 0, "abnormal": 0},  # TN / TN
    {"study_id": "c", "report": "Calcified granuloma.", "urgent": 1, "abnormal": 1},  # FN / TP
    {"study_id": "d", "report": "Right lower lobe consolidation.", "urgent": 0, "abnormal": 0},  # FP / FP
    {"study_id": "e", "report": "Heart size normal. Lungs clear.", "urgent": 0, "abnormal": 1},  # TN / FN
]


def test_evaluate_scorer_hand_computed():
    result = evaluate_scorer(RECORDS)
    u, a = result["urgent"], result["abnormal"]
    assert (u["tp"], u["fn"], u["fp"], u["tn"]) == (1, 1, 1, 2)
    assert u["accuracy"] == pytest.approx(3 / 5)
    assert u["sensitivity"] == pytest.approx(1 / 2)
    assert u["specificity"] == pytest.approx(2 / 3)
    assert u["f1"] == pytest.approx(2 / 4)
    assert u["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert (a["tp"], a["fn"], a["fp"], a["tn"]) == (2, 1, 1, 1)
    assert a["accuracy"] == pytest.approx(3 / 5)
    assert a["sensitivity"] == pytest.approx(2 / 3)
    assert a["specificity"] == pytest.approx(1 / 2)
    assert a["f1"] == pytest.approx(4 / 6)
    assert [sid for sid, _ in result["predictions"]] == ["a", "b", "c", "d", "e"]


def test_evaluate_scorer_bad_records():
    with pytest.raises(ValueError, match=r"record 0 \(x\) has no 'report' field"):
        evaluate_scorer([{"study_id": "x", "urgent": 0, "abnormal": 0}])
    with pytest.raises(ValueError, match=r"record 1 \(y\) field 'urgent' must be 0 or 1, got 2"):
        evaluate_scorer([RECORDS[0], {"study_id": "y", "report": "No edema.", "urgent": 2, "abnormal": 0}])
    with pytest.raises(ValueError, match=r"record 0 \(z\) field 'report' is empty"):
        evaluate_scorer([{"study_id": "z", "report": " ", "urgent": 0, "abnormal": 0}])
    with pytest.raises(ValueError, match="no records"):
        evaluate_scorer([])


def _load_cli():
    path = Path(__file__).resolve().parents[1] / "data_scripts" / "evaluate_priority_rules.py"
    spec = importlib.util.spec_from_file_location("evaluate_priority_rules", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_on_small_file(tmp_path, capsys):
    path = tmp_path / "mini.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    assert _load_cli().main(["--jsonl", str(path), "--errors", "1"]) == 0
    out = capsys.readouterr().out
    assert "[urgent] n=5  accuracy=0.6000  sensitivity=0.5000  specificity=0.6667" in out
    assert "TN=    2  FP=    1" in out
    assert "urgent: false negatives" in out and "- c " in out


def test_cli_bad_files(tmp_path):
    cli = _load_cli()
    with pytest.raises(FileNotFoundError, match="JSONL file not found"):
        cli.main(["--jsonl", str(tmp_path / "nope.jsonl")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
        cli.main(["--jsonl", str(bad)])


# --- real data: goals from the issue ------------------------------------------------------


def test_meets_goals_on_iu_dev(shared_data):
    path = shared_data / "cxr-paired" / "iu_reports_dev.jsonl"
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    result = evaluate_scorer(records)
    urgent, abnormal = result["urgent"], result["abnormal"]
    assert urgent["sensitivity"] >= 0.85
    assert urgent["specificity"] >= 0.90
    assert abnormal["accuracy"] >= 0.90
    assert abnormal["balanced_accuracy"] >= 0.88


def test_one_urgency_definition_drives_rules_synthetic_and_mesh():
    from qdistill_hf.data import synthetic_cxr
    from qdistill_hf.labels import policy
    from qdistill_hf.labels.priority_rules import FINDING_LEXICON, URGENT

    assert {n for n, r in FINDING_LEXICON.items() if r.urgency == URGENT} == policy.URGENT_FINDINGS
    assert synthetic_cxr.URGENT_FINDINGS == policy.URGENT_FINDINGS & set(synthetic_cxr.FINDINGS)
    assert "cardiomegaly" not in policy.URGENT_FINDINGS
    assert policy.urgent_from_mesh(["Pulmonary Congestion/mild"]) == 1
    assert policy.urgent_from_mesh(["Cardiomegaly/mild", "normal"]) == 0
