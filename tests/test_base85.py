"""The fast base85 decoder gives exactly what the standard library's gives, errors included."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sequencer.base85 import b85decode


@given(st.binary(max_size=2000))
def test_decodes_what_the_standard_library_encodes(data: bytes) -> None:
    text = base64.b85encode(data)
    assert b85decode(text) == data
    assert b85decode(text.decode()) == data


@given(st.text(alphabet=st.characters(codec="ascii"), max_size=40))
def test_any_text_decodes_or_fails_as_the_standard_library_does(text: str) -> None:
    try:
        expected: bytes | str = base64.b85decode(text)
    except ValueError as exc:
        expected = str(exc)
    try:
        got: bytes | str = b85decode(text)
    except ValueError as exc:
        got = str(exc)
    assert got == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("|NsC0|NsC1", "base85 overflow in hunk starting at byte 5"),  # 85**5 - 1 in the second group
        ("ab cd", "bad base85 character at position 2"),
        ('}0000"', "base85 overflow in hunk starting at byte 0"),  # the overflow comes first, group by group
        ('}000"0', "bad base85 character at position 4"),  # within a group, the character first
        ("abcé", "string argument should contain only ASCII characters"),
    ],
)
def test_errors_name_the_place(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        base64.b85decode(text)
    with pytest.raises(ValueError, match=message):
        b85decode(text)
