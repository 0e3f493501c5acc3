"""Paired, interleaved timing of the sandbox UNet on the CPU: channels-last layouts and bf16 weights.

At the batch sizes `safediff demo` runs (CFG doubles each batch): evaluation and merge-search
generation (64 prompts -> forward at 128), GRPO rollouts (rollout_batch_size 32 -> forward at 64)
and GRPO training (micro_batch 32 with train_cfg -> forward + backward at 64). Variants:

- plain: contiguous weights and inputs (the layout diffusers loads);
- cl: channels-last weights and inputs;
- cl_weights: channels-last weights, contiguous inputs (what a sampler feeding fresh noise does);
- plain_nomkldnn / cl_nomkldnn: the same with `torch.backends.mkldnn` disabled;
- bf16: a bfloat16 copy of the weights, inputs cast to it (what the demo's merge-weight search
  samples with on CPUs with native bf16, `safediff.sampling.precision`); forward cases only.

Each round runs every variant once in a rotating order, so a shared machine's load falls on all
of them alike; the report is the median over rounds of the per-round ratio plain / variant (> 1:
the variant is faster) and the largest output (gradient) difference from plain.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_channels_last.py --threads 2 --rounds 15
    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_channels_last.py --threads 2 --rounds 5 \
        --cases "rollout fwd B=64" --variants cl plain_nomkldnn cl_nomkldnn
"""

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch

from safediff.config import ModelConfig
from safediff.models.loading import load_t2i_model

VARIANTS = ("plain", "cl", "cl_weights", "plain_nomkldnn", "cl_nomkldnn", "bf16")
CASES = {  # name: (UNet batch, backward)
    "eval fwd B=128": (128, False),
    "rollout fwd B=64": (64, False),
    "train fwd+bwd B=64": (64, True),
}


def make_step(unet: torch.nn.Module, x: torch.Tensor, t, emb, backward: bool, mkldnn: bool):
    """A closure running one UNet call (and its backward) -> output or gradients, detached."""

    def step() -> list[torch.Tensor]:
        with torch.backends.mkldnn.flags(enabled=mkldnn):
            if not backward:
                with torch.inference_mode():
                    return [unet(x, t, encoder_hidden_states=emb).sample]
            unet.zero_grad(set_to_none=True)
            unet(x, t, encoder_hidden_states=emb).sample.square().mean().backward()
            return [p.grad.detach() for p in unet.parameters()]

    return step


def run_case(
    unets, emb_of, batch: int, backward: bool, rounds: int, seed: int, variants: list[str]
) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, generator=gen)
    x_cl = x.to(memory_format=torch.channels_last)
    t = torch.randint(1, 1000, (batch,), generator=gen)
    emb = emb_of(batch)
    steps: dict[str, Callable[[], list[torch.Tensor]]] = {}
    if backward:  # bf16 is for sampling only
        variants = [v for v in variants if v != "bf16"]
    for name in variants:
        if name == "bf16":
            steps[name] = make_step(
                unets["bf16"], x.bfloat16(), t, emb.bfloat16(), backward, mkldnn=True
            )
            continue
        cl_in = name in ("cl", "cl_nomkldnn")
        unet = unets["cl" if name.startswith("cl") else "plain"]
        steps[name] = make_step(
            unet, x_cl if cl_in else x, t, emb, backward, mkldnn="nomkldnn" not in name
        )
    ref = steps["plain"]()
    diffs = {}
    for name, step in steps.items():
        out = step()  # also the warm-up
        diffs[name] = max(
            (a - b.float()).abs().max().item() for a, b in zip(ref, out, strict=True)
        )
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for name in order:
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
    for name in variants:
        ratios = [a / b for a, b in zip(times["plain"], times[name], strict=True)]
        print(
            f"  {name:15s} median {statistics.median(times[name]) * 1e3:7.1f} ms  "
            f"ratio plain/this median {statistics.median(ratios):.3f} "
            f"(quartiles {quantiles(ratios)[0]:.3f}-"
            f"{quantiles(ratios)[2]:.3f})  max diff {diffs[name]:.1e}",
            flush=True,
        )


def quantiles(values: list[float]) -> list[float]:
    return statistics.quantiles(values, n=4) if len(values) > 1 else values * 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument(
        "--variants", nargs="*", default=list(VARIANTS[:3]), choices=VARIANTS,
        help="plain is always run (the ratios' reference)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_t2i_model(ModelConfig(pretrained="sandbox"))
    plain = model.unet.to(memory_format=torch.contiguous_format)
    unets = {
        "plain": plain,
        "cl": copy.deepcopy(plain).to(memory_format=torch.channels_last),
        "bf16": torch.nn.Module.to(copy.deepcopy(plain), dtype=torch.bfloat16),
    }
    token_states = model.encode_text(["a red ball on a blue square"], "cpu")

    def emb_of(batch: int) -> torch.Tensor:
        return token_states.expand(batch, -1, -1).contiguous()

    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} rounds")
    for i, name in enumerate(args.cases):
        batch, backward = CASES[name]
        for unet in unets.values():
            unet.train(backward)
        print(name, flush=True)
        variants = ["plain", *(v for v in args.variants if v != "plain")]
        run_case(unets, emb_of, batch, backward, args.rounds, seed=i, variants=variants)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
