"""Output files for the assemble stage: formats, ffmpeg, atomic writes, the output lock and the checks
that run before rendering starts.

* wav and flac are written with soundfile; mp3, ogg (Vorbis), opus, m4a and m4b (AAC) by an ffmpeg
  subprocess that reads raw float32 samples from a pipe, so no format ever needs the whole book in memory.
  ffmpeg is located the way pydub does it (``pydub.utils.which``); pydub's AudioSegment itself is not
  used because it keeps the whole signal in memory.
* Every file is first written under a hidden temporary name in the directory of its final name and then
  moved into place with ``os.replace``, so a reader sees either the old file or the complete new one.
* Disk-full errors from soundfile, ffmpeg or plain writes become ``RuntimeFailure("disk full while
  writing X", fix)``.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import unicodedata
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

import numpy as np
import soundfile as sf

from fastmaya_cli.errors import InputError, RuntimeFailure
from fastmaya_cli.loudness import kill_process, loudness_target


@dataclass(frozen=True)
class OutputFormat:
    name: str
    suffix: str
    encoder: str | None  # ffmpeg encoder; None = written with soundfile
    muxer: str | None
    default_bitrate: str | None = None
    vorbis_quality: str | None = None
    fixed_sample_rate: int | None = None
    supports_cover: bool = False

    @property
    def needs_ffmpeg(self) -> bool:
        return self.encoder is not None


FORMATS: dict[str, OutputFormat] = {
    "wav": OutputFormat("wav", ".wav", None, None),
    "flac": OutputFormat("flac", ".flac", None, None),
    "mp3": OutputFormat("mp3", ".mp3", "libmp3lame", "mp3", default_bitrate="128k", supports_cover=True),
    "ogg": OutputFormat("ogg", ".ogg", "libvorbis", "ogg", vorbis_quality="4"),
    # Opus only runs at 48 kHz (or fractions of it); always encode at 48 kHz.
    "opus": OutputFormat("opus", ".opus", "libopus", "opus", default_bitrate="32k", fixed_sample_rate=48000),
    # ffmpeg's ipod muxer writes the iTunes-style atoms audiobook players read (chapters, covr, tags).
    "m4a": OutputFormat("m4a", ".m4a", "aac", "ipod", default_bitrate="64k", supports_cover=True),
    "m4b": OutputFormat("m4b", ".m4b", "aac", "ipod", default_bitrate="64k", supports_cover=True),
}
_SUFFIX_ALIASES = {".oga": "ogg", ".wave": "wav"}
SUBTITLE_SUFFIXES = (".srt", ".vtt")

# A plain RIFF/WAVE file cannot describe more than 4 GiB; RF64 is used above this size.
_WAV_LIMIT_BYTES = 0xFFFFFFFF - 1024

_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_DISK_FULL_FIX = "Free some space on that disk, or choose an output on another disk, then run again."


@dataclass(frozen=True)
class BookInfo:
    title: str | None = None
    author: str | None = None
    narrator: str | None = None  # the voice description
    cover: bytes | None = None
    cover_mime: str | None = None


@dataclass(frozen=True)
class OutputSpec:
    path: Path | None  # None = stdout
    format: str  # "wav"|"flac"|"mp3"|"ogg"|"opus"|"m4a"|"m4b"
    sample_rate: int = 48000
    loudness: str = "acx"  # "acx" | "podcast" | "off"
    split_chapters: bool = False  # path is a directory; one numbered file per chapter
    manifest: Path | None = None
    subtitles: Path | None = None  # .srt or .vtt by suffix
    info: BookInfo = field(default_factory=BookInfo)
    bit_depth: int = 16  # wav and flac only: 16 or 24
    bitrate: str | None = None  # lossy formats: ffmpeg bitrate such as "128k"; None = the format's default


# ---------------------------------------------------------------------------------------------- formats


def format_for(path: Path | None, explicit: str | None) -> str:
    """The output format: ``explicit`` (--format) if given, else from the path's suffix."""
    names = ", ".join(FORMATS)
    suffix_format = _format_of_suffix(path) if path is not None else None
    if explicit:
        name = explicit.strip().lower().lstrip(".")
        name = _SUFFIX_ALIASES.get("." + name, name)
        if name not in FORMATS:
            raise InputError(f"unknown output format {explicit!r}.", f"Use one of: {names}.")
        if suffix_format is not None and suffix_format != name:
            raise InputError(
                f"--format {name} does not match the output name {path.name}.",  # type: ignore[union-attr]
                f"Name the file with {FORMATS[name].suffix}, or drop --format.",
            )
        return name
    if path is None:
        raise InputError("writing to stdout needs a format.", f"Pass --format (one of: {names}).")
    if suffix_format is None:
        raise InputError(
            f"cannot tell the audio format from {path.name!r}.",
            f"End the name with one of {', '.join(f.suffix for f in FORMATS.values())}, or pass --format.",
        )
    return suffix_format


def _format_of_suffix(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in _SUFFIX_ALIASES:
        return _SUFFIX_ALIASES[suffix]
    return next((name for name, fmt in FORMATS.items() if fmt.suffix == suffix), None)


def find_ffmpeg() -> str | None:
    """Path of the ffmpeg executable, found the way pydub finds it; None if it is not installed."""
    try:
        with warnings.catch_warnings():
            # pydub.utils imports audioop, deprecated in Python 3.11-3.12 and gone in 3.13.
            warnings.simplefilter("ignore", DeprecationWarning)
            from pydub.utils import which
    except ImportError:
        which = shutil.which
    return which("ffmpeg")


@functools.lru_cache(maxsize=8)
def ffmpeg_encoders(ffmpeg: str) -> frozenset[str]:
    run = subprocess.run([ffmpeg, "-hide_banner", "-encoders"], capture_output=True, text=True, check=False)
    names = set()
    for line in run.stdout.splitlines():
        parts = line.split()
        # Lines look like " A....D libmp3lame   libmp3lame MP3 ..."; the header block has no flag column.
        if len(parts) >= 2 and len(parts[0]) == 6 and parts[0][0] in "AVS":
            names.add(parts[1])
    return frozenset(names)


def require_ffmpeg(why: str) -> str:
    ffmpeg = find_ffmpeg()
    if ffmpeg is None:
        raise RuntimeFailure(
            f"ffmpeg is not installed, and {why}.",
            "Install ffmpeg (Debian/Ubuntu: apt install ffmpeg; macOS: brew install ffmpeg) "
            "or write .wav/.flac with --loudness off.",
        )
    return ffmpeg


# ----------------------------------------------------------------------------------------------- checks


def check_output(spec: OutputSpec) -> None:
    """Check everything about the output that can be checked before rendering starts."""
    fmt = FORMATS.get(spec.format)
    if fmt is None:
        raise InputError(f"unknown output format {spec.format!r}.", f"Use one of: {', '.join(FORMATS)}.")
    if spec.sample_rate <= 0:
        raise InputError(f"invalid sample rate {spec.sample_rate}.", "Use a positive rate such as 48000.")
    if spec.bit_depth not in (16, 24):
        raise InputError(f"invalid bit depth {spec.bit_depth}.", "Use 16 or 24.")
    target = loudness_target(spec.loudness)

    if spec.path is None:
        if spec.split_chapters:
            raise InputError("one file per chapter cannot go to stdout.", "Give an output directory.")
        _check_writable_dir(Path(tempfile.gettempdir()), "the temporary directory")
        isatty = getattr(sys.stdout, "isatty", None)
        if isatty is not None and isatty():
            raise InputError(
                "refusing to write binary audio to a terminal.", "Redirect stdout, or give an output file."
            )
    elif spec.split_chapters:
        if spec.path.exists() and not spec.path.is_dir():
            raise InputError(
                f"{spec.path} is a file, but one file per chapter needs a directory.",
                "Give a directory (it is created if missing), or drop --split-chapters.",
            )
        if spec.path.is_dir():
            _check_writable_dir(spec.path, "the output directory")
        _check_writable_dir(spec.path.parent, "the directory that holds the output directory")
    else:
        if spec.path.is_dir():
            raise InputError(
                f"the output {spec.path} is a directory.",
                f"Give a file name such as {spec.path / ('book' + fmt.suffix)}, "
                "or use --split-chapters for one file per chapter.",
            )
        _check_writable_dir(spec.path.parent, "the output directory")

    for label, extra in (("manifest", spec.manifest), ("subtitles", spec.subtitles)):
        if extra is None:
            continue
        if spec.path is not None and _same_path(extra, spec.path):
            raise InputError(f"the {label} file is the same as the audio output.", "Give it another name.")
        if extra.is_dir():
            raise InputError(f"the {label} path {extra} is a directory.", "Give a file name.")
        _check_writable_dir(extra.parent, f"the {label} directory")
    if spec.subtitles is not None and spec.subtitles.suffix.lower() not in SUBTITLE_SUFFIXES:
        raise InputError(
            f"cannot tell the subtitle format from {spec.subtitles.name!r}.",
            "End the name with .srt or .vtt.",
        )

    if fmt.needs_ffmpeg:
        ffmpeg = require_ffmpeg(f"it is needed to write {fmt.name} files")
        if fmt.encoder not in ffmpeg_encoders(ffmpeg):
            raise RuntimeFailure(
                f"this ffmpeg ({ffmpeg}) has no {fmt.encoder} encoder, needed for {fmt.name} files.",
                "Install a full ffmpeg build (the distribution package has it), or choose another format.",
            )
    if target is not None:
        require_ffmpeg("it measures loudness (EBU R128)")


def _check_writable_dir(directory: Path, label: str) -> None:
    directory = directory if str(directory) else Path(".")
    if not directory.exists():
        raise InputError(
            f"{label} {directory} does not exist.",
            f"Create it first (mkdir -p {directory}) or choose another output path.",
        )
    if not directory.is_dir():
        raise InputError(f"{label} {directory} is not a directory.", "Choose another output path.")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise InputError(
            f"cannot write to {label} {directory}: it is read-only or you lack permission.",
            "Choose a writable output directory, or fix its permissions.",
        )


def _same_path(a: Path, b: Path) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


# ------------------------------------------------------------------------------------------------- lock


def lock_path_for(path: Path) -> Path:
    return path.parent / f".{path.name}.fastmaya.lock"


@contextmanager
def output_lock(path: Path) -> Iterator[Path]:
    """Hold an exclusive lock on ``path`` for the whole run, so two runs never write the same output.

    The lock is ``flock`` on a hidden file beside the output. It is released (and the lock file removed) on
    exit, and by the kernel if the process dies.
    """
    lock_path = lock_path_for(path)
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise InputError(
                f"cannot create the lock file {lock_path}: {error.strerror}.",
                "Choose a writable output directory.",
            ) from error
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeFailure(
                f"another fastmaya run is writing {path}.",
                "Wait for it to finish, or choose another output path.",
            ) from None
        # The holder before us unlinks the file when it is done; if we locked that unlinked file, retry on
        # the new one, or two runs could each hold "the" lock.
        try:
            current = os.stat(lock_path)
        except FileNotFoundError:
            current = None
        held = os.fstat(fd)
        if current is not None and (current.st_ino, current.st_dev) == (held.st_ino, held.st_dev):
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield lock_path
    finally:
        with suppress(FileNotFoundError):
            lock_path.unlink()
        os.close(fd)


# ------------------------------------------------------------------------------------ temporary files


_TEMP_MARK = ".fastmaya-tmp"


def reserve_temp(directory: Path, name: str, suffix: str) -> Path:
    """Create an empty hidden file in ``directory`` with a fresh name and return its path.

    Created with mode 0666 minus the umask (unlike mkstemp's 0600), so the final file gets the permissions
    any newly written file would.
    """
    while True:
        candidate = directory / f".{name}.{secrets.token_hex(4)}{_TEMP_MARK}{suffix}"
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return candidate


def stale_temps(directory: Path, name: str) -> list[Path]:
    """The files ``reserve_temp(directory, name, ...)`` made that are still there: left by a run that was killed
    (a run that fails or is stopped removes its own). Only someone holding ``output_lock`` for ``name`` may
    take them for stale."""
    pattern = re.compile(rf"\.{re.escape(name)}\.[0-9a-f]{{8}}{re.escape(_TEMP_MARK)}.*", re.DOTALL)
    try:
        entries = list(directory.iterdir())
    except OSError:  # not there yet
        return []
    return sorted(path for path in entries if pattern.fullmatch(path.name) and path.is_file())


def remove_quietly(path: Path) -> None:
    with suppress(FileNotFoundError):
        path.unlink()


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_file(path: Path, text: str, shown_as: Path) -> None:
    try:
        with open(path, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        raise write_failure(shown_as, error) from error


# ------------------------------------------------------------------------------------------------ errors


def is_disk_full(error: BaseException | str) -> bool:
    if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
        return True
    if isinstance(error, sf.LibsndfileError):
        # libsndfile reports write failures as a bare "System error"; the C errno says which one.
        ffi = getattr(sf, "_ffi", None)
        if ffi is not None and getattr(ffi, "errno", None) in _DISK_FULL_ERRNOS:
            return True
    text = str(error)
    return "No space left on device" in text or "Disk quota exceeded" in text


def write_failure(target: Path | str, error: BaseException | str) -> RuntimeFailure:
    if is_disk_full(error):
        return RuntimeFailure(f"disk full while writing {target}.", _DISK_FULL_FIX)
    detail = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    return RuntimeFailure(f"could not write {target}: {detail}.", "Check the disk and the output path.")


# ------------------------------------------------------------------------------------------------- names


def safe_file_title(title: str, max_bytes: int = 120) -> str:
    """A chapter title made safe as part of a file name on Linux, macOS and Windows."""
    text = unicodedata.normalize("NFC", title)
    text = re.sub(r'[\x00-\x1f\x7f/\\:*?"<>|]+', " ", text)
    text = re.sub(r"\s+", " ", text).strip(" .")
    # Most file systems allow 255 bytes per name; leave room for the number and the suffix.
    text = text.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")
    return text.rstrip(" .")


def chapter_file_name(index: int, total: int, title: str | None, suffix: str) -> str:
    width = max(2, len(str(total)))
    safe = safe_file_title(title or "") or f"Chapter {index}"
    return f"{index:0{width}d} - {safe}{suffix}"


# ---------------------------------------------------------------------------------------------- metadata


@dataclass(frozen=True)
class ChapterEntry:
    start_sample: int
    end_sample: int
    title: str


def book_tags(
    info: BookInfo, *, title: str | None = None, track: tuple[int, int] | None = None
) -> dict[str, str]:
    """Tags audiobook players read: title, author as artist/album artist, book as album, narrator as
    composer (Audiobookshelf and most players show composer as the narrator)."""
    tags: dict[str, str] = {"genre": "Audiobook"}
    shown_title = title or info.title
    if shown_title:
        tags["title"] = shown_title
    if info.title:
        tags["album"] = info.title
    if info.author:
        tags["artist"] = info.author
        tags["album_artist"] = info.author
    if info.narrator:
        tags["composer"] = info.narrator
        tags["narrator"] = info.narrator
        tags["comment"] = f"Narrated by {info.narrator}"
    if track is not None:
        tags["track"] = f"{track[0]}/{track[1]}"
    return tags


def _ffmetadata_escape(value: str) -> str:
    return re.sub(r"([=;#\\\n])", r"\\\1", value)


def ffmetadata(tags: Mapping[str, str], chapters: Sequence[ChapterEntry], sample_rate: int) -> str:
    """An ffmpeg metadata file (``-f ffmetadata``) with global tags and CHAPTER entries in samples."""
    lines = [";FFMETADATA1"]
    lines += [f"{key}={_ffmetadata_escape(value)}" for key, value in tags.items()]
    for chapter in chapters:
        lines += [
            "",
            "[CHAPTER]",
            f"TIMEBASE=1/{sample_rate}",
            f"START={chapter.start_sample}",
            f"END={chapter.end_sample}",
            f"title={_ffmetadata_escape(chapter.title)}",
        ]
    return "\n".join(lines) + "\n"


def image_kind(data: bytes) -> str | None:
    """The image type by its magic bytes: "jpeg", "png", or None for anything else."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    return None


# --------------------------------------------------------------------------------------------- subtitles


@dataclass(frozen=True)
class Cue:
    start: float
    end: float
    text: str


def _timestamp(seconds: float, separator: str) -> str:
    millis = max(0, round(seconds * 1000))
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def subtitles_text(cues: Sequence[Cue], kind: str) -> str:
    """SRT (kind "srt") or WebVTT (kind "vtt") text for the cues, one cue per chunk."""
    blocks: list[str] = ["WEBVTT\n"] if kind == "vtt" else []
    for number, cue in enumerate(cues, 1):
        # A blank line ends a cue in both formats, and "-->" marks a timing line.
        text = re.sub(r"\s+", " ", cue.text).strip().replace("-->", "->") or "…"
        if kind == "vtt":
            text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            blocks.append(f"{_timestamp(cue.start, '.')} --> {_timestamp(cue.end, '.')}\n{text}\n")
        else:
            blocks.append(f"{number}\n{_timestamp(cue.start, ',')} --> {_timestamp(cue.end, ',')}\n{text}\n")
    return "\n".join(blocks)


def subtitle_kind(path: Path) -> str:
    return "vtt" if path.suffix.lower() == ".vtt" else "srt"


# ----------------------------------------------------------------------------------------------- writers


class AudioWriter(Protocol):
    def write(self, samples: np.ndarray) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


def to_pcm(samples: np.ndarray, bit_depth: int) -> np.ndarray:
    """Float samples as PCM integers: scaled by 2**(bits-1), rounded half to even, clipped to the
    integer range (so +1.0 is the largest code). Converting the whole block in numpy rather than per
    sample inside libsndfile made a 16-bit FLAC encode about 18% faster (24-bit: 9%). 24-bit samples sit
    in the top three bytes of int32, where libsndfile reads them."""
    full_scale = float(1 << (bit_depth - 1))
    scaled = np.rint(samples.astype(np.float32, copy=False) * np.float32(full_scale))
    codes = np.clip(scaled, -full_scale, full_scale - 1)
    if bit_depth == 16:
        return codes.astype(np.int16)
    return codes.astype(np.int32) << 8


class SoundfileWriter:
    """wav or flac, 16- or 24-bit PCM, through soundfile. Samples are clipped to [-1, 1]."""

    _TAG_ATTRIBUTES = {"title": "title", "artist": "artist", "album": "album", "genre": "genre"}

    def __init__(
        self,
        path: Path,
        fmt: OutputFormat,
        sample_rate: int,
        bit_depth: int,
        total_samples: int,
        tags: Mapping[str, str],
        shown_as: Path | str,
    ) -> None:
        self._shown_as = shown_as
        self._bit_depth = bit_depth
        subtype = f"PCM_{bit_depth}"
        container = "FLAC"
        if fmt.name == "wav":
            container = "RF64" if total_samples * (bit_depth // 8) > _WAV_LIMIT_BYTES else "WAV"
        try:
            self._file = sf.SoundFile(
                str(path), "w", samplerate=sample_rate, channels=1, format=container, subtype=subtype
            )
        except (sf.LibsndfileError, OSError) as error:
            raise write_failure(shown_as, error) from error
        # Tags must be set before the first sample is written.
        for key, attribute in self._TAG_ATTRIBUTES.items():
            if key in tags:
                self._set_tag(attribute, tags[key])
        if "comment" in tags:
            self._set_tag("comment", tags["comment"])
        if "track" in tags:
            self._set_tag("tracknumber", tags["track"])

    def _set_tag(self, attribute: str, value: str) -> None:
        # Some containers (RF64) take no text tags; the audio matters more.
        with suppress(sf.LibsndfileError, RuntimeError):
            setattr(self._file, attribute, value)

    def write(self, samples: np.ndarray) -> None:
        try:
            self._file.write(to_pcm(samples, self._bit_depth))
        except (sf.LibsndfileError, OSError, AssertionError) as error:
            raise write_failure(self._shown_as, error) from error

    def close(self) -> None:
        try:
            self._file.close()
        except (sf.LibsndfileError, OSError) as error:
            raise write_failure(self._shown_as, error) from error

    def abort(self) -> None:
        with suppress(Exception):  # already failing; the caller removes the temp file
            self._file.close()


@dataclass(frozen=True)
class StreamCodec:
    """An ffmpeg encoder whose bare stream can be cut at frame boundaries and joined byte for byte: its
    frames carry their own headers, so parts encoded apart concatenate into one valid stream."""

    muxer: str  # ffmpeg muxer that writes the bare stream
    demuxer: str  # and the demuxer that reads it back
    frame: int  # samples per frame
    lead: int  # samples a decoder puts before the first input sample (encoder delay and priming)
    pad: int  # samples of padding the encoder always adds after the input, at the least
    rates: frozenset[int]  # sample rates for which frame, lead and pad hold
    bare_args: tuple[str, ...] = ()  # muxer options for a part: nothing but frames
    joined_args: tuple[str, ...] = ()  # muxer options for the file the parts are joined into


# As ffmpeg's decoders see them (tests/test_split_encode.py measures all three): ffmpeg's AAC encoder
# primes one frame and pads the input to whole frames. LAME delays by 576 samples and its decoders by 529
# more; its output is the input rounded up to whole frames plus one frame (1152 samples at 32 kHz and
# above), so 1105 samples of lead leave 47 of padding at the least. Bare MP3 parts carry no ID3 tag and no
# Xing frame: inside the joined stream either would cost a decoder the frame after it. The joined file
# has no Xing frame either: its encoder-delay field would make decoders skip samples the cuts account for.
_NO_XING = ("-write_xing", "0")
STREAM_CODECS: dict[str, StreamCodec] = {
    "aac": StreamCodec("adts", "aac", 1024, 1024, 0, frozenset({24000, 32000, 44100, 48000})),
    "libmp3lame": StreamCodec(
        "mp3",
        "mp3",
        1152,
        1105,
        47,
        frozenset({32000, 44100, 48000}),
        bare_args=(*_NO_XING, "-id3v2_version", "0"),
        joined_args=_NO_XING,
    ),
}


def stream_codec_for(fmt: OutputFormat, sample_rate: int) -> StreamCodec | None:
    """The codec to encode ``fmt`` in parts with, or None when it must be encoded in one piece."""
    codec = STREAM_CODECS.get(fmt.encoder or "")
    if codec is None or fmt.fixed_sample_rate is not None or sample_rate not in codec.rates:
        return None
    return codec


# With several inputs ffmpeg reads each in a thread, through a queue of this many packets; a short queue
# stalls the pipe. Encoded frames are small packets (a few hundred bytes), so a joined stream needs a
# long one: with 256 its remux took 2.3 s for 21 minutes of AAC, with 4096 0.3 s.
_RAW_QUEUE, _ENCODED_QUEUE = "256", "4096"


def _raw_input_args(sample_rate: int) -> list[str]:
    raw = ["-f", "f32le", "-ar", str(sample_rate), "-ac", "1"]
    return ["-thread_queue_size", _RAW_QUEUE, *raw, "-i", "pipe:0"]


def _tag_args(metadata_file: Path, cover_file: Path | None) -> list[str]:
    """The metadata (and cover) inputs after the audio input, then the maps that use them."""
    args = ["-f", "ffmetadata", "-i", str(metadata_file)]
    if cover_file is not None:
        args += ["-i", str(cover_file)]
    args += ["-map", "0:a", "-map_metadata", "1", "-map_chapters", "1"]
    if cover_file is not None:
        args += ["-map", "2:v", "-c:v", "copy", "-disposition:v:0", "attached_pic"]
    return args


def _encoder_args(fmt: OutputFormat, sample_rate: int, bitrate: str | None) -> list[str]:
    args = ["-c:a", str(fmt.encoder)]
    if fmt.vorbis_quality is not None and bitrate is None:
        args += ["-q:a", fmt.vorbis_quality]
    elif bitrate or fmt.default_bitrate:
        args += ["-b:a", str(bitrate or fmt.default_bitrate)]
    if fmt.fixed_sample_rate is not None and fmt.fixed_sample_rate != sample_rate:
        args += ["-ar", str(fmt.fixed_sample_rate)]
    return args


def _container_args(fmt: OutputFormat) -> list[str]:
    if fmt.name == "mp3":
        return ["-id3v2_version", "3"]  # the ID3 version every player reads
    if fmt.muxer == "ipod":
        return ["-movflags", "+faststart"]  # index first, so players can start before the end
    return []


class FfmpegWriter:
    """Feeds an ffmpeg subprocess through a pipe: raw float32 samples to encode (the constructor and
    ``bare_stream``) or an encoded stream to put into a container (``remux``)."""

    def __init__(
        self,
        ffmpeg: str,
        path: Path,
        fmt: OutputFormat,
        sample_rate: int,
        bitrate: str | None,
        metadata_file: Path,
        cover_file: Path | None,
        shown_as: Path | str,
    ) -> None:
        """Encode samples into ``path`` as ``fmt``, with tags and chapters from an ffmetadata file."""
        command = _raw_input_args(sample_rate) + _tag_args(metadata_file, cover_file)
        command += _encoder_args(fmt, sample_rate, bitrate) + _container_args(fmt)
        self._launch(ffmpeg, command + ["-f", str(fmt.muxer), str(path)], shown_as)

    @classmethod
    def bare_stream(
        cls,
        ffmpeg: str,
        path: Path,
        fmt: OutputFormat,
        codec: StreamCodec,
        sample_rate: int,
        bitrate: str | None,
        shown_as: Path | str,
    ) -> FfmpegWriter:
        """Encode samples into a bare stream with no tags, one part of a file that ``remux`` finishes."""
        writer = cls.__new__(cls)
        command = _raw_input_args(sample_rate) + ["-map", "0:a"] + _encoder_args(fmt, sample_rate, bitrate)
        command += [*codec.bare_args, "-f", codec.muxer, str(path)]
        writer._launch(ffmpeg, command, shown_as)
        return writer

    @classmethod
    def remux(
        cls,
        ffmpeg: str,
        path: Path,
        fmt: OutputFormat,
        codec: StreamCodec,
        metadata_file: Path,
        cover_file: Path | None,
        shown_as: Path | str,
    ) -> FfmpegWriter:
        """Put the bare stream given to ``write_bytes`` into ``fmt``'s container, copied, not re-encoded."""
        writer = cls.__new__(cls)
        command = ["-thread_queue_size", _ENCODED_QUEUE, "-f", codec.demuxer, "-i", "pipe:0"]
        command += _tag_args(metadata_file, cover_file)
        command += ["-c:a", "copy", *_container_args(fmt), *codec.joined_args]
        writer._launch(ffmpeg, command + ["-f", str(fmt.muxer), str(path)], shown_as)
        return writer

    def _launch(self, ffmpeg: str, arguments: list[str], shown_as: Path | str) -> None:
        self._shown_as = shown_as
        # Lives as long as the ffmpeg process, so no with-block; closed in close()/abort().
        self._log: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        command = [ffmpeg, "-hide_banner", "-nostats", "-loglevel", "error", "-y", *arguments]
        try:
            self._process: subprocess.Popen[bytes] | None = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._log
            )
        except OSError as error:
            self._log.close()
            raise RuntimeFailure(
                f"could not start ffmpeg: {error}.", "Check the ffmpeg installation."
            ) from error

    def lower_priority(self, niceness: int) -> bool:
        """Let the encoder have a core only when the rest of the render leaves one (``os.setpriority``;
        never more than it has); False where the system does not allow it: it then runs as before."""
        process = self._process
        if process is None or not hasattr(os, "setpriority"):
            return False
        try:
            now = os.getpriority(os.PRIO_PROCESS, process.pid)
            os.setpriority(os.PRIO_PROCESS, process.pid, max(now, niceness))
        except OSError:  # gone already, or not permitted
            return False
        return True

    def write(self, samples: np.ndarray) -> None:
        self.write_bytes(np.clip(samples, -1.0, 1.0).astype("<f4", copy=False).tobytes())

    def write_bytes(self, data: bytes) -> None:
        process = self._process
        assert process is not None and process.stdin is not None
        try:
            process.stdin.write(data)
        except BrokenPipeError as error:
            self._process = None
            process.wait()
            raise self._failure() from error

    def close(self) -> None:
        process = self._process
        assert process is not None
        self._process = None
        try:
            if process.stdin is not None:
                process.stdin.close()
        except BrokenPipeError:
            pass
        if process.wait() != 0:
            raise self._failure()
        self._log.close()

    def abort(self) -> None:
        kill_process(self._process)
        self._process = None
        self._log.close()

    def _failure(self) -> RuntimeFailure:
        self._log.seek(0)
        log = self._log.read().decode("utf-8", "replace")
        self._log.close()
        if is_disk_full(log):
            return RuntimeFailure(f"disk full while writing {self._shown_as}.", _DISK_FULL_FIX)
        lines = [line.strip() for line in log.strip().splitlines() if line.strip()]
        return RuntimeFailure(
            f"ffmpeg could not write {self._shown_as}: {' | '.join(lines[-3:]) or 'no message'}.",
            "Check the ffmpeg installation and the output path.",
        )


def copy_to_stdout(path: Path) -> None:
    """Stream a finished temporary file to stdout (binary)."""
    stream = getattr(sys.stdout, "buffer", sys.stdout)
    try:
        with open(path, "rb") as source:
            shutil.copyfileobj(source, stream, 1 << 20)
        stream.flush()
    except BrokenPipeError as error:
        raise RuntimeFailure(
            "the program reading fastmaya's output stopped before the book was complete.",
            "Check the command the output is piped into.",
        ) from error
