"""The fast JSON paths pinned to the plain code they replace.

- ``canonical_json`` (orjson for values without floats) must spell every value byte for byte as
  the standard library's canonical encoder does: the payload's text is what the chain hashes,
  so one differing byte would break every ledger written before.
- The JSON columns' encoder and decoder (``ledger.db.json_dumps`` / ``json_loads``, orjson)
  must round-trip every value to what ``json.dumps`` / ``json.loads`` give.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from events.codec import _CANONICAL_ENCODE, canonical_json
from ledger.db import json_dumps, json_loads

# Every code point but the lone surrogates, which no UTF-8 text can hold (both encoders refuse
# them at some point; canonical_json's fallback keeps the standard library's behaviour).
any_text = st.text(st.characters(exclude_categories=("Cs",)))
scalars = (
    st.none()
    | st.booleans()
    | st.integers()  # also beyond 64 bits: orjson refuses, the fallback spells them
    | any_text
)
finite_floats = st.floats(allow_nan=False, allow_infinity=False)


def documents(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        leaves,
        lambda children: (
            st.lists(children, max_size=5) | st.dictionaries(any_text, children, max_size=5)
        ),
        max_leaves=20,
    )


@settings(max_examples=500)
@given(documents(scalars))
def test_canonical_json_is_the_standard_librarys_spelling(value: Any) -> None:
    assert canonical_json(value) == _CANONICAL_ENCODE(value)


@settings(max_examples=300)
@given(documents(scalars | finite_floats))
def test_canonical_json_with_floats_is_the_standard_librarys_spelling(value: Any) -> None:
    assert canonical_json(value) == _CANONICAL_ENCODE(value)


def test_the_fast_path_is_taken_and_the_float_path_is_needed(monkeypatch: Any) -> None:
    """Why floats go to the standard library: orjson spells some of them differently."""
    import orjson

    import events.codec

    def refuse(value: Any) -> str:
        raise AssertionError("the standard library's encoder was used")

    with monkeypatch.context() as patched:
        patched.setattr(events.codec, "_CANONICAL_ENCODE", refuse)
        assert canonical_json({"b": "x", "a": [1, {"c": None}]}) == '{"a":[1,{"c":null}],"b":"x"}'

    assert orjson.dumps(1e-05) == b"0.00001" and json.dumps(1e-05) == "1e-05"
    assert orjson.dumps(1.5e-07) == b"1.5e-7" and json.dumps(1.5e-07) == "1.5e-07"
    assert canonical_json({"bandwidth": 1e-05}) == '{"bandwidth":1e-05}'
    assert canonical_json({"b": "备案", "a": [1, None, True]}) == '{"a":[1,null,true],"b":"备案"}'


@settings(max_examples=1000)
@given(documents(scalars | finite_floats))
def test_json_columns_round_trip_like_the_standard_library(value: Any) -> None:
    text = json_dumps(value)
    assert json_loads(text) == json.loads(json.dumps(value))
    assert json_loads(text.encode()) == json.loads(text)


def test_json_columns_keep_integers_beyond_64_bits_exact() -> None:
    """orjson alone reads them as floats (found by the property above)."""
    for number in (-(2**63) - 1, 2**64, 10**30):
        assert json_loads(json_dumps({"n": number})) == {"n": number}
        assert type(json_loads(str(number))) is int
