"""LoRA adapters on quantized pipelines (mixq.lora): loaded with pipe.load_lora_weights after quantizing
or after loading a checkpoint, switched, disabled and unloaded without requantizing; fusing refused;
bad LoRA files refused before the pipeline changes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import mixq
from mixq import LoraError
from mixq.layers import find_lora_layers, find_quantized_layers
from mixq.lora import QuantizedLoraConv2d, QuantizedLoraLinear
from mixq.modules import QConv2d, QLinear
from tests.conftest import capture_unet_call, unet_output
from tests.test_lora import LCM_LORA_TARGETS

PLAN_BITS = [(8, 8), (4, 8), (2, 8), (4, 8)]  # a 4-bit-budget mix (A4 rarely pays)


def lora_state_dict(master, seed: int, rank: int = 4):
    """A random (non-zero) LoRA on LCM-LoRA's target modules, as diffusers writes LoRA files."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    scratch = copy.deepcopy(master)
    torch.manual_seed(seed)
    scratch.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LCM_LORA_TARGETS,
                                        init_lora_weights=False))
    # Small enough that the adapted model stays in the range the activations were calibrated on.
    return {k: v * 0.5 for k, v in get_peft_model_state_dict(scratch.unet).items()}


def save_lora(pipe_class, state_dict, folder):
    pipe_class.save_lora_weights(folder, unet_lora_layers={k: v.clone() for k, v in state_dict.items()})
    return folder


def relative_error(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def loras(_tiny_sdxl_master, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    cls = type(_tiny_sdxl_master)
    return {name: save_lora(cls, lora_state_dict(_tiny_sdxl_master, seed), root / name)
            for name, seed in (("one", 1), ("two", 2))}


def mixed_plan(unet) -> dict:
    from mixq.layers import quantizable_layers

    names = [n for n in quantizable_layers(unet) if n not in ("conv_in", "conv_out")]
    return {n: {"w_bits": w, "a_bits": a} for n, (w, a) in zip(names, PLAN_BITS * len(names))}


@pytest.fixture(scope="module", params=["W8A8", "mixed"])
def setting(request, _tiny_sdxl_master):
    master = _tiny_sdxl_master
    call = capture_unet_call(master)
    bits = dict(w_bit=8, a_bit=8) if request.param == "W8A8" else dict(plan=mixed_plan(master.unet))
    quantized = mixq.quantize(copy.deepcopy(master), progress=False, num_prompts=4, **bits)
    return {"master": master, "call": call, "quantized": quantized, "name": request.param}


def float_with(master, folder, name):
    pipe = copy.deepcopy(master)
    pipe.load_lora_weights(str(folder), adapter_name=name)
    return pipe


# --- the layers --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_lora_branch_is_exactly_added_to_the_integer_layer(kind):
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    if kind == "linear":
        layer = QLinear.from_float(nn.Linear(32, 16), 4, 8, (-3.0,), (3.0,))
        x = torch.randn(2, 5, 32)
    else:
        layer = QConv2d.from_float(nn.Conv2d(16, 8, 3, padding=1), 4, 8, (-3.0,), (3.0,))
        x = torch.randn(2, 16, 6, 6)
    base = layer(x)
    holder = nn.Sequential(layer)
    holder.anchor = nn.Parameter(torch.zeros(1))  # PEFT reads a model's device from its first parameter
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=["0"], init_lora_weights=False), holder)
    wrapped = holder[0]
    assert isinstance(wrapped, QuantizedLoraLinear if kind == "linear" else QuantizedLoraConv2d)
    a, b = wrapped.lora_A["default"], wrapped.lora_B["default"]
    with torch.no_grad():
        assert torch.equal(wrapped(x), base + b(a(x)) * 2.0)
    assert wrapped.get_base_layer() is layer and layer.qweight_0.dtype == torch.uint8  # still packed 4-bit


def test_peft_hooks_are_registered_and_fail_loudly_when_moved(monkeypatch):
    from peft.tuners.lora.model import LoraModel

    from mixq.lora import register

    assert LoraModel._create_new_module.mixq_original is not None
    register()  # idempotent
    assert not hasattr(LoraModel._create_new_module.mixq_original, "mixq_original")
    monkeypatch.setattr(LoraModel, "_create_new_module", lambda *args: None)
    with pytest.raises(RuntimeError, match="not supported by this mixq version"):
        register()


# --- the pipeline flow ------------------------------------------------------------------------------


def test_load_switch_disable_unload_against_float_lora(setting, loras):
    master, call, base = setting["master"], setting["call"], setting["quantized"]
    pipe = copy.deepcopy(base)
    quantized_only = unet_output(pipe.unet, call)
    float_only = unet_output(master.unet, call)
    quantization_error = relative_error(quantized_only, float_only)

    pipe.load_lora_weights(str(loras["one"]), adapter_name="one")
    pipe.load_lora_weights(str(loras["two"]), adapter_name="two")
    assert len(find_lora_layers(pipe.unet)) > 100
    assert all(isinstance(pipe.unet.get_submodule(n), (QuantizedLoraLinear, QuantizedLoraConv2d))
               for n in find_lora_layers(pipe.unet) if n in dict(base.unet.named_modules()))
    for name in ("one", "two"):
        pipe.set_adapters([name])
        with_lora = unet_output(pipe.unet, call)
        reference = unet_output(float_with(master, loras[name], name).unet, call)
        effect = relative_error(reference, float_only)
        error = relative_error(with_lora, reference)
        assert effect > 0.1  # the adapter changes the model...
        assert error < 1.25 * quantization_error + 1e-3  # ...and adds no error of its own

    pipe.set_adapters(["one", "two"], adapter_weights=[0.5, 0.5])
    both = unet_output(pipe.unet, call)
    assert relative_error(both, unet_output(pipe.unet, call)) == 0
    pipe.disable_lora()
    assert torch.equal(unet_output(pipe.unet, call), quantized_only)
    pipe.enable_lora()
    pipe.unload_lora_weights()
    assert not find_lora_layers(pipe.unet)
    assert sorted(find_quantized_layers(pipe.unet)) == sorted(find_quantized_layers(base.unet))
    assert torch.equal(unet_output(pipe.unet, call), quantized_only)


def test_lora_after_loading_a_checkpoint_and_in_the_diffusers_backend(setting, loras, tmp_path):
    from diffusers import UNet2DConditionModel

    master, call = setting["master"], setting["call"]
    mixq.save_quantized(setting["quantized"], tmp_path / "ckpt")
    loaded = mixq.load_quantized(copy.deepcopy(master), tmp_path / "ckpt")
    loaded.load_lora_weights(str(loras["one"]), adapter_name="one")
    expected = unet_output(loaded.unet, call)
    reference = copy.deepcopy(setting["quantized"])
    reference.load_lora_weights(str(loras["one"]), adapter_name="one")
    assert torch.equal(expected, unet_output(reference.unet, call))

    setting["quantized"].unet.save_pretrained(tmp_path / "unet")
    pipe = copy.deepcopy(master)
    pipe.unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    pipe.load_lora_weights(str(loras["one"]), adapter_name="one")
    assert torch.equal(unet_output(pipe.unet, call), expected)


def test_fusing_into_quantized_weights_is_refused(setting, loras):
    pipe = copy.deepcopy(setting["quantized"])
    pipe.load_lora_weights(str(loras["one"]), adapter_name="one")
    before = unet_output(pipe.unet, setting["call"])
    with pytest.raises(LoraError, match=r"fuse it into the floating-point pipeline before quantizing"):
        pipe.fuse_lora()
    assert torch.equal(unet_output(pipe.unet, setting["call"]), before)


def test_saving_a_quantized_pipeline_with_adapters_says_to_unload_them(setting, loras, tmp_path):
    pipe = copy.deepcopy(setting["quantized"])
    pipe.load_lora_weights(str(loras["one"]), adapter_name="one")
    with pytest.raises(mixq.CheckpointError, match=r"unload them first \(pipe.unload_lora_weights\(\)\)"):
        mixq.save_quantized(pipe, tmp_path / "ckpt")


# --- bad LoRA files: one clear error, the pipeline unchanged ---------------------------------------


def assert_refused_and_unchanged(pipe, call, folder, match):
    modules_before = [type(m) for m in pipe.unet.modules()]
    output_before = unet_output(pipe.unet, call)
    with pytest.raises(LoraError, match=match):
        pipe.load_lora_weights(str(folder), adapter_name="bad")
    assert [type(m) for m in pipe.unet.modules()] == modules_before
    assert torch.equal(unet_output(pipe.unet, call), output_before)


@pytest.mark.parametrize("loaded_before", [False, True])
def test_lora_for_modules_that_do_not_exist_is_refused(setting, loras, tmp_path, loaded_before):
    state = lora_state_dict(setting["master"], seed=3)
    key = next(k for k in state if k.startswith("down_blocks.0"))
    state[key.replace("down_blocks.0", "down_blocks.7")] = state[key].clone()
    folder = save_lora(type(setting["master"]), state, tmp_path / "bad")
    pipe = copy.deepcopy(setting["quantized"])
    if loaded_before:
        pipe.load_lora_weights(str(loras["one"]), adapter_name="one")
    assert_refused_and_unchanged(pipe, setting["call"], folder, match=r"does not have \(e.g. 'down_blocks.7")


def test_lora_rank_mismatch_is_refused(setting, tmp_path):
    state = lora_state_dict(setting["master"], seed=3)
    key = next(k for k in state if "lora_A" in k and state[k].dim() == 2)
    state[key] = torch.randn(8, state[key].shape[1])
    folder = save_lora(type(setting["master"]), state, tmp_path / "bad")
    assert_refused_and_unchanged(copy.deepcopy(setting["quantized"]), setting["call"], folder,
                                 match=r"rank 8 in lora_A and 4 in lora_B")


def test_lora_of_another_width_is_refused(setting, tmp_path):
    state = lora_state_dict(setting["master"], seed=3)
    key = next(k for k in state if "lora_B" in k and state[k].dim() == 2)
    state[key] = torch.randn(state[key].shape[0] + 8, state[key].shape[1])
    folder = save_lora(type(setting["master"]), state, tmp_path / "bad")
    assert_refused_and_unchanged(copy.deepcopy(setting["quantized"]), setting["call"], folder,
                                 match="made for another model")


# --- the proving ground's colour-swap LoRA -----------------------------------------------------------


def test_shipped_color_swap_lora_swaps_colours_and_keeps_them_at_w8a8():
    """The measured table (benchmarks/results/lora-content-*.md, 400 prompts) in small: the base pipeline
    never swaps, the LoRA mostly does, and W8A8 + the same LoRA file about as often."""
    from mixq.proving import SAMPLING, load_pipeline
    from mixq.proving.lora import load_lora, swap_prompts, swap_verdicts

    pairs = swap_prompts("evaluation", 40)
    base = load_pipeline()
    assert sum(swap_verdicts(base, pairs)) <= 2
    with_lora = sum(swap_verdicts(load_lora(copy.deepcopy(base)), pairs))
    assert with_lora >= 28
    quantized = mixq.quantize(base, 8, 8, prompts="proving:calibration", num_prompts=16, progress=False, **SAMPLING)
    assert sum(swap_verdicts(load_lora(quantized), pairs)) >= with_lora - 4


def test_color_swap_training_runs_and_resumes(tmp_path):
    from mixq.proving import load_pipeline
    from mixq.proving.lora import ADAPTER, adapter_modules, save_lora, train

    pipe = load_pipeline()
    train(pipe, 2, tmp_path / "work", batch=4, pool_size=16, quiet=True)
    trained = [p.detach().clone() for p in adapter_modules(pipe.unet).parameters()]
    b_weights = [m.weight for n, m in pipe.unet.named_modules() if n.endswith(f"lora_B.{ADAPTER}")]
    assert b_weights and any(w.abs().sum() > 0 for w in b_weights)  # B starts at zero; two steps move it
    again = load_pipeline()
    train(again, 2, tmp_path / "work", batch=4, pool_size=16, quiet=True)  # resumes: finished, nothing to do
    assert all(torch.equal(a, b) for a, b in zip(trained, adapter_modules(again.unet).parameters()))
    save_lora(again, tmp_path / "lora", record={"steps": 2})
    fresh = load_pipeline()
    fresh.load_lora_weights(str(tmp_path / "lora"), adapter_name=ADAPTER)
    assert (tmp_path / "lora" / "training.json").is_file()
