"""Evaluation-set generation throughput: batched (ours) vs one prompt per call (the reference's way).

The reference evaluation scripts loop over a prompt CSV and call StableDiffusionPipeline once per
prompt, saving each image. Three variants run here side by side on the same model, prompts and
seeds, each writing PNGs to a fresh folder:

- reference: diffusers StableDiffusionPipeline, one prompt per call, DDIM, image saved as PNG;
- ours, batch 1: `safediff.eval.generate` with batch_size 1;
- ours, batch B: `safediff.eval.generate` with batch_size B.

Variants are interleaved over `--repeats` rounds (the median is reported) so that load from other
jobs on a shared machine hits them alike. One warm-up image per variant is not timed.

    python bench/bench_generate.py [--model tiny-sd] [--prompts 32] [--steps 20] [--batch-size 8]
        [--size 64] [--device cpu] [--threads 1] [--repeats 3]
    python bench/bench_generate.py --model sandbox --guidance 4 --steps 10 --batch-size 32

On the sandbox (pixel space, no diffusers pipeline) the reference variant is the same loop written
by hand: one prompt per call, diffusers' DDIMScheduler stepping the UNet with CFG.
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-sd", help="model spec (see safediff generate)")
    parser.add_argument("--base", help="base model for bare UNets / 'vanilla'")
    parser.add_argument("--prompts", type=int, default=32, help="number of prompts")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, help="image side in pixels (default: the model's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    from safediff.eval.generate import default_size, generate, to_uint8
    from safediff.eval.model_spec import parse_model_spec
    from safediff.models.loading import load_t2i_model
    from safediff.models.stable_diffusion import diffusers_pipeline
    from safediff.prompt_sets import PromptRow

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = load_t2i_model(parse_model_spec(args.model, args.base), device=device)
    width, height = (args.size, args.size) if args.size else default_size(model)
    subjects = ["a cat", "a red car", "two dogs", "a lighthouse", "a bowl of fruit", "a skyline"]
    rows = [
        PromptRow(
            i,
            f"{subjects[i % len(subjects)]}, photo number {i}",
            seed=1000 + i,
            width=width,
            height=height,
        )
        for i in range(args.prompts)
    ]
    pixel_space = "vae" not in model.components  # the sandbox: no VAE, no diffusers pipeline
    if not pixel_space:
        pipe = diffusers_pipeline(model.components, model.unet)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def reference_pixel(rows_: list, out: Path) -> None:
        """The reference's loop for a model without a diffusers pipeline: one prompt per call,
        diffusers' DDIMScheduler stepping the UNet with CFG, image saved as PNG."""
        from diffusers import DDIMScheduler
        from PIL import Image

        from safediff.sandbox.manifest import read_metadata

        weights = model.source.split(":", 1)[1]  # "sandbox:<weight file>"
        sched = DDIMScheduler.from_config(read_metadata(weights)["scheduler_config"])
        out.mkdir(parents=True)
        uncond = model.encode_text([""], device)
        for row in rows_:
            cond = model.encode_text([row.prompt], device)
            g = torch.Generator(device).manual_seed(row.seed)
            x = torch.randn((1, *model.latent_shape), generator=g, device=device)
            sched.set_timesteps(args.steps)
            with torch.no_grad():
                for t in sched.timesteps:
                    eps = model.unet(
                        torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])
                    ).sample
                    e_u, e_c = eps.chunk(2)
                    x = sched.step(e_u + args.guidance * (e_c - e_u), t, x).prev_sample
            Image.fromarray(to_uint8(model.decode(x))[0].numpy()).save(out / f"{row.index}.png")

    def reference(rows_: list, out: Path) -> None:
        if pixel_space:
            return reference_pixel(rows_, out)
        out.mkdir(parents=True)
        for row in rows_:
            image = pipe(
                row.prompt,
                height=height,
                width=width,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                generator=torch.Generator(device).manual_seed(row.seed),
            ).images[0]
            image.save(out / f"{row.index}.png")

    def ours(batch_size: int):
        def run(rows_: list, out: Path) -> None:
            generate(
                model,
                rows_,
                out,
                default_guidance=args.guidance,
                num_steps=args.steps,
                batch_size=batch_size,
                progress=False,
            )

        return run

    variants = {
        (
            "reference: diffusers DDIM loop, 1 prompt/call"
            if pixel_space
            else "reference: diffusers pipeline, 1 prompt/call"
        ): reference,
        "ours: generate, batch 1": ours(1),
        f"ours: generate, batch {args.batch_size}": ours(args.batch_size),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for i, fn in enumerate(variants.values()):
            fn(rows[:1], Path(tmp) / f"warmup{i}")
        for r in range(args.repeats):
            for i, (name, fn) in enumerate(variants.items()):
                sync()
                start = time.perf_counter()
                fn(rows, Path(tmp) / f"r{r}v{i}")
                sync()
                times[name].append(time.perf_counter() - start)

    print(
        f"generation, {args.model}, {args.prompts} prompts x {args.steps} DDIM steps, "
        f"{width}x{height} px, CFG {args.guidance}, device {args.device}, "
        f"{args.threads} thread(s), median of {args.repeats}"
    )
    print(f"{'variant':<48}{'images/s':>10}{'seconds':>10}")
    rate = {}
    for name, ts in times.items():
        t = statistics.median(ts)
        rate[name] = args.prompts / t
        print(f"{name:<48}{rate[name]:>10.2f}{t:>10.2f}")
    ref, one, batched = rate.values()
    print(
        f"speed ratio batched / reference: {batched / ref:.2f}x; "
        f"batched / ours batch 1: {batched / one:.2f}x; ours batch 1 / reference: {one / ref:.2f}x"
    )


if __name__ == "__main__":
    main()
