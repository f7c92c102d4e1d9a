"""`python -m mlx_diffusion COMMAND ...` = `mlx-diffusion COMMAND ...`: generate, convert, train, evaluate."""

from .cli import main

main()
