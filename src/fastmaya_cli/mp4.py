"""The m4b/m4a join: AAC parts (bare ADTS streams) written into one iTunes-style MP4, without ffmpeg.

Why not ffmpeg's remux, as for mp3: it costs ffmpeg's command line a fixed time per packet, 6 to 8 µs in
the n9.0.2 build (even into its null muxer), and an AAC book has 47 packets a second: 14 s for a 13 h
book, all of it after the last chunk, in one thread. Here the join strips each ADTS frame's header as
its part arrives, writes its audio into the file at once, and writes the sample tables at the end with
numpy: a fraction of a second.

The file has the boxes ffmpeg's ``ipod`` muxer writes for such a book (its tests compare the two):

* one AAC track with the sample tables, an edit list that ends it at the book's last sample (the
  priming frame stays: ``split_encode`` cuts the parts so that the decoded stream lines up with the book,
  priming included), and a ``roll`` sample group;
* the chapters twice, as players read one or the other: a QuickTime text track that the audio track
  names in ``tref/chap`` (Apple's players) and a Nero ``chpl`` box (most others, and ffmpeg);
* iTunes tags in ``udta/meta/ilst``, the cover in ``covr``;
* the index (``moov``) before the audio (``mdat``), as with ``-movflags +faststart``, where the room
  kept for it suffices (see ``M4bJoin``), with a ``free`` box for the rest of the room.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from fastmaya_cli import __version__

ADTS_SAMPLES = 1024  # samples per AAC-LC frame
SAMPLES_PER_CHUNK = 256  # frames per chunk of the sample table (about 5 s at 48 kHz)
_ADTS_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)
_UNITY_MATRIX = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
# QuickTime text sample description, as ffmpeg writes it for a chapter track.
_TEXT_SAMPLE_ENTRY = bytes.fromhex(
    "0000003b7465787400000000000000010000000100000000000000000000000000000000000000010000000000000000"
    "000d667461620001000100"
)
_ENCD = bytes.fromhex("0000000c656e636400000100")  # a text sample's encoding: UTF-8
# ffmpeg's metadata keys and the iTunes atoms its ipod muxer writes them to (others are left out).
ITUNES_ATOMS = {
    "title": b"\xa9nam",
    "artist": b"\xa9ART",
    "album_artist": b"aART",
    "album": b"\xa9alb",
    "composer": b"\xa9wrt",
    "date": b"\xa9day",
    "comment": b"\xa9cmt",
    "genre": b"\xa9gen",
    "copyright": b"cprt",
    "description": b"desc",
    "grouping": b"\xa9grp",
}
_COVER_TYPES = {"jpeg": 13, "png": 14}


class AdtsError(ValueError):
    """A part is not the bare ADTS stream of one AAC-LC channel layout at one rate."""


@dataclass(frozen=True)
class AudioConfig:
    object_type: int  # 2: AAC-LC
    rate_index: int
    channels: int

    @property
    def sample_rate(self) -> int:
        return _ADTS_RATES[self.rate_index]

    def specific_config(self) -> bytes:
        """The AudioSpecificConfig an MP4 stores in place of each frame's ADTS header."""
        return struct.pack(">H", self.object_type << 11 | self.rate_index << 7 | self.channels << 3)


def adts_frames(data: bytes) -> tuple[AudioConfig, np.ndarray, np.ndarray]:
    """The stream's configuration, and each frame's offset and header length, as arrays (frame i spans
    ``offsets[i]`` to ``offsets[i + 1]``, the last to the end)."""
    offsets, position, size = [], 0, len(data)
    while position + 7 <= size:  # the walk is the one loop per frame: it only reads the lengths
        offsets.append(position)
        length = (data[position + 3] & 3) << 11 | data[position + 4] << 3 | data[position + 5] >> 5
        if length < 7:
            break
        position += length
    if not offsets:
        raise AdtsError("no ADTS frames" if not data else "no ADTS frame at byte 0")
    starts = np.asarray(offsets, dtype=np.int64)
    heads = np.frombuffer(data, dtype=np.uint8)[starts[:, None] + np.arange(7)]
    first = heads[0]
    sync = (heads[:, 0] == 0xFF) & (heads[:, 1] & 0xF6 == 0xF0)
    if not sync.all():
        raise AdtsError(f"no ADTS frame at byte {int(starts[np.argmin(sync)])}")
    # Every frame as the first: the same profile, rate and channels, one raw block of 1024 samples.
    alike = (heads[:, 2] == first[2]) & (heads[:, 3] >> 6 == first[3] >> 6) & (heads[:, 6] & 3 == 0)
    if not alike.all():
        raise AdtsError(f"ADTS frame at byte {int(starts[np.argmin(alike)])} differs from the stream's first")
    if position != size:
        raise AdtsError("the last ADTS frame is cut off")
    headers = np.where(heads[:, 1] & 1, 7, 9)  # protection_absent, else a CRC follows the header
    profile, layout = int(first[2]), int(first[3])
    config = AudioConfig((profile >> 6) + 1, (profile >> 2) & 15, (profile & 1) << 2 | layout >> 6)
    return config, starts, headers.astype(np.int64)


def _box(kind: bytes, *payload: bytes) -> bytes:
    body = b"".join(payload)
    return struct.pack(">I4s", 8 + len(body), kind) + body


def _full_box(kind: bytes, version: int, flags: int, *payload: bytes) -> bytes:
    return _box(kind, struct.pack(">I", version << 24 | flags), *payload)


def _descriptor(tag: int, body: bytes) -> bytes:
    size = len(body)  # four 7-bit length bytes, as ffmpeg writes them
    return (
        bytes([tag, 0x80 | size >> 21 & 127, 0x80 | size >> 14 & 127, 0x80 | size >> 7 & 127, size & 127])
        + body
    )


def _chunk_table(offsets: np.ndarray, counts: list[tuple[int, int]]) -> bytes:
    """stsc from (first chunk, samples per chunk) runs, and stco (or co64 past 4 GiB) from offsets."""
    stsc = _full_box(
        b"stsc", 0, 0, struct.pack(">I", len(counts)), *(struct.pack(">III", a, b, 1) for a, b in counts)
    )
    if len(offsets) and int(offsets[-1]) > 0xFFFFFFFF:
        return stsc + _full_box(
            b"co64", 0, 0, struct.pack(">I", len(offsets)), offsets.astype(">u8").tobytes()
        )
    return stsc + _full_box(b"stco", 0, 0, struct.pack(">I", len(offsets)), offsets.astype(">u4").tobytes())


# Durations past 2^32 units (24.8 h at 48 kHz) need the boxes' version 1, with 64-bit times.
def _long(duration: int) -> bool:
    return duration > 0xFFFFFFFF


def _edit_list(duration: int, media_time: int) -> bytes:
    if _long(duration):
        entry = struct.pack(">IQqI", 1, duration, media_time, 0x10000)
        return _box(b"edts", _full_box(b"elst", 1, 0, entry))
    return _box(b"edts", _full_box(b"elst", 0, 0, struct.pack(">IIiI", 1, duration, media_time, 0x10000)))


def _track_header(track_id: int, flags: int, duration: int, volume: int) -> bytes:
    if _long(duration):
        times = struct.pack(">QQIIQ", 0, 0, track_id, 0, duration)
    else:
        times = struct.pack(">IIIII", 0, 0, track_id, 0, duration)
    body = times + bytes(8) + struct.pack(">hhhH", 0, 0, volume, 0)
    return _full_box(b"tkhd", int(_long(duration)), flags, body + _UNITY_MATRIX + bytes(8))


def _times(rate: int, duration: int) -> bytes:
    """Creation and modification time (none), time scale and duration, as mvhd and mdhd begin."""
    if _long(duration):
        return struct.pack(">QQIQ", 0, 0, rate, duration)
    return struct.pack(">IIII", 0, 0, rate, duration)


def _media_header(rate: int, duration: int) -> bytes:
    body = _times(rate, duration) + struct.pack(">HH", 0x55C4, 0)  # language "und"
    return _full_box(b"mdhd", int(_long(duration)), 0, body)


def _handler(kind: bytes, name: bytes, maker: bytes = bytes(4)) -> bytes:
    return _full_box(b"hdlr", 0, 0, bytes(4) + kind + maker + bytes(8) + name + b"\0")


_DATA_INFORMATION = _box(b"dinf", _full_box(b"dref", 0, 0, struct.pack(">I", 1), _full_box(b"url ", 0, 1)))
_FILE_TYPE = _box(b"ftyp", b"M4A ", struct.pack(">I", 0x200), b"M4A isomiso2")
_MIN_ROOM = 24  # the mdat header (16 bytes past 4 GiB) and a free box of at least 8 before it


def _free(size: int) -> bytes:
    """A ``free`` box of ``size`` bytes (at least 8)."""
    return struct.pack(">I4s", size, b"free") + bytes(size - 8)


def _mdat_header(body: int) -> bytes:
    """The header of an ``mdat`` box around ``body`` bytes: 64-bit sizes past 4 GiB."""
    if body + 8 > 0xFFFFFFFF:
        return struct.pack(">I4sQ", 1, b"mdat", body + 16)
    return struct.pack(">I4s", body + 8, b"mdat")


def index_room(
    samples: int,
    tags: Mapping[str, str],
    chapters: Sequence[tuple[int, str]] = (),
    cover: bytes | None = None,
    cover_kind: str | None = None,
) -> int:
    """The bytes ``M4bJoin`` needs before the audio for the index of a book of ``samples`` samples at
    48 kHz or less (AAC frames of 1024 samples, plus the priming frame), and its mdat header."""
    frames = -(-samples // ADTS_SAMPLES) + 2
    # A join never opened, only to build its index: the index's size depends on the frame count, the
    # tags, cover and chapters, and the width of its offsets, not on the sizes or offsets themselves.
    probe = M4bJoin.__new__(M4bJoin)
    probe._tags, probe._cover, probe._cover_kind = tags, cover, cover_kind
    probe._config, probe._samples, probe._chapters = AudioConfig(2, 3, 1), samples, chapters
    titles = probe._chapter_samples()
    far = 1 << 33  # offsets past 4 GiB: the larger tables, so the room is never short by their width
    moov = probe._movie(np.zeros(frames, dtype=np.int64), titles, far, far)
    return len(moov) + 16 + 8


def _tag(atom: bytes, kind: int, value: bytes) -> bytes:
    return _box(atom, _box(b"data", struct.pack(">II", kind, 0), value))


def itunes_tags(tags: Mapping[str, str], cover: bytes | None, cover_kind: str | None) -> bytes:
    """``udta/meta/ilst`` body items: the known keys of ``tags``, the encoder, the track and the cover."""
    items = [_tag(ITUNES_ATOMS[key], 1, value.encode()) for key, value in tags.items() if key in ITUNES_ATOMS]
    if "track" in tags:
        number, _, total = tags["track"].partition("/")
        if number.isdigit():
            count = int(total) if total.isdigit() else 0
            items.append(_tag(b"trkn", 0, struct.pack(">HHHH", 0, int(number), count, 0)))
    items.append(_tag(b"\xa9too", 1, f"fastmaya {__version__}".encode()))
    if cover is not None and cover_kind in _COVER_TYPES:
        items.append(_tag(b"covr", _COVER_TYPES[cover_kind], cover))
    return b"".join(items)


def _cut_utf8(text: str, limit: int) -> bytes:
    """``text`` in UTF-8, cut to at most ``limit`` bytes between characters."""
    return text.encode()[:limit].decode(errors="ignore").encode()


def nero_chapters(starts_s: Sequence[float], titles: Sequence[str]) -> bytes:
    """The ``chpl`` box: each chapter's start in 100 ns units and its title (at most 255 bytes)."""
    entries = []
    for start, title in zip(starts_s, titles, strict=True):
        name = _cut_utf8(title, 255)
        entries.append(struct.pack(">QB", round(start * 10_000_000), len(name)) + name)
    return _full_box(b"chpl", 1, 0, struct.pack(">IB", 0, len(entries)), *entries)


class M4bJoin:
    """Joins bare ADTS parts, given in order to ``add``, into ``path``.

    Each part's audio goes into the file as it is added, behind ``index_room`` bytes kept for the index,
    so that ``close`` writes only the index: where it fits in that room it goes there, before the
    audio (the room's rest becomes a ``free`` box); else it goes after the audio, which players read
    as well. Nothing of the audio is copied twice, so a book's parts can be added while it renders and
    its last moments cost what its last parts cost. ``truncate`` drops the last parts added again.
    """

    def __init__(
        self,
        path: Path,
        tags: Mapping[str, str],
        cover: bytes | None = None,
        cover_kind: str | None = None,
        index_room: int = 0,
    ) -> None:
        self._path, self._tags = path, tags
        self._cover, self._cover_kind = cover, cover_kind
        self._config: AudioConfig | None = None
        self._chapters: Sequence[tuple[int, str]] = ()
        self._sizes: list[np.ndarray] = []
        self._room = max(index_room, _MIN_ROOM)
        self._audio_start = len(_FILE_TYPE) + self._room
        self._ends = [self._audio_start]  # where each part's audio ends in the file, after the first
        self._out: IO[bytes] = path.open("w+b")
        try:
            self._out.write(_FILE_TYPE + _free(self._room))
        except BaseException:
            self._out.close()
            raise

    @property
    def parts(self) -> int:
        """The parts added so far."""
        return len(self._sizes)

    def add(self, data: bytes) -> None:
        """Append one part: a whole bare ADTS stream."""
        config, offsets, headers = adts_frames(data)
        if self._config is not None and config != self._config:
            raise AdtsError("a part's AAC configuration differs from the first part's")
        ends = np.append(offsets[1:], len(data))
        view = memoryview(data)
        payload = (view[a:b] for a, b in zip((offsets + headers).tolist(), ends.tolist(), strict=True))
        self._out.write(b"".join(payload))
        # Counted only once written whole: a failed write is cut off again by the next truncate.
        self._config = config
        self._sizes.append(ends - offsets - headers)
        self._ends.append(self._out.tell())

    def truncate(self, parts: int) -> None:
        """Keep only the first ``parts`` parts."""
        del self._sizes[parts:], self._ends[parts + 1 :]
        if not self._sizes:
            self._config = None
        self._out.seek(self._ends[-1])
        self._out.truncate()

    def close(self, samples: int, chapters: Sequence[tuple[int, str]] = ()) -> None:
        """Finish the file of a book of ``samples`` samples with chapters at ``(start sample, title)``:
        the chapter titles after the audio, then the index."""
        if self._config is None:
            self.abort()
            raise AdtsError("no parts to join")
        try:
            self._samples, self._chapters = samples, chapters
            self.truncate(self.parts)  # cuts off what a failed add left half-written
            titles = self._chapter_samples()
            self._out.write(b"".join(titles))
            mdat_end = self._out.tell()
            sizes = np.concatenate(self._sizes)
            header = _mdat_header(mdat_end - self._audio_start)
            titles_start = self._ends[-1]
            moov = self._movie(sizes, titles, self._audio_start, titles_start)
            filler = self._room - len(header) - len(moov)
            self._out.seek(len(_FILE_TYPE))
            if filler == 0 or filler >= 8:  # the index fits before the audio
                self._out.write(moov + (_free(filler) if filler else b"") + header)
            else:  # the index goes after the audio; the room stays free
                self._out.write(_free(self._room - len(header))[:8])
                self._out.seek(self._audio_start - len(header))
                self._out.write(header)
                self._out.seek(mdat_end)
                self._out.write(moov)
        finally:
            self._out.close()

    def abort(self) -> None:
        self._out.close()

    def _chapter_samples(self) -> list[bytes]:
        titles = [_cut_utf8(title, 1024) for _, title in self._chapters]
        return [struct.pack(">H", len(title)) + title + _ENCD for title in titles]

    def _movie(
        self, sizes: np.ndarray, chapter_samples: list[bytes], audio_start: int, titles_start: int
    ) -> bytes:
        assert self._config is not None
        rate, frames = self._config.sample_rate, len(sizes)
        duration = min(self._samples, frames * ADTS_SAMPLES)
        has_chapters = bool(chapter_samples)
        tracks = [self._audio_track(sizes, audio_start, duration, has_chapters)]
        if has_chapters:
            tracks.append(self._chapter_track(chapter_samples, titles_start, duration))
        header = _times(rate, duration) + struct.pack(">IH", 0x10000, 0x100) + bytes(10)
        header += _UNITY_MATRIX + bytes(24) + struct.pack(">I", len(tracks) + 1)
        starts = [start / rate for start, _ in self._chapters]
        ilst = _box(b"ilst", itunes_tags(self._tags, self._cover, self._cover_kind))
        udta = [_full_box(b"meta", 0, 0, _handler(b"mdir", b"", maker=b"appl"), ilst)]
        if has_chapters:
            udta.append(nero_chapters(starts, [title for _, title in self._chapters]))
        return _box(
            b"moov", _full_box(b"mvhd", int(_long(duration)), 0, header), *tracks, _box(b"udta", *udta)
        )

    def _audio_track(self, sizes: np.ndarray, audio_start: int, duration: int, chapters: bool) -> bytes:
        assert self._config is not None
        config, frames = self._config, len(sizes)
        seconds = max(frames * ADTS_SAMPLES / config.sample_rate, 1e-9)
        per_second = np.add.reduceat(sizes, np.arange(0, frames, max(1, config.sample_rate // ADTS_SAMPLES)))
        decoder = struct.pack(">BB", 0x40, 0x15) + int(sizes.max()).to_bytes(3, "big")
        decoder += struct.pack(">II", int(per_second.max()) * 8, round(int(sizes.sum()) * 8 / seconds))
        decoder = _descriptor(4, decoder + _descriptor(5, config.specific_config()))
        esds = _full_box(
            b"esds", 0, 0, _descriptor(3, struct.pack(">HB", 1, 0) + decoder + _descriptor(6, b"\x02"))
        )
        entry = (
            bytes(6)
            + struct.pack(">H", 1)
            + bytes(8)
            + struct.pack(">HHHHI", config.channels, 16, 0, 0, config.sample_rate << 16)
        )
        chunk_starts = np.arange(0, frames, SAMPLES_PER_CHUNK)
        ends = np.cumsum(sizes)
        offsets = audio_start + np.concatenate(([0], ends[:-1]))[chunk_starts]
        runs = [(1, SAMPLES_PER_CHUNK)] if frames >= SAMPLES_PER_CHUNK else []
        if frames % SAMPLES_PER_CHUNK:
            runs.append((len(chunk_starts), frames % SAMPLES_PER_CHUNK))
        table = _box(
            b"stbl",
            _full_box(b"stsd", 0, 0, struct.pack(">I", 1), _box(b"mp4a", entry, esds)),
            _full_box(b"stts", 0, 0, struct.pack(">III", 1, frames, ADTS_SAMPLES)),
            _chunk_table(offsets, runs),
            _full_box(b"stsz", 0, 0, struct.pack(">II", 0, frames), sizes.astype(">u4").tobytes()),
            _full_box(b"sgpd", 1, 0, b"roll", struct.pack(">IIh", 2, 1, -1)),
            _full_box(b"sbgp", 0, 0, b"roll", struct.pack(">III", 1, frames, 1)),
        )
        media = _box(
            b"mdia",
            _media_header(config.sample_rate, frames * ADTS_SAMPLES),
            _handler(b"soun", b"SoundHandler"),
            _box(b"minf", _full_box(b"smhd", 0, 0, bytes(4)), _DATA_INFORMATION, table),
        )
        boxes = [_track_header(1, 3, duration, 0x100), _edit_list(duration, 0)]
        if chapters:
            boxes.append(_box(b"tref", _box(b"chap", struct.pack(">I", 2))))
        return _box(b"trak", *boxes, media)

    def _chapter_track(self, samples: list[bytes], start: int, duration: int) -> bytes:
        movie_rate = self._config.sample_rate if self._config else 1
        marks = [min(max(mark, 0), duration) for mark, _ in self._chapters]
        bounds = [0, *marks[1:], duration]
        # A chapter's length is a 32-bit count of the track's units: samples, or ms past 24.8 h.
        rate = movie_rate if int(np.diff(bounds).max()) <= 0xFFFFFFFF else 1000
        bounds = [bound * rate // movie_rate for bound in bounds]
        lengths = np.diff(bounds).tolist()
        offsets = start + np.concatenate(([0], np.cumsum([len(s) for s in samples])[:-1])).astype(np.int64)
        table = _box(
            b"stbl",
            _full_box(b"stsd", 0, 0, struct.pack(">I", 1), _TEXT_SAMPLE_ENTRY),
            _full_box(
                b"stts", 0, 0, struct.pack(">I", len(lengths)), *(struct.pack(">II", 1, n) for n in lengths)
            ),
            _chunk_table(offsets, [(1, 1)]),
            _full_box(
                b"stsz",
                0,
                0,
                struct.pack(">II", 0, len(samples)),
                *(struct.pack(">I", len(s)) for s in samples),
            ),
        )
        base = _full_box(b"gmin", 0, 0, struct.pack(">HHHHHH", 0x40, 0x8000, 0x8000, 0x8000, 0, 0))
        text = _box(b"text", _UNITY_MATRIX)
        media = _box(
            b"mdia",
            _media_header(rate, bounds[-1]),
            _handler(b"text", b"SubtitleHandler"),
            _box(b"minf", _box(b"gmhd", base, text), _DATA_INFORMATION, table),
        )
        return _box(b"trak", _track_header(2, 2, duration, 0), _edit_list(duration, 0), media)
