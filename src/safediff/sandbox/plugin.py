"""The sandbox as a safediff plug-in: everything the library reaches of it, registered by name.

`register()` is the entry point `sandbox` of the group `safediff.plugins` (pyproject.toml). It
adds, without importing any model code (each loader imports on use):
- the model family `sandbox` ('sandbox': the shipped model; 'sandbox:PATH': another sandbox
  diffusion file or folder), with its MiniLM text encoder for DES;
- the prompt source `sandbox:SPLIT[:N]`: N captions (default 2000) of the caption grammar's split
  (model_train, grpo_train or eval) drawn with seed 0, each with its caption kind (safe, explicit,
  implicit, synonym, negation, keyword_minimal) and concept family;
- the judges `safediff score --sandbox-detector` and `--sandbox-utility`;
- the anchor sets `sandbox`, `sandbox_empty_positive`, `sandbox_scenes` (anchors/*.yaml);
- the reward encoder kind `sandbox:` (the image encoder aligned to MiniLM);
- the command `safediff sandbox` (build, verify, prompts, defenses) and the demo world `sandbox`,
  the default of `safediff demo`;
- the attack target set `safediff attack --targets sandbox[:FAMILY|...]` (attack_targets.py).
"""

import argparse
from importlib import resources
from typing import Any

from safediff import plugins
from safediff.errors import SafediffError
from safediff.sandbox.protocol import SAMPLER

NAME = "sandbox"
DEFAULT_SPLIT_SIZE = 2000


def load_model(arg: str, device: Any):
    """The shipped sandbox model ('') or a sandbox diffusion file/folder (arg = PATH)."""
    from safediff.sandbox.manifest import weight_file
    from safediff.sandbox.unet import load_sandbox_model

    return load_sandbox_model(arg or weight_file("diffusion.safetensors"), device=device)


def load_text_encoder_adapter(arg: str, device: Any):
    """The MiniLM text encoder as a DES `TextEncoderAdapter` (the same for every sandbox model)."""
    from safediff.sandbox.text_encoder import MiniLMTextEncoderAdapter, load_text_encoder

    minilm = load_text_encoder(device)
    return MiniLMTextEncoderAdapter(minilm.tokenizer, minilm.model)


def load_split(arg: str) -> tuple[list[str], list[str | None], list[str | None]]:
    """(captions, kinds, families) of the prompt spec 'sandbox:SPLIT[:N]' (arg = 'SPLIT[:N]')."""
    from safediff.sandbox.captions import SPLITS, make_split

    parts = arg.split(":")
    split, n_text = parts[0], parts[1] if len(parts) > 1 else str(DEFAULT_SPLIT_SIZE)
    if split not in SPLITS or len(parts) > 2 or not n_text.isdigit() or int(n_text) < 1:
        raise SafediffError(
            f"bad sandbox prompt spec 'sandbox:{arg}': use sandbox:SPLIT or sandbox:SPLIT:N with "
            f"SPLIT one of {', '.join(SPLITS)} and N >= 1"
        )
    examples = make_split(split, int(n_text), seed=0)
    return (
        [e.caption for e in examples],
        [e.metadata["kind"] for e in examples],
        [e.metadata.get("family") for e in examples],
    )


def _detector_scorer(device: str):
    from safediff.sandbox.detector_scorer import SandboxDetectorScorer

    return SandboxDetectorScorer(device=device or "cpu")


def _utility_scorer(device: str):
    from safediff.sandbox.utility_scorer import SandboxUtilityScorer

    return SandboxUtilityScorer(device=device or "cpu")


def _attack_targets(arg: str):
    from safediff.sandbox.attack_targets import load

    return load(arg)


def _encoder(arg: str, device: Any, dtype: Any, precision: str | None):
    from safediff.sandbox.clip import sandbox_encoder_loader

    return sandbox_encoder_loader(arg, device, dtype, precision)


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    """The sandbox demo's own options of `safediff demo`."""
    p.add_argument(
        "--defense",
        default=None,
        metavar="STACK",
        help="also defend the post-trained model at evaluation (the table is then base vs GRPO + "
        "stack): comma-separated bare kinds use the sandbox's versions (des, negprompt, sld, "
        "safe-denoiser; DES and the negation set are prepared under OUTPUT_DIR/defenses/), "
        "KIND:ARG items are passed as given, e.g. --defense des,negprompt",
    )
    p.add_argument(
        "--merge-weights",
        default="auto",
        metavar="W,W,...",
        help="the post-trained model is base + w * (trained - base), w chosen on validation "
        "prompts from these weights (the smallest that cuts the unsafe rate by 80%% while "
        "utility stays within 3 points of the base's, else the largest within 3 points); "
        "'auto' (default): 0.5,0.6,...,1 in the full mode, none in the quick mode or with a "
        "run.merge_weight override; 'none': the config's run.merge_weight",
    )
    p.add_argument(
        "--eval-precision",
        default="float32",
        choices=("auto", "float32", "bfloat16"),
        help="the UNet's precision when sampling the evaluation images, base and post-trained "
        "alike (never the training's): float32 (default); 'auto' is bfloat16 on a CPU with "
        "native bf16 (AVX512-BF16 or AMX: about 2x faster, a few verdicts differ) and float32 "
        "elsewhere",
    )
    p.add_argument(
        "--search-precision",
        default="auto",
        choices=("auto", "float32", "bfloat16"),
        help="the same for the merge-weight search's validation images (default 'auto': the "
        "search only ranks weights against the base sampled alike)",
    )


def run_demo(args: argparse.Namespace) -> int:
    from safediff.sandbox.demo import parse_merge_weights, run_sandbox_demo

    run_sandbox_demo(
        args.output_dir,
        quick=args.quick,
        overrides=args.overrides,
        defenses=args.defense,
        merge_weights=parse_merge_weights(args.merge_weights),
        eval_precision=args.eval_precision,
        search_precision=args.search_precision,
    )
    return 0


def register() -> None:
    plugins.add_model_family(
        plugins.ModelFamily(
            NAME,
            load=load_model,
            text_encoder=load_text_encoder_adapter,
            help="the sandbox world's shipped model ('sandbox') or a sandbox diffusion file "
            "('sandbox:PATH')",
            sampler=SAMPLER,
        )
    )
    plugins.add_prompt_source(
        plugins.PromptSource(NAME, load=load_split, help="sandbox:SPLIT[:N] caption grammar")
    )
    plugins.add_scorer(
        plugins.ScorerPlugin(
            "sandbox-detector",
            build=_detector_scorer,
            help="the sandbox's unsafe-family detector (sandbox-detector/families4@0.5)",
        )
    )
    plugins.add_scorer(
        plugins.ScorerPlugin(
            "sandbox-utility",
            build=_utility_scorer,
            help="the sandbox's compositional utility reader (sandbox-utility/geneval6); needs a "
            "prompt set from `safediff sandbox prompts`",
        )
    )
    anchors = resources.files("safediff.sandbox") / "anchors"
    for entry in anchors.iterdir():
        if entry.name.endswith(".yaml"):
            plugins.add_anchor_set(entry.name.removesuffix(".yaml"), entry)
    plugins.add_encoder_kind(NAME, _encoder)
    plugins.add_command(
        plugins.CommandPlugin(
            NAME,
            module="safediff.sandbox.cli",
            builder="add_sandbox_parser",
            help="the sandbox world (build, verify, prompts, defenses)",
        )
    )
    plugins.add_attack_targets(
        plugins.AttackTargetSource(
            NAME,
            load=_attack_targets,
            help="explicit prompts of every sandbox family (drug held out); sandbox:FAMILY|...",
        )
    )
    plugins.add_demo_world(
        plugins.DemoWorld(
            NAME,
            add_arguments=add_demo_arguments,
            run=run_demo,
            help="GRPO + steering reward on the shipped sandbox model, evaluated with its judges "
            "(unsafe rate per family, utility, alignment; report.html)",
            default=True,
        )
    )
