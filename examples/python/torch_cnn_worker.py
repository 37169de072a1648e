#!/usr/bin/python3
"""A worker whose model is a PyTorch CNN, written in Python: two 5x5
convolutions with max-pooling and a linear classifier (5,994 parameters),
the same network as examples/torch_cnn (C++), under the same config:

    scripts/sps-launch examples/torch_cnn/job.yaml --worker examples/python/torch_cnn_worker.py

sps.TorchModel turns the module into an sps model: autograd computes the
gradient, sps compresses it (top-k with error feedback) and ships it.
Needs Debian's python3-torch.
"""
import sys

import torch
import torch.nn.functional as F

import sps


class Cnn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 8, 5)
        self.conv2 = torch.nn.Conv2d(8, 16, 5)
        self.fc = torch.nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # 28 -> 24 -> 12
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 12 -> 8 -> 4
        return self.fc(x.flatten(1))


def main():
    options = sps.command_line(sys.argv, models=["torch_cnn"])
    with sps.Worker(options) as worker:
        # Several workers share a machine: one intra-op thread each unless told otherwise.
        torch.set_num_threads(worker.option("torch_threads", 1))
        torch.manual_seed(worker.integer("training.seed"))  # worker 0's initial values are the job's
        model = sps.TorchModel(Cnn(), input_shape=(1, 28, 28))
        result = worker.train(model, worker.dataset("train"), worker.dataset("test"))
        if worker.rank == 0:
            print(f"torch_cnn (Python): {result['steps']} steps, test accuracy {result['test_accuracy']:.4f}",
                  flush=True)


if __name__ == "__main__":
    main()
