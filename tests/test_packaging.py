"""The built-in configs ship in the package: a wheel built from the checkout holds every file of configs/ (the
source of truth, linked as cnncli/configs), and the package unpacked from it, run from a folder that is no
checkout, finds them by name. Offline: the wheel is built with the venv's own setuptools (no index)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _build_wheel(tmp_path: Path) -> Path:
    """Build the wheel from a copy of the sources (a build writes build/ and *.egg-info beside them)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "configs", src / "configs")
    shutil.copytree(ROOT / "cnncli", src / "cnncli", symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    assert (src / "cnncli" / "configs").is_symlink()  # the package links to configs/, it keeps no copies
    dist = tmp_path / "dist"
    # what `pip wheel --no-build-isolation` runs (PEP 517's build_wheel), without pip's start-up
    proc = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                           "build_meta.build_wheel(sys.argv[1])", str(dist)], cwd=src, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = dist.glob("cnncli-*.whl")
    return wheel


def test_the_wheel_carries_every_config_and_the_installed_package_finds_them_by_name(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    sources = {p.name: p.read_bytes() for p in (ROOT / "configs").glob("*.yaml")}
    assert len(sources) >= 5
    with zipfile.ZipFile(wheel) as zf:
        shipped = {Path(n).name: zf.read(n) for n in zf.namelist() if n.startswith("cnncli/configs/")}
        assert shipped == sources  # every file, byte for byte
        site = tmp_path / "site"
        zf.extractall(site)
    assert not (site / "cnncli" / "configs").is_symlink()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = [sys.executable, "-c", "import sys, cnncli.cli.app; print(cnncli.cli.app.__file__, file=sys.stderr); "
           "sys.argv[0] = 'cnn'; cnncli.cli.app.main()"]
    proc = subprocess.run([*run, "config", "list", "--json"], cwd=elsewhere, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith(str(site))  # the unpacked wheel, not the checkout
    listed = [json.loads(line) for line in proc.stdout.splitlines()]
    assert {r["name"] for r in listed} == {Path(n).stem for n in sources}
    assert all(r["path"].startswith(str(site)) for r in listed)
    proc = subprocess.run([*run, "summary", "--config", "seed-diagram", "--json"], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    # the diagram network: conv1 16×3×3×3 + 16, conv2 32×16×3×3 + 32, fc1 10×8192 + 10
    assert summary["params"] == (16 * 27 + 16) + (32 * 16 * 9 + 32) + (10 * 8192 + 10)


def test_the_readme_starts_with_train_and_test_then_one_install_line_for_users_and_links_inside() -> None:
    import re

    import tomllib

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = [b.split("```", 1)[0].strip().splitlines() for b in readme.split("```sh\n")[1:]]
    assert [line.split()[:2] for line in blocks[0]] == [["make", "train"], ["make", "test"]]  # the first lines
    install = blocks[1]
    assert len(install) == 1 and install[0].startswith("pip install '.[")  # then one line for users, no make
    named = set(re.search(r"\[([^\]]*)\]", install[0]).group(1).split(","))
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    assert named == set(extras) - {"dev"}  # every user extra, not the development tools
    assert "../shared/seed" not in readme and "shared/seed" not in readme
    for link in re.findall(r"\]\(([^)#:]+)\)", readme):  # relative links point at files of the checkout
        assert (ROOT / link).exists(), link
    assert "(docs/derivations.md)" in readme
