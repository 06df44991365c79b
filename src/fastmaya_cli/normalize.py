"""Text normalisation for speech: numbers, money, times, abbreviations and typography become words.

Maya1 reads what it is given; "£3.50" or "Chapter IV" come out garbled unless spelled out first.
Known emotion tags (`<laugh>`) pass through untouched.
"""

from __future__ import annotations

import re
import unicodedata
from decimal import Decimal

from num2words import num2words

from .maya1 import TAGS

KNOWN_TAG_RE = re.compile("(<(?:" + "|".join(sorted(TAGS, key=len, reverse=True)) + ")>)")
MAX_SPOKEN_DIGITS = 15  # longer digit runs (ids, phone numbers) are read digit by digit

# --------------------------------------------------------------------------------------------- typography
_TYPOGRAPHY = [
    ("“", '"'), ("”", '"'), ("„", '"'), ("‟", '"'), ("«", '"'), ("»", '"'), ("″", '"'),
    ("‘", "'"), ("’", "'"), ("‚", "'"), ("‛", "'"), ("′", "'"), ("‹", "'"), ("›", "'"),
    ("‐", "-"), ("‑", "-"), ("‒", "-"), ("−", "-"), ("…", "..."), ("&", " and "),
]  # fmt: skip
_DASHES = ("—", "–", "―", "--")
_NUMBER_RANGE = re.compile(r"(?<=[0-9])\s*[–—]\s*(?=[0-9])")
_DASH_AFTER_OPENING = re.compile(r"((?:^|\s)[\"'(\[]|[“‘«])\s*(?:[—–―]|--+)\s*")
_DASH_BEFORE_CLOSING = re.compile(r"(?:[—–―]|--+)\s*([”’»]|[\"'](?=\s|$|[.,;:!?]))")
_DASH = re.compile(r"(?:[—―–]|--+)\s*")
_SPACE_BEFORE_COMMA = re.compile(r"\s+,")
_COMMA_BEFORE_PUNCT = re.compile(r",\s*(?=[,.!?;:])")
_LEADING_COMMA = re.compile(r"^(\s*),\s*")
_EMPHASIS_UNDERSCORE = re.compile(r"(?<!\w)_+|_+(?!\w)")
_SPACED_LESS = re.compile(r"(?:(?<=\s)|(?<=\d))<(?=\s|\d)")
_SPACED_GREATER = re.compile(r"(?:(?<=\s)|(?<=\d))>(?=\s|\d)")


def _typography(text: str) -> str:
    # Each step is guarded by a cheap membership test: most paragraphs need few of them.
    if any(dash in text for dash in _DASHES):
        text = _NUMBER_RANGE.sub(" to ", text)
        text = _DASH_AFTER_OPENING.sub(r"\1", text)
        text = _DASH_BEFORE_CLOSING.sub(r",\1", text)
        text = _SPACE_BEFORE_COMMA.sub(",", _DASH.sub(", ", text))
        text = _COMMA_BEFORE_PUNCT.sub("", text)
        text = _LEADING_COMMA.sub(r"\1", text)
    if not text.isascii() or "&" in text:
        for typographic, plain in _TYPOGRAPHY:
            if typographic in text:
                text = text.replace(typographic, plain)
    if "_" in text or "*" in text:
        text = _EMPHASIS_UNDERSCORE.sub("", text).replace("_", " ").replace("*", "")
    if "<" in text or ">" in text:
        text = _SPACED_GREATER.sub(" greater than ", _SPACED_LESS.sub(" less than ", text))
    return text


# ------------------------------------------------------------------------------------------ abbreviations
# (pattern, words, may end a sentence): the period of an abbreviation that may end a sentence is kept
# when a capital letter or the end of the text follows, so sentence splitting still sees the end.
_ABBREVIATIONS = [
    (r"Mrs\.", "Missus", False), (r"Mr\.", "Mister", False), (r"Ms\.", "Miz", False),
    (r"Messrs\.", "Messieurs", False), (r"Dr\.", "Doctor", False), (r"Prof\.", "Professor", False),
    (r"Rev\.", "Reverend", False), (r"Hon\.", "Honourable", False), (r"Capt\.", "Captain", False),
    (r"Col\.", "Colonel", False), (r"Gen\.", "General", False), (r"Lt\.", "Lieutenant", False),
    (r"Sgt\.", "Sergeant", False), (r"Gov\.", "Governor", False), (r"Mt\.", "Mount", False),
    (r"St\.(?=\s+[A-Z])", "Saint", False), (r"St\.", "Street", True), (r"Jr\.", "Junior", True),
    (r"Sr\.", "Senior", True), (r"[Vv]s\.", "versus", False), (r"etc\.", "et cetera", True),
    (r"e\.g\.", "for example", False), (r"i\.e\.", "that is", False), (r"[Nn]o\.(?=\s*\d)", "number", False),
    (r"approx\.", "approximately", False), (r"Inc\.", "Incorporated", True), (r"Ltd\.", "Limited", True),
    (r"Co\.", "Company", True), (r"Dept\.", "Department", True),
]  # fmt: skip
_ABBREVIATION_STARTS = {p[1 : p.index("]")] if p[0] == "[" else p[0] for p, _, _ in _ABBREVIATIONS}
_ABBREVIATION_RE = re.compile(
    # The leading lookahead lets the regex engine skip quickly to letters that can start an abbreviation.
    f"(?=[{''.join(sorted(_ABBREVIATION_STARTS))}])(?<![\\w.])(?:"
    + "|".join(f"({pattern})" for pattern, _, _ in _ABBREVIATIONS)
    + ")"
)
_SENTENCE_FOLLOWS = re.compile(r"\s*(?:$|[\"']?\s*[A-Z])")


def _abbreviations(text: str) -> str:
    def expand(match: re.Match[str]) -> str:
        _, words, may_end_sentence = _ABBREVIATIONS[match.lastindex - 1]
        ends = may_end_sentence and _SENTENCE_FOLLOWS.match(text, match.end())
        return words + "." if ends else words

    return _ABBREVIATION_RE.sub(expand, text)


# ---------------------------------------------------------------------------------------------- numbers
def say_integer(digits: str) -> str:
    """Digits as words; leading zeros and very long runs are read digit by digit."""
    digits = digits.replace(",", "")
    if len(digits) > MAX_SPOKEN_DIGITS or (len(digits) > 1 and digits.startswith("0")):
        return " ".join(num2words(int(d)) for d in digits)
    return num2words(int(digits))


def _say_decimal(number: str) -> str:
    whole, _, fraction = number.replace(",", "").partition(".")
    if len(whole) > MAX_SPOKEN_DIGITS:
        return say_integer(whole) + " point " + " ".join(num2words(int(d)) for d in fraction)
    return num2words(Decimal(f"{whole}.{fraction}"))


_CURRENCIES = {"$": ("dollar", "dollars", "cent", "cents"), "£": ("pound", "pounds", "penny", "pence"),
               "€": ("euro", "euros", "cent", "cents"), "¥": ("yen", "yen", "sen", "sen")}  # fmt: skip
_MONEY = re.compile(
    r"(?:US)?([$£€¥])\s?(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?(?:\s?(thousand|million|billion|trillion)\b)?",
    re.ASCII,
)


def _say_money(match: re.Match[str]) -> str:
    one, many, small_one, small_many = _CURRENCIES[match.group(1)]
    whole, fraction, scale = match.group(2), match.group(3), match.group(4)
    if scale:  # "$5.5 million" -> five point five million dollars
        amount = _say_decimal(f"{whole}.{fraction}") if fraction else say_integer(whole)
        return f"{amount} {scale} {many}"
    units = int(whole.replace(",", ""))
    spoken = f"{say_integer(whole)} {one if units == 1 else many}"
    if fraction and len(fraction) <= 2 and int(fraction):
        cents = int(fraction.ljust(2, "0"))
        spoken += f" and {num2words(cents)} {small_one if cents == 1 else small_many}"
    elif fraction and int(fraction):
        spoken = f"{_say_decimal(f'{whole}.{fraction}')} {many}"
    return spoken


_TIME = re.compile(r"\b([01]?\d|2[0-3]):([0-5]\d)(?:\s*([aApP])\.?\s?[mM]\b\.?)?", re.ASCII)
_HOUR_MERIDIEM = re.compile(r"\b(1[0-2]|0?[1-9])\s?(?:([aApP])\.[mM]\.|([aApP])[mM]\b)", re.ASCII)


def _meridiem(letter: str | None) -> str:
    return f" {letter.lower()}.m." if letter else ""


def _say_time(match: re.Match[str]) -> str:
    hours, minutes = int(match.group(1)), int(match.group(2))
    if minutes == 0:
        spoken = num2words(hours) + ("" if match.group(3) else " o'clock")
    elif minutes < 10:
        spoken = f"{num2words(hours)} oh {num2words(minutes)}"
    else:
        spoken = f"{num2words(hours)} {num2words(minutes)}"
    return spoken + _meridiem(match.group(3))


def _say_hour(match: re.Match[str]) -> str:
    letter = match.group(2) or match.group(3)
    return num2words(int(match.group(1))) + _meridiem(letter)


def _say_year(year: int) -> str:
    return num2words(year, to="year")


def _say_decade(match: re.Match[str]) -> str:
    words = _say_year(int(match.group(1)))
    return words[:-1] + "ies" if words.endswith("y") else words + "s"


def _ascii(pattern: str, flags: int = 0) -> re.Pattern[str]:
    # ASCII digits only: a number in Arabic or Devanagari script is left for the reader of that script.
    return re.compile(pattern, flags | re.ASCII)


_PERCENT = _ascii(r"(\d+(?:\.\d+)?)\s?%")
_DEGREES = _ascii(r"(\d+(?:\.\d+)?)\s?°(?:\s?([CF])\b)?")
_ORDINAL = _ascii(r"(?<![\w.])(\d+)(st|nd|rd|th)\b", re.IGNORECASE)
_DECIMAL = _ascii(r"(?<![\w.])(\d+(?:,\d{3})*\.\d+)(?![\w.]*\d)")
_GROUPED = _ascii(r"(?<![\w.,])\d{1,3}(?:,\d{3})+(?!\d)")
_DECADE = _ascii(r"(?<![\w.])(1[0-9]\d0|20[0-9]0)'?s\b")
_YEAR = _ascii(r"(?<![\w.,])(1[1-9]\d\d|20\d\d)(?![\d,.]\d|\w)")
_ISO_DATE = _ascii(r"\b(1[1-9]\d\d|20\d\d)-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])\b")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")  # fmt: skip
_HYPHEN_RANGE = _ascii(r"(?<![\w.,-])(\d+)-(\d+)(?![\w.,-]*\d)")
_NEGATIVE = _ascii(r"(?:(?<=\s)|^)-(?=\d)")
_HASH_NUMBER = _ascii(r"#\s?(?=\d)")
_ANY_DIGIT = re.compile("[0-9]")
_DOUBLE_PERIOD = re.compile(r"([ap]\.m\.)\.")
_INTEGER = _ascii(r"(?<![A-Za-z_])\d+(?=([A-Za-z])?)")


def _numbers(text: str) -> str:
    if not _ANY_DIGIT.search(text):
        return text
    for needs, pattern, spoken in _NUMBER_RULES:  # in order: money before plain numbers, and so on
        if not needs or any(char in text for char in needs):
            text = pattern.sub(spoken, text)
    return text


def _say_date(match: re.Match[str]) -> str:
    year, month, day = (int(part) for part in match.groups())
    return f"{_MONTHS[month - 1]} {num2words(day, to='ordinal')}, {_say_year(year)}"


def _say_number(number: str) -> str:
    return _say_decimal(number) if "." in number else say_integer(number)


def _scale_name(letter: str | None) -> str:
    return {"C": " Celsius", "F": " Fahrenheit"}.get(letter or "", "")


_NUMBER_RULES = [  # (a rule runs only when the text has one of these characters, pattern, replacement)
    ("-", _ISO_DATE, _say_date),
    ("$£€¥", _MONEY, _say_money),
    ("-", _NEGATIVE, "minus "),
    ("-", _HYPHEN_RANGE, r"\1 to \2"),
    (":", _TIME, _say_time),
    ("mM", _HOUR_MERIDIEM, _say_hour),
    ("%", _PERCENT, lambda m: f"{_say_number(m.group(1))} percent"),
    ("°", _DEGREES, lambda m: f"{_say_number(m.group(1))} degrees" + _scale_name(m.group(2))),
    ("sSnNrRtT", _ORDINAL, lambda m: num2words(int(m.group(1)), to="ordinal")),
    (".", _DECIMAL, lambda m: _say_decimal(m.group(1))),
    (",", _GROUPED, lambda m: say_integer(m.group())),
    ("s", _DECADE, _say_decade),
    ("", _YEAR, lambda m: _say_year(int(m.group(1)))),
    ("#", _HASH_NUMBER, "number "),
    (".", _DOUBLE_PERIOD, r"\1"),
    ("", _INTEGER, lambda m: say_integer(m.group()) + (" " if m.group(1) else "")),
]


# ------------------------------------------------------------------------------------------- public API
def normalize_for_speech(text: str) -> str:
    """Spell out what a TTS model would misread; known emotion tags are kept verbatim."""
    parts = KNOWN_TAG_RE.split(text)
    for i in range(0, len(parts), 2):  # odd parts are tags
        parts[i] = _normalize_plain(parts[i])
    return " ".join("".join(parts).split())


_FRACTIONS = {
    "½": " one half",
    "¼": " one quarter",
    "¾": " three quarters",
    "⅓": " one third",
    "⅔": " two thirds",
}
_FRACTION_RE = re.compile("[" + "".join(_FRACTIONS) + "]")


def _normalize_plain(text: str) -> str:
    if not text:
        return text
    text = _FRACTION_RE.sub(lambda m: _FRACTIONS[m.group()], text)
    text = unicodedata.normalize("NFKC", text).replace("©", " copyright ").replace("§", " section ")
    return _numbers(_abbreviations(_typography(text))).replace("°", " degrees ")


_ROMAN = re.compile(r"M{0,4}(CM|CD|D?C{0,3})(XC|XL|L?X{0,3})(IX|IV|V?I{0,3})")
_ROMAN_VALUES = {"M": 1000, "D": 500, "C": 100, "L": 50, "X": 10, "V": 5, "I": 1}
HEADING_WORDS = (
    r"chapter|chap\.|part|book|volume|vol\.|section|act|scene|canto|stave|letter"  # before a number
)
_HEADING_NUMERAL = re.compile(
    rf"(?i:\b(?:{HEADING_WORDS}))\s+([IVXLCDM]+)(?![\w'])|^([IVXLCDM]+)(?=\.?$|\.\s)"
)


def roman_to_int(numeral: str) -> int | None:
    """The value of an upper-case Roman numeral, or None when it is not a valid one."""
    if not numeral or not _ROMAN.fullmatch(numeral):
        return None
    values = [_ROMAN_VALUES[c] for c in numeral]
    return sum(-v if i + 1 < len(values) and v < values[i + 1] else v for i, v in enumerate(values))


_LEADING_KEYWORD = re.compile(rf"(?:{HEADING_WORDS}|prologue|epilogue)\b", re.IGNORECASE)
_TITLE_WORD = re.compile(r"(?<!<)\w+(?:'\w+)*")  # not the name inside a tag


def heading_title_for_speech(title: str) -> str:
    """Roman numerals become digits and shouting becomes title case: "CHAPTER IV. THE END" -> "Chapter 4. The End"."""

    def arabic(match: re.Match[str]) -> str:
        group = 1 if match.group(1) else 2
        value = roman_to_int(match.group(group))
        if not value:
            return match.group()
        return match.group()[: match.start(group) - match.start()] + str(value)

    title = _HEADING_NUMERAL.sub(arabic, " ".join(title.split()))
    if KNOWN_TAG_RE.sub("", title).isupper():
        return _TITLE_WORD.sub(lambda m: m.group().capitalize(), title)
    keyword = _LEADING_KEYWORD.match(title)  # "CHAPTER 1. Down the Rabbit-Hole"
    if keyword and keyword.group().isupper():
        title = keyword.group().capitalize() + title[keyword.end() :]
    return title
