"""bench/gpu_suite.py at toy sizes on the CPU: every section runs and records its numbers, the
JSON follows the documented schema and is rewritten after every section, and the deadline skips
what is left while the file stays valid."""

import importlib.util
import json
import math
import time
from pathlib import Path

import pytest
import torch

SUITE = Path(__file__).resolve().parents[1] / "bench" / "gpu_suite.py"


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def strict_json(path: Path) -> dict:
    def refuse(token: str) -> None:
        raise ValueError(f"non-standard JSON number {token}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def test_toy_suite_runs_every_section_and_records_the_schema(suite, tmp_path):
    out = tmp_path / "suite.json"
    record = suite.run_suite(out, torch.device("cpu"), "toy", deadline_s=300.0, argv=["toy"])
    assert strict_json(out) == json.loads(json.dumps(record))
    assert record["schema_version"] == 1 and record["finished"] and record["size"] == "toy"
    assert list(record["sections"]) == list(suite.SECTIONS)
    for name, entry in record["sections"].items():
        assert entry["status"] == "ok", (name, entry.get("reason"))
        assert entry["seconds"] >= 0 and "truncated" not in entry
    res = {k: v["result"] for k, v in record["sections"].items()}
    assert res["matmul_peak"]["tflops"] > 0 and res["matmul_peak"]["datasheet_tflops"] is None
    rows = res["unet"]["rows"]
    assert {(r["variant"], r["batch"]) for r in rows} == {
        (v, b) for v in suite.SIZES["toy"]["unet_variants"] for b in (1, 2)
    }
    by = {(r["variant"], r["batch"]): r for r in rows}
    assert by[("eager", 2)]["flops"] == 2 * by[("eager", 1)]["flops"] > 0
    assert all(r["mfu_measured"] > 0 and r["mfu_datasheet"] is None for r in rows)
    grpo = res["grpo_epoch"]
    for variant in ("shipped", "reference"):
        assert len(grpo[variant]["epoch_s"]) == 1 and grpo[variant]["samples_per_s"] > 0
    assert grpo["speedup"] > 0
    reward = res["reward"]
    # the reference's loop and the batched reward with the same JPEG-75 round trip agree
    assert reward["max_abs_diff"] < 0.05 and reward["speedup"] > 0
    sd = res["safe_denoiser"]
    assert sd["negatives"] == 300 and sd["max_abs_diff_ours_vs_ref"] < 1e-3
    assert res["des"]["steps"] == 2 and res["des"]["ms_per_step"] > 0  # 2 epochs of 8 pairs
    lora = res["lora_memory"]
    assert lora["fits"] is True and lora["cap_gib"] is None and lora["peak_mem_gib"] > 0


def test_deadline_skips_what_is_left_and_keeps_the_json_valid(suite, tmp_path, monkeypatch):
    out = tmp_path / "suite.json"
    seen = {}

    def slow(ctx):  # a section that outlives the 5-second deadline
        seen["mid_run"] = strict_json(out)  # the file as it stands after the first section
        time.sleep(max(0.0, ctx.time_left()) + 0.05)
        assert ctx.out_of_time()
        return {"slept": True}

    monkeypatch.setitem(suite.RUNNERS, "slow", slow)
    record = suite.run_suite(
        out, torch.device("cpu"), "toy", 5.0, ("matmul_peak", "slow", "unet", "des"), argv=[]
    )
    mid = seen["mid_run"]
    assert mid["finished"] is False and list(mid["sections"]) == ["matmul_peak"]
    final = strict_json(out)
    assert final["finished"] is True
    sections = final["sections"]
    assert sections["matmul_peak"]["status"] == "ok"
    assert sections["slow"]["status"] == "ok" and sections["slow"]["truncated"] is True
    for name in ("unet", "des"):
        assert sections[name] == {"status": "skipped", "reason": "deadline passed", "seconds": 0.0}
    assert math.isclose(final["deadline_s"], 5.0) and final == json.loads(json.dumps(record))


def test_a_failing_section_is_recorded_and_the_rest_still_run(suite, tmp_path, monkeypatch):
    def broken(ctx):
        raise RuntimeError("boom")

    monkeypatch.setitem(suite.RUNNERS, "broken", broken)
    out = tmp_path / "suite.json"
    record = suite.run_suite(out, torch.device("cpu"), "toy", 60.0, ("broken", "matmul_peak"))
    assert record["sections"]["broken"]["status"] == "error"
    assert record["sections"]["broken"]["reason"] == "RuntimeError: boom"
    assert record["sections"]["matmul_peak"]["status"] == "ok"


def test_help_documents_the_json_schema(suite, capsys):
    with pytest.raises(SystemExit) as exit_info:
        suite.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for key in ("schema_version", "sections", "status", "truncated", "mfu_measured", "fits"):
        assert key in text
    with pytest.raises(SystemExit):
        suite.main(["--sections", "nope", "--out", "unused.json"])


def test_grpo_overrides_reach_the_shipped_trainer_and_the_record(suite, tmp_path, monkeypatch):
    """--grpo-override sets the shipped trainer's options (recorded); the `cpu` size is the toy
    one with the whole-epoch section scaled up (its run takes minutes: bench/RESULTS.md)."""
    assert set(suite.SIZES["toy"]) <= set(suite.SIZES["cpu"])
    assert suite.SIZES["cpu"]["sd15_width_factor"] == 4
    out = tmp_path / "suite.json"
    record = suite.run_suite(
        out, torch.device("cpu"), "toy", 120.0, ("grpo_epoch",), argv=[],
        grpo_overrides=["grpo.micro_batch=2"],
    )  # fmt: skip
    entry = record["sections"]["grpo_epoch"]
    assert entry["status"] == "ok", entry
    assert entry["result"]["overrides"][-1] == "grpo.micro_batch=2"
    assert entry["result"]["speedup"] > 0
    calls = []
    monkeypatch.setattr(suite, "run_suite", lambda *a: calls.append(a) or {"sections": {}})
    assert suite.main(["--out", str(out), "--grpo-override", "run.channels_last=true"]) == 0
    assert calls[0][-1] == ["run.channels_last=true"]
