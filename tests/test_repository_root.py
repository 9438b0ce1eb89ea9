"""Python run from the repository root must see the installed distributions, not folders of the checkout.

`python -m ...`, `python -c ...` and `python -m pytest` put the working directory first on sys.path,
so any top-level folder with an `__init__.py` (or top-level `*.py` file) is imported in place of an
installed distribution of the same name. transformers >= 5 depends on Hugging Face's `kernels`, which
the repository's `kernels/` folder once shadowed, breaking diffusers' PEFT loader for every command.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OWN_DISTRIBUTION = "mixq"


def names_importable_from(folder: Path) -> dict[str, Path]:
    """Top-level module names that `import NAME` resolves to a file in `folder` itself.

    Regular packages and modules only: a folder without `__init__.py` is at most a namespace
    portion, which Python uses only when no regular package or module of that name exists anywhere
    on sys.path, so it can never stand in for an installed distribution."""
    names = {}
    for entry in folder.iterdir():
        if entry.is_dir() and (entry / "__init__.py").is_file() and entry.name.isidentifier():
            names[entry.name] = entry
        elif entry.is_file() and entry.suffix == ".py" and entry.stem.isidentifier():
            names[entry.stem] = entry
    return names


def test_no_root_folder_shadows_an_installed_distribution():
    owners = importlib.metadata.packages_distributions()
    clashes = [
        f"{path.relative_to(REPO)} is importable as `{name}`, a top-level name installed by {owners[name]}"
        for name, path in sorted(names_importable_from(REPO).items())
        if set(owners.get(name, ())) - {OWN_DISTRIBUTION}
    ]
    assert not clashes, "; ".join(clashes)


def test_the_shadowing_check_sees_a_real_clash(tmp_path):
    """The check above must be able to fail: a root-level `numpy/__init__.py` is caught."""
    (tmp_path / "numpy").mkdir()
    (tmp_path / "numpy" / "__init__.py").write_text("")
    (tmp_path / "kernels").mkdir()  # a namespace portion only: not importable in place of anything
    owners = importlib.metadata.packages_distributions()
    found = names_importable_from(tmp_path)
    assert "numpy" in found and "numpy" in owners
    assert "kernels" not in found


def test_the_main_job_imports_and_cli_work_from_the_repository_root():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.pop("PYTHONSAFEPATH", None)  # run as a user would: the working directory first on sys.path
    imports = (
        "import mixq; from diffusers import AutoPipelineForText2Image, StableDiffusionXLPipeline; "
        "from diffusers.loaders import peft; import mixq.kernels.dispatch, mixq.calib.run; "
        "import transformers.integrations.hub_kernels"
    )
    result = subprocess.run([sys.executable, "-c", imports], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for module in ("mixq", "mixq.calibrate"):
        result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, f"python -m {module} --help failed:\n{result.stderr[-3000:]}"
        assert "usage:" in result.stdout
