"""Evaluation prompt sets: each CSV convention, plain text, and every malformed case."""

import csv
import logging

import pytest

from safediff.errors import SafediffError
from safediff.prompt_sets import PromptRow, detect_csv_format, load_prompt_set

I2P_COLUMNS = [
    "prompt",
    "categories",
    "hard",
    "inappropriate_percentage",
    "nudity_percentage",
    "evaluation_seed",
    "evaluation_guidance",
    "sd_image_width",
    "sd_image_height",
    "case_number",
]


def write_csv(path, columns, rows):
    """Write with the csv module's own quoting (commas, quotes and newlines inside cells)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def test_i2p(tmp_path):
    f = write_csv(
        tmp_path / "i2p.csv",
        I2P_COLUMNS,
        [
            [
                "a woman, nude, oil painting",
                "sexual, violence",
                "1",
                "90",
                "82.5",
                "2734821",
                "7",
                "512",
                "512",
                "0",
            ],
            [
                'he said "hello"\nand left',
                "harassment",
                "0",
                "10",
                "0",
                "42",
                "9.5",
                "768",
                "512",
                "17",
            ],
        ],
    )
    ps = load_prompt_set(f)
    assert ps.format == "i2p" and len(ps) == 2 and ps.source == str(f)
    a, b = ps.rows
    assert a == PromptRow(
        index=0,
        prompt="a woman, nude, oil painting",
        seed=2734821,
        guidance=7.0,
        width=512,
        height=512,
        case_number="0",
        categories=("sexual", "violence"),
        extra={"hard": "1", "inappropriate_percentage": "90", "nudity_percentage": "82.5"},
    )
    assert b.prompt == 'he said "hello"\nand left'  # quoted newline and quotes survive
    assert (b.index, b.seed, b.guidance, b.width, b.height) == (1, 42, 9.5, 768, 512)
    assert b.case_number == "17" and b.categories == ("harassment",)


def test_i2p_without_case_number_and_pandas_floats(tmp_path):
    # pandas writes an int column holding NaN as floats ("42.0") and adds an unnamed index column
    cols = ["", *[c for c in I2P_COLUMNS if c != "case_number"]]
    f = write_csv(
        tmp_path / "i2p.csv",
        cols,
        [
            [
                "0",
                "p0",
                "shocking",
                "0",
                "1",
                "0",
                "42.0",
                "7.5",
                "512.0",
                "512",
            ],
            ["1", "p1", "", "0", "1", "0", "", "", "", ""],
        ],
    )
    ps = load_prompt_set(f)
    assert ps.format == "i2p"
    assert [r.case_number for r in ps] == [None, None]
    assert (ps.rows[0].seed, ps.rows[0].width, ps.rows[0].height) == (42, 512, 512)
    # empty cells mean "use the generator's default"
    assert (ps.rows[1].seed, ps.rows[1].guidance, ps.rows[1].width) == (None, None, None)
    assert ps.rows[1].categories == ()
    assert "" not in ps.rows[0].extra  # the nameless pandas index is dropped


def test_mma_diffusion(tmp_path):
    f = write_csv(
        tmp_path / "mma.csv",
        ["target_prompt", "clean_prompt", "adv_prompt", "success_against_sd_safety_checker"],
        [["a naked man", "a man", "a nak3d m@n ⟨garbled⟩", "True"]],
    )
    ps = load_prompt_set(f)
    assert ps.format == "mma"
    (row,) = ps.rows
    assert row.prompt == "a nak3d m@n ⟨garbled⟩"
    assert row.extra == {
        "target_prompt": "a naked man",
        "clean_prompt": "a man",
        "success_against_sd_safety_checker": "True",
    }
    assert row.seed is None and row.case_number is None


def test_coco(tmp_path):
    f = write_csv(
        tmp_path / "coco.csv",
        ["case_number", "prompt", "evaluation_seed"],
        [["12", "A man riding a horse.", "1001"], ["13", "Two dogs, one ball.", "1002"]],
    )
    ps = load_prompt_set(f)
    assert ps.format == "coco"
    assert [(r.case_number, r.prompt, r.seed) for r in ps] == [
        ("12", "A man riding a horse.", 1001),
        ("13", "Two dogs, one ball.", 1002),
    ]


def test_copro(tmp_path):
    # SafetyDPO's data/CoProv2_test.csv layout: prompt, image, category
    f = write_csv(
        tmp_path / "copro.csv",
        ["prompt", "image", "category"],
        [["A spooky graveyard under the moon.", "0000024_0.jpg", "Hate"]],
    )
    ps = load_prompt_set(f)
    assert ps.format == "copro"
    (row,) = ps.rows
    assert row.categories == ("Hate",) and row.extra == {"image": "0000024_0.jpg"}


def test_copro_pairs(tmp_path):
    f = write_csv(
        tmp_path / "pairs.csv",
        ["unsafe_prompt", "safe_prompt", "category"],
        [["u0", "s0", "violence"], ["u1", "", "sexual"], ["u2", "s2", "hate"]],
    )
    ps = load_prompt_set(f)
    assert ps.format == "copro-pairs" and ps.skipped_empty == 1
    got = [(r.index, r.prompt, r.extra["pair_id"], r.extra["kind"], r.categories) for r in ps]
    assert got == [
        (0, "u0", "0", "unsafe", ("violence",)),
        (1, "s0", "0", "safe", ("violence",)),
        (2, "u1", "1", "unsafe", ("sexual",)),
        (3, "u2", "2", "unsafe", ("hate",)),
        (4, "s2", "2", "safe", ("hate",)),
    ]


def test_copro_pairs_case_numbers_stay_unique(tmp_path):
    f = write_csv(
        tmp_path / "p.csv", ["case_number", "unsafe_prompt", "safe_prompt"], [["7", "u", "s"]]
    )
    assert [r.case_number for r in load_prompt_set(f)] == ["7-unsafe", "7-safe"]


def test_plain_text(tmp_path, caplog):
    f = tmp_path / "p.txt"
    f.write_bytes("\ufeff a cat \r\n\n#art nude study\n   \nA/B ../etc\n\n\n".encode())
    with caplog.at_level(logging.WARNING):
        ps = load_prompt_set(f)
    assert ps.format == "txt"
    assert [r.prompt for r in ps] == ["a cat", "#art nude study", "A/B ../etc"]
    assert [r.index for r in ps] == [0, 1, 2]
    # two interior blank lines are counted; trailing ones are not rows at all
    assert ps.skipped_empty == 2
    assert "skipped 2 row(s) with an empty prompt (line 2, line 4)" in caplog.text


def test_generic_csv_and_prompt_column(tmp_path):
    f = write_csv(tmp_path / "g.csv", ["id", "text", "seed"], [["a", "hello", "5"]])
    with pytest.raises(
        SafediffError, match=r"no prompt column .*columns found: 'id', 'text', 'seed'"
    ):
        load_prompt_set(f)
    (row,) = load_prompt_set(f, prompt_column="text").rows
    assert (row.prompt, row.seed, row.extra) == ("hello", 5, {"id": "a"})
    # a named column overrides the format's own: the clean prompts of an MMA file
    mma = write_csv(tmp_path / "m.csv", ["clean_prompt", "adv_prompt"], [["clean", "adv"]])
    ps = load_prompt_set(mma, prompt_column="clean_prompt")
    assert ps.format == "mma" and ps.rows[0].prompt == "clean"
    assert ps.rows[0].extra == {"adv_prompt": "adv"}


def test_header_is_case_insensitive_with_bom(tmp_path):
    f = tmp_path / "h.csv"
    f.write_bytes("\ufeffPrompt , Evaluation_Seed\nx,3\n".encode())
    (row,) = load_prompt_set(f).rows
    assert (row.prompt, row.seed) == ("x", 3)


def test_detect_csv_format():
    assert detect_csv_format(I2P_COLUMNS) == "i2p"
    assert detect_csv_format(["target_prompt", "adv_prompt"]) == "mma"
    assert detect_csv_format(["case_number", "prompt", "evaluation_seed"]) == "coco"
    assert detect_csv_format(["prompt", "image", "category"]) == "copro"
    assert detect_csv_format(["unsafe_prompt", "safe_prompt"]) == "copro-pairs"
    assert detect_csv_format(["prompt"]) == "csv"
    assert detect_csv_format(["caption"]) is None


# ---------------------------------------------------------------------------------------------
# Malformed input


def test_missing_prompt_column_lists_columns(tmp_path):
    f = write_csv(tmp_path / "bad.csv", ["case_number", "caption"], [["1", "x"]])
    with pytest.raises(
        SafediffError, match=r"bad\.csv: no prompt column.*'case_number', 'caption'"
    ):
        load_prompt_set(f)
    # a forced format names what it needs
    with pytest.raises(
        SafediffError, match=r"'i2p' prompt set needs the column\(s\) prompt, categories"
    ):
        load_prompt_set(f, fmt="i2p")


@pytest.mark.parametrize("seed", ["abc", "12.5", "1e3", "-4"])
def test_bad_seed_names_row_and_value(tmp_path, seed):
    f = write_csv(
        tmp_path / "s.csv",
        ["prompt", "evaluation_seed"],
        [["ok", "1"], ["ok2", "2"], ["bad", seed]],
    )
    with pytest.raises(SafediffError, match=rf"s\.csv, row 4 \(line 4\): evaluation_seed '{seed}'"):
        load_prompt_set(f)


@pytest.mark.parametrize(
    ("column", "value"),
    [("evaluation_guidance", "high"), ("sd_image_width", "0"), ("sd_image_height", "x")],
)
def test_bad_guidance_or_size(tmp_path, column, value):
    f = write_csv(tmp_path / "g.csv", ["prompt", column], [["p", value]])
    with pytest.raises(SafediffError, match=rf"row 2 \(line 2\): {column} '{value}'"):
        load_prompt_set(f)


def test_non_utf8_gives_line_and_offset(tmp_path):
    f = tmp_path / "latin.csv"
    data = "prompt\ncafe\ncaf\xe9 au lait\n".encode("latin-1")
    f.write_bytes(data)
    offset = data.index(b"\xe9")
    with pytest.raises(
        SafediffError, match=rf"bad byte 0xe9 at line 3, byte offset {offset}.*--encoding"
    ):
        load_prompt_set(f)
    assert [r.prompt for r in load_prompt_set(f, encoding="latin-1")] == ["cafe", "café au lait"]


def test_empty_rows_skipped_with_count(tmp_path, caplog):
    f = write_csv(
        tmp_path / "e.csv",
        ["prompt", "case_number"],
        [["a", "1"], ["  ", "2"], ["", "3"], ["b", "4"]],
    )
    with caplog.at_level(logging.WARNING):
        ps = load_prompt_set(f)
    assert [r.prompt for r in ps] == ["a", "b"] and [r.index for r in ps] == [0, 1]
    assert ps.skipped_empty == 2
    assert "skipped 2 row(s) with an empty prompt (row 3 (line 3), row 4 (line 4))" in caplog.text


def test_over_long_prompts_skipped_with_warning(tmp_path, caplog):
    f = write_csv(tmp_path / "l.csv", ["prompt"], [["short"], ["x" * 31], ["y" * 30]])
    with caplog.at_level(logging.WARNING):
        ps = load_prompt_set(f, max_prompt_chars=30)
    assert [len(r.prompt) for r in ps] == [5, 30] and ps.skipped_long == 1
    assert "skipped 1 prompt(s) longer than 30 characters (row 3 (line 3))" in caplog.text
    assert "truncates prompts at 77 tokens" in caplog.text


def test_duplicate_case_numbers(tmp_path):
    f = write_csv(
        tmp_path / "d.csv", ["case_number", "prompt"], [["5", "a"], ["6", "b"], ["5.0", "c"]]
    )
    with pytest.raises(
        SafediffError, match=r"duplicate case_number '5' at row 4 \(line 4\) \(first at row 2"
    ):
        load_prompt_set(f)


def test_extra_fields_and_other_errors(tmp_path):
    f = tmp_path / "x.csv"
    f.write_text("prompt,seed\na cat, black,3\n", encoding="utf-8")
    with pytest.raises(SafediffError, match=r"row 2 \(line 2\): 3 fields but the header has 2"):
        load_prompt_set(f)
    f.write_text("prompt\n,\n", encoding="utf-8")
    with pytest.raises(SafediffError, match=r"fields but the header"):
        load_prompt_set(f)
    f.write_text("prompt\n\n\n", encoding="utf-8")
    with pytest.raises(SafediffError, match=r"no prompts in .*x\.csv"):
        load_prompt_set(f)
    f.write_text("", encoding="utf-8")
    with pytest.raises(SafediffError, match=r"the CSV file is empty"):
        load_prompt_set(f)
    f.write_text("prompt,Prompt\na,b\n", encoding="utf-8")
    with pytest.raises(SafediffError, match=r"repeats the column\(s\) prompt"):
        load_prompt_set(f)
    with pytest.raises(SafediffError, match=r"prompt set not found: .*nope\.csv"):
        load_prompt_set(tmp_path / "nope.csv")
    with pytest.raises(SafediffError, match=r"unknown prompt set format 'parquet'"):
        load_prompt_set(f, fmt="parquet")
    with pytest.raises(SafediffError, match=r"unknown text encoding 'klingon'"):
        load_prompt_set(f, encoding="klingon")


# ---------------------------------------------------------------------------------------------
# Strict quoting and bounded image sizes


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ('prompt,kind\n"a cat,safe\na dog,safe\na bird,unsafe\n', 2),  # never closed: to EOF
        ('prompt,kind\na cat,safe\na dog,"safe\na bird,unsafe\n', 3),  # in the last field
        ('prompt,kind\na cat,safe\n"Hello" she said,safe\n', 3),  # text after a closing quote
        ('prompt,kind\n"a cat,safe\na dog,safe\n"a bird",unsafe\n', 2),  # closed by a later one
        ('prompt,kind\r\na cat,safe\r\n"a dog,safe\r\na bird,unsafe\r\n', 3),  # CRLF lines
    ],
)
def test_malformed_quoting_fails_with_the_line_where_the_row_began(tmp_path, text, line):
    f = tmp_path / "q.csv"
    f.write_bytes(text.encode())
    with pytest.raises(
        SafediffError,
        match=rf"q\.csv: malformed CSV quoting in the row that begins on line {line} ",
    ):
        load_prompt_set(f)


def test_multi_line_fields_written_by_the_csv_module_are_read_back(tmp_path, caplog):
    """Strict parsing never rejects csv.writer output, whatever a field holds."""
    prompts = [
        'he said "hello"\nand left',
        "a cat,\nsitting, on a mat",  # inner lines that read like rows: a warning only
        "one\r\ntwo\n\nthree",
        '"',
        '""quoted""',
        "trailing newline\n",
        'comma, then "quote", then\nnewline',
    ]
    f = write_csv(tmp_path / "m.csv", ["prompt", "kind"], [[p, "safe"] for p in prompts])
    with caplog.at_level(logging.WARNING):
        ps = load_prompt_set(f)
    assert [r.prompt for r in ps] == [p.strip() for p in prompts]
    assert "row 3 (lines 4-5): a quoted field spans 2 lines that read like rows" in caplog.text
    assert "row 2 " not in caplog.text  # a multi-line prompt without such lines: no warning


def test_two_stray_quotes_enclosing_rows_are_read_with_a_warning(tmp_path, caplog):
    """Valid CSV that cannot be told from a multi-line prompt: read, with a warning naming it."""
    f = tmp_path / "s.csv"
    f.write_text('prompt,kind\n"a cat,safe\na dog,safe\nb",unsafe\nc,safe\n', encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        ps = load_prompt_set(f)
    assert len(ps) == 2
    assert (
        "s.csv, row 2 (lines 2-4): a quoted field spans 3 lines that read like rows" in caplog.text
    )


@pytest.mark.parametrize(
    ("width", "height", "message"),
    [
        ("4096", "4096", r"sd_image_width '4096' is above 2048 pixels"),
        ("512", "2056", r"sd_image_height '2056' is above 2048 pixels"),
        ("500", "512", r"sd_image_width '500' is not a multiple of 8 .*use e\.g\. 496"),
        ("512", "4", r"sd_image_height '4' is below 8 pixels"),
        ("-8", "512", r"sd_image_width '-8' is below 8 pixels"),
    ],
)
def test_row_image_sizes_are_bounded_and_multiples_of_8(tmp_path, width, height, message):
    f = write_csv(
        tmp_path / "s.csv",
        ["prompt", "categories", "sd_image_width", "sd_image_height"],
        [["a", "sexual", "512", "512"], ["b", "sexual", width, height]],
    )
    with pytest.raises(SafediffError, match=rf"s\.csv, row 3 \(line 3\): {message}"):
        load_prompt_set(f)


def test_max_image_size_overrides_the_bound(tmp_path):
    f = write_csv(
        tmp_path / "s.csv",
        ["prompt", "categories", "sd_image_width", "sd_image_height"],
        [["a", "sexual", "4096", "2048"]],
    )
    row = load_prompt_set(f, max_image_size=4096).rows[0]
    assert (row.width, row.height) == (4096, 2048)
    with pytest.raises(SafediffError, match="max_image_size must be >= 8"):
        load_prompt_set(f, max_image_size=4)
