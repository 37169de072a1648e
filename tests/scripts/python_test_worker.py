#!/usr/bin/python3
"""A worker for python_binding_test.py: the example's numpy model, plus
what a test needs (model.options.mode):
  checks   own loop; first checks that bad arrays are refused with clear errors
  raise    sps's loop; loss_and_gradient raises ValueError at step 3
  rebind   sps's loop; loss_and_gradient rebinds `grad` instead of writing into it
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples", "python"))
import sps  # noqa: E402
from logreg_worker import SoftmaxRegression  # noqa: E402


class Failing(SoftmaxRegression):
    def __init__(self, *args, mode):
        super().__init__(*args)
        self.mode, self.calls = mode, 0

    def loss_and_gradient(self, params, x, y, grad):
        self.calls += 1
        if self.mode == "raise" and self.calls == 3:
            raise ValueError("the model gave up at its third batch")
        if self.mode == "rebind":
            fresh = np.zeros_like(grad)
            loss = super().loss_and_gradient(params, x, y, fresh)
            grad = fresh  # noqa: F841 (the mistake under test: sps's buffer is left unwritten)
            return loss
        return super().loss_and_gradient(params, x, y, grad)


def expect_error(kind, words, f):
    try:
        f()
    except kind as e:
        for w in words:
            assert w in str(e), f"{kind.__name__} '{e}' does not mention '{w}'"
        return
    raise AssertionError(f"no {kind.__name__} raised")


def checks(worker, model, train, test):
    worker.connect(model)
    n = worker.num_params
    assert n == 7850, n
    expect_error(TypeError, ["float32", "float64"], lambda: worker.pull(np.empty(n)))
    expect_error(ValueError, ["7850", "7849"], lambda: worker.pull(np.empty(n - 1, np.float32)))
    frozen = np.empty(n, np.float32)
    frozen.setflags(write=False)
    expect_error(ValueError, ["read-only"], lambda: worker.pull(frozen))
    expect_error(ValueError, ["C-contiguous"], lambda: worker.pull(np.empty(2 * n, np.float32)[::2]))
    expect_error(ValueError, ["7850", "3"], lambda: worker.push(np.zeros(3, np.float32), 0.0))
    expect_error(IndexError, ["outside"], lambda: train.batch([len(train)]))
    params = np.empty(n, np.float32)
    grad = np.empty_like(params)
    rng = np.random.default_rng(worker.rank)
    first = None
    for step in range(worker.step, worker.steps):
        version = worker.pull(params)
        assert version >= 0
        if step == 0:
            first = params.copy()
        x, y = train.batch(rng.integers(0, len(train), 32))
        worker.push(grad, model.loss_and_gradient(params, x, y, grad))
    assert not np.array_equal(first, params), "the parameters never changed"
    # Worker 0 wrote model.init(seed) into the servers: every worker pulled it first.
    expected = np.empty(n, np.float32)
    model.init(expected, worker.integer("training.seed"))
    assert np.array_equal(first, expected), "the first pull is not model.init()"
    result = worker.finish(train, test)
    print(f"checks passed: {result['steps']} steps, test accuracy {result['test_accuracy']}", flush=True)


def main():
    options = sps.command_line(sys.argv, models=["numpy_logreg"])
    with sps.Worker(options) as worker:
        mode = worker.option("mode", "checks")
        train, test = worker.dataset("train"), worker.dataset("test")
        model = Failing(train.features, train.classes, worker.real("training.l2"), mode=mode)
        if mode == "checks":
            checks(worker, model, train, test)
        else:
            worker.train(model, train, test)


if __name__ == "__main__":
    main()
