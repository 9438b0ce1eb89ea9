"""(b) One UNet step of each variant, on the inputs the pipeline gives the first step.

    pytest benchmarks/test_bench_unet.py --mixq-config tiny
    pytest benchmarks/test_bench_unet.py --mixq-config sdxl-turbo --unet-config PATH --mixq-mode cuda-graph
"""

import pytest

from mixq.calib.collect import run_unet
from benchmarks.variants import VARIANTS


@pytest.mark.parametrize("variant_name", VARIANTS)
def test_unet_step(variant, variant_set, bench_cfg, timed):
    call = variant_set.unet_call
    timed(lambda: run_unet(variant.unet, call), group="unet-step", extra_info=result_info(variant, bench_cfg, "unet-step"))


def result_info(variant, bench_cfg, suite: str) -> dict:
    """What the report needs beside the timings (stored in pytest-benchmark's extra_info)."""
    return {"suite": suite, "variant": variant.name, "label": variant.label, "description": variant.description,
            "config": bench_cfg.name, "mode": bench_cfg.mode, "dtype": bench_cfg.dtype,
            "resolution": bench_cfg.resolution, "steps": bench_cfg.steps, "memory": variant.memory}
