import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import mlx_diffusion  # noqa: E402,F401  must come before any `import mlx.core` so the fast BLAS is interposed


@pytest.fixture(scope="session")
def flux_schnell(tmp_path_factory):
    """(diffusers FluxPipeline, its saved folder, our converted float32 folder) for a tiny schnell model."""
    import tiny_models
    from mlx_diffusion.convert import convert

    root = tmp_path_factory.mktemp("flux_schnell")
    pipe = tiny_models.tiny_flux_pipeline(dev=False)
    src = tiny_models.save(pipe, root / "diffusers")
    out = convert(src, root / "mlx", bits=None, dtype="float32", progress=False, log=lambda *a: None)
    return pipe, src, out


@pytest.fixture(scope="session")
def flux_dev(tmp_path_factory):
    import tiny_models
    from mlx_diffusion.convert import convert

    root = tmp_path_factory.mktemp("flux_dev")
    pipe = tiny_models.tiny_flux_pipeline(dev=True)
    src = tiny_models.save(pipe, root / "diffusers")
    out = convert(src, root / "mlx", bits=None, dtype="float32", progress=False, log=lambda *a: None)
    return pipe, src, out
