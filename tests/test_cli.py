"""`python -m mixq.calibrate` pointed at your own model: --model on a locally saved pipeline, the
model/sampling overrides, clear load errors (offline Hub id, bad local paths), no warnings on the
default and README paths, and the README "your own model" flow end to end.

A small config (10 quantizable layers, 2 prompts) keeps every run to seconds."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mixq.calibrate import main

REPO = Path(__file__).resolve().parents[1]

# Everything but the mid block's two resnets and one transformer block's attn2.to_v / to_out / ff
# stays in floating point: both groups are present, and sensitivity takes seconds.
SMALL_CONFIG = {
    "name": "tiny-sdxl",
    "model": {"id": "offline:tiny-sdxl"},
    "sampling": {"num_inference_steps": 1, "guidance_scale": 0.0, "seed": 7},
    "calibration": {"num_prompts": 2, "sensitivity_prompts": 1, "batch_size": 2},
    "keep_fp": ["conv_in", "conv_out", "down_blocks.*", "up_blocks.*", "time_embedding.*", "add_embedding.*",
                "mid_block.attentions.0.proj_*", "mid_block.attentions.0.transformer_blocks.1.*", "*.attn1.*",
                "*.attn2.to_q", "*.attn2.to_k"],
    "bits": {"weight_content": [2, 4, 8], "weight_quality": [4, 8], "activation": [8]},
    "budget": {"w_bits": 4.0, "a_bits": 8.0, "ratios": [0.8, 1.0, 1.25]},
}
# What a user must not see on a default path: third-party deprecation and missing-package notices.
NOISE = re.compile(r"warn|deprecat|torchvision|accelerate|Traceback", re.IGNORECASE)


def write_small_config(path: Path, **overrides) -> str:
    config = copy.deepcopy(SMALL_CONFIG)
    for section, values in overrides.items():
        config[section] = {**config.get(section, {}), **values} if isinstance(values, dict) else values
    path.write_text(yaml.safe_dump(config))
    return str(path)


def save_tiny_pipeline(folder: Path) -> Path:
    from mixq.offline import tiny_sdxl_pipeline

    tiny_sdxl_pipeline(seed=0).save_pretrained(str(folder))
    return folder


def subprocess_env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_cli(args, cwd, env=None, timeout=600) -> subprocess.CompletedProcess:
    """The CLI in its own process, as a user runs it (warnings and exit code as they see them)."""
    return subprocess.run([sys.executable, "-m", "mixq.calibrate", *args], cwd=cwd,
                          env=subprocess_env(**(env or {})), capture_output=True, text=True, timeout=timeout)


def noise(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if NOISE.search(line)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A user's folder: a pipeline saved with save_pretrained and a small config."""
    root = tmp_path_factory.mktemp("user")
    save_tiny_pipeline(root / "my-pipeline")
    write_small_config(root / "small.yaml")
    return root


@pytest.fixture(scope="module")
def local_run(workdir):
    """README's "your own model" command on the saved folder (with the small config), in a subprocess."""
    result = run_cli(["--model", "./my-pipeline", "--out", "runs/mine", "--config", "small.yaml", "--no-progress"],
                     cwd=workdir)
    return workdir, result


def test_cli_calibrates_a_locally_saved_pipeline_via_model(local_run):
    workdir, result = local_run
    assert result.returncode == 0, result.stderr[-3000:]
    out = workdir / "runs" / "mine"
    for name in ("plan.yaml", "sensitivity.yaml", "report.md", "config.yaml", "run.yaml"):
        assert (out / name).is_file(), name
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["id"] == "./my-pipeline"
    assert "`./my-pipeline`" in (out / "report.md").read_text()


def test_default_cli_prints_no_warnings(local_run):
    _, result = local_run
    assert result.returncode == 0
    assert noise(result.stderr) == [], result.stderr


def test_offline_default_prints_no_warnings(tmp_path):
    """The shipped default config (offline tiny SDXL), its first stage on 2 prompts: no notices."""
    result = run_cli(["--num-prompts", "2", "--stage", "collect", "--out", "run", "--no-progress"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert noise(result.stderr) == [], result.stderr


def test_readme_your_own_model_flow_runs_and_is_quiet(local_run):
    """The README section's Python block, run as written after its calibration command."""
    workdir, result = local_run
    assert result.returncode == 0
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Your own model", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)```", section, re.S)[0]
    assert "python -m mixq.calibrate --model ./my-pipeline --out runs/mine" in commands
    code = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    flow = subprocess.run([sys.executable, "-c", code], cwd=workdir, env=subprocess_env(), capture_output=True,
                          text=True, timeout=600)
    assert flow.returncode == 0, flow.stderr[-3000:]
    assert noise(flow.stderr) == [], flow.stderr
    from mixq.checkpoint import MANIFEST_NAME

    assert (workdir / "my-pipeline-mixq" / MANIFEST_NAME).is_file()
    assert (workdir / "fox.png").is_file()
    assert "quantized layers:" in flow.stdout


def test_hub_id_in_offline_mode_is_one_clear_error(tmp_path):
    result = run_cli(["--model", "stabilityai/sdxl-turbo", "--out", "run"], cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    message = result.stderr.strip()
    assert message.startswith("error: cannot load the pipeline 'stabilityai/sdxl-turbo'")
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in message and "--model PATH" in message
    assert "HF_HUB_OFFLINE=0" in message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("make, expected", [
    (lambda root: root / "missing", "there is no folder"),
    (lambda root: (root / "file.txt").write_text("x") and root / "file.txt", "is a file"),
    (lambda root: (root / "empty").mkdir() or root / "empty", "holds no model_index.json"),
])
def test_bad_local_model_paths_are_refused_before_loading(tmp_path, capsys, make, expected):
    path = make(tmp_path)
    assert main(["--model", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot load the pipeline '{path}'") and expected in err
    assert not (tmp_path / "run").exists()


def test_dtype_size_steps_and_guidance_reach_the_pipeline(workdir, tmp_path, monkeypatch, capsys):
    import mixq.calib.run as run_module

    loaded, calls = [], []
    real_load = run_module.load_pipeline

    def spy_load(model, progress=True):
        pipe = real_load(model, progress)
        loaded.append(pipe)
        original_call = type(pipe).__call__

        def spy_call(self, *args, **kwargs):
            calls.append({k: kwargs.get(k) for k in ("height", "width", "num_inference_steps", "guidance_scale")})
            return original_call(self, *args, **kwargs)

        monkeypatch.setattr(type(pipe), "__call__", spy_call)
        return pipe

    monkeypatch.setattr(run_module, "load_pipeline", spy_load)
    out = tmp_path / "run"
    args = ["--config", str(workdir / "small.yaml"), "--model", str(workdir / "my-pipeline"), "--dtype", "bfloat16",
            "--size", "48x40", "--steps", "2", "--guidance", "0.5", "--out", str(out), "--stage", "collect",
            "--no-progress"]
    assert main(args) == 0, capsys.readouterr().err
    pipe = loaded[0]
    assert pipe.unet.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16
    assert calls and all(c == {"height": 40, "width": 48, "num_inference_steps": 2, "guidance_scale": 0.5}
                         for c in calls)
    from safetensors import safe_open

    with safe_open(str(out / "reference.safetensors"), "pt") as f:
        assert tuple(f.get_tensor("images").shape[-2:]) == (40, 48)  # height, width
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["model"]["dtype"] == "bfloat16"
    assert (recorded["sampling"]["height"], recorded["sampling"]["width"]) == (40, 48)


@pytest.mark.parametrize("flags, expected", [
    (["--size", "50"], "multiples of 8"),
    (["--size", "big"], "WIDTHxHEIGHT"),
    (["--device", "gpu7"], "'model.device'"),
    (["--guidance", "-1"], "'sampling.guidance_scale'"),
    (["--content-prompts", "-1"], "'evaluation.content_prompts'"),
])
def test_bad_overrides_name_the_flag(tmp_path, capsys, flags, expected):
    assert main([*flags, "--out", str(tmp_path / "run")]) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_content_prompts_flag_sets_the_report_field():
    from mixq.calibrate import parse_args, resolve_config

    default, _ = resolve_config(parse_args([]))
    checked, _ = resolve_config(parse_args(["--content-prompts", "200"]))
    assert default.evaluation.content_prompts == 0 and checked.evaluation.content_prompts == 200
    assert checked.to_dict()["calibration"] == default.to_dict()["calibration"]  # the measurement is unchanged


def test_load_quantized_with_a_hub_id_in_offline_mode_says_so(tmp_path):
    code = ("import mixq\n"
            "from mixq.offline import tiny_sdxl_pipeline\n"
            "try:\n"
            "    mixq.load_quantized(tiny_sdxl_pipeline(), 'someone/sdxl-turbo-w4a8')\n"
            "except mixq.CheckpointError as err:\n"
            "    print(err)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=subprocess_env(HF_HUB_OFFLINE="1"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    message = result.stdout.strip()
    assert message.startswith("cannot load the checkpoint 'someone/sdxl-turbo-w4a8'")
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in message and "a local checkpoint folder" in message


@pytest.mark.parametrize("offline, reachable, expected", [
    (True, True, "offline mode is on (HF_HUB_OFFLINE=1)"),
    (False, False, "the Hub could not be reached"),
    (False, True, "`huggingface-cli login`"),
])
def test_load_failure_message_names_the_cause_and_the_fix(monkeypatch, offline, reachable, expected):
    import mixq.hub as hub

    monkeypatch.setattr(hub, "hub_offline", lambda: offline)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: reachable)
    message = hub.load_failure_message("someone/private-model", OSError("401 Client Error"))
    assert message.startswith("cannot load the pipeline 'someone/private-model'") and expected in message
    assert "Fix:" in message


def test_hub_id_without_network_fails_fast_with_one_clear_error(tmp_path):
    """No network and nothing cached: one line, no retry loop (huggingface_hub retries each file)."""
    result = run_cli(["--model", "stabilityai/sdxl-turbo", "--out", "run"], cwd=tmp_path,
                     env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "Retrying" not in result.stderr + result.stdout
    message = result.stderr.strip()
    assert message.startswith("error: cannot load the pipeline 'stabilityai/sdxl-turbo'"), message
    assert "could not be reached" in message and len(message.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_abbreviated_flags_are_refused(tmp_path, capsys):
    """`--w-bit 4` must not silently mean `--w-bits 4`."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--w-bit", "4", "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --w-bit" in capsys.readouterr().err


def test_help_states_budget_ranges_and_threads(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "size-weighted average" in text and "--threads" in text and "4 to 8" in text


def test_zero_threads_is_one_clear_error(tmp_path, capsys):
    assert main(["--threads", "0", "--out", str(tmp_path / "run")]) == 2
    assert "--threads 0: give at least 1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
