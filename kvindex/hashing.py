"""Block hashing: vLLM's prefix-cache hashes (bit-exact) and kvgate's own block keys.

Two families live here on purpose:

* ``vllm_block_hashes`` reproduces what a vLLM replica computes for its prefix cache
  (``--prefix-caching-hash-algo`` sha256 / sha256_cbor / xxhash / xxhash_cbor, seeded by
  PYTHONHASHSEED or the fixed "vllm-none-hash" string). The simulator needs it to behave like
  vLLM, and tests use it to cross-check the events a replica publishes.
* ``block_keys`` is the gateway's own 64-bit chained key. The index is keyed by it so that a
  lookup never depends on which hash algorithm or seed a replica was started with: the
  indexer recomputes these keys from the ``token_ids`` that every BlockStored event carries.
  This runs on every request, so it is written for speed (one xxh3_64 call per block over a
  contiguous buffer, no per-token Python work).
"""

from __future__ import annotations

import hashlib
import pickle
import sys
from array import array
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from typing import Any

import cbor2
import msgspec
import xxhash

HASH_ALGOS = ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor")

#: Seed vLLM (>= mid-2026) derives NONE_HASH from when PYTHONHASHSEED is unset and the
#: algorithm is cryptographic. For the xxhash variants vLLM draws a random seed instead, so
#: operators who want the gateway to reproduce those hashes must set PYTHONHASHSEED.
DEFAULT_NONE_HASH_SEED = "vllm-none-hash"


def _pickle_bytes(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=5)


def _cbor_bytes(obj: Any) -> bytes:
    return cbor2.dumps(obj, canonical=True)


def _sha256_pickle(obj: Any) -> bytes:
    return hashlib.sha256(_pickle_bytes(obj)).digest()


def _sha256_cbor(obj: Any) -> bytes:
    return hashlib.sha256(_cbor_bytes(obj)).digest()


def _xxh128_pickle(obj: Any) -> bytes:
    return xxhash.xxh3_128_digest(_pickle_bytes(obj))


def _xxh128_cbor(obj: Any) -> bytes:
    return xxhash.xxh3_128_digest(_cbor_bytes(obj))


_HASH_FUNCTIONS: dict[str, Callable[[Any], bytes]] = {
    "sha256": _sha256_pickle,
    "sha256_cbor": _sha256_cbor,
    "xxhash": _xxh128_pickle,
    "xxhash_cbor": _xxh128_cbor,
}


def hash_function(algo: str) -> Callable[[Any], bytes]:
    """The object-hashing function vLLM uses for ``--prefix-caching-hash-algo algo``."""
    try:
        return _HASH_FUNCTIONS[algo]
    except KeyError:
        raise ValueError(f"unknown hash algorithm {algo!r}; expected one of {', '.join(HASH_ALGOS)}") from None


@lru_cache(maxsize=64)
def none_hash(algo: str = "sha256", seed: str | None = None) -> bytes:
    """NONE_HASH: the parent digest of block 0, ``H(seed)``.

    ``seed`` is the replica's PYTHONHASHSEED; None means it was unset, in which case vLLM uses
    the fixed string "vllm-none-hash". (For the xxhash variants vLLM would use a random seed;
    we use the fixed string too so that a simulator fleet agrees, and document that real
    xxhash fleets must set PYTHONHASHSEED.)
    """
    fn = hash_function(algo)
    return fn(DEFAULT_NONE_HASH_SEED if seed is None else seed)


def hash_block_tokens(
    algo: str,
    parent: bytes | None,
    token_ids: Sequence[int],
    extra_keys: tuple | None = None,
    seed: str | None = None,
) -> bytes:
    """One block's digest: ``H((parent_digest, tuple(token_ids), extra_keys))``."""
    if not parent:
        parent = none_hash(algo, seed)
    return hash_function(algo)((parent, tuple(token_ids), extra_keys))


def vllm_block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    algo: str = "sha256",
    seed: str | None = None,
    extra_keys: Sequence[tuple | None] | None = None,
) -> list[bytes]:
    """vLLM's prefix-cache digests for every *full* block of ``token_ids``.

    ``extra_keys[i]`` is block i's extra-key tuple exactly as vLLM passes it to the hash (for
    0.33, tagged entries such as ``(("cache_salt", "tenant-a"),)``), or None. A trailing
    partial block is never hashed, as in vLLM.
    """
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    fn = hash_function(algo)
    parent = none_hash(algo, seed)
    n_full = len(token_ids) // block_size
    out: list[bytes] = []
    for i in range(n_full):
        extra = extra_keys[i] if extra_keys is not None and i < len(extra_keys) else None
        block = tuple(token_ids[i * block_size : (i + 1) * block_size])
        parent = fn((parent, block, extra))
        out.append(parent)
    return out


def event_hash(digest: bytes) -> int:
    """The unsigned 64-bit int vLLM publishes in KV events: the digest's last 8 bytes, big-endian."""
    return int.from_bytes(digest[-8:], "big")


# ---------------------------------------------------------------------------------------------
# kvgate's own block keys
# ---------------------------------------------------------------------------------------------

_BIG_ENDIAN = sys.byteorder == "big"


@lru_cache(maxsize=4096)
def root_key(model: str, lora: str | None = None, salt: str | None = None) -> int:
    """The chain's seed: everything that separates otherwise identical token blocks.

    Model, LoRA adapter and cache salt go into the root only; chaining carries them into
    every later block, exactly as vLLM's salt on block 0 does.
    """
    material = "\x00".join(("kvgate/v1", model, lora or "", salt or "")).encode()
    return xxhash.xxh3_64_intdigest(material)


def block_keys(
    token_ids: Sequence[int],
    block_size: int,
    *,
    model: str,
    lora: str | None = None,
    salt: str | None = None,
    lookahead: int = 0,
) -> list[int]:
    """kvgate's chained 64-bit keys for every full block of ``token_ids``.

    ``key_i = xxh3_64(block_i's token ids as uint32 little-endian, seed=key_{i-1})`` with
    ``key_{-1} = root_key(model, lora, salt)``. The tokens are packed once into one buffer;
    each block costs one hash call on a memoryview slice. With ``lookahead`` L > 0 (vLLM
    0.33's lookahead block hashes for EAGLE-style drafters) each block's bytes also cover the L
    tokens after it, and a block is keyed only once those tokens exist, as vLLM hashes it.
    """
    return chain_keys(root_key(model, lora, salt), token_ids, block_size, lookahead)


def chain_keys(parent: int, token_ids: Sequence[int], block_size: int, lookahead: int = 0) -> list[int]:
    """Continue a key chain from ``parent`` over the full blocks of ``token_ids``.

    The indexer calls this with the parent key of a BlockStored event; the request path calls
    it (through ``block_keys``) with the root key. Both must agree bit for bit.
    """
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    if lookahead < 0:
        raise ValueError("lookahead must not be negative")
    n_full = max(0, len(token_ids) - lookahead) // block_size
    if n_full == 0:
        return []
    covered = n_full * block_size + lookahead
    try:
        # the whole list, trailing partial block included: cheaper than copying a slice first
        packed = array("I", token_ids)
    except OverflowError:  # a value out of uint32 range; only the covered tokens must fit
        packed = array("I", token_ids[:covered])
    if _BIG_ENDIAN:
        packed.byteswap()
    buf = packed.tobytes()
    stride = block_size * 4
    width = stride + lookahead * 4
    h = xxhash.xxh3_64_intdigest
    key = parent
    # a comprehension with the seed passed positionally: ~15% faster than an explicit loop
    return [key := h(buf[o : o + width], key) for o in range(0, n_full * stride, stride)]


#: separates a block's opaque extra keys from its tokens in ``detailed_chain``
OPAQUE_TAG = b"\xffkvgate-opaque"


def detailed_chain(
    parent: int,
    token_ids: Sequence[int],
    block_size: int,
    lookahead: Sequence[Sequence[int]] | int = 0,
    opaque: Mapping[int, Sequence[Any]] | None = None,
) -> list[int]:
    """``chain_keys`` block by block, for blocks whose vLLM hash covers more than their tokens.

    ``lookahead`` is either L (each block also hashes the L tokens after it, from
    ``token_ids``) or, as events carry them, one list of lookahead tokens per block.
    ``opaque`` maps a block index to the extra keys vLLM hashed into it besides LoRA and salt
    (multimodal ``(identifier, offset)`` pairs, prompt-embedding digests, as events list them):
    they are mixed into that block's key, so the key and every later one in the chain differ
    from a text prompt's, as vLLM's hashes do. Equal to ``chain_keys`` when neither is given.
    Stops before the first block that cannot be keyed (a token out of uint32 range, extras
    that cannot be encoded): the keys up to there are returned.
    """
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    per_block = not isinstance(lookahead, int)
    width = 0 if per_block else int(lookahead)  # type: ignore[arg-type]
    n = max(0, len(token_ids) - width) // block_size
    if per_block:
        n = min(n, len(lookahead))  # type: ignore[arg-type]
    h = xxhash.xxh3_64_intdigest
    opaque = opaque or {}
    key = parent
    out: list[int] = []
    for i in range(n):
        lo = i * block_size
        try:
            if per_block:
                data = pack_tokens(token_ids[lo : lo + block_size]) + pack_tokens(lookahead[i])  # type: ignore[index]
            else:
                data = pack_tokens(token_ids[lo : lo + block_size + width])
            key = h(data, key)
            extras = opaque.get(i)
            if extras:
                key = h(OPAQUE_TAG + msgspec.msgpack.encode(list(extras)), key)
        except (OverflowError, TypeError, msgspec.EncodeError):
            break
        out.append(key)
    return out


def pack_tokens(token_ids: Sequence[int]) -> bytes:
    """Token ids as the uint32 little-endian bytes ``chain_keys`` hashes."""
    packed = array("I", token_ids)
    if _BIG_ENDIAN:
        packed.byteswap()
    return packed.tobytes()
