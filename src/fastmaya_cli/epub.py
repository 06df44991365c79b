"""EPUB reading: metadata, cover image and chapters (raw text) in reading order.

Chapters follow the spine; a chapter's title comes from the table of contents, else from the document's
first heading. A spine document with neither continues the chapter before it (books often split one
chapter over several files).
"""

from __future__ import annotations

import io
import posixpath
import warnings
import zipfile
from dataclasses import dataclass, field
from html.parser import HTMLParser
from urllib.parse import unquote

from .errors import InputError
from .maya1 import TAGS

_BLOCK_TAGS = frozenset(
    {
        "p", "div", "section", "article", "header", "footer", "aside", "blockquote", "li", "ul", "ol",
        "dd", "dt", "dl", "pre", "figcaption", "table", "tr", "td", "th", "h1", "h2", "h3", "h4", "h5",
        "h6", "body", "hr",
    }
)  # fmt: skip
_HEADING_TAGS = frozenset({"h1", "h2", "h3", "h4", "h5", "h6"})
_SKIPPED_TAGS = frozenset({"script", "style", "head", "title", "sup", "rt", "nav"})  # sup: footnote numbers


@dataclass
class EpubChapter:
    title: str | None
    paragraphs: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class EpubContent:
    title: str | None
    author: str | None
    cover: bytes | None
    cover_mime: str | None
    chapters: list[EpubChapter]


class _Blocks(HTMLParser):
    """XHTML -> [(kind, text)], kind "h1".."h6" or "p"; one entry per block element."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[tuple[str, str]] = []
        self._text: list[str] = []
        self._skipping = 0
        self._kind = "p"

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIPPED_TAGS:
            self._skipping += 1
        elif tag in _BLOCK_TAGS:
            self._flush()
            self._kind = tag if tag in _HEADING_TAGS else "p"
        elif tag == "br":
            self._text.append(" ")
        elif tag in TAGS:  # <laugh/> written as an element: keep it as Maya1's tag
            self._text.append(f" <{tag}>")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BLOCK_TAGS or tag == "br" or tag in TAGS:
            self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIPPED_TAGS:
            self._skipping = max(0, self._skipping - 1)
        elif tag in _BLOCK_TAGS:
            self._flush()

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self._text.append(data)

    def _flush(self) -> None:
        text = " ".join("".join(self._text).split())
        if text:
            self.blocks.append((self._kind, text))
        self._text = []
        self._kind = "p"

    def close(self) -> None:
        super().close()
        self._flush()


def xhtml_blocks(markup: bytes | str) -> list[tuple[str, str]]:
    if isinstance(markup, bytes):
        markup = markup.decode("utf-8", errors="replace")
    parser = _Blocks()
    parser.feed(markup)
    parser.close()
    return parser.blocks


def read_epub(data: bytes, name: str) -> EpubContent:
    import ebooklib
    from ebooklib import epub

    _refuse_drm(data, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ebooklib warns about its own future defaults
            book = epub.read_epub(io.BytesIO(data), options={"ignore_ncx": False})
    except Exception as error:  # ebooklib raises many kinds (zip, xml, KeyError) for a damaged book
        raise InputError(
            f"{name} is not a readable EPUB ({type(error).__name__}: {error}).",
            "Check that the file is a complete, DRM-free EPUB, or convert it to text first.",
        ) from error

    toc = _toc_titles(book.toc)
    chapters: list[EpubChapter] = []
    for idref, linear in book.spine:
        item = book.get_item_with_id(idref)
        if item is None or item.get_type() != ebooklib.ITEM_DOCUMENT or isinstance(item, epub.EpubNav):
            continue
        if linear == "no":
            continue
        blocks = xhtml_blocks(item.get_content())
        if not blocks:
            continue
        title = toc.get(_doc_key(item.get_name())) or next((t for k, t in blocks if k in _HEADING_TAGS), None)
        if title is None and chapters:
            chapters[-1].paragraphs.extend(text for _, text in blocks)
            continue
        if blocks[0][0] in _HEADING_TAGS and _same(blocks[0][1], title):
            blocks = blocks[1:]  # the heading repeats the title the chapter already speaks
        chapters.append(EpubChapter(title, [text for _, text in blocks]))

    cover, mime = _cover(book, ebooklib)
    return EpubContent(_metadata(book, "title"), _metadata(book, "creator"), cover, mime, chapters)


def _refuse_drm(data: bytes, name: str) -> None:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            if "META-INF/encryption.xml" not in archive.namelist():
                return
            encryption = archive.read("META-INF/encryption.xml").decode("utf-8", errors="replace")
    except zipfile.BadZipFile as error:
        raise InputError(
            f"{name} is not an EPUB: it is not a ZIP archive.", "Pass a .epub, .txt or .md file."
        ) from error
    if ".htm" in encryption or ".xhtml" in encryption:  # font obfuscation alone lists only fonts
        raise InputError(
            f"{name} is DRM-protected; its text is encrypted.", "Use a DRM-free copy of the book."
        )


def _metadata(book, name: str) -> str | None:
    values = book.get_metadata("DC", name)
    text = " ".join(values[0][0].split()) if values and values[0][0] else ""
    return text or None


def _toc_titles(entries) -> dict[str, str]:
    titles: dict[str, str] = {}

    def walk(items) -> None:
        for entry in items:
            if isinstance(entry, tuple | list):
                walk(entry)
                continue
            href, title = getattr(entry, "href", None), getattr(entry, "title", None)
            if href and title and title.strip():
                titles.setdefault(_doc_key(href), " ".join(title.split()))

    walk(entries)
    return titles


def _doc_key(href: str) -> str:
    # TOC hrefs and manifest names may differ in folder prefixes; the file name is what they share.
    return posixpath.basename(unquote(href.split("#", 1)[0]))


def _same(a: str, b: str | None) -> bool:
    return b is not None and " ".join(a.lower().split()) == " ".join(b.lower().split())


def _cover(book, ebooklib) -> tuple[bytes | None, str | None]:
    for item in book.get_items_of_type(ebooklib.ITEM_COVER):
        return item.get_content(), item.media_type
    for _, attrs in book.get_metadata("OPF", "cover"):
        item = book.get_item_with_id((attrs or {}).get("content", ""))
        if item is not None and (item.media_type or "").startswith("image/"):
            return item.get_content(), item.media_type
    for item in book.get_items_of_type(ebooklib.ITEM_IMAGE):
        if "cover" in (item.id or "").lower() or "cover" in item.get_name().lower():
            return item.get_content(), item.media_type
    return None, None
