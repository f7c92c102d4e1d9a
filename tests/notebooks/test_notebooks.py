"""The guided tour's notebooks run top to bottom, offline, on the built-in model and toy problems, and draw their
plots. Each is executed in a fresh kernel with nbclient from notebooks/, as a reader would run it."""

from pathlib import Path

import pytest

import helpers  # noqa: F401

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
TOUR = sorted(p.name for p in NOTEBOOKS.glob("0*.ipynb"))


def test_the_tour_is_there():
    assert TOUR == ["01_diffusion_fundamentals.ipynb", "02_architectures.ipynb", "03_flow_matching.ipynb",
                    "04_sd3.ipynb", "05_flux_gguf.ipynb", "06_visual_comparison.ipynb"]


@pytest.mark.slow
@pytest.mark.parametrize("name", TOUR)
def test_notebook_runs_and_plots(name):
    import nbformat
    from nbclient import NotebookClient

    if any((NOTEBOOKS.parent / "weights").glob("*/mlx_diffusion.json")):
        pytest.skip("converted weights present: the notebooks would run the real models")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "outputs are stripped in git"
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors[0]["evalue"] if errors else ""
    plots = sum("image/png" in o.get("data", {}) for c in code for o in c.outputs)
    assert plots >= 2, f"{name} drew {plots} plots"
