"""`python -m mixq.calibrate`: calibrate a pipeline, measure per-layer sensitivity, solve a mixed-
precision bit plan under a budget, and write a report into a run folder.

examples:
  python -m mixq.calibrate                                               # offline default, no downloads
  python -m mixq.calibrate --out runs/proving --stage allocate --w-bits 3.5     # re-budget a run, seconds
  python -m mixq.calibrate --out runs/proving --stage sweep --w-bits 3.6,4,5   # bits-vs-quality frontier, minutes
  python -m mixq.calibrate --config tiny-sdxl                            # random-weight tiny SDXL, a minute
  python -m mixq.calibrate --model ./my-pipeline --out runs/mine         # a local folder (pipe.save_pretrained)
  python -m mixq.calibrate --config sdxl-turbo --prompts captions_val2017.json --out runs/turbo
  python -m mixq.calibrate --config sdxl-turbo --model ./sdxl-turbo --dtype float32 --device cpu --size 512
  python -m mixq.calibrate --config lcm-lora-sdxl --out runs/lcm-sdxl    # LCM-LoRA fused, 4 steps
  python -m mixq.calibrate --config lcm-lora-sd15 --out runs/lcm-sd15

Without --config, a run folder given with --out that already holds a config.yaml is continued with
that config (only the budget may change); otherwise the offline default config `proving` is used: the
proving-ground pipeline shipped in mixq (trained on flat coloured shapes, so the report can check what
the images show). --model and
the other model/sampling flags override the config (the field each one sets is in its help).
Then: mixq.quantize(pipe, plan="runs/turbo/plan.yaml", calibration="runs/turbo").
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from mixq.errors import MixqError


def parse_args(argv):
    from mixq.calib.config import OVERRIDES
    from mixq.calib.run import EXTRA_STAGES, STAGES

    def sets(flag):
        return f" (sets {OVERRIDES[flag]})"

    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m mixq.calibrate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None,
                        help="a config YAML, or a shipped config name (proving, tiny-sdxl, sdxl-turbo, lcm-lora-sdxl, "
                             "lcm-lora-sd15); default: the --out folder's config.yaml, else proving (offline)")
    parser.add_argument("--model", help="a Hugging Face Hub id or a local pipeline folder in diffusers layout" + sets("model"))
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="model dtype" + sets("dtype"))
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N" + sets("device"))
    parser.add_argument("--variant", help="weights variant to load, e.g. fp16" + sets("variant"))
    parser.add_argument("--steps", type=int, help="inference steps" + sets("steps"))
    parser.add_argument("--guidance", type=float, help="guidance scale" + sets("guidance"))
    parser.add_argument("--size", help="image size: 512, or WIDTHxHEIGHT such as 1024x768" + sets("size"))
    parser.add_argument("--prompts", help="prompts file: COCO captions JSON/CSV, PartiPrompts TSV, JSON list or text"
                        + sets("prompts"))
    parser.add_argument("--num-prompts", type=int, help="number of calibration prompts (first N)" + sets("num_prompts"))
    parser.add_argument("--w-bits",
                        help="weight budget, a size-weighted average: the bit-width of the quantized layers' weights, "
                             "weighted by their parameter counts; from the smallest candidate (2; the run states the "
                             "exact floor, 3.375 for proving) to 8. Default 4. With --stage sweep, an increasing list: "
                             "3.4,3.6,4" + sets("w_bits"))
    parser.add_argument("--a-bits",
                        help="activation budget, a size-weighted average: the bit-width of the layers' inputs, "
                             "weighted by their element counts; 4 to 8. Default 8. With --stage sweep, one value or "
                             "one per weight budget" + sets("a_bits"))
    parser.add_argument("--components", help="what to quantize besides the UNet, e.g. unet,vae or "
                        "unet,vae,text_encoder,text_encoder_2 (W8A8; calibrated in collect, compared in the report)"
                        + sets("components"))
    parser.add_argument("--content-prompts", type=int,
                        help="held-out prompts per configuration in the report's content check (proving-ground "
                             "models; 0: no content check; fewer: a quicker, less certain report)"
                             + sets("content_prompts"))
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: the cores other processes leave free, chosen again as the "
                             "load changes; OMP_NUM_THREADS also fixes it)")
    parser.add_argument("--out", default=None, help="run folder (default: runs/<config name or model folder name>)")
    parser.add_argument("--stage", choices=("all",) + STAGES + EXTRA_STAGES, default="all",
                        help="run this stage even if up to date (earlier stages' files must exist in --out); "
                             "allocate and report then follow when their inputs changed. sweep: the plan and random "
                             "allocations at each budget of --w-bits, on a finished run (the report gains the frontier)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def resolve_config(args):
    """(config, run folder) from the flags: --config, else the folder's own config.yaml, else the
    offline default; then the command-line overrides."""
    from mixq.calib.config import apply_overrides, config_from_data, load_config
    from mixq.calib.runfolder import RunFolder

    inferred = RunFolder(args.out).stored_config() if args.config is None and args.out else None
    if inferred is not None:
        config = config_from_data(inferred)
    else:
        config = load_config(args.config)
        if args.model and args.config is None:
            config.name = Path(args.model.rstrip("/")).name or config.name  # name the run after the model
    budgets = {} if args.stage == "sweep" else {"w_bits": single_budget(args.w_bits, "--w-bits"),
                                                "a_bits": single_budget(args.a_bits, "--a-bits")}
    apply_overrides(config, model=args.model, dtype=args.dtype, device=args.device, variant=args.variant,
                    steps=args.steps, guidance=args.guidance, size=args.size, prompts=args.prompts,
                    num_prompts=args.num_prompts, components=args.components, content_prompts=args.content_prompts,
                    **budgets)
    return config, args.out or f"runs/{config.name}"


def single_budget(text, flag: str) -> float | None:
    from mixq.calib.frontier import parse_budget_list
    from mixq.errors import BudgetError

    if text is None:
        return None
    values = parse_budget_list(text, flag)
    if len(values) > 1:
        raise BudgetError(f"{flag} {text}: a list of budgets is for --stage sweep; give one budget otherwise")
    return values[0]


def sweep_budgets(args, config) -> tuple[list[float], list[float]] | None:
    """(weight budgets, activation budgets) for --stage sweep; None for the other stages."""
    from mixq.calib.frontier import parse_budget_list
    from mixq.errors import BudgetError

    if args.stage != "sweep":
        return None
    if args.w_bits is None:
        raise BudgetError("--stage sweep needs weight budgets: --w-bits 3.4,3.6,4")
    a_bits = parse_budget_list(args.a_bits, "--a-bits") if args.a_bits is not None else [config.budget.a_bits]
    return parse_budget_list(args.w_bits, "--w-bits"), a_bits


class Terminated(Exception):
    """SIGTERM, raised where the main thread is, so that it unwinds like Ctrl-C."""


def raise_terminated(signum, frame):
    raise Terminated()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    import torch

    from mixq.calib.distributed import maybe_init
    from mixq.calib.run import STAGES, RunState, command_line, run
    from mixq.threads import ThreadPolicy

    state, threads_before = RunState(), torch.get_num_threads()
    previous = signal.signal(signal.SIGTERM, raise_terminated) if is_main_thread() else None
    try:
        threads = ThreadPolicy(args.threads, log=print)
        config, out = resolve_config(args)
        stages = STAGES if args.stage == "all" else (args.stage,)
        sweep = sweep_budgets(args, config)
        with maybe_init():  # joins torchrun's process group when there is one
            run(config, out, stages=stages, progress=not args.no_progress, command=command_line(argv),
                threads=threads, state=state, sweep=sweep)
    except (MixqError, FileNotFoundError) as err:  # bad input: the message says what and how to fix it
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as stop:
        # Every file is written atomically, so an interrupted run leaves finished work for the rerun.
        print(("" if args.no_progress else "\n") + state.interrupted_line(), file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT)
    finally:
        torch.set_num_threads(threads_before)  # a caller in this process keeps its own setting
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
