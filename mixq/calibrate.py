"""`python -m mixq.calibrate`: calibrate a pipeline, measure per-layer sensitivity, solve a mixed-
precision bit plan under a budget, and write a report.

    python -m mixq.calibrate                                   # offline tiny default
    python -m mixq.calibrate --config sdxl-turbo --prompts captions_val2017.json --out runs/turbo
    python -m mixq.calibrate --out runs/turbo --stage allocate --w-bits 3.5   # new budget, seconds

Then: mixq.quantize(pipe, plan="runs/turbo/plan.yaml", calibration="runs/turbo").
"""

from __future__ import annotations

import argparse
import sys
import warnings

from mixq.calib.config import ConfigError


def parse_args(argv):
    from mixq.calib.run import STAGES

    parser = argparse.ArgumentParser(prog="python -m mixq.calibrate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None,
                        help="a config YAML, or a shipped config name (tiny-sdxl, sdxl-turbo, lcm-lora-sdxl, "
                             "lcm-lora-sd15); default: tiny-sdxl, offline")
    parser.add_argument("--prompts", help="prompts file: COCO captions JSON/CSV, PartiPrompts TSV, JSON list or text")
    parser.add_argument("--num-prompts", type=int, help="number of calibration prompts (first N)")
    parser.add_argument("--w-bits", type=float, help="weight budget: size-weighted average bits")
    parser.add_argument("--a-bits", type=float, help="activation budget: size-weighted average bits")
    parser.add_argument("--out", default=None, help="run folder (default: runs/<config name>)")
    parser.add_argument("--stage", choices=("all",) + STAGES, default="all",
                        help="run one stage alone; earlier stages' files must exist in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from mixq.calib.config import load_config, validate
    from mixq.calib.distributed import maybe_init
    from mixq.calib.run import STAGES, command_line, run

    try:
        config = load_config(args.config)
        if args.prompts is not None:
            config.calibration.prompts = args.prompts
        if args.num_prompts is not None:
            config.calibration.num_prompts = args.num_prompts
        if args.w_bits is not None:
            config.budget.w_bits = args.w_bits
        if args.a_bits is not None:
            config.budget.a_bits = args.a_bits
        validate(config)
        stages = STAGES if args.stage == "all" else (args.stage,)
        with maybe_init():  # joins torchrun's process group when there is one
            run(config, args.out or f"runs/{config.name}", stages=stages, progress=not args.no_progress,
                command=command_line(argv))
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
