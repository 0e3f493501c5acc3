"""The sandbox evaluation's one image cache: images kept on disk under a key of what made them.

The demo (base images), the merge-weight search (validation images per weight) and the defenses
table (one row per model + defense stack) all sample the same way (`demo_eval.generate_images`)
and cache through here, so a rerun samples nothing twice and a changed model never reuses stale
images. The key is the content, never a path: the UNet's and text encoder's weight digests, the
defense stack with digests of the files it reads, the captions, the sampler settings and the seed.
"""

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from safediff.atomic import atomic_path

KEY_VERSION = 2  # bumped when the key's fields change: older cache files are regenerated


def image_key(
    model: Any,
    captions: Sequence[str],
    sampling: Mapping[str, Any],
    stack: Any = None,
) -> dict[str, Any]:
    """What a set of sandbox images depends on (a JSON-safe dict).

    model: a T2IModel (after defenses are applied, so a swapped text encoder shows). captions:
    the prompts in order. sampling: the sampler settings and seed (`generate_images` keywords;
    'progress' and 'batch_size' are left out: images do not depend on them). stack: the
    `DefenseStack` applied, or None.
    """
    from safediff.models.digest import module_digest

    files: dict[str, str] = {}
    if stack is not None:
        from safediff.defenses.stack import safe_denoiser_files
        from safediff.sandbox.manifest import sha256_file

        for spec in stack.specs:
            if spec.kind == "safe-denoiser":
                files.update({f: sha256_file(f) for f in safe_denoiser_files(spec)})
    encoder = model.components.get("text_encoder")
    text = hashlib.blake2b("\n".join(captions).encode(), digest_size=16).hexdigest()
    return {
        "version": KEY_VERSION,
        "unet": module_digest(model.unet),
        "text_encoder": module_digest(encoder) if isinstance(encoder, torch.nn.Module) else None,
        "defenses": str(stack) if stack is not None else "",
        "files": files,
        "captions": text,
        "n": len(captions),
        "sampling": {k: v for k, v in sampling.items() if k not in ("progress", "batch_size")},
    }


def is_cached(path: str | Path, key: Mapping[str, Any]) -> bool:
    """Whether `path` holds images written for `key`."""
    from safetensors.torch import safe_open

    path = Path(path)
    if not path.is_file():
        return False
    with safe_open(str(path), framework="pt") as fh:
        return (fh.metadata() or {}).get("key") == json.dumps(key, sort_keys=True)


def cached_images(
    path: str | Path, key: Mapping[str, Any], make: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """Images [N, 3, H, W] from `path` when it was written for the same `key`, else `make()`
    (then saved there atomically, the key as JSON in the safetensors metadata)."""
    from safetensors.torch import load_file, save_file

    path = Path(path)
    text = json.dumps(key, sort_keys=True)
    if is_cached(path, key):
        return load_file(str(path))["images"]
    images = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({"images": images.contiguous()}, str(tmp), metadata={"key": text})
    return images
