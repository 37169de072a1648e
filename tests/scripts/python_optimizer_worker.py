#!/usr/bin/python3
"""A worker for python_binding_test.py: the servers' optimizer against
PyTorch's. One worker pushes dense float32 gradients of a small torch
network (compression.scale: 1, so the servers apply optimizer.name to
exactly this gradient); beside it, a copy of the network takes the same
batches through the torch.optim rule the job's config names. After every
pull the two parameter vectors must agree.

Prints "optimizer matches torch.optim.<Rule>: N steps, largest difference D".
"""
import copy
import sys

import numpy as np
import torch

import sps


def torch_optimizer(worker, params):
    name = worker.string("optimizer.name")
    lr, wd, eps = worker.real("training.lr"), worker.real("optimizer.weight_decay"), worker.real("optimizer.epsilon")
    if name == "adam":
        betas = (worker.real("optimizer.beta1"), worker.real("optimizer.beta2"))
        if wd > 0:
            return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=wd)
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps)
    if name == "adagrad" and wd == 0:
        return torch.optim.Adagrad(params, lr=lr, eps=eps)
    raise SystemExit(f"python_optimizer_worker: no torch rule to compare optimizer.name {name} "
                     f"(weight decay {wd}) with")


def main():
    options = sps.command_line(sys.argv, models=["torch_mlp"])
    with sps.Worker(options) as worker:
        train = worker.dataset("train")
        torch.manual_seed(3)
        net = torch.nn.Sequential(torch.nn.Linear(train.features, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
        reference = copy.deepcopy(net)  # the same initial values: worker 0 writes net's to the servers
        model = sps.TorchModel(net)
        opt = torch_optimizer(worker, reference.parameters())
        worker.connect(model)
        assert worker.num_workers == 1, "the comparison needs one worker"
        params = np.empty(worker.num_params, dtype=np.float32)
        grad = np.empty_like(params)
        rng = np.random.default_rng(5)
        batch = worker.integer("training.batch_size")
        worst = 0.0
        initial = np.empty(0, dtype=np.float32)
        for step in range(worker.step, worker.steps):
            worker.pull(params)
            if step == 0:
                initial = params.copy()
            ref = torch.cat([p.detach().reshape(-1) for p in reference.parameters()]).numpy()
            diff = float(np.max(np.abs(params - ref)))
            worst = max(worst, diff)
            if diff > 2e-5:
                raise SystemExit(f"step {step}: the servers' parameters differ from torch.optim's by {diff} "
                                 f"(largest at index {int(np.argmax(np.abs(params - ref)))})")
            x, y = train.batch(rng.integers(0, len(train), batch).tolist())
            loss = model.loss_and_gradient(params, x, y, grad)
            worker.push(grad, loss)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(reference(torch.from_numpy(x)), torch.from_numpy(y).long()).backward()
            opt.step()
        worker.finish()
        moved = float(np.max(np.abs(params - initial)))
        if moved < 1e-2:
            raise SystemExit(f"the parameters hardly moved ({moved}): nothing was compared")
        print(f"optimizer matches torch.optim.{type(opt).__name__}: {worker.steps} steps, largest difference "
              f"{worst:.2e}, parameters moved up to {moved:.3f}", flush=True)


if __name__ == "__main__":
    main()
