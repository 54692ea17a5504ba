"""training.sync_batchnorm: BatchNorm over the batches of all processes (2 CPU processes on gloo)."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from training.sync_batchnorm import AllReduceBatchNorm, convert_sync_batchnorm

WORLD = 2


def small_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.BatchNorm1d(4))
    with torch.no_grad():
        net[1].running_mean.fill_(5.0)  # a shift far from the batch mean: the statistics stay exact
    return net


def batch():
    torch.manual_seed(1)
    return torch.randn(6, 3, 5, 5) * 3 + 2, torch.randn(6, 4)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        net = convert_sync_batchnorm(small_net(), torch.device("cpu")).train()
        x, weights = batch()
        share = slice(rank * 3, rank * 3 + 3)
        x = x[share].clone().requires_grad_(True)
        for _ in range(2):  # twice: the second step normalises the same way and moves the running statistics on
            out = net(x)
        (out * weights[share]).sum().backward()
        torch.save({"out": out.detach(), "x_grad": x.grad, "state": net.state_dict(),
                    "grads": {n: p.grad for n, p in net.named_parameters()}}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_statistics_and_gradients_are_those_of_the_whole_batch(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(WORLD)]

    net = small_net().train()  # one process, the whole batch, plain BatchNorm
    x, weights = batch()
    x.requires_grad_(True)
    for _ in range(2):
        out = net(x)
    (out * weights).sum().backward()

    torch.testing.assert_close(torch.cat([r["out"] for r in ranks]), out.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in ranks]), x.grad, rtol=1e-4, atol=1e-5)
    for name, p in net.named_parameters():  # DDP sums (then averages) what each process computed
        torch.testing.assert_close(ranks[0]["grads"][name] + ranks[1]["grads"][name], p.grad, rtol=1e-4, atol=1e-5)
    for key, value in net.state_dict().items():
        for r in ranks:
            torch.testing.assert_close(r["state"][key], value, rtol=1e-5, atol=1e-6)


def test_conversion_keeps_the_weights_and_acts_as_batchnorm_in_one_process():
    net = small_net()
    with torch.no_grad():
        net[1].weight.mul_(2)
    reference = small_net()
    reference.load_state_dict(net.state_dict())
    converted = convert_sync_batchnorm(net, torch.device("cpu"))
    assert isinstance(converted[1], AllReduceBatchNorm) and isinstance(converted[5], AllReduceBatchNorm)
    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in converted.modules())
    x, _ = batch()
    for mode in (True, False):
        converted.train(mode), reference.train(mode)
        torch.testing.assert_close(converted(x), reference(x))
    torch.testing.assert_close(converted.state_dict(), reference.state_dict())
    assert set(converted.state_dict()) == set(reference.state_dict())  # checkpoints load either way


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_cuda_uses_torchs_sync_batchnorm():
    assert isinstance(convert_sync_batchnorm(small_net(), torch.device("cuda"))[1], nn.SyncBatchNorm)
