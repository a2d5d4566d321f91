"""An exception named in one line reads ``TypeName: first line``, however its message is laid out."""

from moe_passes.errors import error_summary, first_line


def test_the_first_non_blank_line_names_a_multi_line_message() -> None:
    e = RuntimeError("\n  shape mismatch: [4, 8] vs [8, 4]\nwhile tracing node view_3\n")
    assert first_line(e) == "shape mismatch: [4, 8] vs [8, 4]"
    assert error_summary(e) == "RuntimeError: shape mismatch: [4, 8] vs [8, 4]"


def test_an_exception_without_a_message_is_named_by_its_type() -> None:
    assert first_line(KeyError()) == ""
    assert error_summary(AssertionError()) == "AssertionError: "
    assert error_summary(ValueError("one line")) == "ValueError: one line"
