"""Normalisation for speech: numbers, money, times, abbreviations, typography, headings."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastmaya_cli.maya1 import TAGS
from fastmaya_cli.normalize import KNOWN_TAG_RE, heading_title_for_speech, normalize_for_speech, roman_to_int


@pytest.mark.parametrize(
    ("text", "spoken"),
    [
        ("I have 3 cats.", "I have three cats."),
        (
            "She came 1st, he 22nd and they 103rd.",
            "She came first, he twenty-second and they one hundred and third.",
        ),
        ("It was published in 1813.", "It was published in eighteen thirteen."),
        ("In 2005 and 1492.", "In two thousand and five and fourteen ninety-two."),
        ("The 1990s.", "The nineteen nineties."),
        ("It cost $5.50.", "It cost five dollars and fifty cents."),
        ("It cost $1 or $0.01.", "It cost one dollar or zero dollars and one cent."),
        ("Only £3 today.", "Only three pounds today."),
        ("A $5.5 million deal.", "A five point five million dollars deal."),
        ("We met at 3:30 pm.", "We met at three thirty p.m."),
        ("At 3:05 and 7:00.", "At three oh five and seven o'clock."),
        ("Come at 10am.", "Come at ten a.m."),
        ("Pi is 3.14 and 50% of 1,000,000.", "Pi is three point one four and fifty percent of one million."),
        ("It was -5 degrees, 30°C.", "It was minus five degrees, thirty degrees Celsius."),
        ("Pages 10-20 and 1990–2000.", "Pages ten to twenty and nineteen ninety to two thousand."),
        ("On 2024-01-15.", "On January fifteenth, twenty twenty-four."),
        ("Agent 007.", "Agent zero zero seven."),
        ("Room #5.", "Room number five."),
    ],
)
def test_numbers_money_and_times(text: str, spoken: str) -> None:
    assert normalize_for_speech(text) == spoken


@pytest.mark.parametrize(
    ("text", "spoken"),
    [
        ("Mr. and Mrs. Bennet met Dr. Jones.", "Mister and Missus Bennet met Doctor Jones."),
        ("St. Paul lives on Baker St.", "Saint Paul lives on Baker Street."),
        ("Fruit, e.g. apples, i.e. food.", "Fruit, for example apples, that is food."),
        ("Apples, pears, etc. Then more.", "Apples, pears, et cetera. Then more."),
        ("Apples, etc., and pears.", "Apples, et cetera, and pears."),
    ],
)
def test_abbreviations(text: str, spoken: str) -> None:
    assert normalize_for_speech(text) == spoken


@pytest.mark.parametrize(
    ("text", "spoken"),
    [
        ("“Hello,” she said… ‘fine’", "\"Hello,\" she said... 'fine'"),
        ("“Well—” he began.", '"Well," he began.'),
        ("It was—as I said—late.", "It was, as I said, late."),
        ("Tom & Jerry", "Tom and Jerry"),
        ("a < b and c > d", "a less than b and c greater than d"),
        ("The _real_ thing", "The real thing"),
    ],
)
def test_typography_becomes_plain(text: str, spoken: str) -> None:
    assert normalize_for_speech(text) == spoken


def test_tags_pass_through_untouched() -> None:
    text = "Ha <laugh> 3 times <laugh_harder> then <sigh>."
    assert normalize_for_speech(text) == "Ha <laugh> three times <laugh_harder> then <sigh>."


def test_other_scripts_keep_their_digits() -> None:
    assert normalize_for_speech("العدد ٣ هنا") == "العدد ٣ هنا"


@pytest.mark.parametrize(
    ("title", "spoken"),
    [
        ("CHAPTER IV", "Chapter 4"),
        ("Chapter I. The Beginning", "Chapter 1. The Beginning"),
        ("CHAPTER XII. THE DUKE'S SON", "Chapter 12. The Duke's Son"),
        ("PART ONE", "Part One"),
        ("Book III", "Book 3"),
        ("IV.", "4."),
        ("CHAPTER I. Down the Rabbit-Hole", "Chapter 1. Down the Rabbit-Hole"),
        ("Chapter the First", "Chapter the First"),
        ("I Am Legend", "I Am Legend"),
    ],
)
def test_heading_titles(title: str, spoken: str) -> None:
    assert heading_title_for_speech(title) == spoken


@pytest.mark.parametrize(
    ("numeral", "value"), [("I", 1), ("IV", 4), ("XLII", 42), ("MCMXC", 1990), ("IIII", None), ("", None)]
)
def test_roman_numerals(numeral: str, value: int | None) -> None:
    assert roman_to_int(numeral) == value


_TAG_LIST = sorted(TAGS)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.one_of(st.text(max_size=30), st.sampled_from(_TAG_LIST).map(lambda t: f"<{t}>")), max_size=8)
)
def test_any_text_normalises_and_keeps_its_tags(parts: list[str]) -> None:
    text = " ".join(parts)
    plain = KNOWN_TAG_RE.sub("", text)
    compatible = unicodedata.normalize("NFKC", plain)
    if "<" in compatible or ">" in compatible:
        plain = ""  # NFKC can turn look-alike brackets into real ones; that case is not this property's
        text = " ".join(p for p in parts if KNOWN_TAG_RE.fullmatch(p))
    spoken = normalize_for_speech(text)
    assert isinstance(spoken, str)
    assert KNOWN_TAG_RE.findall(spoken) == KNOWN_TAG_RE.findall(text)
    assert spoken == " ".join(spoken.split())
