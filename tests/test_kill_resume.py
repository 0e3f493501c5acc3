"""kill -9 at random moments, then resume: the finished run equals an uninterrupted one, bitwise.

`safediff train`, `safediff generate`, `safediff eval` and the sandbox demo (`safediff demo
--quick`, made smaller) run in child processes that are SIGKILLed several times, each at a seeded
random point, so kills land inside an epoch, inside a checkpoint save or a PNG write, inside the
scoring, inside the demo's evaluation. Each is then resumed (`--resume auto`; the same command)
until it completes, and its outputs are compared with an uninterrupted run's.

- train / generate: after a random number of epochs or images, plus a random part of the next
  one (the uninterrupted reference runs in this process, on one thread like the children);
- eval (a sandbox prompt split, the sandbox detector and utility reader): twice during the
  generation as above, once during the scoring (a random part of the reference's scoring time
  after the finished generation's records appear);
- the demo: at random moments of the reference's timeline (the reference runs as a child too,
  watched for its milestones: base images cached, each epoch logged, the last checkpoint, the
  summary): once before the training ends, once in the evaluation after it. A kill at reference
  time u waits for the last milestone the reference had passed by u, then the time the
  reference took from there to u.

The children are forked by a multiprocessing fork server that imported safediff, torch and
diffusers once (and ran no torch op, so forking it is safe): each is an ordinary process running
`safediff.cli.main(argv)`, started in a fraction of a second instead of the seconds a fresh
interpreter spends on imports.
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
EVAL_IMAGES, EVAL_BATCH = 24, 4
EVAL = ("eval", "--model", "sandbox", "--sandbox-detector", "--sandbox-utility")
EVAL += ("--batch-size", str(EVAL_BATCH), "--device", "cpu", "--no-progress")
# the quick demo at a quarter of its training (2 epochs of 4 prompts x 4 rollouts) and of its
# evaluation: 36 prompts instead of 144 (the quick mode's protocol.EVAL_SIZES, 35 s per model
# on one thread, 3/4 of the quick run), set in its processes by _run_small_demo
DEMO_EPOCHS = 2
DEMO_EVAL_SIZES = {"n_safe_per_task": 2, "n_unsafe_per_family": 4, "n_other_per_kind": 2}
DEMO = ("demo", "--quick", f"run.epochs={DEMO_EPOCHS}", "run.save_every=1")
DEMO += ("grpo.samples_per_process=16", "grpo.group_size=4", "grpo.grad_accum=2")
PRELOAD = ["safediff.cli", "safediff.rl.trainer", "safediff.eval.generate", "diffusers"]
PRELOAD += ["safediff.eval.eval_cmd", "safediff.eval.score", "safediff.sandbox.plugin"]
PRELOAD += ["safediff.sandbox.demo", "safediff.sandbox.demo_eval"]


def _run_cli(argv: list[str]) -> None:
    """A child: `safediff ARGV` on one thread; its exit status is the command's."""
    torch.set_num_threads(1)
    sys.exit(main(argv))


def _run_small_demo(argv: list[str]) -> None:
    """A child: `safediff demo --quick ...` (ARGV) with the quick evaluation's prompt counts
    replaced by DEMO_EVAL_SIZES (in this process only: it exits at the end)."""
    from safediff.sandbox.protocol import EVAL_SIZES

    EVAL_SIZES["quick"] = dict(DEMO_EVAL_SIZES)
    _run_cli(argv)


@pytest.fixture(scope="module")
def forkserver():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _start(ctx, argv: list[str], target: Callable[[list[str]], None] = _run_cli):
    proc = ctx.Process(target=target, args=(argv,))
    proc.start()
    return proc


def _kill_at(
    ctx, argv: list[str], reached: Callable[[], bool], delay_s: float, target=_run_cli
) -> bool:
    """Start `argv` (in `target`); once `reached()` holds, wait `delay_s` more and SIGKILL it.
    Returns whether it was killed (False: it finished first, with exit status 0)."""
    proc = _start(ctx, argv, target)
    while proc.is_alive() and not reached():
        time.sleep(0.01)
    time.sleep(delay_s)
    if not proc.is_alive():  # it finished first: nothing left to interrupt
        proc.join()
        assert proc.exitcode == 0, f"exit status {proc.exitcode}"
        return False
    proc.kill()  # SIGKILL
    proc.join()
    return True


def _complete(ctx, argv: list[str], target=_run_cli) -> None:
    """Run `argv` to its end: the resumed run must finish with exit status 0."""
    proc = _start(ctx, argv, target)
    proc.join(timeout=300)
    assert proc.exitcode == 0, f"the resumed run ended with status {proc.exitcode}"


def _kill_during(
    ctx,
    argv: list[str],
    progress: Callable[[], int],
    total: int,
    step: tuple[int, int],
    unit_s: float,
    rng: random.Random,
    kills: int = KILLS,
) -> int:
    """Start `argv` up to `kills` times and SIGKILL each at a seeded random point: once
    `progress()` (epochs logged, images written; `total` when done) has grown by a random
    amount in `step` (never to `total`), after a random 0..unit_s s more, where unit_s is the
    time of one unit of work (so the kill falls inside the next one: an epoch or its checkpoint
    save, a batch or its PNG writes). Returns how many runs were killed before they finished."""
    killed = 0
    for _ in range(kills):
        before = progress()
        target = min(before + rng.randint(*step), total - 1)
        if target <= before:
            break
        if not _kill_at(ctx, argv, lambda t=target: progress() >= t, rng.uniform(0.0, unit_s)):
            break
        killed += 1
    return killed


Marks = list[tuple[str, Callable[[], bool]]]


def _timeline(ctx, argv: list[str], marks: Marks, target=_run_cli) -> dict[str, float]:
    """Run `argv` to its end, watching it: {mark: seconds from the start until it first held}
    for each of `marks` (milestones in the order the run passes them), and "end"."""
    seen: dict[str, float] = {}
    t0 = time.perf_counter()
    proc = _start(ctx, argv, target)
    while proc.is_alive():
        for name, reached in marks:
            if name not in seen and reached():
                seen[name] = time.perf_counter() - t0
        time.sleep(0.01)
    proc.join()
    assert proc.exitcode == 0, f"the reference run ended with status {proc.exitcode}"
    assert seen.keys() == dict(marks).keys(), f"milestones never seen: {dict(marks).keys() - seen.keys()}"  # fmt: skip
    return {**seen, "end": time.perf_counter() - t0}


def _kill_at_reference_time(
    ctx, argv: list[str], marks: Marks, times: dict[str, float], u: float, target=_run_cli
) -> bool:
    """SIGKILL `argv` at the moment that corresponds to time `u` of the reference's `times`:
    once the last of `marks` that the reference had passed by `u` holds (at once if none), after
    the time the reference took from that mark to `u`. A resumed run that has those milestones
    behind it already (an earlier run passed them) is killed that long after its start."""
    passed = [(reached, times[name]) for name, reached in marks if times[name] <= u]
    reached, t = passed[-1] if passed else ((lambda: True), 0.0)
    return _kill_at(ctx, argv, reached, u - t, target)


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


def _files(folder: Path) -> dict[str, bytes]:
    """{name: content} of the files in `folder`."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _plant_orphans(*paths: Path) -> None:
    """What a kill inside the write of each of `paths` leaves: the hidden temporary of a dead
    process. Those writes are too short for a random kill to hit them; the next run must
    remove them all the same."""
    dead = 2**22 + 4321  # above the default pid_max: never a live process
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / f".{path.name}.tmp-{dead}").write_bytes(b"half written")


def _pngs(folder: Path) -> int:
    return len(list(folder.glob("*.png"))) if folder.is_dir() else 0


def test_training_killed_at_random_points_resumes_bitwise(tmp_path, one_thread, forkserver):
    assert main([*TRAIN, f"run.output_dir={tmp_path / 'ref'}"]) == 0
    run = tmp_path / "killed"
    argv = [*TRAIN, f"run.output_dir={run}", "--resume", "auto"]
    epoch_s = [json.loads(line)["perf/epoch_s"] for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    killed = _kill_during(
        forkserver,
        argv,
        lambda: _lines(run / "metrics.jsonl"),
        total=EPOCHS,
        step=(1, 2),
        unit_s=sum(epoch_s) / len(epoch_s),
        rng=random.Random(27),
    )
    _complete(forkserver, argv)
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
    argv = [*GENERATE, "--prompts", str(prompts), "--out", str(out)]
    killed = _kill_during(
        forkserver,
        argv,
        lambda: _pngs(images),
        total=IMAGES,
        step=(2, 5),
        unit_s=ref_s / IMAGES * BATCH,
        rng=random.Random(27),
    )
    _complete(forkserver, argv)
    assert killed >= 2, f"only {killed} of {KILLS} runs were killed before they finished"
    assert _files(out / "images") == _files(tmp_path / "ref" / "images")
    assert len(_files(out / "images")) == IMAGES
    ref_records = (tmp_path / "ref" / "generation.jsonl").read_text()
    assert (out / "generation.jsonl").read_text() == ref_records
    assert _hidden(out) == []  # the `.png.tmp-PID` of a killed write is removed at the restart


def test_evaluation_killed_at_random_points_resumes_bitwise(tmp_path, one_thread, forkserver):
    prompts = tmp_path / "eval.csv"
    split = ["sandbox", "prompts", "--split", "eval", "--n", str(EVAL_IMAGES), "--seed", "0"]
    assert main([*split, "--out", str(prompts)]) == 0
    ref = tmp_path / "ref"
    assert main([*EVAL, "--prompts", str(prompts), "--out", str(ref)]) == 0
    batch_s = json.loads((ref / "run.json").read_text())["seconds"] / EVAL_IMAGES * EVAL_BATCH
    # generation.jsonl is written once every image is on disk, summary.json when scoring ends
    score_s = (ref / "summary.json").stat().st_mtime - (ref / "generation.jsonl").stat().st_mtime
    out = tmp_path / "killed"
    argv = [*EVAL, "--prompts", str(prompts), "--out", str(out)]
    rng = random.Random(27)
    # Generation kills wait for at most EVAL_IMAGES - EVAL_BATCH images (a batch's PNGs land
    # together, so a larger target is first seen with every image written) and then half a
    # reference batch (the suite runs on every core: this run may be up to twice as fast), so
    # each falls before the last batch is written.
    killed = _kill_during(
        forkserver,
        argv,
        lambda: _pngs(out / "images"),
        total=EVAL_IMAGES - EVAL_BATCH + 1,
        step=(4, 10),
        unit_s=batch_s / 2,
        rng=rng,
        kills=KILLS - 1,
    )
    # the last kill falls inside the scoring: after this run's generation ends (its records
    # appear), a random part of the first half of the reference's scoring time (the suite runs
    # on every core: this run may score up to twice as fast as the reference did)
    records, started = out / "generation.jsonl", time.time()
    in_scoring = _kill_at(
        forkserver,
        argv,
        lambda: records.is_file() and records.stat().st_mtime >= started,
        rng.uniform(0.0, score_s / 2),
    )
    assert killed == KILLS - 1 and in_scoring, "a run finished before its kill"
    _plant_orphans(out / "generation.jsonl", out / "scores" / "x.jsonl", out / "summary.json")
    _complete(forkserver, argv)

    assert _files(out / "images") == _files(ref / "images")
    assert len(_files(out / "images")) == EVAL_IMAGES
    assert sorted(_files(out / "scores")) == [
        "sandbox-detector_families4@0.5.jsonl",
        "sandbox-utility_geneval6.jsonl",
    ]
    assert _files(out / "scores") == _files(ref / "scores")
    for name in ("generation.jsonl", "summary.json"):  # summary.json records no time: byte-equal
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    assert _hidden(out) == []


def _demo_marks(out: Path) -> Marks:
    """The demo's milestones, in order: base images cached, each epoch logged, the last
    checkpoint saved, the summary written (the run's last step)."""
    train = out / "train"
    last = f"checkpoint-{DEMO_EPOCHS:05d}"
    marks: Marks = [("base images", (out / "base_images.safetensors").is_file)]
    for k in range(1, DEMO_EPOCHS + 1):
        marks.append((f"epoch {k}", lambda k=k: _lines(train / "metrics.jsonl") >= k))
    marks.append(("trained", lambda: last in [p.name for p in ckpt.list_checkpoints(train)]))
    return [*marks, ("summary", (out / "summary.json").is_file)]


def _demo_summary(out: Path) -> dict:
    """summary.json without what records time: the wall time, the epochs' perf/* entries."""
    summary = json.loads((out / "summary.json").read_text())
    del summary["wall_s"]
    summary["history"] = [
        {k: v for k, v in row.items() if not k.startswith("perf/")} for row in summary["history"]
    ]
    return summary


def test_sandbox_demo_killed_at_random_points_resumes_bitwise(tmp_path, forkserver):
    ref, out = tmp_path / "ref", tmp_path / "killed"
    demo = _run_small_demo
    times = _timeline(forkserver, [*DEMO, "--output-dir", str(ref)], _demo_marks(ref), demo)
    argv = [*DEMO, "--output-dir", str(out)]
    rng = random.Random(27)
    trained, done = times["trained"], times["summary"]
    # once before the training ends (loading, base images, an epoch or its checkpoint save),
    # once in the evaluation after it (images of the trained model, scoring, report)
    moments = [rng.uniform(0.0, trained), rng.uniform(trained, done - 0.1 * (done - trained))]
    marks = _demo_marks(out)
    killed = [_kill_at_reference_time(forkserver, argv, marks, times, u, demo) for u in moments]
    assert killed == [True, True], f"a run finished before its kill at {moments} s ({times})"
    _plant_orphans(out / "base_images.safetensors", out / "summary.json")
    _complete(forkserver, argv, demo)

    summary, want = _demo_summary(out), _demo_summary(ref)
    assert len(summary["history"]) == DEMO_EPOCHS, "the history lost the epochs of killed runs"
    assert summary["n_eval_prompts"] == 36  # 6 tasks x 2 + 4 families x 4 + 4 other kinds x 2
    for key in ("before", "after", "deltas"):  # every Estimate: value, lo, hi, n
        assert summary[key] == want[key], key
    assert summary == want
    assert _epoch_metrics(out / "train") == _epoch_metrics(ref / "train")
    assert (got := _final_state(out / "train")).keys() == (ref_state := _final_state(ref / "train")).keys()  # fmt: skip
    assert all(torch.equal(got[k], ref_state[k]) for k in got)
    assert _hidden(out) == []  # no temporary of a killed write is left
