"""Where the models' operations run fast: `cpu` holds every CPU-only fast path behind the few calls the models make
(on a GPU those calls are MLX's own ops), `blas` sets up the process on Linux before `mlx.core` is loaded.

This file imports nothing: `mlx_diffusion/__init__.py` imports `backends.blas` before anything loads `mlx.core`.
"""
