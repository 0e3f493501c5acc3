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
  python bench/bench_reward.py --threads 1 --sizes 224,512 --float-resize --breakdown --pil-check

The default encoder is sandbox-sized (64 px input, width 64, 2 layers). The speedup grows as the
encoder shrinks (per-call overhead dominates the loop) and shrinks as images grow (the loop's
JPEG + PIL work grows, but so does the batched resize, which on a CPU is memory-bound). Both sides
run in float32 (the reward's default on the CPU), or both under `--autocast bfloat16|float16`
(the reference runs its reward under fp16 autocast on its GPUs). `--float-resize` adds a column: the batched reward with
the float resize safediff used before its 8-bit one (the same images, timed in alternation);
`--breakdown` times the batched path's stages, and how far the loop is from the image tower alone;
`--pil-check` measures how far the 8-bit and the float resize are from PIL's on the same images.
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
import torch.nn.functional as F
from PIL import Image

from safediff.rewards.anchors import load_anchor_set
from safediff.rewards.encoders.base import (
    center_crop,
    check_images,
    l2_normalize,
    normalize_pixels,
    resize,
)
from safediff.rewards.encoders.openclip import OpenClipEncoder, load_openclip_encoder
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


class FloatResizeEncoder:
    """An OpenCLIP encoder whose preprocessing resizes float images (safediff's earlier path).

    For the `--float-resize` column only: the same model and text tower, with the bicubic
    antialiased resize run on the float [B, 3, H, W] batch instead of 8-bit images.
    """

    def __init__(self, encoder: OpenClipEncoder):
        self.encoder = encoder
        self.device, self.dtype = encoder.device, encoder.dtype
        self.embed_dim, self.name = encoder.embed_dim, f"{encoder.name} (float resize)"

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        check_images(images, f"encoder {self.name!r}")
        x, (size, _) = images.to(enc.device, torch.float32), enc.image_size
        h, w = x.shape[-2:]
        if (h, w) != (size, size):
            short = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
            x = F.interpolate(x, size=short, mode="bicubic", antialias=True).clamp_(0.0, 1.0)
        x = normalize_pixels(center_crop(x, size, size), enc.mean, enc.std).to(enc.dtype)
        return l2_normalize(enc.model.encode_image(x))

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return self.encoder.encode_text(texts)


def pil_distance(images: torch.Tensor, size: int) -> tuple[float, float, float]:
    """Largest |difference| from PIL's bicubic resize of the same uint8 images, in uint8 levels.

    images [B, 3, S, S] are rounded to uint8 first; returns (8-bit resize, float resize, share of
    pixels where the 8-bit resize equals PIL's). Square images only (the bench's).
    """
    x = (images.float().cpu().clamp(0, 1) * 255).round() / 255
    levels = []
    for img in x:
        arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        small = Image.fromarray(arr).resize((size, size), Image.Resampling.BICUBIC)
        levels.append(torch.from_numpy(np.asarray(small).copy()).permute(2, 0, 1))
    pil = torch.stack(levels).float()
    ours = resize(x, size, size) * 255
    flt = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True).clamp(0, 1) * 255
    return (
        (ours - pil).abs().max().item(),
        (flt - pil).abs().max().item(),
        (ours.round() == pil).float().mean().item(),
    )


def stage_times(
    reward: SteeringReward,
    encoder: OpenClipEncoder,
    images: torch.Tensor,
    prompts: list[str],
    repeats: int,
    device: torch.device,
) -> dict[str, float]:
    """Median seconds of the batched reward's stages on `images` (timed in alternation).

    'checks + preprocess': both input checks, resize, crop, normalise; 'image tower': the model's
    image encoder on the preprocessed batch; 'prompts': encoding and steering the distinct
    prompts (the cache cleared first). The rest of a call (the cosine, moving results) is small.
    """
    pixels = encoder.preprocess(images)

    def checks_and_preprocess() -> torch.Tensor:
        check_images(images, "bench")
        check_images(images, "bench")
        return encoder.preprocess(images)

    @torch.no_grad()
    def image_tower() -> torch.Tensor:
        return encoder.model.encode_image(pixels)

    def prompt_targets() -> torch.Tensor:
        reward.clear_cache()
        return reward.prompt_targets(prompts)["target"]

    fns = {
        "checks + preprocess": checks_and_preprocess,
        "image tower": image_tower,
        "prompts": prompt_targets,
    }
    return timed_side_by_side(fns, repeats, device)[0]


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
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="after each row, time the batched path's stages (checks + preprocessing, image tower, "
        "prompts): loop / (tower + prompts) bounds the speedup of any preprocessing",
    )
    p.add_argument(
        "--pil-check",
        action="store_true",
        help="after each row, compare the 8-bit and a float resize with PIL's on 4 of the images",
    )
    p.add_argument(
        "--autocast",
        default=None,
        choices=("bfloat16", "float16"),
        help="run both sides' encoders under torch.autocast with this dtype (the reference's "
        "own mode is fp16 autocast; on a CPU bf16 is the one with native kernels); default: "
        "float32 on both sides",
    )
    p.add_argument(
        "--float-resize",
        action="store_true",
        help="add the batched reward with a float resize (safediff's earlier preprocessing)",
    )
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
    amp_dtype = getattr(torch, args.autocast) if args.autocast else None
    reward = SteeringReward(
        encoder, anchors, alpha=args.alpha, mode="translation", gating="all",
        autocast_dtype=amp_dtype,
    )  # fmt: skip
    float_reward = SteeringReward(
        FloatResizeEncoder(encoder), anchors, alpha=args.alpha, mode="translation", gating="all"
    )
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
        f"({n_params / 1e6:.1f}M params, random weights), "
        f"{args.autocast + ' autocast' if args.autocast else 'float32'} on both sides; median of "
        f"{args.repeats} alternating runs"
    )
    header = f"{'image px':>8} | {'loop img/s':>10} {'ms/img':>7} | {'batched img/s':>13} {'ms/img':>7} | {'speedup':>7} | {'max|dr|':>7}"
    if args.float_resize:
        header += f" | {'float-resize ms/img':>19} {'speedup':>7}"
    print(header)
    print("-" * len(header))
    for size in sizes:
        g = torch.Generator().manual_seed(args.seed + size)
        images = torch.rand(n, 3, size, size, generator=g).to(device)

        def batched(images: torch.Tensor = images) -> torch.Tensor:
            reward.clear_cache()  # every call pays for its prompts, as an epoch's first would
            return reward(images, prompts)

        def looped(images: torch.Tensor = images) -> torch.Tensor:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                return reference_loop(
                    encoder.model, encoder.tokenizer, preprocess, reward.v_safe, images,
                    prompts, args.alpha, device,
                ).float()  # fmt: skip

        def batched_float(images: torch.Tensor = images) -> torch.Tensor:
            float_reward.clear_cache()
            return float_reward(images, prompts)

        fns = {"loop": looped, "batched": batched}
        if args.float_resize:
            fns["float"] = batched_float
        med, outs = timed_side_by_side(fns, args.repeats, device)
        t_loop, t_batch = med["loop"], med["batched"]
        diff = (outs["loop"].cpu() - outs["batched"].cpu()).abs().max().item()
        row = (
            f"{size:>8} | {n / t_loop:>10.1f} {1000 * t_loop / n:>7.2f} | "
            f"{n / t_batch:>13.1f} {1000 * t_batch / n:>7.2f} | {t_loop / t_batch:>6.1f}x | "
            f"{diff:>7.4f}"
        )
        if args.float_resize:
            row += f" | {1000 * med['float'] / n:>19.2f} {t_loop / med['float']:>6.1f}x"
        print(row)
        if args.pil_check and size != args.image_size:
            ours, flt, same = pil_distance(images[:4], args.image_size)
            print(
                f"{'':>8}   vs PIL's resize of the same uint8 images to {args.image_size} px, max "
                f"|d| in uint8 levels: 8-bit {ours:.2f} ({100 * same:.2f}% of pixels equal), "
                f"float {flt:.2f}"
            )
        if args.breakdown:
            stages = stage_times(reward, encoder, images, prompts, args.repeats, device)
            print(
                f"{'':>8}   batched stages, ms/img: "
                + ", ".join(f"{k} {1000 * v / n:.2f}" for k, v in stages.items())
                + f"; loop / image tower = {t_loop / stages['image tower']:.1f}x, loop / "
                f"(tower + prompts) = {t_loop / (stages['image tower'] + stages['prompts']):.1f}x"
            )
    print(
        "speedup = loop time / batched time on the same images; max|dr| = largest reward "
        "difference (the loop's JPEG round-trip and PIL resize vs none and torch's 8-bit resize)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
