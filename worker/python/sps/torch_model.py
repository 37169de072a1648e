"""sps.TorchModel: a torch.nn.Module as an sps model (torch is imported only
when one is made)."""
import warnings

import numpy as np


class TorchModel:
    """The module's parameters (float32, CPU, in named_parameters() order)
    become sps's tensors; `init` hands sps the module's own initial values
    (seed torch before building the module). Every step the pulled
    parameters are copied into the module, autograd computes the gradient,
    and it is copied out.

    input_shape: the shape of one example (e.g. (1, 28, 28)); batches
    arrive as rows of features and are reshaped to (rows, *input_shape).
    loss: loss(output, y) -> scalar tensor; by default cross-entropy for
    integer labels, mean squared error for float targets.
    """

    def __init__(self, module, input_shape=None, loss=None):
        import torch
        self._torch = torch
        self.module = module
        named = list(module.named_parameters())
        for name, p in named:
            if p.dtype != torch.float32 or p.device.type != "cpu":
                raise TypeError(f"TorchModel: parameter {name} is {p.dtype} on {p.device}; sps needs float32 on "
                                f"the CPU")
        self.parameters = [p for _, p in named]
        self.tensors = [(name, tuple(p.shape)) for name, p in named]
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.loss = loss

    def _tensor(self, array):
        # A view, no copy; the parameters sps hands over are read-only, which
        # torch warns about although nothing here writes to them.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return self._torch.from_numpy(array)

    def load(self, params):
        """Writes the flat parameter vector `params` into the module."""
        flat = self._tensor(np.asarray(params, dtype=np.float32))
        offset = 0
        with self._torch.no_grad():
            for p in self.parameters:
                p.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()

    def init(self, params, seed):
        flat = self._torch.from_numpy(params)
        offset = 0
        with self._torch.no_grad():
            for p in self.parameters:
                flat[offset:offset + p.numel()] = p.reshape(-1)
                offset += p.numel()

    def _forward(self, x, y):
        inputs = self._tensor(x)
        if self.input_shape is not None:
            inputs = inputs.view(-1, *self.input_shape)
        out = self.module(inputs)
        target = self._tensor(y)
        if self.loss is not None:
            return out, self.loss(out, target)
        functional = self._torch.nn.functional
        if np.issubdtype(y.dtype, np.integer):
            return out, functional.cross_entropy(out, target.long())
        return out, functional.mse_loss(out.reshape(target.shape), target)

    def loss_and_gradient(self, params, x, y, grad):
        self.load(params)
        _, loss = self._forward(x, y)
        grads = self._torch.autograd.grad(loss, self.parameters)
        flat = self._torch.from_numpy(grad)
        offset = 0
        for g in grads:
            flat[offset:offset + g.numel()] = g.reshape(-1)
            offset += g.numel()
        return float(loss)

    def evaluate(self, params, x, y):
        self.load(params)
        with self._torch.no_grad():
            out, loss = self._forward(x, y)
            accuracy = None
            if np.issubdtype(y.dtype, np.integer) and out.dim() == 2:
                accuracy = float((out.argmax(dim=1) == self._tensor(y).long()).double().mean())
        return float(loss), accuracy
