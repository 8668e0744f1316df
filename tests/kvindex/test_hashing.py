"""vLLM block hashes, checked against encodings built by hand from the pickle and CBOR specs.

vLLM's hash of block i is ``H((parent_digest, tuple(block_tokens), extra_keys))`` where H is
sha256 or xxh3_128 over either ``pickle.dumps(obj, protocol=5)`` or canonical CBOR, and block
0's parent is ``H(seed)`` with seed = PYTHONHASHSEED or "vllm-none-hash". Below, the byte
strings are produced by tiny encoders written from the format specifications (not by pickle
or cbor2), hashed with hashlib/xxhash, and compared with kvindex.hashing; a few results are
also pinned as literals so that a change in a library's encoding would show up here.
"""

from __future__ import annotations

import hashlib
import struct
from array import array

import pytest
import xxhash

from kvindex.hashing import (
    block_keys,
    chain_keys,
    event_hash,
    none_hash,
    root_key,
    vllm_block_hashes,
)

# -- a hand-written pickle (protocol 5) encoder for exactly the shapes vLLM hashes ---------------


def _p_int(v: int) -> bytes:
    if 0 <= v < 256:
        return b"K" + bytes([v])  # BININT1
    if 0 <= v < 65536:
        return b"M" + struct.pack("<H", v)  # BININT2
    if -(2**31) <= v < 2**31:
        return b"J" + struct.pack("<i", v)  # BININT
    raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw  # LONG1


def _p_obj(v) -> bytes:
    if v is None:
        return b"N"
    if isinstance(v, int):
        return _p_int(v)
    if isinstance(v, bytes):
        assert len(v) < 256
        return b"C" + bytes([len(v)]) + v + b"\x94"  # SHORT_BINBYTES, MEMOIZE
    if isinstance(v, str):
        raw = v.encode()
        assert len(raw) < 256
        return b"\x8c" + bytes([len(raw)]) + raw + b"\x94"  # SHORT_BINUNICODE, MEMOIZE
    if isinstance(v, tuple):
        body = b"".join(_p_obj(x) for x in v)
        if len(v) == 0:
            return b")"
        if len(v) <= 3:
            return body + {1: b"\x85", 2: b"\x86", 3: b"\x87"}[len(v)] + b"\x94"  # TUPLE1..3, MEMOIZE
        return b"(" + body + b"t\x94"  # MARK ... TUPLE, MEMOIZE
    raise TypeError(v)


def hand_pickle(v) -> bytes:
    body = _p_obj(v) + b"."  # STOP
    frame = b"\x95" + struct.pack("<Q", len(body)) if len(body) >= 4 else b""  # FRAME
    return b"\x80\x05" + frame + body  # PROTO 5


# -- a hand-written canonical CBOR encoder ----------------------------------------------------------


def _c_head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes([major << 5 | n])
    for info, fmt in ((24, ">B"), (25, ">H"), (26, ">I"), (27, ">Q")):
        if n < 1 << (8 * struct.calcsize(fmt)):
            return bytes([major << 5 | info]) + struct.pack(fmt, n)
    raise ValueError(n)


def hand_cbor(v) -> bytes:
    if v is None:
        return b"\xf6"
    if isinstance(v, int):
        return _c_head(0, v) if v >= 0 else _c_head(1, -1 - v)
    if isinstance(v, bytes):
        return _c_head(2, len(v)) + v
    if isinstance(v, str):
        raw = v.encode()
        return _c_head(3, len(raw)) + raw
    if isinstance(v, (tuple, list)):
        return _c_head(4, len(v)) + b"".join(hand_cbor(x) for x in v)
    raise TypeError(v)


HASHERS = {
    "sha256": lambda o: hashlib.sha256(hand_pickle(o)).digest(),
    "sha256_cbor": lambda o: hashlib.sha256(hand_cbor(o)).digest(),
    "xxhash": lambda o: xxhash.xxh3_128_digest(hand_pickle(o)),
    "xxhash_cbor": lambda o: xxhash.xxh3_128_digest(hand_cbor(o)),
}


def reference_hashes(tokens, bs, algo, seed, extra=None):
    h = HASHERS[algo]
    parent = h(seed if seed is not None else "vllm-none-hash")
    out = []
    for i in range(len(tokens) // bs):
        e = extra[i] if extra is not None and i < len(extra) else None
        parent = h((parent, tuple(tokens[i * bs : (i + 1) * bs]), e))
        out.append(parent)
    return out


TOKENS = [1, 200, 300, 70000, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 2**31 + 5] * 3 + [42, 43]


@pytest.mark.parametrize("algo", ["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"])
@pytest.mark.parametrize("seed", [None, "0", "12345"])
@pytest.mark.parametrize("bs", [16, 4])
def test_block_hashes_match_hand_encodings(algo, seed, bs):
    ours = vllm_block_hashes(TOKENS, bs, algo, seed)
    assert ours == reference_hashes(TOKENS, bs, algo, seed)
    assert len(ours) == len(TOKENS) // bs  # the trailing partial block is never hashed
    assert none_hash(algo, seed) == HASHERS[algo](seed if seed is not None else "vllm-none-hash")


@pytest.mark.parametrize("algo", ["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"])
def test_extra_keys_in_tagged_form(algo):
    extra = [(("cache_salt", "tenant-a"), ("lora", "sql", "/adapters/sql")), (("lora", "sql", "/adapters/sql"),), None]
    ours = vllm_block_hashes(TOKENS, 16, algo, "0", extra)
    assert ours == reference_hashes(TOKENS, 16, algo, "0", extra)
    assert ours[0] != vllm_block_hashes(TOKENS, 16, algo, "0")[0]


def test_pinned_literals():
    """Regression pins (computed via the hand encoders above)."""
    toks = list(range(16))
    assert hand_pickle("vllm-none-hash").hex() == "80059512000000000000008c0e766c6c6d2d6e6f6e652d6861736894" + "2e"
    assert hand_cbor("vllm-none-hash").hex() == "6e766c6c6d2d6e6f6e652d68617368"
    assert none_hash("sha256").hex() == hashlib.sha256(bytes.fromhex("80059512000000000000008c0e766c6c6d2d6e6f6e652d68617368942e")).hexdigest()
    assert none_hash("sha256_cbor").hex() == hashlib.sha256(bytes.fromhex("6e766c6c6d2d6e6f6e652d68617368")).hexdigest()
    d = vllm_block_hashes(toks, 16, "sha256")[0]
    assert d == hashlib.sha256(hand_pickle((none_hash("sha256"), tuple(toks), None))).digest()
    assert event_hash(d) == int.from_bytes(d[-8:], "big")


def test_event_hash_is_last_8_bytes_big_endian():
    d = bytes(range(32))
    assert event_hash(d) == 0x18191A1B1C1D1E1F
    assert event_hash(bytes(16) + b"\xff" * 8 + b"\x00" * 7 + b"\x01") == 1


def test_block_keys_chain_and_separation():
    toks = list(range(100))
    keys = block_keys(toks, 16, model="m")
    assert len(keys) == 6 and len(set(keys)) == 6
    assert keys == block_keys(toks, 16, model="m")  # deterministic
    assert chain_keys(keys[1], toks[32:], 16) == keys[2:]  # continuing a chain = the suffix
    assert chain_keys(root_key("m"), toks, 16) == keys
    assert block_keys(toks, 16, model="m2")[0] != keys[0]
    assert block_keys(toks, 16, model="m", lora="a")[0] != keys[0]
    assert block_keys(toks, 16, model="m", salt="t")[0] != keys[0]
    # same block content at another position is another key (prefix semantics)
    rep = [7] * 32
    k = block_keys(rep, 16, model="m")
    assert k[0] != k[1]


def test_block_keys_definition_and_large_tokens():
    toks = [2**32 - 1, 2**31, 0, 1] * 4
    k = block_keys(toks, 16, model="m")
    expected = xxhash.xxh3_64_intdigest(array("I", toks).tobytes(), seed=root_key("m"))
    assert k == [expected]
    assert block_keys(toks[:15], 16, model="m") == []


PINNED = {
    # block 0 = tokens 0..15, block size 16: (default seed, PYTHONHASHSEED="0")
    "sha256": ("fe8fa5dda3210d0ca2031e37cbe3b001186773cd1c710beb2d45fcb51d434798", "6358e31578a64b75ebe28cdb99d3beae65de82a2087321dc6ec84ae048faaaa6"),
    "sha256_cbor": ("dc918a88b139e5afe60b88eda27508d4aee16c10fdc354791efea06206ac0749", "d830de3d42c00f25a2949b5d12d98642664a44872c1614c5b0147556276afc9c"),
    "xxhash": ("25a8f374f040077e10f5b68a5399fbae", "8ef953407c0da43eacbb3639ed2bff4d"),
    "xxhash_cbor": ("f2313f4548e185b1a011187a342021cc", "209f5d549fc07c8e39d823615ede61ce"),
}


@pytest.mark.parametrize("algo", sorted(PINNED))
def test_pinned_digests(algo):
    default, seeded = PINNED[algo]
    assert vllm_block_hashes(list(range(16)), 16, algo)[0].hex() == default
    assert vllm_block_hashes(list(range(16)), 16, algo, "0")[0].hex() == seeded
    assert reference_hashes(list(range(16)), 16, algo, None)[0].hex() == default
