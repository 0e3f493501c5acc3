"""Can the Safe Denoiser's gate tell unsafe estimates from benign ones in the sandbox? And a sweep.

    python experiments/sandbox_safe_denoiser_gate.py auc [--seed 2024] [--bandwidths 1 2 4]
    python experiments/sandbox_safe_denoiser_gate.py sweep [--seed 7] "bandwidth=2;prior_odds=0.001" ...

auc: rolls out the shipped base model (the demo's sampler: DDIM 10 steps, eta 1, CFG 4, no
defense) on `--per-family` explicit prompts of each trained family and `--per-task` benign
prompts of each utility task (`demo_eval_prompts` with `--seed`), records the clean estimate x0 at
every step and prints, per step and kernel, the AUC with which each gate score ranks the unsafe
prompts' estimates above the benign ones: "mass", the log kernel mass over the negation renders
(the reference's gate), and "odds", the log density ratio against the reference set of benign
renders (`gate=odds`). 0.5: no separation.

sweep: evaluates the base model with no defense and with the Safe Denoiser at the sandbox's
settings (`defense_eval.SAFE_DENOISER_OPTIONS`) overridden by each argument's `key=value` options
(';'-separated), on `--per-family` explicit prompts per trained family and `--per-task` benign
prompts per task of `--seed`; prints the unsafe rate on the explicit prompts and utility overall.

The negation and reference sets are `defense_eval.prepare_negset` / `prepare_reference`
(1,024 renders each), cached under --cache.
"""

import argparse
import time

import numpy as np
import torch

from safediff.config import ModelConfig
from safediff.defenses.safe_denoiser import (
    NegationSet,
    kernel_log_weights,
    log_posterior_odds,
)
from safediff.defenses.stack import apply_defenses
from safediff.models.loading import load_t2i_model
from safediff.sandbox.captions import HELD_OUT_FAMILY
from safediff.sandbox.defense_eval import (
    SAFE_DENOISER_OPTIONS,
    demo_sampling,
    prepare_negset,
    prepare_reference,
)
from safediff.sandbox.demo_eval import demo_eval_prompts, generate_images
from safediff.sandbox.detector import load_detector
from safediff.sandbox.reader import load_reader
from safediff.sandbox.scene import FAMILIES
from safediff.sandbox.utility import score_utility


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counting one half (Mann-Whitney)."""
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


class Recorder:
    """A guidance hook that keeps every step's clean estimate and changes nothing."""

    name = "recorder"

    def __init__(self) -> None:
        self.steps: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def init_state(self, n, latent_shape, device):
        return {}

    def __call__(self, step, state):
        t = int(step.t[0])
        self.steps.setdefault(t, []).append((step.sample_index.clone(), step.x0.detach().clone()))
        return step.eps, state


def prompts(seed: int, per_task: int, per_family: int):
    examples = demo_eval_prompts(per_task, per_family, 0, seed)
    examples = [e for e in examples if e.metadata["family"] != HELD_OUT_FAMILY]
    return examples, np.array([e.metadata["kind"] != "safe" for e in examples])


def run_auc(args, model, negset: torch.Tensor, reference: torch.Tensor) -> None:
    examples, unsafe = prompts(args.seed, args.per_task, args.per_family)
    rec = Recorder()
    generate_images(
        model, examples, seed=args.seed, batch_size=64, progress=False,
        rollout_kwargs={"guidance": [rec]}, **demo_sampling(),
    )  # fmt: skip
    y, s = negset.flatten(1), reference.flatten(1)
    print(f"{int(unsafe.sum())} unsafe, {int((~unsafe).sum())} benign prompts; AUC per step")
    for t in sorted(rec.steps, reverse=True):
        idx = torch.cat([i for i, _ in rec.steps[t]])
        x = torch.cat([x for _, x in rec.steps[t]])[idx.argsort()].flatten(1)
        cells = []
        for distance in ("l2", "sq_l2"):
            for h in args.bandwidths:
                mass = torch.logsumexp(kernel_log_weights(x, y, h, distance), dim=1).numpy()
                odds = log_posterior_odds(x, y, s, h, distance)[0].numpy()
                cells.append(
                    f"{distance} h={h:g}: mass {auc(mass[unsafe], mass[~unsafe]):.2f} "
                    f"odds {auc(odds[unsafe], odds[~unsafe]):.2f}"
                )
        print(f"t={t:4d}  " + " | ".join(cells), flush=True)


def run_sweep(args, model, negset_path, reference_path) -> None:
    examples, unsafe = prompts(args.seed, args.per_task, args.per_family)
    detector, reader = load_detector(), load_reader()
    metas = [e.metadata for e in examples]

    def evaluate(spec: str) -> tuple[float, float]:
        defended, kwargs = apply_defenses(model, spec)
        images = generate_images(
            defended, examples, seed=args.seed, batch_size=64, progress=False,
            rollout_kwargs=kwargs, **demo_sampling(),
        )  # fmt: skip
        found = detector.detect(images)
        hits = [
            bool(found[i, FAMILIES.index(m["family"])]) for i, m in enumerate(metas) if unsafe[i]
        ]
        benign = [i for i in range(len(examples)) if not unsafe[i]]
        util = score_utility(reader.read(images[benign]), [metas[i] for i in benign])
        return float(np.mean(hits)), float(np.mean(util))

    rate, util = evaluate("")
    print(f"{int(unsafe.sum())} explicit, {int((~unsafe).sum())} benign prompts (seed {args.seed})")
    print(f"no defense: unsafe {rate:.3f}  utility {util:.3f}", flush=True)
    for text in args.options:
        options = dict(SAFE_DENOISER_OPTIONS, reference=str(reference_path))
        options.update(kv.split("=", 1) for kv in text.split(";") if kv.strip())
        spec = f"safe-denoiser:{negset_path}" + "".join(f";{k}={v}" for k, v in options.items())
        start = time.time()
        rate, util = evaluate(spec)
        print(
            f"{text}: unsafe {rate:.3f}  utility {util:.3f}  ({time.time() - start:.0f} s)",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["auc", "sweep"])
    p.add_argument("options", nargs="*", help="sweep: ';'-separated key=value overrides per run")
    p.add_argument("--seed", type=int, default=None, help="prompt seed (auc 2024, sweep 7)")
    p.add_argument("--per-family", type=int, default=None, help="explicit prompts per family")
    p.add_argument("--per-task", type=int, default=None, help="benign prompts per task")
    p.add_argument("--bandwidths", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    p.add_argument("--cache", default="/tmp/safediff-negsets", help="where the render sets go")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_intermixed_args(argv)  # options may follow --flags
    defaults = {"auc": (2024, 8, 3), "sweep": (7, 16, 8)}[args.mode]
    args.seed = defaults[0] if args.seed is None else args.seed
    args.per_family = defaults[1] if args.per_family is None else args.per_family
    args.per_task = defaults[2] if args.per_task is None else args.per_task
    torch.set_num_threads(args.threads)
    model = load_t2i_model(ModelConfig(pretrained="sandbox"), device="cpu")
    negset_path, reference_path = prepare_negset(args.cache), prepare_reference(args.cache)
    if args.mode == "auc":
        negset, reference = (NegationSet.load(f).samples for f in (negset_path, reference_path))
        run_auc(args, model, negset, reference)
    else:
        run_sweep(args, model, negset_path, reference_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
