"""mp4.M4bJoin against ffmpeg's own ipod remux of the same AAC parts, read back with ffprobe and ffmpeg."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fastmaya_cli import mp4
from fastmaya_cli.mp4 import AdtsError, M4bJoin, adts_frames

FFMPEG = shutil.which("ffmpeg")
FFPROBE = shutil.which("ffprobe")
pytestmark = pytest.mark.skipif(FFMPEG is None or FFPROBE is None, reason="ffmpeg and ffprobe not installed")
SR = 48000
TAGS = {
    "genre": "Audiobook",
    "title": "Long Book",
    "album": "Long Book",
    "artist": "Ann Author",
    "album_artist": "Ann Author",
    "composer": "Nora Narrator",
    "narrator": "Nora Narrator",  # no iTunes atom: ffmpeg's ipod muxer leaves it out too
    "comment": "Narrated by Nora Narrator",
}
CHAPTERS = [(0, "Opening"), (7 * SR, "Chapitre deux, l'été"), (15 * SR, "Three")]


def run(*args: str) -> bytes:
    return subprocess.run(args, capture_output=True, check=True).stdout


def probe(path: Path) -> dict:
    assert FFPROBE is not None
    command = [FFPROBE, "-v", "error", "-show_format", "-show_streams", "-show_chapters", "-of", "json"]
    return json.loads(run(*command, str(path)))


def decode(path: Path) -> np.ndarray:
    assert FFMPEG is not None
    return np.frombuffer(
        run(FFMPEG, "-v", "error", "-i", str(path), "-map", "0:a", "-f", "f32le", "-"), "<f4"
    )


def encode_part(folder: Path, name: str, samples: np.ndarray) -> Path:
    assert FFMPEG is not None
    path = folder / name
    subprocess.run(
        [FFMPEG, "-v", "error", "-f", "f32le", "-ar", str(SR), "-ac", "1", "-i", "pipe:0"]
        + ["-c:a", "aac", "-b:a", "64k", "-f", "adts", str(path)],
        input=samples.astype("<f4").tobytes(),
        check=True,
    )
    return path


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], int]:
    folder = tmp_path_factory.mktemp("mp4")
    rng = np.random.default_rng(3)
    t = np.arange(11 * SR) / SR
    first = 0.2 * np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 0.7 * t))
    second = 0.1 * rng.standard_normal(9 * SR)
    paths = [encode_part(folder, "a.aac", first), encode_part(folder, "b.aac", second)]
    return folder, paths, 19 * SR + 123  # the book ends inside the last frame


def cover_jpeg(folder: Path) -> bytes:
    assert FFMPEG is not None
    path = folder / "cover.jpg"
    run(FFMPEG, "-v", "error", "-y", "-f", "lavfi", "-i", "color=c=red:s=32x32", "-frames:v", "1", str(path))
    return path.read_bytes()


def frames_of(parts: list[Path]) -> int:
    return sum(len(adts_frames(part.read_bytes())[1]) for part in parts)


def join(
    path: Path, parts: list[Path], samples: int, cover: bytes | None = None, room: int | None = None
) -> Path:
    kind = "jpeg" if cover else None
    if room is None:  # these parts hold more frames than the book's samples need (each has its priming)
        room = mp4.index_room(frames_of(parts) * mp4.ADTS_SAMPLES, TAGS, CHAPTERS, cover, kind)
    joiner = M4bJoin(path, TAGS, cover, kind, room)
    for part in parts:
        joiner.add(part.read_bytes())
    joiner.close(samples, CHAPTERS)
    return path


def boxes(data: bytes) -> list[bytes]:
    """The kinds of the file's top-level boxes, checking that they span it exactly."""
    kinds, offset = [], 0
    while offset < len(data):
        size, kind = struct.unpack(">I4s", data[offset : offset + 8])
        if size == 1:
            size = struct.unpack(">Q", data[offset + 8 : offset + 16])[0]
        kinds.append(kind)
        offset += size
    assert offset == len(data)
    return kinds


def ffmpeg_join(folder: Path, parts: list[Path], cover: Path) -> Path:
    assert FFMPEG is not None
    stream = folder / "both.aac"
    stream.write_bytes(b"".join(part.read_bytes() for part in parts))
    lines = [";FFMETADATA1", *(f"{key}={value}" for key, value in TAGS.items())]
    ends = [start for start, _ in CHAPTERS[1:]] + [20 * SR]
    for (start, title), end in zip(CHAPTERS, ends, strict=True):
        lines += ["[CHAPTER]", f"TIMEBASE=1/{SR}", f"START={start}", f"END={end}", f"title={title}"]
    (folder / "meta.txt").write_text("\n".join(lines) + "\n")
    out = folder / "ffmpeg.m4b"
    run(
        *[FFMPEG, "-v", "error", "-y", "-f", "aac", "-i", str(stream), "-f", "ffmetadata", "-i"],
        *[str(folder / "meta.txt"), "-i", str(cover), "-map", "0:a", "-map_metadata", "1"],
        *["-map_chapters", "1", "-map", "2:v", "-c:v", "copy", "-disposition:v:0", "attached_pic"],
        *["-c:a", "copy", "-movflags", "+faststart", "-f", "ipod", str(out)],
    )
    return out


def test_the_same_book_as_ffmpegs_remux(parts: tuple[Path, list[Path], int]) -> None:
    folder, paths, samples = parts
    cover = cover_jpeg(folder)
    ours = join(folder / "ours.m4b", paths, samples, cover)
    theirs = ffmpeg_join(folder, paths, folder / "cover.jpg")
    mine, reference = probe(ours), probe(theirs)
    audio, expected = mine["streams"][0], reference["streams"][0]
    for key in ("codec_name", "profile", "sample_rate", "channels", "nb_frames"):
        assert audio[key] == expected[key]
    assert abs(int(audio["bit_rate"]) - int(expected["bit_rate"])) < 0.02 * int(expected["bit_rate"])
    # The same chapters and tags (ffmpeg's own encoder tag aside); the book ends at its last sample.
    assert [c["tags"]["title"] for c in mine["chapters"]] == [title for _, title in CHAPTERS]
    assert [round(float(c["start_time"]) * SR) for c in mine["chapters"]] == [s for s, _ in CHAPTERS]
    assert float(mine["format"]["duration"]) == pytest.approx(samples / SR, abs=1e-6)
    ours_tags, their_tags = mine["format"]["tags"], reference["format"]["tags"]
    assert {k: v for k, v in ours_tags.items() if k != "encoder"} == {
        k: v for k, v in their_tags.items() if k != "encoder"
    }
    assert ours_tags["encoder"].startswith("fastmaya ")
    pictures = [s for s in mine["streams"] if s["disposition"].get("attached_pic")]
    assert len(pictures) == 1 and pictures[0]["codec_name"] == "mjpeg"
    assert FFMPEG is not None
    picture = run(FFMPEG, "-v", "error", "-i", str(ours), "-map", "0:v", "-c", "copy", "-f", "image2", "-")
    assert picture == cover
    # Every sample as ffmpeg's file decodes it, priming frame included, to the book's last sample.
    decoded, reference_audio = decode(ours), decode(theirs)
    assert samples <= len(decoded) < samples + mp4.ADTS_SAMPLES
    assert np.array_equal(decoded[:samples], reference_audio[:samples])


def test_the_index_comes_first(parts: tuple[Path, list[Path], int], tmp_path: Path) -> None:
    _, paths, samples = parts
    data = join(tmp_path / "book.m4b", paths, samples).read_bytes()
    assert boxes(data) in ([b"ftyp", b"moov", b"mdat"], [b"ftyp", b"moov", b"free", b"mdat"])
    assert list(tmp_path.iterdir()) == [tmp_path / "book.m4b"]  # no temp file beside it
    # The room index_room keeps is what the index and the mdat header take, but for the wider forms:
    # a 16-byte mdat header, two frames more, and 64-bit offsets for each chunk of audio and chapter.
    frames = frames_of(paths)
    room = mp4.index_room(frames * mp4.ADTS_SAMPLES, TAGS, CHAPTERS)
    index = struct.unpack(">I", data[28:32])[0]
    chunks = -(-frames // mp4.SAMPLES_PER_CHUNK)
    assert room - (index + 8 + 8) == 8 + 2 * 4 + 4 * (chunks + len(CHAPTERS))


@pytest.mark.parametrize("room", [0, 200, 10_000_000])
def test_the_same_book_whatever_room_is_kept_for_the_index(
    parts: tuple[Path, list[Path], int], tmp_path: Path, room: int
) -> None:
    """Too little room puts the index after the audio (its room a free box), too much leaves a free
    box after it: the book decodes the same either way."""
    _, paths, samples = parts
    reference = decode(join(tmp_path / "exact.m4b", paths, samples))
    path = join(tmp_path / f"room{room}.m4b", paths, samples, room=room)
    kinds = boxes(path.read_bytes())
    if room < 10_000:
        assert kinds == [b"ftyp", b"free", b"mdat", b"moov"]
    else:
        assert kinds == [b"ftyp", b"moov", b"free", b"mdat"]
    info = probe(path)
    assert [c["tags"]["title"] for c in info["chapters"]] == [title for _, title in CHAPTERS]
    assert float(info["format"]["duration"]) == pytest.approx(samples / SR, abs=1e-6)
    assert np.array_equal(decode(path), reference)


def test_parts_taken_back_leave_no_trace(parts: tuple[Path, list[Path], int], tmp_path: Path) -> None:
    """``truncate`` drops the last parts, as when early parts turn out to be at another gain than the
    book's: the file is then byte for byte the one joined without them."""
    _, paths, samples = parts
    first, second = (path.read_bytes() for path in paths)
    room = mp4.index_room(frames_of(paths) * mp4.ADTS_SAMPLES, TAGS, CHAPTERS)
    straight = M4bJoin(tmp_path / "straight.m4b", TAGS, None, None, room)
    straight.add(first)
    straight.add(second)
    straight.close(samples, CHAPTERS)
    again = M4bJoin(tmp_path / "again.m4b", TAGS, None, None, room)
    again.add(first)
    again.add(second)
    again.add(first)
    assert again.parts == 3
    again.truncate(1)
    assert again.parts == 1
    again.add(second)
    again.close(samples, CHAPTERS)
    assert (tmp_path / "again.m4b").read_bytes() == (tmp_path / "straight.m4b").read_bytes()
    nothing = M4bJoin(tmp_path / "none.m4b", TAGS)
    nothing.add(first)
    nothing.truncate(0)
    with pytest.raises(AdtsError, match="no parts"):
        nothing.close(samples, CHAPTERS)


def test_offsets_past_4_gib_use_co64() -> None:
    small = mp4._chunk_table(np.array([8, 0xFFFFFFFF]), [(1, 1)])
    large = mp4._chunk_table(np.array([8, 0x1_0000_0000]), [(1, 1)])
    assert b"stco" in small and b"co64" not in small
    assert b"co64" in large and large.endswith(struct.pack(">QQ", 8, 0x1_0000_0000))


def test_long_chapter_titles_are_cut_whole_characters() -> None:
    box = mp4.nero_chapters([0.0, 1.5], ["é" * 200, "short"])
    first = box[17 : 17 + 8 + 1 + 254]  # 254 bytes: the 128th "é" would end past 255
    assert box[12 + 4] == 2 and struct.unpack(">QB", first[:9]) == (0, 254)
    assert first[9:].decode() == "é" * 127


def test_not_adts_is_refused(parts: tuple[Path, list[Path], int]) -> None:
    _, paths, _ = parts
    data = paths[0].read_bytes()
    config, offsets, headers = adts_frames(data)
    assert (config.object_type, config.sample_rate, config.channels) == (2, SR, 1)
    assert offsets[0] == 0 and set(headers.tolist()) == {7} and len(offsets) > 500
    with pytest.raises(AdtsError, match="cut off"):
        adts_frames(data[:-5])
    with pytest.raises(AdtsError, match="no ADTS frame at byte 0"):
        adts_frames(b"RIFF" + data)
    with pytest.raises(AdtsError, match="no ADTS frames"):
        adts_frames(b"")


def test_a_book_without_chapters_has_no_chapter_track(
    parts: tuple[Path, list[Path], int], tmp_path: Path
) -> None:
    _, paths, samples = parts
    joiner = M4bJoin(tmp_path / "book.m4a", {"title": "Short"})
    joiner.add(paths[1].read_bytes())
    joiner.close(samples)
    info = probe(tmp_path / "book.m4a")
    assert info["chapters"] == [] and len(info["streams"]) == 1
    assert info["format"]["tags"]["title"] == "Short"
    assert (
        len(decode(tmp_path / "book.m4a")) >= 9 * SR - mp4.ADTS_SAMPLES
    )  # the part alone, shorter than samples


def test_a_png_cover_and_a_track_number(parts: tuple[Path, list[Path], int], tmp_path: Path) -> None:
    assert FFMPEG is not None
    _, paths, samples = parts
    png = tmp_path / "cover.png"
    run(FFMPEG, "-v", "error", "-y", "-f", "lavfi", "-i", "color=c=blue:s=16x16", "-frames:v", "1", str(png))
    joiner = M4bJoin(tmp_path / "book.m4b", {"title": "T", "track": "3/12"}, png.read_bytes(), "png")
    for path in paths:
        joiner.add(path.read_bytes())
    joiner.close(samples)
    info = probe(tmp_path / "book.m4b")
    assert info["format"]["tags"]["track"] == "3/12"
    pictures = [s for s in info["streams"] if s["disposition"].get("attached_pic")]
    assert [s["codec_name"] for s in pictures] == ["png"]


def test_a_book_past_24_8_hours_gets_64_bit_times(tmp_path: Path) -> None:
    """2^32 samples at 48 kHz is 24.86 h: longer books need version-1 boxes (and a chapter that long, a
    coarser chapter track). 25 h of one silent AAC frame repeated, read back by ffprobe."""
    silence = encode_part(tmp_path, "silence.aac", np.zeros(SR, dtype=np.float32))
    data = silence.read_bytes()
    _, offsets, _ = adts_frames(data)
    frame = data[offsets[10] : offsets[11]]
    frames = 25 * 3600 * SR // mp4.ADTS_SAMPLES + 1
    samples = frames * mp4.ADTS_SAMPLES - 500
    chapters = [(0, "All of it"), (samples - SR, "Last")]
    joiner = M4bJoin(
        tmp_path / "long.m4b", {"title": "Long"}, None, None, mp4.index_room(samples, {}, chapters)
    )
    joiner.add(frame * frames)
    joiner.close(samples, chapters)
    assert boxes((tmp_path / "long.m4b").read_bytes())[:2] == [b"ftyp", b"moov"]
    info = probe(tmp_path / "long.m4b")
    assert float(info["format"]["duration"]) == pytest.approx(samples / SR, abs=1e-3)
    assert [c["tags"]["title"] for c in info["chapters"]] == ["All of it", "Last"]
    assert float(info["chapters"][1]["start_time"]) == pytest.approx((samples - SR) / SR, abs=1e-3)
    assert int(info["streams"][0]["nb_frames"]) == frames
