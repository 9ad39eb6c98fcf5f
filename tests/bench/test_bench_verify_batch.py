"""bench/verify_batch.py on the tiny Llama: the bundle's ragged graph loads and runs, and
what the bench reports about exactness holds (ONNX Runtime's right-padded chunks: a row of two or
more real tokens in one [B, T] step computes what it computes alone, bit for bit). The timings
belong to the bench, not the suite."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bench.verify_batch import measure
from bundle.manifest import hash_tree


def test_padded_rows_of_several_tokens_equal_their_one_row_steps(tiny_bundle: Any) -> None:
    bundle = Path(tiny_bundle("llama", "cpu"))
    before = hash_tree(bundle)
    args = argparse.Namespace(rows=3, position=8, tokens=[1, 4], threads=1, repeat=1)
    result = measure(bundle, args)
    assert result.same == 0.0  # every row 4 tokens
    assert [n for n, _ in result.ragged] == [1, 2, 4]
    assert all(d == 0.0 for n, d in result.ragged if n >= 2), result.ragged
    assert [t for t, _, _ in result.times] == [1, 4]
    assert all(one > 0 and rows > 0 for _, one, rows in result.times)
    assert hash_tree(bundle) == before  # the bench changes nothing in the bundle
