"""What differs between the vLLM releases the simulator can impersonate (``--vllm-version``).

Each fact was read in that release's own code (``vllm/distributed/kv_events.py`` and
``vllm/v1/core/kv_cache_utils.py`` from its wheel) and is what a consumer of its KV events
sees: the event form on the wire, the extra keys in the block hash and in the events, the
replay socket's frames, and how NONE_HASH is seeded when PYTHONHASHSEED is unset.

========  ===========  ==============  ===============  ===========  =============  ==========
release   event form   LoRA in hash    extra keys in    group_idx    replay frames  NONE_HASH
                                       events                                       unseeded
========  ===========  ==============  ===============  ===========  =============  ==========
0.10      array, 6     int id          no               no           no topic       random
0.11      array, 6     int id          no               no           no topic       random
0.14      array, 7     name            no               no           no topic       random
0.20      array, 9     name            untagged         yes          no topic       random
0.27      map          name            untagged         yes          topic          random
0.33      map          ("lora", name,  untagged         yes          topic          fixed for
                       path) tagged                                                 sha256*
========  ===========  ==============  ===============  ===========  =============  ==========

The cache salt is hashed into block 0 untagged up to 0.27 and as ``("cache_salt", salt)`` in
0.33; lookahead block hashes (EAGLE drafters) exist from 0.33 on. Replay end marker: ``[b"",
END]`` without a topic frame up to 0.20, ``[b"", b"", END]`` (an empty topic) from 0.27 on.
"""

from __future__ import annotations

from dataclasses import dataclass

#: the releases, newest last; ``profile("0.20.0")`` and ``profile("0.20")`` are the same
RELEASES = ("0.10", "0.11", "0.14", "0.20", "0.27", "0.33")


@dataclass(frozen=True, slots=True)
class VllmProfile:
    release: str
    #: BlockStored array length on the wire (6, 7, 9), or 0 for the tagged map form
    array_fields: int
    lora_hash: str  # "id" | "name" | "tagged"
    salt_tagged: bool
    extra_keys_in_events: bool
    replay_topic: bool
    seeded_none_hash: bool  # unseeded NONE_HASH is "vllm-none-hash" (else random per process)
    lookahead: bool

    def hash_extra(self, lora: str | None, lora_id: int | None, lora_path: str | None, salt: str | None, block: int) -> tuple | None:
        """The extra keys vLLM hashes into ``block`` for a request with this LoRA and salt."""
        keys: list = []
        if lora:
            if self.lora_hash == "tagged":
                keys.append(("lora", lora, lora_path or f"/adapters/{lora}"))
            elif self.lora_hash == "name":
                keys.append(lora)
            else:
                keys.append(lora_id)
        if salt and block == 0:
            keys.append(("cache_salt", salt) if self.salt_tagged else salt)
        return tuple(keys) or None

    def event_extra(self, lora: str | None, salt: str | None, block: int) -> list | None:
        """The block's entry in BlockStored ``extra_keys`` (untagged), when events carry them."""
        if not self.extra_keys_in_events:
            return None
        keys = ([lora] if lora else []) + ([salt] if salt and block == 0 else [])
        return keys or None


def profile(version: str) -> VllmProfile:
    """The profile of a release given as ``0.20`` or ``0.20.0`` (ValueError for others)."""
    release = ".".join(version.strip().split(".")[:2])
    if release not in RELEASES:
        raise ValueError(f"unknown vLLM release {version!r}; the simulator knows {', '.join(RELEASES)}")
    at = RELEASES.index(release)
    return VllmProfile(
        release=release,
        array_fields=(6, 6, 7, 9, 0, 0)[at],
        lora_hash=("id", "id", "name", "name", "name", "tagged")[at],
        salt_tagged=release == "0.33",
        extra_keys_in_events=at >= RELEASES.index("0.20"),
        replay_topic=at >= RELEASES.index("0.27"),
        seeded_none_hash=release == "0.33",
        lookahead=release == "0.33",
    )
