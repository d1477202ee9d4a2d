"""The one definition of Q-DISTILL's triage label: which findings make a chest film *urgent*.

Every labeller follows it: the rule-based report scorer (its lexicon's urgent tier must equal this set; checked at
import), the IU X-ray MeSH labels of the data builder, and the synthetic films. Change it here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Iterable


LABEL_NAMES = ("non_urgent", "urgent")

# Findings that make a film urgent (class 1); everything else, normal films included, is non-urgent (class 0).
# This is the IU human-annotation rule of the shared development data (a MeSH major term naming one of these).
URGENT_FINDINGS = frozenset(
    {
        "pneumothorax",
        "pneumoperitoneum",
        "pleural_effusion",
        "pneumonia",
        "consolidation",
        "airspace_disease",
        "pulmonary_edema",
        "infiltrate",
        "mass",
    }
)

# How IU MeSH major terms spell those findings (matched case-insensitively as substrings of a term).
MESH_TERMS = {
    "pneumothorax": ("pneumothorax",),
    "pneumoperitoneum": ("pneumoperitoneum",),
    "pleural_effusion": ("pleural effusion",),
    "pneumonia": ("pneumonia",),
    "consolidation": ("consolidation",),
    "airspace_disease": ("airspace disease",),
    "pulmonary_edema": ("pulmonary edema", "pulmonary congestion"),
    "infiltrate": ("infiltrate",),
    "mass": ("mass",),
}
if set(MESH_TERMS) != URGENT_FINDINGS:  # pragma: no cover - guards edits of this file
    raise RuntimeError("MESH_TERMS must spell exactly the URGENT_FINDINGS")


def is_urgent(findings: Iterable[str]) -> int:
    """1 when any of `findings` (canonical names such as `"pleural_effusion"`) is in `URGENT_FINDINGS`, else 0."""
    return int(any(finding in URGENT_FINDINGS for finding in findings))


def urgent_from_mesh(mesh_major: Iterable[str]) -> int:
    """1 when an IU MeSH major term (e.g. `"Pleural Effusion/right/small"`) names an urgent finding, else 0."""
    terms = [term.lower() for term in mesh_major]
    return int(any(spelling in term for term in terms for spellings in MESH_TERMS.values() for spelling in spellings))


__all__ = ["LABEL_NAMES", "URGENT_FINDINGS", "MESH_TERMS", "is_urgent", "urgent_from_mesh"]
