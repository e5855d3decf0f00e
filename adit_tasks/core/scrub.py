"""Identifying values in every spelling: what the cleaner removes from text, and what the leak
check (`verify.py`) looks for in the bytes that leave.

Only identifying values become search terms (a value that identifies nothing, such as a
private creator "ACME 1.0", must never make the cleaner cut "1.0" out of "1962.11.07"):

- names: every part of every person name (PN) of the instance, of any length from two
  letters on ("Li", "Wu", "Ng"), except its prefix and suffix ("Dr.", "Jr.") and particles
  such as "von" or "de" next to a longer part; for scripts written without spaces (Chinese,
  Japanese, Korean, Thai) also the whole name in both orders ("李小龙", "小龙李");
- identifiers: the values of the attributes PS3.15 removes or replaces because they identify
  someone or something (IDs, accession numbers, institution, address, station, serial
  number), but not the patient's characteristics or the descriptions it cleans;
- dates: every date the profile removes or shifts (always the birth date), in the spellings
  people write: 19621107, 7.11.1962, 07-11-1962, 1962.11.07, 11/07/62, 7 Nov 1962,
  Nov 7, 1962, 7. November 1962 (English and German month names).

Matching is case- and diacritics-insensitive ("GRÖSSMANN", "Groessmann" and "Grossmann" all
match Größmann). Parts of names shorter than seven letters, and identifiers shorter than six
characters, match as whole words only (so the patient "Klein" is removed from "Herr Klein"
but not from "kleiner Herd"; a genitive "s" is part of the word); longer ones match anywhere.
A single letter (an initial) is never a search term: "A" would take every article with it.

The limit: a name that appears nowhere in the instance's attributes cannot be recognised in
text.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

# Letters that do not decompose into a base letter and a mark.
_FOLD = str.maketrans({"ø": "o", "Ø": "o", "đ": "d", "Đ": "d", "ð": "d", "Ð": "d",
                       "ł": "l", "Ł": "l", "æ": "ae", "Æ": "ae", "œ": "oe", "Œ": "oe",
                       "þ": "th", "Þ": "th", "ı": "i", "ß": "ss", "ẞ": "ss", "’": "'",
                       "ʼ": "'", "`": "'"})
_FOLD_MAP = {chr(c): v for c, v in _FOLD.items()}
_UNDECOMPOSED = re.compile("[" + "".join(_FOLD_MAP) + "]")
_MARKS = re.compile("[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f]")
_GERMAN = str.maketrans({"ä": "ae", "ö": "oe", "ü": "ue", "Ä": "Ae", "Ö": "Oe", "Ü": "Ue"})
_LETTER = r"[^\W\d_]"
_WORD = r"[^\W_]"
_SEPARATORS = r"[\s./_\-]?"
_UNSPACED_SCRIPTS = ("CJK", "HIRAGANA", "KATAKANA", "HANGUL", "THAI", "LAO", "KHMER",
                     "MYANMAR", "TIBETAN", "YI ")
# Parts of family names that are words of their own, dropped next to a longer part.
_PARTICLES = frozenset({"von", "vom", "van", "der", "den", "de", "da", "das", "di", "del",
                        "della", "des", "do", "dos", "du", "la", "le", "el", "al", "bin",
                        "ibn", "ben", "zu", "zum", "zur", "ter", "ten", "y", "e", "und"})
_MONTHS = {1: ("january", "januar", "janner", "jan"), 2: ("february", "februar", "feb"),
           3: ("march", "marz", "maerz", "mrz", "mar"), 4: ("april", "apr"),
           5: ("may", "mai"), 6: ("june", "juni", "jun"), 7: ("july", "juli", "jul"),
           8: ("august", "aug"), 9: ("september", "sept", "sep"),
           10: ("october", "oktober", "oct", "okt"), 11: ("november", "nov"),
           12: ("december", "dezember", "dec", "dez")}
LONG_NAME = 7  # name parts from this length match anywhere, shorter ones as words
LONG_ID = 6
# A UID written in text: four or more numeric components.
UID_IN_TEXT = re.compile(r"(?<![0-9.])[0-9]+(?:\.[0-9]+){3,}")
NUMBERS = re.compile(r"[0-9]+(?:\.[0-9]+)+")
_DATE_VALUE = re.compile(r"(?<![0-9])([0-9]{4})[.\-]?([0-9]{2})[.\-]?([0-9]{2})")


def fold(text: str) -> str:
    """The spelling-insensitive form of text: without diacritics, case-folded, ß as ss,
    compatibility characters (full-width letters, ligatures) as their plain form."""
    if text.isascii():
        return text.lower()
    text = _UNDECOMPOSED.sub(lambda m: _FOLD_MAP[m.group()], text)
    return _MARKS.sub("", unicodedata.normalize("NFKD", text)).casefold()


def _fold_indexed(text: str) -> tuple[str, list[int]]:
    """fold(text) and, for each of its characters, the index of the character it came from."""
    if text.isascii():
        return text.lower(), list(range(len(text)))
    out: list[str] = []
    index: list[int] = []
    for i, ch in enumerate(text):
        f = fold(ch)
        out.append(f)
        index.extend([i] * len(f))
    return "".join(out), index


def _is_unspaced(text: str) -> bool:
    return any(unicodedata.name(ch, "").startswith(_UNSPACED_SCRIPTS) for ch in text)


@dataclass(frozen=True)
class Terms:
    """The identifying values of one instance, folded, in the three kinds that match
    differently. Equal terms share their compiled patterns."""

    names: frozenset[str] = frozenset()
    ids: frozenset[str] = frozenset()
    dates: frozenset[str] = frozenset()  # YYYYMMDD

    def __bool__(self) -> bool:
        return bool(self.names or self.ids or self.dates)

    @property
    def precise(self) -> re.Pattern[str] | None:
        """Matches an identifying value in folded text, with the word rules above."""
        return _compile(self, precise=True)

    @property
    def loose(self) -> re.Pattern[str] | None:
        """Matches wherever `precise` does and more (no word boundaries): the fast check over
        an encoded header, where a value's neighbours are length and tag bytes."""
        return _compile(self, precise=False)


@dataclass
class Collector:
    """Gathers the identifying values of an instance (see the module docstring)."""

    names: set[str] = field(default_factory=set)
    ids: set[str] = field(default_factory=set)
    dates: set[str] = field(default_factory=set)

    def add_name(self, value: str) -> None:
        """A PN value: 'Family^Given^Middle^Prefix^Suffix', groups '=', values '\\'."""
        for one in {*value.split("\\"), *german_spelling(value).split("\\")}:
            for group in one.split("="):
                parts = [*group.split("^"), "", "", ""][:3]
                words = [[w for w in re.split(r"[\W_]+", fold(p)) if w] for p in parts]
                for component in words:
                    longer = any(len(w) >= 3 and w not in _PARTICLES for w in component)
                    for w in component:
                        if len(w) >= 2 and not (longer and w in _PARTICLES):
                            self.names.update(_name_spellings(w))
                    if len(component) > 1:  # O'Brien as OBrien, Müller-Lüdenscheidt as one
                        self.names.update(_name_spellings("".join(component)))
                family, given = ("".join(w) for w in words[:2])
                if family and given and _is_unspaced(family + given):
                    self.names.update({family + given, given + family})

    def add_id(self, value: str) -> None:
        """An identifier: the whole value; for one of several words, each word of five or
        more characters too (an address's town); for a number behind letters ('KV778899'),
        the number too when it has six digits or more."""
        texts = {" ".join(fold(v).split()) for one in value.split("\\")
                 for v in (one, german_spelling(one))}
        texts.discard("")
        candidates = set(texts)
        for text in texts:
            if " " in text or "," in text:
                candidates.update(w for w in re.split(r"[\s,;]+", text) if len(w) >= 5)
        for c in list(candidates):
            for digits in re.findall(r"[0-9]{6,}", c):
                if len(digits.lstrip("0")) >= 6:
                    candidates.update({digits, digits.lstrip("0")})
        # Three characters or more, and not a placeholder such as 000000 or XXX.
        self.ids.update(c for c in candidates
                        if len(re.sub(r"[\W_]", "", c)) >= 3 and len(set(c) - {" "}) > 1)

    def add_date(self, value: str) -> None:
        """A DA or DT value (several values, ranges, the old 1962.11.07): each date."""
        self.dates.update(dates_in(value))

    def terms(self) -> Terms:
        return Terms(frozenset(self.names), frozenset(self.ids), frozenset(self.dates))


def dates_in(value: str) -> set[str]:
    """The dates (YYYYMMDD) of a DA or DT value."""
    found = set()
    for y, m, d in _DATE_VALUE.findall(value):
        if 1 <= int(m) <= 12 and 1 <= int(d) <= 31:
            found.add(y + m + d)
    return found


def _name_spellings(word: str) -> set[str]:
    """A folded name part and its German transliteration both ways (ö -> oe, oe -> o)."""
    out = {word}
    if re.search("ae|oe|ue", word):
        out.add(re.sub("(?<=[aou])e", "", word))
    return out


def german_spelling(text: str) -> str:
    """'Größmann' -> 'Groessmann' (before folding, which would lose the umlaut)."""
    return text.translate(_GERMAN)


# Every alternative of a pattern starts with a literal character and puts its "not after a
# letter" check behind it ("g(?<![a-z]g)rossmann" rather than "(?<![a-z])grossmann"), and the
# alternatives are grouped by that character ("g(?:rossmann|unther)|j(?:org|oerg)"): the
# regular expression engine only tries the positions where one of those characters is, and
# there only the alternatives that start with it. An alternative is (first character, rest).
_Alternative = tuple[str, str]


def _literal(text: str, before: str | None, tail: str = "") -> _Alternative:
    """`text` (then the pattern `tail`), not preceded by a character of class `before`."""
    first, rest = re.escape(text[0]), re.escape(text[1:])
    return first, (f"(?<!{before}{first}){rest}" if before else rest) + tail


def _name_patterns(word: str, precise: bool) -> list[_Alternative]:
    if not precise or len(word) >= LONG_NAME or _is_unspaced(word):
        return [_literal(word, None)]
    genitive = "(?:'?s)?" if len(word) >= 3 else ""
    return [_literal(word, _LETTER, f"{genitive}(?!{_LETTER})")]


def _id_patterns(value: str, precise: bool) -> list[_Alternative]:
    parts = [p for p in re.split(r"[\s./_\-]+", value) if p] or [value]
    body = _SEPARATORS.join(re.escape(p) for p in parts[1:])
    body = (_SEPARATORS + body) if body else ""
    if not precise or (len(value) >= LONG_ID and not value.isdigit()):
        return [_literal(parts[0], None, body)]
    if value.isdigit():
        return [_literal(parts[0], "[0-9]", f"{body}(?![0-9])")]
    before = _WORD if re.match(r"\w", value) else None
    after = f"(?!{_WORD})" if re.search(r"\w$", value) else ""
    return [_literal(parts[0], before, body + after)]


def date_patterns(date: str, precise: bool = True) -> list[_Alternative]:
    """Every usual spelling of one date (YYYYMMDD) in folded text."""
    y, m, d = int(date[:4]), int(date[4:6]), int(date[6:8])
    days = [f"{d:02d}", str(d)] if d < 10 else [str(d)]
    months = [f"{m:02d}", str(m)] if m < 10 else [str(m)]
    year4, year = f"{y:04d}", f"(?:{y:04d}|{y % 100:02d})"
    any_day = f"0?{d}" if d < 10 else str(d)
    name = "(?:" + "|".join(_MONTHS[m]) + r")\.?"
    # Possessive quantifiers: a long run of spaces must not make the engine backtrack.
    sep = r"(?:\s*+[./\-]\s*+|\s++)"
    digits = "[0-9]" if precise else None
    end = "(?![0-9])" if precise else ""
    forms = [_literal(f"{year4}{m:02d}{d:02d}", digits, end),
             _literal(f"{d:02d}{m:02d}{year4}", digits, end)]
    for day in days:
        for month in months:
            forms.append(_literal(day, digits, f"{sep}{month}{sep}{year}{end}"))  # 7.11.1962
            forms.append(_literal(month, digits, f"{sep}{day}{sep}{year}{end}"))  # 11/07/62
            forms.append(_literal(year4, digits, f"{sep}{month}{sep}{day}{end}"))  # 1962-11-7
        forms.append(_literal(day, digits,  # 7. Nov 1962
                              rf"[\s./\-]*+{name}[\s,.\-]*+{year}{end}"))
    for month_name in _MONTHS[m]:  # Nov 7, 1962
        forms.append(_literal(month_name, _LETTER if precise else None,
                              rf"[\s./\-]*+{any_day}(?:st|nd|rd|th)?[\s,.\-]*+{year}{end}"))
    return list(dict.fromkeys(forms))


@lru_cache(maxsize=512)
def _compile(terms: Terms, precise: bool) -> re.Pattern[str] | None:
    alternatives = ([(w, a) for w in terms.names for a in _name_patterns(w, precise)]
                    + [(v, a) for v in terms.ids for a in _id_patterns(v, precise)]
                    + [(d, a) for d in terms.dates for a in date_patterns(d, precise)])
    if not alternatives:
        return None
    # Longest value first (an ID that contains a name part is removed whole), then by text:
    # the same terms give the same pattern on every machine.
    alternatives.sort(key=lambda a: (-len(a[0]), a[0], a[1]))
    groups: dict[str, list[str]] = {}
    for _, (first, rest) in alternatives:
        rests = groups.setdefault(first, [])
        if rest not in rests:
            rests.append(rest)
    return re.compile("|".join(f"{first}(?:{'|'.join(rests)})"
                               for first, rests in sorted(groups.items())))


def scrub(text: str, pattern: re.Pattern[str] | None,
          uid: Callable[[str], str | None] | None = None) -> str:
    """`text` with each UID `uid` maps replaced (first: a UID may hold digits that spell a
    date), and without the identifying values `pattern` finds (repeatedly: removing one may
    join the pieces around it into another)."""
    changed = False
    if uid is not None:
        replaced = UID_IN_TEXT.sub(lambda m: uid(m.group()) or m.group(), text)
        changed = replaced != text
        text = replaced
    if pattern is not None:
        for _ in range(20):
            if not pattern.search(fold(text)):
                break
            folded, index = _fold_indexed(text)
            pieces, last = [], 0
            for match in pattern.finditer(folded):
                if match.end() == match.start():
                    continue
                start, end = index[match.start()], index[match.end() - 1] + 1
                if start >= last:
                    pieces.append(text[last:start])
                    last = end
            pieces.append(text[last:])
            text = _join(pieces)
            changed = True
    return text.strip(" ,;:^") if changed else text


def _join(pieces: list[str]) -> str:
    """The pieces around removed values, without the double space a removal leaves."""
    out = pieces[0]
    for piece in pieces[1:]:
        if (not out or out[-1].isspace()) and piece.startswith(" "):
            piece = piece.lstrip(" ")
        elif out.endswith(" ") and piece[:1].isspace():
            out = out.rstrip(" ")
        out += piece
    return out
