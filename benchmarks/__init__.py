"""mixq benchmarks: latency, memory and fidelity of fp vs mixq vs torchao (see run.py)."""
