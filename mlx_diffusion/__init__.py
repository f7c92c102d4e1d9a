"""mlx_diffusion: Stable Diffusion 3 Medium and FLUX.1 text-to-image in MLX.

Importing the package first interposes a fast BLAS under mlx-cpu on Linux and tunes malloc for large buffers (see
`_blas.py`); it must therefore be imported before `mlx.core`.
"""

from . import _blas

_blas.interpose()
_blas.tune_allocator()

__version__ = "0.1.0"


def load_pipeline(path=None, **kwargs):
    """Load a converted MLX model folder (see `tools/convert.py`), or without a path the built-in tiny model, and
    return a pipeline with `.generate(...)`."""
    from .pipeline import load_pipeline as _load

    return _load(path, **kwargs)


__all__ = ["load_pipeline", "__version__"]
