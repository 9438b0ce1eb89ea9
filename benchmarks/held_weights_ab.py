"""8-bit weights held once in oneDNN's layout against the plain buffer with the layout beside it, on the
full-size UNet: one process, three arms swapped in between alternating calls (bf16 float layers, W8A8
layers holding their layout, the same W8A8 layers with plain buffers and the layout built beside them),
so all arms see the same machine load.

    python -m benchmarks.held_weights_ab --unet-config PATH/sdxl-turbo/unet/config.json --latents 32 64

Prints, per latent size, each arm's median UNet forward and its speed-up over bf16, and each W8A8
arm's bytes. Every 8-bit layer runs on oneDNN here (MIXQ_INT8_GEMM=onednn; by default convolutions and
small linear layers run on mixq's fused GEMM from their plain buffer, holding no layout).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import types

import torch

from benchmarks.alternating import alternate, environment_set
from benchmarks.cpu_unet import calibrate, unet_inputs
from benchmarks.environment import environment


def alternating_times(unet, arms: dict[str, dict], inputs: dict, rounds: int,
                      environments: dict[str, dict] | None = None) -> dict[str, list[float]]:
    """Seconds per UNet call of each arm (name -> layers swapped into the UNet for its calls), alternating
    (benchmarks.alternating.alternate). `environments`: variables set for an arm's calls only (e.g.
    MIXQ_PACKED_GEMM=0, which the kernels read at each call)."""
    environments = environments or {}
    return alternate({arm: (lambda: unet(**inputs), lambda arm=arm, layers=layers: arm_in_place(
        unet, layers, environments.get(arm, {}))) for arm, layers in arms.items()}, rounds)


@contextlib.contextmanager
def arm_in_place(unet, layers: dict, variables: dict):
    from mixq.calib.sensitivity import swapped_layers

    with swapped_layers(unet, layers), environment_set(variables):
        yield


def main(argv=None) -> int:
    with environment_set({"MIXQ_INT8_GEMM": "onednn"}):
        return held_layouts_ab(argv)


def held_layouts_ab(argv=None) -> int:
    import mixq
    from mixq.kernels import onednn
    from mixq.layers import find_quantized_layers, quantizable_layers
    from mixq.offline import load_unet_config, unet_from_config

    parser = argparse.ArgumentParser(prog="python -m benchmarks.held_weights_ab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet-config", required=True)
    parser.add_argument("--latents", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--rounds", type=int, default=5, help="calls per arm and size (alternating)")
    args = parser.parse_args(argv)
    unet = unet_from_config(load_unet_config(args.unet_config), dtype=torch.bfloat16).eval()
    unet.to(memory_format=torch.channels_last)
    print(f"{environment('cpu')['device']}; torch {torch.__version__}; full-size UNet from its config, random "
          "weights, bf16, channels-last, batch 1", flush=True)
    all_inputs = {size: unet_inputs(unet, size, torch.bfloat16) for size in args.latents}
    originals = {n: unet.get_submodule(n) for n in quantizable_layers(unet)}
    with torch.no_grad():
        calibration = calibrate(unet, all_inputs[args.latents[0]])
    mixq.quantize(types.SimpleNamespace(unet=unet), w_bit=8, a_bit=8, calibration=calibration, progress=False)
    held = {n: unet.get_submodule(n) for n in find_quantized_layers(unet)}
    beside = {}
    for name, layer in held.items():
        beside[name] = twin = copy.deepcopy(layer)
        twin.release_kernel_layouts()  # the plain buffer; the ops build the layout beside it on first use
    arms = {"bf16": {n: originals[n] for n in held}, "W8A8 held once": held, "W8A8 layout beside": beside}
    with torch.no_grad():
        for size, inputs in all_inputs.items():
            # The warm-up call of each arm also builds the "beside" arm's layouts.
            times = alternating_times(unet, arms, inputs, args.rounds)
            medians = {arm: statistics.median(t) for arm, t in times.items()}
            cells = [f"{arm} {s:.3f} s ({medians['bf16'] / s:.2f}x bf16)" for arm, s in medians.items()]
            print(f"{size}x{size} latents, {args.rounds} alternating rounds: " + "; ".join(cells)
                  + f"; held / beside {medians['W8A8 layout beside'] / medians['W8A8 held once']:.3f}x; "
                  f"load average {os.getloadavg()[0]:.2f}", flush=True)
    held_bytes = sum(layer.state_bytes() for layer in held.values())
    beside_bytes = sum(layer.state_bytes() for layer in beside.values()) + onednn.packed_weights.nbytes()
    print(f"W8A8 bytes: held once {held_bytes / 2**30:.2f} GiB, layout beside {beside_bytes / 2**30:.2f} GiB "
          f"({held_bytes} / {beside_bytes} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
