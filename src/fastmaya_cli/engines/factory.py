"""Builds the engine that the options ask for; the only place that knows every engine."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import InputError
from . import Engine

if TYPE_CHECKING:
    from ..beside import DecoderSpec
    from ..render import EngineOptions


def lmdeploy_usable() -> bool:
    if importlib.util.find_spec("lmdeploy") is None:
        return False
    import torch

    return torch.cuda.is_available()


def parse_gpus(gpus: str | None) -> list[int]:
    """'0,1' -> [0, 1]; 'all' -> every visible GPU; None -> []."""
    if not gpus:
        return []
    if gpus == "all":
        import torch

        return list(range(torch.cuda.device_count()))
    try:
        return [int(g) for g in gpus.split(",") if g.strip()]
    except ValueError:
        raise InputError(
            f"--gpus '{gpus}' is not a list of GPU numbers.", "Use --gpus 0,1 or --gpus all."
        ) from None


def resolve_kind(kind: str) -> str:
    if kind == "auto":
        return "lmdeploy" if lmdeploy_usable() else "hf"
    if kind == "lmdeploy" and importlib.util.find_spec("lmdeploy") is None:
        raise InputError(
            "--engine lmdeploy needs the lmdeploy package, which is not installed.",
            "Install it with `pip install 'fastmaya[lmdeploy]'` on a machine with an NVIDIA GPU, or use --engine hf.",
        )
    return kind


def engine_kwargs(options: EngineOptions, kind: str) -> dict:
    if kind == "hf":
        kwargs = dict(
            model=options.model, device=options.device, dtype=options.dtype, sampling=options.sampling
        )
        if options.max_batch:
            kwargs["max_batch"] = options.max_batch
        return kwargs
    if kind == "lmdeploy":
        return dict(
            model=options.model,
            backend=options.backend,
            sampling=options.sampling,
            gpu_memory=options.gpu_memory,
            max_batch=options.max_batch,
            kv_cache=options.kv_cache,
            tp=options.tp,
            engine_config=lmdeploy_overrides(),
        )
    if kind == "scripted":
        return dict(faults=options.scripted_faults)
    raise InputError(f"Unknown engine '{kind}'.", "Use --engine auto, lmdeploy or hf.")


def lmdeploy_overrides() -> dict:
    """Extra LMDeploy engine-config fields from FASTMAYA_LMDEPLOY_CONFIG (a JSON object), for tuning."""
    text = os.environ.get("FASTMAYA_LMDEPLOY_CONFIG", "").strip()
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"FASTMAYA_LMDEPLOY_CONFIG is not valid JSON ({exc.msg} at character {exc.pos}).",
            "Set it to a JSON object, e.g. '{\"prefill_interval\": 8}', or unset it.",
        ) from None
    if not isinstance(value, dict):
        raise InputError("FASTMAYA_LMDEPLOY_CONFIG must be a JSON object.", 'Write it as {"field": value}.')
    return value


def scheduler_cores_wanted() -> bool:
    """Whether each engine worker's scheduler thread gets a core of its own (`cores`): yes, unless
    FASTMAYA_SCHEDULER_CORE=0 (for a host shared with other work, or an A/B)."""
    text = os.environ.get("FASTMAYA_SCHEDULER_CORE", "").strip()
    if text not in ("", "0", "1"):
        raise InputError(
            f"FASTMAYA_SCHEDULER_CORE is {text!r}, which is neither 0 nor 1.",
            "Set it to 0 to let the engine's scheduler thread share its core, 1 (the default) to keep one for it.",
        )
    return text != "0"


FACTORIES = {
    "hf": "fastmaya_cli.engines.hf:HFEngine",
    "lmdeploy": "fastmaya_cli.engines.lmdeploy:LMDeployEngine",
    "scripted": "fastmaya_cli.engines.scripted:ScriptedEngine",
}


def worker_devices(kind: str, gpus: list[int], tp: int) -> list[str] | None:
    """The devices to run the engine on in worker processes, one engine each; None: in this process.

    LMDeploy's scheduler is Python on one thread, and it needs the whole of its interpreter lock to
    keep the GPU fed. In the renderer's process that lock is also taken, in short turns, by the
    decoding and assembling threads, which then wait behind every scheduler step and fall ever
    further behind. So LMDeploy runs in a worker process of its own, one per GPU (data parallel),
    even on one GPU. A tensor-parallel engine spans its GPUs itself and stays in this process.
    """
    if len(gpus) > 1 and tp == 1:
        return [f"cuda:{g}" for g in gpus]
    if kind == "lmdeploy" and tp == 1:
        return [f"cuda:{gpus[0] if gpus else 0}"]
    return None


def create_engine(
    options: EngineOptions, note: Callable[[str], None], *, decoder: DecoderSpec | None = None
) -> Engine:
    """The engine the options ask for; with a `decoder`, an engine in worker processes also decodes
    beside it (see beside.py). An engine in this process ignores `decoder`."""
    kind = resolve_kind(options.kind)
    kwargs = engine_kwargs(options, kind)
    gpus = parse_gpus(options.gpus)
    devices = worker_devices(kind, gpus, options.tp)
    if devices is not None:
        from .pool import EnginePool, EngineSpec

        if len(devices) > 1:
            note(f"data-parallel: one {kind} engine on each of GPUs {', '.join(map(str, gpus))}")
        return EnginePool(
            EngineSpec(FACTORIES[kind], kwargs, decoder=decoder),
            devices,
            on_event=note,
            scheduler_cores=scheduler_cores_wanted(),
        )
    if kind == "hf":
        from .hf import HFEngine

        if gpus:
            kwargs["device"] = f"cuda:{gpus[0]}"
        return HFEngine(**kwargs)
    if kind == "lmdeploy":
        from .lmdeploy import LMDeployEngine

        if gpus:
            # LMDeploy places its engine on the first visible GPU(s).
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
        return LMDeployEngine(**kwargs)
    from .scripted import ScriptedEngine

    return ScriptedEngine(**kwargs)
