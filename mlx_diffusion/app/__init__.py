"""The web demo: `python -m mlx_diffusion.app` (also `mlx-diffusion app`, `mlx-diffusion-app`) serves a page at
http://127.0.0.1:7860 where one picks a model, types a prompt and gets the image, through the package's own pipeline.

`service.py` is the engine (models, one in memory at a time, generations in order on one worker thread), usable
without Gradio; `ui.py` is the page. Gradio is an optional extra (`pip install -e ".[app]"`), imported only here.
"""

from __future__ import annotations

from pathlib import Path

import click

INSTALL_HINT = "the web demo needs Gradio: pip install -e \".[app]\" (or ./setup.sh --test)"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to serve on; 0.0.0.0 makes the page reachable from other machines (your choice to make).")
@click.option("--port", type=click.IntRange(1, 65535), default=7860, show_default=True, help="Port to serve on.")
@click.option("--models-dir", type=click.Path(path_type=Path), default=Path("weights"), show_default=True,
              help="Folder of converted models (what `convert -o` wrote); the built-in model is always offered.")
@click.option("--share", is_flag=True, help="Also make a public gradio.live link (off by default).")
def main(host, port, models_dir, share):
    """Serve the web demo."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise click.ClickException(INSTALL_HINT) from None
    from .service import Service
    from .ui import CSS, build

    service = Service(models_dir)
    try:
        demo = build(service)
        demo.queue(default_concurrency_limit=1)
        demo.launch(server_name=host, server_port=port, share=share, allowed_paths=[str(service.output_dir)],
                    prevent_thread_lock=True, quiet=True, css=CSS)
        click.echo(f"mlx_diffusion web demo on http://{host}:{port} (models from {models_dir}/; Ctrl-C stops it)",
                   err=True)
        demo.block_thread()
    finally:
        service.close()


def run():
    """The `mlx-diffusion-app` entry point."""
    from ..cli import run as run_command

    run_command(main)
