"""`python -m mlx_diffusion.generate ...` = `mlx-diffusion generate ...` (the command is `cli/generate.py`)."""

from .cli import generate

if __name__ == "__main__":
    generate()
