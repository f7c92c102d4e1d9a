import sys
from pathlib import Path

import pytest

# helpers, tiny_models and the test modules whose reference runs others reuse, whatever folder a test is in
for folder in sorted(p for p in Path(__file__).parent.iterdir() if p.is_dir() and p.name not in ("assets", "__pycache__")):
    sys.path.insert(0, str(folder))
sys.path.insert(0, str(Path(__file__).parent))

import mlx_diffusion  # noqa: E402,F401  must come before any `import mlx.core` so the fast BLAS is interposed


def _built(tmp_path_factory, name, make):
    """(diffusers pipeline, its saved folder, our converted float32 folder)."""
    import tiny_models
    from mlx_diffusion.convert import convert

    root = tmp_path_factory.mktemp(name)
    pipe = make()
    src = tiny_models.save(pipe, root / "diffusers")
    out = convert(src, root / "mlx", bits=None, dtype="float32", progress=False, log=lambda *a: None)
    return pipe, src, out


@pytest.fixture(scope="session")
def flux_schnell(tmp_path_factory):
    import tiny_models

    return _built(tmp_path_factory, "flux_schnell", lambda: tiny_models.tiny_flux_pipeline(dev=False))


@pytest.fixture(scope="session")
def flux_dev(tmp_path_factory):
    import tiny_models

    return _built(tmp_path_factory, "flux_dev", lambda: tiny_models.tiny_flux_pipeline(dev=True))


@pytest.fixture(scope="session")
def sd3(tmp_path_factory):
    import tiny_models

    return _built(tmp_path_factory, "sd3", lambda: tiny_models.tiny_sd3_pipeline(with_t5=True))


@pytest.fixture(scope="session")
def sd3_no_t5(tmp_path_factory):
    import tiny_models

    return _built(tmp_path_factory, "sd3_no_t5", lambda: tiny_models.tiny_sd3_pipeline(with_t5=False))
