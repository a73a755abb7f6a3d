"""The wheel carries every subpackage and the recipes; the CLI lists its commands."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ["cli", "adapters", "inference", "inference/models", "inference/layers", "kernels", "recipes"]


@pytest.mark.slow
def test_wheel_carries_subpackages_and_recipes(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("lorax_moe-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "lorax/__init__.py" in names
    for sub in SUBPACKAGES:
        assert f"lorax/{sub}/__init__.py" in names, f"wheel lacks lorax/{sub}"
    for src in (ROOT / "recipes").rglob("*"):
        if src.is_file() and src.suffix in {".yaml", ".json", ".safetensors"}:
            rel = src.relative_to(ROOT / "recipes").as_posix()
            assert f"lorax/recipes/{rel}" in names, f"wheel lacks recipe file {rel}"
    for py in (ROOT / "kernels").glob("*.py"):
        assert f"lorax/kernels/{py.name}" in names
    assert any(n.endswith("entry_points.txt") for n in names)


def test_cli_help_lists_commands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lorax.cli.main", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for cmd in ("inspect", "convert", "batch-run"):
        assert cmd in out


def test_cli_version() -> None:
    from lorax import __version__

    out = subprocess.run(
        [sys.executable, "-m", "lorax.cli.main", "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == f"lorax {__version__}"


def test_cli_error_is_one_line_with_usage_exit_code(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lorax.cli.main", "convert", str(tmp_path / "missing"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "missing" in lines[0]
    assert not (tmp_path / "out").exists(), "a failed convert must not leave a destination behind"
