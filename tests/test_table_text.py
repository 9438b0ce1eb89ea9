"""TableText: a table rewritten after every row, each row emitted once, byte for byte what PyYAML writes."""

from __future__ import annotations

import random

import yaml

from mixq.calib.sensitivity import read_table_file, write_table
from mixq.io import TableText, _FastSafeDumper

SDXL_NAMES = ["conv_in", "time_embedding.linear_1",
              "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k",
              "up_blocks.0.attentions.2.transformer_blocks.9.ff.net.0.proj",
              "vae.decoder.up_blocks.3.resnets.2.conv_shortcut",
              "text_encoder_2.text_model.encoder.layers.31.self_attn.out_proj"]
MEASUREMENT = {"dtype": "float32", "serving_dtype": "bfloat16", "noise_floor": {
    "method": "one layer's weights moved by one unit in the last place; worst of the probe layers",
    "probe_layers": SDXL_NAMES[:3], "sqnr_db": 135.10848719252544, "ssim": 0.9999999999988025}}


def row(rng: random.Random, group: str) -> dict:
    return {"group": group, "metric": "ssim" if group == "content" else "sqnr_db", "params": rng.randrange(1, 10**8),
            "act_numel": rng.randrange(1, 10**6),
            "weight": {bits: rng.uniform(-5, 200) if group == "quality" else 1 - rng.random() * 1e-6 for bits in (2, 4, 8)},
            "activation": {bits: rng.uniform(0, 120) for bits in (4, 8)}}


def whole_dump(head: dict, rows: dict) -> str:
    return yaml.dump({**head, "layers": rows}, Dumper=_FastSafeDumper, sort_keys=False)


def test_growing_table_is_byte_for_byte_the_whole_dump():
    rng, texts, rows = random.Random(0), TableText(), {}
    assert texts.text({"measurement": MEASUREMENT}, rows) == whole_dump({"measurement": MEASUREMENT}, rows)
    for index, name in enumerate(SDXL_NAMES):
        rows[name] = row(rng, "content" if index % 2 else "quality")
        for head in ({}, {"measurement": MEASUREMENT}, {"run": "ab12" * 16, "measurement": MEASUREMENT}):
            assert texts.text(head, rows) == whole_dump(head, rows)


def test_a_changed_row_is_emitted_again():
    rng, texts = random.Random(1), TableText()
    rows = {name: row(rng, "quality") for name in SDXL_NAMES}
    before = texts.text({}, rows)
    rows[SDXL_NAMES[2]]["weight"][4] = 12.5  # changed in place: the cached text must not be reused
    after = texts.text({}, rows)
    assert after != before and after == whole_dump({}, rows)


def test_written_table_reads_back(tmp_path):
    rng, texts = random.Random(2), TableText()
    rows = {name: row(rng, "quality") for name in SDXL_NAMES}
    path = tmp_path / "sensitivity.yaml"
    write_table(path, MEASUREMENT, rows, texts)
    assert read_table_file(path) == {"measurement": MEASUREMENT, "layers": rows}
