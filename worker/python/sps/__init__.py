"""sps: train a model written in Python through an sps job.

Workers push compressed, error-corrected gradients (top-k, threshold, ...)
to sharded parameter servers, synchronously or not; this package is the
worker side of the public API (docs/worker-api.md, "Python"):

    import sys, sps
    options = sps.command_line(sys.argv, models=["my_model"])   # --config, --set, --rank, --help, ...
    with sps.Worker(options) as worker:
        result = worker.train(model, worker.dataset("train"), worker.dataset("test"))

A model is any object with `tensors` (a list of (name, shape)),
`init(params, seed)` and `loss_and_gradient(params, x, y, grad) -> loss`,
and optionally `evaluate(params, x, y) -> (loss, accuracy)`;
`sps.TorchModel(module)` makes one from a torch.nn.Module.
"""
from ._core import Dataset, Error, Worker, WorkerOptions, __version__, command_line
from .torch_model import TorchModel

__all__ = ["Dataset", "Error", "TorchModel", "Worker", "WorkerOptions", "command_line"]
