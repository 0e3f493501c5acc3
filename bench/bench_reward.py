"""Batched steering reward vs a reference-style per-image loop, side by side in one run.

The reference (SafeDiffusion-R1's training loop + `inference_reward.get_reward`) scores each image
alone: tensor -> PIL -> JPEG -> PIL -> open_clip's PIL preprocess -> batch-1 image encode, and
re-encodes the prompt (and steers it) for every image. safediff's `SteeringReward` preprocesses the
whole batch in torch, encodes it in one call, and encodes + steers each distinct prompt once.
Both use the same model (a small OpenCLIP ViT with random weights by default; speed does not
depend on the weights) and the same images. The cache is cleared before every timed batched call,
so each call pays for its prompts as the first call of an epoch would.

  python bench/bench_reward.py                 # 8 prompts x 4 images at 32 to 512 px, CPU
  python bench/bench_reward.py --image-size 224 --width 128 --patch 32   # CLIP geometry, small
  python bench/bench_reward.py --device cuda --image-size 224 --width 768 --layers 12 --sizes 512

The default encoder is sandbox-sized (64 px input, width 64, 2 layers). The speedup grows as the
encoder shrinks (per-call overhead dominates the loop) and shrinks as images grow (the loop's
JPEG + PIL work grows, but so does the batched resize, which on a CPU is memory-bound).
"""

import argparse
import io
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import open_clip
import torch
from PIL import Image

from safediff.rewards.anchors import load_anchor_set
from safediff.rewards.encoders.openclip import load_openclip_encoder
from safediff.rewards.encoders.tiny import tiny_openclip_config
from safediff.rewards.steering_reward import SteeringReward


def reference_loop(
    model: torch.nn.Module,
    tokenizer,
    preprocess,
    v_safe: torch.Tensor,
    images: torch.Tensor,
    prompts: list[str],
    alpha: float,
    device: torch.device,
) -> torch.Tensor:
    """One image at a time, as the reference does (translation steering, every prompt).

    Kinder to the reference than its code: the JPEG stays in memory (it writes and re-reads a
    file) and there is no autocast or extra resize.
    """
    rewards = []
    with torch.no_grad():
        for image, prompt in zip(images, prompts, strict=True):
            arr = (image.float().cpu().numpy().transpose(1, 2, 0) * 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=95)
            buf.seek(0)
            pil = Image.open(buf).convert("RGB")
            x = preprocess(pil).unsqueeze(0).to(device)
            z_img = model.encode_image(x, normalize=True)
            # get_reward encodes the prompt twice: once for its safety score, once inside
            # steer_text_toward_safe.
            z_txt = model.encode_text(tokenizer([prompt]).to(device), normalize=True)
            _text_safety = (z_txt * v_safe).sum(-1)
            z_txt = model.encode_text(tokenizer([prompt]).to(device), normalize=True)
            z_star = torch.nn.functional.normalize(z_txt + alpha * v_safe, dim=-1)
            rewards.append((z_img * z_star).sum(-1))
    return torch.cat(rewards)


def timed_side_by_side(
    fns: dict[str, Callable[[], torch.Tensor]], repeats: int, device: torch.device
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Median seconds per function, timing them in alternation (one warm-up call each).

    Alternating the calls exposes both to the same machine load, so their ratio stays meaningful
    on a shared or throttled CPU.
    """
    outs = {name: fn() for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            outs[name] = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}, outs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompts", type=int, default=8, help="distinct prompts per batch")
    p.add_argument("--group", type=int, default=4, help="images per prompt (K)")
    p.add_argument(
        "--sizes",
        default="32,64,256,512",
        help="generated image sizes in pixels, one table row each (sandbox 32 px to SD 1.5 512 px)",
    )
    p.add_argument("--image-size", type=int, default=64, help="encoder input size")
    p.add_argument("--width", type=int, default=64, help="transformer width of both towers")
    p.add_argument("--layers", type=int, default=2, help="transformer layers of both towers")
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sizes = [int(x) for x in args.sizes.split(",") if x.strip()]

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    cfg = tiny_openclip_config(
        image_size=args.image_size,
        embed_dim=args.width,
        width=args.width,
        layers=args.layers,
        patch_size=args.patch,
        context_length=77,
    )
    cfg["vision_cfg"]["head_width"] = 64
    cfg["text_cfg"]["heads"] = max(1, args.width // 64)
    encoder = load_openclip_encoder("bench-vit", None, device=device, model_cfg=cfg)
    anchors = load_anchor_set("compact")
    reward = SteeringReward(encoder, anchors, alpha=args.alpha, mode="translation", gating="all")
    preprocess = open_clip.image_transform(args.image_size, is_train=False)

    n = args.prompts * args.group
    prompts = [f"prompt number {i}: a photo of something" for i in range(args.prompts)]
    prompts = [p_ for p_ in prompts for _ in range(args.group)]
    n_params = sum(p_.numel() for p_ in encoder.model.parameters())
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"device={device} threads={torch.get_num_threads()} (load average {load:.1f} on "
        f"{os.cpu_count()} CPUs) batch={n} images "
        f"({args.prompts} prompts x {args.group}), OpenCLIP ViT width={args.width} "
        f"layers={args.layers} patch={args.patch} input {args.image_size}px "
        f"({n_params / 1e6:.1f}M params, random weights); median of {args.repeats} alternating runs"
    )
    header = f"{'image px':>8} | {'loop img/s':>10} {'ms/img':>7} | {'batched img/s':>13} {'ms/img':>7} | {'speedup':>7} | {'max|dr|':>7}"
    print(header)
    print("-" * len(header))
    for size in sizes:
        g = torch.Generator().manual_seed(args.seed + size)
        images = torch.rand(n, 3, size, size, generator=g).to(device)

        def batched(images: torch.Tensor = images) -> torch.Tensor:
            reward.clear_cache()  # every call pays for its prompts, as an epoch's first would
            return reward(images, prompts)

        def looped(images: torch.Tensor = images) -> torch.Tensor:
            return reference_loop(
                encoder.model, encoder.tokenizer, preprocess, reward.v_safe, images, prompts,
                args.alpha, device,
            )  # fmt: skip

        med, outs = timed_side_by_side({"loop": looped, "batched": batched}, args.repeats, device)
        t_loop, t_batch = med["loop"], med["batched"]
        diff = (outs["loop"].cpu() - outs["batched"].cpu()).abs().max().item()
        print(
            f"{size:>8} | {n / t_loop:>10.1f} {1000 * t_loop / n:>7.2f} | "
            f"{n / t_batch:>13.1f} {1000 * t_batch / n:>7.2f} | {t_loop / t_batch:>6.1f}x | "
            f"{diff:>7.4f}"
        )
    print(
        "speedup = loop time / batched time on the same images; max|dr| = largest reward "
        "difference (the loop's JPEG + PIL resize vs none)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
