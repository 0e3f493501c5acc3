"""One-line texts of the model loaders' errors, shared by loading.py (bare UNet files) and
lora_adapter.py (LoRA adapters)."""


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def few_names(keys: list[str], n: int = 3) -> str:
    if not keys:
        return "[]"
    more = ", ..." if len(keys) > n else ""
    return "[" + ", ".join(keys[:n]) + more + "]"


def describe_unet_kind(is_xl: bool, cross: int | None) -> str:
    dim = f"cross_attention_dim {cross}" if cross is not None else "unknown cross_attention_dim"
    return (
        f"an SDXL UNet (addition_embed_type text_time, {dim})"
        if is_xl
        else (f"an SD 1.x / 2.x UNet ({dim})")
    )
