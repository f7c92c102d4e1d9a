"""Command lines: thin layers over the public API. `mlx-diffusion` (also `python -m mlx_diffusion`) has the
subcommands; each is also a command of its own (`mlx-diffusion-generate`, ...), and `run` runs any of them with every
user error on one line."""

from __future__ import annotations

import signal
import sys
import threading

import click

from ..errors import Error


def _terminated(signum, frame):
    """SIGTERM (and SIGHUP) as Ctrl-C: every writer removes its temporary files on the way out, as it does for
    KeyboardInterrupt; the default action would kill the process with them still on disk."""
    global _signal
    _signal = signum
    raise KeyboardInterrupt


_signal = signal.SIGINT


def run(command, args=None):
    """Run a click command with every user error on one line ("Error: ..."), no usage banner, no traceback.

    Interrupted (Ctrl-C, SIGTERM, SIGHUP) it leaves no half-written file and exits 128 + the signal's number; an
    operating-system error (a full disk, a file-size limit, no permission) is one line too."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if sig is not None:
                signal.signal(sig, _terminated)
    try:
        command.main(args=args, standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("interrupted: no half-written file was left", err=True)
        sys.exit(128 + _signal)
    except click.ClickException as e:
        click.echo(f"Error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except Error as e:  # the package's own errors, should a command not have turned one into a ClickException
        click.echo(f"Error: {one_line(e)}", err=True)
        sys.exit(1)
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        click.echo(f"Error: {e.strerror or one_line(e)}{where}; no half-written file was left", err=True)
        sys.exit(1)


def prompt_options(command):
    """The prompt-choosing options that compare and benchmark share (read by `tour.prompts.select`)."""
    from pathlib import Path

    options = [
        click.option("--prompts", "prompt_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="A text file, one prompt a line."),
        click.option("--prompt", "prompt_texts", multiple=True, help="A prompt (repeatable)."),
        click.option("--bank", default=None, type=click.Choice(["real", "builtin"]),
                     help="Prompts from the prompt bank [a short selection from the model's bank]."),
        click.option("--category", default=None, help="Only this category of the bank (e.g. text, photo, counting)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


MAX_SEEDS = 10_000  # images per command: a range such as 0-10000000000 is a typo, not a plan


def seed_list(ctx, param, value):
    """A click callback: "5", "5,6,7" or a range "0-7" (and mixes) -> a list of seeds; None stays None."""
    if value is None:
        return None
    try:
        seeds = []
        for part in str(value).split(","):
            lo, _, hi = part.strip().partition("-")
            if hi and int(hi) - int(lo) >= MAX_SEEDS:
                raise click.BadParameter(f"at most {MAX_SEEDS} seeds at a time")
            seeds += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
            if len(seeds) > MAX_SEEDS:
                raise click.BadParameter(f"at most {MAX_SEEDS} seeds at a time")
    except ValueError:
        raise click.BadParameter("a seed, a comma-separated list of seeds or a range, e.g. 5, 0,1 or 0-3") from None
    if not seeds or any(s < 0 or s >= 2**64 for s in seeds):
        raise click.BadParameter("seeds are integers from 0 to 2**64 - 1")
    return seeds


def lora_list(ctx, param, values):
    """A click callback: repeated "FILE" or "FILE:SCALE" -> [(Path, scale)] (scale 1.0 when not given; a ":" whose
    tail is not a number belongs to the file name). The scale's range is checked where LoRAs are read."""
    from pathlib import Path

    out = []
    for value in values or ():
        file, _, scale = value.rpartition(":")
        try:
            pair = (Path(file), float(scale)) if file else (Path(value), 1.0)
        except ValueError:
            pair = (Path(value), 1.0)
        if not pair[0].is_file():
            raise click.BadParameter(f"{pair[0]} " + ("is not a file" if pair[0].exists() else "does not exist"))
        out.append(pair)
    return out


def one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else e.__class__.__name__


class _Lazy(click.Group):
    """Subcommands imported when used, so `--help` and one command do not import the others."""

    commands_by_name = {
        "generate": ("mlx_diffusion.cli.generate", "Generate images from a text prompt."),
        "convert": ("mlx_diffusion.cli.convert", "Convert a checkpoint into an MLX model folder."),
        "compare": ("mlx_diffusion.cli.compare", "Render models x prompts x seeds into one labelled grid."),
        "benchmark": ("mlx_diffusion.cli.benchmark", "Profile a model, optionally against diffusers."),
        "train": ("mlx_diffusion.tiny.train", "Train the built-in model on synthetic scenes."),
        "evaluate": ("mlx_diffusion.tiny.evaluate", "Prompt following of a model trained on synthetic scenes."),
        "app": ("mlx_diffusion.app", "Serve the web demo (needs the [app] extra: Gradio)."),
    }

    def list_commands(self, ctx):
        return list(self.commands_by_name)

    def get_command(self, ctx, name):
        if name not in self.commands_by_name:
            return None
        import importlib

        return importlib.import_module(self.commands_by_name[name][0]).main

    def format_commands(self, ctx, formatter):
        rows = [(name, help) for name, (_, help) in self.commands_by_name.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=_Lazy, context_settings={"help_option_names": ["-h", "--help"]})
def group():
    """mlx_diffusion: FLUX.1 and Stable Diffusion 3 text-to-image in MLX."""


def main():
    """The `mlx-diffusion` entry point."""
    run(group)


def generate():
    """The `mlx-diffusion-generate` entry point."""
    from .generate import main as command

    run(command)


def convert():
    """The `mlx-diffusion-convert` entry point."""
    from .convert import main as command

    run(command)


def compare():
    """The `mlx-diffusion-compare` entry point."""
    from .compare import main as command

    run(command)


def benchmark():
    """The `mlx-diffusion-benchmark` entry point."""
    from .benchmark import main as command

    run(command)
