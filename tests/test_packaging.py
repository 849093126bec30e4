"""What ``pip install .`` installs, and the repository's lint rules (docs/contract.md §9)."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_adds_one_import_name(tmp_path):
    # The wheel as pip builds it from a copy of the checkout with every top-level folder that
    # holds Python code (so that leaving one out is what is tested), built in the copy so that
    # the checkout stays clean; no network: this environment's setuptools.
    source = tmp_path / "source"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "results")
    for folder in ("akl_kernels", "reference", "benchmarks", "tests", "examples"):
        shutil.copytree(ROOT / folder, source / folder, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps",
                    "--no-build-isolation", "--quiet", "--wheel-dir", str(tmp_path)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("akl_kernels-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if ".dist-info" not in name.split("/")[0]}
    assert top_level == {"akl_kernels"}, top_level
    # The whole package ships: both backends and the Trainer integration.
    for module in ("akl_kernels/backends/torch/chunked.py",
                   "akl_kernels/backends/triton/forward_kernel.py",
                   "akl_kernels/integrations/transformers.py"):
        assert module in names
    metadata = next(name for name in names if name.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(metadata).decode().split() == ["akl_kernels"]


def test_ruff_finds_nothing():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]
