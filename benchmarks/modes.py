"""How a variant's UNet runs: eager, torch.compile, or replayed from a CUDA graph.

The mode is applied to the UNet only, identically for every variant: the text encoders and the
VAE are the same modules in every variant, so they run eager everywhere.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

CAPTURE_WARMUP_CALLS = 3  # CUDA graphs need the lazy initialisations (cuBLAS, autotuning) done first


def compile_module(module: nn.Module):
    """torch.compile the module's forward in place: the module keeps its attributes (a UNet's
    .config, .dtype), and a CUDA graph can later be captured around the compiled forward."""
    module.forward = torch.compile(module.forward)


class CudaGraphedForward:
    """Stands in for module.forward: the first call with a given input signature (shapes, dtypes,
    non-tensor arguments) is captured in a CUDA graph; later calls copy their tensors into the
    captured inputs, replay the graph and return a copy of its outputs."""

    def __init__(self, forward):
        self.forward = forward
        self.graphs = {}

    @staticmethod
    def signature(leaves, spec) -> tuple:
        return (str(spec),) + tuple(
            (tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else repr(x) for x in leaves
        )

    def __call__(self, *args, **kwargs):
        leaves, spec = tree_flatten((args, kwargs))
        key = self.signature(leaves, spec)
        if key not in self.graphs:
            self.graphs[key] = self.capture(leaves, spec)
        graph, static_leaves, static_out = self.graphs[key]
        for static, given in zip(static_leaves, leaves):
            if isinstance(static, torch.Tensor):
                static.copy_(given)
        graph.replay()
        # The next replay overwrites the graph's output buffers.
        return tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, static_out)

    @torch.no_grad()
    def capture(self, leaves, spec):
        static_leaves = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        args, kwargs = tree_unflatten(static_leaves, spec)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(CAPTURE_WARMUP_CALLS):
                self.forward(*args, **kwargs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.forward(*args, **kwargs)
        return graph, static_leaves, static_out


def capture_in_cuda_graph(module: nn.Module):
    module.forward = CudaGraphedForward(module.forward)

