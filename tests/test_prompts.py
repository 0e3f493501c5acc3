"""Loading training prompts (builtin lists, text files, CSV files) and drawing epoch prompts."""

import logging
from collections import Counter

import pytest
import torch

from safediff.errors import SafediffError
from safediff.prompts import (
    builtin_names,
    kind_schedule,
    load_prompt_kinds,
    load_prompt_labels,
    load_prompts,
    prompt_strata,
    sample_prompts,
    sample_prompts_stratified,
)


def test_builtin_smoke():
    prompts = load_prompts("builtin:smoke")
    assert len(prompts) == 16 and len(set(prompts)) == 16
    assert all(p == p.strip() and p and not p.startswith("#") for p in prompts)
    assert "smoke" in builtin_names()


def test_unknown_builtin_lists_builtins():
    with pytest.raises(
        SafediffError, match=r"unknown builtin prompt list 'nope'; builtins: .*smoke"
    ):
        load_prompts("builtin:nope")


def test_text_file_skips_blanks_and_comments(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text(
        "# header comment\n a cat  \n\n   \n  # indented comment\r\na dog\r\nsalt # and pepper\n",
        encoding="utf-8",
    )
    assert load_prompts(str(f)) == ["a cat", "a dog", "salt # and pepper"]


def test_text_file_keeps_unicode_and_bom(tmp_path):
    f = tmp_path / "u.txt"
    f.write_bytes("\ufeffcafé au lait\n東京の夜景\n".encode())
    assert load_prompts(str(f)) == ["café au lait", "東京の夜景"]


def test_missing_file_and_folder(tmp_path):
    missing = tmp_path / "none.txt"
    with pytest.raises(SafediffError, match=r"prompt file not found: .*none\.txt"):
        load_prompts(str(missing))
    with pytest.raises(SafediffError, match="is a folder"):
        load_prompts(str(tmp_path))


def test_non_utf8_reports_line_and_offset(tmp_path):
    f = tmp_path / "latin1.txt"
    data = b"first\nsecond\ncaf\xe9\n"
    f.write_bytes(data)
    with pytest.raises(SafediffError) as err:
        load_prompts(str(f))
    msg = str(err.value)
    offset = data.index(b"\xe9")
    assert "latin1.txt" in msg and "line 3" in msg and f"byte offset {offset}" in msg
    assert "\n" not in msg


def test_empty_after_filtering(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("# only comments\n\n   \n", encoding="utf-8")
    with pytest.raises(SafediffError, match=r"no prompts in .*empty\.txt"):
        load_prompts(str(f))


def test_csv_prompt_column(tmp_path):
    f = tmp_path / "i2p.csv"
    f.write_text(
        'case_number,prompt,evaluation_seed\n0,"a dog, running",1\n1,  a cat ,2\n'
        '2,"two\nlines",3\n',
        encoding="utf-8",
    )
    assert load_prompts(str(f)) == ["a dog, running", "a cat", "two\nlines"]


def test_csv_with_adv_prompt_reads_like_the_evaluation_loader(tmp_path):
    # one CSV convention for training and evaluation: an adv_prompt column marks an
    # MMA-Diffusion file, whose prompt is the adversarial one
    from safediff.prompt_sets import load_prompt_set

    f = tmp_path / "both.csv"
    f.write_text("adv_prompt,prompt\nadv,clean\n", encoding="utf-8")
    assert load_prompts(str(f)) == [r.prompt for r in load_prompt_set(f).rows] == ["adv"]


def test_csv_adv_prompt_column(tmp_path):
    f = tmp_path / "mma.CSV"
    f.write_text("adv_prompt,target_prompt,clean_prompt\nx y z,t,c\nq r,t,c\n", encoding="utf-8")
    assert load_prompts(str(f)) == ["x y z", "q r"]


def test_csv_without_prompt_column_names_columns(tmp_path):
    f = tmp_path / "bad.csv"
    f.write_text("text,seed\nhello,1\n", encoding="utf-8")
    with pytest.raises(SafediffError, match=r"bad\.csv: no prompt column .*'adv_prompt'.*; "
                       r"columns found: 'text', 'seed'"):  # fmt: skip
        load_prompts(str(f))


def test_csv_empty_rows_skipped_with_warning(tmp_path, caplog):
    f = tmp_path / "gaps.csv"
    f.write_text("prompt,seed\na boat,1\n,2\n  ,3\na tree,4\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        assert load_prompts(str(f)) == ["a boat", "a tree"]
    # one warning with the count and the rows (numbered with the header as row 1)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1
    assert "skipped 2 row(s)" in messages[0] and "row 3" in messages[0] and "row 4" in messages[0]
    assert "gaps.csv" in messages[0]


def test_csv_short_rows_and_all_empty(tmp_path, caplog):
    f = tmp_path / "short.csv"
    f.write_text("seed,prompt\n1\n2,\n", encoding="utf-8")
    with (
        caplog.at_level(logging.WARNING, logger="safediff.prompts"),
        pytest.raises(SafediffError, match=r"no prompts in .*short\.csv"),
    ):
        load_prompts(str(f))
    assert "skipped 2 row(s)" in caplog.records[0].getMessage()
    header_only = tmp_path / "header.csv"
    header_only.write_text("prompt\n", encoding="utf-8")
    with pytest.raises(SafediffError, match="no prompts in"):
        load_prompts(str(header_only))
    empty = tmp_path / "empty.csv"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(SafediffError, match="no prompts in"):
        load_prompts(str(empty))


def test_csv_non_utf8(tmp_path):
    f = tmp_path / "latin.csv"
    f.write_bytes(b"prompt\nna\xefve\n")
    with pytest.raises(SafediffError, match=r"latin\.csv: not valid utf-8.*line 2, byte offset 9"):
        load_prompts(str(f))


# ---------------------------------------------------------------------------------------------
# sample_prompts


def test_sample_prompts_reproducible_and_in_range():
    prompts = [f"p{i}" for i in range(5)]
    a = sample_prompts(prompts, 200, torch.Generator().manual_seed(3))
    b = sample_prompts(prompts, 200, torch.Generator().manual_seed(3))
    c = sample_prompts(prompts, 200, torch.Generator().manual_seed(4))
    assert a == b and a != c
    assert all(isinstance(i, int) and 0 <= i < 5 for i in a)
    # with replacement: 200 draws from 5 hit every index and repeat them
    counts = Counter(a)
    assert set(counts) == set(range(5)) and max(counts.values()) > 1
    # the same as torch.randint with that generator
    ref = torch.randint(0, 5, (200,), generator=torch.Generator().manual_seed(3)).tolist()
    assert a == ref


def test_sample_prompts_edge_cases():
    g = torch.Generator().manual_seed(0)
    assert sample_prompts(["only"], 3, g) == [0, 0, 0]
    assert sample_prompts(["a", "b"], 0, g) == []
    with pytest.raises(SafediffError):
        sample_prompts([], 2, g)
    with pytest.raises(ValueError):
        sample_prompts(["a"], -1, g)


def test_kind_schedule_keeps_every_prefix_within_one_slot_of_the_shares():
    shares = [("safe", 0.4), ("explicit", 0.15), ("implicit", 0.12), ("synonym", 0.12),
              ("negation", 0.12), ("keyword_minimal", 0.09)]  # fmt: skip
    whole = kind_schedule(shares, 0, 500)
    held = Counter()
    for t, kind in enumerate(whole, start=1):
        held[kind] += 1
        for name, share in shares:
            assert abs(held[name] - share * t) < 1, (t, name)
    # epochs of 8 slots concatenate to the same schedule; unnormalised shares give the same
    epochs = [kind_schedule(shares, 8 * e, 8) for e in range(10)]
    assert [kind for epoch in epochs for kind in epoch] == whole[:80]
    assert kind_schedule([(k, 100 * v) for k, v in shares], 24, 8) == whole[24:32]
    # two kinds at 3:1 by hand: deficits pick a, a, b, a, then repeat
    assert kind_schedule([("a", 3), ("b", 1)], 0, 8) == ["a", "a", "b", "a"] * 2
    with pytest.raises(ValueError):
        kind_schedule([("a", 0.0)], 0, 1)
    with pytest.raises(ValueError):
        kind_schedule([("a", 1.0)], -1, 1)


def test_sample_prompts_stratified_draws_each_kind_its_share():
    kinds = ["safe"] * 6 + ["unsafe"] * 3 + ["negation"] * 3  # shares 1/2, 1/4, 1/4
    gen = torch.Generator().manual_seed(5)
    draws = [sample_prompts_stratified(kinds, 8, gen, start=8 * e) for e in range(20)]
    for epoch in draws:
        assert Counter(kinds[i] for i in epoch) == {"safe": 4, "unsafe": 2, "negation": 2}
    # within a kind, uniform with replacement: every prompt of a kind appears
    assert {i for epoch in draws for i in epoch} == set(range(len(kinds)))
    a = sample_prompts_stratified(kinds, 8, torch.Generator().manual_seed(1), start=8)
    b = sample_prompts_stratified(kinds, 8, torch.Generator().manual_seed(1), start=8)
    c = sample_prompts_stratified(kinds, 8, torch.Generator().manual_seed(2), start=8)
    assert a == b and a != c
    with pytest.raises(SafediffError):
        sample_prompts_stratified([], 2, gen)


def test_prompt_kinds_from_a_kind_column_or_all(tmp_path):
    from safediff.prompts import load_prompt_kinds

    f = tmp_path / "mixed.csv"
    f.write_text("prompt,kind\na tree,safe\na skull,unsafe\na boat,\n", encoding="utf-8")
    assert load_prompt_kinds(str(f)) == (["a tree", "a skull", "a boat"], ["safe", "unsafe", "all"])
    t = tmp_path / "plain.txt"
    t.write_text("one\ntwo\n", encoding="utf-8")
    assert load_prompt_kinds(str(t)) == (["one", "two"], ["all", "all"])
    assert load_prompt_kinds("builtin:smoke")[0] == load_prompts("builtin:smoke")


def test_prompt_families_from_categories_or_the_sandbox_grammar(tmp_path):
    f = tmp_path / "i2p.csv"
    f.write_text(
        'prompt,categories\na knife fight,violence\na nude with a gun,"sexual, violence"\na tree,\n',
        encoding="utf-8",
    )
    prompts, kinds, families = load_prompt_labels(str(f))
    assert prompts == ["a knife fight", "a nude with a gun", "a tree"]
    assert kinds == ["all"] * 3 and families == ["violence", "sexual+violence", None]
    assert load_prompt_labels("builtin:smoke")[2] == [None] * 16
    from safediff.sandbox.captions import make_split

    examples = make_split("grpo_train", 60, seed=0)
    prompts, kinds, families = load_prompt_labels("sandbox:grpo_train:60")
    assert families == [e.metadata["family"] for e in examples]
    assert {f for k, f in zip(kinds, families, strict=True) if k == "explicit"} <= {
        "weapon",
        "skull",
        "fire",
    }  # the held-out family is not in grpo_train
    assert all(f is None for k, f in zip(kinds, families, strict=True) if k == "safe")


def test_prompt_strata_by_kind_or_kind_and_family():
    kinds = ["safe", "explicit", "explicit", "negation"]
    families = [None, "fire", "skull", None]
    assert prompt_strata(kinds, families, "kind") == kinds
    assert prompt_strata(kinds, families, "kind_family") == [
        "safe",
        "explicit/fire",
        "explicit/skull",
        "negation",
    ]
    with pytest.raises(ValueError, match="by must be"):
        prompt_strata(kinds, families, "family")
    with pytest.raises(ValueError, match="3 kinds for 4 families"):
        prompt_strata(kinds[:3], families, "kind")


def test_stratifying_on_kind_and_family_gives_each_family_its_share():
    """With the sandbox's GRPO split, uniform draws within 'explicit' leave one family with 2 of
    a run's explicit prompts at one seed and 6 at another; stratified on (kind, family) every
    trained family gets the same count at every seed."""
    _, kinds, families = load_prompt_labels("sandbox:grpo_train")
    strata = prompt_strata(kinds, families, "kind_family")
    counts = {}
    for seed in range(4):
        drawn = Counter()
        for epoch in range(8):
            gen = torch.Generator().manual_seed(1000 * seed + epoch)
            picks = sample_prompts_stratified(strata, 8, gen, start=8 * epoch)
            drawn.update((kinds[i], families[i]) for i in picks if kinds[i] == "explicit")
        counts[seed] = drawn
    for drawn in counts.values():
        assert drawn == {
            ("explicit", "weapon"): 3,
            ("explicit", "skull"): 3,
            ("explicit", "fire"): 3,
        }


def test_sandbox_split_spec_gives_grammar_captions_with_their_kinds():
    from safediff.sandbox.captions import KINDS, make_split

    prompts, kinds = load_prompt_kinds("sandbox:grpo_train:50")
    assert prompts == [e.caption for e in make_split("grpo_train", 50, seed=0)]
    assert len(kinds) == 50 and set(kinds) <= set(KINDS) and "safe" in kinds
    assert load_prompts("sandbox:eval:7") == [e.caption for e in make_split("eval", 7, seed=0)]
    assert len(load_prompts("sandbox:grpo_train")) == 2000


@pytest.mark.parametrize(
    "spec", ["sandbox:nope", "sandbox:eval:0", "sandbox:eval:x", "sandbox:eval:3:4"]
)
def test_bad_sandbox_spec_is_a_one_line_error(spec):
    with pytest.raises(SafediffError, match="sandbox prompt spec"):
        load_prompts(spec)
