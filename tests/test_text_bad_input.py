"""Bad input gives an InputError that names the problem and the fix, never a traceback."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from fastmaya_cli.errors import EXIT_USAGE, InputError
from fastmaya_cli.text import iter_chunks, parse_text, read_book


def refused(source: str | Path, **options: object) -> InputError:
    with pytest.raises(InputError) as caught:
        read_book(source, **options)
    error = caught.value
    assert error.problem and error.fix and error.exit_code == EXIT_USAGE
    return error


def test_missing_file(tmp_path: Path) -> None:
    error = refused(tmp_path / "nope.txt")
    assert "does not exist" in error.problem and "nope.txt" in error.problem


def test_directory(tmp_path: Path) -> None:
    assert "is a directory" in refused(tmp_path).problem


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_bytes(b"")
    assert "is empty" in refused(tmp_path / "empty.txt").problem


def test_whitespace_only_file(tmp_path: Path) -> None:
    (tmp_path / "blank.txt").write_bytes(b" \n\t\r\n   \n\n")
    assert "only whitespace" in refused(tmp_path / "blank.txt").problem


def test_empty_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    assert "standard input is empty" in refused("-").problem


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"Some text\nthen \x00\x01\x02 binary" * 10, "looks like a binary file"),
        (bytes(range(256)) * 8, "looks like a binary file"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj", "is a PDF"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is a PNG image"),
    ],
)
def test_binary_files(tmp_path: Path, data: bytes, says: str) -> None:
    (tmp_path / "book.txt").write_bytes(data)
    assert says in refused(tmp_path / "book.txt").problem


def test_nul_byte_offset_is_reported(tmp_path: Path) -> None:
    (tmp_path / "book.txt").write_bytes(b"Hello there.\nAnd\x00 more.")
    assert "NUL byte at offset 16" in refused(tmp_path / "book.txt").problem


def test_non_utf8_text_names_offset_line_and_byte(tmp_path: Path) -> None:
    (tmp_path / "latin.txt").write_bytes("First line.\nSecond line.\nA caf\u00e9 here.\n".encode("latin-1"))
    error = refused(tmp_path / "latin.txt")
    assert "not valid utf-8" in error.problem
    assert "byte 0xE9 at offset 30 (line 3, column 6)" in error.problem
    assert "--encoding latin-1" in error.fix
    book = read_book(tmp_path / "latin.txt", encoding="latin-1")
    assert book.chapters[0].paragraphs == ("First line. Second line. A caf\u00e9 here.",)


def test_utf16_text_is_recognised(tmp_path: Path) -> None:
    (tmp_path / "wide.txt").write_text("Hello from a wide file.\n", encoding="utf-16")
    assert "--encoding utf-16" in refused(tmp_path / "wide.txt").fix
    assert read_book(tmp_path / "wide.txt", encoding="utf-16").chapters[0].paragraphs == (
        "Hello from a wide file.",
    )


def test_unknown_encoding(tmp_path: Path) -> None:
    (tmp_path / "book.txt").write_text("Hello.")
    assert "Unknown text encoding 'klingon'" in refused(tmp_path / "book.txt", encoding="klingon").problem


def test_unknown_format(tmp_path: Path) -> None:
    (tmp_path / "book.txt").write_text("Hello.")
    assert "Unknown input format 'docx'" in refused(tmp_path / "book.txt", fmt="docx").problem


def test_nothing_speakable_after_cleaning(tmp_path: Path) -> None:
    (tmp_path / "emoji.txt").write_text("😀🎉👍" * 3334 + "\n\n* * *\n\n<foo></foo>\n", encoding="utf-8")
    error = refused(tmp_path / "emoji.txt")
    assert "no speakable text" in error.problem and "10002 unspeakable characters" in error.problem


def test_broken_epub(tmp_path: Path) -> None:
    (tmp_path / "book.epub").write_bytes(b"this is not a zip archive")
    assert "not an EPUB" in refused(tmp_path / "book.epub").problem


def test_epub_without_a_book_inside(tmp_path: Path) -> None:
    import zipfile

    with zipfile.ZipFile(tmp_path / "book.epub", "w") as archive:
        archive.writestr("mimetype", "application/epub+zip")
    assert "not a readable EPUB" in refused(tmp_path / "book.epub").problem


def test_chunk_budget_too_small_for_one_word() -> None:
    book = parse_text("Hello there.")
    with pytest.raises(InputError, match="too short"):
        next(iter_chunks(book, max_seconds=0.1))
    with pytest.raises(InputError, match="must be positive"):
        next(iter_chunks(book, words_per_second=0))


def test_truncated_utf16_names_the_bad_byte(tmp_path: Path) -> None:
    (tmp_path / "wide.txt").write_bytes("Hi\nthere".encode("utf-16")[:-1])
    error = refused(tmp_path / "wide.txt", encoding="utf-16")
    assert "not valid utf-16 text: byte 0x65 at offset 16 (line 2" in error.problem
