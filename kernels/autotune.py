"""Block sizes for the Triton kernels: tuned once per shape and GPU, cached on disk.

The cache is one JSON file, MIXQ_AUTOTUNE_CACHE or ~/.cache/mixq/autotune.json, mapping a key
(kernel, shape, dtypes, GPU name, Triton version) to the fastest config. It is written atomically
(temporary file + rename), so several processes may share it and a second process never tunes a
shape again. MIXQ_AUTOTUNE=0 turns tuning off: cached choices are still used, else the default.
MIXQ_AUTOTUNE_SECONDS bounds the tuning of one shape: the default config is measured first, then
candidates until the time is up.
Tuning is skipped while a CUDA graph is being captured (timing would break the capture).
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

import torch
import triton
from triton.runtime.errors import OutOfResources


@dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1  # programs that share one output tile, each summing a slice of K

    def launch_args(self) -> dict:
        """The keyword arguments of a kernel launch that carry this config (the split sets the grid)."""
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k, GROUP_M=self.group_m,
                    num_warps=self.num_warps, num_stages=self.num_stages)

    def name(self) -> str:
        split = f" split{self.split_k}" if self.split_k > 1 else ""
        return f"{self.block_m}x{self.block_n}x{self.block_k}/{self.num_warps}w/{self.num_stages}s{split}"


# The interpreter runs one program at a time in numpy: few, mid-sized tiles are fastest there.
INTERPRETER_CONFIG = Config(64, 64, 64, group_m=4, num_warps=1, num_stages=1)

# Tiles of 128 int8 values along K feed the int8 MMA with 128-byte rows. 64-wide tiles keep the
# grid filled where M * N is small (M = 256 tokens in SDXL-Turbo's deepest blocks).
LARGE_TILE = Config(128, 128, 128, num_warps=8, num_stages=4)
SMALL_TILE = Config(64, 64, 128, num_warps=4, num_stages=4)

# Block shapes only: each is also tried with BLOCK_K = 256 (K_WIDENINGS), BLOCK_K is narrowed per
# shape to divide K (or a conv's channel count C), and split-K variants are added where the grid
# is small (candidates_for).
TILES = (
    LARGE_TILE,
    SMALL_TILE,
    Config(128, 256, 128, num_warps=8, num_stages=3),
    Config(256, 128, 128, num_warps=8, num_stages=3),
    Config(64, 128, 128, num_warps=4, num_stages=4),
    Config(128, 64, 128, num_warps=4, num_stages=4),
    Config(64, 256, 128, num_warps=8, num_stages=3),
)
SPLITS = (1, 2, 3, 4, 6, 8)
# Wider K-steps halve the loop's fixed cost (barriers, stage counters, the MMA wait) per value of K.
# Where the stages no longer fit in shared memory the GPU refuses the launch and tuning skips it.
K_WIDENINGS = (1, 2)

# One wave of CTAs on an H100 (132 SMs); below it, SMs sit idle unless K is split.
FULL_GRID = 132
# A split K must leave each program a few K-steps, or the pipeline never fills.
MIN_K_STEPS_PER_SPLIT = 4


def widened(tile: Config, widening: int) -> Config:
    """tile with a K-step `widening` times as wide and one pipeline stage fewer per doubling (at
    least 2), which keeps its shared memory near the original's."""
    return replace(tile, block_k=tile.block_k * widening,
                   num_stages=max(2, tile.num_stages - (widening.bit_length() - 1)))


def tiles(m: int, n: int, config: Config) -> int:
    return -(-m // config.block_m) * -(-n // config.block_n)


def fitting_block_k(block_k: int, channels: int) -> int:
    """The largest of block_k, block_k / 2, ... (at least 32, the int8 MMA's K) dividing channels,
    so that the main loop needs no masks; block_k itself when none does."""
    candidate = block_k
    while candidate >= 32:
        if channels % candidate == 0:
            return candidate
        candidate //= 2
    return block_k


# The int8 tensor-core MMA multiplies 32 values along K: each weight lane must span at least that.
MIN_LANE_K = 32


def unmasked_loop(channels: int, config: Config, w_bits: int) -> bool:
    """Whether the main loop can run without masks (EVEN_K): BLOCK_K divides the channels (K, or
    a convolution's C), and each of its per-byte weight lanes feeds a whole int8 MMA."""
    return channels % config.block_k == 0 and config.block_k // (8 // w_bits) >= MIN_LANE_K


def fits_in_registers(channels: int, config: Config, w_bits: int) -> bool:
    """The masked loop gathers packed weights value by value: past 32 weights or 64 accumulators
    per thread it spills (found by benchmarks/sass_gate.py), so such tiles are no candidates."""
    if w_bits == 8 or unmasked_loop(channels, config, w_bits):
        return True
    threads = 32 * config.num_warps
    return (config.block_n * config.block_k <= 32 * threads
            and config.block_m * config.block_n <= 64 * threads)


def useful_splits(m: int, n: int, k: int, config: Config) -> list[int]:
    """Split counts worth trying: each leaves a program enough K-steps, and the grid at most a few
    waves (a split that ends with a partial wave can still beat one that does not)."""
    grid = tiles(m, n, config)
    k_steps = -(-k // config.block_k)
    return [split for split in SPLITS
            if split == 1 or (k_steps // split >= MIN_K_STEPS_PER_SPLIT and grid * split <= 4 * FULL_GRID)]


def wave_time(m: int, n: int, k: int, config: Config, split: int) -> float:
    """Relative time of a grid when each program's time is proportional to its K-steps: whole
    waves of programs over FULL_GRID SMs, each wave as long as one program."""
    k_steps = -(-k // config.block_k)
    return -(-tiles(m, n, config) * split // FULL_GRID) * -(-k_steps // split)


def candidates_for(m: int, n: int, k: int, channels: int, w_bits: int) -> list[Config]:
    """Every tile of TILES, at each of K_WIDENINGS, with BLOCK_K fitted to the channels, with each
    useful split of K."""
    found = []
    for tile in TILES:
        for widening in K_WIDENINGS:
            wide = widened(tile, widening)
            fitted = replace(wide, block_k=fitting_block_k(wide.block_k, channels))
            if not fits_in_registers(channels, fitted, w_bits):
                continue
            for split in useful_splits(m, n, k, fitted):
                found.append(replace(fitted, split_k=split))
    return list(dict.fromkeys(found))


def default_config(m: int, n: int, k: int, channels: int) -> Config:
    """The untuned choice: large tiles where they fill the GPU, else small ones, and the split of K
    that fills the waves best."""
    tile = LARGE_TILE if tiles(m, n, LARGE_TILE) >= FULL_GRID else SMALL_TILE
    tile = replace(tile, block_k=fitting_block_k(tile.block_k, channels))
    split = min(useful_splits(m, n, k, tile), key=lambda s: (wave_time(m, n, k, tile, s), s))
    return replace(tile, split_k=split)


def cache_path() -> Path:
    configured = os.environ.get("MIXQ_AUTOTUNE_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "mixq" / "autotune.json"


def tuning_enabled() -> bool:
    if os.environ.get("MIXQ_AUTOTUNE", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def tuning_budget_s() -> float:
    """Seconds of tuning per shape (MIXQ_AUTOTUNE_SECONDS; unlimited by default): the candidates
    measured in that time, the default among them, compete."""
    value = os.environ.get("MIXQ_AUTOTUNE_SECONDS", "").strip()
    try:
        return float(value) if value else float("inf")
    except ValueError:
        return float("inf")


class ConfigCache:
    """Configs by key, backed by a JSON file; reads it once, merges with it on every write."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._entries: dict[str, dict] | None = None

    def get(self, key: str) -> Config | None:
        if self._entries is None:
            self._entries = self._read()
        try:
            return Config(**self._entries[key])
        except (KeyError, TypeError):  # absent, or written by a version with other fields
            return None

    def put(self, key: str, config: Config):
        # Another process may have added entries since we read the file: keep them.
        self._entries = {**self._read(), **(self._entries or {}), key: asdict(config)}
        try:
            self._write()
        except OSError as error:
            warnings.warn(f"mixq: cannot write the autotune cache {self.path} ({error}); tuned configs are kept "
                          "for this process only (set MIXQ_AUTOTUNE_CACHE to a writable file)")

    def _write(self):
        """Temporary file + rename: readers see the old file or the new one, never half of one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self._entries, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise

    def _read(self) -> dict[str, dict]:
        try:
            entries = json.loads(self.path.read_text())
        except (FileNotFoundError, NotADirectoryError):
            return {}
        except (OSError, ValueError) as error:
            warnings.warn(f"mixq: ignoring unreadable autotune cache {self.path} ({error}); shapes will be retuned")
            return {}
        return entries if isinstance(entries, dict) else {}


_caches: dict[Path, ConfigCache] = {}


def active_cache() -> ConfigCache:
    """The cache at cache_path(), one instance per path in this process."""
    path = cache_path()
    if path not in _caches:
        _caches[path] = ConfigCache(path)
    return _caches[path]


def tuned_config(key: str, candidates: Iterable[Config], measure: Callable[[Config], float], default: Config) -> Config:
    """The cached config for key, else the fastest candidate by measure(config) (lower is better)."""
    cache = active_cache()
    cached = cache.get(key)
    if cached is not None:
        return cached
    if not tuning_enabled():
        return default
    timings, started, budget = {}, time.monotonic(), tuning_budget_s()
    if budget < float("inf"):
        candidates = dict.fromkeys([default, *candidates])  # the default first: any budget covers it
    for config in candidates:
        if timings and time.monotonic() - started > budget:
            break  # out of time: the best so far (compiling a candidate takes seconds)
        try:
            timings[config] = measure(config)
        except OutOfResources:
            continue  # needs more shared memory or registers than this GPU has
    if not timings:
        return default
    best = min(timings, key=timings.get)
    cache.put(key, best)
    return best


@functools.cache
def device_tag(device: torch.device) -> str:
    """GPU name and Triton version: a config tuned on one is not the best on another."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"{name}|triton {triton.__version__}"
