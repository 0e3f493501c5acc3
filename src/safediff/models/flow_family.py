"""Which flow family (SD3 / FLUX) a transformer belongs to, and the diffusers pipeline over a flow
model's components.

Kept apart from flow.py (the adapter and loader) so the tiny builders (tiny_sd3.py / tiny_flux.py),
which flow.py's loader calls, can write their pipeline folders without importing flow.py back.
This module imports no other safediff model module.
"""

from typing import Any

from torch import nn

from safediff.errors import SafediffError

SD3_COMPONENTS = (
    "transformer",
    "vae",
    "text_encoder",
    "text_encoder_2",
    "tokenizer",
    "tokenizer_2",
    "scheduler",
)  # text_encoder_3 / tokenizer_3 (T5) are optional, as in StableDiffusion3Pipeline
FLUX_COMPONENTS = SD3_COMPONENTS  # FluxPipeline's components: the same names (CLIP + T5)


def transformer_family(transformer: nn.Module) -> str:
    """'flux' or 'sd3' from the transformer's class (FluxTransformer2DModel /
    SD3Transformer2DModel); anything else is an error."""
    name = type(transformer).__name__
    if "Flux" in name:
        return "flux"
    if "SD3" in name:
        return "sd3"
    raise SafediffError(
        f"{name} is not a flow transformer safediff adapts (SD3Transformer2DModel, "
        "FluxTransformer2DModel)"
    )


def flow_pipeline(components: dict[str, Any], transformer: nn.Module | None = None) -> Any:
    """A diffusers `StableDiffusion3Pipeline` / `FluxPipeline` over the components (progress bar
    off): the reference sampler for parity tests and what `save_pretrained` writes.

    components: a `T2IModel`'s components plus its transformer (`flow_pipeline(model.components,
    model.unet)`), or builder output with "transformer".
    """
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    transformer = transformer if transformer is not None else components["transformer"]
    family = transformer_family(transformer)
    names = (
        (*SD3_COMPONENTS, "text_encoder_3", "tokenizer_3") if family == "sd3" else FLUX_COMPONENTS
    )
    parts = {k: components.get(k) for k in names if k != "transformer"}
    cls = StableDiffusion3Pipeline if family == "sd3" else FluxPipeline
    pipe = cls(transformer=transformer, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe
