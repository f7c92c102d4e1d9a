"""`python -m mlx_diffusion.app`: the web demo (see `app/__init__.py`)."""

from . import run

run()
