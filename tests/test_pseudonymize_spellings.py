"""Identifying values in every spelling (`scrub.py`): which values become search terms, what
they match, and what they leave alone."""

from __future__ import annotations

import re

import pytest

from adit_tasks.core.scrub import Collector, Terms, date_patterns, fold, scrub


def _pattern(*, names=(), ids=(), dates=()) -> re.Pattern[str]:
    c = Collector()
    for n in names:
        c.add_name(n)
    for i in ids:
        c.add_id(i)
    for d in dates:
        c.add_date(d)
    pattern = c.terms().precise
    assert pattern is not None
    return pattern


def test_fold_removes_case_and_diacritics_and_spells_out_letters_without_them():
    assert fold("GRÖSSMANN Größmann Dvořák Søren Łukasz Æsa") == \
        "grossmann grossmann dvorak soren lukasz aesa"
    assert fold("ＬＩ ＷＵ") == "li wu"  # full-width letters


def test_name_parts_prefix_suffix_and_particles():
    c = Collector()
    c.add_name("Größmann^Jörg Günther^^Dr. med.^Jr.")
    c.add_name("von Weizsäcker^Richard")
    c.add_name("Le^Van^Thanh")
    names = c.terms().names
    assert {"grossmann", "groessmann", "jorg", "joerg", "gunther", "guenther"} <= names
    assert {"weizsacker", "weizsaecker", "richard", "le", "van", "thanh"} <= names
    assert not {"dr", "med", "jr", "von"} & names  # prefix, suffix; particle next to a name


@pytest.mark.parametrize(("text", "cleaned"), [
    ("Herr Klein kam", "Herr kam"),
    ("ein kleiner Herd", "ein kleiner Herd"),  # a short name part is a word
    ("Kleins Befund", "Befund"),  # with its genitive
    ("Li-Wu Lipid", "- Lipid"),
    ("GröGrößmannßmann Thorax", "Thorax"),  # a long part matches anywhere, repeatedly
    ("GROESSMANN", ""),
])
def test_short_parts_match_as_words_long_ones_anywhere(text, cleaned):
    pattern = _pattern(names=["Klein^Li", "Wu^Bo", "Größmann^Jörg"])
    assert scrub(text, pattern) == cleaned


SPELLINGS = ["19621107", "07111962", "7.11.1962", "07.11.1962", "07-11-1962", "7/11/1962",
             "1962.11.07", "1962-11-7", "1962/11/07", "11/07/62", "11/7/1962", "07.11.62",
             "7 Nov 1962", "7. November 1962", "07-Nov-1962", "Nov 7, 1962",
             "November 7th, 1962", "7 nov. 62"]
NEIGHBOURS = ["17.11.1962", "7.11.19621", "27.11.1962", "7.11.1963", "1962.11.071",
              "119621107", "7 Novelle 1962", "8 Nov 1962"]


@pytest.mark.parametrize("text", SPELLINGS)
def test_every_spelling_of_a_date_matches(text):
    assert _pattern(dates=["19621107"]).search(fold(f"geb. {text}."))


@pytest.mark.parametrize("text", NEIGHBOURS)
def test_a_neighbouring_date_or_number_does_not_match(text):
    assert not _pattern(dates=["19621107"]).search(fold(text))


def test_german_month_names_and_a_date_time_value():
    pattern = _pattern(dates=["20240318101500"])
    for text in ("18. März 2024", "18. Maerz 2024", "März 18, 2024", "18 Mrz 2024"):
        assert pattern.search(fold(text)), text


def test_identifiers_with_and_without_separators_and_their_number():
    pattern = _pattern(ids=["KV-778-899-1", "AB12", "KV778899"])
    for text in ("KV 778 899 1", "kv7788991", "KV.778.899.1", "Nr. AB12", "Vers. 778899"):
        assert pattern.search(fold(text)), text
    for text in ("AB123", "XAB12", "7788990"):  # short IDs are words; numbers not longer ones
        assert not pattern.search(fold(text)), text


def test_only_multi_word_identifiers_give_words_and_only_long_numbers():
    c = Collector()
    c.add_id("Im Neuenheimer Feld 672, 69120 Heidelberg")
    c.add_id("CTHD03")
    c.add_id("000000")
    assert {"neuenheimer", "69120", "heidelberg", "cthd03"} <= c.terms().ids
    assert not {"feld", "672", "im", "000000"} & c.terms().ids


def test_dates_in_uids_are_not_cut_and_uids_in_text_are_mapped():
    pattern = _pattern(dates=["20240318"])
    text = "siehe 1.2.826.0.1.3680043.8.498.20240318.1 vom 18.3.2024"
    assert scrub(text, pattern, lambda uid: "2.25.42") == "siehe 2.25.42 vom"
    assert scrub("Version 1.2.3", pattern, lambda uid: "2.25.42") == "Version 1.2.3"


def test_text_without_a_match_is_left_exactly_as_it_is():
    text = "Befund:\r\n\r\n   Kein Anhalt  für Malignität.  "
    assert scrub(text, _pattern(names=["Wu^Li"])) == text
    assert scrub("Befund:\r\nLi Wu, kein Anhalt", _pattern(names=["Wu^Li"])) == \
        "Befund:\r\n, kein Anhalt"


def test_terms_are_compiled_once_and_identically():
    a = Terms(frozenset({"grossmann", "li"}), frozenset({"pid12345"}), frozenset({"19621107"}))
    b = Terms(frozenset({"li", "grossmann"}), frozenset({"pid12345"}), frozenset({"19621107"}))
    assert a.precise is b.precise
    assert a.loose is b.loose


def test_names_in_scripts_without_spaces_match_inside_text():
    pattern = _pattern(names=["Li^Xiaolong=李^小龙=り^しゃおろん"])
    for text in ("患者李小龙", "小龙李的", "しゃおろんさん"):
        assert pattern.search(fold(text)), text


def test_dates_of_one_patient_give_the_same_pattern_in_every_order():
    assert date_patterns("19621107") == date_patterns("19621107")
    c, d = Collector(), Collector()
    c.add_date("19621107\\20240318")
    d.add_date("20240318")
    d.add_date("19621107")
    assert c.terms() == d.terms()
