"""mixq: mixed-precision low-bit quantization (MixDQ) for few-step text-to-image diffusion.

    pipe = mixq.quantize(pipe, w_bit=4, a_bit=8)
    mixq.summary(pipe, print_table=True)
"""

from mixq.quiet import silence_torchvision_fallback_notice

silence_torchvision_fallback_notice()  # before diffusers/transformers load (see mixq/quiet.py)

from mixq._version import __version__
from mixq.api import calibrate_ranges, quantize, quantize_unet, summary
from mixq.calibration import Calibration, NonFiniteActivationError
from mixq.checkpoint import load_quantized, save_quantized
from mixq.diffusers_quantizer import MixqConfig, register as _register_diffusers_backend
from mixq.lora import LoraError, register as _register_lora_layers
from mixq.errors import CheckpointError, MixqError
from mixq.modules import QConv2d, QLinear
from mixq.plan import PlanMismatchError
from mixq.quantizers import ACTIVATION_BITS, WEIGHT_BITS, sqnr_db


def _register(register, what: str):
    """A diffusers or PEFT release that moved what mixq registers into must not make mixq unimportable:
    the rest works, and the tests that assert the registration fail."""
    try:
        register()
    except RuntimeError as err:
        import warnings

        warnings.warn(f"mixq: {what} is unavailable: {err}", stacklevel=3)


_register(_register_diffusers_backend, "the diffusers quantization backend (MixqConfig)")  # from_pretrained
_register(_register_lora_layers, "LoRA on quantized layers")  # pipe.load_lora_weights(...) on a quantized pipeline

__all__ = [
    "__version__",
    "quantize",
    "quantize_unet",
    "MixqConfig",
    "summary",
    "save_quantized",
    "load_quantized",
    "calibrate_ranges",
    "Calibration",
    "QLinear",
    "QConv2d",
    "sqnr_db",
    "WEIGHT_BITS",
    "ACTIVATION_BITS",
    "MixqError",
    "CheckpointError",
    "LoraError",
    "NonFiniteActivationError",
    "PlanMismatchError",
]
