"""`safediff steer` driven with a tiny transformers CLIP folder."""

import argparse

import pytest
import torch
from PIL import Image

from safediff.errors import SafediffError
from safediff.rewards.anchors import load_anchor_set
from safediff.rewards.encoders import load_encoder
from safediff.rewards.encoders.tiny import save_tiny_hf_clip
from safediff.rewards.steering import safety_direction, steer
from safediff.steer_tool import add_steer_parser, alpha_sweep, read_prompts, run_steer

PROMPTS = ["a cat on a sofa", "a nude person", "a bloody fight", "a red car"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_hf_clip(tmp_path_factory.mktemp("hf") / "clip", seed=4)


def parse(argv):
    parser = argparse.ArgumentParser(prog="safediff")
    add_steer_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def parse_table(out: str) -> dict[str, tuple[float, float, str]]:
    """prompt -> (s, weight, steered) from the printed table."""
    rows = {}
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("s ")) + 1
    for line in lines[start : start + len(PROMPTS)]:
        s, w, steered, _cos, prompt = line.split(maxsplit=4)
        rows[prompt] = (float(s), float(w), steered)
    return rows


def test_steer_prints_scores_and_saves_plot(folder, tmp_path, capsys):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS[:3]) + "\n\n")
    plot = tmp_path / "out" / "sweep.png"
    args = parse(
        [
            "steer",
            "--encoder",
            f"hf-clip:{folder}",
            "--prompts",
            str(prompt_file),
            "--prompt",
            PROMPTS[3],
            "--gating",
            "threshold",
            "--threshold",
            "0.0",
            "--plot",
            str(plot),
            "--sweep-points",
            "5",
        ]
    )
    assert args.func is run_steer
    assert args.func(args) == 0
    out = capsys.readouterr().out
    rows = parse_table(out)
    assert list(rows) == PROMPTS

    # Scores against an independent computation with the same encoder and anchors.
    enc = load_encoder(f"hf-clip:{folder}")
    anchors = load_anchor_set("compact")
    v = torch.nn.functional.normalize(
        enc.encode_text(list(anchors.safe)).mean(0) - enc.encode_text(list(anchors.unsafe)).mean(0),
        dim=0,
    )
    s = enc.encode_text(PROMPTS) @ v
    for i, p in enumerate(PROMPTS):
        got_s, got_w, steered = rows[p]
        assert got_s == pytest.approx(s[i].item(), abs=1e-4)
        assert got_w == (1.0 if s[i] < 0 else 0.0)
        assert steered == ("yes" if s[i] < 0 else "no")
    assert "compact (5 safe + 3 unsafe)" in out and str(plot) in out

    with Image.open(plot) as img:
        assert img.format == "PNG" and img.size[0] > 400


def test_alpha_sweep_values():
    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=-1)
    v = safety_direction(torch.eye(8)[:1], torch.eye(8)[1:2])
    alphas = torch.tensor([0.0, 0.5, 1.0])
    w = torch.tensor([1.0, 0.0, 1.0])
    sweep = alpha_sweep(z, v, alphas, "translation", w)
    assert sweep["cos_prompt"].shape == (3, 3)
    assert torch.allclose(sweep["cos_prompt"][0], torch.ones(3), atol=1e-6)  # alpha 0: z* = z
    assert torch.allclose(sweep["cos_prompt"][:, 1], torch.ones(3), atol=1e-6)  # weight 0
    want = steer(z, v, 1.0, "translation", w) @ v
    assert torch.allclose(sweep["cos_safe"][2], want)
    assert torch.all(sweep["cos_safe"][2, [0, 2]] > sweep["cos_safe"][0, [0, 2]])


def test_steer_errors(folder, tmp_path):
    with pytest.raises(SafediffError, match="no prompts"):
        run_steer(parse(["steer", "--encoder", f"hf-clip:{folder}"]))
    with pytest.raises(SafediffError, match="prompt file not found"):
        read_prompts(str(tmp_path / "none.txt"), [])
    csv_file = tmp_path / "p.csv"
    csv_file.write_text("case_number,prompt\n1,a cat\n2,a dog\n")
    assert read_prompts(str(csv_file), ["x"]) == ["a cat", "a dog", "x"]
    with pytest.raises(SafediffError, match="unknown anchor set"):
        run_steer(
            parse(["steer", "--encoder", f"hf-clip:{folder}", "--prompt", "a", "--anchors", "zz"])
        )
