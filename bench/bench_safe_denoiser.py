"""Safe Denoiser overhead: plain DDIM sampling vs ours (matrix products + log-sum-exp) vs the
reference's formulation (a [B, N, D+1] kernel tensor), side by side in one run.

Both defended variants run inside the same sampler (`rollout(..., guidance=[hook])`) on the same
negation set, noise and prompts; their samples are checked to agree, so the timings compare two
computations of one thing. Two latent sizes:

- tiny-sd latents (4 x 8 x 8, D = 256) with the tiny SD UNet;
- SD-sized latents (4 x 64 x 64, D = 16384) with a small random UNet2DConditionModel at 64 x 64
  (widths 32/64/64, cross-attention only at 16 x 16; a real SD UNet is far too slow on a CPU).
  Its step is orders of magnitude cheaper than SD 1.5's, so the relative overhead printed for
  this size is an upper bound of what a real UNet would see; the hook's own time per call
  (isolated, median) is printed too.

The gate is forced open (gate_threshold=0) so every windowed step pays the full cost; the window is
the reference's t in [780, 1000] (11 of 50 steps), and "all steps" repeats the run with the window
covering every step (the worst case). The bandwidth is 3.15 for tiny-sd latents; for SD-sized
random latents it is raised (--sd-bandwidth) so that the reference's plain exp() does not
underflow to 0 (it then returns E_unsafe = 0 where ours, in log space, does not), which would make
the two disagree for a reason unrelated to speed. "ours, odds gate" is the `gate="odds"` variant
with a reference set as large as the negation set (one more [B, M] product per windowed step).

    python bench/bench_safe_denoiser.py [--negatives 3000] [--steps 50] [--threads 1]

`--sd15-step` adds the figure at SD 1.5's own size without sampling 50 SD 1.5 steps on a CPU
(minutes each): SD 1.5's published UNet (random weights, float32) timed on one CFG call of
`--sd-batch` samples, and our correction of the same batch against the negation set, alternated;
the overhead of a run is (active steps x correction) / (all steps x UNet call), the sampler's
other per-step work left out of both (it is the same with and without the defense).

    python bench/bench_safe_denoiser.py --threads 2 --skip-tiny --skip-sd --sd15-step
"""

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from safediff.defenses.safe_denoiser import (
    SafeDenoiser,
    SafeDenoiserConfig,
    calibrate_gate_threshold,
)
from safediff.models.base import T2IModel
from safediff.models.stable_diffusion import sd_components_to_t2i
from safediff.models.tiny_sd import build_tiny_sd
from safediff.sampling.rollout import rollout


class ReferenceSafeDenoiser(SafeDenoiser):
    """The same correction computed the way the reference code does (as ported from its
    repellency_methods_fast_sdv3.py): torch.cdist distances, then a kernel tensor expanded to
    [B, N, D+1] and multiplied by the negation samples augmented with a column of ones."""

    def correct(self, x0: torch.Tensor, t: torch.Tensor):
        window = self.in_window(t)
        b = x0.shape[0]
        y, _ = self._negset_on(x0.device)
        x = x0.reshape(b, -1)
        n, d = y.shape
        dist = torch.cdist(x.unsqueeze(0), y.unsqueeze(0))[0]  # [B, N]
        kernel = (-dist.unsqueeze(-1).expand(b, n, d + 1) / (2 * self.cfg.bandwidth**2)).exp()
        ref_aug = torch.cat([y, torch.ones(n, 1, device=y.device)], dim=1).unsqueeze(0)
        weighted = (kernel * ref_aug).sum(dim=1)  # [B, D + 1] from two [B, N, D + 1] tensors
        mass = weighted[:, -1]
        e_unsafe = (weighted[:, :-1] / (mass[:, None] + 1e-8)).reshape(x0.shape)
        active = window & (mass.log() > self.log_gate)
        beta = active.float() * self.cfg.scale
        x0_safe = x0 - beta.view(-1, 1, 1, 1) * e_unsafe  # released update
        return x0_safe, active, mass.log()


def timed_round_robin(fns: dict, repeats: int) -> tuple[dict[str, float], dict[str, object]]:
    """Best wall time of each function over `repeats` rounds, variants interleaved in every
    round (so slow drifts of a shared machine hit all of them alike), after one warm-up call."""
    for fn in fns.values():
        fn()
    best = {k: float("inf") for k in fns}
    outs = {}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            outs[key] = fn()
            best[key] = min(best[key], time.perf_counter() - start)
    return best, outs


def sd_sized_model() -> T2IModel:
    """A small random UNet at SD's latent size (4 x 64 x 64), on tiny SD's other components."""
    from diffusers import UNet2DConditionModel

    components = build_tiny_sd(seed=0, sample_size=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        components["unet"] = UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        ).eval()
    return sd_components_to_t2i(components, "sd-sized random UNet")


def hook_ms(hook: SafeDenoiser, x0: torch.Tensor, calls: int = 7) -> float:
    """Median wall time of one correction of a batch x0 (in the window, gate open), in ms."""
    t = torch.full((x0.shape[0],), 981)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        hook.correct(x0, t)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def run_size(
    name: str,
    model: T2IModel,
    args: argparse.Namespace,
    batch: int,
    bandwidth: float,
    repeats: int,
) -> None:
    shape = model.latent_shape
    g = torch.Generator().manual_seed(0)
    negset = torch.randn(args.negatives, *shape, generator=g)
    cond = torch.randn(batch, 77, 32, generator=g)
    uncond = torch.randn(1, 77, 32, generator=g)

    def sample(guidance):
        gens = [torch.Generator().manual_seed(i) for i in range(batch)]
        return rollout(
            model, cond, uncond, gens, num_steps=args.steps, eta=1.0, guidance_scale=5.0,
            batch_size=batch, decode=False, guidance=guidance,
        )  # fmt: skip

    start = time.perf_counter()
    tau = calibrate_gate_threshold(negset.reshape(args.negatives, -1), bandwidth, "l2")
    calib = time.perf_counter() - start
    D = int(torch.tensor(shape).prod())
    print(
        f"\n{name}: latents {shape} (D = {D}), {args.negatives} negation samples, batch {batch}, "
        f"{args.steps} DDIM steps, CFG 5, bandwidth {bandwidth}"
    )
    print(f"  gate calibration (once per negation set): {calib * 1e3:.0f} ms, tau = {tau:.3g}")
    variants: dict[str, list] = {"plain sampling": []}
    windows = {}
    for window_name, t_min in [("t in [780, 1000]", 780), ("all steps", 0)]:
        cfg = SafeDenoiserConfig(bandwidth=bandwidth, gate_threshold=0.0, t_min=t_min)
        hook = SafeDenoiser(negset, cfg)
        windows[window_name] = int(hook.in_window(model.schedule.timesteps(args.steps)[0]).sum())
        variants[f"ours, {window_name}"] = [hook]
        variants[f"reference [B,N,D+1], {window_name}"] = [ReferenceSafeDenoiser(negset, cfg)]
    # the odds gate adds a reference set of safe samples (as many as negation samples)
    odds_cfg = SafeDenoiserConfig(bandwidth=bandwidth, gate="odds", prior_odds=1.0, t_min=780)
    variants["ours, odds gate, t in [780, 1000]"] = [
        SafeDenoiser(negset, odds_cfg, reference=torch.randn(args.negatives, *shape, generator=g))
    ]
    times, trajs = timed_round_robin(
        {k: (lambda v=v: sample(v)) for k, v in variants.items()}, repeats
    )
    plain_t = times["plain sampling"]
    print(
        f"  {'variant (best of ' + str(repeats) + ', interleaved)':<42}{'s/rollout':>10}{'overhead':>10}"
    )
    for label, t in times.items():
        overhead = "" if label == "plain sampling" else f"{(t / plain_t - 1) * 100:>9.1f}%"
        print(f"  {label:<42}{t:>10.3f}{overhead:>10}")
    for window_name, active in windows.items():
        ours = trajs[f"ours, {window_name}"].latents
        diff = (ours - trajs[f"reference [B,N,D+1], {window_name}"].latents).abs().max()
        moved = (ours[:, -1] - trajs["plain sampling"].latents[:, -1]).abs().max()
        print(
            f"  {window_name}: {active} active steps; ours vs reference max |dx| = {diff:.2e}; "
            f"defended vs plain max |dx| = {moved:.2e}"
        )
    x0 = torch.randn(batch, *shape, generator=g)
    ours_ms = hook_ms(variants["ours, all steps"][0], x0)
    ref_ms = hook_ms(variants["reference [B,N,D+1], all steps"][0], x0)
    print(
        f"  one correction of {batch} samples (isolated, median): ours {ours_ms:.1f} ms, "
        f"reference {ref_ms:.1f} ms ({ref_ms / ours_ms:.1f}x); plain sampling "
        f"{plain_t / args.steps * 1e3:.1f} ms per step"
    )


def sd15_step(args: argparse.Namespace, rounds: int = 3) -> None:
    """SD 1.5's UNet call (CFG: 2 x sd-batch latents) vs one correction of sd-batch samples."""
    import importlib.util
    import statistics
    from pathlib import Path

    from diffusers import UNet2DConditionModel

    spec = importlib.util.spec_from_file_location(
        "bench_real_size", Path(__file__).resolve().parent / "bench_real_size.py"
    )
    real = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(real)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**real.ARCHS["sd15"]["unet"]).eval()
    n = args.sd_batch
    g = torch.Generator().manual_seed(0)
    shape = (4, 64, 64)
    x = torch.randn(2 * n, *shape, generator=g)
    t = torch.full((2 * n,), 981)
    cond = torch.randn(2 * n, 77, 768, generator=g)
    negset = torch.randn(args.negatives, *shape, generator=g)
    cfg = SafeDenoiserConfig(bandwidth=args.sd_bandwidth, gate_threshold=0.0, t_min=780)
    hook = SafeDenoiser(negset, cfg)
    x0 = torch.randn(n, *shape, generator=g)
    tsteps = torch.full((n,), 981)

    def unet_call() -> None:
        with torch.inference_mode():
            unet(x, t, encoder_hidden_states=cond)

    def correction() -> None:
        hook.correct(x0, tsteps)

    unet_call(), correction()  # warm-up
    times: dict[str, list[float]] = {"unet": [], "correction": []}
    for _ in range(rounds):
        for name, fn in (("unet", unet_call), ("correction", correction)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    unet_s, corr_s = (statistics.median(times[k]) for k in ("unet", "correction"))
    active = int(hook.in_window(build_sd_schedule().timesteps(args.steps)[0]).sum())
    params = sum(p.numel() for p in unet.parameters())
    print(
        f"\nSD 1.5 UNet ({params / 1e6:.0f}M parameters, random weights, float32), latents "
        f"{shape}, {args.negatives} negation samples, CFG batch {2 * n} ({n} samples), median "
        f"of {rounds} alternated rounds:"
    )
    print(f"  UNet call {unet_s:.2f} s; one correction {corr_s * 1e3:.1f} ms "
          f"({100 * corr_s / unet_s:.2f}% of a call)")  # fmt: skip
    print(
        f"  a {args.steps}-step run with the window t in [780, 1000] ({active} active steps): "
        f"{100 * active * corr_s / (args.steps * unet_s):.3f}% overhead; with every step "
        f"active: {100 * corr_s / unet_s:.2f}%"
    )


def build_sd_schedule():
    """The DDIM schedule SD 1.5 samples with (tiny-sd shares its scheduler config)."""
    return sd_components_to_t2i(build_tiny_sd(seed=0), "tiny-sd").schedule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--negatives", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5, help="timing rounds (tiny size)")
    parser.add_argument("--sd-repeats", type=int, default=2, help="timing rounds (SD size)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4, help="samples per rollout (tiny size)")
    parser.add_argument("--sd-batch", type=int, default=2, help="samples per rollout (SD size)")
    parser.add_argument("--sd-bandwidth", type=float, default=30.0, help="see the docstring")
    parser.add_argument("--skip-sd", action="store_true", help="no SD-sized latents run")
    parser.add_argument("--skip-tiny", action="store_true", help="no tiny-sd latents run")
    parser.add_argument(
        "--sd15-step", action="store_true", help="SD 1.5's UNet call vs a correction (docstring)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"Safe Denoiser overhead, CPU, {torch.get_num_threads()} thread(s), torch {torch.__version__}"
    )
    if not args.skip_tiny:
        tiny = sd_components_to_t2i(build_tiny_sd(seed=0), "tiny-sd")
        run_size("tiny-sd latents, tiny SD UNet", tiny, args, args.batch, 3.15, args.repeats)
    if not args.skip_sd:
        run_size(
            "SD-sized latents, small random UNet at 64x64",
            sd_sized_model(),
            args,
            args.sd_batch,
            args.sd_bandwidth,
            args.sd_repeats,
        )
    if args.sd15_step:
        sd15_step(args)


if __name__ == "__main__":
    main()
