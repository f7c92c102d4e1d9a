"""`python -m mlx_diffusion.compare ...` = `mlx-diffusion compare ...` (the command is `cli/compare.py`)."""

if __name__ == "__main__":
    from .cli import run
    from .cli.compare import main

    run(main)
