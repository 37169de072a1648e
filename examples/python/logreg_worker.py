#!/usr/bin/python3
"""A worker written in Python: softmax regression in numpy, trained through sps.

    scripts/sps-launch examples/python/job.yaml --worker examples/python/logreg_worker.py

sps-launch starts this program once per worker, with the standard worker
command line (--config, --set, --rank, ...; try --help). The model below is
plain numpy; sps does the rest: error feedback, top-k selection, pushes to
the servers, pulls, BSP/SSP/ASP. With `--set model.options.loop=own` the
script runs its own training loop (its own batch sampling) instead of sps's.
Needs `import sps`: sps-launch puts the build's python/ folder on PYTHONPATH.
"""
import sys

import numpy as np

import sps


class SoftmaxRegression:
    """Cross-entropy of softmax(x W^T + b) plus l2/2 |W|^2; tensors (weight, bias)."""

    def __init__(self, features, classes, l2):
        self.features, self.classes, self.l2 = features, classes, l2
        self.tensors = [("weight", (classes, features)), ("bias", (classes,))]

    def unpack(self, flat):
        # Views into sps's flat vector: writing into them writes into it.
        n = self.classes * self.features
        return flat[:n].reshape(self.classes, self.features), flat[n:]

    def init(self, params, seed):
        weight, bias = self.unpack(params)
        weight[:] = np.random.default_rng(seed).normal(0.0, 0.01, weight.shape)
        bias[:] = 0.0

    def log_probabilities(self, params, x):
        weight, bias = self.unpack(params)
        z = x @ weight.T + bias
        z -= z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    def loss_and_gradient(self, params, x, y, grad):
        weight, _ = self.unpack(params)
        log_p = self.log_probabilities(params, x)
        rows = np.arange(len(y))
        loss = -log_p[rows, y].mean() + 0.5 * self.l2 * float(np.dot(weight.ravel(), weight.ravel()))
        delta = np.exp(log_p)
        delta[rows, y] -= 1.0
        delta /= len(y)
        grad_weight, grad_bias = self.unpack(grad)
        np.matmul(delta.T, x, out=grad_weight)
        grad_weight += self.l2 * weight
        grad_bias[:] = delta.sum(axis=0)
        return float(loss)

    def hessian_diag(self, params, x, y, out):
        """The exact diagonal of the loss Hessian on the batch (for
        compression.error_feedback: hessian_diag)."""
        curvature = np.exp(self.log_probabilities(params, x))
        curvature *= (1.0 - curvature) / len(y)
        out_weight, out_bias = self.unpack(out)
        np.matmul(curvature.T, x * x, out=out_weight)
        out_weight += self.l2
        out_bias[:] = curvature.sum(axis=0)

    def evaluate(self, params, x, y):
        log_p = self.log_probabilities(params, x)
        return float(-log_p[np.arange(len(y)), y].mean()), float((log_p.argmax(axis=1) == y).mean())


def own_loop(worker, model, train, test):
    """connect, then pull / gradient / push per step, then finish."""
    worker.connect(model)
    params = np.empty(worker.num_params, dtype=np.float32)
    grad = np.empty_like(params)
    mine = np.arange(worker.rank, len(train), worker.num_workers)  # this worker's partition
    rng = np.random.default_rng([worker.integer("training.seed"), worker.rank])
    batch_size = worker.integer("training.batch_size")
    for _ in range(worker.step, worker.steps):  # step > 0 after --resume
        worker.pull(params)
        x, y = train.batch(rng.choice(mine, batch_size, replace=False))
        loss = model.loss_and_gradient(params, x, y, grad)
        worker.push(grad, loss, batch=(x, y))  # the batch matters for error_feedback: hessian_diag only
    return worker.finish(train, test)


def main():
    options = sps.command_line(sys.argv, models=["numpy_logreg"])
    with sps.Worker(options) as worker:
        train, test = worker.dataset("train"), worker.dataset("test")
        model = SoftmaxRegression(train.features, train.classes, worker.real("training.l2"))
        loop = worker.option("loop", "sps")
        if loop not in ("sps", "own"):
            raise SystemExit(f"model.options.loop: expected 'sps' or 'own', got '{loop}'")
        result = own_loop(worker, model, train, test) if loop == "own" else worker.train(model, train, test)
        if worker.rank == 0:
            print(f"numpy_logreg ({loop} loop): {result['steps']} steps, "
                  f"test accuracy {result['test_accuracy']:.4f}", flush=True)


if __name__ == "__main__":
    main()
