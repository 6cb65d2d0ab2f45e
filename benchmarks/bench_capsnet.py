"""CapsNet training step (Sabour et al.'s MNIST setting: batch 64, 28x28x1, 10 classes, 3 routing iterations,
reconstruction on; shift augmentation, forward, margin + reconstruction loss, backward, Adam step) / its floor, both
timed interleaved in one run (median and min-max of the per-round ratio).

The public implementations are not installable from a registry, so the comparison is with the floor measured in the
same run: forward + backward of the step's two convolutions (conv1 256x9x9 and the PrimaryCaps 9x9 stride-2
convolution, about 90% of a step's arithmetic) with torch's stock nn.Conv2d on the same batch. A ratio near 1 means
routing, decoder, loss and optimiser add little to the convolutions any implementation must run; below 1, the model's
polyphase backward beats the stock strided one. images/s of both are printed from the same rounds.

    python3 benchmarks/bench_capsnet.py [--batch 64] [--repeats 5] [--threads 1]
"""
from __future__ import annotations

import argparse

from common import interleaved, result  # also puts the repository root on sys.path

import torch  # noqa: E402
from torch import nn  # noqa: E402

from models.capsnet import CapsNet  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="training steps per timed round")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable ratios on a shared "
                        "machine; 0: torch's default)")
    parser.add_argument("--iterations", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = CapsNet(num_classes=10, channels=1, image_size=28, routing_iterations=args.iterations,
                    reconstruction=True, shift_pixels=2).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(args.batch, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch,))
    conv1 = nn.Conv2d(1, model.conv1.out_channels, model.conv1.kernel_size)
    primary = nn.Conv2d(model.primary.in_channels, model.primary.out_channels, model.primary.kernel_size,
                        stride=model.primary.stride)

    def steps() -> None:
        for _ in range(args.steps):
            loss = model.model_step((x, y), "train")[0]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def floor() -> None:
        for _ in range(args.steps):
            conv1.zero_grad(set_to_none=True)
            primary.zero_grad(set_to_none=True)
            primary(torch.relu(conv1(x))).sum().backward()

    base, ratios = interleaved(floor, {"step": steps}, args.repeats)
    r = ratios["step"]
    floor_step = base.median / args.steps
    step_ips = args.batch / (floor_step * r.median)
    print(f"capsnet train step: batch {args.batch}, {args.iterations} routing iterations, reconstruction on, "
          f"{torch.get_num_threads()} threads")
    print(f"  floor (stock conv1 + PrimaryCaps conv forward+backward): {floor_step * 1e3:.0f} ms "
          f"({args.batch / floor_step:.1f} images/s)")
    print(f"  training step: {floor_step * r.median * 1e3:.0f} ms ({step_ips:.1f} images/s)")
    print(f"  training step / floor: {r}")
    result("capsnet", r, "stock conv forward+backward", step_images_s=step_ips,
           floor_images_s=args.batch / floor_step, batch=args.batch)


if __name__ == "__main__":
    main()
