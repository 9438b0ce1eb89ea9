"""Sharding the sensitivity pass across processes with torch.distributed.

Sensitivity is one independent measurement per (layer, candidate bit-width), so under
`torchrun --nproc_per_node=N -m mixq.calibrate ...` every process measures every N-th layer:

- the process group is NCCL on CUDA (one GPU per process, `LOCAL_RANK`), gloo on CPU;
- each process writes its finished rows to its own shard file, atomically after every layer, so a
  killed process resumes without measuring a finished layer again;
- rows are exchanged through the process group (no shared file system needed across nodes) and
  process 0 writes the same `sensitivity.yaml` a single process would.

A plain `python -m mixq.calibrate` is a world of one process and uses none of this.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from mixq.io import TEMP_SUFFIX, TableText, read_yaml, write_text_atomic

SHARD_FOLDER = "sensitivity-shards"
# Process 0 collects the float references while the others wait; on a CPU that takes long.
WAIT_LIMIT = timedelta(hours=24)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def log_prefix(self) -> str:
        return f"[rank {self.rank}/{self.size}] " if self.size > 1 else ""

    def barrier(self):
        if self.size > 1:
            dist.barrier()

    def all_gather(self, value) -> list:
        """Every process's `value`, in rank order (a one-element list for a single process)."""
        if self.size == 1:
            return [value]
        gathered = [None] * self.size
        dist.all_gather_object(gathered, value)
        return gathered


def current_world() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def launched_with_several_processes() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def backend_for_this_machine() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


@contextmanager
def maybe_init():
    """Joins the process group torchrun describes (environment variables), yields the World, and
    leaves the group at the end; a single process yields World() and changes nothing."""
    if not launched_with_several_processes() or dist.is_initialized():
        yield current_world()
        return
    backend = backend_for_this_machine()
    if backend == "nccl":
        # "cuda" then means this process's GPU, for the pipeline and the barriers alike.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=WAIT_LIMIT)
    try:
        yield current_world()
    finally:
        dist.destroy_process_group()


def shard(names: list[str], world: World) -> list[str]:
    """This process's share: every size-th name, so both groups (and costs) spread evenly."""
    return names[world.rank::world.size]


def merge_shard_rows(row_sets: list[dict], layer_order) -> dict:
    """One table from several processes' rows, in `layer_order` (the order a single process writes)."""
    merged = {}
    for rows in row_sets:
        merged.update(rows)
    return {name: merged[name] for name in layer_order if name in merged}


# --- shard files ---------------------------------------------------------------------------------


def shard_folder(table_path) -> Path:
    return Path(table_path).parent / SHARD_FOLDER


def shard_path(table_path, rank: int) -> Path:
    return shard_folder(table_path) / f"rank{rank}.yaml"


def read_shard(path) -> dict:
    """{"layers": {...}} and, for process 0, the run's "measurement" record; {} when absent."""
    path = Path(path)
    return (read_yaml(path) or {}) if path.exists() else {}


def shard_paths(table_path) -> list[Path]:
    """Every shard file visible here (several after a change of process count, or on a shared disk)."""
    folder = shard_folder(table_path)
    return sorted(folder.glob("rank*.yaml")) if folder.is_dir() else []


def read_all_shards(table_path) -> list[dict]:
    return [read_shard(p) for p in shard_paths(table_path)]


def write_shard(table_path, rank: int, rows: dict, measurement: dict | None = None, run: str | None = None,
                texts: TableText | None = None):
    """`run`: the key of the inputs the rows were measured from; shards of other inputs are never merged.
    `texts`: the TableText of a shard rewritten after every layer (rows emitted once)."""
    head = {**({"run": run} if run else {}), **({"measurement": measurement} if measurement else {})}
    write_text_atomic(shard_path(table_path, rank), (texts or TableText()).text(head, rows))


def remove_shards(table_path, shards_of_ranks):
    """Drops merged shard files; the folder goes when it is empty."""
    for rank in shards_of_ranks:
        shard_path(table_path, rank).unlink(missing_ok=True)
    try:
        shard_folder(table_path).rmdir()
    except OSError:  # not empty yet (another process's shard), or already gone
        pass


def remove_all_shards(table_path):
    """After the merge: every shard, and the half-written temporaries of killed processes."""
    folder = shard_folder(table_path)
    if folder.is_dir():
        for stale in folder.glob(f".*{TEMP_SUFFIX}"):
            stale.unlink(missing_ok=True)
        remove_shards(table_path, [int(p.stem[len("rank"):]) for p in folder.glob("rank*.yaml")])
