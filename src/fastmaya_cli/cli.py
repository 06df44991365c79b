"""The command line: argument parsing, and turning errors into one line and an exit code.

Exit codes: 0 ok; 1 runtime failure; 2 usage or input error; 3 finished, but some chunks failed
(they are listed in the manifest); 130 interrupted (SIGINT); 143 terminated (SIGTERM).
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from . import __version__
from .errors import (
    EXIT_FAILED_CHUNKS,
    EXIT_RUNTIME,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_USAGE,
    FastmayaError,
    InputError,
)

EXIT_CODES_HELP = (
    "Exit codes: 0 ok; 1 runtime failure (model, engine, output); 2 usage or input error; "
    "3 finished with failed chunks (listed in the manifest); 130 interrupted; 143 terminated."
)

app = typer.Typer(
    name="fastmaya",
    help="Render whole books to expressive speech with Maya1. " + EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class EngineKind(StrEnum):
    auto = "auto"
    lmdeploy = "lmdeploy"
    hf = "hf"
    scripted = "scripted"


class Backend(StrEnum):
    pytorch = "pytorch"
    turbomind = "turbomind"


class UpsamplerKind(StrEnum):
    auto = "auto"
    speechsr = "speechsr"
    resample = "resample"
    none = "none"


class KVCache(StrEnum):
    bf16 = "bf16"
    int8 = "int8"


class Loudness(StrEnum):
    acx = "acx"
    podcast = "podcast"
    off = "off"


class ProgressMode(StrEnum):
    auto = "auto"
    bar = "bar"
    plain = "plain"
    json = "json"
    none = "none"


class Split(StrEnum):
    none = "none"
    chapters = "chapters"


class Interrupted(Exception):
    def __init__(self, exit_code: int) -> None:
        super().__init__(exit_code)
        self.exit_code = exit_code


def _on_sigterm(signum: int, frame: object) -> None:
    raise Interrupted(EXIT_SIGTERM)


def fail(error: FastmayaError, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    print(f"fastmaya: error: {error.problem}", file=sys.stderr)
    if error.fix:
        print(f"  fix: {error.fix}", file=sys.stderr)
    raise typer.Exit(error.exit_code)


def run_guarded(work, debug: bool) -> int:  # noqa: ANN001 - a callable returning an exit code
    """Run `work`, mapping every failure to a message and a documented exit code."""
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return work()
    except FastmayaError as error:
        fail(error, debug)
    except (KeyboardInterrupt, Interrupted) as stop:
        code = stop.exit_code if isinstance(stop, Interrupted) else EXIT_SIGINT
        print(
            f"fastmaya: interrupted; finished chunks are cached, rerun the same command to resume (exit {code})",
            file=sys.stderr,
        )
        raise typer.Exit(code) from None
    except typer.Exit:
        raise
    except Exception as exc:
        if debug:
            traceback.print_exc()
        print(f"fastmaya: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        print("  fix: rerun with --debug for the traceback, and report it if it persists", file=sys.stderr)
        raise typer.Exit(EXIT_RUNTIME) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


@app.command(epilog=EXIT_CODES_HELP)
def render(
    inputs: Annotated[list[str], typer.Argument(help="Books to read: .txt, .md, .epub, or - for stdin.")],
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            help="Output file, '-' for stdout, or a directory for several books or --split chapters. Default: BOOK.m4b beside the current directory.",
        ),
    ] = None,
    voice: Annotated[
        str, typer.Option(help="Voice description, or @preset from voices.toml (see `fastmaya voices`).")
    ] = "@narrator",
    format: Annotated[
        str | None,
        typer.Option(
            "--format",
            "-f",
            help="wav, flac, mp3, ogg, opus, m4a or m4b. Default: from the output's suffix (wav for stdout, m4b for a directory).",
        ),
    ] = None,
    seed: Annotated[
        int,
        typer.Option(help="Book seed; the same book, voice and seed give the same audio on the same engine."),
    ] = 0,
    engine: Annotated[
        EngineKind,
        typer.Option(
            help="auto: lmdeploy where it is installed and CUDA is present, else hf. 'scripted' needs no model (pipeline testing only)."
        ),
    ] = EngineKind.auto,
    backend: Annotated[Backend, typer.Option(help="LMDeploy backend.")] = Backend.pytorch,
    model: Annotated[
        str, typer.Option(help="Maya1: Hugging Face repo id or local directory.")
    ] = "maya-research/maya1",
    codec: Annotated[
        str, typer.Option(help="SNAC 24 kHz: Hugging Face repo id or local directory.")
    ] = "hubertsiuzdak/snac_24khz",
    upsampler: Annotated[
        UpsamplerKind,
        typer.Option(
            help="24 -> 48 kHz: speechsr (learned), resample, or none (24 kHz output). auto: speechsr when its weights are found."
        ),
    ] = UpsamplerKind.auto,
    upsampler_weights: Annotated[
        str | None,
        typer.Option(help="Path of the SpeechSR-48k weights (upsampler.pth from YatharthS/FlashSR)."),
    ] = None,
    device: Annotated[str, typer.Option(help="Device for the hf engine: auto, cpu, cuda, cuda:1.")] = "auto",
    gpu_memory: Annotated[
        float, typer.Option(help="LMDeploy: share of free GPU memory for the KV cache.")
    ] = 0.85,
    max_batch: Annotated[
        int | None,
        typer.Option(
            help="Most chunks generated at once (LMDeploy: its size for the GPU, at most 512; hf 64 on GPU, 8 on CPU)."
        ),
    ] = None,
    kv_cache: Annotated[
        KVCache, typer.Option(help="LMDeploy KV cache precision; int8 fits twice the batch.")
    ] = KVCache.bf16,
    tp: Annotated[int, typer.Option(help="LMDeploy tensor parallelism: one engine across N GPUs.")] = 1,
    gpus: Annotated[
        str | None,
        typer.Option(
            help="GPUs to use: '0', '0,1' or 'all'. Several GPUs with --tp 1 run one engine per GPU (data parallel)."
        ),
    ] = None,
    decode_beside: Annotated[
        bool,
        typer.Option(
            "--decode-beside/--no-decode-beside",
            help="Decode and upsample in the engine's worker process, on a GPU stream of lower priority than "
            "the engine's (LMDeploy, or several GPUs; experimental, see BENCHMARKS.md); --no-decode-beside "
            "(the default): in the renderer's process.",
        ),
    ] = False,
    manifest: Annotated[
        Path | None,
        typer.Option(help="Write a JSON manifest: each chunk's text, start/end, frames, seed, status."),
    ] = None,
    subtitles: Annotated[
        Path | None, typer.Option(help="Write subtitles from chunk timings (.srt or .vtt).")
    ] = None,
    split: Annotated[
        Split, typer.Option(help="chapters: one numbered file per chapter in the output directory.")
    ] = Split.none,
    loudness: Annotated[
        Loudness,
        typer.Option(
            help="EBU R128 over the whole book: acx (-19 LUFS, -3 dBTP), podcast (-16 LUFS, -1 dBTP), off."
        ),
    ] = Loudness.acx,
    title: Annotated[str | None, typer.Option(help="Title metadata (default: from the book).")] = None,
    author: Annotated[str | None, typer.Option(help="Author metadata (default: from the book).")] = None,
    cover: Annotated[Path | None, typer.Option(help="Cover image (JPEG or PNG) for M4B/M4A/MP3.")] = None,
    pause_sentence: Annotated[float, typer.Option(help="Seconds between sentences.")] = 0.25,
    pause_paragraph: Annotated[float, typer.Option(help="Seconds between paragraphs.")] = 0.6,
    pause_heading: Annotated[float, typer.Option(help="Seconds after a chapter heading.")] = 1.0,
    pause_chapter: Annotated[float, typer.Option(help="Seconds between chapters.")] = 2.0,
    head: Annotated[float, typer.Option(help="Room tone before the book, seconds.")] = 0.5,
    tail: Annotated[float, typer.Option(help="Room tone after the book, seconds.")] = 1.0,
    crossfade_ms: Annotated[float, typer.Option(help="Crossfade at every join, milliseconds.")] = 10.0,
    retries: Annotated[
        int,
        typer.Option(
            help="Retries with a new seed for a chunk whose audio looks wrong (loop, runaway, early stop)."
        ),
    ] = 2,
    preview: Annotated[
        int | None, typer.Option(help="Render only the first N sentences, to hear the voice first.")
    ] = None,
    normalize: Annotated[
        bool,
        typer.Option("--normalize/--no-normalize", help="Speak numbers, dates, currency, abbreviations."),
    ] = True,
    encoding: Annotated[str, typer.Option(help="Text encoding of the input, e.g. latin-1.")] = "utf-8",
    cache_dir: Annotated[
        Path | None, typer.Option(help="Chunk cache for resuming (default ~/.cache/fastmaya).")
    ] = None,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Neither read nor write the chunk cache.")
    ] = False,
    force: Annotated[bool, typer.Option(help="Render even if the output is up to date.")] = False,
    progress: Annotated[
        ProgressMode,
        typer.Option(help="auto: a bar on a terminal, plain lines otherwise; json: one JSON object a line."),
    ] = ProgressMode.auto,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    max_chunk_seconds: Annotated[
        float, typer.Option(help="Longest chunk, in seconds of predicted speech.")
    ] = 18.0,
    words_per_second: Annotated[float, typer.Option(help="Speaking rate used to predict durations.")] = 2.5,
    max_new_tokens: Annotated[int, typer.Option(help="Token limit per chunk (Maya1: 2048).")] = 2048,
    fixed_length: Annotated[
        bool,
        typer.Option(
            help="Generate exactly the predicted length (for random-weight checkpoints and benchmarks)."
        ),
    ] = False,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
) -> None:
    """Render books to audio."""
    from .assemble import BookInfo, OutputSpec, Pauses, format_for
    from .cache import default_cache_dir
    from .engines.factory import parse_gpus
    from .progress import Progress, choose_mode
    from .render import EngineOptions, Renderer, RenderOptions
    from .voices import resolve_voice

    def work() -> int:
        if not debug:
            # The hub client logs every retry of an offline download; our own error says what to do.
            from huggingface_hub.utils import logging as hub_logging

            hub_logging.set_verbosity_error()
        voice_text = resolve_voice(voice)
        if max_batch is not None and max_batch < 1:
            raise InputError(f"--max-batch {max_batch} must be at least 1.", "Pass a positive number.")
        if not 0.05 <= gpu_memory <= 0.98:
            raise InputError(f"--gpu-memory {gpu_memory} is outside 0.05..0.98.", "Try --gpu-memory 0.85.")
        if tp > 1 and gpus:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, parse_gpus(gpus)))
        cover_bytes, cover_mime = _read_cover(cover)
        mode = choose_mode(progress.value, quiet)
        reporter = Progress(mode)
        options = RenderOptions(
            voice=voice_text,
            seed=seed,
            engine=EngineOptions(
                kind=engine.value,
                model=model,
                device=device,
                max_batch=max_batch,
                gpu_memory=gpu_memory,
                kv_cache=kv_cache.value,
                tp=tp,
                gpus=None if tp > 1 else gpus,
                backend=backend.value,
                scripted_faults=_scripted_faults() if engine == EngineKind.scripted else {},
            ),
            codec=codec,
            upsampler=upsampler.value,
            upsampler_weights=upsampler_weights,
            decode_beside=decode_beside,
            retries=retries,
            fixed_length=fixed_length,
            max_new_tokens=max_new_tokens,
            max_chunk_seconds=max_chunk_seconds,
            words_per_second=words_per_second,
            preview=preview,
            normalize=normalize,
            encoding=encoding,
            cache_dir=None if no_cache else (cache_dir or default_cache_dir()),
            force=force,
            pauses=Pauses(
                head=head,
                sentence=pause_sentence,
                paragraph=pause_paragraph,
                heading=pause_heading,
                chapter=pause_chapter,
                tail=tail,
                crossfade=crossfade_ms / 1000.0,
            ),
        )
        targets = plan_outputs(inputs, output, format, split == Split.chapters)
        renderer = Renderer(options, reporter)
        failed = 0
        try:
            for source, path, fmt in targets:
                spec = OutputSpec(
                    path=path,
                    format=format_for(path, fmt) if split != Split.chapters else (fmt or "mp3"),
                    loudness=loudness.value,
                    split_chapters=split == Split.chapters,
                    manifest=manifest if len(targets) == 1 else _sidecar(manifest, path),
                    subtitles=subtitles if len(targets) == 1 else _sidecar(subtitles, path),
                    info=BookInfo(
                        title=title, author=author, narrator=None, cover=cover_bytes, cover_mime=cover_mime
                    ),
                )
                result = renderer.render(source, spec)
                failed += result.failed
        finally:
            renderer.close()
        return EXIT_FAILED_CHUNKS if failed else 0

    code = run_guarded(work, debug)
    if code:
        raise typer.Exit(code)


def plan_outputs(
    inputs: list[str], output: str | None, fmt: str | None, split_chapters: bool
) -> list[tuple[str, Path | None, str | None]]:
    """(source, output path or None for stdout, explicit format) for each book."""
    if not inputs:
        raise InputError("No input given.", "Pass a book file, or - to read stdin.")
    if inputs.count("-") > 1:
        raise InputError("stdin (-) can be read only once.", "Pass - at most once.")
    if output == "-":
        if len(inputs) > 1 or split_chapters:
            raise InputError("Only one book, in one file, can go to stdout.", "Use -o DIR for several books.")
        return [(inputs[0], None, fmt or "wav")]
    if len(inputs) > 1 or split_chapters:
        if output is None:
            raise InputError("Several books, or --split chapters, need an output directory.", "Pass -o DIR/.")
        directory = Path(output)
        if directory.exists() and not directory.is_dir():
            raise InputError(f"{directory} is a file, but an output directory is needed.", "Pass -o DIR/.")
        if not split_chapters and directory.parent.is_dir():
            directory.mkdir(exist_ok=True)  # one level, as `-o shelf/` asks; a missing parent stays an error
        if split_chapters:
            return (
                [(inputs[0], directory, fmt)]
                if len(inputs) == 1
                else [(src, directory / Path(src).stem, fmt) for src in inputs]
            )
        suffix = fmt or "m4b"
        return [
            (src, directory / f"{Path(src).stem if src != '-' else 'stdin'}.{suffix}", fmt) for src in inputs
        ]
    if output is None:
        if inputs[0] == "-":
            raise InputError(
                "Reading stdin needs an output.", "Pass -o book.m4b, or -o - to write to stdout."
            )
        return [(inputs[0], Path(f"{Path(inputs[0]).stem}.{fmt or 'm4b'}"), fmt)]
    return [(inputs[0], Path(output), fmt)]


def _sidecar(path: Path | None, output: Path | None) -> Path | None:
    if path is None or output is None:
        return None
    return output.with_name(f"{output.stem}{path.suffix}")


def _read_cover(cover: Path | None) -> tuple[bytes | None, str | None]:
    if cover is None:
        return None, None
    try:
        data = cover.read_bytes()
    except OSError as exc:
        raise InputError(
            f"Cannot read the cover image {cover}: {exc.strerror}.", "Pass an existing JPEG or PNG."
        ) from exc
    if data.startswith(b"\x89PNG"):
        return data, "image/png"
    if data.startswith(b"\xff\xd8"):
        return data, "image/jpeg"
    raise InputError(f"The cover {cover} is neither JPEG nor PNG.", "Convert it to JPEG or PNG.")


def _counts(text: str | None) -> tuple[int, ...]:
    """'4,8' -> (4, 8); None -> ()."""
    if not text:
        return ()
    try:
        counts = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise InputError(f"'{text}' is not a list of counts.", "Give whole numbers of 1 or more, e.g. 4,8.")
    return counts


def _scripted_faults() -> dict[int, list[str]]:
    """Faults for the scripted engine, for end-to-end tests: FASTMAYA_SCRIPTED_FAULTS='{"3": ["loop"]}'."""
    import json

    raw = os.environ.get("FASTMAYA_SCRIPTED_FAULTS", "")
    return {int(k): list(v) for k, v in json.loads(raw).items()} if raw else {}


@app.command()
def voices(
    voices_file: Annotated[
        Path | None, typer.Option(help="A voices.toml other than the bundled one.")
    ] = None,
) -> None:
    """List the voice presets usable as --voice @name."""
    from .voices import load_presets

    def work() -> int:
        for name, description in load_presets(voices_file).items():
            print(f"@{name}\t{description}")
        return 0

    run_guarded(work, False)


@app.command(epilog=EXIT_CODES_HELP)
def bench(
    model: Annotated[
        str | None,
        typer.Option(help="Real Maya1 weights; default: build Maya1's architecture with random weights."),
    ] = None,
    data_dir: Annotated[
        Path, typer.Option(help="Folder holding travel_145_sentences.txt and pride_and_prejudice.txt.")
    ] = Path("../shared/data"),
    cache_dir: Annotated[Path | None, typer.Option(help="Where to build the random checkpoint.")] = None,
    stages: Annotated[
        str,
        typer.Option(
            help="Comma list: hf,llm,render,novel-llm,novel,decode-mix,bs1,upsampler,codec (GPU) and "
            "finish (CPU only); also contention (GPU): LLM-only passes alone, beside a render's CPU work, "
            "and beside its decoder's GPU work; novel-decode-before, novel-ffmpeg-join, novel-join-after "
            "(GPU): the novel rendered as before a change, an A/B with novel in one run; novel-gather (GPU): "
            "the novel with the decoder waiting up to 2 s for calls of 32 chunks; novel-beside (GPU): the "
            "novel decoded in the engine's worker process (--decode-beside); novel-beside-sms16, -sms24, -sms32, "
            "-sms48 (GPU): the same with the decoder's kernels kept on that many of the GPU's SMs (a CUDA "
            "green context; 0.811 to 0.867 of LLM only on 32 SMs, run AA1); novel-half (GPU): the novel with "
            "SNAC in float16 (a decoder of its own); novel-stand-in (GPU): the novel with each chunk's audio "
            "made on the CPU instead of decoded, a probe of what all but the decoder's GPU work costs; "
            "novel-sleep, novel-beside-sleep (GPU): the novel with the decoder's waits for the GPU sleeping "
            "instead of spinning a core (candidates against novel and novel-beside); "
            "novel-beside-sms32-sleep (GPU): both, on 32 SMs; novel-beside-sms32-sleep-drain (GPU): the same, "
            "on all SMs once the engine's batch drains; and "
            "novel-llm-shared-cores, novel-shared-cores (GPU): the novel with no core kept for the engine's "
            "scheduler thread."
        ),
    ] = "hf,llm,render,novel-llm,novel,decode-mix,bs1,upsampler,codec,finish",
    limit: Annotated[int | None, typer.Option(help="Render only the novel's first N chunks.")] = None,
    render_format: Annotated[
        str, typer.Option(help="Output format of the render stages (m4b and mp3 need ffmpeg).")
    ] = "flac",
    render_loudness: Annotated[
        Loudness, typer.Option(help="Loudness of the render stages' output (acx and podcast need ffmpeg).")
    ] = Loudness.off,
    novel_early_encoders: Annotated[
        str | None,
        typer.Option(
            help="Comma list of early-encoder counts: the novel is rendered once with each, in turn (an A/B "
            "in one run); default: once, with the count the CPUs give."
        ),
    ] = None,
    finish_minutes: Annotated[
        float,
        typer.Option(min=1.0, help="Minutes of real speech the finish stage encodes as an m4b."),
    ] = 60.0,
    repeat: Annotated[
        int, typer.Option(min=1, help="Passes over the travel text (LLM only, render); the median is kept.")
    ] = 3,
    hf_batch: Annotated[int, typer.Option(help="Batch size of the hf anchor.")] = 64,
    hf_chunks: Annotated[
        int, typer.Option(help="Chunks of the travel text for the hf anchor (it is slow).")
    ] = 64,
    max_batch: Annotated[
        int | None, typer.Option(help="LMDeploy max batch (default: LMDeploy's size for the GPU).")
    ] = None,
    gpu_memory: Annotated[float, typer.Option(help="LMDeploy KV cache share.")] = 0.85,
    kv_cache: Annotated[KVCache, typer.Option(help="LMDeploy KV cache precision.")] = KVCache.bf16,
    gpus: Annotated[str | None, typer.Option(help="'all' or '0,1': data-parallel over several GPUs.")] = None,
    upsampler_weights: Annotated[
        str | None, typer.Option(help="SpeechSR-48k weights (default: DATA_DIR/speechsr48k.pth).")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON.")] = None,
    cold_decoder: Annotated[
        bool,
        typer.Option(
            help="Do not warm the decoder with its largest batches at load (the baseline before that warm-up; "
            "compare across two bench processes)."
        ),
    ] = False,
    codec_half: Annotated[
        bool,
        typer.Option(
            help="Every render stage decodes SNAC in float16, the engine worker's decoder too (a candidate: "
            "compare with a bench process without it)."
        ),
    ] = False,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
) -> None:
    """Measure throughput on this GPU: hf anchor, LMDeploy LLM-only, full render, the novel (LLM only and
    rendered), bs=1, upsampler, SNAC; and on the CPU, the m4b finish in one piece and in parts."""
    from .bench import BenchOptions, run_bench

    def work() -> int:
        run_bench(
            BenchOptions(
                model=model,
                data_dir=data_dir,
                cache_dir=cache_dir,
                stages=tuple(s.strip() for s in stages.split(",")),
                limit=limit,
                finish_minutes=finish_minutes,
                render_format=render_format,
                render_loudness=render_loudness.value,
                novel_early_encoders=_counts(novel_early_encoders),
                repeat=repeat,
                hf_batch=hf_batch,
                hf_chunks=hf_chunks,
                max_batch=max_batch,
                gpu_memory=gpu_memory,
                kv_cache=kv_cache.value,
                gpus=gpus,
                upsampler_weights=upsampler_weights,
                json_out=json_out,
                warm_decoder=not cold_decoder,
                codec_half=codec_half,
            )
        )
        return 0

    run_guarded(work, debug)


def version_callback(value: bool) -> None:
    if value:
        print(f"fastmaya {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    pass


def main() -> None:
    try:
        app()
    except SystemExit as exit_:
        code = exit_.code
        # Click reports usage errors with exit code 2 already; keep every code as documented.
        sys.exit(code if isinstance(code, int) else (EXIT_USAGE if code else 0))


if __name__ == "__main__":
    main()
