#!/usr/bin/env python3
"""PyTorch baseline for the CUDA compressor bench (bench/cuda_compress_bench.cu):
times   acc = r + g; idx = acc.abs().topk(k).indices; vals = acc[idx]; acc[idx] = 0
for n in {1M, 25M} and ratio in {0.1%, 1%}, with CUDA events around each step,
median of --repeat after --warmup. Gradients rotate among 4 fresh N(0,1)
buffers; the residual r carries over (r = acc) as in training. Note
torch.topk leaves the order of ties unspecified and returns indices unsorted
(sps sorts them), so this is a lower bound on the work sps does.
"""
import argparse
import statistics

import torch


def bench(n, ratio, warmup, repeat, pool=4):
    k = max(1, int(ratio * n))
    gen = torch.Generator(device="cuda").manual_seed(1234)
    grads = [torch.randn(n, device="cuda", generator=gen) for _ in range(pool)]
    r = torch.zeros(n, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for i in range(warmup + repeat):
        g = grads[i % pool]
        torch.cuda.synchronize()
        start.record()
        acc = r + g
        idx = acc.abs().topk(k).indices
        vals = acc[idx]
        acc[idx] = 0
        end.record()
        torch.cuda.synchronize()
        r = acc
        if i >= warmup:
            times.append(start.elapsed_time(end))
    del vals
    return statistics.median(times)


def copy_bound(n, warmup, repeat):
    # One device-to-device copy moving 12n bytes (6n read + 6n written).
    src = torch.ones(6 * n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for i in range(warmup + repeat):
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--small", action="store_true", help="one tiny size (smoke test)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible to PyTorch")
    print("device:", torch.cuda.get_device_name(0), "torch", torch.__version__)
    sizes = [1 << 16] if a.small else [1 << 20, 25 << 20]
    print(f"\n{'n':>10} {'ratio':>7} {'method':<14} {'median_ms':>10} {'copy12n_ms':>12} {'x_copy':>8}")
    for n in sizes:
        c = copy_bound(n, a.warmup, a.repeat)
        for ratio in (0.001, 0.01):
            t = bench(n, ratio, a.warmup, a.repeat)
            print(f"{n:>10} {100 * ratio:>6.1f}% {'torch topk':<14} {t:>10.4f} {c:>12.4f} {t / c:>8.2f}")


if __name__ == "__main__":
    main()
