"""What happens to each attribute: the PS3.15 Annex E table (`data/ps315_e1.csv`), the keep
list for attributes the table does not name (`data/keep_list.csv`, docs/pseudonymization.md),
and deny by default for everything else.

Actions: X remove, Z empty, D dummy, U new UID, K keep, C clean (text: identifying values
removed; dates: shifted). A kept text is cleaned too: what the instance identifies never
stays in it, whatever the option that keeps it.

For attributes the table does not list:
- a tag the data dictionary does not know (also: sent as UN, or in implicit VR) is removed;
- a person name (PN) is replaced by a dummy;
- other text (LO, SH, ST, LT, UT, UC, UR, AE) is removed unless the keep list names it:
  "technical" attributes (codes, manufacturer and model, kernels, coil names, LUT and window
  explanations ...) are kept and cleaned; "descriptor" attributes (SR text, annotations,
  segment descriptions ...) are cleaned under the Clean Descriptors Option and removed
  without it;
- dates and times (DA, DT, TM) follow the `dates` option: shifted (times kept), kept, or
  removed;
- numbers, codes (CS), ages, UIDs (replaced), binary values and sequences (their items get the
  same rules) are kept; a number (DS, IS) or date that holds text, or a kept code or number
  equal to an identifying value, is removed.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

from adit_tasks.core.raw import PIXEL_TAGS, TEXT_VRS

DateHandling = Literal["shift", "keep", "remove"]
Action = Literal["X", "Z", "D", "U", "K", "C"]
Kind = Literal["name", "id", "date", "uid"]
_DATA = Path(__file__).parent / "data"
DEFAULT_TRIAL_SPONSOR = "ADIT"


@dataclass(frozen=True)
class PseudonymizationOptions:
    """The PS3.15 options a transfer asks for. Defaults: dates shifted, descriptors cleaned."""

    dates: DateHandling = "shift"
    retain_patient_characteristics: bool = False
    retain_device_identity: bool = False
    clean_descriptors: bool = True
    safe_private_creators: frozenset[str] = frozenset()
    allow_burned_in: bool = False
    trial_protocol_id: str = ""
    trial_protocol_name: str = ""
    trial_sponsor: str = DEFAULT_TRIAL_SPONSOR


@dataclass(frozen=True)
class _Rule:
    basic: str
    options: dict[str, str]


@cache
def profile_table() -> tuple[dict[int, _Rule], list[tuple[int, int, _Rule]]]:
    """Exact-tag rules and masked rules (e.g. (50xx,xxxx)) from the shipped PS3.15 table."""
    exact: dict[int, _Rule] = {}
    masked: list[tuple[int, int, _Rule]] = []
    text = (_DATA / "ps315_e1.csv").read_text("utf-8")
    for row in csv.DictReader(io.StringIO(text)):
        if "GGGG" in row["tag"]:
            continue  # "private attributes": handled by the private-tag rule, not by tag
        rule = _Rule(row["basic_profile_action"], {
            key: row[key] for key in row if key.endswith("_opt") and row[key]})
        group, element = row["tag"].strip("()\"").split(",")
        tag_hex = (group + element).upper()
        if "X" in tag_hex:
            mask = int("".join("0" if c == "X" else "F" for c in tag_hex), 16)
            value = int(tag_hex.replace("X", "0"), 16)
            masked.append((mask, value, rule))
        else:
            exact[int(tag_hex, 16)] = rule
    return exact, masked


@cache
def keep_list() -> dict[int, str]:
    """Attributes the table does not list that are kept (cleaned): tag -> 'technical' or
    'descriptor'."""
    text = (_DATA / "keep_list.csv").read_text("utf-8")
    return {int(row["tag"].strip("()\"").replace(",", ""), 16): row["kind"]
            for row in csv.DictReader(io.StringIO(text))}


def rule_for(tag: int) -> _Rule | None:
    exact, masked = profile_table()
    rule = exact.get(tag)
    if rule is not None:
        return rule
    for mask, value, masked_rule in masked:
        if tag & mask == value:
            return masked_rule
    return None


def _choose(action: str) -> str:
    """One action from a choice such as X/Z/D: keep the element present where allowed."""
    choices = action.replace("*", "").split("/")
    for preferred in ("U", "D", "Z", "K", "C", "X"):
        if preferred in choices:
            return preferred
    return "X"


# CID 7050 De-identification Method (PS3.16).
CODES = {
    "basic": ("113100", "Basic Application Confidentiality Profile"),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
    "full_dates": ("113106", "Retain Longitudinal Temporal Information Full Dates Option"),
    "modified_dates": ("113107",
                       "Retain Longitudinal Temporal Information Modified Dates Option"),
    "patient_characteristics": ("113108", "Retain Patient Characteristics Option"),
    "device_identity": ("113109", "Retain Device Identity Option"),
    "safe_private": ("113111", "Retain Safe Private Option"),
}

# Option column of the PS3.15 table -> its CID 7050 code (None: no column of its own).
_OPTION_CODES: dict[str | None, str] = {
    "clean_desc_opt": "clean_descriptors",
    "rtn_long_full_dates_opt": "full_dates",
    "rtn_long_modif_dates_opt": "modified_dates",
    "rtn_pat_chars_opt": "patient_characteristics",
    "rtn_dev_id_opt": "device_identity",
    None: "safe_private",
}

# Attributes the table removes whose values describe the patient or the trial rather than
# identify anyone: never search terms ("White" would leave "white matter" as "matter").
_NOT_IDENTIFIERS = frozenset({
    0x00080201,  # TimezoneOffsetFromUTC
    0x00101080, 0x00101081,  # MilitaryRank, BranchOfService
    0x00102150, 0x00102160, 0x001021F0,  # CountryOfResidence, EthnicGroup, Religion
    0x00380050, 0x00400012, 0x00401004,  # SpecialNeeds, PreMedication, TransportArrangements
    0x00403001,  # ConfidentialityConstraintOnPatientDataDescription
    0x00120010, 0x00120020, 0x00120021, 0x00120022,  # trial sponsor, protocol (and issuer)
    0x00120050, 0x00120055, 0x00120071, 0x00120073,  # trial time point, series
    0x00203406, 0x20300020, 0x00880904, 0x00880906, 0x00880912,  # descriptions, topics
})
# Addresses are identifiers although their VR is ST.
_ADDRESSES = frozenset({0x00080081, 0x00080092, 0x00401102, 0x0040A353})
PATIENT_BIRTH_DATE = 0x00100030


class Rules:
    """The action for each attribute under a set of options, and which attributes hold
    identifying values (the search terms of `scrub.py`)."""

    def __init__(self, options: PseudonymizationOptions) -> None:
        self.options = options
        self.active = self._active_options()
        self._columns = [column for column, _ in self.active if column]
        self._actions: dict[tuple[int, str | None], tuple[Action, bool]] = {}
        self._kinds: dict[tuple[int, str | None], Kind | None] = {}

    def _active_options(self) -> list[tuple[str | None, str]]:
        """(table column, CID 7050 code key) of every option in use."""
        o = self.options
        active = {
            "clean_desc_opt": o.clean_descriptors,
            "rtn_long_full_dates_opt": o.dates == "keep",
            "rtn_long_modif_dates_opt": o.dates == "shift",
            "rtn_pat_chars_opt": o.retain_patient_characteristics,
            "rtn_dev_id_opt": o.retain_device_identity,
            None: bool(o.safe_private_creators),  # handled by the private-tag rule
        }
        return [(column, code) for column, code in _OPTION_CODES.items() if active[column]]

    def method_codes(self) -> list[tuple[str, str]]:
        """(CodeValue, CodeMeaning) of CID 7050 for what these options apply, the basic
        profile first: the DeidentificationMethodCodeSequence, and the manifest's header."""
        return [CODES[key] for key in ["basic"] + [code for _, code in self.active]]

    def action(self, tag: int, vr: str | None) -> tuple[Action, bool]:
        """(action, listed): what happens to a public element, and whether the table lists
        it. `vr` None: a tag the dictionary does not know."""
        key = (tag, vr)
        cached = self._actions.get(key)
        if cached is None:
            cached = self._actions[key] = self._resolve(tag, vr)
        return cached

    def _resolve(self, tag: int, vr: str | None) -> tuple[Action, bool]:
        if vr is None or tag & 0xFFFF == 0:
            return "X", False  # unknown public tag; group length (wrong once values change)
        if tag in PIXEL_TAGS:
            return "K", False
        rule = rule_for(tag)
        if rule is None:
            action, listed = self._unlisted(tag, vr), False
        else:
            columns = self._columns
            if vr in ("DA", "DT") and self.options.dates != "keep":
                # Only the date options decide about dates: retaining device identity must
                # not bring back real calibration dates when dates are shifted or removed.
                columns = [c for c in columns if "dates" in c]
            actions = {rule.options[c] for c in columns if c in rule.options}
            # When two options disagree the cleaner action wins.
            action = next((a for a in ("C", "K") if a in actions), _choose(rule.basic))
            listed = True
        if vr == "UI" and action not in ("X", "Z") and not (listed and action == "K"):
            action = "U"  # every UID is replaced unless an option keeps it (device UIDs)
        return action, listed  # type: ignore[return-value]

    def _unlisted(self, tag: int, vr: str) -> str:
        if vr in ("DA", "DT", "TM"):
            return {"shift": "C", "keep": "K", "remove": "X"}[self.options.dates]
        if vr == "PN":
            return "D"
        if vr in TEXT_VRS:
            kind = keep_list().get(tag)
            if kind == "technical":
                return "K"
            if kind == "descriptor":
                return "C" if self.options.clean_descriptors else "X"
            return "X"
        return "K"

    def kind(self, tag: int, vr: str | None) -> Kind | None:
        """Which kind of identifying value an attribute holds, if any (module docstring of
        `scrub.py`)."""
        key = (tag, vr)
        if key not in self._kinds:
            self._kinds[key] = self._resolve_kind(tag, vr)
        return self._kinds[key]

    def _resolve_kind(self, tag: int, vr: str | None) -> Kind | None:
        if vr is None:
            return None
        action, _ = self.action(tag, vr)
        if vr == "PN":
            return "name"
        if vr in ("DA", "DT"):
            return "date" if action != "K" or tag == PATIENT_BIRTH_DATE else None
        if vr == "UI":
            return "uid" if action == "U" else None
        if vr in ("LO", "SH", "AE") or tag in _ADDRESSES:
            rule = rule_for(tag)
            if (rule is not None and action in ("X", "Z", "D") and tag not in _NOT_IDENTIFIERS
                    and "clean_desc_opt" not in rule.options):
                return "id"
        return None
