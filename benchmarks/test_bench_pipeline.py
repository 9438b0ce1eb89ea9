"""(c) One whole image per variant: text encoders, UNet steps and VAE decode (batch 1, guidance 0).

    pytest benchmarks/test_bench_pipeline.py --mixq-config tiny
"""

import pytest

from benchmarks.test_bench_unet import result_info
from benchmarks.variants import VARIANTS, generate


@pytest.mark.parametrize("variant_name", VARIANTS)
def test_pipeline_image(variant, bench_cfg, timed):
    timed(lambda: generate(variant.pipe, bench_cfg), group="pipeline",
          extra_info=result_info(variant, bench_cfg, "pipeline"))
