"""The CPU UNet benchmark runs end to end on a tiny SDXL-structured UNet and reports every row.

Structure only: no speed or memory target is asserted here (they live in the report).
"""

import json

from benchmarks import cpu_unet
from mixq.offline import SDXL_UNET_STRUCTURE, shrink_unet_config


def test_cpu_unet_benchmark_reports_each_variant(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(shrink_unet_config(SDXL_UNET_STRUCTURE)))
    out = tmp_path / "results"
    assert cpu_unet.main(["--unet-config", str(config), "--out", str(out), "--latents", "8", "--rounds", "1",
                          "--skip-torchao"]) == 0

    (report_path,) = out.glob("cpu-unet-*.md")
    report = report_path.read_text()
    for row in ("| fp32 |", "| bf16 |", "| mixq W8A8 bf16 |", "| mixq W4A8 bf16 |", "| mixq W8A8 |", "| mixq W4A8 |",
                "| mixq 4-bit plan bf16 |", "| mixq W4A8 int8-weights bf16 |", "| mixq 4-bit plan int8-weights |"):
        assert row in report, f"no row {row!r}"
    assert "avx512_vnni" in report and "amx_int8" in report  # the CPU's int8 features, yes or no
    results = json.loads(report_path.with_suffix(".json").read_text())
    for variant in ("mixq W8A8", "mixq W4A8", "mixq 4-bit plan", "mixq W4A8 int8-weights"):
        memory = results["quantize_memory"][variant]
        assert memory["quantized_bytes"]["layer_buffers"] > 0
    memory = results["quantize_memory"]
    # 4-bit weights: packed by default, one oneDNN int8 copy more with cpu_weights="int8"
    assert memory["mixq W4A8"]["quantized_bytes"]["onednn_layouts"] == 0
    # 8-bit weights: held once, in oneDNN's layout (counted in the layers' own bytes), nothing beside them
    assert memory["mixq W8A8"]["quantized_bytes"]["onednn_layouts"] == 0
    assert memory["mixq W8A8"]["quantized_bytes"]["layer_buffers"] > memory["mixq W8A8"]["int8_weights_plus_scales_bytes"]
    assert "resident / int8 weights + scales" in report
    assert memory["mixq W4A8 int8-weights"]["quantized_bytes"]["onednn_layouts"] > 0
    assert results["latency"]["fp32"]["8"]["median_s"] > 0
