"""Encoding text into token ids under each out-of-vocabulary policy."""

from __future__ import annotations

import numpy as np
import pytest

from nextchar.server.core.sampling import InvalidParameterError
from nextchar.server.core.vocab import OovPolicy, OutOfVocabularyError, build_index, decode, encode

VOCAB = tuple(" ,abco’")
INDEX = build_index(VOCAB)


def test_encode_decode_round_trip():
    ids = encode("a boo’, c", INDEX)
    assert ids.dtype == np.int64 and ids.shape == (9,)
    assert ids.tolist() == [2, 0, 3, 5, 5, 6, 1, 0, 4]
    assert decode(ids, VOCAB) == "a boo’, c"


def test_error_policy_names_every_unknown_char_and_position():
    with pytest.raises(OutOfVocabularyError) as e:
        encode("abXcYX'", INDEX, field="prompt")
    err = e.value
    assert err.chars == ("X", "Y", "'")
    assert err.positions == [(2, "X"), (4, "Y"), (5, "X"), (6, "'")]
    assert err.field == "prompt"
    assert "prompt" in str(err) and "'X' at 2" in str(err) and "'Y' at 4" in str(err)
    assert isinstance(err, ValueError)


def test_error_message_is_bounded():
    with pytest.raises(OutOfVocabularyError) as e:
        encode("Z" * 50, INDEX)
    assert len(e.value.positions) == 50
    assert "and 40 more" in str(e.value)


def test_skip_policy_drops_unknown_chars():
    assert decode(encode("aXbYc", INDEX, OovPolicy.SKIP), VOCAB) == "abc"
    assert encode("XYZ", INDEX, OovPolicy.SKIP).size == 0


def test_replace_policy_substitutes_a_vocab_char():
    assert decode(encode("aXb’Y", INDEX, OovPolicy.REPLACE, " "), VOCAB) == "a b’ "


@pytest.mark.parametrize("replacement", [None, "", "ab", "?"])
def test_replace_policy_needs_one_vocab_char(replacement):
    with pytest.raises(InvalidParameterError) as e:
        encode("abc", INDEX, OovPolicy.REPLACE, replacement)
    assert e.value.field == "oov_replacement"


def test_code_points_not_bytes():
    # ’ is three UTF-8 bytes but one character and one token.
    assert encode("’’", INDEX).tolist() == [6, 6]
