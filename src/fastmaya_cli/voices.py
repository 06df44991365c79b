"""Voice presets: `--voice @name` reads the description from voices.toml."""

from __future__ import annotations

import tomllib
from pathlib import Path

from .errors import InputError

BUNDLED = Path(__file__).with_name("voices.toml")


def load_presets(path: Path | None = None) -> dict[str, str]:
    source = path or BUNDLED
    try:
        data = tomllib.loads(source.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(
            f"Cannot read the voice presets {source}: {exc.strerror}.", "Check the path."
        ) from exc
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"The voice presets {source} are not valid TOML: {exc}.", "Fix the file.") from exc
    presets = {}
    for name, table in data.items():
        if not isinstance(table, dict) or not isinstance(table.get("description"), str):
            raise InputError(
                f"Voice preset '{name}' in {source} has no description.", 'Add description = "...".'
            )
        presets[name] = table["description"]
    return presets


def resolve_voice(voice: str, path: Path | None = None) -> str:
    """A description as given, or the description of preset `@name`."""
    if not voice.startswith("@"):
        return voice
    presets = load_presets(path)
    name = voice[1:]
    if name not in presets:
        raise InputError(
            f"There is no voice preset '{voice}'.", f"Use one of: {', '.join('@' + n for n in presets)}."
        )
    return presets[name]
