"""Loading each dataset layout from small files, located errors, splits, the Countdown generator."""

from __future__ import annotations

import itertools
import json
from fractions import Fraction
from pathlib import Path

import pytest

from tre_lightning.tasks import CountdownTask, DataError, HHTask, MathTask, generate_countdown

MATH_ROWS = [
    {"problem": "What is 1+1?", "solution": "It is $\\boxed{2}$.", "level": "Level 1", "type": "Algebra"},
    {"problem": "Half of 1?", "solution": "So \\boxed{\\frac{1}{2}}.", "level": "Level 2", "type": "Prealgebra"},
    {"problem": "Roots?", "solution": "The roots are $\\boxed{\\{1,2\\}}$.", "level": "Level 5", "type": "Algebra"},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# --------------------------------------------------------------------------- MATH
def test_math_jsonl(tmp_path: Path) -> None:
    task = MathTask(train_path=str(write_jsonl(tmp_path / "train.jsonl", MATH_ROWS)), use_math_verify=False)
    rows = task.train_examples()
    assert [r["answer"] for r in rows] == ["2", "\\frac{1}{2}", "\\{1,2\\}"]
    assert rows[0]["level"] == "Level 1" and rows[0]["type"] == "Algebra"
    assert task.train_examples() is rows  # cached


def test_math_original_folder_layout(tmp_path: Path) -> None:
    # MATH as released: train/<subject>/<id>.json, one problem per file
    for i, row in enumerate(MATH_ROWS):
        folder = tmp_path / "train" / row["type"].lower()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.json").write_text(json.dumps(row))
    task = MathTask(train_path=str(tmp_path / "train"), use_math_verify=False)
    assert sorted(r["answer"] for r in task.train_examples()) == sorted(["2", "\\frac{1}{2}", "\\{1,2\\}"])


def test_math_json_array_and_parquet(tmp_path: Path) -> None:
    (tmp_path / "val.json").write_text(json.dumps(MATH_ROWS))
    task = MathTask(val_path=str(tmp_path / "val.json"), use_math_verify=False)
    assert len(task.val_examples()) == 3
    parquet = write_parquet(tmp_path / "val.parquet", MATH_ROWS)
    task = MathTask(val_path=str(parquet), use_math_verify=False)
    assert [r["problem"] for r in task.val_examples()] == [r["problem"] for r in MATH_ROWS]


def test_math_answer_column_wins(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "m.jsonl", [{"problem": "p", "answer": "7", "solution": "no box here"}])
    task = MathTask(train_path=str(path), use_math_verify=False)
    assert task.train_examples()[0]["answer"] == "7"


def test_math_score_and_prompt(tmp_path: Path) -> None:
    task = MathTask(train_path=str(write_jsonl(tmp_path / "t.jsonl", MATH_ROWS)), use_math_verify=False)
    ex = task.train_examples()
    assert task.messages(ex[0]) == [
        {
            "role": "user",
            "content": "What is 1+1? Let's think step by step and output the final answer within \\boxed{}.",
        }
    ]
    assert task.score(ex, ["\\boxed{2}", "\\boxed{0.5}", "\\boxed{3}"]) == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="2 examples but 1 responses"):
        task.score(ex[:2], ["x"])


def test_math_subsampling_is_seeded(tmp_path: Path) -> None:
    rows = [{"problem": f"p{i}", "solution": f"\\boxed{{{i}}}"} for i in range(50)]
    path = str(write_jsonl(tmp_path / "t.jsonl", rows))
    a = MathTask(train_path=path, train_size=10, seed=1, use_math_verify=False).train_examples()
    b = MathTask(train_path=path, train_size=10, seed=1, use_math_verify=False).train_examples()
    c = MathTask(train_path=path, train_size=10, seed=2, use_math_verify=False).train_examples()
    assert len(a) == 10 and a == b and a != c
    assert len(MathTask(train_path=path, train_size=None, use_math_verify=False).train_examples()) == 50
    assert len(MathTask(train_path=path, train_size=500, use_math_verify=False).train_examples()) == 50


# --------------------------------------------------------------------------- errors
def test_missing_path_names_the_parameter(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="train_path.*nope"):
        MathTask(train_path=str(tmp_path / "nope"), use_math_verify=False).train_examples()
    with pytest.raises(ValueError, match="val_path: required for MathTask"):
        MathTask(use_math_verify=False).val_examples()


def test_missing_column_names_file_row_and_column(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [MATH_ROWS[0], {"question": "x", "solution": "\\boxed{1}"}])
    with pytest.raises(DataError) as info:
        MathTask(train_path=str(path), use_math_verify=False).train_examples()
    err = info.value
    assert err.file == str(path) and err.row == "line 2" and err.column == "problem"
    assert "bad.jsonl" in str(err) and "line 2" in str(err) and "'problem'" in str(err)


def test_malformed_json_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(MATH_ROWS[0]) + "\n\n{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl, line 3: invalid JSON"):
        MathTask(train_path=str(path), use_math_verify=False).train_examples()


def test_solution_without_box(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "m.jsonl", [{"problem": "p", "solution": "the answer is 3"}])
    with pytest.raises(DataError, match=r"m.jsonl, line 1, column 'solution': .*no \\boxed"):
        MathTask(train_path=str(path), use_math_verify=False).train_examples()


def test_wrong_type_in_parquet_row(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "c.parquet", [{"target": 5, "nums": [1, 2]}, {"target": 5, "nums": []}])
    with pytest.raises(DataError) as info:
        CountdownTask(train_path=str(path), train_size=1, val_size=1).train_examples()
    assert (info.value.row, info.value.column) == ("row 1", "nums")
    assert "empty list" in str(info.value)


@pytest.mark.parametrize(
    ("row", "column"),
    [({"target": "five", "nums": [1, 2]}, "target"), ({"target": 5, "nums": "1 2"}, "nums"),
     ({"target": 5, "nums": [1, 2.5]}, "nums"), ({"target": True, "nums": [1]}, "target"), ({"nums": [1]}, "target")],
)
def test_countdown_bad_rows(tmp_path: Path, row: dict, column: str) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [{"target": 3, "nums": [1, 2]}, row])
    with pytest.raises(DataError) as info:
        CountdownTask(train_path=str(path), train_size=1, val_size=1).train_examples()
    assert (info.value.file, info.value.row, info.value.column) == (str(path), "line 2", column)


def test_empty_splits(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty split"):
        MathTask(train_path=str(tmp_path / "empty.jsonl"), use_math_verify=False).train_examples()
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="empty split"):
        MathTask(train_path=str(tmp_path / "folder"), use_math_verify=False).train_examples()
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        MathTask(train_path=str(tmp_path / "data.csv"), use_math_verify=False).train_examples()


def test_non_object_rows(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "h.jsonl", [{"prompt": "hi"}, ["not", "an", "object"]])
    with pytest.raises(DataError, match=r"h.jsonl, line 2: expected an object, got list"):
        HHTask(train_path=str(path)).train_examples()


# --------------------------------------------------------------------------- Countdown
def test_countdown_layout_and_disjoint_split(tmp_path: Path) -> None:
    rows = [{"target": 10 + i, "nums": [i, 10, 1]} for i in range(30)]
    path = str(write_jsonl(tmp_path / "cd.jsonl", rows))
    task = CountdownTask(train_path=path, train_size=20, val_size=10, seed=3)
    train, val = task.train_examples(), task.val_examples()
    assert len(train) == 20 and len(val) == 10
    key = lambda r: (r["target"], tuple(r["nums"]))  # noqa: E731
    assert {key(r) for r in train}.isdisjoint({key(r) for r in val})
    assert {key(r) for r in train} | {key(r) for r in val} == {key(r) for r in rows}
    with pytest.raises(DataError, match="exceeds the 30 rows"):
        CountdownTask(train_path=path, train_size=25, val_size=10).train_examples()


def test_countdown_separate_files_parquet(tmp_path: Path) -> None:
    train = write_parquet(tmp_path / "train.parquet", [{"target": 3, "nums": [1, 2]}] * 4)
    val = write_jsonl(tmp_path / "val.jsonl", [{"target": 24, "nums": [4, 6]}])
    task = CountdownTask(train_path=str(train), val_path=str(val), train_size=2, val_size=None)
    assert len(task.train_examples()) == 2
    assert task.val_examples() == [{"target": 24, "nums": [4, 6]}]
    assert task.messages(task.val_examples()[0])[0]["content"].startswith(
        "Using the numbers [4, 6], create an equation that equals 24. "
    )


def _solvable(nums: list[int], target: int) -> bool:
    """Independent brute force: combine any two values with + - * / (exact), recursively."""
    values = [Fraction(n) for n in nums]

    def search(vals: list[Fraction]) -> bool:
        if len(vals) == 1:
            return vals[0] == target
        for i, j in itertools.permutations(range(len(vals)), 2):
            rest = [v for k, v in enumerate(vals) if k not in (i, j)]
            a, b = vals[i], vals[j]
            options = [a + b, a - b, a * b] + ([a / b] if b != 0 else [])
            if any(search(rest + [v]) for v in options):
                return True
        return False

    return search(values)


def test_generator_instances_are_solvable_and_in_range() -> None:
    rows = generate_countdown(150, seed=7)
    assert len(rows) == 150
    assert len({(tuple(sorted(r["nums"])), r["target"]) for r in rows}) == 150
    for r in rows:
        assert 3 <= len(r["nums"]) <= 4
        assert all(1 <= n <= 100 for n in r["nums"])
        assert 1 <= r["target"] <= 100
        assert _solvable(r["nums"], r["target"]), r
    assert {len(r["nums"]) for r in rows} == {3, 4}


def test_generator_is_reproducible() -> None:
    assert generate_countdown(50, seed=1) == generate_countdown(50, seed=1)
    assert generate_countdown(50, seed=1) != generate_countdown(50, seed=2)
    a = CountdownTask(train_size=30, val_size=20, seed=5)
    b = CountdownTask(train_size=30, val_size=20, seed=5)
    assert a.train_examples() == b.train_examples() and a.val_examples() == b.val_examples()
    key = lambda r: (tuple(sorted(r["nums"])), r["target"])  # noqa: E731
    assert {key(r) for r in a.train_examples()}.isdisjoint({key(r) for r in a.val_examples()})


def test_generated_solutions_score_one() -> None:
    task = CountdownTask(train_size=40, val_size=1, seed=0)
    rows = task.train_examples()
    assert task.score(rows, [f"<think>.</think><answer>{r['solution']}</answer>" for r in rows]) == [1.0] * 40


# --------------------------------------------------------------------------- HH
def test_hh_prompt_columns(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "uf.jsonl", [{"prompt": "Write a haiku.", "chosen": "x"}, {"prompt": "Hi"}])
    task = HHTask(train_path=str(path))
    assert [r["prompt"] for r in task.train_examples()] == ["Write a haiku.", "Hi"]
    assert task.messages(task.train_examples()[0]) == [{"role": "user", "content": "Write a haiku."}]
    raw = write_jsonl(tmp_path / "raw.jsonl", [{"instruction": "Explain RL."}])
    task = HHTask(val_path=str(raw), prompt_key="instruction")
    assert task.val_examples()[0]["prompt"] == "Explain RL."
    with pytest.raises(DataError, match=r"raw.jsonl, line 1, column 'prompt'"):
        HHTask(train_path=str(raw)).train_examples()
    with pytest.raises(ValueError, match="reward_model_path is not set"):
        HHTask().score([{"prompt": "a"}], ["b"])
