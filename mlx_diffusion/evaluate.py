"""`python -m mlx_diffusion.evaluate ...` = `mlx-diffusion evaluate ...` (the command is `tiny/evaluate.py`): kept so that
the command lines recorded in the built-in model's training history still run."""

if __name__ == "__main__":
    from .cli import run
    from .tiny.evaluate import main

    run(main)
