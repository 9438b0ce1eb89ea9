"""The sensitivity pass with a layer's candidates sharing one UNet call (the default on small models)
against one candidate per call, on the offline default (proving-ground model, prompts, candidates):
one process, the two arms measuring the same layers in alternating rounds, so both see the same
machine load.

    python -m benchmarks.sensitivity_batching_ab --every 4 --rounds 3

Prints each arm's seconds per round, the per-round ratio, and how many rows the arms scored alike
(bit for bit).
"""

from __future__ import annotations

import argparse
import statistics
import time


def main(argv=None) -> int:
    import tempfile

    import torch

    from benchmarks.environment import environment
    from mixq.calib.collect import Reference
    from mixq.calib.config import load_config
    from mixq.calib.pipeline import load_pipeline
    from mixq.calib.run import Session, collect_stage, prompts_for
    from mixq.calib.runfolder import RunFolder
    from mixq.calib.sensitivity import Evaluator, candidate_bits, evaluator_at_current_precision, measure_layer

    parser = argparse.ArgumentParser(prog="python -m benchmarks.sensitivity_batching_ab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--every", type=int, default=4, help="measure every N-th layer (1: the whole pass)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--config", default="proving")
    args = parser.parse_args(argv)

    config = load_config(args.config)
    with tempfile.TemporaryDirectory() as tmp:
        # The calibrate command's own collect stage: the same layers, ranges and float reference.
        s = Session(config, RunFolder(tmp), load_pipeline(config.model, progress=False), prompts_for(config),
                    progress=False, log=lambda *_: None)
        collect_stage(s)
        pipe, layers, calibration = s.pipe, s.layers, s.calibration
        one_per_call = Evaluator(pipe, Reference.load(s.folder.reference), config.sampling.seed,
                                 config.pipeline_kwargs(), config.calibration.batch_size, candidates_per_call=1)
        arms = {"one candidate per call": evaluator_at_current_precision(one_per_call),
                "candidates sharing a call": evaluator_at_current_precision(s.evaluator)}
    sample = list(layers)[::args.every]
    shared = arms["candidates sharing a call"].candidates_per_call
    print(f"{environment('cpu')['device']}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"config {config.name}: {len(sample)} of {len(layers)} layers, up to {shared} candidates per call",
          flush=True)

    seconds = {label: [] for label in arms}
    rows = {}
    for round_index in range(args.rounds):
        order = list(arms) if round_index % 2 == 0 else list(reversed(arms))
        for label in order:
            evaluator = arms[label]
            start = time.perf_counter()
            rows[label] = {name: measure_layer(evaluator, pipe.unet, layers[name], calibration,
                                               candidate_bits(layers[name].group, config.bits.weight_content,
                                                              config.bits.weight_quality, config.bits.activation))
                           for name in sample}
            seconds[label].append(time.perf_counter() - start)
        print(f"round {round_index + 1}: " + ", ".join(f"{label} {seconds[label][-1]:.1f} s" for label in arms),
              flush=True)
    one, shared_label = list(arms)
    ratios = [a / b for a, b in zip(seconds[one], seconds[shared_label])]
    alike = sum(rows[one][name] == rows[shared_label][name] for name in sample)
    print(f"{args.rounds} alternating rounds: {one} median {statistics.median(seconds[one]):.1f} s, "
          f"{shared_label} median {statistics.median(seconds[shared_label]):.1f} s; per-round speed-up "
          f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}, {max(ratios):.2f}]; rows alike bit for bit: "
          f"{alike} of {len(sample)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
