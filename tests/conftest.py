"""Shared fixtures: offline tiny pipelines (seeded random weights) and the optional reference data.

The reference data (real CLIP tokenizer, COCO captions, real diffusers configs) is looked up in
MIXQ_TEST_DATA, else ../shared/data beside the repository; tests that need it skip when absent.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import pytest
import torch

# Triton's interpreter (tests/test_triton_kernels.py) must be chosen before Triton is first imported, and
# `import mixq` imports diffusers, which imports Triton: so here, before any test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

warnings.filterwarnings("ignore", message=".*should be kept in float32.*")
warnings.filterwarnings("ignore", category=FutureWarning)

REPO = Path(__file__).resolve().parents[1]

# The tiny test models are dominated by per-op overhead, so one thread is as fast as two, and it
# avoids the collapse of OpenMP's spinning thread pool when another process takes a core.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


def _build_native_helpers():
    """Build the native activation quantization (or find it unavailable, with its one warning) before any
    test runs, so that neither a build nor that warning lands inside a test that times or checks for
    silence. tests/test_native.py covers the build and the warning themselves."""
    from mixq.kernels import native

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        native.library()


_build_native_helpers()


def reference_data_dir() -> Path | None:
    candidate = Path(os.environ.get("MIXQ_TEST_DATA", REPO.parent / "shared" / "data"))
    return candidate if candidate.is_dir() else None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    found = reference_data_dir()
    if found is None:
        pytest.skip("reference data (MIXQ_TEST_DATA or ../shared/data) not present")
    return found


@pytest.fixture(scope="session")
def _tiny_sdxl_master():
    from mixq.offline import tiny_sdxl_pipeline

    return tiny_sdxl_pipeline(seed=0)


@pytest.fixture(scope="session")
def _tiny_sd15_master():
    from mixq.offline import tiny_sd15_pipeline

    return tiny_sd15_pipeline(seed=0)


@pytest.fixture
def tiny_sdxl(_tiny_sdxl_master):
    """A fresh, unquantized tiny SDXL pipeline (a deep copy: tests may quantize it)."""
    return copy.deepcopy(_tiny_sdxl_master)


@pytest.fixture
def tiny_sd15(_tiny_sd15_master):
    return copy.deepcopy(_tiny_sd15_master)


def capture_unet_call(pipe, prompts=("a red bus on a bridge", "a cat on a sofa"), seed=5, **kwargs):
    """Run the pipeline once and return the (args, kwargs) of its first UNet call: realistic inputs."""
    from mixq.calib.collect import capturing_unet_calls

    with capturing_unet_calls(pipe.unet, to_cpu=False) as calls:
        pipe(list(prompts), num_inference_steps=1, guidance_scale=0.0, output_type="latent",
             generator=torch.Generator().manual_seed(seed), **kwargs)
    return calls[0][:2]


def unet_output(unet, call) -> torch.Tensor:
    from mixq.calib.collect import run_unet

    return run_unet(unet, call)


@pytest.fixture(scope="session")
def finished(tmp_path_factory):
    """A finished `python -m mixq.calibrate` run of the small test config at budget 4 (read-only: tests
    that change a run folder take `folder`, a copy)."""
    from mixq.calibrate import main
    from tests.test_cli import write_small_config

    root = tmp_path_factory.mktemp("finished")
    config = write_small_config(root / "small.yaml")
    out = root / "run"
    assert main(["--config", config, "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture
def folder(finished, tmp_path):
    """A copy of the finished small run, for a test to change."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy
