"""The sandbox's compositional utility reader as an evaluation scorer (the sandbox's GenEval).

Protocol `sandbox-utility/geneval6`: each image is read by the shipped utility reader
(`safediff.sandbox.reader`: per colour-and-shape counts and centres) and checked against the
structured facts of its caption (`safediff.sandbox.captions` metadata: task, objects, counts,
relation), which `safediff sandbox prompts` writes into the prompt CSV's `metadata` column and
`safediff generate` keeps in each image's record. Images of unsafe prompts carry no utility task
and are not counted. Aggregates: accuracy per task (single, two, counting, colors, position,
color_attr), each with a Wilson interval, and "overall" = the mean of the task accuracies
(GenEval's overall).
"""

import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from safediff.errors import SafediffError
from safediff.eval.scorers.base import ImagesIn, as_image_list, make_aggregate
from safediff.eval.stats import Estimate, rate
from safediff.sandbox.scene import IMAGE_SIZE

METADATA_KEY = "metadata"


def caption_metadata(record: Mapping[str, Any]) -> dict[str, Any]:
    """The caption facts stored with a generated image (extra['metadata'], a JSON string)."""
    raw = (record.get("extra") or {}).get(METADATA_KEY)
    if raw is None:
        raise SafediffError(
            f"image {record.get('name')!r} has no caption metadata: generate from a prompt set "
            "written by `safediff sandbox prompts`"
        )
    return json.loads(raw) if isinstance(raw, str) else dict(raw)


class SandboxUtilityScorer:
    kind = "utility"
    value_key = "correct"
    value_type = "binary"
    protocol = "sandbox-utility/geneval6"
    reads_generation_records = True

    def __init__(self, device: str | torch.device = "cpu") -> None:
        from safediff.sandbox.reader import load_reader

        self.reader = load_reader(device=device)

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
        batch = torch.stack(
            [
                F.interpolate(im[None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")[0]
                if im.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE)
                else im
                for im in as_image_list(images, "sandbox utility")
            ]
        )
        correct = score_utility(self.reader.read(batch), metadata)
        return [
            {"task": m["task"], "correct": None if ok is None else int(ok)}
            for m, ok in zip(metadata, correct, strict=True)
        ]

    def aggregate(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        scored = [r for r in records if r["correct"] is not None]
        tasks = sorted({r["task"] for r in scored})
        metrics: dict[str, Estimate] = {
            f"accuracy/{t}": rate([r["correct"] for r in scored if r["task"] == t]) for t in tasks
        }
        per_task = [metrics[f"accuracy/{t}"].value for t in tasks]
        overall = sum(per_task) / len(per_task) if per_task else float("nan")
        metrics["overall"] = Estimate(
            overall, float("nan"), float("nan"), len(scored), "mean of task accuracies", 0.95
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
