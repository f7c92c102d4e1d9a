"""The package's rooms keep to their responsibilities: generation loads nothing of the built-in model's training or
of the converter, dependencies run one way, no module reaches into another's private names, and the models never
need PyTorch."""

import ast
import os
import subprocess
import sys
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[1] / "mlx_diffusion"
MODULES = sorted(p for p in PACKAGE.rglob("*.py"))

# room -> the rooms it may import from (besides itself and the package's top-level errors / __init__)
MAY_IMPORT = {
    "backends": set(),
    "models": {"backends"},
    "io": {"backends", "models"},
    "pipelines": {"backends", "models", "io", "convert"},  # convert: only its LoRA reader, only when one is given
    "convert": {"backends", "models", "io"},
    "tour": {"backends", "models", "io", "pipelines"},
    "cli": {"backends", "models", "io", "pipelines", "convert", "tour"},
    "tiny": {"backends", "models", "io", "pipelines", "convert", "cli"},
    "app": {"backends", "models", "io", "pipelines", "tour", "cli"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """(absolute module imported, names imported from it) for each import in the file."""
    me = _module_name(path).split(".")
    package = me if path.name == "__init__.py" else me[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            yield module, [a.name for a in node.names]


def _is_module(name: str) -> bool:
    p = PACKAGE.parent / Path(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def test_generation_imports_nothing_of_training_or_conversion(tmp_path):
    code = (
        "import sys, mlx_diffusion\n"
        "pipe = mlx_diffusion.load_pipeline(progress=False)\n"
        "pipe.generate('a red circle', seed=0, steps=2)\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('mlx_diffusion.tiny', 'mlx_diffusion.convert', "
        "'mlx_diffusion.cli', 'mlx_diffusion.tour', 'mlx.optimizers', 'torch', 'diffusers', 'transformers')))\n"
        "print(','.join(bad))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"generation imported {r.stdout.strip()}"


def test_rooms_import_only_downwards():
    wrong = []
    for path in MODULES:
        parts = _module_name(path).split(".")
        room = parts[1] if len(parts) > 1 and parts[1] in MAY_IMPORT else None
        if room is None:
            continue
        for module, _ in _imports(path):
            target = module.split(".")
            if target[0] == "mlx_diffusion" and len(target) > 1 and target[1] in MAY_IMPORT:
                if target[1] != room and target[1] not in MAY_IMPORT[room]:
                    wrong.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert not wrong, wrong


def test_no_module_uses_another_modules_private_names():
    wrong = []
    for path in MODULES:
        me = _module_name(path)
        module_aliases = {}
        for module, names in _imports(path):
            if not module.startswith("mlx_diffusion"):
                continue
            for n in names:
                if n.startswith("_") and not n.startswith("__") and not (_is_module(f"{module}.{n}") and module == me):
                    wrong.append(f"{path.relative_to(PACKAGE)}: from {module} import {n}")
                if _is_module(f"{module}.{n}"):
                    module_aliases[n] = f"{module}.{n}"
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for a in node.names:
                    if a.asname and a.name in module_aliases:
                        module_aliases[a.asname] = module_aliases[a.name]
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in module_aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                wrong.append(f"{path.relative_to(PACKAGE)}: {node.value.id}.{node.attr}")
    assert not wrong, wrong


def test_the_package_never_imports_pytorch_and_points_nowhere_outside():
    for path in MODULES:
        for module, _ in _imports(path):
            assert module.split(".")[0] not in ("torch", "diffusers", "transformers"), (path, module)
        assert "../shared" not in path.read_text(), path


def test_entry_points_from_a_non_editable_install(tmp_path):
    """`pip install .` (not editable) into a fresh environment gives working commands that use the installed copy."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=120)  # the system pip and setuptools, as `pip install` would use them
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps",
                          "--no-build-isolation", "--disable-pip-version-check", str(PACKAGE.parent)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert pip.returncode == 0, pip.stderr
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import mlx_diffusion; print(mlx_diffusion.__file__)"],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert where.stdout.strip().startswith(str(venv)), where.stdout + where.stderr
    bin_ = venv / "bin"
    r = subprocess.run([str(bin_ / "mlx-diffusion"), "--help"], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path, env=env)
    assert r.returncode == 0 and all(c in r.stdout for c in ("generate", "convert", "compare", "benchmark", "train", "evaluate")), r.stderr
    r = subprocess.run([str(bin_ / "mlx-diffusion-generate"), "--prompt", "a red circle", "--steps", "2", "--seed", "3",
                        "-o", "a.png", "--quiet"], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert r.returncode == 0 and (tmp_path / "a.png").is_file(), r.stderr
    r = subprocess.run([str(bin_ / "mlx-diffusion"), "convert", str(tmp_path / "nothing"), "-o", "x"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert r.returncode == 1 and r.stderr.startswith("Error: ") and "Traceback" not in r.stderr, r.stderr
    r = subprocess.run([str(bin_ / "mlx-diffusion-compare"), "--help"], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path, env=env)
    assert r.returncode == 0 and "--seeds" in r.stdout, r.stderr
    r = subprocess.run([str(bin_ / "mlx-diffusion-convert"), "--help"], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path, env=env)
    assert r.returncode == 0 and "generate's --model" in r.stdout, r.stderr
