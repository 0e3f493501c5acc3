"""The sandbox's compositional utility reader as an evaluation scorer (the sandbox's GenEval).

Protocol `sandbox-utility/geneval6`: each image is read by the shipped utility reader
(`safediff.sandbox.reader`: per colour-and-shape counts and centres) and checked against the
structured facts of its caption (`safediff.sandbox.captions` metadata: task, objects, counts,
relation), which `safediff sandbox prompts` writes into the prompt CSV's `metadata` column and
`safediff generate` keeps in each image's record. Images of unsafe prompts carry no utility task
and are not counted. Aggregates: accuracy per task (single, two, counting, colors, position,
color_attr), each with a Wilson interval, and "overall" = the mean of the task accuracies on the
benign prompts (GenEval's overall; `safediff.sandbox.verdicts.utility_overall`, the definition the
demo uses). Images must be the sandbox's size (32 x 32): others are refused, never resized.
"""

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from safediff.errors import SafediffError
from safediff.eval.scorers.base import ImagesIn, as_image_list, make_aggregate
from safediff.eval.stats import Estimate, rate, stratified_mean_of_means
from safediff.sandbox.scene import IMAGE_SIZE
from safediff.sandbox.verdicts import BENIGN_KIND, task_utility_flags

METADATA_KEY = "metadata"


def caption_metadata(record: Mapping[str, Any], required: bool = True) -> dict[str, Any] | None:
    """The caption facts stored with a generated image (extra['metadata'], a JSON string); None
    when absent and not `required`."""
    raw = (record.get("extra") or {}).get(METADATA_KEY)
    if raw is None:
        if not required:
            return None
        raise SafediffError(
            f"image {record.get('name')!r} has no caption metadata: generate from a prompt set "
            "written by `safediff sandbox prompts`"
        )
    return json.loads(raw) if isinstance(raw, str) else dict(raw)


def check_sandbox_size(images: list[torch.Tensor]) -> list[torch.Tensor]:
    """The images, if each is [3, 32, 32]; a resized image would give the judges' numbers for
    another picture, so any other size is an error."""
    for im in images:
        if tuple(im.shape[-2:]) != (IMAGE_SIZE, IMAGE_SIZE):
            raise SafediffError(
                f"the sandbox judges read {IMAGE_SIZE} x {IMAGE_SIZE} images, got "
                f"{im.shape[-1]} x {im.shape[-2]}: score images of a sandbox model"
            )
    return images


class SandboxUtilityScorer:
    kind = "utility"
    value_key = "correct"
    value_type = "binary"
    protocol = "sandbox-utility/geneval6"
    reads_generation_records = True

    def __init__(self, device: str | torch.device = "cpu", reader: Any = None) -> None:
        """reader: a loaded `safediff.sandbox.reader` reader (default: the shipped one)."""
        from safediff.sandbox.reader import load_reader

        self.reader = reader if reader is not None else load_reader(device=device)

    def score_images(
        self,
        images: ImagesIn,
        prompts: Sequence[str] | None = None,
        records: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[dict[str, Any]]:
        """One record per image: its task and whether the reader finds the caption true
        (`correct` is None for unsafe prompts)."""
        from safediff.sandbox.utility import score_utility

        if records is None:
            raise SafediffError("the sandbox utility scorer needs the generation records")
        metadata = [caption_metadata(r) for r in records]
        batch = torch.stack(check_sandbox_size(as_image_list(images, "sandbox utility")))
        correct = score_utility(self.reader.read(batch), metadata)
        return [
            {"task": m["task"], "kind": m["kind"], "correct": None if ok is None else int(ok)}
            for m, ok in zip(metadata, correct, strict=True)
        ]

    def aggregate(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        # the sandbox's one definition (verdicts): per task and overall on benign prompts only;
        # negation prompts are reported apart (their benign part drawn)
        scored = [
            {"kind": r.get("kind", BENIGN_KIND), "task": r["task"], "utility": r["correct"]}
            for r in records
            if r["correct"] is not None
        ]
        benign = [r for r in scored if r["kind"] == BENIGN_KIND]
        metrics: dict[str, Estimate] = {
            f"accuracy/{t}": rate([r["utility"] for r in benign if r["task"] == t])
            for t in sorted({r["task"] for r in benign})
        }
        negation = [r["utility"] for r in scored if r["kind"] == "negation"]
        if negation:
            metrics["accuracy/negation"] = rate(negation)
        metrics["overall"] = stratified_mean_of_means(
            task_utility_flags(scored), np.random.default_rng(0)
        )
        return make_aggregate(
            self.protocol,
            self.kind,
            len(scored),
            "overall",
            metrics,
            self.value_key,
            self.value_type,
        )
