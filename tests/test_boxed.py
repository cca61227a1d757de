"""last_boxed: the content of the last closed box, with nested and escaped braces."""

import pytest

from experiments.boxed import last_boxed


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so \boxed{72}.", "72"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\frac{\sqrt{3}}{2}} is it", r"\frac{\sqrt{3}}{2}"),
        (r"first \boxed{3} then \boxed{ 5 } last", "5"),
        (r"\fbox{7}", "7"),
        (r"\boxed {x^{2}}", "x^{2}"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces do not close the box
        (r"\boxed{\left\{ x \right\}}", r"\left\{ x \right\}"),
        (r"\boxed{4} and then \boxed{\frac{1}{", "4"),  # the last box never closes: the one before
        ("no box at all, 42", None),
        (r"\boxed{", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected
