"""Tiny CLIP models built offline with random weights, for tests, benchmarks and smoke runs.

Their embeddings mean nothing; they exercise the real code paths (open_clip and transformers
model classes, tokenizers, checkpoint files and folders) in well under a second on a CPU.
"""

import json
from pathlib import Path
from typing import Any

import torch


def tiny_openclip_config(
    image_size: int = 32,
    embed_dim: int = 16,
    width: int = 32,
    layers: int = 2,
    patch_size: int = 8,
    context_length: int = 16,
) -> dict[str, Any]:
    """An open_clip model config (embed_dim, vision_cfg, text_cfg) for a tiny ViT CLIP.

    It has the key layout of every open_clip ViT CLIP (HPSv2's included), with open_clip's
    standard vocabulary (49408 tokens) so its SimpleTokenizer works offline.
    """
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "image_size": image_size,
            "layers": layers,
            "width": width,
            "head_width": max(8, width // 2),
            "patch_size": patch_size,
        },
        "text_cfg": {
            "context_length": context_length,
            "vocab_size": 49408,
            "width": width,
            "heads": 2,
            "layers": layers,
        },
    }


def tiny_openclip_state_dict(model_cfg: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict for `model_cfg` (open_clip CLIP keys), built without touching the
    global RNG state."""
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**model_cfg)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _byte_vocab() -> dict[str, int]:
    """CLIP byte-level BPE vocabulary without merges: 256 byte symbols, the same with the
    end-of-word suffix, and the two special tokens. Every string tokenises (one token a byte)."""
    from open_clip.tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    return vocab


def save_tiny_hf_clip(
    folder: str | Path,
    seed: int = 0,
    image_size: int = 32,
    projection_dim: int = 16,
    hidden_size: int = 32,
    layers: int = 2,
    max_length: int = 32,
) -> Path:
    """Write a tiny transformers CLIP folder (CLIPModel, CLIPTokenizer, preprocessor config).

    The folder loads back with `load_hf_clip_encoder` (and with CLIPModel.from_pretrained).
    The tokenizer is CLIP's byte-level BPE with a byte vocabulary and no merges.
    """
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = _byte_vocab()
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab_path.write_text(json.dumps(vocab))
    merges_path.write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        vocab=str(vocab_path), merges=str(merges_path), model_max_length=max_length
    )
    tokenizer.save_pretrained(folder)

    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": layers,
            "num_attention_heads": 2,
            "max_position_embeddings": max_length,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "image_size": image_size,
            "patch_size": max(1, image_size // 4),
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": layers,
            "num_attention_heads": 2,
        },
        projection_dim=projection_dim,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "CLIPImageProcessor",
                "do_resize": True,
                "size": {"shortest_edge": image_size},
                "do_center_crop": True,
                "crop_size": {"height": image_size, "width": image_size},
                "do_normalize": True,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "resample": 3,
            },
            indent=2,
        )
    )
    return folder
