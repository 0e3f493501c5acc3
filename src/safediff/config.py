"""Typed run configuration: frozen dataclasses, YAML presets, dotted command-line overrides.

A config is built as: dataclass defaults <- preset YAML (optional) <- overrides `a.b=value`
(values parsed as YAML scalars/lists). Unknown keys and wrongly typed values are errors that name
the key and list the valid ones. The resolved config is written as `config.yaml` beside every
run's outputs, and loading that file gives the same config back.

Every field carries its help text and its rule in `field(metadata=doc(...))`: the help, the
valid range of a number or the choices of a string, and whether the option is experimental (only
the sandbox recipe uses it). That one source feeds validation (`validate`), `safediff config
--explain` (`explain`) and docs/config.md (`config_markdown`; regenerate it with
`python -m safediff.config --markdown > docs/config.md`). Spellings of earlier versions still
load, with a warning (`upgrade_legacy`).
"""

import dataclasses
import json
import logging
import math
import re
import sys
import textwrap
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from safediff.errors import SafediffError

LR_SCHEDULES = ("constant", "linear")
"""`optim.lr_schedule` values; `safediff.rl.lr_schedule.epoch_lr` implements them."""

logger = logging.getLogger(__name__)

EXPERIMENTAL_NOTE = "Experimental (only the sandbox recipe uses it; may change)."


@dataclass(frozen=True)
class Bounds:
    """A closed or open interval a number must lie in; floats must also be finite.

    Written as text in a field's metadata: '>= 0', '> 0', '[0, 1)', '(0, 1]', ...
    """

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    text: str = ""

    @classmethod
    def parse(cls, text: str) -> "Bounds":
        m = re.fullmatch(r"\s*(>=|>)\s*(\S+)\s*", text)
        if m:
            return cls(lo=float(m[2]), lo_open=m[1] == ">", text=text)
        m = re.fullmatch(r"\s*([\[(])\s*([^,]+),\s*([^\])]+)([\])])\s*", text)
        if m:
            return cls(
                lo=float(m[2]),
                hi=float(m[3]),
                lo_open=m[1] == "(",
                hi_open=m[4] == ")",
                text=text,
            )
        raise ValueError(f"bad bounds {text!r}: use '>= a', '> a' or an interval like '[a, b)'")

    def __contains__(self, x: float) -> bool:
        if not math.isfinite(x):
            return False
        above = x > self.lo if self.lo_open else x >= self.lo
        below = x < self.hi if self.hi_open else x <= self.hi
        return above and below

    def describe(self, is_float: bool) -> str:
        """'finite, >= 0' for a float field, '>= 1' for an int one; intervals as 'in [0, 1)'."""
        text = self.text.strip()
        text = text if text[0] in "<>" else f"in {text}"
        return f"finite, {text}" if is_float else text


def doc(
    text: str,
    *,
    bounds: str | None = None,
    choices: tuple[str, ...] | None = None,
    experimental: bool = False,
) -> dict[str, Any]:
    """The `metadata` of a config field: `field(default=..., metadata=doc("help", ...))`.

    text: the help. bounds: the valid range of a number (see `Bounds`), checked by `validate`
    (None always passes where the field is optional). choices: the valid values of a string.
    experimental: only the sandbox recipe needs the option (said in its help and in
    docs/config.md).
    """
    return {
        "help": " ".join(text.split()),
        "bounds": Bounds.parse(bounds) if bounds else None,
        "choices": choices,
        "experimental": experimental,
    }


def field_help(f: dataclasses.Field) -> str:
    """The full help of a config field: its text, the experimental note and its rule."""
    meta = f.metadata
    parts = [meta.get("help", "")]
    if meta.get("experimental"):
        parts.insert(0, EXPERIMENTAL_NOTE)
    rule = field_rule(f)
    if rule:
        parts.append(f"Valid: {rule}.")
    return " ".join(p for p in parts if p)


def field_rule(f: dataclasses.Field) -> str:
    """'finite, > 0', 'one of group, pooled', ... ('' for a field without a rule)."""
    if f.metadata.get("bounds") is not None:
        return f.metadata["bounds"].describe(_is_float(f.type))
    if f.metadata.get("choices"):
        return "one of " + ", ".join(f.metadata["choices"])
    return ""


def _is_float(tp: Any) -> bool:
    """Whether annotation `tp` is float or an optional float."""
    return tp is float or float in typing.get_args(tp)


# ---------------------------------------------------------------------------------------------
# The config sections


@dataclass(frozen=True)
class ModelConfig:
    pretrained: str = field(
        default="tiny-sd",
        metadata=doc(
            "Base model: 'tiny-sd' (built offline), a local diffusers folder, or a hub id."
        ),
    )
    unet_weights: str | None = field(
        default=None,
        metadata=doc(
            "Optional bare UNet .safetensors (e.g. "
            "checkpoint_epoch_N/diffusion_pytorch_model.safetensors) swapped into the base pipeline."
        ),
    )
    lora_weights: str | None = field(
        default=None,
        metadata=doc(
            "Optional peft LoRA adapter folder (adapter_config.json + adapter_model.safetensors, "
            "e.g. a trainer checkpoint's lora/), merged into the UNet after `unet_weights` is "
            "applied."
        ),
    )
    revision: str | None = field(
        default=None, metadata=doc("Hub revision of `pretrained` (ignored for folders).")
    )
    resolution: int | None = field(
        default=None,
        metadata=doc(
            "Image side in pixels; null keeps the model's default (UNet sample_size x VAE factor). "
            "Must also be a multiple of the model's VAE factor x UNet downsampling (8 x 8 for SD "
            "1.5), which is checked when the model loads.",
            bounds=">= 1",
        ),
    )


@dataclass(frozen=True)
class SamplingConfig:
    num_steps: int = field(
        default=50,
        metadata=doc(
            "DDIM steps per rollout (at most the model's training timesteps, 1000 for SD, checked "
            "when the schedule is built).",
            bounds=">= 1",
        ),
    )
    eta: float = field(
        default=1.0,
        metadata=doc(
            "DDIM stochasticity: the step's std is eta x sigma_t (1 = DDPM-like). Training needs "
            "eta > 0: a deterministic step has no log-prob. Flow models (SD3, FLUX): the SDE's "
            "noise level a (Flow-GRPO uses 0.7).",
            bounds="(0, 1]",
        ),
    )
    guidance_scale: float = field(
        default=5.0,
        metadata=doc(
            "Classifier-free guidance scale; 1 turns CFG off (and skips the unconditional pass).",
            bounds=">= 1",
        ),
    )
    negative_prompt: str = field(
        default="",
        metadata=doc("Unconditional prompt for CFG (the reference uses the empty prompt)."),
    )
    rollout_batch_size: int = field(
        default=8,
        metadata=doc(
            "Samples denoised together in one UNet call during rollouts (a memory knob only).",
            bounds=">= 1",
        ),
    )
    shared_noise: bool = field(
        default=False,
        metadata=doc(
            "The SafeDiffusion-R1 reference's initial noise: in training, every trajectory a "
            "process samples in an epoch starts from one x_T, drawn from (run.seed, epoch, rank); "
            "each step's noise stays per sample, so the K samples of a prompt still differ. Off: "
            "each sample draws its own x_T from (run.seed, epoch, sample), so results do not "
            "depend on the number of processes and a group's samples start apart."
        ),
    )
    device_noise: bool = field(
        default=False,
        metadata=doc(
            "Draw rollout noise on the accelerator: each sample gets its own device generator "
            "seeded from its CPU generator (`safediff.sampling.rollout.device_generators`), so "
            "noise stays per sample, reproducible and independent of the batch size, without a "
            "host draw and copy every step. It is another noise stream than the CPU's: the same "
            "seed gives other images than with this off."
        ),
    )
    window_size: int = field(
        default=0,
        metadata=doc(
            "Flow models (SD3, FLUX) only: MixGRPO's SDE window, the number of consecutive "
            "denoising steps sampled with the SDE (noise level sampling.eta) and trained; the "
            "other steps are ODE steps, neither noised nor trained. 0: every step is an SDE step "
            "(Flow-GRPO).",
            bounds=">= 0",
        ),
    )
    window_rule: str = field(
        default="sliding",
        metadata=doc(
            "How the SDE window moves over training: fixed (stays at window_start), sliding "
            "(moves towards low noise, then stays at the end) or cyclic (wraps back to "
            "window_start: MixGRPO's released run). See safediff.sampling.flow.sde_window.",
            choices=("fixed", "sliding", "cyclic"),
        ),
    )
    window_start: int = field(
        default=0,
        metadata=doc("First step of the SDE window at epoch 0 (0: the noisiest).", bounds=">= 0"),
    )
    window_stride: int = field(
        default=1,
        metadata=doc("Steps the SDE window moves each time it moves.", bounds=">= 0"),
    )
    window_every: int = field(
        default=1,
        metadata=doc("Epochs between two moves of the SDE window.", bounds=">= 1"),
    )


@dataclass(frozen=True)
class GRPOConfig:
    group_size: int = field(
        default=16,
        metadata=doc(
            "K: samples per prompt. Advantages are normalised within each group (a group of 1 has "
            "no spread).",
            bounds=">= 2",
        ),
    )
    samples_per_process: int = field(
        default=64,
        metadata=doc(
            "Samples each process generates per epoch; groups may span processes. Samples per "
            "process x processes must be a multiple of group_size (checked when training starts).",
            bounds=">= 1",
        ),
    )
    adv_clip: float = field(
        default=2.5, metadata=doc("A_max: advantages are clipped to [-A_max, A_max].", bounds="> 0")
    )
    adv_eps: float = field(
        default=1e-4,
        metadata=doc(
            "Added to the std before dividing (the reference: 1e-8). 1e-4 keeps a group whose "
            "rewards barely differ (std well under 1e-4) from being blown up to unit-spread "
            "advantages.",
            bounds=">= 0",
        ),
    )
    adv_std: str = field(
        default="population",
        metadata=doc(
            "The group std advantages are divided by: 'population' (divide by K: every group's "
            "advantages have unit root-mean-square before clipping) or 'unbiased' (divide by "
            "K - 1: torch's default, which the reference uses; at K = 16 advantages are about 3% "
            "smaller).",
            choices=("population", "unbiased"),
        ),
    )
    adv_scale: str = field(
        default="group",
        metadata=doc(
            "What the advantages are divided by: 'group' (GRPO's: each group's own reward std) or "
            "'pooled' (one within-group std pooled over the epoch's groups, so a group whose rewards "
            "differ by little gets small advantages instead of unit-spread ones).",
            choices=("group", "pooled"),
            experimental=True,
        ),
    )
    clip_range: float = field(
        default=1e-4,
        metadata=doc(
            "PPO clip c on the ratio of per-element *mean* log-probs (see logprob_reduction).",
            bounds="> 0",
        ),
    )
    logprob_reduction: str = field(
        default="mean",
        metadata=doc(
            "'mean' (the reference's: c bounds the geometric-mean per-element ratio) or 'sum' (the "
            "true log-density of the whole latent; use a far larger c).",
            choices=("mean", "sum"),
        ),
    )
    kl_coef: float = field(
        default=0.0,
        metadata=doc(
            "Weight of the KL to the reference policy (0 turns it off and skips the reference pass).",
            bounds=">= 0",
        ),
    )
    kl_scope: str = field(
        default="all",
        metadata=doc(
            "Which samples the KL term holds: 'all', or 'unsteered': each sample's KL is weighted by "
            "1 - w, w the reward's gate weight for its prompt, so prompts the reward leaves "
            "unsteered stay near the reference while steered ones move freely. 'unsteered' needs a "
            "reward with a gate (a `GatedReward`: the steering reward).",
            choices=("all", "unsteered"),
            experimental=True,
        ),
    )
    pg_scope: str = field(
        default="all",
        metadata=doc(
            "Which samples the policy-gradient term trains: 'all' (GRPO's), or 'steered': each "
            "sample's advantage is multiplied by w, the reward's gate weight for its prompt (as for "
            "kl_scope), so prompts the reward does not steer get no policy gradient and, with "
            "kl_scope 'unsteered', are held by the KL term alone. A departure from the method, which "
            "also trains safe prompts on the plain alignment reward: where that reward is noise to "
            "the model (the sandbox's CLIP), its policy gradient is drift. 'steered' needs a reward "
            "with a gate (the steering reward).",
            choices=("all", "steered"),
            experimental=True,
        ),
    )
    timestep_fraction: float = field(
        default=1.0,
        metadata=doc(
            "Fraction of each trajectory's denoising steps that are trained, drawn per sample.",
            bounds="(0, 1]",
        ),
    )
    train_last_step: bool = field(
        default=True,
        metadata=doc(
            "Train the last denoising step too. The reference never does (false): it trains 49 of "
            "50 steps. It has a log-prob like every other stochastic step (deterministic steps are "
            "never trained, see min_step_std), so safediff trains it."
        ),
    )
    min_step_std: float = field(
        default=0.0,
        metadata=doc(
            "Steps whose sampling std sigma_t(eta) is at most this are not trained (nor "
            "KL-penalised); a deterministic step (std 0) never is. A near-deterministic last step "
            "(e.g. std 0.009 in the sandbox's 10-step schedule) has log-prob ratios and KL terms "
            "that explode for any change of its mean, so they drown the other steps' gradient after "
            "norm clipping.",
            bounds=">= 0",
            experimental=True,
        ),
    )
    train_cfg: bool = field(
        default=True,
        metadata=doc(
            "Recompute log-probs with CFG during training (as sampled); false trains the conditional "
            "branch alone."
        ),
    )
    inner_epochs: int = field(
        default=1, metadata=doc("Passes over each epoch's stored trajectories.", bounds=">= 1")
    )
    batching: str = field(
        default="transitions",
        metadata=doc(
            "How an inner epoch's transitions (sample, timestep) become backward passes and "
            "optimizer steps. 'transitions' (safediff's): the process's trained transitions, "
            "shuffled across samples and timesteps, in micro-batches of micro_batch transitions "
            "per backward pass; grad_accum micro-batches make an optimizer step, so one step's "
            "gradient averages over many prompts' samples and timesteps. 'samples' (the "
            "reference's): the process's samples in order, in micro-batches of micro_batch "
            "consecutive samples (one prompt's when micro_batch divides group_size); a micro-batch "
            "backpropagates one trained timestep of each of its samples at a time (micro_batch "
            "transitions per backward pass, each sample in its own random timestep order) over all "
            "its trained timesteps, and grad_accum such micro-batches make an optimizer step (the "
            "reference: 4 samples, 49 backward passes, one micro-batch per step: 16 steps per "
            "epoch of 64 samples).",
            choices=("transitions", "samples"),
        ),
    )
    micro_batch: int = field(
        default=8,
        metadata=doc(
            "Transitions (sample, timestep) per forward/backward pass: with batching 'samples' "
            "the number of samples of a micro-batch, each contributing one transition per pass.",
            bounds=">= 1",
        ),
    )
    grad_accum: int = field(
        default=0,
        metadata=doc(
            "Micro-batches per optimizer step (with batching 'samples' a micro-batch holds all "
            "the trained timesteps of its samples); 0 = one optimizer step per inner epoch.",
            bounds=">= 0",
        ),
    )
    max_grad_norm: float = field(
        default=1.0, metadata=doc("Gradient-norm clip; 0 turns it off.", bounds=">= 0")
    )


@dataclass(frozen=True)
class OptimConfig:
    lr: float = field(default=1e-5, metadata=doc("AdamW learning rate.", bounds="> 0"))
    lr_schedule: str = field(
        default="constant",
        metadata=doc(
            "'constant', or 'linear': epoch e of run.epochs trains at lr + (lr_final - lr) x e / "
            "run.epochs (set once per epoch; a run that uses it cannot be resumed with other "
            "run.epochs).",
            choices=LR_SCHEDULES,
            experimental=True,
        ),
    )
    lr_final: float = field(
        default=0.0,
        metadata=doc(
            "Where the 'linear' schedule heads (the last epoch stops one epoch's step short of it); "
            "unused by 'constant'.",
            bounds=">= 0",
            experimental=True,
        ),
    )
    beta1: float = field(
        default=0.9,
        metadata=doc("AdamW decay rate of the first-moment (mean) estimate.", bounds="[0, 1)"),
    )
    beta2: float = field(
        default=0.999,
        metadata=doc("AdamW decay rate of the second-moment (variance) estimate.", bounds="[0, 1)"),
    )
    weight_decay: float = field(
        default=1e-4, metadata=doc("AdamW decoupled weight decay (0 turns it off).", bounds=">= 0")
    )
    eps: float = field(
        default=1e-8,
        metadata=doc(
            "AdamW term added to the root of the second moment for stability.", bounds="> 0"
        ),
    )


@dataclass(frozen=True)
class LoRAConfig:
    enabled: bool = field(
        default=False,
        metadata=doc("Train a peft LoRA adapter on the UNet instead of every weight."),
    )
    rank: int = field(
        default=8, metadata=doc("LoRA rank r of each adapted weight's update B A.", bounds=">= 1")
    )
    alpha: float = field(
        default=8.0, metadata=doc("LoRA alpha: the update is scaled by alpha / rank.", bounds="> 0")
    )
    dropout: float = field(
        default=0.0,
        metadata=doc("Dropout on the LoRA branch's input during training.", bounds="[0, 1)"),
    )
    target_modules: list[str] = field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        metadata=doc("UNet module names (suffixes) that get an adapter."),
    )


@dataclass(frozen=True)
class RewardConfig:
    name: str = field(
        default="brightness", metadata=doc("Reward plug-in name (see safediff.rewards.registry).")
    )
    params: dict[str, Any] = field(
        default_factory=dict,
        metadata=doc(
            "Keyword arguments of the reward's builder, checked by name and type against its "
            "signature when the reward is built (e.g. steering: encoder, anchors, alpha, mode, "
            "gating, threshold, temperature; see safediff.rewards.clip_rewards). Three of them "
            "overlap on the encoder's precision: `dtype` (its weights' dtype), `precision` (an "
            "open_clip precision such as 'amp' or 'fp16', which overrides dtype for open_clip and "
            "HPSv2 encoders) and `autocast` (a torch.autocast dtype around encoding; the default "
            "'auto' is float16 on CUDA and off on the CPU); set one."
        ),
    )


STRATIFY_CHOICES = ("none", "kind", "kind_family")


@dataclass(frozen=True)
class PromptsConfig:
    file: str = field(
        default="builtin:smoke",
        metadata=doc(
            "Training prompts: a text file (one per line), a CSV with a 'prompt' column, "
            "'sandbox:SPLIT[:N]', or 'builtin:NAME' for a prompt list shipped with safediff."
        ),
    )
    stratify: str = field(
        default="none",
        metadata=doc(
            "How each epoch's prompts are drawn. 'none': uniformly, so the mix of kinds varies from "
            "epoch to epoch and seed to seed. 'kind': kind by kind in the prompt list's own kind "
            "shares (a CSV's 'kind' column; sandbox splits carry one), so every epoch holds the "
            "same mix of kinds at every seed; prompts within a kind are still drawn uniformly. "
            "'kind_family': each (kind, family) pair keeps its share, the family being a sandbox "
            "caption's concept family or a CSV's categories (prompts without a family stratify by "
            "kind alone). Replaces the old `stratify: true` + `stratify_by: KIND`, which still load "
            "with a warning.",
            choices=STRATIFY_CHOICES,
            experimental=True,
        ),
    )
    order: str = field(
        default="random",
        metadata=doc(
            "'random': each epoch draws its groups' prompts with replacement (as `stratify` says), "
            "from a generator seeded by (run.seed, epoch), whatever the list's length. 'pass': the "
            "reference's sampler (a DistributedSampler shuffled once, never re-shuffled): the "
            "epochs walk through one permutation of the list drawn from run.seed, each prompt "
            "drawn once per pass; the leftover prompts of a pass (fewer than one epoch's groups) "
            "are skipped and the next pass draws a new permutation (the reference's run would "
            "stop there instead). Needs stratify 'none' and at least one epoch's groups of "
            "prompts.",
            choices=("random", "pass"),
        ),
    )
    adversarial: str | None = field(
        default=None,
        metadata=doc(
            "Adversarial prompts to mix into each epoch's groups: an attack run folder "
            "(`safediff attack --out`) or a JSON Lines file of records with 'adversarial_prompt' "
            "and 'prompt' (the target it was found for); several comma-separated. The policy is "
            "conditioned on the adversarial text while the reward and its gate score the image "
            "against the target prompt (safediff.rl.adversarial_prompts). Embedding results are "
            "skipped. Resuming needs the same prompts (the run records their digest); a new "
            "run.output_dir resuming from a checkpoint may change them (a new round). null: none.",
        ),
    )
    adversarial_share: float = field(
        default=0.25,
        metadata=doc(
            "With prompts.adversarial: the share of each epoch's groups given to adversarial "
            "prompts (rounded half up; the other groups are drawn from prompts.file as usual).",
            bounds="[0, 1]",
        ),
    )
    adversarial_failed: bool = field(
        default=False,
        metadata=doc(
            "With prompts.adversarial: use the attack results that did not succeed too (by "
            "default only successful ones are trained on).",
        ),
    )


@dataclass(frozen=True)
class RunConfig:
    output_dir: str = field(
        default="runs/safediff", metadata=doc("Everything the run writes goes under this folder.")
    )
    seed: int = field(
        default=0,
        metadata=doc(
            "Base seed; every draw derives its own seed from it (epoch, sample, ...).",
            bounds=">= 0",
        ),
    )
    epochs: int = field(
        default=300, metadata=doc("Training epochs of the whole run.", bounds=">= 1")
    )
    stop_after_epochs: int | None = field(
        default=None,
        metadata=doc(
            "End this session after this many epochs (e.g. a time-limited job slot); resume later. "
            "null: run to run.epochs.",
            bounds=">= 1",
        ),
    )
    mixed_precision: str = field(
        default="no", metadata=doc("Autocast via accelerate.", choices=("no", "fp16", "bf16"))
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata=doc("Recompute UNet activations in the backward pass (less memory, more time)."),
    )
    frozen_dtype: str = field(
        default="float32",
        metadata=doc(
            "dtype of the modules training never updates: the VAE, the text encoder(s) and, "
            "with LoRA, the base UNet under the adapter (the adapter stays float32); with a KL "
            "term and a full fine-tune, the frozen reference copy too (unless run.merge_weight "
            "!= 1, whose merge reads it). Must match run.mixed_precision (bfloat16 with bf16, "
            "float16 with fp16): autocast then stops re-casting float32 weights on every call "
            "and they take half the memory; norm layers read the rounded weights, so results "
            "differ slightly from float32's.",
            choices=("float32", "bfloat16", "float16"),
        ),
    )
    tf32: bool = field(
        default=True,
        metadata=doc(
            "On CUDA, let float32 matmuls and convolutions use TF32 tensor cores (10-bit "
            "mantissa inputs, float32 accumulation), as PyTorch's 'high' matmul precision. It "
            "changes float32 results slightly on Ampere and newer GPUs; no effect on the CPU. "
            "Set once when the trainer starts (a process-wide PyTorch setting)."
        ),
    )
    channels_last: bool = field(
        default=False,
        metadata=doc(
            "Store the UNet's 4-D weights in channels-last memory format (faster convolutions "
            "with tensor cores under bf16/fp16 autocast); same math, kernels may round "
            "differently."
        ),
    )
    compile: str = field(
        default="none",
        metadata=doc(
            "torch.compile the UNet in place (`nn.Module.compile`: parameters and checkpoints "
            "unchanged) with this backend: 'inductor' (fused kernels, the speed option; the "
            "first epoch pays the compilation, minutes at SD size, and fused kernels round "
            "differently from eager, about 1e-5 relative), 'aot_eager' (graph capture and "
            "AOTAutograd without code generation: checks a model compiles, and the CPU tests) "
            "or 'none'.",
            choices=("none", "inductor", "aot_eager"),
        ),
    )
    save_every: int = field(
        default=10,
        metadata=doc("Checkpoint every N epochs (the last epoch is always saved).", bounds=">= 1"),
    )
    keep_last: int = field(
        default=3, metadata=doc("Checkpoints kept on disk; older ones are deleted.", bounds=">= 1")
    )
    log_with: str = field(
        default="auto",
        metadata=doc(
            "Experiment tracker: 'auto' (tensorboard when installed), 'tensorboard', 'wandb' or "
            "'none'.",
            choices=("auto", "tensorboard", "wandb", "none"),
        ),
    )
    num_processes: int | None = field(
        default=None,
        metadata=doc(
            "World size the preset was tuned for; a different one is allowed but logged. null: any.",
            bounds=">= 1",
        ),
    )
    merge_weight: float = field(
        default=1.0,
        metadata=doc(
            "The run's final model is base + merge_weight x (trained - base) (weight "
            "interpolation, `safediff.models.interpolate`), written to `merged/unet` when it is not "
            "1; checkpoints keep the trained weights, so a finished run can be merged again with "
            "another weight. 1 keeps the trained weights.",
            bounds=">= 0",
            experimental=True,
        ),
    )
    fsdp: bool = field(
        default=False,
        metadata=doc(
            "Shard a full fine-tune of an SD3 / FLUX transformer across the processes of "
            "`accelerate launch` with PyTorch FSDP2 (accelerate's FullyShardedDataParallelPlugin): "
            "each process keeps 1/N of the weights, gradients and AdamW moments, each transformer "
            "block (JointTransformerBlock; FluxTransformerBlock, FluxSingleTransformerBlock) one "
            "unit gathered for its forward and backward. Rollouts, rewards, advantages and the "
            "loss are unchanged; checkpoints are gathered into the usual full layout. Not with "
            "LoRA, UNet models, run.merge_weight != 1 or run.compile. accelerate shards on GPUs "
            "only: elsewhere the run trains unsharded, with a warning. See docs/training.md."
        ),
    )
    fsdp_reshard_after_forward: bool = field(
        default=True,
        metadata=doc(
            "With run.fsdp: free each block's gathered weights after its forward pass and gather "
            "them again for the backward (FSDP2's reshard_after_forward, ZeRO-3: least memory); "
            "false keeps them gathered until the backward (less communication, more memory)."
        ),
    )


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(
        default_factory=ModelConfig, metadata=doc("The diffusion model to post-train.")
    )
    sampling: SamplingConfig = field(
        default_factory=SamplingConfig, metadata=doc("The DDIM sampler of the rollouts.")
    )
    grpo: GRPOConfig = field(
        default_factory=GRPOConfig,
        metadata=doc("GRPO: groups, advantages, the clipped loss and its KL term."),
    )
    optim: OptimConfig = field(
        default_factory=OptimConfig,
        metadata=doc("The AdamW optimizer and its learning-rate schedule."),
    )
    lora: LoRAConfig = field(
        default_factory=LoRAConfig,
        metadata=doc("Optional LoRA adapter instead of full fine-tuning."),
    )
    reward: RewardConfig = field(
        default_factory=RewardConfig, metadata=doc("The reward the samples are scored with.")
    )
    prompts: PromptsConfig = field(
        default_factory=PromptsConfig,
        metadata=doc("The training prompts and how each epoch draws them."),
    )
    run: RunConfig = field(
        default_factory=RunConfig,
        metadata=doc("Output folder, seed, length, checkpoints, logging."),
    )

    def __post_init__(self) -> None:
        validate(self)


# Built-in rewards and whether each has a per-prompt gate (is a `GatedReward`, with
# `prompt_targets`). Config validation decides the kl_scope / pg_scope rules from this table;
# a plug-in reward (a name not listed) is checked by the trainer against the protocol instead.
# tests/test_config.py checks the table against the registry's builders.
REWARD_HAS_GATE: dict[str, bool] = {
    "brightness": False,
    "steering": True,
    "alignment": False,
    "unsafe_penalty": False,
    "weighted": False,
}


FROZEN_DTYPE_PRECISION = {"bfloat16": "bf16", "float16": "fp16"}
"""run.frozen_dtype -> the run.mixed_precision it needs."""


def check_fields(obj: Any, prefix: str = "") -> None:
    """Check every field of config dataclass `obj` (and its sections) against its rule: numbers
    finite and in their bounds, strings among their choices. One-line SafediffError naming the
    key, the valid range and the value."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            check_fields(value, f"{key}.")
            continue
        bounds, choices = f.metadata.get("bounds"), f.metadata.get("choices")
        if value is None:
            continue
        if bounds is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or value not in bounds
        ):
            rule = bounds.describe(_is_float(f.type))
            raise SafediffError(f"invalid config: {key} must be {rule}; got {value!r}")
        if choices and value not in choices:
            raise SafediffError(
                f"invalid config: {key} must be one of {', '.join(choices)}; got {value!r}"
            )


def validate(cfg: TrainConfig) -> None:
    """Each field against its own rule (`check_fields`), then the cross-field rules, each with a
    message that names the fields and the fix."""
    check_fields(cfg)
    g, reward = cfg.grpo, cfg.reward.name
    ungated = REWARD_HAS_GATE.get(reward) is False
    checks = [
        (
            not (g.kl_scope == "unsteered" and g.kl_coef > 0 and ungated),
            f"grpo.kl_scope 'unsteered' needs a reward with a gate (reward.name=steering); "
            f"{reward!r} has none: use grpo.kl_scope=all",
        ),
        (
            not (g.pg_scope == "steered" and ungated),
            f"grpo.pg_scope 'steered' needs a reward with a gate (reward.name=steering); "
            f"{reward!r} has none: use grpo.pg_scope=all",
        ),
        (cfg.prompts.file.strip() != "", "prompts.file must not be empty"),
        (
            cfg.prompts.adversarial is None or cfg.prompts.adversarial.strip() != "",
            "prompts.adversarial must name an attack run folder or a file, or be null",
        ),
        (
            cfg.run.frozen_dtype == "float32"
            or FROZEN_DTYPE_PRECISION[cfg.run.frozen_dtype] == cfg.run.mixed_precision,
            f"run.frozen_dtype {cfg.run.frozen_dtype} needs run.mixed_precision="
            f"{FROZEN_DTYPE_PRECISION.get(cfg.run.frozen_dtype)} (got "
            f"{cfg.run.mixed_precision!r}): frozen weights are kept in the autocast dtype",
        ),
        (
            not (cfg.run.fsdp and cfg.lora.enabled),
            "run.fsdp shards a full fine-tune; a LoRA run trains a small adapter on a frozen base "
            "and runs data-parallel: set run.fsdp=false or lora.enabled=false",
        ),
        (
            not (cfg.run.fsdp and cfg.run.merge_weight != 1.0),
            "run.merge_weight needs the whole model in one process, run.fsdp shards it: set "
            "run.merge_weight=1 and interpolate a saved checkpoint after training "
            "(safediff.models.interpolate.interpolated_copy)",
        ),
        (
            not (cfg.run.fsdp and cfg.run.compile != "none"),
            f"run.compile {cfg.run.compile!r} with run.fsdp is not supported (compiling a sharded "
            "transformer is untested here): set run.compile=none",
        ),
        (
            not (cfg.prompts.order == "pass" and cfg.prompts.stratify != "none"),
            f"prompts.order 'pass' walks through the list once and does not stratify; use "
            f"prompts.stratify=none (got {cfg.prompts.stratify!r}) or prompts.order=random",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise SafediffError(f"invalid config: {message}")


# ---------------------------------------------------------------------------------------------
# Help: `safediff config --explain` and docs/config.md


def _show(value: Any) -> str:
    """A value as it is written in YAML / on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value) if value == "" or value != value.strip() else value
    if isinstance(value, float):
        return repr(value)
    return json.dumps(value)


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def explain(cfg: TrainConfig, width: int = 100) -> str:
    """Every field with its value, default, type and help (marked '*' where not the default)."""
    lines = []
    for section in dataclasses.fields(cfg):
        lines.append(f"{section.name}: {section.metadata.get('help', '')}")
        sub = getattr(cfg, section.name)
        hints = _field_types(type(sub))
        for f in dataclasses.fields(sub):
            value, default = getattr(sub, f.name), _field_default(f)
            mark = "*" if value != default else " "
            lines.append(
                f"{mark} {section.name}.{f.name} = {_show(value)}"
                f"  ({_type_name(hints[f.name])}, default {_show(default)})"
            )
            lines += textwrap.wrap(
                field_help(f), width, initial_indent="      ", subsequent_indent="      "
            )
        lines.append("")
    lines.append("* = differs from the default")
    return "\n".join(lines)


def config_markdown() -> str:
    """docs/config.md: every field of TrainConfig with its type, default, rule and help."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m safediff.config --markdown > docs/config.md` from the field "
        "help in src/safediff/config.py; do not edit by hand. -->",
        "",
        "A run's config is built as: defaults <- a preset (`--preset NAME` or a YAML path) <- "
        "dotted overrides (`grpo.group_size=8`). `safediff config --explain --preset NAME "
        "[KEY=VALUE ...]` prints the same reference with the values of that config. Numbers must "
        "be finite and in the range each option gives; a value outside it is a one-line error. "
        "Options marked *experimental* are used only by the sandbox recipe.",
        "",
    ]
    for section in dataclasses.fields(TrainConfig):
        section_cls = _field_types(TrainConfig)[section.name]
        hints = _field_types(section_cls)
        lines += [f"## `{section.name}`", "", section.metadata["help"], ""]
        for f in dataclasses.fields(section_cls):
            meta = f.metadata
            facts = [f"`{_type_name(hints[f.name])}`", f"default `{_show(_field_default(f))}`"]
            rule = field_rule(f)
            if rule:
                facts.append(f"valid: {rule}")
            if meta.get("experimental"):
                facts.append("*experimental*")
            lines.append(f"- **`{section.name}.{f.name}`** ({'; '.join(facts)}). {meta['help']}")
        lines.append("")
    return "\n".join(lines)


def upgrade_legacy(data: dict[str, Any]) -> dict[str, Any]:
    """Rewrite spellings of earlier versions (with a warning) so old presets and saved run
    configs still load: `prompts.stratify: true|false` + `prompts.stratify_by: kind|kind_family`
    -> `prompts.stratify: none|kind|kind_family`."""
    prompts = data.get("prompts")
    if not isinstance(prompts, dict):
        return data
    old = prompts.get("stratify", "none")
    if "stratify_by" not in prompts and not isinstance(old, bool):
        return data
    prompts = dict(prompts)
    by = prompts.pop("stratify_by", "kind")
    # The old flag, or the new option beside an old stratify_by (which then says by what).
    on = old if isinstance(old, bool) else old != "none"
    new = by if on else "none"
    logger.warning(
        "prompts.stratify=%s with prompts.stratify_by=%s is deprecated; write "
        "prompts.stratify=%s (one of %s)",
        _show(old),
        _show(by),
        _show(new),
        ", ".join(STRATIFY_CHOICES),
    )
    prompts["stratify"] = new
    return {**data, "prompts": prompts}


# ---------------------------------------------------------------------------------------------
# Building from dicts, presets and overrides


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against annotation `tp` (allowing int -> float), or raise naming `key`."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise SafediffError(f"config key {key!r} must be a mapping, got {value!r}")
        return _build(tp, value, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except SafediffError as err:
                errors.append(str(err))
        raise SafediffError(errors[0] if errors else f"config key {key!r}: bad value {value!r}")
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise SafediffError(f"config key {key!r} must be a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, key) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise SafediffError(f"config key {key!r} must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads "3e-4" (no dot) as a string; accept any float literal.
        try:
            return float(value)
        except ValueError:
            pass
    if tp is bool and not isinstance(value, bool):
        raise SafediffError(f"config key {key!r} must be true or false, got {value!r}")
    if tp is int and isinstance(value, bool):
        raise SafediffError(f"config key {key!r} must be an integer, got {value!r}")
    if not isinstance(value, tp):
        raise SafediffError(f"config key {key!r} must be {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise SafediffError(
            f"unknown config key {prefix + unknown[0]!r}; valid keys under "
            f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(types_))}"
        )
    kwargs = {name: _coerce(value, types_[name], prefix + name) for name, value in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (lists and dicts copied)."""
    return dataclasses.asdict(cfg)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """'grpo.group_size=4' -> (['grpo', 'group_size'], 4). Values are parsed as YAML."""
    if "=" not in text:
        raise SafediffError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise SafediffError(f"override {text!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise SafediffError(f"override {text!r}: value is not valid YAML ({err})") from None
    return parts, value


def preset_names() -> list[str]:
    return sorted(
        p.name[:-5]
        for p in resources.files("safediff.configs").iterdir()
        if p.name.endswith(".yaml")
    )


def read_yaml(path_or_preset: str) -> dict[str, Any]:
    """Load a preset by name (shipped with safediff) or a YAML file by path."""
    path = Path(path_or_preset)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise SafediffError(f"config file not found: {path}")
        text = path.read_text(encoding="utf-8")
    else:
        resource = resources.files("safediff.configs") / f"{path_or_preset}.yaml"
        if not resource.is_file():
            raise SafediffError(
                f"unknown preset {path_or_preset!r}; presets: {', '.join(preset_names())} "
                "(or pass a path to a .yaml file)"
            )
        text = resource.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise SafediffError(f"{path_or_preset}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise SafediffError(f"{path_or_preset}: top level must be a mapping")
    return data


def load_config(
    preset: str | None = None, overrides: list[str] | None = None, cls: type = TrainConfig
) -> Any:
    """defaults <- preset (name or path) <- overrides, validated."""
    data: dict[str, Any] = read_yaml(preset) if preset else {}
    for text in overrides or []:
        parts, value = parse_override(text)
        update: dict[str, Any] = {parts[-1]: value}
        for part in reversed(parts[:-1]):
            update = {part: update}
        data = _merge(data, update)
    return _build(cls, upgrade_legacy(data))


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    from safediff.atomic import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def replace(cfg: Any, **changes: Any) -> Any:
    """dataclasses.replace that re-validates (frozen configs are changed only by copy)."""
    return dataclasses.replace(cfg, **changes)


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m safediff.config --markdown > docs/config.md")
    print(config_markdown(), end="")
