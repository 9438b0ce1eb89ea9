"""Options and shared fixtures of the benchmark suites.

Options are namespaced (--mixq-*, --unet-config, --plan) and listed in benchmarks/config.py.
`variant_set` builds each compared variant once per pytest run; `timed` runs pytest-benchmark in
pedantic mode with the suite's rounds and warm-up, timing by CUDA events on a GPU. The JSON that
--benchmark-json writes gets a "mixq" section: the resolved config, the environment, and the
skipped or failed benchmarks with their reasons (the report lists them).
"""

from __future__ import annotations

import os

import pytest
import torch

# As in tests/conftest.py: Triton's interpreter is chosen before anything (diffusers, via mixq) imports Triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks.config import OPTIONS, add_options, bench_config, option_dest

# Skipped and failed benchmarks, with reasons. Module state: the logreport hook is given no config,
# and each process runs pytest once.
_outcomes: list[dict] = []


def pytest_addoption(parser):
    add_options(parser.getgroup("mixq", "mixq benchmarks").addoption)


def option_values(config) -> dict:
    return {option_dest(flags[0]): config.getoption(option_dest(flags[0])) for flags, _ in OPTIONS}


@pytest.fixture(scope="session")
def bench_cfg(pytestconfig):
    try:
        return bench_config(option_values(pytestconfig))
    except ValueError as err:
        pytest.exit(f"benchmark options: {err}", returncode=4)


@pytest.fixture(scope="session")
def variant_set(bench_cfg):
    from benchmarks.variants import VariantSet

    return VariantSet(bench_cfg)


@pytest.fixture
def variant(variant_set, variant_name):
    from benchmarks.variants import VariantUnavailable

    try:
        return variant_set.get(variant_name)
    except VariantUnavailable as err:
        pytest.skip(str(err))


@pytest.fixture
def timed(request, bench_cfg):
    """timed(fn, group, extra_info): benchmark fn with the suite's rounds and warm-up."""
    from benchmarks.measure import benchmark_timer

    request.node.add_marker(pytest.mark.benchmark(timer=benchmark_timer(bench_cfg.is_cuda)))
    benchmark = request.getfixturevalue("benchmark")

    def run(fn, group: str, extra_info: dict):
        benchmark.group = group
        benchmark.extra_info.update(extra_info)
        return benchmark.pedantic(fn, rounds=bench_cfg.rounds, warmup_rounds=bench_cfg.warmup, iterations=1)

    return run


def pytest_runtest_logreport(report):
    """Remember why a benchmark was skipped or failed, for the report."""
    if report.skipped or report.failed:
        reason = report.longrepr[2] if report.skipped and isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.splitlines()[-1] if reason else ""
        _outcomes.append({"test": report.nodeid, "outcome": "skipped" if report.skipped else "failed",
                          "when": report.when, "reason": reason.removeprefix("Skipped: ")})


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.pop("node", None)  # the host name: results are committed, and the device is recorded below


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_json(config, benchmarks, output_json):
    from benchmarks.environment import environment

    try:
        cfg = bench_config(option_values(config))
    except ValueError as err:
        output_json["mixq"] = {"error": str(err)}
        return
    output_json["mixq"] = {"config": cfg.as_dict(), "environment": environment(cfg.device), "outcomes": list(_outcomes)}
