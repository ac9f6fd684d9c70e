"""A MATH reference solution is read as responses are: all of its joined final boxes, not only the last."""

from __future__ import annotations

from tre_lightning.tasks.math import MathTask, _boxed_reference


def test_a_two_box_reference_is_the_list_of_both() -> None:
    """Fails when references are read with ``last_boxed_answer`` (the reference would be ``3``)."""
    solution = r"The roots are $x=2$ and $x=3$, so the answer is \boxed{2}, \boxed{3}."
    assert _boxed_reference(solution) == "2, 3"
    example = {"problem": "p", "solution": solution}
    assert MathTask.reference_answer(example) == "2, 3"
    task = MathTask(train_path=None, val_path=None, use_math_verify=False)
    assert task.score([example, example], [r"\boxed{2, 3}", r"\boxed{3}"]) == [1.0, 0.0]


def test_a_single_box_and_a_hedged_reference_keep_their_box() -> None:
    assert _boxed_reference(r"so \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    # a reference is trusted: a value after its box does not drop it (a response would score 0)
    assert _boxed_reference(r"\boxed{4} or 9") == "4"
