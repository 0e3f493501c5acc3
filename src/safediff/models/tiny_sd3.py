"""A tiny Stable Diffusion 3 built offline with random weights, for tests and smoke runs.

Every component is the real class a StableDiffusion3Pipeline uses: diffusers'
SD3Transformer2DModel and AutoencoderKL (16 latent channels, SD3's scaling and shift factors, no
quant convs), transformers' CLIPTextModelWithProjection x 2 and T5EncoderModel, CLIPTokenizer x 2
(OpenAI CLIP's BPE built offline, `clip_tokenizer.py`; the second pads with "!" like OpenCLIP
bigG's) and a T5 tokenizer built offline (`build_t5_tokenizer`), and SD3's
FlowMatchEulerDiscreteScheduler config (shift 3.0), only at toy widths: two CLIP encoders of width
32 with projections of 32 (token states 32 + 32 = 64 = joint_attention_dim, pooled 32 + 32 = 64 =
pooled_projection_dim), a T5 of width 64, a one-layer transformer of 4 heads x 8 with patch size 2.
A 16 x 16 image (8 x 8 latent, 16 image tokens) runs in milliseconds on a CPU. Weights are a pure
function of `seed` (the global torch RNG is forked; the caller's random state is untouched).
"""

import copy
import string
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from safediff.errors import SafediffError
from safediff.models.clip_tokenizer import VOCAB_SIZE, build_clip_tokenizer

# stabilityai/stable-diffusion-3-medium-diffusers scheduler/scheduler_config.json
SD3_SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}
SD3_VAE_FACTORS = {"scaling_factor": 1.5305, "shift_factor": 0.0609}
LATENT_CHANNELS = 16  # SD3's and FLUX's VAE
T5_MAX_LENGTH = 16  # the tiny T5 tokenizer's model_max_length (real T5: 512)

_VAE_WIDTHS = (32, 64)  # two VAE blocks -> one 2x downsampling
_CLIP_DIM = 32
_JOINT_DIM = 2 * _CLIP_DIM  # CLIP token states (32 + 32) and T5 states share this width

# Words given whole pieces in the tiny T5 vocabulary (anything else splits into characters).
_WORD_LIST = (
    "a an the of and with in on at to for from by is are photo picture image painting drawing "
    "portrait of person man woman child cat dog bird car house tree flower sky sea city street "
    "red blue green black white bright dark night day sun fire weapon gun knife skull drug blood "
    "safe unsafe nude violence art style realistic"
)


def build_t5_tokenizer(max_length: int = T5_MAX_LENGTH) -> Any:
    """A tiny T5 (SentencePiece-Unigram) tokenizer built offline: transformers' `T5Tokenizer`
    over a hand-made vocabulary (no training, no download).

    Ids: <pad> = 0, </s> = 1, <unk> = 2 (T5's), then the word-boundary piece, whole words of a
    short list, and every printable ASCII character with and without the boundary marker, so
    any ASCII prompt tokenizes (unknown words fall apart into characters). No sentinel ids.
    Prompts end with </s> and are padded with <pad>, as T5's.
    """
    from transformers import T5Tokenizer

    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    words = dict.fromkeys(f"▁{w}" for w in _WORD_LIST.split())
    vocab += [(w, -3.0) for w in words]
    chars = [c for c in string.printable if not c.isspace()]
    vocab += [(f"▁{c}", -6.0) for c in chars if f"▁{c}" not in words]
    vocab += [(c, -8.0) for c in chars]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0)
    tok.model_max_length = max_length
    return tok


def tiny_flow_vae(**factors: float) -> AutoencoderKL:
    """The tiny VAE of tiny-sd3 / tiny-flux: 16 latent channels, one 2x downsampling, no quant
    convs (as SD3's and FLUX's VAEs); `factors`: scaling_factor and shift_factor."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(_VAE_WIDTHS),
        up_block_types=("UpDecoderBlock2D",) * len(_VAE_WIDTHS),
        block_out_channels=_VAE_WIDTHS,
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        **factors,
    )


def tiny_t5(d_model: int, vocab_size: int) -> T5EncoderModel:
    """A 2-layer T5 encoder of width `d_model` (4 heads)."""
    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=d_model,
            d_kv=d_model // 4,
            d_ff=2 * d_model,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",  # T5 v1.1's (SD3's and FLUX's T5-XXL)
            is_encoder_decoder=False,
        )
    )


def tiny_clip_config(hidden_act: str, layers: int = 3) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=_CLIP_DIM,
        intermediate_size=64,
        num_hidden_layers=layers,  # SD3 reads the penultimate layer
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        projection_dim=_CLIP_DIM,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def build_tiny_sd3(seed: int = 0, sample_size: int = 8) -> dict[str, Any]:
    """Components of a tiny random SD3 pipeline, by diffusers' names.

    seed: weights are a pure function of it (the caller's RNG state is untouched).
    sample_size: latent side of the transformer's default input; images are 2 x larger (VAE
        factor 2). Must be even (patch size 2).
    Returns {"transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3",
    "tokenizer", "tokenizer_2", "tokenizer_3", "scheduler"}; modules float32, CPU, eval mode.
    """
    if sample_size < 2 or sample_size % 2:
        raise SafediffError(f"tiny SD3 sample_size must be an even number >= 2, got {sample_size}")
    tokenizer_3 = build_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=sample_size,
            patch_size=2,
            in_channels=LATENT_CHANNELS,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=_JOINT_DIM,
            caption_projection_dim=32,
            pooled_projection_dim=2 * _CLIP_DIM,
            out_channels=LATENT_CHANNELS,
            pos_embed_max_size=max(16, sample_size),
        )
        vae = tiny_flow_vae(**SD3_VAE_FACTORS)
        text_encoder = CLIPTextModelWithProjection(tiny_clip_config("quick_gelu"))
        text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_config("gelu"))
        text_encoder_3 = tiny_t5(_JOINT_DIM, len(tokenizer_3))
    tokenizer = build_clip_tokenizer()
    tokenizer_2 = copy.deepcopy(tokenizer)
    tokenizer_2.pad_token = "!"  # OpenCLIP bigG's tokenizer pads with "!" (id 0)
    return {
        "transformer": transformer.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "text_encoder_2": text_encoder_2.eval(),
        "text_encoder_3": text_encoder_3.eval(),
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "tokenizer_3": tokenizer_3,
        "scheduler": FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG),
    }


def save_tiny_sd3(path: str | Path, seed: int = 0, sample_size: int = 8) -> Path:
    """Build a tiny SD3 (see `build_tiny_sd3`) and write it as a diffusers
    StableDiffusion3Pipeline folder (safetensors) that `StableDiffusion3Pipeline.from_pretrained`
    and `safediff.models.loading.load_t2i_model` load."""
    from safediff.models.flow_family import flow_pipeline

    path = Path(path)
    flow_pipeline(build_tiny_sd3(seed, sample_size)).save_pretrained(path, safe_serialization=True)
    return path
