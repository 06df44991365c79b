"""The text stage: a book file -> chapters of clean paragraphs -> chunks Maya1 can speak in one go.

Reading streams the file line by line (a 200 MB book holds only its cleaned paragraphs in memory), and
`iter_chunks` is a generator that splits sentences one paragraph at a time.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import itertools
import multiprocessing
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal, NamedTuple, TypeVar

from .errors import InputError
from .maya1 import TAGS
from .normalize import (
    HEADING_WORDS,
    KNOWN_TAG_RE,
    heading_title_for_speech,
    normalize_for_speech,
    roman_to_int,
)

# The pause that FOLLOWS a chunk.
Boundary = Literal["clause", "sentence", "paragraph", "heading", "chapter", "end"]

CHARS_PER_SECOND = 15.0  # bounds chunks of text without spaces (CJK, long runs), where words say nothing
SENTENCE_WINDOW = 2000  # pysbd slows down quadratically; it never sees more characters than this at once
# pysbd is pure Python (about 3 s a novel on a fast core, and slower beside a busy GPU engine thread): books
# at least this long are split into sentences by a pool of processes.
PARALLEL_SENTENCE_CHARS = 200_000
SENTENCE_TASK_PARAGRAPHS = 64
GUTENBERG_HEADER_LINES = 1000  # the START marker is looked for this far into the file
MAX_HEADING_CHARS = 100
FORMATS = {"txt": "txt", "text": "txt", "md": "md", "markdown": "md", "epub": "epub"}
SUFFIX_FORMATS = {".md": "md", ".markdown": "md", ".epub": "epub"}


@dataclass(frozen=True)
class BookMeta:
    title: str | None
    author: str | None
    cover: bytes | None
    cover_mime: str | None
    source: str  # file path or "-"


@dataclass(frozen=True)
class Chapter:
    index: int
    title: str | None  # for display (chapter markers): "Chapter 4"
    paragraphs: tuple[str, ...]  # unwrapped, cleaned and (unless switched off) normalised
    spoken_title: str | None = None  # what the heading chunk says: "Chapter four"; None = the title


@dataclass(frozen=True)
class Book:
    meta: BookMeta
    chapters: tuple[Chapter, ...]
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class Chunk:
    index: int  # 0-based over the whole book
    text: str  # what is spoken; known tags kept verbatim, e.g. "<laugh>"
    chapter: int
    paragraph: int  # global paragraph index; -1 for a chapter heading
    sentences: tuple[int, ...]  # global sentence indices (a split long sentence appears in several chunks)
    boundary: Boundary  # the pause after this chunk
    heading: bool = False  # this chunk is a chapter heading, spoken as a heading
    seconds: float = 0.0  # expected speech duration (expected_seconds(text))


# ============================================================================================= public API
def read_book(
    source: str | Path, *, encoding: str = "utf-8", normalize: bool = True, fmt: str | None = None
) -> Book:
    """Read a .txt, .md or .epub book ("-" = standard input) into cleaned chapters and paragraphs."""
    with _open_source(source) as (name, stream):
        fmt = _format(source, fmt, stream)
        if fmt == "epub":
            return _epub_book(stream.read(), name, str(source), normalize)
        return _book_from_lines(_decoded_lines(stream, encoding, name), fmt, normalize, str(source), name)


def parse_text(text: str, *, fmt: str = "txt", normalize: bool = True, source: str = "-") -> Book:
    """`read_book` for text already in memory (tests, other front ends)."""
    fmt = _format(source, fmt, None)
    if fmt == "epub":
        raise InputError("parse_text reads txt or md text, not EPUB.", "Use read_book for an EPUB file.")
    if not text.strip():
        raise InputError("The text is empty or only whitespace.", "Pass text with words to read aloud.")
    return _book_from_lines(
        iter(text.removeprefix("\ufeff").splitlines()), fmt, normalize, source, "the text"
    )


def expected_seconds(text: str, words_per_second: float = 2.5) -> float:
    """Expected speech duration, bounded by words and by characters (text without spaces has 1 word)."""
    return max(len(text.split()) / words_per_second, len(text) / CHARS_PER_SECOND)


def spoken_text(book: Book) -> str:
    """Everything the chunks say, joined by single spaces: headings and paragraphs in reading order."""
    return " ".join(_spoken_parts(book))


def iter_chunks(
    book: Book,
    *,
    max_seconds: float = 18.0,
    words_per_second: float = 2.5,
    pack_seconds: float | None = None,
    sentences: Callable[[str], Iterable[str]] | None = None,
) -> Iterator[Chunk]:
    """Pack whole sentences of one paragraph into chunks of at most `max_seconds` expected speech.

    Sentences are joined only while the chunk stays within `pack_seconds` (default `max_seconds`);
    only a sentence longer than `max_seconds` is split. A short book packed less tightly gives the
    engine more chunks to run side by side. `sentences` splits a paragraph (default: pysbd, here and
    now; `sentence_splitter` precomputes it in parallel).
    """
    _check_budget(max_seconds, words_per_second)
    pack_limit = max_seconds if pack_seconds is None else min(pack_seconds, max_seconds)

    def fits(text: str) -> bool:
        return expected_seconds(text, words_per_second) <= max_seconds

    def packs(text: str) -> bool:
        return expected_seconds(text, words_per_second) <= pack_limit

    split = sentences or _sentences
    for index, (piece, following) in enumerate(_with_next(_pieces(book, fits, packs, split))):
        yield Chunk(
            index=index,
            text=piece.text,
            chapter=piece.chapter,
            paragraph=piece.paragraph,
            sentences=piece.sentences,
            boundary=_boundary(piece, following),
            heading=piece.heading,
            seconds=expected_seconds(piece.text, words_per_second),
        )


# ========================================================================================= reading bytes
@contextlib.contextmanager
def _open_source(source: str | Path) -> Iterator[tuple[str, BinaryIO]]:
    if str(source) == "-":
        yield "standard input", sys.stdin.buffer
        return
    path = Path(source)
    if not path.exists():
        raise InputError(f"{path} does not exist.", "Check the path of the book file.")
    if path.is_dir():
        raise InputError(f"{path} is a directory, not a book file.", "Pass a .txt, .md or .epub file.")
    try:
        stream = path.open("rb")
    except OSError as error:
        raise InputError(f"Cannot open {path}: {error.strerror}.", "Check the file's permissions.") from error
    with stream:
        if path.stat().st_size == 0:
            raise InputError(f"{path} is empty.", "Pass a file with text to read aloud.")
        yield str(path), stream


def _format(source: str | Path, fmt: str | None, stream: BinaryIO | None) -> str:
    if fmt is not None:
        if fmt.lower() not in FORMATS:
            raise InputError(f"Unknown input format {fmt!r}.", "Use txt, md or epub.")
        return FORMATS[fmt.lower()]
    if str(source) != "-" and Path(source).suffix.lower() in SUFFIX_FORMATS:
        return SUFFIX_FORMATS[Path(source).suffix.lower()]
    head = stream.peek(64)[:64] if stream is not None and hasattr(stream, "peek") else b""
    return "epub" if head.startswith(b"PK\x03\x04") and b"epub" in head else "txt"


def _decoded_lines(stream: BinaryIO, encoding: str, name: str) -> Iterator[str]:
    """Lines of text without line ends; raises InputError for binary data and undecodable bytes."""
    codec = _codec(encoding)
    if codec != "utf-8" and "a\n".encode(codec) != b"a\n":  # UTF-16/32: lines cannot be split as bytes
        yield from _decoded_whole(stream.read(), codec, encoding, name)
        return
    offset, has_text = 0, False
    for number, raw in enumerate(stream, 1):
        if number == 1:
            _check_magic(raw, name, codec)
        if b"\x00" in raw:
            raise _binary_error(name, offset + raw.index(b"\x00"))
        try:
            line = raw.decode(codec)
        except UnicodeDecodeError as error:
            raise _decode_error(name, encoding, raw, error.start, offset, number) from None
        offset += len(raw)
        if number == 1:
            line = line.removeprefix("\ufeff")
        has_text = has_text or not line.isspace()
        yield from line.splitlines()
    _check_has_text(name, offset, has_text)


def _decoded_whole(data: bytes, codec: str, encoding: str, name: str) -> Iterator[str]:
    try:
        text = data.decode(codec)
    except UnicodeDecodeError as error:
        line_start = data.rfind(b"\n", 0, error.start) + 1
        number = data.count(b"\n", 0, error.start) + 1
        raise _decode_error(
            name, encoding, data[line_start:], error.start - line_start, line_start, number
        ) from None
    _check_has_text(name, len(data), bool(text.strip()))
    yield from text.removeprefix("\ufeff").splitlines()


def _codec(encoding: str) -> str:
    try:
        codec = codecs.lookup(encoding).name
    except LookupError:
        raise InputError(
            f"Unknown text encoding {encoding!r}.",
            "Use a codec name such as utf-8, latin-1, cp1252 or utf-16.",
        ) from None
    return "utf-8" if codec == "utf-8-sig" else codec  # the BOM is dropped either way


def _check_magic(first: bytes, name: str, codec: str) -> None:
    if codec == "utf-8" and first.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise InputError(f"{name} looks like UTF-16 text, not UTF-8.", "Pass --encoding utf-16.")
    kinds = {b"%PDF": "a PDF", b"PK\x03\x04": "a ZIP archive (EPUB, DOCX, ...)", b"\x89PNG": "a PNG image"}
    for magic, kind in kinds.items():
        if first.startswith(magic):
            raise InputError(
                f"{name} is {kind}, not text.", "Convert it to plain text, or pass a .txt, .md or .epub file."
            )


def _binary_error(name: str, offset: int) -> InputError:
    return InputError(
        f"{name} looks like a binary file, not text (it has a NUL byte at offset {offset}).",
        "Pass a .txt, .md or .epub file.",
    )


def _decode_error(
    name: str, encoding: str, line: bytes, at: int, line_offset: int, number: int
) -> InputError:
    """`line` holds the undecodable byte at index `at`; the line starts at byte `line_offset` of the file."""
    column = len(line[:at].decode(encoding, errors="replace")) + 1
    return InputError(
        f"{name} is not valid {encoding} text: byte 0x{line[at]:02X} at offset {line_offset + at} "
        f"(line {number}, column {column}) cannot be decoded.",
        "Convert the file to UTF-8, or pass its encoding, e.g. --encoding latin-1 (or cp1252, utf-16).",
    )


def _check_has_text(name: str, size: int, has_text: bool) -> None:
    if size == 0:
        raise InputError(f"{name} is empty.", "Pass a file with text to read aloud.")
    if not has_text:
        raise InputError(f"{name} holds only whitespace.", "Pass a file with text to read aloud.")


# ========================================================================================== Gutenberg
_GUTENBERG_START = re.compile(
    r"^\W*(?:start of (?:the |this )?project gutenberg|end\W*the small print)", re.IGNORECASE
)
_GUTENBERG_END = re.compile(r"^\W*end of (?:the |this )?project gutenberg", re.IGNORECASE)
_GUTENBERG_FIELD = re.compile(r"^(Title|Author):\s*(.+)$")
_GUTENBERG_CREDIT = re.compile(
    r"(?i)^(?:produced by|prepared by|transcribed (?:by|from)|e-?text (?:prepared|produced)|"
    r"this e-?(?:text|book) (?:was|is)|transcriber'?s? note|cover$)|project gutenberg|\be-?(?:book|text)\b"
)


class _Gutenberg:
    """Strips the Project Gutenberg header and licence footer, keeping the header's title and author."""

    def __init__(self) -> None:
        self.found = False
        self.fields: dict[str, str] = {}

    def strip(self, lines: Iterator[str]) -> Iterator[str]:
        head = list(itertools.islice(lines, GUTENBERG_HEADER_LINES))
        start = next((i for i, line in enumerate(head) if _GUTENBERG_START.match(line)), None)
        if start is None:
            yield from head
            yield from lines
            return
        self.found = True
        self._read_fields(head[:start])
        for line in itertools.chain(head[start + 1 :], lines):
            if _GUTENBERG_END.match(line):
                return
            yield line

    def _read_fields(self, header: list[str]) -> None:
        for line in header:
            if match := _GUTENBERG_FIELD.match(line.strip()):
                self.fields.setdefault(match.group(1).lower(), match.group(2).strip())


# ============================================================================================= headings
_KEYWORD_HEADING = re.compile(rf"({HEADING_WORDS})\s+(?:the\s+)?([\w-]+)(.*)", re.IGNORECASE)
_SECTION_HEADING = re.compile(
    r"(prologue|epilogue|introduction|preface|foreword|afterword|interlude|conclusion|appendix|postscript)\b(.*)",
    re.IGNORECASE,
)
_NUMBER_WORDS = frozenset(
    {
        "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
        "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
        "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety", "hundred",
        "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
        "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth", "seventeenth",
        "eighteenth", "nineteenth", "twentieth", "thirtieth", "fortieth", "fiftieth", "last", "final",
    }
)  # fmt: skip
_CONTENTS_LABEL = re.compile(r"(?i)(?:table of )?contents\.?")


def _heading_keyword(line: str) -> str | None:
    """The heading's kind ("chapter", "prologue", "roman") when the line is a heading on its own, else None."""
    if len(line) > MAX_HEADING_CHARS:
        return None
    if (match := _KEYWORD_HEADING.fullmatch(line)) and _is_numeral(match.group(2)):
        return match.group(1).lower() if _is_heading_rest(match.group(3), line) else None
    if match := _SECTION_HEADING.fullmatch(line):
        return match.group(1).lower() if _is_heading_rest(match.group(2), line) else None
    numeral = line.removesuffix(".")
    value = roman_to_int(numeral) if numeral.isupper() else None
    # A lone "C" or "M" is more likely a letter than a chapter number.
    return "roman" if value and value < 100 else None


def _is_numeral(token: str) -> bool:
    token = token.removesuffix(".")
    return (
        token.isdigit()
        or bool(roman_to_int(token))
        or all(w in _NUMBER_WORDS for w in token.lower().split("-"))
    )


def _is_heading_rest(rest: str, line: str) -> bool:
    rest = rest.strip()
    # "Chapter 1", "Chapter 1. The Beginning", "Chapter 1: ...", "CHAPTER IV THE END"; not "Part two of it".
    return not rest or rest[0] in ".:—–-" or line.isupper()


def _is_bare_heading(line: str) -> bool:
    """A heading without a title of its own ("CHAPTER I."), which the next line may give."""
    if _heading_keyword(line) is None:
        return False
    match = _KEYWORD_HEADING.fullmatch(line) or _SECTION_HEADING.fullmatch(line)
    return match is None or match.group(match.lastindex or 0).strip() in ("", ".")


def _is_title_line(line: str) -> bool:
    return (
        len(line) <= 80
        and line[-1] not in ",;:"
        and (line[-1] not in ".!?" or line.istitle() or line.isupper())
    )


# ========================================================================================= blocks (txt)
Block = tuple[Literal["heading", "title", "body"], str]  # heading: found by pattern; title: by markup


def _txt_blocks(lines: Iterable[str]) -> Iterator[Block]:
    paragraph: list[str] = []
    for line in lines:
        if stripped := line.strip():
            paragraph.append(stripped)
        elif paragraph:
            yield from _classify(paragraph)
            paragraph = []
    if paragraph:
        yield from _classify(paragraph)


def _classify(lines: list[str]) -> Iterator[Block]:
    first = _heading_keyword(lines[0])
    if len(lines) > 1 and (first or len(lines) > 2) and all(map(_heading_keyword, lines[1:])):
        # Headings one per line: a table of contents (maybe under a "Contents" label) or "PART I / CHAPTER 1".
        yield from (("heading" if _heading_keyword(line) else "body", line) for line in lines)
    elif first is None or (first == "roman" and len(lines) > 2):
        yield "body", _unwrap(lines)
    elif len(lines) == 1:
        yield "heading", lines[0]
    elif len(lines) == 2 and _is_bare_heading(lines[0]) and _is_title_line(lines[1]):
        first = lines[0] if lines[0].endswith((".", ":")) else lines[0] + "."
        yield "heading", f"{first} {lines[1]}"
    else:
        yield "heading", lines[0]
        yield "body", _unwrap(lines[1:])


def _unwrap(lines: list[str]) -> str:
    """Join hard-wrapped lines; a word hyphenated at a line end keeps its hyphen but loses the space."""
    parts = []
    for line in lines:
        if parts and parts[-1].endswith("-") and not parts[-1].endswith("--") and parts[-1][-2:-1].isalpha():
            parts[-1] += line
        else:
            parts.append(line)
    return " ".join(parts)


# ==================================================================================== blocks (markdown)
_FENCE = re.compile(r"(`{3,}|~{3,})")
_QUOTE_PREFIX = re.compile(r"^(?:>\s?)+")
_RULE = re.compile(r"(?:[-*_]\s*){3,}")
_SETEXT = re.compile(r"=+|-+")
_ATX = re.compile(r"(#{1,6})\s+(.*?)(?:\s+#+)?")
_LIST_ITEM = re.compile(r"(?:[-*+]|\d{1,9}[.)])\s+")
_LINK_DEFINITION = re.compile(r"\[[^\]]+\]:\s*\S+.*")
_TABLE_RULE = re.compile(r"\|?\s*:?-+:?\s*(?:\|\s*:?-+:?\s*)+\|?")
_FRONT_FIELD = re.compile(r"(title|author)\s*:\s*[\"']?(.*?)[\"']?\s*", re.IGNORECASE)
_MD_INLINE = [
    (re.compile(r"!\[[^\]]*\]\([^)]*\)"), ""),  # images
    (re.compile(r"\[([^\]]*)\]\([^)]*\)"), r"\1"),  # links -> their text
    (re.compile(r"\[([^\]]*)\]\[[^\]]*\]"), r"\1"),  # reference links
    (re.compile(r"<(?:https?|ftp|mailto):[^>\s]*>"), ""),  # autolinks
    (re.compile(r"(`+)(.+?)\1"), r"\2"),  # inline code
    (re.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1"), r"\2"),  # strong
    (re.compile(r"(?<![\w*])\*(?=\S)(.+?)(?<=\S)\*(?![\w*])"), r"\1"),  # emphasis
    (re.compile(r"(?<!\w)_(?=\S)(.+?)(?<=\S)_(?!\w)"), r"\1"),
    (re.compile(r"~~(.+?)~~"), r"\1"),  # strikethrough
    (re.compile(r"\\([\\`*_{}\[\]()#+\-.!|])"), r"\1"),  # escapes
]


def _md_inline(text: str) -> str:
    for pattern, replacement in _MD_INLINE:
        text = pattern.sub(replacement, text)
    return text


def _md_blocks(lines: Iterator[str], fields: dict[str, str], counts: Counter[str]) -> Iterator[Block]:
    lines = _md_front_matter(lines, fields)
    paragraph: list[str] = []
    fence = ""

    def flush() -> Iterator[Block]:
        for kind, text in _classify(paragraph) if paragraph else ():
            yield kind, _md_inline(text)
        paragraph.clear()

    for line in lines:
        stripped = line.strip()
        if fence:
            fence = "" if stripped.startswith(fence) else fence
            continue
        if match := _FENCE.match(stripped):
            yield from flush()
            fence = match.group(1)
            counts["code blocks"] += 1
            continue
        stripped = _QUOTE_PREFIX.sub("", stripped).strip()
        if paragraph and _SETEXT.fullmatch(stripped):
            text = _md_inline(" ".join(paragraph))
            paragraph.clear()
            if stripped[0] == "=":
                fields.setdefault("h1", text)
            yield "title", text
        elif not stripped or _RULE.fullmatch(stripped):
            yield from flush()
        elif match := _ATX.fullmatch(stripped):
            yield from flush()
            level, text = len(match.group(1)), _md_inline(match.group(2))
            if level == 1:
                fields.setdefault("h1", text)
            yield ("title" if level <= 2 else "body"), text
        elif _LINK_DEFINITION.fullmatch(stripped) or _TABLE_RULE.fullmatch(stripped):
            continue
        elif match := _LIST_ITEM.match(stripped):
            yield from flush()
            paragraph.append(stripped[match.end() :])
        else:
            paragraph.append(_table_row(stripped))
    yield from flush()


def _md_front_matter(lines: Iterator[str], fields: dict[str, str]) -> Iterator[str]:
    first = next(lines, None)
    if first is None or first.strip() != "---":
        return itertools.chain([first] if first is not None else [], lines)
    for line in lines:
        if line.strip() in ("---", "..."):
            break
        if match := _FRONT_FIELD.fullmatch(line.strip()):
            fields.setdefault(match.group(1).lower(), match.group(2))
    return lines


def _table_row(line: str) -> str:
    if len(line) > 1 and line.startswith("|") and line.endswith("|"):
        return ", ".join(cell.strip() for cell in line[1:-1].split("|") if cell.strip()) + "."
    return line


# ============================================================================================= cleaning
_TAGLIKE = re.compile(r"<[^<>]*>")
# Markup: <foo>, </b>, <br/>, <!-- ... -->, <?xml ...?>, and tags with attributes (<a href="...">).
# "<b and c>" has no attribute value, so it stays prose: dropping it would eat words.
_MARKUP = re.compile(r"</?[^\W\d_][\w:.-]*\s*/?>|<[!?][^<>]*>|<[^\W\d_][\w:.-]*\s[^<>]*=[^<>]*>")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+(?=[.,!?;:](?:\s|$))")  # left where something was dropped: "word 😀!"
_MARKUP_NAME = re.compile(r"[/!?]?[\w:.-]*")
_UNCLOSED = re.compile(r"<[A-Za-z/!][\w:./-]*")
_INLINE_MARKUP = frozenset(
    {"a", "b", "i", "u", "em", "strong", "span", "small", "sub", "sup", "s", "code", "font", "abbr"}
)
_ILLUSTRATION = re.compile(r"\[Illustration[^\]]*\]", re.IGNORECASE)
_SPEAKABLE = re.compile(r"[^\W_]")
_UNSPEAKABLE_CATEGORIES = frozenset({"Cc", "Cf", "Co", "Cn", "Cs", "So", "Sk", "Me"})


def _is_unspeakable(char: str) -> bool:
    code = ord(char)
    if 0xFE00 <= code <= 0xFE0F or 0xE0100 <= code <= 0xE01EF:  # variation selectors (emoji style)
        return True
    # Joiners are judged in context by the pattern; whitespace controls only separate words.
    return (
        unicodedata.category(char) in _UNSPEAKABLE_CATEGORIES
        and not char.isspace()
        and char not in "\u200c\u200d"
    )


@functools.cache
def _is_suspect(char: str) -> bool:
    return char in "<>\u200c\u200d" or _is_unspeakable(char)


def _needs_cleaning(text: str) -> bool:
    # Checking each distinct character once is far cheaper than running the big pattern over every paragraph.
    return any(map(_is_suspect, set(text)))


@functools.cache
def _unspeakable_pattern() -> re.Pattern[str]:
    """A character a voice cannot say: emoji, symbols, controls, stray < and > (known tags are split off first)."""
    ranges: list[tuple[int, int]] = []
    for code in range(0x110000):
        if _is_unspeakable(chr(code)):
            if ranges and ranges[-1][1] == code - 1:
                ranges[-1] = (ranges[-1][0], code)
            else:
                ranges.append((code, code))
    char_class = "".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges)
    # Joiners stay only between letters (Indic and Persian spelling); elsewhere they are emoji glue.
    return re.compile(f"[{char_class}<>]|(?<!\\w)[\u200c\u200d]|[\u200c\u200d](?!\\w)")


def _drop_char(match: re.Match[str]) -> str:
    return " " if match.group() in "<>" else ""  # a stray bracket may sit between two words: "x<y"


class _Cleaner:
    """Paragraph cleaning; counts what it drops so the book carries one warning per kind, never one per line."""

    def __init__(self, normalize: bool) -> None:
        self.normalize = normalize
        self.unknown_tags: Counter[str] = Counter()
        self.removed = 0
        self.counts: Counter[str] = Counter()

    def paragraph(self, raw: str) -> str:
        text = self._markup(raw)
        if self.normalize:
            text = normalize_for_speech(text)
        text = self._unspeakable(text)
        return text if _SPEAKABLE.search(KNOWN_TAG_RE.sub("", text)) or KNOWN_TAG_RE.search(text) else ""

    def title(self, raw: str) -> tuple[str | None, str | None]:
        """(display title without tags, spoken title); (None, None) when nothing speakable is left."""
        spoken = self._unspeakable(self._markup(raw))
        display: str | None = " ".join(KNOWN_TAG_RE.sub(" ", spoken).split())
        if not _SPEAKABLE.search(display):
            display = None
            if not KNOWN_TAG_RE.search(spoken):
                return None, None
        if self.normalize:
            display = heading_title_for_speech(display) if display else None
            spoken = self._unspeakable(normalize_for_speech(heading_title_for_speech(spoken)), count=False)
        return display, spoken

    def _markup(self, raw: str) -> str:
        if "[" in raw:
            raw = _ILLUSTRATION.sub(" ", raw)
        if "<" not in raw:
            return raw
        parts, position = [], 0
        for match in _TAGLIKE.finditer(raw):
            inner = match.group()[1:-1]
            if inner.lower() in TAGS:
                parts += [self._unclosed(raw[position : match.start()]), f"<{inner.lower()}>"]
            elif _MARKUP.fullmatch(match.group()):
                name = _MARKUP_NAME.match(inner).group()[:30]
                self.unknown_tags[f"<{name}>"] += 1
                space = "" if name.lstrip("/").lower() in _INLINE_MARKUP else " "
                parts += [self._unclosed(raw[position : match.start()]), space]
            else:
                continue  # prose such as "a <b and c> d"; its stray brackets go later
            position = match.end()
        parts.append(self._unclosed(raw[position:]))
        text = "".join(parts)
        return _SPACE_BEFORE_PUNCT.sub("", text) if len(text) != len(raw) else text

    def _unclosed(self, text: str) -> str:
        if "<" not in text:
            return text

        def drop_bracket(match: re.Match[str]) -> str:
            self.unknown_tags[f"{match.group()[:30]} (unclosed)"] += 1
            return " " + match.group()[1:]

        return _UNCLOSED.sub(drop_bracket, text)

    def _unspeakable(self, text: str, count: bool = True) -> str:
        parts = KNOWN_TAG_RE.split(text)  # odd parts are known tags, kept as they are
        removed = 0
        for i in range(0, len(parts), 2):
            if _needs_cleaning(parts[i]):
                parts[i], n = _unspeakable_pattern().subn(_drop_char, parts[i])
                removed += n
        text = "".join(parts)
        if count:
            self.removed += removed
        return " ".join((_SPACE_BEFORE_PUNCT.sub("", text) if removed else text).split())

    def warnings(self) -> tuple[str, ...]:
        found = []
        if self.unknown_tags:
            names = ", ".join(f"{name} x{n}" for name, n in self.unknown_tags.most_common(10))
            more = len(self.unknown_tags) - 10
            found.append(
                f"Dropped {sum(self.unknown_tags.values())} unknown or broken tags (their words are kept): "
                f"{names}{f' and {more} more' if more > 0 else ''}. Known tags: "
                + ", ".join(f"<{tag}>" for tag in sorted(TAGS))
                + "."
            )
        if self.removed:
            found.append(
                f"Removed {self.removed} characters that cannot be spoken (emoji, symbols, control characters, "
                "stray '<' or '>')."
            )
        if self.counts["code blocks"]:
            found.append(f"Skipped {self.counts['code blocks']} code blocks; code is not read aloud.")
        return tuple(found)


# ============================================================================================= chapters
class _Chapters:
    """Collects blocks into chapters; a run of several headings with nothing between is a table of contents."""

    def __init__(self, cleaner: _Cleaner, is_credit: Callable[[str], bool] = lambda raw: False) -> None:
        self.cleaner = cleaner
        self.is_credit = is_credit
        self.chapters: list[Chapter] = []
        self.title: tuple[str | None, str | None] = (None, None)
        self.paragraphs: list[str] = []
        self.started = False  # a heading has been seen: the front matter is over
        self.pending: list[str] = []  # headings seen since the last paragraph
        self.contents_label: str | None = None  # a "Contents" paragraph, held until we know a TOC follows

    def add(self, kind: str, text: str) -> None:
        if kind == "heading":
            self.pending.append(text)
        elif kind == "title":
            self._flush_headings()
            self.start_chapter(text)
        elif _CONTENTS_LABEL.fullmatch(text) and not self.pending:
            self._flush_headings()
            self.contents_label = text
        else:
            self._flush_headings()
            self.add_paragraph(text)

    def finish(self) -> list[Chapter]:
        self._flush_headings()
        self._close_chapter()
        return self.chapters

    def start_chapter(self, raw_title: str | None) -> None:
        self._close_chapter()
        self.title = self.cleaner.title(raw_title) if raw_title else (None, None)
        self.started = True

    def add_paragraph(self, raw: str) -> None:
        if not self.started and self.is_credit(raw):
            return  # production credits and notes before the book begins
        if cleaned := self.cleaner.paragraph(raw):
            self.paragraphs.append(cleaned)

    def _flush_headings(self) -> None:
        run, self.pending = self.pending, []
        kinds = Counter(_heading_keyword(heading) for heading in run)
        if len(run) >= 3 and max(kinds.values()) >= 2:
            # A table of contents; its last entry is the real heading when text follows it.
            run, self.contents_label = run[-1:], None
        if self.contents_label:
            self.add_paragraph(self.contents_label)
            self.contents_label = None
        for heading in run:
            self.start_chapter(heading)

    def _close_chapter(self) -> None:
        display, spoken = self.title
        if display or spoken or self.paragraphs:
            self.chapters.append(Chapter(len(self.chapters), display, tuple(self.paragraphs), spoken))
        self.title, self.paragraphs = (None, None), []


def _book_from_lines(lines: Iterator[str], fmt: str, normalize: bool, source: str, name: str) -> Book:
    cleaner = _Cleaner(normalize)
    gutenberg = _Gutenberg()
    body = gutenberg.strip(lines)
    fields: dict[str, str] = {}
    blocks = _md_blocks(body, fields, cleaner.counts) if fmt == "md" else _txt_blocks(body)
    builder = _Chapters(
        cleaner, is_credit=lambda raw: gutenberg.found and bool(_GUTENBERG_CREDIT.search(raw))
    )
    for kind, text in blocks:
        builder.add(kind, text)
    fields = gutenberg.fields | fields
    meta = BookMeta(
        _meta_text(fields.get("title") or fields.get("h1")),
        _meta_text(fields.get("author")),
        None,
        None,
        source,
    )
    return _finish_book(meta, builder.finish(), cleaner, name)


def _epub_book(data: bytes, name: str, source: str, normalize: bool) -> Book:
    from .epub import read_epub

    content = read_epub(data, name)
    cleaner = _Cleaner(normalize)
    builder = _Chapters(cleaner)
    for chapter in content.chapters:
        builder.start_chapter(chapter.title)
        for paragraph in chapter.paragraphs:
            builder.add_paragraph(paragraph)
    meta = BookMeta(content.title, content.author, content.cover, content.cover_mime, source)
    return _finish_book(meta, builder.finish(), cleaner, name)


def _meta_text(value: str | None) -> str | None:
    text = " ".join(KNOWN_TAG_RE.sub(" ", value or "").split())
    return text or None


def _finish_book(meta: BookMeta, chapters: list[Chapter], cleaner: _Cleaner, name: str) -> Book:
    if not chapters:
        removed = f" ({cleaner.removed} unspeakable characters were removed)" if cleaner.removed else ""
        raise InputError(
            f"{name} has no speakable text left after cleaning{removed}.",
            "Check that this is the right file and that it holds words to read aloud.",
        )
    return Book(meta, tuple(chapters), cleaner.warnings())


# ============================================================================================= chunking
class _Piece(NamedTuple):
    text: str
    chapter: int
    paragraph: int
    sentences: tuple[int, ...]
    ends_sentence: bool
    heading: bool


_CLAUSE_CUT = re.compile(r"(?<=[,;:])(?=\s)|(?<=[—–，、；：。！？])")
_WORD_CUT = re.compile(r"(?=\s)")
_CHAR_UNIT = re.compile(rf"\s*(?:{KNOWN_TAG_RE.pattern}|.)", re.DOTALL)
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?= )")
_T = TypeVar("_T")


def _check_budget(max_seconds: float, words_per_second: float) -> None:
    if not words_per_second > 0:
        raise InputError(
            f"words per second must be positive, not {words_per_second}.", "Use a value such as 2.5."
        )
    smallest = expected_seconds("<laugh_harder>", words_per_second)  # the longest thing that cannot be split
    if not max_seconds >= smallest:
        raise InputError(
            f"A chunk limit of {max_seconds} s is too short to hold one word or tag.",
            f"Use at least {smallest:.1f} s (18 s is a good default).",
        )


def _spoken_parts(book: Book) -> Iterator[str]:
    for chapter in book.chapters:
        if heading := chapter.spoken_title or chapter.title:
            yield heading
        yield from chapter.paragraphs


def _pieces(
    book: Book,
    fits: Callable[[str], bool],
    packs: Callable[[str], bool],
    split: Callable[[str], Iterable[str]],
) -> Iterator[_Piece]:
    sentence_ids = itertools.count()
    paragraph_index = 0
    for chapter in book.chapters:
        if heading := chapter.spoken_title or chapter.title:
            for text, last in _with_last(_split_long(heading, fits)):
                yield _Piece(text, chapter.index, -1, (), last, True)
        for paragraph in chapter.paragraphs:
            for text, sentences, whole in _paragraph_pieces(paragraph, fits, packs, sentence_ids, split):
                yield _Piece(text, chapter.index, paragraph_index, sentences, whole, False)
            paragraph_index += 1


def _paragraph_pieces(
    paragraph: str,
    fits: Callable[[str], bool],
    packs: Callable[[str], bool],
    sentence_ids: Iterator[int],
    split: Callable[[str], Iterable[str]],
) -> Iterator[tuple[str, tuple[int, ...], bool]]:
    """(text, sentence ids, ends at a sentence end): greedy packing of whole sentences."""
    current, ids = "", []
    for sentence in split(paragraph):
        sentence_id = next(sentence_ids)
        candidate = f"{current} {sentence}" if current else sentence
        if fits(candidate) and (not current or packs(candidate)):
            current = candidate
            ids.append(sentence_id)
            continue
        if current:
            yield current, tuple(ids), True
        current, ids = sentence, [sentence_id]
        if not fits(sentence):
            for piece, last in _with_last(_split_long(sentence, fits)):
                if last:
                    current = piece
                else:
                    yield piece, (sentence_id,), False
    if current:
        yield current, tuple(ids), True


def _split_long(text: str, fits: Callable[[str], bool], level: int = 0) -> Iterator[str]:
    """Pieces of an over-long sentence that each fit: cut at clauses, then between words, then characters."""
    if fits(text) or level == 3:
        yield text
        return
    units = _units(text, level)
    first = next(units)
    if len(first) == len(text):
        yield from _split_long(text, fits, level + 1)
        return
    current = ""
    for unit in itertools.chain([first], units):
        if fits((current + unit).strip()):
            current += unit
            continue
        if current.strip():
            yield current.strip()
        current = unit
        if not fits(unit.strip()):
            for piece, last in _with_last(_split_long(unit.strip(), fits, level + 1)):
                if last:
                    current = piece
                else:
                    yield piece
    if current.strip():
        yield current.strip()


def _units(text: str, level: int) -> Iterator[str]:
    """Consecutive substrings of `text` that add up to it; each but the first starts with its separator."""
    if level == 2:
        yield from (match.group() for match in _CHAR_UNIT.finditer(text))
        return
    start = 0
    for match in (_CLAUSE_CUT if level == 0 else _WORD_CUT).finditer(text):
        if match.start() > start:
            yield text[start : match.start()]
            start = match.start()
    yield text[start:]


def _sentences(paragraph: str) -> Iterator[str]:
    for window in _windows(paragraph):
        yield from _segment(window)


def sentence_splitter(book: Book, workers: int) -> Callable[[str], Iterable[str]] | None:
    """For a long book, every paragraph's sentences computed up front by `workers` processes; the
    returned function gives exactly what `_sentences` would. None (split as you go) for a short book."""
    if workers < 2 or sum(len(p) for c in book.chapters for p in c.paragraphs) < PARALLEL_SENTENCE_CHARS:
        return None
    paragraphs = list(dict.fromkeys(p for c in book.chapters for p in c.paragraphs))
    tasks = [
        paragraphs[i : i + SENTENCE_TASK_PARAGRAPHS]
        for i in range(0, len(paragraphs), SENTENCE_TASK_PARAGRAPHS)
    ]
    # spawn: the parent may already hold CUDA and engine threads, which a fork would copy half-alive.
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            done = [sentences for batch in pool.map(_sentences_of, tasks) for sentences in batch]
    except (OSError, BrokenProcessPool):  # no processes here (a sandbox, a __main__ read from stdin)
        return None
    table = dict(zip(paragraphs, done, strict=True))
    return lambda paragraph: table[paragraph] if paragraph in table else _sentences(paragraph)


def _sentences_of(paragraphs: list[str]) -> list[list[str]]:
    return [list(_sentences(paragraph)) for paragraph in paragraphs]


def _windows(paragraph: str) -> Iterator[str]:
    """Cut a long paragraph at sentence ends (else spaces) into pieces pysbd can handle quickly."""
    start = 0
    while len(paragraph) - start > SENTENCE_WINDOW:
        limit = start + SENTENCE_WINDOW
        ends = [m.end() for m in _SENTENCE_END.finditer(paragraph, start + SENTENCE_WINDOW // 2, limit)]
        cut = ends[-1] if ends else paragraph.rfind(" ", start + 1, limit)
        if cut <= start:
            cut = paragraph.find(" ", limit)  # no space in the window: the run goes on to the next space
            if cut < 0:
                break
        yield paragraph[start:cut]
        start = cut + 1
    yield paragraph[start:]


@functools.cache
def _segmenter():
    import pysbd

    return pysbd.Segmenter(language="en", clean=False)


def _segment(text: str) -> Iterator[str]:
    """pysbd's sentences, trusted only where they end at a space, so joining them with spaces gives `text`."""
    if " " not in text:
        yield text
        return
    try:
        segments = _segmenter().segment(text)
    except Exception:  # pysbd fails on some odd input; one coarse sentence is still correct
        yield text
        return
    start = position = 0
    for segment in segments:
        segment = segment.strip()
        if not segment:
            continue
        found = text.find(segment, position)
        if found < 0:
            break  # pysbd changed the text; the rest stays one sentence
        position = found + len(segment)
        if position < len(text) and text[position] == " " and position > start:
            yield text[start:position]
            start = position + 1
    if start < len(text):
        yield text[start:]


def _boundary(piece: _Piece, following: _Piece | None) -> Boundary:
    if following is None:
        return "end"
    if following.chapter != piece.chapter:
        return "chapter"
    if not piece.ends_sentence:
        return "clause"
    if piece.heading:
        return "heading"
    return "paragraph" if following.paragraph != piece.paragraph else "sentence"


def _with_next(items: Iterable[_T]) -> Iterator[tuple[_T, _T | None]]:
    iterator = iter(items)
    previous = next(iterator, None)
    if previous is None:
        return
    for item in iterator:
        yield previous, item
        previous = item
    yield previous, None


def _with_last(items: Iterable[_T]) -> Iterator[tuple[_T, bool]]:
    return ((item, following is None) for item, following in _with_next(items))


__all__ = [
    "Book", "BookMeta", "Boundary", "Chapter", "Chunk", "expected_seconds", "iter_chunks", "parse_text",
    "read_book", "sentence_splitter", "spoken_text",
]  # fmt: skip
