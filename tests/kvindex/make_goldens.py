"""Write golden KV-event payloads with vLLM's own classes (run by hand; CI never downloads vLLM).

Usage (one vLLM release at a time; the wheel is only read, never installed)::

    pip download --no-deps vllm==0.33.0 -d /tmp/vllm-0.33.0
    .venv/bin/python tests/kvindex/make_goldens.py /tmp/vllm-0.33.0/vllm-0.33.0-*.whl 0.33.0

The first argument is a vLLM wheel or a ``vllm/distributed/kv_events.py`` taken from one (e.g.
``git show v0.20.0:vllm/distributed/kv_events.py``). Only that one module is loaded; what it
imports from the rest of vLLM (its config, logger, network helpers and the ``ExternalBlockHash``
alias) is stubbed with minimal modules, so vLLM's ``EventBatch`` / ``BlockStored`` /
``BlockRemoved`` / ``AllBlocksCleared`` are the release's own msgspec structs. Payloads are
encoded with ``msgspec.msgpack.Encoder().encode(batch)``, which is what ``ZmqEventPublisher``
does with each batch (``self._pack.encode(event)``).

Output: ``tests/kvindex/goldens/vllm-<version>.json`` holding

* ``schema``: msgspec's JSON schema of the release's event structs and their field order
  (the reference types for ``test_kvindex_crosscheck.py``);
* ``batches``: each payload (hex) with the events as vLLM's ``msgspec.to_builtins`` gives them;
* ``lookups``: after which batch which prompt must match how many blocks: the expectations of
  the scenario below, written here by hand, not computed by kvindex's code. They state the
  index's contract of tracking the primary group (group 0) only: group-1 events never change
  a group-0 match (see ``kvindex.event_rules.is_primary_group`` for what that leaves open).

Scenario (block size 4): a hybrid model (group 0 full attention, group 1 sliding window, both
publishing the same block hashes, as vLLM's hybrid allocator does) caches prompt P (3 blocks,
LoRA "ad", cache salt "salt-a") in both groups; group 1 evicts P's last two blocks (P must
still match 3 blocks); group 0 evicts P's last block (2); prompt Q (plain, raw-bytes hashes,
lookahead ids where the release has them) is cached in group 0 and prompt R in group 1 only
(R must match nothing); then the cache is cleared. Releases without ``group_idx`` skip the
group-1 events; releases without ``lora_name``/``extra_keys`` (0.10) use no LoRA and no salt.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import sys
import types
import zipfile
from pathlib import Path
from typing import Any

import msgspec

GOLDENS = Path(__file__).parent / "goldens"
KV_EVENTS = "vllm/distributed/kv_events.py"
BS = 4
MODEL = "golden-model"


def _stub(name: str, **attrs: Any) -> None:
    mod = sys.modules.get(name) or types.ModuleType(name)
    for k, v in attrs.items():
        setattr(mod, k, v)
    sys.modules[name] = mod


def load_kv_events(source: bytes, version: str) -> types.ModuleType:
    """Load vLLM's ``kv_events.py`` alone, its vLLM imports stubbed."""

    class KVEventsConfig:  # only annotated by kv_events.py
        pass

    def unavailable(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("stubbed: not needed to encode events")

    for pkg in ("vllm", "vllm.config", "vllm.utils", "vllm.v1", "vllm.v1.core", "vllm.distributed"):
        _stub(pkg, __path__=[])
    _stub("vllm.config.kv_events", KVEventsConfig=KVEventsConfig)
    _stub("vllm.logger", init_logger=logging.getLogger)
    _stub("vllm.utils.network_utils", get_ip=unavailable, get_tcp_uri=unavailable, is_valid_ipv6_address=unavailable, split_zmq_path=unavailable)
    _stub("vllm.v1.core.kv_cache_utils", ExternalBlockHash=bytes | int)
    name = f"vllm_kv_events_{version.replace('.', '_')}"
    spec = importlib.util.spec_from_loader(name, loader=None)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    exec(compile(source, f"vllm-{version}/{KV_EVENTS}", "exec"), mod.__dict__)
    return mod


def read_source(path: Path) -> bytes:
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as whl:
            return whl.read(KV_EVENTS)
    return path.read_bytes()


def _fields(cls: type) -> list[str]:
    return [f.name for f in msgspec.structs.fields(cls)]


def _hashes(base: int, n: int) -> list[int]:
    return [(base << 32) | i for i in range(n)]


def scenario(vm: types.ModuleType) -> tuple[list[Any], list[dict[str, Any]]]:
    """vLLM's own batches for the scenario, and the lookups they must answer."""
    stored = set(_fields(vm.BlockStored))
    has_names = "lora_name" in stored
    has_extra = "extra_keys" in stored
    has_group = "group_idx" in stored
    has_lookahead = "lookahead_token_ids" in stored

    def block_stored(**kw: Any) -> Any:
        kw = {k: v for k, v in kw.items() if k in stored}
        return vm.BlockStored(**kw)

    def block_removed(**kw: Any) -> Any:
        names = set(_fields(vm.BlockRemoved))
        return vm.BlockRemoved(**{k: v for k, v in kw.items() if k in names})

    lora = "ad" if has_names else None
    salt = "salt-a" if has_extra else None
    p_tokens = list(range(100, 112))
    p_hashes = _hashes(0xA11CE, 3)
    p_extra = [(lora, salt) if lora else (salt,), (lora,) if lora else None, (lora,) if lora else None] if has_extra else None
    p_common = dict(
        block_hashes=p_hashes,
        parent_block_hash=None,
        token_ids=p_tokens,
        block_size=BS,
        lora_id=3 if lora else None,
        medium="GPU",
        lora_name=lora,
        extra_keys=p_extra,
        session_id="session-1",
    )
    q_tokens = list(range(200, 208))
    q_hashes: list[Any] = [hashlib.sha256(bytes([i])).digest() for i in range(2)]
    r_tokens = list(range(300, 304))
    r_hashes = _hashes(0xBEEF, 1)
    sw = dict(kv_cache_spec_kind="sliding_window", kv_cache_spec_sliding_window=8)
    full = dict(kv_cache_spec_kind="full_attention")

    batch_cls = getattr(vm, "KVEventBatch", vm.EventBatch)
    batches: list[list[Any]] = []
    lookups: list[dict[str, Any]] = []

    def look(tokens: list[int], blocks: int, *, with_lora: bool = True, with_salt: bool = True, note: str) -> None:
        lookups.append(
            dict(
                after_batch=len(batches) - 1,
                tokens=tokens,
                lora=lora if with_lora else None,
                salt=salt if with_salt else None,
                blocks=blocks,
                note=note,
            )
        )

    # 0: P cached in group 0 (and group 1 on a hybrid model)
    evs = [block_stored(**p_common, group_idx=0, **full)]
    if has_group:
        evs.append(block_stored(**p_common, group_idx=1, **sw))
    batches.append(evs)
    look(p_tokens, 3, note="P stored in group 0")
    if salt:
        look(p_tokens, 0, with_salt=False, note="P without its salt is another prompt")
    if lora:
        look(p_tokens, 0, with_lora=False, note="P without its LoRA is another prompt")

    # 1: group 1 (sliding window) evicts P's blocks 1-2: group 0 still holds them
    if has_group:
        batches.append([block_removed(block_hashes=p_hashes[1:], medium="GPU", group_idx=1)])
        look(p_tokens, 3, note="a group-1 removal leaves group-0 entries alone")

    # 2: group 0 evicts P's last block
    batches.append([block_removed(block_hashes=p_hashes[2:], medium="GPU", group_idx=0)])
    look(p_tokens, 2, note="group-0 removal of P's block 2")

    # 3: Q in group 0 (raw-bytes hashes, lookahead ids), R in group 1 only
    q = dict(
        block_hashes=q_hashes,
        parent_block_hash=None,
        token_ids=q_tokens,
        block_size=BS,
        lora_id=None,
        medium="GPU",
        lora_name=None,
        extra_keys=[None, None] if has_extra else None,
        group_idx=0,
    )
    if has_lookahead:
        q["lookahead_token_ids"] = [q_tokens[4:6], [900, 901]]
    evs = [block_stored(**q)]
    if has_group:
        evs.append(
            block_stored(
                block_hashes=r_hashes,
                parent_block_hash=None,
                token_ids=r_tokens,
                block_size=BS,
                lora_id=None,
                medium="GPU",
                lora_name=None,
                extra_keys=[None],
                group_idx=1,
                **sw,
            )
        )
    batches.append(evs)
    look(q_tokens, 2, with_lora=False, with_salt=False, note="Q stored in group 0")
    if has_group:
        look(r_tokens, 0, with_lora=False, with_salt=False, note="R is cached in group 1 only")
    look(p_tokens, 2, note="P unchanged by Q and R")

    # 4: cleared
    batches.append([vm.AllBlocksCleared()])
    look(p_tokens, 0, note="cleared")
    look(q_tokens, 0, with_lora=False, with_salt=False, note="cleared")

    return [batch_cls(ts=1700000000.0 + i, events=evs, data_parallel_rank=0) for i, evs in enumerate(batches)], lookups


def _event_fields(ev: Any) -> dict[str, Any]:
    """Every field of vLLM's event (defaults included); raw-digest hashes as hex strings."""
    out: dict[str, Any] = {"type": type(ev).__name__}
    for name in _fields(type(ev)):
        value = getattr(ev, name)
        if name == "block_hashes":
            value = [h.hex() if isinstance(h, bytes) else h for h in value]
        elif name == "parent_block_hash" and isinstance(value, bytes):
            value = value.hex()
        out[name] = msgspec.to_builtins(value)
    return out


def _schema(cls: type) -> dict[str, Any]:
    return {"fields": _fields(cls), "json_schema": msgspec.json.schema(cls)}


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        sys.exit(__doc__)
    source = read_source(Path(argv[0]))
    version = argv[1]
    vm = load_kv_events(source, version)
    batches, lookups = scenario(vm)
    enc = msgspec.msgpack.Encoder()  # what ZmqEventPublisher encodes each batch with
    sample = batches[0].events[0]
    form = "array" if msgspec.msgpack.decode(enc.encode(sample), type=Any).__class__ is list else "map"
    doc = {
        "vllm_version": version,
        "source": f"vllm {version}: {KV_EVENTS} (sha256 {hashlib.sha256(source).hexdigest()})",
        "generator": "tests/kvindex/make_goldens.py",
        "event_form": form,
        "model": MODEL,
        "block_size": BS,
        "schema": {c: _schema(getattr(vm, c)) for c in ("EventBatch", "BlockStored", "BlockRemoved", "AllBlocksCleared")},
        "batches": [
            {
                "seq": i,
                "payload": enc.encode(b).hex(),
                "events": [_event_fields(e) for e in b.events],
            }
            for i, b in enumerate(batches)
        ],
        "lookups": lookups,
    }
    GOLDENS.mkdir(exist_ok=True)
    out = GOLDENS / f"vllm-{version}.json"
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out} ({form} form, {len(batches)} batches)")


if __name__ == "__main__":
    main(sys.argv[1:])
