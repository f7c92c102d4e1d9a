"""mlx_diffusion: Stable Diffusion 3 Medium and FLUX.1 text-to-image in MLX.

The public API is `load_pipeline` and `GenerationSettings` (see `pipelines`). Importing the package first interposes a fast BLAS under
mlx-cpu on Linux and tunes malloc for large buffers (`backends/blas.py`); import it before `mlx.core`.
"""

from .backends import blas as _blas_setup

_blas_setup.interpose()
_blas_setup.tune_allocator()

__version__ = "0.1.0"


def load_pipeline(path=None, **kwargs):
    """Open a converted MLX model folder (see `python -m mlx_diffusion convert`), or without a path the built-in
    model, and return a pipeline with `.generate(...)`. Keyword arguments: see `pipelines.load_pipeline`."""
    from .pipelines import load_pipeline as _load

    return _load(path, **kwargs)


def __getattr__(name):
    if name == "GenerationSettings":  # imported when used: `import mlx_diffusion` stays light
        from .pipelines.settings import GenerationSettings

        return GenerationSettings
    raise AttributeError(f"module 'mlx_diffusion' has no attribute {name!r}")


__all__ = ["GenerationSettings", "load_pipeline", "__version__"]
