"""MATH grader: extraction, normalisation, equivalence, hard limits (hand-written tables)."""

from __future__ import annotations

import pickle
import threading
import time
from pathlib import Path

import pytest
import torch
from _task_hostile import HOSTILE

from tre_lightning.tasks import math_grader
from tre_lightning.tasks.math_grader import MathGrader, last_boxed_answer, normalize_answer, numeric_value

needs_math_verify = pytest.mark.skipif(
    not math_grader.math_verify_available(), reason="math-verify (the `math` extra) is not installed"
)


@pytest.fixture(scope="module")
def rules() -> MathGrader:
    return MathGrader(use_math_verify=False)


@pytest.fixture(scope="module")
def symbolic() -> MathGrader:
    grader = MathGrader(use_math_verify=True, time_limit=0.5)
    grader.start()
    yield grader
    grader.close()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is \\boxed{5}.", "5"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("first \\boxed{1} then \\boxed{2}", "2"),
        ("so \\boxed 7$ done", "7"),
        ("\\fbox{3}", "3"),
        ("\\boxed{3} and later \\fbox{4}", "4"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed {5}", "5"),
        ("\\boxed{a^{2}+{b}}", "a^{2}+{b}"),
        ("\\boxed{}", ""),
        ("\\boxed{a", None),
        ("no box at all", None),
        ("\\boxedfoo{3}", None),
        ("", None),
    ],
)
def test_last_boxed_answer(text: str, expected: str | None) -> None:
    assert last_boxed_answer(text) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\tfrac{3}{4}", "\\frac{3}{4}"),
        ("\\frac12", "\\frac{1}{2}"),
        ("\\frac1{2}", "\\frac{1}{2}"),
        ("5\\text{ cm}", "5"),
        ("5 inches", "5"),
        ("12 square units", "12"),
        ("x = 3", "3"),
        ("1,000", "1000"),
        ("1{,}000", "1000"),
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("3.", "3"),
        ("0.5", "\\frac{1}{2}"),
        (".25", "0.25"),
        ("\\sqrt3", "\\sqrt{3}"),
        ("3/4", "\\frac{3}{4}"),
        ("10\\%", "10"),
        ("90^\\circ", "90"),
        ("90^{\\circ}", "90"),
        ("\\$5", "5"),
        ("\\text{(A)}", "(A)"),
        ("{5}", "5"),
        ("2 \\! \\, 3", "23"),
        ("\\rightarrow", "\\rightarrow"),
        ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("3", 3), ("-0.75", -0.75), ("\\frac{1}{2}", 0.5), ("-\\frac{3}{4}", -0.75), ("\\frac{1}{0}", None),
     ("x", None), ("1e5", None), ("1_000", None)],
)
def test_numeric_value(text: str, expected: float | None) -> None:
    value = numeric_value(text)
    assert (value is None) if expected is None else (float(value) == expected)


RULE_CASES = [
    ("\\boxed{\\dfrac{1}{2}}", "\\frac12", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{1/2}", "\\frac{1}{2}", 1.0),
    ("\\boxed{.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{0.50}", "\\frac{1}{2}", 1.0),
    ("\\boxed{5 \\text{ cm}}", "5", 1.0),
    ("\\boxed{5\\text{ inches}}", "5", 1.0),
    ("\\boxed{x = 3}", "3", 1.0),
    ("\\boxed{\\left( 1, 2 \\right)}", "(1,2)", 1.0),
    ("\\boxed{10\\%}", "10", 1.0),
    ("\\boxed{90^\\circ}", "90", 1.0),
    ("\\boxed{\\$1,000}", "1000", 1.0),
    ("The answer is \\boxed{3}.", "3", 1.0),
    ("\\boxed{3.}", "3", 1.0),
    ("\\boxed{\\sqrt3}", "\\sqrt{3}", 1.0),
    ("\\boxed{-\\frac{3}{4}}", "-0.75", 1.0),
    ("\\boxed{\\text{(A)}}", "\\text{(A)}", 1.0),
    ("\\fbox{7}", "7", 1.0),
    ("\\boxed 7", "7", 1.0),
    ("\\boxed{3}", "4", 0.0),
    ("\\boxed{-5}", "5", 0.0),
    ("\\boxed{0.33}", "\\frac{1}{3}", 0.0),
    ("\\boxed{(1,2)}", "(2,1)", 0.0),
    ("\\boxed{}", "5", 0.0),
    ("the answer is 5", "5", 0.0),
    ("\\boxed{5} no wait \\boxed{6}", "5", 0.0),
    ("\\boxed{x=3, y=4}", "3", 0.0),
    ("\\boxed{\\sqrt{2}}", "2", 0.0),
]


@pytest.mark.parametrize(("response", "reference", "expected"), RULE_CASES)
def test_rule_based_table(rules: MathGrader, response: str, reference: str, expected: float) -> None:
    assert rules.grade(response, reference) == expected


@needs_math_verify
@pytest.mark.parametrize(
    ("response", "reference", "expected"),
    [
        ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{\\sqrt{2}}{2}", 1.0),
        ("\\boxed{(x+1)^2}", "x^2+2x+1", 1.0),
        ("\\boxed{2\\pi}", "\\pi \\cdot 2", 1.0),
        ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", 1.0),
        ("\\boxed{\\{1,2\\}}", "\\{2,1\\}", 1.0),
        ("\\boxed{\\frac{1}{\\sqrt{3}}}", "\\frac{\\sqrt{2}}{2}", 0.0),
        ("\\boxed{x^2+2x}", "x^2+2x+1", 0.0),
        ("\\boxed{2\\sqrt{2}}", "\\sqrt{2}", 0.0),
        ("\\boxed{0.33}", "\\frac{1}{3}", 0.0),
    ],
)
def test_symbolic_table(symbolic: MathGrader, response: str, reference: str, expected: float) -> None:
    assert symbolic.grade(response, reference) == expected


def test_symbolic_equivalences_need_math_verify(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(math_grader, "math_verify_available", lambda: False)
    grader = MathGrader(use_math_verify=True)
    assert grader.symbolic is False
    assert grader.grade("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{\\sqrt{2}}{2}") == 0.0  # documented fallback
    assert grader.grade("\\boxed{0.5}", "\\frac12") == 1.0


@pytest.mark.parametrize("use_math_verify", [False, pytest.param(True, marks=needs_math_verify)])
def test_hostile_outputs_score_zero_within_a_second(
    use_math_verify: bool, rules: MathGrader, symbolic: MathGrader, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    grader = symbolic if use_math_verify else rules
    sentinel = tmp_path / "pwned"
    payload = f"\\boxed{{__import__('pathlib').Path({str(sentinel)!r}).touch()}}"
    for response in [*HOSTILE, payload]:
        start = time.monotonic()
        score = grader.grade(response, "42")
        elapsed = time.monotonic() - start
        assert score == 0.0, response[:80]
        assert elapsed < 1.0, (response[:80], elapsed)
    assert not sentinel.exists()


@needs_math_verify
def test_a_hang_is_cut_off_counted_and_the_helper_restarts() -> None:
    grader = MathGrader(time_limit=0.5)
    try:
        grader.start()
        pid = grader._workers[0].pid
        start = time.monotonic()
        assert grader.grade("\\boxed{9^{9^{9}}}", "1") == 0.0
        assert time.monotonic() - start < 1.0
        counts = grader.stats.as_dict()
        assert counts["timeouts"] == 1 and counts["failures"] == 1 and counts["checks"] == 1
        # the next symbolic check works again, on a new helper process
        assert grader.grade("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{\\sqrt{2}}{2}") == 1.0
        assert grader._workers[0].pid != pid
        assert grader.stats.as_dict()["timeouts"] == 1
    finally:
        grader.close()


@needs_math_verify
def test_works_outside_the_main_thread(symbolic: MathGrader) -> None:
    out: list[list[float]] = []
    worker = threading.Thread(
        target=lambda: out.append(
            symbolic.grade_batch(["\\boxed{9^{9^{9}}}", "\\boxed{\\sqrt{8}}"], ["1", "2\\sqrt{2}"])
        )
    )
    start = time.monotonic()
    worker.start()
    worker.join(timeout=10)
    assert out == [[0.0, 1.0]]
    assert time.monotonic() - start < 2.0


class _GradeInWorker(torch.utils.data.Dataset):
    def __init__(self, grader: MathGrader) -> None:
        self.grader = grader
        # the first check starts the worker's own helper (start-up not counted in the limit)
        self.cases = [("\\boxed{\\sqrt{8}}", "2\\sqrt{2}"), ("\\boxed{9^{9^{9}}}", "1"), ("\\boxed{0.5}", "\\frac12")]

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> torch.Tensor:
        start = time.monotonic()
        score = self.grader.grade(*self.cases[i])
        return torch.tensor([score, time.monotonic() - start])


@needs_math_verify
def test_works_in_dataloader_workers(symbolic: MathGrader) -> None:
    parent_pid = symbolic._workers[0].pid  # started in this process; a forked worker must not use it
    loader = torch.utils.data.DataLoader(_GradeInWorker(symbolic), batch_size=None, num_workers=1)
    results = torch.stack(list(loader))
    assert results[:, 0].tolist() == [1.0, 0.0, 1.0]
    assert float(results[1, 1]) < 1.0  # the hang is cut off at the time limit in the worker too
    assert symbolic._workers[0].pid == parent_pid
    assert symbolic.grade("\\boxed{\\sqrt{8}}", "2\\sqrt{2}") == 1.0


def test_rule_path_errors_score_zero_and_are_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    grader = MathGrader(use_math_verify=False)

    def boom(pred: str, reference: str) -> bool:
        raise RuntimeError("bug")

    monkeypatch.setattr(math_grader, "rule_equivalent", boom)
    assert grader.grade_batch(["\\boxed{1}", "no box"], ["1", "1"]) == [0.0, 0.0]
    assert grader.stats.as_dict() == {"checks": 2, "timeouts": 0, "errors": 1, "failures": 1}
    grader.stats.reset()
    assert grader.stats.as_dict()["checks"] == 0


def test_grader_pickles_without_its_helpers(rules: MathGrader) -> None:
    clone = pickle.loads(pickle.dumps(rules))
    assert clone.grade("\\boxed{0.5}", "\\frac{1}{2}") == 1.0


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"time_limit": 0}, "time_limit"), ({"num_workers": 0}, "num_workers"),
     ({"memory_limit_mb": 10}, "memory_limit_mb"), ({"max_response_chars": 0}, "max_response_chars")],
)
def test_constructor_validation(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        MathGrader(**kwargs)
