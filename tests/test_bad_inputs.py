"""A catalogue of bad inputs, each through `safediff.cli.main` as a user would type it.

Every case must end with status 2 and one line on stderr that starts `safediff: error:` and names
the problem (log lines before it are allowed; a traceback is not), and must leave every file that
was there before untouched, with no temporary left behind. Then the runs that survive their own
damage: a truncated newest checkpoint, a partial metrics line, orphaned temporaries, a damaged
config.yaml, resuming from another run's checkpoint, a full disk.
"""

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from safediff.cli import main
from safediff.rl import checkpoint as ckpt

LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")
PROGRESS_LINE = re.compile(r"^[\w ]+:\s+\d+%\|")  # a tqdm bar of a run cut short


def assert_one_line_error(code: int, err: str, *fragments: str) -> str:
    """Status 2; stderr is log lines then exactly one `safediff: error:` line (the last),
    containing every fragment; no traceback. Returns the error line."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("safediff: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    others = [
        line for line in lines[:-1] if not (LOG_LINE.match(line) or PROGRESS_LINE.match(line))
    ]
    assert not others, f"stderr holds more than log lines and the error: {others}"
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    return errors[0]


def snapshot(root: Path) -> dict[str, str]:
    """Digest of every file under root (relative path -> sha256)."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def assert_nothing_lost(before: dict[str, str], root: Path) -> None:
    """Every file in `before` is still there with the same bytes; no `.NAME.tmp-PID` is left."""
    after = snapshot(root)
    changed = [name for name, digest in before.items() if after.get(name) != digest]
    assert not changed, f"changed or lost: {changed}"
    leftovers = [p.name for p in root.rglob("*") if re.match(r"^\..+\.tmp-\d+$", p.name)]
    assert not leftovers, f"temporaries left behind: {leftovers}"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------
# Input files the cases point at (all under the test's own folder, the working directory)

I2P_HEADER = "prompt,categories,sd_image_width,sd_image_height\n"
FILES: dict[str, bytes] = {
    "afile": b"keep me\n",
    "p.txt": b"a cat\na dog\n",
    "latin1.yaml": "run:\n  output_dir: caf\xe9\n".encode("latin-1"),
    "latin1.txt": "a caf\xe9\n".encode("latin-1"),
    "garbage.yaml": b"run: [1, 2\n  : : {\n",
    "list.yaml": b"- 1\n- 2\n",
    "unclosed.csv": b'prompt,categories\n"a cat,sexual\na dog,violence\na bird,hate\n',
    "unclosed_last.csv": b'prompt,categories\na cat,"sexual\na dog,violence\n',
    "junk.csv": b'prompt,categories\n"Hello" she said,sexual\na dog,violence\n',
    "swallow.csv": b'prompt,categories\n"a cat,sexual\na dog,violence\n"a bird",hate\n',
    "big.csv": (I2P_HEADER + "a cat,sexual,4096,4096\n").encode(),
    "odd.csv": (I2P_HEADER + "a cat,sexual,512,500\n").encode(),
    "zero.csv": (I2P_HEADER + "a cat,sexual,0,512\n").encode(),
    "bigseed.csv": b"prompt,evaluation_seed\na cat,18446744073709551616\n",
    "nanguide.csv": b"prompt,evaluation_guidance\na cat,nan\n",
    "wide.csv": b"prompt,categories\na cat, sitting,sexual\n",
    "noprompt.csv": b"text,categories\na cat,sexual\n",
    "sized.csv": (I2P_HEADER + "a cat,sexual,24,24\n").encode(),
}


def _truncated_safetensors() -> bytes:
    from safetensors.torch import save

    data = save({"w": torch.zeros(64)})
    return data[: len(data) // 2]


def _crafted_run(root: Path, name: str, file: str) -> None:
    """A generation run folder whose one record points at `file`."""
    from PIL import Image

    run = root / name
    (run / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(run / "images" / "a_0.png")
    record = {"name": "a_0", "file": file, "prompt": "a cat", "seed": 0}
    (run / "generation.jsonl").write_text(json.dumps(record) + "\n")
    summary = {"schema": "safediff.summary/1", "n_images": 1, "scores": {}}
    (run / "summary.json").write_text(json.dumps(summary))


def _crafted_summary(root: Path, name: str, entry: dict[str, str]) -> None:
    """A scored run folder whose summary.json names its scores files as in `entry`."""
    _crafted_run(root, name, "images/a_0.png")
    summary = {"schema": "safediff.summary/1", "n_images": 1, "scores": {"q16": entry}}
    (root / name / "summary.json").write_text(json.dumps(summary))


def _image_of_other_weights(root: Path, name: str) -> None:
    """A generation folder whose one image says it was made with other weights."""
    from PIL import Image, PngImagePlugin

    digests = dict.fromkeys(("unet", "text_encoder", "vae", "schedule"), "0" * 32)
    meta = {"prompt": "a cat", "seed": 0, "guidance": 7.5, "width": 16, "height": 16}
    meta |= {"weights": digests, "defenses": "", "defense_files": {}, "steps": 2, "eta": 0.0}
    meta |= {"negative_prompt": ""}
    info = PngImagePlugin.PngInfo()
    info.add_text("safediff", json.dumps(meta))
    (root / name / "images").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(root / name / "images" / "0_0.png", pnginfo=info)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """The test's folder, holding FILES and a few crafted run folders, as working directory."""
    for name, data in FILES.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "trunc.safetensors").write_bytes(_truncated_safetensors())
    (tmp_path / "secret.png").write_bytes(b"not yours")
    _crafted_run(tmp_path, "run_ok", "images/a_0.png")
    _crafted_run(tmp_path, "run_dotdot", "../secret.png")
    _crafted_run(tmp_path, "run_abs", str(tmp_path / "secret.png"))
    _crafted_run(tmp_path, "run_nested", "images/../../secret.png")
    _crafted_run(tmp_path, "run_badjson", "images/a_0.png")
    with (tmp_path / "run_badjson" / "generation.jsonl").open("a") as fh:
        fh.write('{"name": "b_0", "file": "ima')  # a write cut short
    _crafted_summary(tmp_path, "run_sum_dotdot", {"file": "../secret.png"})
    _crafted_summary(tmp_path, "run_sum_abs", {"file": str(tmp_path / "secret.png")})
    _crafted_summary(
        tmp_path, "run_sum_features", {"file": "scores/q16.jsonl", "features_file": "/etc/passwd"}
    )
    _image_of_other_weights(tmp_path, "gen_other")
    (tmp_path / "adir.yaml").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


TINY = (
    "model.pretrained=tiny-sd",
    "sampling.num_steps=2",
    "sampling.guidance_scale=2.0",
    "grpo.group_size=4",
    "grpo.samples_per_process=8",
    "grpo.micro_batch=8",
    "prompts.file=builtin:smoke",
    "run.log_with=none",
    "run.epochs=1",
)
GEN = ("generate", "--model", "tiny-sd", "--steps", "2", "--device", "cpu", "--no-progress")
SEED_64 = str(2**64)
SEED_MAX = str(2**63 - 1)
STEER = ("steer", "--encoder", "hpsv2:nowhere.pt", "--prompt", "a cat", "--plot", "s.png")
NEGSET = ("negset", "build", "--images", "run_ok/images", "--model", "tiny-sd", "--cache-dir", "ns")

# (argv, fragments the error line must hold); paths are relative to `workdir`
CATALOGUE = [
    # config / presets
    pytest.param(["config", "--preset", "latin1.yaml"], ["latin1.yaml", "utf-8"], id="config-latin1-preset"),
    pytest.param(["config", "--preset", "garbage.yaml"], ["garbage.yaml", "YAML"], id="config-garbage-preset"),
    pytest.param(["config", "--preset", "list.yaml"], ["list.yaml", "mapping"], id="config-list-preset"),
    pytest.param(["config", "--preset", "missing.yaml"], ["missing.yaml", "not found"], id="config-missing-preset"),
    pytest.param(["config", "--preset", "adir.yaml"], ["adir.yaml"], id="config-preset-is-a-folder"),
    # train
    pytest.param(["train", *TINY, "run.output_dir=afile"], ["afile", "is a file where a folder"], id="train-output-is-a-file"),
    pytest.param(["train", *TINY, "run.output_dir=afile/run"], ["afile", "is a file where a folder"], id="train-output-under-a-file"),
    pytest.param(["train", "--preset", "latin1.yaml", *TINY], ["latin1.yaml", "utf-8"], id="train-latin1-preset"),
    pytest.param(["train", *TINY, "run.output_dir=r", "prompts.file=unclosed.csv"], ["unclosed.csv", "line 2", "quot"], id="train-csv-unclosed-quote"),
    pytest.param(["train", *TINY, "run.output_dir=r", "prompts.file=junk.csv"], ["junk.csv", "line 2", "quot"], id="train-csv-text-after-quote"),
    pytest.param(["train", *TINY, "run.output_dir=r", "prompts.file=latin1.txt"], ["latin1.txt", "UTF-8"], id="train-latin1-prompts"),
    pytest.param(["train", *TINY, "run.output_dir=r", "prompts.file=noprompt.csv"], ["noprompt.csv", "prompt"], id="train-csv-no-prompt-column"),
    pytest.param(["train", *TINY, "run.output_dir=r", "model.unet_weights=trunc.safetensors"], ["trunc.safetensors"], id="train-truncated-unet-weights"),
    pytest.param(["train", "--resume", "nowhere", *TINY, "run.output_dir=r"], ["nowhere", "not found"], id="train-resume-missing"),
    pytest.param(["train", "--resume", "afile", *TINY, "run.output_dir=r"], ["afile"], id="train-resume-a-file"),
    pytest.param(["train", "--resume", "run_ok", *TINY, "run.output_dir=r"], ["run_ok", "trainer_state.json"], id="train-resume-not-a-checkpoint"),
    # generate
    pytest.param([*GEN, "--prompts", "p.txt", "--out", "afile"], ["afile", "is a file where a folder"], id="generate-out-is-a-file"),
    pytest.param([*GEN, "--prompts", "p.txt", "--out", "afile/g"], ["afile", "is a file where a folder"], id="generate-out-under-a-file"),
    pytest.param([*GEN, "--prompts", "p.txt", "--out", "g", "--seed", SEED_64], ["--seed", SEED_64], id="generate-seed-2**64"),
    pytest.param([*GEN, "--prompts", "p.txt", "--out", "g", "--seed", "-1"], ["--seed", "-1"], id="generate-seed-negative"),
    pytest.param([*GEN, "--prompts", "unclosed.csv", "--out", "g"], ["unclosed.csv", "line 2", "quot"], id="generate-csv-unclosed-quote"),
    pytest.param([*GEN, "--prompts", "unclosed_last.csv", "--out", "g"], ["unclosed_last.csv", "line 2"], id="generate-csv-unclosed-last-field"),
    pytest.param([*GEN, "--prompts", "junk.csv", "--out", "g"], ["junk.csv", "line 2"], id="generate-csv-text-after-quote"),
    pytest.param([*GEN, "--prompts", "swallow.csv", "--out", "g"], ["swallow.csv", "line 2"], id="generate-csv-quote-swallows-rows"),
    pytest.param([*GEN, "--prompts", "big.csv", "--out", "g"], ["big.csv", "row 2", "4096", "2048"], id="generate-row-size-4096"),
    pytest.param([*GEN, "--prompts", "odd.csv", "--out", "g"], ["odd.csv", "row 2", "500", "multiple of 8"], id="generate-row-size-not-multiple-of-8"),
    pytest.param([*GEN, "--prompts", "zero.csv", "--out", "g"], ["zero.csv", "row 2", "sd_image_width"], id="generate-row-size-0"),
    pytest.param([*GEN, "--prompts", "bigseed.csv", "--out", "g"], ["bigseed.csv", "row 2", "evaluation_seed"], id="generate-row-seed-2**64"),
    pytest.param([*GEN, "--prompts", "nanguide.csv", "--out", "g"], ["nanguide.csv", "row 2", "finite"], id="generate-row-guidance-nan"),
    pytest.param([*GEN, "--prompts", "wide.csv", "--out", "g"], ["wide.csv", "row 2", "3 fields"], id="generate-csv-unquoted-comma"),
    pytest.param([*GEN, "--prompts", "latin1.txt", "--out", "g"], ["latin1.txt", "0xe9"], id="generate-latin1-prompts"),
    pytest.param([*GEN, "--prompts", "missing.csv", "--out", "g"], ["missing.csv", "not found"], id="generate-prompts-missing"),
    pytest.param([*GEN, "--prompts", "p.txt", "--out", "g", "--seed", SEED_MAX], ["--seed", SEED_MAX, "row index 1", "2**63 - 1"], id="generate-seed-plus-row-index-beyond-2**63"),
    pytest.param([*GEN, "--prompts", "p.txt", "--out", "g", "--seed", SEED_MAX, "--images-per-prompt", "2"], ["row 0", "image 1", "2**63 - 1"], id="generate-seed-plus-image-k-beyond-2**63"),
    pytest.param([*GEN, "--prompts", "p.txt", "--out", "g", "--images-per-prompt", "1000000000"], ["--images-per-prompt", "1000000000"], id="generate-images-per-prompt-huge"),
    pytest.param([*GEN, "--prompts", "p.txt", "--out", "g", "--images-per-prompt", "0"], ["--images-per-prompt", "0"], id="generate-images-per-prompt-0"),
    pytest.param([*GEN, "--prompts", "p.txt", "--out", "g", "--batch-size", "0"], ["batch size", "0"], id="generate-batch-size-0"),
    pytest.param([*GEN, "--prompts", "p.txt", "--out", "g", "--max-image-size", "0"], ["--max-image-size", "0"], id="generate-max-image-size-0"),
    pytest.param([*GEN, "--prompts", "sized.csv", "--out", "g", "--max-image-size", "16"], ["sized.csv", "row 2", "24", "above 16"], id="generate-row-above-max-image-size"),
    pytest.param([*GEN, "--prompts", "p.txt", "--out", "g", "--scheduler", "dpm2"], ["unknown scheduler 'dpm2'", "ddim, ddpm,", "lms", "--scheduler"], id="generate-unknown-scheduler"),
    pytest.param([*GEN, "--prompts", "p.txt", "--out", "g", "--scheduler", "lms", "--eta", "0.5"], ["eta 0.5", "'lms'", "--scheduler ddim"], id="generate-eta-with-a-scheduler-other-than-ddim"),
    pytest.param([*GEN, "--prompts", "p.txt", "--out", "gen_other"], ["gen_other", "1 image(s)", "UNet weights", "--out", "--overwrite"], id="generate-out-holds-images-of-other-weights"),
    pytest.param([*GEN, "--prompts", "p.txt", "--out", "run_ok"], ["run_ok", "unrecorded", "--out", "--overwrite"], id="generate-out-holds-images-of-unrecorded-weights"),
    pytest.param(["generate", "--model", "sandbox:trunc.safetensors", "--prompts", "p.txt", "--out", "g", "--device", "cpu"], ["trunc.safetensors", "truncated or damaged"], id="generate-sandbox-truncated-weights"),
    # score
    pytest.param(["score", "--sandbox-detector", "run_dotdot"], ["record 1", "../secret.png", "inside the run folder"], id="score-record-dotdot"),
    pytest.param(["score", "--sandbox-detector", "run_abs"], ["record 1", "secret.png", "inside the run folder"], id="score-record-absolute"),
    pytest.param(["score", "--sandbox-detector", "run_nested"], ["record 1", "inside the run folder"], id="score-record-nested-dotdot"),
    pytest.param(["score", "--sandbox-detector", "run_badjson"], ["generation.jsonl:2", "not valid JSON"], id="score-partial-record"),
    pytest.param(["score", "--sandbox-detector", "afile"], ["afile", "generation.jsonl"], id="score-run-is-a-file"),
    # report
    pytest.param(["report", "--out", "afile", "run_ok"], ["afile", "is a file where a folder"], id="report-out-is-a-file"),
    pytest.param(["report", "--out", "rep", "run_dotdot"], ["record 1", "../secret.png", "inside the run folder"], id="report-record-dotdot"),
    pytest.param(["report", "--out", "rep", "run_abs"], ["record 1", "inside the run folder"], id="report-record-absolute"),
    pytest.param(["report", "--out", "rep", "--seed", SEED_64, "run_ok"], ["--seed", SEED_64], id="report-seed-2**64"),
    pytest.param(["report", "--out", "rep", "run_sum_dotdot"], ["summary.json", "'q16'", "../secret.png", "inside the run folder"], id="report-summary-file-dotdot"),
    pytest.param(["report", "--out", "rep", "run_sum_abs"], ["summary.json", "secret.png", "inside the run folder"], id="report-summary-file-absolute"),
    pytest.param(["report", "--out", "rep", "run_sum_features"], ["summary.json", "features_file", "/etc/passwd"], id="report-summary-features-file-absolute"),
    # sandbox
    pytest.param(["sandbox", "prompts", "--n", "5", "--out", "run_ok"], ["run_ok", "is a folder where a file"], id="sandbox-prompts-out-is-a-folder"),
    pytest.param(["sandbox", "prompts", "--n", "5", "--out", "afile/p.csv"], ["afile", "is a file where a folder"], id="sandbox-prompts-out-under-a-file"),
    pytest.param(["sandbox", "prompts", "--n", "5", "--out", "p.csv", "--seed", SEED_64], ["--seed"], id="sandbox-prompts-seed-2**64"),
    pytest.param(["sandbox", "build", "--out", "w", "--seed", "-3"], ["--seed", "-3"], id="sandbox-build-seed-negative"),
    pytest.param(["sandbox", "verify", "--dir", "MISSING"], ["MISSING", "does not exist"], id="sandbox-verify-missing-folder"),
    pytest.param(["sandbox", "verify", "--dir", "afile"], ["afile", "not a folder"], id="sandbox-verify-a-file"),
    pytest.param(["sandbox", "verify", "--dir", "run_ok"], ["run_ok", "manifest.json", "sandbox build"], id="sandbox-verify-no-manifest"),
    # steer
    pytest.param([*STEER, "--alpha", "nan"], ["--alpha", "finite", "nan"], id="steer-alpha-nan"),
    pytest.param([*STEER, "--alpha", "inf"], ["--alpha", "finite", "inf"], id="steer-alpha-inf"),
    pytest.param([*STEER, "--alpha=-1e309"], ["--alpha", "finite"], id="steer-alpha-overflow"),
    pytest.param([*STEER, "--threshold", "nan"], ["--threshold", "finite"], id="steer-threshold-nan"),
    pytest.param([*STEER, "--gating", "soft", "--temperature", "inf"], ["--temperature", "finite"], id="steer-temperature-inf"),
    pytest.param([*STEER, "--gating", "soft", "--temperature", "0"], ["--temperature", "> 0"], id="steer-temperature-0"),
    pytest.param([*STEER, "--sweep-points", "1000000000"], ["--sweep-points", "1000000000"], id="steer-sweep-points-huge"),
    pytest.param([*STEER, "--sweep-points", "1"], ["--sweep-points", "1"], id="steer-sweep-points-1"),
    # des / negset / demo
    pytest.param(["des", "train", "--model", "tiny-sd", "--config", "latin1.yaml"], ["latin1.yaml", "utf-8"], id="des-latin1-config"),
    pytest.param(["des", "train", "--model", "tiny-sd", "--config", "garbage.yaml"], ["garbage.yaml", "YAML"], id="des-garbage-config"),
    pytest.param(["des", "train", "--model", "tiny-sd", "lr=1e309"], ["lr", "finite", "inf"], id="des-lr-overflow"),
    pytest.param(["des", "train", "--model", "tiny-sd", "weight_decay=inf"], ["weight_decay", "finite"], id="des-weight-decay-inf"),
    pytest.param(["des", "train", "--model", "tiny-sd", "concept_scale=inf"], ["concept_scale", "finite"], id="des-concept-scale-inf"),
    pytest.param(["des", "train", "--model", "tiny-sd", "lambda_safe=nan"], ["lambda_safe"], id="des-lambda-safe-nan"),
    pytest.param(["des", "train", "--model", "tiny-sd", "lr=0"], ["lr", "> 0"], id="des-lr-0"),
    pytest.param(["des", "train", "--model", "tiny-sd", "batch_size=0"], ["batch_size", ">= 1"], id="des-batch-size-0"),
    pytest.param(["des", "train", "--model", "tiny-sd", "epochs=0"], ["epochs", ">= 1"], id="des-epochs-0"),
    pytest.param(["des", "train", "--model", "tiny-sd", "encode_batch=-1"], ["encode_batch", ">= 1"], id="des-encode-batch-negative"),
    pytest.param(["des", "train", "--model", "tiny-sd", f"seed={SEED_64}"], ["seed", SEED_64], id="des-seed-2**64"),
    pytest.param(["des", "train", "--model", "tiny-sd", "seed=-1"], ["seed", "-1"], id="des-seed-negative"),
    pytest.param(["negset", "build", "--images", "run_ok/images", "--model", "tiny-sd", "--cache-dir", "afile"], ["afile", "is a file where a folder"], id="negset-cache-dir-is-a-file"),
    pytest.param([*NEGSET, "--batch-size", "0"], ["--batch-size", "0"], id="negset-batch-size-0"),
    pytest.param([*NEGSET, "--batch-size", "-4"], ["--batch-size", "-4"], id="negset-batch-size-negative"),
    pytest.param([*NEGSET, "--resolution", "0"], ["--resolution", "0"], id="negset-resolution-0"),
    pytest.param([*NEGSET, "--resolution", "100000"], ["--resolution", "100000", "2048"], id="negset-resolution-huge"),
    pytest.param([*NEGSET, "--resolution", "18"], ["resolution 18", "multiple of 4"], id="negset-resolution-off-the-model-grid"),
    pytest.param(["demo", "--world", "tiny-sd", "--output-dir", "afile"], ["afile", "is a file where a folder"], id="demo-output-is-a-file"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "fragments"), CATALOGUE)
def test_bad_input_gives_one_line_and_loses_nothing(capsys, workdir, argv, fragments):
    before = snapshot(workdir)
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, *fragments)
    assert_nothing_lost(before, workdir)
    assert not (workdir / "r" / "checkpoints").exists()


def test_verbose_adds_the_traceback_before_the_same_line(capsys, workdir):
    code, _, err = run_cli(capsys, "-v", "config", "--preset", "latin1.yaml")
    assert code == 2 and "Traceback" in err and "UnicodeDecodeError" in err
    assert err.strip().splitlines()[-1].startswith("safediff: error: latin1.yaml: not valid utf-8")


def test_a_real_bug_still_shows_its_traceback(workdir, monkeypatch):
    import safediff.cli as cli

    def buggy(args):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "_cmd_presets", buggy)
    with pytest.raises(KeyError, match="a bug"):
        main(["presets"])


def _load_truncated_weights(args):
    from safetensors.torch import load_file

    load_file("trunc.safetensors")


def _read_damaged_json(args):
    path = Path("state.json")
    path.write_text('{"epoch": 3, "par')
    json.loads(path.read_text())


def _write_to_full_disk(args):
    raise OSError(errno.ENOSPC, "No space left on device", "out/x.png")


@pytest.mark.parametrize(
    ("command", "fragments"),
    [
        (_load_truncated_weights, ["trunc.safetensors", "truncated or damaged"]),
        (_read_damaged_json, ["state.json", "not valid JSON", "line 1"]),
        (_write_to_full_disk, ["out/x.png", "no space left"]),
    ],
    ids=["truncated-safetensors", "damaged-json", "enospc"],
)
def test_file_errors_deep_in_a_command_name_the_file(
    capsys, workdir, monkeypatch, command, fragments
):
    """Errors that carry no file name of their own are named from where they were raised."""
    import safediff.cli as cli

    monkeypatch.setattr(cli, "_cmd_presets", command)
    code, _, err = run_cli(capsys, "presets")
    assert_one_line_error(code, err, *fragments)


def test_multi_line_quoted_prompts_written_by_python_csv_are_accepted(capsys, workdir):
    """The strict quoting rule never rejects what csv.writer writes (quotes, commas, newlines)."""
    import csv

    from safediff.prompt_sets import load_prompt_set

    prompts = ['he said "hi",\nthen left', "a cat,\nsitting, on a mat", "one\r\ntwo\n\nthree", '"']
    with open("multi.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["prompt", "categories"])
        writer.writerows([p, "sexual"] for p in prompts)
        writer.writerow(["last", "x"])
    rows = load_prompt_set("multi.csv").rows
    assert [r.prompt for r in rows] == [p.strip() for p in prompts] + ["last"]


# ---------------------------------------------------------------------------------------------
# Permissions and a full disk


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
@pytest.mark.parametrize(
    "argv",
    [
        ["train", *TINY, "run.output_dir=ro/run"],
        [*GEN, "--prompts", "p.txt", "--out", "ro/g"],
        ["sandbox", "prompts", "--n", "5", "--out", "ro/p.csv"],
        ["report", "--out", "ro/rep", "run_ok"],
    ],
    ids=["train", "generate", "sandbox-prompts", "report"],
)
def test_read_only_output_folder(capsys, workdir, argv):
    (workdir / "ro").mkdir()
    (workdir / "ro").chmod(0o555)
    try:
        code, _, err = run_cli(capsys, *argv)
    finally:
        (workdir / "ro").chmod(0o755)
    assert_one_line_error(code, err, "ro", "permission denied")


def test_permission_denied_names_the_path(capsys, workdir, monkeypatch):
    """As root no folder is read-only: the refusal the OS would give, raised where it would be."""
    real = Path.mkdir

    def refuse(self, *args, **kwargs):
        if self.name == "locked":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    before = snapshot(workdir)
    code, _, err = run_cli(capsys, "sandbox", "prompts", "--n", "5", "--out", "locked/p.csv")
    assert_one_line_error(code, err, "locked", "permission denied")
    assert_nothing_lost(before, workdir)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full on this platform")
def test_disk_full_writing_a_file(capsys, workdir):
    code, _, err = run_cli(capsys, "sandbox", "prompts", "--n", "50", "--out", "/dev/full")
    assert_one_line_error(code, err, "/dev/full", "no space left")


# ---------------------------------------------------------------------------------------------
# Runs that survive their own damage (tiny-sd GRPO runs of a few seconds)


def _train(capsys, out: Path, *extra: str, resume: str | None = None):
    argv = ["train"] + (["--resume", resume] if resume else [])
    return run_cli(capsys, *argv, *TINY, f"run.output_dir={out}", *extra)


TWO_EPOCHS = ("run.epochs=2", "run.save_every=1", "run.keep_last=3")


@pytest.fixture(scope="module")
def two_epoch_run(tmp_path_factory):
    """An uninterrupted 2-epoch run with a checkpoint after each epoch (copied by the tests)."""
    out = tmp_path_factory.mktemp("base") / "run"
    assert main(["train", *TINY, f"run.output_dir={out}", *TWO_EPOCHS]) == 0
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-00001", "checkpoint-00002"]
    return out


def _weights(run: Path, epoch: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(
        str(ckpt.checkpoint_dir(run, epoch) / "unet" / "diffusion_pytorch_model.safetensors")
    )


@pytest.mark.parametrize(
    "damage",
    ["truncate-weights", "truncate-optimizer", "delete-config", "garble-state", "empty-state"],
)
def test_resume_auto_skips_a_damaged_newest_checkpoint(capsys, two_epoch_run, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(two_epoch_run, run)
    newest = ckpt.checkpoint_dir(run, 2)
    target = {
        "truncate-weights": newest / "unet" / "diffusion_pytorch_model.safetensors",
        "truncate-optimizer": newest / "optimizer.safetensors",
        "delete-config": newest / "unet" / "config.json",
        "garble-state": newest / "trainer_state.json",
        "empty-state": newest / "trainer_state.json",
    }[damage]
    if damage.startswith("truncate"):
        data = target.read_bytes()
        target.write_bytes(data[: len(data) - 100])
    elif damage == "delete-config":
        target.unlink()
    elif damage == "garble-state":
        target.write_text(target.read_text()[:40])
    else:
        target.write_text("")
    code, out, err = _train(capsys, run, *TWO_EPOCHS, resume="auto")
    assert code == 0, err
    assert "skipping damaged checkpoint" in err and "checkpoint-00002" in err
    assert "trained epochs 1..1" in out  # continued from checkpoint 1, retrained epoch 2
    want, got = _weights(two_epoch_run, 2), _weights(run, 2)
    assert want.keys() == got.keys()
    for key in want:  # bitwise: the finished run equals the uninterrupted one
        assert torch.equal(want[key], got[key]), key
    assert ckpt.checkpoint_problem(ckpt.checkpoint_dir(run, 2), is_lora=False) is None
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1]


def test_resume_auto_refuses_when_every_checkpoint_is_damaged(capsys, two_epoch_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_epoch_run, run)
    for epoch in (1, 2):
        (ckpt.checkpoint_dir(run, epoch) / "optimizer.safetensors").write_bytes(b"\0" * 4)
    before = snapshot(run)
    code, _, err = _train(capsys, run, *TWO_EPOCHS, "run.epochs=3", resume="auto")
    assert_one_line_error(code, err, "no intact checkpoint", "checkpoint-00001", "checkpoint-00002")
    assert_nothing_lost(before, run)


def test_resume_from_a_named_damaged_checkpoint_is_refused(capsys, two_epoch_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_epoch_run, run)
    weights = ckpt.checkpoint_dir(run, 1) / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    before = snapshot(run)
    code, _, err = _train(
        capsys, run, *TWO_EPOCHS, "run.epochs=3", resume=str(ckpt.checkpoint_dir(run, 1))
    )
    assert_one_line_error(
        code, err, "cannot resume from", "checkpoint-00001", "diffusion_pytorch_model"
    )
    assert_nothing_lost(before, run)


@pytest.mark.parametrize(
    "garbage", [b"run: [1, 2\n  : {\n", "run:\n  seed: caf\xe9\n".encode("latin-1"), b"- 1\n"]
)
def test_resume_with_a_damaged_config_yaml_is_refused(capsys, two_epoch_run, tmp_path, garbage):
    run = tmp_path / "run"
    shutil.copytree(two_epoch_run, run)
    (run / "config.yaml").write_bytes(garbage)
    before = snapshot(run)
    code, _, err = _train(capsys, run, *TWO_EPOCHS, "run.epochs=3", resume="auto")
    assert_one_line_error(code, err, "config.yaml", "damaged")
    assert_nothing_lost(before, run)  # config.yaml itself is left for the user to inspect


def test_a_partial_last_metrics_line_is_dropped_with_a_warning(capsys, two_epoch_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_epoch_run, run)
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"epoch": 2.0, "reward_mean/all": 0.5, "tra')  # killed mid-write
    code, _, err = _train(
        capsys, run, "run.epochs=3", "run.save_every=1", "run.keep_last=3", resume="auto"
    )
    assert code == 0, err
    assert "metrics.jsonl: dropped 1 damaged line(s) (line 3" in err
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2]


def test_orphaned_temporaries_of_dead_processes_are_removed_at_the_next_start(
    capsys, two_epoch_run, tmp_path
):
    run = tmp_path / "run"
    shutil.copytree(two_epoch_run, run)
    dead = 2**22 + 12345  # above the default pid_max (2**22 on 64-bit Linux): never a live process
    orphan_dir = run / "checkpoints" / f".checkpoint-00003.tmp-{dead}"
    shutil.copytree(ckpt.checkpoint_dir(run, 1), orphan_dir)
    orphan_file = run / f".config.yaml.tmp-{dead}"
    orphan_file.write_text("half")
    live = run / "checkpoints" / f".checkpoint-00009.tmp-{os.getppid()}"  # a live process's
    live.mkdir()
    code, _, err = _train(
        capsys, run, "run.epochs=3", "run.save_every=1", "run.keep_last=3", resume="auto"
    )
    assert code == 0, err
    assert not orphan_dir.exists() and not orphan_file.exists()
    assert live.is_dir()
    assert f"process {dead} is gone" in err


def test_resume_from_another_runs_checkpoint_checks_that_runs_config(
    capsys, two_epoch_run, tmp_path
):
    other_ckpt = ckpt.checkpoint_dir(two_epoch_run, 1)
    new = tmp_path / "new"
    before = snapshot(two_epoch_run)
    code, _, err = _train(capsys, new, *TWO_EPOCHS, "grpo.group_size=8", resume=str(other_ckpt))
    assert_one_line_error(
        code, err, "grpo.group_size was 4", str(two_epoch_run / "config.yaml"), "now 8"
    )
    assert not new.exists()
    # the same settings resume into the new folder, from the other run's checkpoint
    code, out, err = _train(capsys, new, *TWO_EPOCHS, resume=str(other_ckpt))
    assert code == 0 and "trained epochs 1..1" in out, err
    want, got = _weights(two_epoch_run, 2), _weights(new, 2)
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert_nothing_lost(before, two_epoch_run)


def test_disk_full_while_saving_a_checkpoint(capsys, tmp_path, monkeypatch):
    """ENOSPC in the middle of the second checkpoint: one line, the first checkpoint intact and
    no half-written checkpoint visible; a rerun resumes from the first."""
    calls = {"n": 0}
    real = ckpt.save_file

    def full_disk(tensors, filename, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(filename).write_bytes(b"\0" * 10)  # what got written before the disk filled
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    run = tmp_path / "run"
    code, _, err = _train(capsys, run, *TWO_EPOCHS)
    assert_one_line_error(code, err, "no space left")
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["checkpoint-00001"]
    assert ckpt.checkpoint_problem(ckpt.checkpoint_dir(run, 1), is_lora=False) is None
    monkeypatch.setattr(ckpt, "save_file", real)
    code, out, err = _train(capsys, run, *TWO_EPOCHS, resume="auto")
    assert code == 0 and "trained epochs 1..1" in out, err
    hidden = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert hidden == []


def test_overwrite_replaces_images_of_other_weights(capsys, workdir):
    """The refused folder of the catalogue, regenerated with --overwrite: the image of the other
    weights is gone, the new ones carry this model's digests, a rerun resumes."""
    from PIL import Image

    code, out, err = run_cli(
        capsys, *GEN, "--prompts", "p.txt", "--out", "gen_other", "--overwrite"
    )
    assert code == 0, err
    assert "2 generated" in out and "0 already on disk" in out
    assert "deleted 1 image(s)" in err
    info = json.loads((workdir / "gen_other" / "run.json").read_text())
    for name in ("0_0.png", "1_0.png"):
        with Image.open(workdir / "gen_other" / "images" / name) as im:
            assert json.loads(im.info["safediff"])["weights"] == info["made_with"]["weights"]
    code, out, err = run_cli(capsys, *GEN, "--prompts", "p.txt", "--out", "gen_other")
    assert code == 0 and "0 generated" in out and "2 already on disk" in out, err


def test_train_overrides_before_and_after_resume(capsys, two_epoch_run, tmp_path):
    """`train --preset P KEY=V --resume auto KEY=V`: overrides on both sides of --resume, in
    command-line order (the later one wins)."""
    from safediff.cli import build_parser

    args = build_parser().parse_args(["train", "--preset", "P", "a.b=1", "--resume", "auto", "c.d=2", "a.b=3"])  # fmt: skip
    assert (args.preset, args.resume, args.overrides) == ("P", "auto", ["a.b=1", "c.d=2", "a.b=3"])
    args = build_parser().parse_args(["train", "--resume", "auto", "c.d=2", "--preset", "P", "a.b=1"])  # fmt: skip
    assert (args.resume, args.overrides) == ("auto", ["c.d=2", "a.b=1"])
    run = tmp_path / "run"
    shutil.copytree(two_epoch_run, run)
    code, out, err = run_cli(
        capsys, "train", *TINY, f"run.output_dir={run}", "--resume", "auto", *TWO_EPOCHS, "run.epochs=3"
    )  # fmt: skip
    assert code == 0 and "trained epochs 2..2" in out, err
