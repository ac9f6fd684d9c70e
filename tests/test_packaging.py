"""The package installs non-editable with conf/ and callbacks/ mapped inside it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A non-editable install into a fresh folder, built from a clean copy of the source tree (an in-tree
    build reuses ``build/`` and would ship files that were removed since the last build)."""
    import shutil

    source = tmp_path_factory.mktemp("source") / "tre-lightning"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        "build", "dist", ".venv", ".git", "*.egg-info", "__pycache__", "outputs", "multirun", "runs", ".hypothesis"))
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(source)],
        check=True,
        capture_output=True,
        text=True,
    )
    return target


def _run(installed: Path, code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(installed)!r}); " + code],
        check=True,
        capture_output=True,
        text=True,
        cwd=installed,
    )
    return out.stdout.strip()


def test_conf_and_callbacks_import_from_the_installed_copy(installed: Path) -> None:
    out = _run(
        installed,
        "import tre_lightning, tre_lightning.conf, tre_lightning.callbacks; "
        "print(tre_lightning.conf.__file__); print(tre_lightning.callbacks.__file__)",
    )
    conf_file, callbacks_file = out.splitlines()
    assert Path(conf_file).is_relative_to(installed)
    assert Path(callbacks_file).is_relative_to(installed)


def test_every_yaml_in_conf_is_installed(installed: Path) -> None:
    shipped = sorted(p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*.yaml"))
    assert shipped, "conf/ holds no YAML"
    out = _run(
        installed,
        "from importlib.resources import files; from pathlib import Path; "
        "root = Path(str(files('tre_lightning.conf'))); "
        "print('\\n'.join(sorted(p.relative_to(root).as_posix() for p in root.rglob('*.yaml'))))",
    )
    assert out.splitlines() == shipped


def test_every_callback_module_is_installed(installed: Path) -> None:
    shipped = sorted(p.name for p in (ROOT / "callbacks").glob("*.py"))
    out = _run(
        installed,
        "from importlib.resources import files; from pathlib import Path; "
        "print('\\n'.join(sorted(p.name for p in Path(str(files('tre_lightning.callbacks'))).glob('*.py'))))",
    )
    assert out.splitlines() == shipped
