"""`python -m mlx_diffusion.train ...` = `mlx-diffusion train ...` (the command is `tiny/train.py`): kept so that
the command lines recorded in the built-in model's training history still run."""

if __name__ == "__main__":
    from .cli import run
    from .tiny.train import main

    run(main)
