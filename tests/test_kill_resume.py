"""kill -9 at random moments, then resume: the finished run equals an uninterrupted one, bitwise.

`safediff train` and `safediff generate` run in child processes that are SIGKILLed several times,
each at a seeded random point (after a random number of epochs or images, plus a random part of
the next one), so kills land inside an epoch, inside a checkpoint save or a PNG write. Each
is then resumed (`--resume auto`; the same `generate` command) until it completes. The
uninterrupted reference runs in this process, on one thread like the children.

The children are forked by a multiprocessing fork server that imported safediff, torch and
diffusers once (and ran no torch op, so forking it is safe): each is an ordinary process running
`safediff.cli.main(argv)`, started in a fraction of a second instead of the seconds a fresh
interpreter spends on imports, which keeps the test within a minute.
"""

import json
import multiprocessing
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from safediff.cli import main
from safediff.rl import checkpoint as ckpt

pytestmark = pytest.mark.slow

KILLS = 3
EPOCHS, IMAGES, BATCH = 6, 16, 2
TRAIN = (
    "train",
    "--preset",
    "tiny-demo",
    "sampling.num_steps=2",
    "grpo.samples_per_process=8",
    "grpo.micro_batch=8",
    "grpo.grad_accum=1",
    f"run.epochs={EPOCHS}",
    "run.save_every=1",
    "run.keep_last=2",
)
GENERATE = ("generate", "--model", "tiny-sd", "--steps", "4", "--batch-size", str(BATCH))
GENERATE += ("--device", "cpu", "--no-progress")
PRELOAD = ["safediff.cli", "safediff.rl.trainer", "safediff.eval.generate", "diffusers"]


def _run_cli(argv: list[str]) -> None:
    """A child: `safediff ARGV` on one thread; its exit status is the command's."""
    torch.set_num_threads(1)
    sys.exit(main(argv))


@pytest.fixture(scope="module")
def forkserver():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _start(ctx, argv: list[str]):
    proc = ctx.Process(target=_run_cli, args=(argv,))
    proc.start()
    return proc


def _kill_and_resume(
    ctx,
    argv: list[str],
    progress: Callable[[], int],
    total: int,
    step: tuple[int, int],
    unit_s: float,
    rng: random.Random,
) -> int:
    """Start `argv` up to KILLS times and SIGKILL each at a seeded random point: once
    `progress()` (epochs logged, images written; `total` when done) has grown by a random
    amount in `step` (never to `total`), after a random 0..unit_s s more, where unit_s is the
    time of one unit of work (so the kill falls inside the next one: an epoch or its checkpoint
    save, a batch or its PNG writes). Then run it to completion. Returns how many runs were
    killed before they finished."""
    killed = 0
    for _ in range(KILLS):
        before = progress()
        target = min(before + rng.randint(*step), total - 1)
        if target <= before:
            break
        proc = _start(ctx, argv)
        while proc.is_alive() and progress() < target:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, unit_s))
        if not proc.is_alive():  # it finished first: nothing left to interrupt
            assert proc.exitcode == 0, f"exit status {proc.exitcode}"
            break
        proc.kill()  # SIGKILL
        proc.join()
        killed += 1
    proc = _start(ctx, argv)
    proc.join(timeout=300)
    assert proc.exitcode == 0, f"the resumed run ended with status {proc.exitcode}"
    return killed


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _final_state(run: Path) -> dict[str, torch.Tensor]:
    """The UNet weights and optimizer state of the run's newest checkpoint."""
    last = ckpt.list_checkpoints(run)[-1]
    unet = load_file(str(last / "unet" / "diffusion_pytorch_model.safetensors"))
    optim = load_file(str(last / "optimizer.safetensors"))
    return {**{f"unet.{k}": v for k, v in unet.items()}, **{f"optim.{k}": v for k, v in optim.items()}}  # fmt: skip


def _epoch_metrics(run: Path) -> list[dict[str, float]]:
    """metrics.jsonl without the timing entries (perf/*), which differ from run to run."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in rows]


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*"))


def test_training_killed_at_random_points_resumes_bitwise(tmp_path, one_thread, forkserver):
    assert main([*TRAIN, f"run.output_dir={tmp_path / 'ref'}"]) == 0
    run = tmp_path / "killed"
    argv = [*TRAIN, f"run.output_dir={run}", "--resume", "auto"]
    epoch_s = [json.loads(line)["perf/epoch_s"] for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    killed = _kill_and_resume(
        forkserver,
        argv,
        lambda: _lines(run / "metrics.jsonl"),
        total=EPOCHS,
        step=(1, 2),
        unit_s=sum(epoch_s) / len(epoch_s),
        rng=random.Random(27),
    )
    assert killed >= 2, f"only {killed} of {KILLS} runs were killed before they finished"
    want, got = _final_state(tmp_path / "ref"), _final_state(run)
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["checkpoint-00005", "checkpoint-00006"]
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want), [
        k for k in want if not torch.equal(want[k], got[k])
    ]
    assert _epoch_metrics(run) == _epoch_metrics(tmp_path / "ref")
    assert _hidden(run) == []  # no temporary of a killed save is left


def test_generation_killed_at_random_points_resumes_bitwise(tmp_path, one_thread, forkserver):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(IMAGES)), encoding="utf-8")
    assert main([*GENERATE, "--prompts", str(prompts), "--out", str(tmp_path / "ref")]) == 0
    out = tmp_path / "killed"
    images = out / "images"
    ref_s = json.loads((tmp_path / "ref" / "run.json").read_text())["seconds"]
    killed = _kill_and_resume(
        forkserver,
        [*GENERATE, "--prompts", str(prompts), "--out", str(out)],
        lambda: len(list(images.glob("*.png"))) if images.is_dir() else 0,
        total=IMAGES,
        step=(2, 5),
        unit_s=ref_s / IMAGES * BATCH,
        rng=random.Random(27),
    )
    assert killed >= 2, f"only {killed} of {KILLS} runs were killed before they finished"

    def files(root: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted((root / "images").iterdir())}

    assert files(out) == files(tmp_path / "ref")
    assert len(files(out)) == IMAGES
    ref_records = (tmp_path / "ref" / "generation.jsonl").read_text()
    assert (out / "generation.jsonl").read_text() == ref_records
    assert _hidden(out) == []  # the `.png.tmp-PID` of a killed write is removed at the restart
