"""`python -m mlx_diffusion.benchmark ...` = `mlx-diffusion benchmark ...` (the command is `cli/benchmark.py`)."""

if __name__ == "__main__":
    from .cli import run
    from .cli.benchmark import main

    run(main)
