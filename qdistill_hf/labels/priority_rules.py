"""Transparent rule-based triage scoring of chest X-ray reports.

The original Q-DISTILL asked an LLM for ``PRIORITY: 0|1`` and fell back on keyword matching that
labelled anything mentioning "non-urgent" as urgent. This module replaces that with a small,
auditable scorer: sentence-level finding extraction from a documented lexicon, NegEx-style
negation and uncertainty handling, and fixed rules mapping findings to three labels.

Labels
------
``urgent`` (0/1)
    The original's two classes (0 = non-urgent, 1 = urgent). 1 when at least one finding of tier
    ``urgent`` is *present*, or is *uncertain* only because it is one side of a two-way
    differential ("atelectasis versus infiltrate", "edema vs. chronic change"): radiologists use
    "A versus B" to name the leading candidates and human coders index both. Other hedges
    ("possible", "may represent", "cannot exclude", "questionable", "concerning for") do not make a
    report urgent by default: on the IU development set a report whose only urgent evidence was
    such a hedge was coded urgent about 20% of the time, against 65% for "versus". The policy is
    the ``uncertain_urgent`` argument of ``score_report`` ("differential", "all" or "none").
    Negated findings never count.
``abnormal`` (0/1)
    1 when at least one finding of any tier is present or uncertain, 0 otherwise (the report
    describes no finding, or only negated ones).
``complexity`` (1-5)
    ``1`` normal (no present or uncertain finding); otherwise ``1 + max(weight)`` over the
    findings, where a present finding contributes its lexicon weight and an uncertain one its
    weight minus one (at least 1), except that an uncertain finding counted as urgent keeps its
    weight. A present urgent finding with a severity modifier in its sentence ("large",
    "massive", "tension", "severe", "extensive", "diffuse", "multifocal") is promoted to weight 4,
    and so is a report with three or more distinct present urgent findings. Hence: 2 =
    incidental/chronic findings only, 3 = significant non-urgent finding (or a hedged urgent one
    that does not count), 4 = urgent, 5 = critical (pneumothorax, pneumoperitoneum, or a
    severe/multiple urgent picture). ``urgent == 1`` always implies ``complexity >= 4``.

Finding lexicon (``FINDING_LEXICON``; tier, weight)
---------------------------------------------------
=========================  ===========  ======  ==============================================
finding                    tier         weight  example wording
=========================  ===========  ======  ==============================================
pneumothorax               urgent       4       pneumothorax, hydropneumothorax
pneumoperitoneum           urgent       4       pneumoperitoneum, free air under the diaphragm
pleural_effusion           urgent       3       pleural effusion, effusions, pleural fluid
pneumonia                  urgent       3       pneumonia, pneumonitis, infectious process
consolidation              urgent       3       consolidation, consolidative opacity
airspace_disease           urgent       3       airspace disease/process, alveolar filling
pulmonary_edema            urgent       3       edema, vascular congestion/prominence,
                                                engorged vessels, CHF, cephalization
infiltrate                 urgent       3       infiltrate, infiltration
mass                       urgent       3       mass, masslike, tumor, neoplasm
cardiomegaly               significant  2       cardiomegaly, enlarged heart, upper limits of
                                                normal heart size
atelectasis                significant  2       atelectasis, volume loss, collapse
nodule                     significant  2       nodule, nodular opacity
opacity                    significant  2       opacity (incl. "airspace opacity"), density
fracture                   significant  2       fracture, compression deformity
hernia                     significant  2       hiatal hernia
emphysema_hyperinflation   significant  2       emphysema, COPD, hyperinflation, flattened
                                                diaphragms, bullae
interstitial_fibrosis      significant  2       fibrosis, interstitial markings, bronchiectasis
hilar_mediastinal          significant  2       hilar prominence, adenopathy, widened
                                                mediastinum
pericardial_effusion       significant  2       pericardial effusion
cavity_cyst                significant  2       cavitation, cyst
low_lung_volumes           incidental   1       low lung volumes, hypoinflation, poor inspiration
granuloma_calcification    incidental   1       granuloma, calcification, calcified node
scarring                   incidental   1       scarring, scar, cicatrix
degenerative_spine         incidental   1       degenerative changes, osteophytes, spondylosis
spinal_curvature           incidental   1       scoliosis, kyphosis
aortic_changes             incidental   1       tortuous/ectatic/unfolded aorta, atherosclerosis
devices                    incidental   1       pacemaker, catheter, sternotomy wires, clips
pleural_thickening         incidental   1       pleural thickening, apical capping
costophrenic_blunting      incidental   1       blunting of the costophrenic angle
diaphragm_elevation        incidental   1       elevated hemidiaphragm, eventration
bone_other                 incidental   1       osteopenia, deformity, old rib injury
technical_limitation       incidental   1       rotated, limited exam, underpenetrated
postsurgical               incidental   1       post-surgical changes, mastectomy, lobectomy
other_incidental           incidental   1       azygos lobe, nipple shadow, epicardial fat
=========================  ===========  ======  ==============================================

Negation and uncertainty (NegEx-style)
--------------------------------------
A report is split into sentences (full stops, question/exclamation marks, line breaks and
numbered list items); each sentence is split into clauses at scope terminators ("but",
"however", "although", "though", "which", "except", "aside from", "apart from", "other than",
"whereas", "while", "with the exception of", ";", "and there/the/a/an" and ", there is/are" /
", with"; ``SCOPE_TERMINATORS`` is the full list). A pre-negation trigger ("no", "not", "without", "free of",
"negative for", "no evidence of", "absence of", "resolved", "resolution of", "clear of",
"rather than", "ruled out", ...) negates findings from the trigger to the end of its clause; a
post-negation trigger ("... is not seen", "... has resolved", "... absent", "... not
identified") negates findings from the clause start to the trigger. Pseudo-negations ("no
change", "no interval change", "not only", "no increase", "not significantly changed", ...) are
removed before triggers are searched, so "No change in the right upper lobe mass." keeps the
mass present. Uncertainty triggers ("possible", "cannot exclude", "cannot be excluded", "may
represent", "questionable", "versus", "suspicious for", ...) mark findings in their scope as
uncertain, and take precedence over negation inside their span (so "not excluded" is
uncertain, not negated). Hypothetical context ("evaluation for", "to exclude", "if") is treated
like negation: the finding is not asserted. Post-negation triggers reach back at most 8 words.

"Airspace opacity" is deliberately an ``opacity`` (descriptive, non-urgent) while "airspace
disease" is ``airspace_disease`` (urgent): this follows the MeSH indexing the labels come from,
where the two are separate terms, and radiologists often attribute such opacities to atelectasis
or scarring in the same breath.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from .policy import URGENT_FINDINGS

logger = logging.getLogger(__name__)

URGENT = "urgent"
SIGNIFICANT = "significant"
INCIDENTAL = "incidental"
TIERS = (URGENT, SIGNIFICANT, INCIDENTAL)

PRESENT = "present"
NEGATED = "negated"
UNCERTAIN = "uncertain"
STATUSES = (PRESENT, NEGATED, UNCERTAIN)


@dataclass(frozen=True)
class FindingRule:
    """One lexicon entry: regex patterns (matched case-insensitively), urgency tier, weight."""

    patterns: tuple[str, ...]
    urgency: str
    weight: int


# Patterns are applied to lower-cased sentences. Keep them to wordings a radiologist would use.
FINDING_LEXICON: dict[str, FindingRule] = {
    # --- urgent: the MeSH-defined urgent set -------------------------------------------------
    "pneumothorax": FindingRule(
        (r"pneumothora(?:x|ces|xes)", r"\bptx\b"), URGENT, 4
    ),
    "pneumoperitoneum": FindingRule(
        (
            r"pneumoperitoneum",
            r"free (?:intraperitoneal |intra-abdominal |subdiaphragmatic |abdominal )?air",
            r"(?:air|gas) (?:under|beneath|below) the (?:right |left )?(?:hemi)?diaphragms?",
        ),
        URGENT,
        4,
    ),
    "pleural_effusion": FindingRule(
        (
            r"(?<!pericardial )(?<!pericardial\s)\beffusions?\b",
            r"pleural fluid",
            r"hydrothorax",
            r"hemothorax",
            r"fluid (?:with)?in the (?:right |left )?(?:minor |major |horizontal |oblique )?fissures?",
            r"layering fluid",
        ),
        URGENT,
        3,
    ),
    "pneumonia": FindingRule(
        (r"pneumonia", r"pneumonitis", r"infectious (?:process|etiology|infiltrate)"),
        URGENT,
        3,
    ),
    "consolidation": FindingRule((r"consolidat\w*",), URGENT, 3),
    "airspace_disease": FindingRule(
        (
            r"air[- ]?space (?:disease|process|filling|consolidation)",
            r"alveolar (?:process|filling|disease|consolidation)",
        ),
        URGENT,
        3,
    ),
    "pulmonary_edema": FindingRule(
        (
            r"(?<!soft tissue )(?<!subglottic )(?<!facial )(?<!extremity )\bedema\b",
            r"\bedematous\b",
            r"congest\w*",
            r"\bchf\b",
            r"cephalization",
            r"kerley",
            r"fluid overload",
            r"pulmonary venous hypertension",
            r"\bengorge\w*",
            r"vascular (?:prominence|redistribution|congestion|engorgement|indistinctness)",
            r"(?:prominen\w+|increased|indistinct) (?:of )?(?:the )?(?:\w+ )?(?:pulmonary |lung |central )?"
            r"(?:vascularity|vasculature|vascular markings|vascular margination|vessels)",
            r"(?:vascularity|vasculature|vessels) (?:is |are )?(?:\w+ )?(?:engorged|prominent|increased|indistinct)",
        ),
        URGENT,
        3,
    ),
    "infiltrate": FindingRule((r"infiltrat\w*",), URGENT, 3),
    "mass": FindingRule(
        (
            r"\bmass(?:es)?\b(?! effect)",
            r"\bmass[- ]?like\b",
            r"\btumou?r\b",
            r"\bneoplas\w+",
            r"malignan\w+",
            r"carcinoma",
        ),
        URGENT,
        3,
    ),
    # --- significant, non-urgent -------------------------------------------------------------
    "cardiomegaly": FindingRule(
        (
            r"cardiomegaly",
            r"cardiac (?:enlargement|prominence)",
            r"enlarge\w* (?:of )?(?:the )?(?:cardiac|heart|cardiomediastinal)",
            r"(?:heart|cardiac silhouette|cardiac shadow|cardiomediastinal silhouette|cardiac size|heart size)"
            r"(?: size)? (?:is |are |appears |remains |appear |is again )?(?:\w+ ){0,2}(?:enlarged|large|prominent)",
            r"(?:heart|cardiac)[\w ]{0,30}(?:upper limits?|upper range|high end) (?:of )?normal",
            r"borderline (?:enlarged |enlargement of the |large )?(?:heart|cardiac|cardiomegaly|cardiomediastinal)",
            r"(?:heart|cardiac)[\w ]{0,25}\bborderline\b",
            r"(?:left|right) (?:atrial|ventricular) enlargement",
        ),
        SIGNIFICANT,
        2,
    ),
    "atelectasis": FindingRule(
        (r"atelecta\w+", r"volume loss", r"\bcollapsed?\b"), SIGNIFICANT, 2
    ),
    "nodule": FindingRule((r"nodul\w*",), SIGNIFICANT, 2),
    "opacity": FindingRule(
        (r"opacit\w+", r"opacified", r"\bdensit(?:y|ies)\b", r"\blucenc\w+"), SIGNIFICANT, 2
    ),
    "fracture": FindingRule(
        (r"fractur\w*", r"compression deformit\w+", r"\bfx\b"), SIGNIFICANT, 2
    ),
    "hernia": FindingRule((r"hernia\w*",), SIGNIFICANT, 2),
    "emphysema_hyperinflation": FindingRule(
        (
            r"emphysema\w*",
            r"\bcopd\b",
            r"chronic obstructive",
            r"hyper-?infla\w+",
            r"hyper-?expan\w+",
            r"hyper-?aera\w+",
            r"over-?infla\w+",
            r"over-?expan\w+",
            r"hyperluc\w+",
            r"flatten\w+",
            r"\bbull(?:a|ae|ous)\b",
            r"air trapping",
            r"(?:increased|large|high) lung volumes?",
            r"lung volumes (?:are )?(?:\w+ )?(?:increased|large|high)",
            r"increased (?:ap|anteroposterior|a-p) (?:diameter|dimension)",
        ),
        SIGNIFICANT,
        2,
    ),
    "interstitial_fibrosis": FindingRule(
        (
            r"fibros\w+",
            r"fibrotic",
            r"interstitial (?:markings?|prominence|disease|lung disease|opacit\w+|pattern|changes?|thickening|process)",
            r"(?:increased|prominent|coarse\w*|chronic|accentuated|crowded|prominence of (?:the )?)"
            r" ?(?:\w+ )?(?:interstitial|lung|bronchovascular|pulmonary|bronchial|vascular) markings",
            r"markings? (?:are|is) (?:\w+ )?(?:increased|prominent|coarse\w*|accentuated)",
            r"bronchovascular crowding",
            r"reticul\w+",
            r"bronchiectasis",
            r"honeycomb\w*",
            r"peribronchial (?:thickening|cuffing)",
            r"bronchitis",
            r"sarcoid\w*",
        ),
        SIGNIFICANT,
        2,
    ),
    "hilar_mediastinal": FindingRule(
        (
            r"(?:hilar|hila|hilum) (?:enlargement|prominence|fullness|adenopathy|lymphadenopathy)",
            r"(?:prominence|enlargement|fullness) (?:of )?(?:the )?(?:\w+ )?(?:hil\w+|mediastin\w+)",
            r"(?:prominent|enlarged|full|bulky) (?:\w+ )?(?:hil(?:a|um|ar)|pulmonary arter\w+|mediastin\w+)",
            r"(?:hil(?:a|um)|pulmonary arter\w+|mediastinum) (?:is |are |appears? )?(?:\w+ )?"
            r"(?:prominent|enlarged|widened|full)",
            r"(?:lymph)?adenopathy",
            r"mediastinal widening|widen\w+ (?:of the )?mediastinum",
            r"pulmonary (?:arterial )?hypertension",
            r"paratracheal (?:stripe|fullness|widening|prominence|soft tissue)",
        ),
        SIGNIFICANT,
        2,
    ),
    "pericardial_effusion": FindingRule((r"pericardial effusion",), SIGNIFICANT, 2),
    "cavity_cyst": FindingRule((r"cavit(?:y|ies|ary|ation)", r"\bcysts?\b", r"cystic"), SIGNIFICANT, 2),
    # --- incidental / chronic ------------------------------------------------------------------
    "low_lung_volumes": FindingRule(
        (
            r"low (?:lung|inspiratory) volumes?",
            r"(?:lung|inspiratory) volumes? (?:are |is )?(?:\w+ )?(?:low|decreased|diminished|reduced)",
            r"(?:decreased|diminished|reduced) (?:lung|inspiratory) volumes?",
            r"hypo-?infla\w+",
            r"hypo-?ventilat\w+",
            r"(?:poor|shallow|suboptimal|low) (?:inspiratory effort|inspiration|inspiratory)",
            r"crowd\w+ (?:of )?(?:the )?(?:bronchovascular|vascular|basilar)",
        ),
        INCIDENTAL,
        1,
    ),
    "granuloma_calcification": FindingRule(
        (r"granulom\w+", r"calcifi\w+", r"calcinosis", r"calcific\b"), INCIDENTAL, 1
    ),
    "scarring": FindingRule((r"\bscar(?:s|red|ring)?\b", r"cicatri\w+"), INCIDENTAL, 1),
    "degenerative_spine": FindingRule(
        (
            r"degenerat\w+",
            r"osteophyt\w+",
            r"spondylo\w+",
            r"arthrit\w+",
            r"arthropath\w+",
            r"\bdish\b",
            r"hyperostosis",
            r"enthesophyt\w+",
            r"endplate (?:changes?|sclerosis|spurring|irregularit\w+)",
            r"spurring",
            r"\bdjd\b",
        ),
        INCIDENTAL,
        1,
    ),
    "spinal_curvature": FindingRule(
        (r"scolio\w+", r"kypho\w+", r"lordo\w+", r"curvature"), INCIDENTAL, 1
    ),
    "aortic_changes": FindingRule(
        (
            r"tortu\w+",
            r"ectatic",
            r"ectasia",
            r"unfold\w+",
            r"atheroscler\w+",
            r"atheromatous",
            r"aneurysm\w*",
            r"(?:dilated|dilatation of the|enlarged|prominent) (?:\w+ )?aort\w+",
            r"aort\w+ (?:\w+ )?(?:is |are )?(?:dilated|enlarged|prominent)",
        ),
        INCIDENTAL,
        1,
    ),
    "devices": FindingRule(
        (
            r"pacemaker",
            r"\bpacer\b",
            r"\baicd\b",
            r"\bicd\b",
            r"defibrillator",
            r"catheter",
            r"\bport\b",
            r"port-a-cath|portacath|mediport",
            r"\bpicc\b",
            r"(?:central|venous|subclavian|jugular) (?:venous )?line",
            r"(?:endotracheal|\bet\b|nasogastric|\bng\b|feeding|chest|enteric|tracheostomy|\bog\b) tubes?",
            r"sternotomy",
            r"(?:sternal |surgical )?(?:wires?|sutures?|staples?)\b",
            r"\bclips?\b",
            r"\bstents?\b",
            r"prosthe\w+",
            r"hardware",
            r"fixation",
            r"\bfusion\b",
            r"valve replacement",
            r"\bcabg\b",
            r"bypass graft",
            r"\bleads?\b",
            r"arthroplasty",
            r"\bscrews?\b",
            r"\bplates?\b",
            r"\bdevices?\b",
            r"\bcoil\w*",
            r"\bfilter\b",
            r"foreign bod\w+",
            r"bullet|shrapnel|metallic|\bmetal\b",
            r"\bimplants?\b",
            r"stimulator",
            r"gastrostomy",
            r"nipple (?:ring|piercing)|piercing",
            r"\btips? (?:is |are |lie\w* |terminat\w* |project\w* |overl\w* |in |at |near |approximately )",
            r"\bshunt\b",
            r"\btubing\b",
            r"tracheostomy",
            r"\bgenerator\b",
            r"jewelry",
        ),
        INCIDENTAL,
        1,
    ),
    "pleural_thickening": FindingRule(
        (
            r"pleural (?:\w+ )?thickening",
            r"thickening of the (?:\w+ )?pleura",
            r"pleural (?:plaques?|calcification|scarring|reaction)",
            r"(?:apical|pleural) (?:cap|capping)",
            r"pleural[- ]parenchymal",
            r"pleural thickening",
        ),
        INCIDENTAL,
        1,
    ),
    "costophrenic_blunting": FindingRule((r"blunt\w*",), INCIDENTAL, 1),
    "diaphragm_elevation": FindingRule(
        (
            r"elevat\w+ (?:of )?(?:the )?(?:right |left )?(?:hemi)?diaphragm",
            r"(?:hemi)?diaphragms? (?:is |are |remains |appears )?(?:\w+ )?(?:elevated|raised|high)",
            r"(?:elevated|raised|high) (?:\w+ )?(?:hemi)?diaphragm",
            r"eventration",
            r"(?:tenting|obscur\w+) (?:of )?(?:the )?(?:\w+ )?(?:hemi)?diaphragm",
        ),
        INCIDENTAL,
        1,
    ),
    "bone_other": FindingRule(
        (
            r"osteopeni\w+",
            r"osteoporo\w+",
            r"demineraliz\w+",
            r"deformit\w+",
            r"(?:old|healed|remote) (?:\w+ )?(?:rib|clavicle|clavicular)",
            r"pectus",
            r"sclero(?:sis|tic)",
            r"\blytic\b",
            r"dislocat\w+",
            r"\bwedg\w+",
            r"loss of (?:vertebral )?(?:body )?height",
        ),
        INCIDENTAL,
        1,
    ),
    "technical_limitation": FindingRule(
        (
            r"\brotat\w+",
            r"limited (?:exam\w*|study|evaluation|view|assessment|by)",
            r"(?:exam|study|evaluation) is limited",
            r"technically limited",
            r"underpenetrat\w+",
            r"under-penetrat\w+",
            r"overpenetrat\w+",
            r"(?:motion|patient) (?:artifact|motion)",
            r"suboptimal",
        ),
        INCIDENTAL,
        1,
    ),
    "postsurgical": FindingRule(
        (
            r"post-?surgical",
            r"post-?operative",
            r"mastectom\w+",
            r"lobectom\w+",
            r"pneumonectom\w+",
            r"thoracotom\w+",
            r"cholecystectom\w+",
            r"resection",
            r"s/p\b|status post",
        ),
        INCIDENTAL,
        1,
    ),
    "other_incidental": FindingRule(
        (
            r"azygos (?:lobe|fissure)",
            r"nipple shadows?",
            r"epicardial fat",
            r"fat pad",
            r"subcutaneous (?:air|emphysema|gas)",
            r"gallstones?|cholelithiasis",
            r"thickening",
            r"\bshift\w*",
        ),
        INCIDENTAL,
        1,
    ),
}

# --- trigger phrases (lower-case regexes) ----------------------------------------------------
PSEUDO_NEGATIONS: tuple[str, ...] = (
    r"no (?:significant |appreciable |definite |interval |substantial |marked |major |real )?change",
    r"not (?:significantly |appreciably |substantially )?changed",
    r"no (?:significant |appreciable |definite |interval )?(?:increase|decrease|worsening|improvement|progression)",
    r"not (?:only|necessarily)",
    r"without (?:significant |interval |appreciable )?change",
    r"no longer than",
    r"gram[- ]negative",
    r"not (?:well|completely|entirely|fully) (?:seen|visualized|evaluated|assessed)",
    r"not (?:as )?well (?:seen|visualized)",
)

UNCERTAINTY_PRE: tuple[str, ...] = (
    r"possibl[ey]",
    r"cannot (?:be )?(?:entirely |completely |definitely )?(?:exclude|excluded|rule out|ruled out)",
    r"can ?not (?:be )?(?:entirely |completely )?(?:exclude|excluded|rule out|ruled out)",
    r"can't (?:exclude|rule out)",
    r"(?:difficult|hard) to (?:exclude|rule out)",
    r"not (?:be )?(?:entirely |completely )?(?:excluded|ruled out)",
    r"may (?:represent|reflect|be|indicate|have)",
    r"might (?:represent|reflect|be)",
    r"could (?:represent|reflect|be|indicate)",
    r"question(?:able)?(?: of)?",
    r"suspicious (?:for|of)",
    r"suspected",
    r"concern(?:ing)? for",
    r"equivocal",
    r"suggestive of",
    r"differential (?:diagnosis )?(?:includes?|considerations?)",
    r"consider(?:ed)?\b",
    r"\?",
)
UNCERTAINTY_POST: tuple[str, ...] = (
    r"(?:cannot|can ?not|can't) be (?:entirely |completely |definitely )?(?:excluded|ruled out)",
    r"(?:is|are) not (?:entirely |completely )?(?:excluded|ruled out)",
    r"(?:is|are) (?:also )?(?:possible|questioned|suspected|not excluded)",
    r"not excluded",
)
# "versus" / "vs" between alternatives hedges both sides of the clause.
UNCERTAINTY_BIDIRECTIONAL: tuple[str, ...] = (r"\bversus\b", r"\bvs\.?(?=\s)", r"\bvs\b")

NEGATION_PRE: tuple[str, ...] = (
    r"no evidence (?:of|for)",
    r"no (?:radiographic |x-?ray |definite |convincing |significant |acute |focal )*"
    r"(?:evidence|signs?|findings?) (?:of|for|to suggest)",
    r"negative for",
    r"free of",
    r"clear of",
    r"absence of",
    r"resolution of",
    r"clearing of",
    # Hypothetical context: the finding is what the exam was asked to look for, not asserted.
    r"(?:evaluation|evaluate|assessment|assess|search|check) (?:of|for)",
    r"to (?:exclude|rule out|evaluate|assess)",
    r"\bif\b",
    r"resolved",
    r"rather than",
    r"rules? out",
    r"ruled out",
    r"without",
    r"\bno\b",
    r"\bnot\b",
    r"\bnor\b",
    r"\bneither\b",
    r"\bnone\b",
    r"removal of",
    r"interval removal",
    r"no longer",
)
NEGATION_POST: tuple[str, ...] = (
    r"(?:is|are|was|were) not (?:\w+ )?"
    r"(?:seen|identified|visualized|appreciated|present|evident|demonstrated|noted|detected|apparent|visible)",
    r"not (?:\w+ )?(?:seen|identified|visualized|appreciated|demonstrated|detected|present|evident|visible)",
    r"(?:has|have) (?:\w+ )?resolved",
    r"(?:has|have) (?:\w+ )?cleared",
    r"\bcleared\b",
    r"(?:has|have) been removed",
    r"(?:is|are) (?:now )?(?:resolved|absent|gone)",
    r"\bresolved\b",
    r"\babsent\b",
    r"no longer (?:seen|visualized|identified|present|evident|visible|apparent)",
    r"(?:is|are) unlikely",
    r"\bunlikely\b",
    r"(?:is|are|appears?) within (?:the )?(?:normal limits|limits of normal)",
)

SCOPE_TERMINATORS: tuple[str, ...] = (
    r"\bbut\b",
    r"\bhowever\b",
    r"\balthough\b",
    r"\bthough\b",
    r"\bwhich\b",
    r"\bexcept\b",
    r"\baside from\b",
    r"\bapart from\b",
    r"\bother than\b",
    r"\bwhereas\b",
    r"\bwhile\b",
    r";",
    r"\band (?:there|the|a|an)\b",
    r",\s*(?:there (?:is|are)|with)\b",
    r"\bwith (?:the )?exception of\b",
)

SEVERITY_MODIFIERS = re.compile(r"\b(?:large|massive|tension|severe|extensive|diffuse|multifocal)\b")


@dataclass(frozen=True)
class Finding:
    """One finding mention in one sentence.

    Attributes:
        name: Lexicon key (see ``FINDING_LEXICON``).
        sentence: The sentence it was found in, as written in the report.
        status: ``"present"``, ``"negated"`` or ``"uncertain"``.
        urgency: Tier of the finding: ``"urgent"``, ``"significant"`` or ``"incidental"``.
        hedge: For uncertain findings, the uncertainty trigger that applied (e.g. "versus",
            "may represent"); empty otherwise.
    """

    name: str
    sentence: str
    status: str
    urgency: str
    hedge: str = ""


@dataclass(frozen=True)
class ReportScore:
    """Scores for one report.

    Attributes:
        urgent: 1 if an urgent-tier finding is present or uncertain, else 0.
        abnormal: 1 if any finding is present or uncertain, else 0.
        complexity: 1 (normal) to 5 (critical), see the module docstring.
        findings: Every finding mention, in report order.
        rationale: A short human-readable explanation of the labels.
    """

    urgent: int
    abnormal: int
    complexity: int
    findings: tuple[Finding, ...]
    rationale: str


def _compile(patterns: Iterable[str]) -> re.Pattern:
    return re.compile("|".join(f"(?:{p})" for p in patterns))


# The lexicon's urgent tier is the label policy's urgent set, nothing more and nothing less.
_LEXICON_URGENT = {name for name, rule in FINDING_LEXICON.items() if rule.urgency == URGENT}
if _LEXICON_URGENT != URGENT_FINDINGS:  # pragma: no cover - guards edits of the lexicon or the policy
    raise RuntimeError(
        f"FINDING_LEXICON's urgent tier {sorted(_LEXICON_URGENT)} differs from qdistill_hf.labels.policy."
        f"URGENT_FINDINGS {sorted(URGENT_FINDINGS)}"
    )

_FINDING_RES = {name: _compile(rule.patterns) for name, rule in FINDING_LEXICON.items()}
_PSEUDO_RE = _compile(PSEUDO_NEGATIONS)
_UNC_PRE_RE = _compile(UNCERTAINTY_PRE)
_UNC_POST_RE = _compile(UNCERTAINTY_POST)
_UNC_BI_RE = _compile(UNCERTAINTY_BIDIRECTIONAL)
_NEG_PRE_RE = _compile(NEGATION_PRE)
_NEG_POST_RE = _compile(NEGATION_POST)
_TERMINATOR_RE = _compile(SCOPE_TERMINATORS)
# Sentence ends: ". " / "? " / "! " / newlines, a full stop glued to a capitalised word
# ("apex.There"), and numbered list items ("1. ", "2) "). Decimals ("2.5 cm") are not split.
_SENTENCE_SPLIT_RE = re.compile(r"(?<=[.!?])\s+|\n+|(?<=[a-z]\.)(?=[A-Z])|(?:^|\s)\d{1,2}[.)]\s+(?=[A-Za-z])")
_SECTION_HEADER_RE = re.compile(r"^\s*(?:findings|impression|comparison|indication|conclusion)\s*:\s*", re.I)


def split_sentences(text: str) -> list[str]:
    """Split report text into sentences.

    Args:
        text: Report text.

    Returns:
        Non-empty stripped sentences with section headers ("FINDINGS:", "IMPRESSION:") removed.
    """
    sentences = []
    for piece in _SENTENCE_SPLIT_RE.split(text):
        piece = _SECTION_HEADER_RE.sub("", piece).strip()
        if piece and re.search(r"[A-Za-z]", piece):
            sentences.append(piece)
    return sentences


def _mask(text: str, spans: Sequence[tuple[int, int]]) -> str:
    chars = list(text)
    for start, end in spans:
        for i in range(start, end):
            chars[i] = " "
    return "".join(chars)


def _clause_bounds(text: str) -> list[tuple[int, int]]:
    bounds = []
    start = 0
    for m in _TERMINATOR_RE.finditer(text):
        bounds.append((start, m.start()))
        start = m.end()
    bounds.append((start, len(text)))
    return bounds


def _clause_of(pos: int, clauses: Sequence[tuple[int, int]]) -> tuple[int, int]:
    for start, end in clauses:
        if start <= pos <= end:
            return start, end
    return clauses[-1]


_POST_WINDOW_WORDS = 8
_WORD_RE = re.compile(r"\S+")


def _window_start(text: str, clause_start: int, trigger_start: int) -> int:
    """Start of the post-trigger window: at most ``_POST_WINDOW_WORDS`` words before the trigger."""
    starts = [m.start() for m in _WORD_RE.finditer(text, clause_start, trigger_start)]
    if len(starts) > _POST_WINDOW_WORDS:
        return starts[-_POST_WINDOW_WORDS]
    return clause_start


def _scopes(text: str, clauses, pre_re, post_re, bi_re=None) -> tuple[list, list]:
    """Return (scopes, trigger_spans); each scope is (start, end, trigger text).

    Pre-triggers reach to the end of their clause (radiology lists such as "no pneumothorax,
    effusion, or focal consolidation" are long); post-triggers reach back to the clause start but
    at most ``_POST_WINDOW_WORDS`` words, so "Cardiomegaly, ... pneumothorax has resolved" keeps
    the cardiomegaly; bidirectional triggers ("versus") cover their whole clause.
    """
    scopes, triggers = [], []
    for m in pre_re.finditer(text):
        _, cend = _clause_of(m.start(), clauses)
        scopes.append((m.end(), cend, m.group(0).strip()))
        triggers.append(m.span())
    for m in post_re.finditer(text):
        cstart, _ = _clause_of(m.start(), clauses)
        scopes.append((_window_start(text, cstart, m.start()), m.start(), m.group(0).strip()))
        triggers.append(m.span())
    if bi_re is not None:
        for m in bi_re.finditer(text):
            cstart, cend = _clause_of(m.start(), clauses)
            scopes.append((cstart, cend, m.group(0).strip()))
            triggers.append(m.span())
    return scopes, triggers


def _overlapping(span: tuple[int, int], scopes) -> list[str]:
    return [trigger for s, e, trigger in scopes if span[1] > s and span[0] < e]


# Radiology reports are highly templated ("No pneumothorax or pleural effusion."), so caching per
# sentence removes most of the regex work on a corpus. Findings are frozen, so sharing is safe.
@functools.lru_cache(maxsize=65536)
def _sentence_findings(sentence: str) -> tuple[Finding, ...]:
    text = sentence.lower()
    clauses = _clause_bounds(text)
    pseudo = [m.span() for m in _PSEUDO_RE.finditer(text)]
    masked = _mask(text, pseudo)
    unc_scopes, unc_triggers = _scopes(masked, clauses, _UNC_PRE_RE, _UNC_POST_RE, _UNC_BI_RE)
    # Uncertainty phrases such as "not excluded" contain negation words; hide them first.
    neg_text = _mask(masked, unc_triggers)
    neg_scopes, _ = _scopes(neg_text, clauses, _NEG_PRE_RE, _NEG_POST_RE)

    rank = {NEGATED: 0, UNCERTAIN: 1, PRESENT: 2}
    best: dict[str, tuple[int, str, str]] = {}
    for name, regex in _FINDING_RES.items():
        for m in regex.finditer(text):
            hedges = _overlapping(m.span(), unc_scopes)
            if hedges:
                # A differential hedge ("a versus b") is the strongest hedge; report it if present.
                status, hedge = UNCERTAIN, next((h for h in hedges if _UNC_BI_RE.fullmatch(h)), hedges[0])
            elif _overlapping(m.span(), neg_scopes):
                status, hedge = NEGATED, ""
            else:
                status, hedge = PRESENT, ""
            prev = best.get(name)
            if prev is None or rank[status] > rank[prev[1]]:
                best[name] = (m.start() if prev is None else prev[0], status, hedge)
    ordered = sorted(best.items(), key=lambda kv: kv[1][0])
    return tuple(
        Finding(name, sentence, status, FINDING_LEXICON[name].urgency, hedge)
        for name, (_, status, hedge) in ordered
    )


def _is_differential(finding: Finding) -> bool:
    return finding.status == UNCERTAIN and bool(_UNC_BI_RE.fullmatch(finding.hedge))


def _counts_as_urgent(finding: Finding, policy: str) -> bool:
    if finding.urgency != URGENT or finding.status == NEGATED:
        return False
    if finding.status == PRESENT or policy == "all":
        return True
    return policy == "differential" and _is_differential(finding)


def _effective_weight(finding: Finding, policy: str) -> int:
    weight = FINDING_LEXICON[finding.name].weight
    if finding.status == UNCERTAIN and not _counts_as_urgent(finding, policy):
        return max(weight - 1, 1)
    if finding.urgency == URGENT and SEVERITY_MODIFIERS.search(finding.sentence.lower()):
        return max(weight, 4)
    return weight


UNCERTAIN_POLICIES = ("differential", "all", "none")


def score_report(text: str, *, uncertain_urgent: str = "differential") -> ReportScore:
    """Score one radiology report.

    Args:
        text: The report (findings and/or impression). "XXXX" de-identification tokens are
            treated as ordinary words.
        uncertain_urgent: How uncertain urgent findings count towards ``urgent``:
            ``"differential"`` (default) counts them only when hedged as a two-way differential
            ("atelectasis versus infiltrate"); ``"all"`` counts every hedged mention ("possible",
            "cannot exclude", ...); ``"none"`` counts only present findings.

    Returns:
        A ``ReportScore`` with ``urgent``, ``abnormal``, ``complexity``, the extracted findings
        and a rationale.

    Raises:
        TypeError: If ``text`` is not a ``str``.
        ValueError: If ``text`` is empty or only whitespace, or ``uncertain_urgent`` is unknown.
    """
    if not isinstance(text, str):
        raise TypeError(f"score_report expects the report text as str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("score_report got an empty report text (empty or whitespace only)")
    if uncertain_urgent not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain_urgent must be one of {UNCERTAIN_POLICIES}, got {uncertain_urgent!r}")

    findings: list[Finding] = []
    for sentence in split_sentences(text):
        findings.extend(_sentence_findings(sentence))

    positive = [f for f in findings if f.status != NEGATED]
    urgent_hits = [f for f in positive if _counts_as_urgent(f, uncertain_urgent)]
    urgent = int(bool(urgent_hits))
    abnormal = int(bool(positive))
    if positive:
        max_weight = max(_effective_weight(f, uncertain_urgent) for f in positive)
        distinct_urgent = {f.name for f in positive if f.urgency == URGENT and f.status == PRESENT}
        if len(distinct_urgent) >= 3:
            max_weight = max(max_weight, 4)
        complexity = 1 + max_weight
        names: list[str] = []
        for f in positive:
            label = f.name if f.status == PRESENT else f"{f.name} (uncertain: {f.hedge})"
            if label not in names:
                names.append(label)
        urgent_names = sorted({f.name for f in urgent_hits})
        rationale = (
            ("urgent (" + ", ".join(urgent_names) + ")" if urgent else "non-urgent")
            + f"; findings: {', '.join(names)}; complexity {complexity}"
        )
    else:
        complexity = 1
        negated = sorted({f.name for f in findings})
        rationale = "normal: no positive finding" + (f" (negated: {', '.join(negated)})" if negated else "")
    return ReportScore(urgent, abnormal, complexity, tuple(findings), rationale)


# --- evaluation -------------------------------------------------------------------------------


def binary_metrics(y_true: Sequence[int], y_pred: Sequence[int]) -> dict:
    """Confusion matrix and summary metrics for binary labels (positive class = 1).

    Args:
        y_true: Reference labels, each 0 or 1.
        y_pred: Predicted labels, each 0 or 1, same length.

    Returns:
        Dict with ``tp``, ``fp``, ``tn``, ``fn``, ``n``, ``accuracy``, ``sensitivity``,
        ``specificity``, ``precision``, ``f1`` and ``balanced_accuracy``. A ratio whose
        denominator is zero is reported as ``float('nan')``.

    Raises:
        ValueError: If the lengths differ, the input is empty, or a label is not 0/1.
    """
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} labels but y_pred has {len(y_pred)}")
    if not y_true:
        raise ValueError("binary_metrics got no labels")
    for i, (t, p) in enumerate(zip(y_true, y_pred)):
        if t not in (0, 1) or p not in (0, 1):
            raise ValueError(f"labels must be 0 or 1; row {i} has y_true={t!r}, y_pred={p!r}")
    tp = sum(1 for t, p in zip(y_true, y_pred) if t == 1 and p == 1)
    fp = sum(1 for t, p in zip(y_true, y_pred) if t == 0 and p == 1)
    tn = sum(1 for t, p in zip(y_true, y_pred) if t == 0 and p == 0)
    fn = sum(1 for t, p in zip(y_true, y_pred) if t == 1 and p == 0)

    def ratio(a: int, b: int) -> float:
        return a / b if b else float("nan")

    sens = ratio(tp, tp + fn)
    spec = ratio(tn, tn + fp)
    prec = ratio(tp, tp + fp)
    f1 = ratio(2 * tp, 2 * tp + fp + fn)
    return {
        "n": len(y_true),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "accuracy": (tp + tn) / len(y_true),
        "sensitivity": sens,
        "specificity": spec,
        "precision": prec,
        "f1": f1,
        "balanced_accuracy": (sens + spec) / 2,
    }


def evaluate_scorer(records: Iterable[Mapping], labels: Sequence[str] = ("urgent", "abnormal")) -> dict:
    """Score reports and compare with reference labels.

    Args:
        records: Mappings with a ``report`` string and a 0/1 value for each name in ``labels``
            (e.g. rows of ``iu_reports_dev.jsonl``). An optional ``study_id`` is used in error
            messages and in the returned predictions.
        labels: Label fields to evaluate; each must be an attribute of ``ReportScore``.

    Returns:
        Dict mapping each label name to ``binary_metrics`` output, plus ``"predictions"``: a
        list of ``(study_id, ReportScore)`` in input order.

    Raises:
        ValueError: If a record lacks a field or has a non-0/1 label (message names the row).
    """
    truths: dict[str, list[int]] = {label: [] for label in labels}
    preds: dict[str, list[int]] = {label: [] for label in labels}
    predictions = []
    for row, record in enumerate(records):
        study_id = record.get("study_id", f"row {row}")
        if "report" not in record:
            raise ValueError(f"record {row} ({study_id}) has no 'report' field")
        report = record["report"]
        if not isinstance(report, str) or not report.strip():
            raise ValueError(f"record {row} ({study_id}) field 'report' is empty or not a string")
        score = score_report(report)
        predictions.append((study_id, score))
        for label in labels:
            if label not in record:
                raise ValueError(f"record {row} ({study_id}) has no '{label}' field")
            value = record[label]
            if value not in (0, 1):
                raise ValueError(f"record {row} ({study_id}) field '{label}' must be 0 or 1, got {value!r}")
            truths[label].append(int(value))
            preds[label].append(int(getattr(score, label)))
    if not predictions:
        raise ValueError("evaluate_scorer got no records")
    result: dict = {label: binary_metrics(truths[label], preds[label]) for label in labels}
    result["predictions"] = predictions
    return result


__all__ = [
    "FINDING_LEXICON",
    "UNCERTAIN_POLICIES",
    "Finding",
    "FindingRule",
    "ReportScore",
    "binary_metrics",
    "evaluate_scorer",
    "score_report",
    "split_sentences",
]
