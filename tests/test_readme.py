"""The README works as written: short, its offline snippet runs, its links and the docs' links resolve."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.test_cli import subprocess_env

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
TEST_COMMAND = "python -m pytest tests benchmarks --benchmark-disable -q -n auto --dist loadfile"


def section(text: str, heading: str) -> str:
    return text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]


def test_readme_is_short_and_starts_with_the_two_commands():
    text = README.read_text()
    assert len(text.splitlines()) < 200
    commands = re.findall(r"```bash\n(.*?)```", section(text, "Two commands"), re.S)
    assert commands[0].strip() == 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m mixq.calibrate'
    assert commands[1].strip() == TEST_COMMAND
    assert TEST_COMMAND in (REPO / ".ci" / "run").read_text()
    assert "mixq-calibrate" in text


def test_make_an_image_snippet_runs_as_written(tmp_path):
    code = re.findall(r"```python\n(.*?)```", section(README.read_text(), "Make an image"), re.S)[0]
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=subprocess_env(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "shapes.png").stat().st_size > 0
    assert result.stdout.startswith("Verdict(count=")


def test_relative_links_resolve():
    broken = []
    for page in [README, *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert not broken, broken


def test_with_diffusers_snippet_runs_as_written(tmp_path):
    """On a run folder made here (activation ranges from 4 prompts, a mixed plan), as the first command's
    runs/proving would be."""
    import mixq
    from mixq.proving import load_pipeline
    from tests.test_diffusers_backend import mixed_plan, write_plan

    run = tmp_path / "runs" / "proving"
    pipe = load_pipeline()
    mixq.calibrate_ranges(pipe, "proving:calibration", 4, progress=False, num_inference_steps=2,
                          guidance_scale=0.0, height=64, width=64).save(run / "activation_ranges.safetensors")
    write_plan(run / "plan.yaml", mixed_plan(pipe.unet))
    code = re.findall(r"```python\n(.*?)```", section(README.read_text(), "With diffusers: from_pretrained, "
                                                                           "save_pretrained, LoRA"), re.S)[0]
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=subprocess_env(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "swapped.png").stat().st_size > 0
    assert (tmp_path / "proving-mixq" / "config.json").is_file()
