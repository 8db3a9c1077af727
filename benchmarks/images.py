"""Images per second at 32x32 for training and for NLL evaluation with a U-Net denoiser.

    python benchmarks/images.py                                        # small U-Net on CPU
    python benchmarks/images.py --width 8 --batch_size 4 --steps 1 --warmup 0   # a quick check
    python benchmarks/images.py --arch ddpm --accelerator gpu --precision 32-true bf16-mixed

--arch ddpm is the architecture of google/ddpm-cifar10-32 (35.7M parameters; its config is built
in, the weights are random: speed does not depend on them). Training: one Adam step of the
-log p(x) loss (DiffusionModel.nll, one log SNR per image) per batch. Evaluation:
DiffusionModel.nll_points with --npoints denoiser calls per image and the model's default chunk
size, as in validation. bf16-mixed runs under torch.autocast, as Lightning's bf16-mixed does.
Each precision also estimates -log p of the same images at the same (log SNR, noise) points (keyed
by seed and image index), so their paired difference is the effect of the precision alone;
--json PATH writes everything.

    python benchmarks/images.py --arch ddpm --accelerator gpu --precision 32-true bf16-mixed --json gpu.json
"""
import json
import argparse
import os
import sys
import time

import torch as t

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from diffusionmodel import DiffusionModel  # noqa: E402
from unet import DDPM_CIFAR10_CONFIG, UNetDenoiser, small_unet_config  # noqa: E402


def build(arch, width, device):
    config = DDPM_CIFAR10_CONFIG if arch == "ddpm" else small_unet_config(3, 32, width)
    model = DiffusionModel(UNetDenoiser(config), x_shape=(3, 32, 32), logsnr_loc=6.,
                           logsnr_scale=3.)
    return model.to(device)


def timed(fn, steps, warmup, device):
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        t.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        t.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def measure(args, precision, device):
    t.manual_seed(0)
    model = build(args.arch, args.width, device)
    autocast = t.autocast(device.type, dtype=t.bfloat16, enabled=precision == "bf16-mixed")
    optimizer = t.optim.Adam(model.parameters(), lr=1e-4)
    x = t.rand(args.batch_size, 3, 32, 32, device=device) * 2 - 1

    def train_step():
        with autocast:
            loss = model.nll(x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    train_s = timed(train_step, args.steps, args.warmup, device)
    xe = t.rand(args.eval_batch_size, 3, 32, 32, device=device) * 2 - 1

    def eval_step():
        with autocast:
            model.nll_points(xe, npoints=args.npoints, replicates=2)

    model.eval()
    eval_s = timed(eval_step, max(1, args.steps // 2), 1, device)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    with autocast:  # the same images and points for every precision: a paired comparison
        nll = model.nll_points(xe, npoints=max(args.npoints, 8), replicates=2, seed=1)[0]
    return params, args.batch_size / train_s, args.eval_batch_size / eval_s, nll.double().cpu()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--arch", choices=("small", "ddpm"), default="small",
                        help="small: small_unet_config; ddpm: google/ddpm-cifar10-32's")
    parser.add_argument("--width", type=int, default=32, help="channels of the small U-Net")
    parser.add_argument("--accelerator", default="cpu", help="cpu, gpu (cuda) or mps")
    parser.add_argument("--precision", nargs="+", default=["32-true"],
                        choices=("32-true", "bf16-mixed"))
    parser.add_argument("--batch_size", type=int, default=None,
                        help="training batch (cpu 32, gpu 128)")
    parser.add_argument("--eval_batch_size", type=int, default=None, help="default: batch_size")
    parser.add_argument("--npoints", type=int, default=8,
                        help="denoiser calls per image in evaluation")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (cpu 5, gpu 30)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    device = t.device("cuda" if args.accelerator in ("gpu", "cuda") else args.accelerator)
    on_cpu = device.type == "cpu"
    args.batch_size = args.batch_size or (32 if on_cpu else 128)
    args.eval_batch_size = args.eval_batch_size or args.batch_size
    args.steps = args.steps or (5 if on_cpu else 30)
    if args.threads:
        t.set_num_threads(args.threads)
    name = (t.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu ({t.get_num_threads()} threads)")
    print(f"| arch | params | device | precision | train images/s (batch {args.batch_size}) "
          f"| eval images/s ({args.npoints} points, batch {args.eval_batch_size}) |")
    print("|---|---|---|---|---|---|")
    rows, nll = [], {}
    for precision in args.precision:
        params, train_ips, eval_ips, nll[precision] = measure(args, precision, device)
        rows.append(dict(arch=args.arch, params_m=params, device=name, precision=precision,
                         train_images_per_s=train_ips, eval_images_per_s=eval_ips,
                         nll_nats=nll[precision].mean().item()))
        print(f"| {args.arch} | {params:.2f}M | {name} | {precision} | {train_ips:.1f} "
              f"| {eval_ips:.1f} |", flush=True)
    result = dict(rows=rows, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
                  npoints=args.npoints)
    if "32-true" in nll and "bf16-mixed" in nll:
        diff = nll["bf16-mixed"] - nll["32-true"]
        result["bf16_minus_fp32_nats"] = dict(mean=diff.mean().item(), max_abs=diff.abs().max().item())
        print(f"bf16-mixed - 32-true on the same {len(diff)} images and points: mean "
              f"{diff.mean().item():+.4f} nats per image, max |diff| {diff.abs().max().item():.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
