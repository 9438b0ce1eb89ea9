"""Sensitivity sharded across processes: `torchrun --nproc_per_node=2 -m mixq.calibrate` on CPU (gloo)
writes the same sensitivity.yaml and plan.yaml as one process, and a process killed mid-way resumes
without measuring a finished layer again."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mixq.calib.distributed import World, merge_shard_rows, read_all_shards, shard, shard_path, write_shard

CONFIG = {
    "name": "tiny-shards",
    "model": {"id": "offline:tiny-sdxl"},
    "sampling": {"num_inference_steps": 1, "guidance_scale": 0.0, "seed": 3},
    "calibration": {"num_prompts": 2, "sensitivity_prompts": 2, "batch_size": 2},
    "keep_fp": ["conv_in", "conv_out"],
    "bits": {"weight_content": [4, 8], "weight_quality": [4, 8], "activation": [8]},
    "budget": {"w_bits": 6.0, "a_bits": 8.0, "ratios": [1.0]},
}
# Same kernels in every process, so the numbers (and the files) match bit for bit.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_shards_partition_the_layers_round_robin():
    names = [f"layer{i}" for i in range(11)]
    shares = [shard(names, World(rank, 3)) for rank in range(3)]
    assert sorted(sum(shares, [])) == sorted(names)
    assert shares[1] == ["layer1", "layer4", "layer7", "layer10"]
    assert shard(names, World()) == names


def test_shard_files_round_trip_and_merge_in_layer_order(tmp_path):
    table = tmp_path / "sensitivity.yaml"
    write_shard(table, 1, {"b": {"x": 1.5}}, None)
    write_shard(table, 0, {"c": {"x": 2.0}, "a": {"x": 0.5}}, {"dtype": "float32"})
    shards = read_all_shards(table)
    assert [s.get("measurement") for s in shards] == [{"dtype": "float32"}, None]
    merged = merge_shard_rows([s["layers"] for s in shards], ["a", "b", "c", "d"])
    assert list(merged) == ["a", "b", "c"] and merged["b"] == {"x": 1.5}
    assert shard_path(table, 1).exists()


def calibrate_command(config, out, processes: int) -> list[str]:
    launcher = [sys.executable, "-m", "mixq.calibrate"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                    "-m", "mixq.calibrate"]
    return [*launcher, "--config", str(config), "--out", str(out), "--no-progress"]


def worker_of_rank(launcher_pid: int, rank: int) -> int | None:
    """The pid of the torchrun worker with RANK=rank among the launcher's descendants."""
    pending = [launcher_pid]
    while pending:
        pid = pending.pop()
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and pid != launcher_pid:
            return pid
        pending += [int(c) for c in children]
    return None


def rows_in_shards(out) -> dict:
    return {n: r for s in read_all_shards(out / "sensitivity.yaml") for n, r in (s.get("layers") or {}).items()}


@pytest.mark.skipif(sys.platform != "linux", reason="finds the worker processes through /proc")
def test_two_processes_match_one_and_a_killed_rank_resumes(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    done = subprocess.run(calibrate_command(config, single, 1), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]

    process = subprocess.Popen(calibrate_command(config, sharded, 2), env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None and len(rows_in_shards(sharded)) < 30:
            time.sleep(0.2)
        assert process.poll() is None, "the run finished before a rank could be killed"
        victim = worker_of_rank(process.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)  # torchrun then stops the other rank and fails
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode != 0
    finished = rows_in_shards(sharded)
    assert len(finished) >= 30 and not (sharded / "plan.yaml").exists()

    rerun = subprocess.run(calibrate_command(config, sharded, 2), env=ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    total = len(yaml.safe_load((single / "sensitivity.yaml").read_text())["layers"])
    log = rerun.stdout + rerun.stderr
    measured_again = sum(int(n) for n in re.findall(r"sensitivity: measured (\d+) layers", log))
    assert measured_again == total - len(finished), log[-3000:]
    final = yaml.safe_load((sharded / "sensitivity.yaml").read_text())["layers"]
    assert all(final[name] == row for name, row in finished.items())
    assert not (sharded / "sensitivity-shards").exists()
    for name in ("sensitivity.yaml", "plan.yaml"):
        assert (sharded / name).read_bytes() == (single / name).read_bytes(), name
