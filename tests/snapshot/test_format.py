"""Chunk headers built from a template per restore (driftwood/snapshot/format.ChunkHeaders)
are the bytes chunk_header writes, for any layout, parent, start and length, and still parse
as the safetensors header they claim to be."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from driftwood.snapshot.format import KV_DTYPES, ChunkHeaders, KVLayout, chunk_header

HEX = "0123456789abcdef"
layouts = st.builds(KVLayout, dtype=st.sampled_from(sorted(KV_DTYPES)), n_layers=st.integers(1, 200),
                    n_kv_heads=st.integers(1, 64), head_dim=st.integers(1, 512), chunk_tokens=st.integers(1, 4096))
# addresses (the fast path) and anything else a caller could pass (the slow path)
parents = st.one_of(st.text(HEX, min_size=32, max_size=32), st.text(max_size=40))
identities = st.one_of(st.text(HEX, min_size=32, max_size=32), st.text(max_size=40),
                       st.just('"<parent>"'), st.just('x"<start>"'))


@given(identity=identities, kv=layouts,
       chunks=st.lists(st.tuples(parents, st.integers(0, 1 << 40), st.integers(1, 4096)), min_size=1, max_size=8))
def test_template_headers_equal_chunk_header(identity, kv, chunks):
    headers = ChunkHeaders(identity, kv)
    for parent, start, count in chunks:
        got = headers(parent, start, count)
        assert got == chunk_header(identity, kv, parent, start, count)
        n = int.from_bytes(got[:8], "little")
        assert n == len(got) - 8 and n % 8 == 0
        meta = json.loads(got[8:])["__metadata__"]
        assert (meta["parent"], meta["start"], meta["model"]) == (parent, str(start), identity)
