"""The web demo's engine, without Gradio: the models it offers, one loaded at a time, generations one at a time on a
worker thread of its own, and each image written as a PNG with its settings. `ui.py` puts a page on it; scripts and
tests can use it directly.

All MLX work runs on the one worker thread, whatever thread a request arrives on: MLX streams belong to the thread
that made them, and a thread that used MLX must end with `mx.clear_streams()` (MLX 0.32 can abort at exit
otherwise), which only a thread we own can promise.
"""

from __future__ import annotations

import gc
import queue
import tempfile
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as WaitTimeout  # not the builtin before Python 3.11
from dataclasses import dataclass
from pathlib import Path

from ..cli import one_line
from ..errors import InputError, WeightsError
from ..io.folder import INFO_FILE, read_info
from ..io.images import write_image
from ..pipelines import BUILTIN_MODEL, BUILTIN_NAME, GenerationSettings, load_pipeline

FAMILY_NAMES = {"flux": "FLUX.1", "sd3": "SD3"}


@dataclass(frozen=True)
class ModelEntry:
    """A model the picker offers: the built-in one or a converted folder (broken ones too: picking one says why)."""

    name: str  # what the picker and the API call it: "built-in", or the folder's name
    path: Path
    family: str = ""
    variant: str = ""
    bits: int | None = None
    size_gb: float = 0.0
    problem: str = ""  # why the folder cannot be used, if it cannot

    @property
    def label(self) -> str:
        if self.problem:
            return f"{self.name} (broken: {self.problem})"
        bits = f"{self.bits}-bit" if self.bits else "not quantized"
        size = f"{self.size_gb * 1024:.0f} MB" if self.size_gb < 1 else f"{self.size_gb:.1f} GB"
        return f"{self.name}: {FAMILY_NAMES.get(self.family, self.family)} {self.variant}, {bits}, {size}"


def _entry(name: str, path: Path) -> ModelEntry:
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / (1 << 30)
    try:
        info = read_info(path)
    except (WeightsError, InputError, OSError) as e:
        return ModelEntry(name, path, size_gb=size, problem=one_line(e)[:120])
    return ModelEntry(name, path, info["family"], info.get("variant", ""), info.get("bits"), size)


def find_models(models_dir) -> list[ModelEntry]:
    """The built-in model, then every converted folder in `models_dir` (a folder with an mlx_diffusion.json), by name."""
    models = [_entry(BUILTIN_NAME, BUILTIN_MODEL)]
    folder = Path(models_dir)
    if folder.is_dir():
        models += [_entry(p.name, p) for p in sorted(folder.iterdir()) if (p / INFO_FILE).is_file()]
    return models


@dataclass(frozen=True)
class ModelLimits:
    """What the page shows and allows for a model, from its folder (no weights read)."""

    name: str
    family: str
    default_steps: int
    default_guidance: float | None
    default_width: int
    default_height: int
    size_multiple: int
    max_size: int | None
    uses_guidance: bool  # FLUX.1-schnell has no guidance input
    uses_negative_prompt: bool  # SD3 (classifier-free guidance); FLUX only with true CFG, which the page leaves out


class Service:
    """Models by name, one in memory at a time, and generations one after the other on the service's worker thread.

    `output_dir`: where images are written (a new temporary folder by default). Every method may be called from any
    thread; each blocks until its turn on the worker has come and gone. Call `close` when done.
    """

    def __init__(self, models_dir="weights", output_dir=None):
        self.models_dir = Path(models_dir)
        self.output_dir = Path(output_dir or tempfile.mkdtemp(prefix="mlx_diffusion-app-"))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.gallery: list[tuple[str, str]] = []  # (PNG path, caption) of every image made, newest first
        self._pipe = None
        self._pipe_name = None
        self._count = 0
        self._jobs: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="mlx_diffusion-worker")
        self._worker.start()

    # -- the worker ----------------------------------------------------------------------------------------------
    def _work(self):
        import mlx.core as mx

        try:
            while (job := self._jobs.get()) is not None:
                fn, future = job
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as e:  # noqa: BLE001 - the caller's to handle
                        future.set_exception(e)
        finally:
            self._pipe = None
            gc.collect()
            mx.clear_streams()

    def run(self, fn, on_wait=None):
        """fn() on the worker thread, after those before it; its result or its exception. `on_wait()` is called about
        ten times a second while waiting (a progress bar's chance to update in the caller's thread)."""
        if not self._worker.is_alive():
            raise RuntimeError("the service is closed")
        future: Future = Future()
        self._jobs.put((fn, future))
        while True:
            try:
                return future.result(timeout=0.1)
            except WaitTimeout:
                if on_wait is not None:
                    on_wait()

    def close(self):
        if self._worker.is_alive():
            self._jobs.put(None)
            self._worker.join()

    # -- models ------------------------------------------------------------------------------------------------------
    def models(self) -> list[ModelEntry]:
        return find_models(self.models_dir)

    def entry(self, name: str) -> ModelEntry:
        for m in self.models():
            if m.name == name:
                return m
        known = ", ".join(m.name for m in self.models())
        raise InputError(f"no model named {name!r} (known: {known})")

    def _load(self, name: str):
        """The pipeline of `name`, loaded on the worker; the one before it released first (one model in memory)."""
        if self._pipe_name != name:
            import mlx.core as mx

            entry = self.entry(name)
            self._pipe, self._pipe_name = None, None
            gc.collect()
            mx.clear_cache()
            if entry.problem:
                raise WeightsError(f"model {name} cannot be used: {entry.problem}")
            self._pipe = load_pipeline(entry.path, progress=False)
            self._pipe_name = name
        return self._pipe

    def limits(self, name: str) -> ModelLimits:
        """Choose a model (loading it, releasing the one before) and return what the page needs to know of it."""
        return self.run(lambda: self._describe(self._load(name), name))

    @staticmethod
    def _describe(p, name: str) -> ModelLimits:
        """What the page offers for a loaded pipeline. What it uses comes from the pipeline's own `unused_settings`,
        asked about its defaults with a negative prompt and no true CFG (the page has none)."""
        unused = p.unused_settings(GenerationSettings(negative_prompt="", guidance=p.default_guidance))
        uses_guidance = "guidance" not in unused
        return ModelLimits(name, p.family, p.default_steps, p.default_guidance if uses_guidance else None,
                           p.default_width, p.default_height, p.size_multiple, p.max_size, uses_guidance,
                           "negative_prompt" not in unused)

    @property
    def loaded(self) -> str | None:
        """The name of the model in memory, if any."""
        return self._pipe_name

    # -- generating ----------------------------------------------------------------------------------------------
    def generate(self, prompt: str, negative_prompt: str | None = None, model: str = BUILTIN_NAME,
                 steps: int | None = None, guidance: float | None = None, width: int | None = None,
                 height: int | None = None, seed: int | None = None, on_step=None, on_wait=None) -> tuple[str, dict]:
        """One image: (the PNG's path, a JSON-able dict of its settings, timings and memory). Settings left None take
        the model's defaults; a negative prompt or guidance the model does not use is left out. InputError /
        WeightsError (one line) for what cannot be made."""
        if not isinstance(prompt, str):
            raise InputError("the prompt must be text")
        settings = dict(negative_prompt=negative_prompt or None, steps=_whole(steps, "steps"),
                        guidance=_number(guidance, "guidance"), width=_whole(width, "width"),
                        height=_whole(height, "height"), seed=_whole(seed, "seed"))

        def make():
            pipe = self._load(model)
            lim = self._describe(pipe, model)  # the page hides what the model does not use: so does the API
            if not lim.uses_negative_prompt:
                settings["negative_prompt"] = None
            if not lim.uses_guidance:
                settings["guidance"] = None
            queued = time.time()
            result = pipe.generate_many(prompt, on_step=on_step, **settings)[0]
            self._count += 1
            path = self.output_dir / f"{self._count:04d}-{result.settings.seed}.png"
            write_image(result.image, path, result.metadata())
            stats = result.stats
            info = {"file": str(path), "model": model, "settings": result.settings.to_dict(),
                    "seconds": {**stats.seconds, "total": sum(stats.seconds.values())},
                    "peak_memory_gb": stats.peak_memory_gb, "started": queued, "finished": time.time()}
            self.gallery.insert(0, (str(path), f"{model}, seed {result.settings.seed}: {prompt[:60]}"))
            return str(path), info

        return self.run(make, on_wait)


def _whole(v, name):
    """A whole number from a form field (Gradio's numbers arrive as floats), None kept; InputError otherwise."""
    if v is None or v == "":
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a whole number, got {v!r}") from None
    if f != f or f in (float("inf"), float("-inf")) or f != int(f):
        raise InputError(f"{name} must be a whole number, got {v!r}")
    return int(f)


def _number(v, name):
    if v is None or v == "":
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {v!r}") from None


def summary(info: dict) -> str:
    """One line for the page: seconds and peak memory."""
    s = info["seconds"]
    return (f"{info['model']}, seed {info['settings']['seed']}, {info['settings']['steps']} steps, "
            f"{info['settings']['width']}x{info['settings']['height']}: {s['total']:.1f} s "
            f"(text {s['text_encoding']:.1f}, denoising {s['denoising']:.1f}, decoding {s['decoding']:.1f}); "
            f"peak memory {info['peak_memory_gb']:.2f} GB")


__all__ = ["ModelEntry", "ModelLimits", "Service", "find_models", "summary"]
