"""BatchNorm whose batch statistics span every process of a DDP run, on any device.

torch's `SyncBatchNorm` runs on CUDA only (its statistics kernels have no CPU version). `convert_sync_batchnorm`
uses it on CUDA, and elsewhere (the CPU with gloo) replaces each BatchNorm with `AllReduceBatchNorm`, which sums the
per-channel statistics over the processes with one differentiable all-reduce: autograd then gives the same
gradients as a BatchNorm over the whole, concatenated batch.
"""
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["AllReduceBatchNorm", "convert_sync_batchnorm"]


class _SumOverProcesses(torch.autograd.Function):
    """All-reduce (sum) whose backward is the all-reduce (sum) of the gradient: every process's loss depends on
    every process's input through the sum."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class AllReduceBatchNorm(_BatchNorm):
    """BatchNorm (any number of spatial dims) that, when training under a process group of more than one process,
    normalises with the mean and (biased) variance of the batch of every process, and updates its running
    statistics with them (unbiased variance, as BatchNorm); otherwise it is a plain BatchNorm.

    The statistics are sums of (x - shift) and (x - shift)^2 in float32, with the running mean as the shift, which
    keeps the variance accurate when the mean is large next to the spread.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dims [N, C, ...], got {input.dim()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not (self.training and _distributed()):
            return super().forward(x)
        c = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        view = [1, c] + [1] * (x.dim() - 2)
        shift = self.running_mean.detach().float().view(view) if self.running_mean is not None else 0.0
        centred = x.float() - shift
        count = torch.full((1,), x.numel() / max(c, 1), dtype=torch.float32, device=x.device)
        # one all-reduce; its backward all-reduces the gradients of the sums, as the concatenated batch would have
        sums = _SumOverProcesses.apply(torch.cat([centred.sum(dims), (centred * centred).sum(dims), count]))
        n = sums[-1]
        if not n.item() > 1:  # the same on every rank: n is summed over all of them
            raise ValueError(f"BatchNorm needs more than one value per channel over all processes, got "
                             f"{int(n.item())} (input {tuple(x.shape)} on each process)")
        mean_centred = sums[:c] / n
        var = (sums[c:2 * c] / n - mean_centred * mean_centred).clamp(min=0)
        mean = mean_centred + (shift.view(c) if torch.is_tensor(shift) else shift)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach() * n / (n - 1))
        y = (x.float() - mean.view(view)) * torch.rsqrt(var + self.eps).view(view)
        if self.affine:
            y = y * self.weight.view(view) + self.bias.view(view)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), factor)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` with every BatchNorm synchronised over the processes: torch's SyncBatchNorm on CUDA, else
    AllReduceBatchNorm (parameters and buffers kept). Call it before wrapping in DDP and building the optimizer."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert(module)


def _convert(module: nn.Module) -> nn.Module:
    if isinstance(module, _BatchNorm) and not isinstance(module, (AllReduceBatchNorm, nn.SyncBatchNorm)):
        converted = AllReduceBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                       module.track_running_stats, device=_device_of(module))
        if module.affine:
            with torch.no_grad():
                converted.weight = module.weight
                converted.bias = module.bias
        if module.track_running_stats:
            converted.running_mean = module.running_mean
            converted.running_var = module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, _convert(child))
    return module


def _device_of(module: nn.Module):
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return None
