"""The attack runner: trivial in-test attacks on tiny-sd and the sandbox, judged, resumable."""

import json

import pytest
import torch

from safediff.attacks.base import AttackResult, AttackTarget, Victim
from safediff.attacks.run import generate_images, run_attack
from safediff.attacks.targets import AsrProtocol, load_targets
from safediff.config import ModelConfig
from safediff.errors import SafediffError
from safediff.models.loading import load_t2i_model
from safediff.sampling.sample import SamplerSettings, sample
from safediff.seeding import generator


class FixedPrompt:
    """An attack that answers every target with one fixed prompt (or the target's own)."""

    name = "fixed"
    white_box = False

    def __init__(self, prompt: str | None = None) -> None:
        self.prompt = prompt

    def run(self, victim, target, generator, progress=False):
        draw = int(torch.randint(0, 1000, (1,), generator=generator))
        return AttackResult(
            target.target_id,
            self.prompt or target.prompt,
            queries=3,
            steps=1,
            info={"draw": draw, "hit": draw % 2 == 0},
        )


class EmbedsAttack:
    """An embedding attack: the conditioning of its prompt, returned as prompt_embeds."""

    name = "embeds"
    white_box = False

    def run(self, victim, target, generator, progress=False):
        embeds = victim.model.encode_text([target.prompt], torch.device("cpu"))
        return AttackResult(target.target_id, f"<embeds of {target.prompt}>", prompt_embeds=embeds)


class BrightJudge:
    """A real (trivial) safety judge: an image is flagged when its mean brightness > 0.5."""

    protocol = "bright@0.5"
    kind = "safety"
    value_key = "unsafe"
    value_type = "binary"

    def score_images(self, images, prompts=None):
        return [{"mean": float(im.mean()), "unsafe": int(im.mean() > 0.5)} for im in images]


TARGETS = [
    AttackTarget("t0", "a red circle", "bright", ("red",), seed=1),
    AttackTarget("t/1", "a blue square", "bright", ("blue",), seed=2),
]


@pytest.fixture(scope="module")
def tiny():
    return load_t2i_model(ModelConfig(pretrained="tiny-sd"), device="cpu")


@pytest.fixture(scope="module")
def sandbox():
    return load_t2i_model(ModelConfig(pretrained="sandbox"), device="cpu")


def _victim(model, steps=2):
    return Victim(model, {}, SamplerSettings(steps, 1.0, 2.0), base=model, spec="none")


def test_runner_on_tiny_sd_writes_records_images_and_summary(tiny, tmp_path):
    protocol = AsrProtocol("bright-set", "bright", None, 2, "any")
    s = run_attack(_victim(tiny), FixedPrompt("xyz"), TARGETS, BrightJudge(), tmp_path, protocol)
    assert s["protocol"] == "bright-set/bright/any-of-2" and s["judge"] == "bright@0.5"
    assert s["targets"] == 2 and s["queries"] == 6 and s["steps"] == 2
    rec = json.loads((tmp_path / "targets" / "t_1.json").read_text())
    assert rec["target_id"] == "t/1" and rec["adversarial_prompt"] == "xyz"
    assert rec["images"] == ["t_1_0.png", "t_1_1.png"]
    assert all((tmp_path / "images" / n).is_file() for n in rec["images"])
    assert rec["flags"] == [bool(r["unsafe"]) for r in rec["judge_records"]]
    assert rec["success"] == any(rec["flags"])
    records = [json.loads(p.read_text()) for p in (tmp_path / "targets").glob("*.json")]
    asr = sum(any(r["flags"]) for r in records)
    assert s["asr"]["value"] == asr / 2 and s["asr"]["method"] == "wilson"
    assert set(s["info_rates"]) == {"hit"}  # the boolean info field, as a rate
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["asr"] == s["asr"]


def test_prompt_embeds_sample_as_the_text_they_encode(tiny):
    v = _victim(tiny)
    text = generate_images(v, "a red circle", None, seed=5, k=2)
    embeds = tiny.encode_text(["a red circle"], torch.device("cpu"))
    assert torch.equal(generate_images(v, "ignored", embeds, seed=5, k=2), text)
    with pytest.raises(SafediffError, match="prompt_embeds must be"):
        sample(tiny, ["a", "b"], [generator(0), generator(1)], v.settings, prompt_embeds=embeds)


def test_embedding_attack_result_is_saved_and_used(tiny, tmp_path):
    protocol = AsrProtocol("s", "bright", None, 1, "any")
    run_attack(_victim(tiny), EmbedsAttack(), TARGETS[:1], BrightJudge(), tmp_path, protocol)
    rec = json.loads((tmp_path / "targets" / "t0.json").read_text())
    assert rec["prompt_embeds"] == "t0.safetensors"
    assert (tmp_path / "targets" / "t0.safetensors").is_file()


def test_sandbox_detector_judges_the_targets_family(sandbox, tmp_path):
    from safediff.sandbox.detector_scorer import SandboxDetectorScorer

    ts = load_targets("sandbox:skull", limit=1)
    protocol = ts.protocol.with_overrides(images_per_prompt=2)
    judge = SandboxDetectorScorer()
    victim = Victim(sandbox, {}, SamplerSettings(10, 1.0, 4.0), spec="none")
    s = run_attack(victim, FixedPrompt(), ts.targets, judge, tmp_path / "a", protocol)
    # the undefended sandbox model draws a skull for "a skull": the attack "succeeds"
    assert s["asr"]["value"] == 1.0
    rec = json.loads((tmp_path / "a" / "targets" / f"{ts.targets[0].target_id}.json").read_text())
    assert all("skull" in r["families"] for r in rec["judge_records"] if r["unsafe"])
    # a benign adversarial prompt draws no skull: no success
    s = run_attack(
        victim, FixedPrompt("a blue square"), ts.targets, judge, tmp_path / "b", protocol
    )
    assert s["asr"]["value"] == 0.0


def _strip_times(record):
    return {k: v for k, v in record.items() if k not in ("seconds", "attack_seconds")}


def test_resumed_run_equals_an_uninterrupted_one(tiny, tmp_path):
    targets = [*TARGETS, AttackTarget("t2", "a green ring", "bright", (), seed=3)]
    protocol = AsrProtocol("s", "bright", None, 2, "any")
    victim, judge = _victim(tiny), BrightJudge()
    run_attack(victim, FixedPrompt(), targets[:2], judge, tmp_path / "resumed", protocol)
    s1 = run_attack(victim, FixedPrompt(), targets, judge, tmp_path / "resumed", protocol)
    assert s1["attacked_now"] == 1  # the first two were kept
    s2 = run_attack(victim, FixedPrompt(), targets, judge, tmp_path / "whole", protocol)
    assert s2["attacked_now"] == 3
    for sub in ("targets", "images"):
        a = sorted(p.name for p in (tmp_path / "resumed" / sub).iterdir())
        assert a == sorted(p.name for p in (tmp_path / "whole" / sub).iterdir())
    for p in (tmp_path / "whole" / "images").iterdir():
        assert p.read_bytes() == (tmp_path / "resumed" / "images" / p.name).read_bytes()
    for p in (tmp_path / "whole" / "targets").glob("*.json"):
        a = _strip_times(json.loads(p.read_text()))
        b = _strip_times(json.loads((tmp_path / "resumed" / "targets" / p.name).read_text()))
        assert a == b
    keep = ("asr", "per_target", "queries", "steps", "info_rates", "protocol")
    assert {k: s1[k] for k in keep} == {k: s2[k] for k in keep}
    # a record whose image went missing is attacked again, to the same bytes
    lost = tmp_path / "resumed" / "images" / "t0_1.png"
    lost.unlink()
    s3 = run_attack(victim, FixedPrompt(), targets, judge, tmp_path / "resumed", protocol)
    assert s3["attacked_now"] == 1
    assert lost.read_bytes() == (tmp_path / "whole" / "images" / "t0_1.png").read_bytes()


def test_other_settings_are_refused_unless_overwrite(tiny, tmp_path):
    protocol = AsrProtocol("s", "bright", None, 1, "any")
    victim, judge = _victim(tiny), BrightJudge()
    run_attack(victim, FixedPrompt(), TARGETS[:1], judge, tmp_path, protocol)
    with pytest.raises(SafediffError, match=r"made with other settings \(sampler\)"):
        run_attack(_victim(tiny, steps=1), FixedPrompt(), TARGETS[:1], judge, tmp_path, protocol)
    s = run_attack(
        _victim(tiny, steps=1), FixedPrompt(), TARGETS[:1], judge, tmp_path, protocol,
        overwrite=True,
    )  # fmt: skip
    assert s["attacked_now"] == 1


def test_bad_inputs(tiny, tmp_path):
    protocol = AsrProtocol("s", "bright", None, 1, "any")

    class Utility(BrightJudge):
        kind = "utility"

    with pytest.raises(SafediffError, match="not a safety scorer"):
        run_attack(_victim(tiny), FixedPrompt(), TARGETS, Utility(), tmp_path, protocol)
    clash = [AttackTarget("a b", "x"), AttackTarget("a_b", "y")]
    with pytest.raises(SafediffError, match="name the same file"):
        run_attack(_victim(tiny), FixedPrompt(), clash, BrightJudge(), tmp_path, protocol)

    class Wrong(FixedPrompt):
        def run(self, victim, target, generator, progress=False):
            return AttackResult("other", "x")

    with pytest.raises(SafediffError, match="another target"):
        run_attack(_victim(tiny), Wrong(), TARGETS, BrightJudge(), tmp_path, protocol)


def test_report_shows_an_attack_run_beside_evaluation_runs(tiny, tmp_path):
    from safediff.eval.report import build_report
    from safediff.report_cli import SIDE_REPORTS
    from test_report import write_run  # a scored evaluation run written by hand

    write_run(tmp_path / "eval", "a", [1, 0], [30.0, 31.0])
    protocol = AsrProtocol("s", "bright", None, 1, "any")
    run_attack(
        _victim(tiny), FixedPrompt("xyz"), TARGETS, BrightJudge(), tmp_path / "atk", protocol
    )
    report = build_report(
        [tmp_path / "eval", tmp_path / "atk"], tmp_path / "report", side_reports=SIDE_REPORTS
    )
    assert [r["name"] for r in report["runs"]] == ["eval"]
    assert report["attacks"][0]["name"] == "atk"
    html = (tmp_path / "report" / "report.html").read_text()
    assert "s/bright/any-of-1" in html and "xyz" in html and html.endswith("</body></html>")
    assert "## attacks" in (tmp_path / "report" / "report.md").read_text()
