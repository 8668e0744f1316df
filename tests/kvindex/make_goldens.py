"""Golden KV-event files written by vLLM's own code, one per release (run by hand; CI never downloads vLLM).

Usage (one command per release; the wheel is only read, never installed)::

    python3 -m venv /tmp/genvenv && /tmp/genvenv/bin/pip install msgspec pyzmq cbor2
    for v in 0.10.2 0.11.0 0.14.0 0.20.0 0.27.0 0.33.0; do pip download --no-deps vllm==$v -d /tmp/vllm-$v; done
    /tmp/genvenv/bin/python tests/kvindex/make_goldens.py /tmp/vllm-0.10.2/vllm-0.10.2-*.whl 0.10.2
    /tmp/genvenv/bin/python tests/kvindex/make_goldens.py /tmp/vllm-0.11.0/vllm-0.11.0-*.whl 0.11.0
    /tmp/genvenv/bin/python tests/kvindex/make_goldens.py /tmp/vllm-0.14.0/vllm-0.14.0-*.whl 0.14.0
    /tmp/genvenv/bin/python tests/kvindex/make_goldens.py /tmp/vllm-0.20.0/vllm-0.20.0-*.whl 0.20.0
    /tmp/genvenv/bin/python tests/kvindex/make_goldens.py /tmp/vllm-0.27.0/vllm-0.27.0-*.whl 0.27.0
    /tmp/genvenv/bin/python tests/kvindex/make_goldens.py /tmp/vllm-0.33.0/vllm-0.33.0-*.whl 0.33.0

Each run takes a few seconds (binds a few free TCP ports on all interfaces, as ``tcp://*:port``
does) and writes the same file every time.

(vLLM's hashing module imports ``cbor2``, which the project's .venv does not have, hence the
throwaway venv; any Python 3.11+ with msgspec, pyzmq and cbor2 works.)

What runs for real, straight from the wheel: ``vllm/distributed/kv_events.py`` (the event structs,
``KVEventBatch`` and ``ZmqEventPublisher`` on real pyzmq sockets), ``vllm/v1/core/kv_cache_utils.py``
(``init_none_hash``, ``hash_block_tokens``, ``generate_block_hash_extra_keys``,
``get_request_block_hasher`` incl. 0.33's lookahead, ``to_event_extra_keys``,
``maybe_convert_block_hash``), ``vllm/v1/core/block_pool.py`` (``BlockPool``: ``cache_full_blocks``
builds every BlockStored, evictions and ``evict_blocks`` every BlockRemoved, ``reset_prefix_cache``
the AllBlocksCleared), ``vllm/utils/hashing.py`` (0.14+; in 0.10/0.11 the definitions of
``sha256``/``sha256_cbor``/``get_hash_fn_by_name``/``cdiv`` are taken out of ``vllm/utils/__init__.py``
with ``ast`` and executed alone), ``vllm/envs.py``, ``vllm/lora/request.py`` (``LoRARequest``),
``vllm/utils/math_utils.py``. Taken out of their modules with ``ast`` and run: 0.33's
``get_mm_features_in_window`` (``vllm/multimodal/utils.py``), ``KVCacheManager.take_events``
(``vllm/v1/core/kv_cache_manager.py``: it stamps ``kv_cache_spec_kind``/``sliding_window`` on
stores in 0.27+) and, for the values it stamps, ``KVCacheSpecKind``/``get_kv_cache_spec_kind``/
``get_kv_cache_spec_sliding_window`` (``vllm/v1/kv_cache_interface.py``) applied to stand-in
full-attention and sliding-window (8 tokens) specs.

Stubbed: every other ``vllm.*`` module is a stub whose attributes are dummy classes (``torch``
and the rest of vLLM are never imported); ``vllm.logger.init_logger`` is ``logging.getLogger``;
``vllm.v1.utils.tensor_data`` returns the float32 bytes of a small stand-in embedding matrix.
``Request`` is a stand-in holding the attributes the hasher and BlockPool read (all_token_ids,
num_tokens, block_hashes filled by vLLM's block hasher, a real ``LoRARequest``, cache_salt,
mm_features / mm_hashes+mm_positions, prompt_embeds, session_id, request_id). The scheduler and
KV-cache manager are played by this script: per step it allocates blocks from the BlockPool,
reuses the cached prefix (``get_cached_block`` + ``touch``), calls ``cache_full_blocks`` per KV
cache group, frees a finished request's blocks tail first (as vLLM's managers do), then
publishes ``KVEventBatch(ts, events)`` with the publisher, as the scheduler does. ``ts`` is fixed
(1700000000.0 + batch index) so that reruns write identical files.

Output ``tests/kvindex/goldens/vllm-<version>.json``:

* ``schema``: msgspec's JSON schema and field order of the release's EventBatch / BlockStored /
  BlockRemoved / AllBlocksCleared (read by ``test_kvindex_crosscheck.py``);
* ``batches``: every batch in publish order across engines and DP ranks, as a SUB socket got it:
  ``engine``, ``dp_rank``, ``seq`` (that publisher's), ``topic`` and ``payload`` (hex), and
  ``events`` (``msgspec.to_builtins`` of vLLM's events, raw-digest hashes as hex strings);
* ``replay``: a DEALER's request to the main engine's rank-0 replay socket and every frame it got,
  the end marker included;
* ``lookups``: after which batch (``after_batch``: the seq of that engine/rank's publisher;
  ``after_index``: position in ``batches``), on which ``engine`` and ``dp_rank``, a request's
  ``tokens``/``lora``/``salt``/``mm``/``embeds``/``lookahead``; its ``block_hashes`` (vLLM's
  hasher), ``extras`` (per block, the extra keys vLLM would publish for it, bytes as
  ``{"hex": ...}``; null where the release publishes none), ``hash_extra_keys`` (the keys its
  hashes used; tagged in 0.33), ``lookahead_token_ids``, and ``blocks``: how many leading block
  hashes that rank's BlockPool holds in group 0 (``get_cached_block``) at that point (not capped
  at num_tokens - 1 as the scheduler's own lookup is). ``after_batch`` is null while that
  publisher has sent nothing. ``embeds`` are the rows of the prompt-embeds matrix (float32):
  0.20+ hashes (and publishes) sha256 of each block's rows as little-endian float32 bytes, 0.14
  the bytes themselves;
* ``features`` (what the release has and showed), ``hash`` (algo, seed, NONE_HASH, the LoRA
  adapter), ``engines``, ``alt_hash`` (the same prompts under sha256_cbor), ``provenance`` (which
  files ran whole, which definitions ran alone, which modules were stubs).

Scenario (block size 4, sha256, NONE_HASH seed recorded): engine ``main`` (a hybrid model where
the release publishes ``group_idx``: group 0 full attention, group 1 sliding window of 8 tokens)
with DP ranks 0 and 1 (endpoint ports offset by vLLM's ``offset_endpoint_port``); engine
``raw-bytes`` (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0``); engines ``lookahead-1`` and
``lookahead-2`` where the release has ``num_hash_lookahead_tokens``. See ``PROMPTS`` and
``Golden.run`` for the steps.
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import json
import logging
import os
import socket
import struct
import sys
import time
import types
import typing
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import zmq

GOLDENS = Path(__file__).parent / "goldens"
BS = 4
MODEL = "golden-model"
TOPIC = "kv-events"
TS0 = 1_700_000_000.0
NUM_BLOCKS = 96
SLIDING_WINDOW = 8
LORA_NAME, LORA_ID, LORA_PATH = "ad", 3, "/adapters/ad"
OLD_SEED = "0"  # PYTHONHASHSEED for releases whose NONE_HASH is random without it
IMG = 151655  # the placeholder token an image expands to (any id; both images use the same)
RECV_TIMEOUT_MS = 5000

log = logging.getLogger("make_goldens")

# ------------------------------------------------------------------------------------------
# Loading one release's modules from its wheel, the rest of vLLM stubbed
# ------------------------------------------------------------------------------------------


class _Stub:
    """A name from a stubbed vLLM module: any arguments (keywords become attributes), and
    subscriptable, so that annotations such as ``list[KVCacheSpec]`` evaluate."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)

    def __class_getitem__(cls, item: Any) -> type:
        return cls


def _stub_class(name: str, module: str) -> type:
    return type(name, (_Stub,), {"__module__": module})


class _StubModule(types.ModuleType):
    """A stubbed ``vllm.*`` module: unknown attributes become dummy classes; a submodule the
    release runs for real is imported instead."""

    def __init__(self, name: str, release: Release) -> None:
        super().__init__(name)
        self.__path__: list[str] = []
        self._release = release

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        full = f"{self.__name__}.{attr}"
        if self._release.provides(full):
            return importlib.import_module(full)
        value = _stub_class(attr, self.__name__)
        self._release.stubbed.setdefault(self.__name__, []).append(attr)
        setattr(self, attr, value)
        return value


def _defined(node: ast.stmt) -> set[str]:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return {node.name}
    if isinstance(node, ast.Assign):
        return {t.id for t in node.targets if isinstance(t, ast.Name)}
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return {node.target.id}
    return set()


def _free_names(tree: ast.AST) -> set[str]:
    """Names read but never bound anywhere in ``tree`` (module-level globals it needs)."""
    loads: set[str] = set()
    stores: set[str] = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Name):
            (loads if isinstance(n.ctx, ast.Load) else stores).add(n.id)
        elif isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            stores.add(n.name)
        elif isinstance(n, ast.arg):
            stores.add(n.arg)
        elif isinstance(n, ast.alias):
            stores.add((n.asname or n.name).split(".")[0])
    return loads - stores - set(dir(builtins))


class Release(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``vllm.*`` from one wheel: ``real`` modules run as shipped, ``extracted`` ones
    get only the named definitions of their source, everything else is a stub."""

    def __init__(self, wheel: Path, version: str) -> None:
        self.wheel, self.version = wheel, version
        self.zip = zipfile.ZipFile(wheel)
        self.names = set(self.zip.namelist())
        self.real: set[str] = set()
        self.extracted: dict[str, list[str]] = {}
        self.overrides: dict[str, dict[str, Any]] = {}
        self.ran: dict[str, str] = {}  # path -> sha256, modules executed whole
        self.took: dict[str, list[str]] = {}  # path -> definitions executed alone
        self.stubbed: dict[str, list[str]] = {}

    def path_of(self, module: str) -> str | None:
        base = module.replace(".", "/")
        return next((p for p in (f"{base}.py", f"{base}/__init__.py") if p in self.names), None)

    def source(self, path: str) -> bytes:
        return self.zip.read(path)

    def provides(self, module: str) -> bool:
        return module in self.real or module in self.extracted

    def install(self) -> None:
        for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
            del sys.modules[name]
        sys.meta_path.insert(0, self)

    # importlib protocol
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "vllm" and not fullname.startswith("vllm."):
            return None
        path = self.path_of(fullname)
        is_file = path is not None and not path.endswith("/__init__.py") and self.provides(fullname)
        return importlib.util.spec_from_loader(fullname, self, is_package=not is_file)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return None if spec.name in self.real else _StubModule(spec.name, self)

    def exec_module(self, module: types.ModuleType) -> None:
        name = module.__name__
        path = self.path_of(name)
        if name in self.real:
            assert path is not None, f"{name} is not in {self.wheel.name}"
            src = self.source(path)
            self.ran[path] = hashlib.sha256(src).hexdigest()
            exec(compile(src, f"vllm-{self.version}/{path}", "exec"), module.__dict__)
        elif name in self.extracted:
            assert path is not None
            self.exec_definitions(path, self.extracted[name], module.__dict__)
        for k, v in self.overrides.get(name, {}).items():
            setattr(module, k, v)

    def exec_definitions(self, path: str, names: Iterable[str], ns: dict[str, Any], *, method_of: str | None = None) -> dict[str, Any]:
        """Run only ``names`` (top-level definitions, or methods of class ``method_of``) of a
        release file, after its importable top-level imports; globals they read that nothing
        provides become dummy classes."""
        src = self.source(path)
        tree = ast.parse(src)
        wanted = set(names)
        if method_of is None:
            defs = [n for n in tree.body if _defined(n) & wanted]
        else:
            cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == method_of)
            defs = [n for n in cls.body if _defined(n) & wanted]
        found = set().union(*(_defined(n) for n in defs)) if defs else set()
        assert found >= wanted, f"{path}: {sorted(wanted - found)} not found"
        ns.setdefault("__name__", f"vllm_golden.{path}")
        filename = f"vllm-{self.version}/{path}"
        for node in tree.body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                try:
                    exec(compile(ast.Module([node], []), filename, "exec"), ns)
                except Exception:  # torch, numpy, PIL...: not needed by the definitions we run
                    pass
        body = ast.Module(defs, [])
        for free in _free_names(body) - ns.keys():
            ns[free] = logging.getLogger(f"vllm.{path}") if free == "logger" else _stub_class(free, path)
        exec(compile(body, filename, "exec"), ns)
        self.took.setdefault(path, []).extend(sorted(wanted))
        return ns


def _tensor_data(tensor: FakeEmbeds) -> memoryview:
    """Stand-in for ``vllm.v1.utils.tensor_data`` (a tensor's bytes): a float32 CPU tensor's
    bytes are its values as little-endian IEEE-754 floats, row-major."""
    flat = [x for row in tensor.rows for x in row]
    return memoryview(struct.pack(f"<{len(flat)}f", *flat))


@dataclass
class FakeEmbeds:
    """A (tokens x hidden) prompt-embeds matrix: vLLM only slices it by token rows and hashes
    its bytes (``tensor_data``)."""

    rows: list[list[float]]

    def __getitem__(self, idx: slice) -> FakeEmbeds:
        return FakeEmbeds(self.rows[idx])

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.rows), len(self.rows[0]) if self.rows else 0)


class Runtime:
    """One release's vLLM code, loaded."""

    def __init__(self, wheel: Path, version: str) -> None:
        rel = self.release = Release(wheel, version)
        rel.real = {
            "vllm.envs",
            "vllm.distributed.kv_events",
            "vllm.v1.core.kv_cache_utils",
            "vllm.v1.core.block_pool",
            "vllm.lora.request",
        }
        for optional in ("vllm.utils.hashing", "vllm.utils.math_utils"):
            if rel.path_of(optional):
                rel.real.add(optional)
        if "vllm.utils.hashing" not in rel.real:  # 0.10/0.11: hashing lives in vllm/utils/__init__.py
            rel.extracted["vllm.utils"] = ["sha256", "sha256_cbor", "get_hash_fn_by_name", "cdiv", "GiB_bytes"]
        mm_utils = rel.path_of("vllm.multimodal.utils")
        if mm_utils and b"def get_mm_features_in_window" in rel.source(mm_utils):
            rel.extracted["vllm.multimodal.utils"] = ["get_mm_features_in_window"]
        rel.overrides = {
            "vllm.logger": {"init_logger": logging.getLogger},
            "vllm.v1.utils": {"tensor_data": _tensor_data},
        }
        rel.install()
        self.kv_events = importlib.import_module("vllm.distributed.kv_events")
        self.kvu = importlib.import_module("vllm.v1.core.kv_cache_utils")
        self.block_pool = importlib.import_module("vllm.v1.core.block_pool")
        self.lora = importlib.import_module("vllm.lora.request")
        self.hashing = importlib.import_module("vllm.utils.hashing" if "vllm.utils.hashing" in rel.real else "vllm.utils")
        self.BlockPool = self.block_pool.BlockPool
        self.BlockStored, self.BlockRemoved = self.kv_events.BlockStored, self.kv_events.BlockRemoved
        self.AllBlocksCleared = self.kv_events.AllBlocksCleared
        self.EventBatch = self.kv_events.EventBatch
        self.KVEventBatch = getattr(self.kv_events, "KVEventBatch", self.EventBatch)
        # KVCacheManager.take_events, run on a stand-in manager (its block_pool and per-group spec metadata)
        ns = rel.exec_definitions("vllm/v1/core/kv_cache_manager.py", ["take_events"], {}, method_of="KVCacheManager")
        self.manager_take_events: Callable[[Any], list[Any]] = ns["take_events"]
        self.group_metadata: tuple[tuple[Any, Any], ...] | None = None
        iface = "vllm/v1/kv_cache_interface.py"
        if b"kv_cache_event_metadata" in rel.source("vllm/v1/core/kv_cache_manager.py"):
            ns = rel.exec_definitions(iface, ["KVCacheSpecKind", "get_kv_cache_spec_kind", "get_kv_cache_spec_sliding_window"], {})
            full, swa = ns["FullAttentionSpec"](block_size=BS), ns["SlidingWindowSpec"](block_size=BS, sliding_window=SLIDING_WINDOW)
            self.group_metadata = tuple((ns["get_kv_cache_spec_kind"](s).value, ns["get_kv_cache_spec_sliding_window"](s)) for s in (full, swa))

    # --- what the release has -------------------------------------------------------------
    def fields(self, cls: type) -> list[str]:
        return [f.name for f in msgspec.structs.fields(cls)]

    @property
    def hybrid(self) -> bool:
        """Events carry ``group_idx`` (0.20+); before that vLLM turns the hybrid KV cache
        manager off when KV events are on (one group)."""
        return "group_idx" in self.fields(self.BlockStored)

    @property
    def max_lookahead(self) -> int:
        return 2 if "num_hash_lookahead_tokens" in inspect.signature(self.kvu.get_request_block_hasher).parameters else 0

    @property
    def has_embeds(self) -> bool:
        return hasattr(self.kvu, "_gen_prompt_embeds_extra_hash_keys")

    def hash_fn(self, name: str) -> Callable[[Any], bytes]:
        fn: Callable[[Any], bytes] = self.hashing.get_hash_fn_by_name(name)
        return fn

    def init_none_hash(self, algo: str) -> dict[str, Any]:
        """vLLM's ``init_none_hash`` with a fixed seed: the release's own default (0.33+, with
        PYTHONHASHSEED unset) or PYTHONHASHSEED=0 where the default is random."""
        default = getattr(self.kvu, "DEFAULT_NONE_HASH_SEED", None)
        if default is not None:
            os.environ.pop("PYTHONHASHSEED", None)
            seed, source = default, "default (PYTHONHASHSEED unset)"
        else:
            os.environ["PYTHONHASHSEED"] = OLD_SEED
            seed, source = OLD_SEED, "PYTHONHASHSEED"
        self.kvu.init_none_hash(self.hash_fn(algo))
        return {"algo": algo, "seed": seed, "seed_source": source, "none_hash": self.kvu.NONE_HASH.hex()}

    def block_hasher(self, algo: str, lookahead: int) -> Callable[[Any], list[bytes]]:
        if lookahead:
            hasher: Callable[[Any], list[bytes]] = self.kvu.get_request_block_hasher(BS, self.hash_fn(algo), lookahead)
        else:
            hasher = self.kvu.get_request_block_hasher(BS, self.hash_fn(algo))
        return hasher

    def new_pool(self, num_blocks: int, lookahead: int) -> Any:
        params = inspect.signature(self.BlockPool).parameters
        kw = {
            "num_gpu_blocks": num_blocks,
            "enable_caching": True,
            "hash_block_size": BS,
            "enable_kv_cache_events": True,
            "num_hash_lookahead_tokens": lookahead,
        }
        assert lookahead == 0 or "num_hash_lookahead_tokens" in params
        return self.BlockPool(**{k: v for k, v in kw.items() if k in params})

    def touch(self, pool: Any, blocks: list[Any]) -> None:
        ann = inspect.signature(pool.touch).parameters["blocks"].annotation
        if typing.get_origin(ann) is tuple or "tuple[" in str(ann):  # 0.10/0.11: one list per group
            pool.touch((blocks,))
        else:
            pool.touch(blocks)


# ------------------------------------------------------------------------------------------
# Requests
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    name: str
    tokens: tuple[int, ...]
    lora: bool = False
    salt: str | None = None
    mm: tuple[tuple[str, int, int], ...] = ()  # (identifier, offset, length)
    embeds: int | None = None  # seed of a prompt-embeds matrix (tokens are then zeros)
    session_id: str | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "tokens": list(self.tokens),
            "lora": LORA_NAME if self.lora else None,
            "salt": self.salt,
            "mm": [{"identifier": i, "offset": o, "length": n} for i, o, n in self.mm] or None,
            "embeds": _embeds_rows(self.embeds, len(self.tokens)) if self.embeds is not None else None,
        }


def _embeds_rows(seed: int, n: int) -> list[list[float]]:
    return [[(seed * 1000 + i * 10 + j) / 8.0 for j in range(2)] for i in range(n)]


_P = tuple(range(100, 114))  # 3 full blocks and 2 tokens
_M = _P[:4] + (IMG,) * 4 + _P[8:]
_LA = tuple(range(500, 514))
_LM = tuple(range(600, 608)) + (IMG,) * 4 + (612, 613)

PROMPTS = {
    p.name: p
    for p in (
        Prompt("P", _P),
        Prompt("Q", _P[:4] + tuple(range(200, 209)), session_id="session-q"),  # shares P's block 0
        Prompt("P+lora", _P, lora=True),
        Prompt("P+salt", _P, salt="salt-a"),
        Prompt("P+lora+salt", _P, lora=True, salt="salt-a"),
        Prompt("P+salt-b", _P, salt="salt-b"),
        Prompt("M", _M),
        Prompt("M+img-A", _M, mm=(("img-A", 4, 4),)),
        Prompt("M+img-B", _M, mm=(("img-B", 4, 4),)),
        Prompt("E1", (0,) * 12, embeds=1),
        Prompt("E2", (0,) * 12, embeds=2),
        Prompt("D", tuple(range(300, 314))),
        Prompt("R", tuple(range(400, 414))),
        Prompt("LA", _LA),
        Prompt("LA[:12]", _LA[:12]),
        Prompt("LA[:13]", _LA[:13]),
        Prompt("LA~4", _LA[:4] + (9004,) + _LA[5:]),
        Prompt("LA~5", _LA[:5] + (9005,) + _LA[6:]),
        Prompt("LA~8", _LA[:8] + (9008,) + _LA[9:]),
        Prompt("LA~12", _LA[:12] + (9012,) + _LA[13:]),
        Prompt("LA~13", _LA[:13] + (9013,)),
        Prompt("LM+img-A", _LM, mm=(("img-A", 8, 4),)),
        Prompt("LM+img-B", _LM, mm=(("img-B", 8, 4),)),
    )
}


@dataclass
class _Placeholder:  # vllm.multimodal.inputs.PlaceholderRange: what the hasher reads
    offset: int
    length: int
    is_embed: Any = None


@dataclass
class _MMFeature:  # vllm.multimodal.inputs.MultiModalFeatureSpec: what the hasher reads
    identifier: str
    mm_position: _Placeholder
    modality: str = "image"
    data: Any = None

    @property
    def mm_hash(self) -> str:
        return self.identifier


class GoldenRequest:
    """The attributes of vLLM's ``Request`` that the block hasher and ``BlockPool`` read; its
    ``block_hashes`` come from vLLM's request block hasher, as ``Request.__init__`` does."""

    def __init__(self, rt: Runtime, prompt: Prompt, request_id: str, hasher: Callable[[Any], list[bytes]]) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt.tokens)
        self._all_token_ids = list(prompt.tokens)
        self.all_token_ids = self._all_token_ids
        self.lora_request = rt.lora.LoRARequest(lora_name=LORA_NAME, lora_int_id=LORA_ID, lora_path=LORA_PATH) if prompt.lora else None
        self.cache_salt = prompt.salt
        self.mm_features = [_MMFeature(i, _Placeholder(o, n)) for i, o, n in prompt.mm]
        self.mm_hashes = [i for i, _, _ in prompt.mm]  # 0.10
        self.mm_positions = [f.mm_position for f in self.mm_features]  # 0.10
        self.prompt_embeds = FakeEmbeds(_embeds_rows(prompt.embeds, len(prompt.tokens))) if prompt.embeds is not None else None
        self._prompt_embeds_per_block_hashes: dict[tuple[int, int], bytes] = {}
        self.session_id = prompt.session_id
        self.kv_cache_report_mode = "incremental"
        self.block_hashes: list[bytes] = []
        self.block_hashes.extend(hasher(self))

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


# ------------------------------------------------------------------------------------------
# Engines: a BlockPool per (engine, DP rank) and vLLM's publisher, recorded by a SUB socket
# ------------------------------------------------------------------------------------------


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _free_base_port(n: int) -> int:
    """A port p with p..p+n-1 free (vLLM puts DP rank r on the endpoint's port + r)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("0.0.0.0", 0))
            base = int(s.getsockname()[1])
        if base + n < 65536 and all(_bindable(base + i) for i in range(n)):
            return base
    raise RuntimeError("no free port range")


def _port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


@dataclass
class EngineSpec:
    name: str
    ranks: tuple[int, ...] = (0,)
    hybrid: bool = False
    lookahead: int = 0
    int_hashes: bool = True
    base_port: int = 0
    base_replay_port: int = 0

    def describe(self, rt: Runtime) -> dict[str, Any]:
        groups: list[dict[str, Any]] = [{"group_idx": 0, "kind": "full_attention", "block_size": BS}]
        if self.hybrid:
            groups.append({"group_idx": 1, "kind": "sliding_window", "sliding_window": SLIDING_WINDOW, "block_size": BS})
        return {
            "dp_ranks": list(self.ranks),
            "kv_cache_groups": groups,
            "num_hash_lookahead_tokens": self.lookahead,
            "VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES": int(self.int_hashes),
            "topic": TOPIC,
            "endpoint": "tcp://*:<base>",
            "replay_endpoint": "tcp://*:<replay base>",
        }


class Engine:
    """One DP rank of an engine: vLLM's BlockPool driven like the KV cache manager would,
    vLLM's ZmqEventPublisher, and a SUB socket recording what it sends."""

    def __init__(self, rt: Runtime, spec: EngineSpec, rank: int, algo: str) -> None:
        self.rt, self.spec, self.rank = rt, spec, rank
        self.groups = [0, 1] if spec.hybrid else [0]
        self.pool = rt.new_pool(NUM_BLOCKS, spec.lookahead)
        self.hasher = rt.block_hasher(algo, spec.lookahead)
        self.blocks: dict[str, dict[int, list[Any]]] = {}
        self.last_seq: int | None = None
        pub_cls = rt.kv_events.ZmqEventPublisher
        self.publisher = pub_cls(
            data_parallel_rank=rank,
            endpoint=f"tcp://*:{spec.base_port}",
            replay_endpoint=f"tcp://*:{spec.base_replay_port}",
            topic=TOPIC,
        )
        self.endpoint_offset = _port(self.publisher._endpoint) - spec.base_port
        self.replay_offset = _port(self.publisher._replay_endpoint) - spec.base_replay_port
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, TOPIC.encode())
        monitor = self.sub.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.sub.connect(f"tcp://127.0.0.1:{_port(self.publisher._endpoint)}")
        if not monitor.poll(RECV_TIMEOUT_MS):
            raise RuntimeError(f"{spec.name}/{rank}: SUB never connected")
        monitor.recv_multipart()
        self.sub.disable_monitor()
        monitor.close(linger=0)
        time.sleep(0.3)  # the subscription reaches the PUB socket after the handshake

    def env(self) -> None:
        os.environ["VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES"] = "1" if self.spec.int_hashes else "0"

    def request(self, name: str) -> GoldenRequest:
        return GoldenRequest(self.rt, PROMPTS[name], f"{self.spec.name}-{self.rank}-{name}", self.hasher)

    def hits(self, req: GoldenRequest, groups: Iterable[int] = (0,)) -> int:
        """Leading block hashes of ``req`` this rank's BlockPool holds in every one of ``groups``."""
        n = 0
        for h in req.block_hashes:
            if not self.pool.get_cached_block(h, list(groups)):
                break
            n += 1
        return n

    # --- what the scheduler / KV cache manager do -----------------------------------------
    def run(self, name: str) -> None:
        """Prefill one request: reuse its cached prefix, allocate the rest, cache its full
        blocks in every KV cache group, then finish it (blocks freed tail first)."""
        req = self.request(name)
        hit = self.hits(req, self.groups)
        n_blocks = -(-req.num_tokens // BS)
        n_full = len(req.block_hashes)
        per_group: dict[int, list[Any]] = {}
        for g in self.groups:
            reused = [self.pool.get_cached_block(h, [g])[0] for h in req.block_hashes[:hit]]
            self.rt.touch(self.pool, reused)
            blocks = reused + self.pool.get_new_blocks(n_blocks - hit)
            self.pool.cache_full_blocks(req, blocks, hit, n_full, BS, g)
            per_group[g] = blocks
        self.blocks[name] = per_group
        for g in self.groups:
            self.pool.free_blocks(reversed(per_group[g]))

    def pressure(self, evictions: int) -> None:
        """Allocate blocks until ``evictions`` cached blocks were evicted (LRU: the blocks
        freed first go first), then give them back."""
        held: list[Any] = []
        removed = lambda: sum(isinstance(e, self.rt.BlockRemoved) for e in self.pool.kv_event_queue)  # noqa: E731
        start = removed()
        while removed() - start < evictions:
            held += self.pool.get_new_blocks(1)
        self.pool.free_blocks(held)

    def evict(self, name: str, group: int, indexes: Iterable[int]) -> None:
        """vLLM's ``BlockPool.evict_blocks`` on some of a request's blocks in one group."""
        self.pool.evict_blocks({self.blocks[name][group][i].block_id for i in indexes})

    def clear(self) -> None:
        assert self.pool.reset_prefix_cache()

    def take_events(self) -> list[Any]:
        manager = types.SimpleNamespace(block_pool=self.pool, kv_cache_event_metadata=self.rt.group_metadata)
        return self.rt.manager_take_events(manager)

    def recv(self) -> list[bytes]:
        if not self.sub.poll(RECV_TIMEOUT_MS):
            raise RuntimeError(f"{self.spec.name}/{self.rank}: no batch within {RECV_TIMEOUT_MS} ms")
        frames: list[bytes] = self.sub.recv_multipart()
        return frames

    def replay(self, from_seq: int) -> list[list[bytes]]:
        """Ask the replay (ROUTER) socket for every batch from ``from_seq``, as a DEALER."""
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.connect(f"tcp://127.0.0.1:{_port(self.publisher._replay_endpoint)}")
        dealer.send_multipart([b"", from_seq.to_bytes(8, "big")])
        got: list[list[bytes]] = []
        while True:
            if not dealer.poll(RECV_TIMEOUT_MS):
                raise RuntimeError("replay: no answer")
            frames = dealer.recv_multipart()
            got.append(frames)
            if frames[-2] == self.rt.kv_events.ZmqEventPublisher.END_SEQ:
                break
        dealer.close(linger=0)
        return got

    def close(self) -> None:
        self.publisher.shutdown()
        self.sub.close(linger=0)
        self.ctx.term()


# ------------------------------------------------------------------------------------------
# JSON forms
# ------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """Extra keys as JSON: tuples as lists, bytes as ``{"hex": ...}``."""
    if isinstance(value, bytes):
        return {"hex": value.hex()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _event_fields(ev: Any) -> dict[str, Any]:
    """Every field of vLLM's event (defaults included); raw-digest hashes as hex strings."""
    out: dict[str, Any] = {"type": type(ev).__name__}
    for f in msgspec.structs.fields(type(ev)):
        value = getattr(ev, f.name)
        if f.name == "block_hashes":
            value = [h.hex() if isinstance(h, bytes) else h for h in value]
        elif f.name == "parent_block_hash" and isinstance(value, bytes):
            value = value.hex()
        out[f.name] = msgspec.to_builtins(value)
    return out


def _schema(cls: type) -> dict[str, Any]:
    return {"fields": [f.name for f in msgspec.structs.fields(cls)], "json_schema": msgspec.json.schema(cls)}


# ------------------------------------------------------------------------------------------
# The scenario
# ------------------------------------------------------------------------------------------


class Golden:
    def __init__(self, rt: Runtime, version: str) -> None:
        self.rt, self.version = rt, version
        self.hash = rt.init_none_hash("sha256")
        self.batches: list[dict[str, Any]] = []
        self.lookups: list[dict[str, Any]] = []
        self.engines: dict[tuple[str, int], Engine] = {}
        self.specs: dict[str, EngineSpec] = {}
        self.replay: dict[str, Any] | None = None
        self.enc = msgspec.msgpack.Encoder()
        self.lora_error = self._probe_lora()

    def _probe_lora(self) -> str | None:
        """Whether the release can publish a LoRA request's stores at all (0.10/0.11 read
        ``lora_request.id``, which LoRARequest does not have)."""
        pool = self.rt.new_pool(8, 0)
        req = GoldenRequest(self.rt, PROMPTS["P+lora"], "probe", self.rt.block_hasher("sha256", 0))
        try:
            pool.cache_full_blocks(req, pool.get_new_blocks(4), 0, 3, BS, 0)
        except AttributeError as exc:
            return f"AttributeError: {exc}"
        return None

    def add_engine(self, spec: EngineSpec) -> None:
        spec.base_port = _free_base_port(len(spec.ranks))
        spec.base_replay_port = _free_base_port(len(spec.ranks))
        self.specs[spec.name] = spec
        for r in spec.ranks:
            self.engines[(spec.name, r)] = Engine(self.rt, spec, r, "sha256")

    # --- one scheduler step: operations, then the batch the scheduler publishes ----------
    def step(self, engine: str, rank: int, *ops: Callable[[Engine], None]) -> None:
        eng = self.engines[(engine, rank)]
        eng.env()
        for op in ops:
            op(eng)
        events = eng.take_events()
        assert events, (engine, rank, "a step without events publishes nothing")
        batch = self.rt.KVEventBatch(ts=TS0 + len(self.batches), events=events)
        eng.publisher.publish(batch)
        topic, seq_bytes, payload = eng.recv()
        seq = int.from_bytes(seq_bytes, "big")
        assert seq == (0 if eng.last_seq is None else eng.last_seq + 1), "a batch was lost"
        assert payload == self.enc.encode(batch)  # vLLM's publisher encodes with msgspec's msgpack encoder
        eng.last_seq = seq
        self.batches.append(
            {
                "index": len(self.batches),
                "engine": engine,
                "dp_rank": rank,
                "seq": seq,
                "topic": topic.hex(),
                "payload": payload.hex(),
                "events": [_event_fields(e) for e in batch.events],
            }
        )

    def look(self, engine: str, rank: int, name: str, note: str) -> None:
        eng = self.engines[(engine, rank)]
        eng.env()
        req = eng.request(name)
        extras, lookahead_ids, hash_extras = self._published_extras(eng, req)
        self.lookups.append(
            {
                "after_batch": eng.last_seq,
                "after_index": len(self.batches) - 1,
                "engine": engine,
                "dp_rank": rank,
                "prompt": name,
                **PROMPTS[name].describe(),
                "lookahead": eng.spec.lookahead,
                "block_hashes": [h.hex() for h in req.block_hashes],
                "hash_extra_keys": hash_extras,
                "extras": extras,
                "lookahead_token_ids": lookahead_ids,
                "blocks": eng.hits(req),
                "note": note,
            }
        )

    def _published_extras(self, eng: Engine, req: GoldenRequest) -> tuple[Any, Any, Any]:
        """What vLLM would publish for ``req``'s blocks: cache them in a scratch BlockPool of
        the same configuration and read its BlockStored; and the extra keys its hashes used."""
        hash_extras: list[Any] | None = None
        if not eng.spec.lookahead:  # (with lookahead the hash's keys also hold the lookahead window and tokens)
            hash_extras, curr_mm = [], 0
            for i in range(len(req.block_hashes)):
                keys, curr_mm = self.rt.kvu.generate_block_hash_extra_keys(req, i * BS, (i + 1) * BS, curr_mm)
                hash_extras.append(_jsonable(keys))
        if "extra_keys" not in self.rt.fields(self.rt.BlockStored) or not req.block_hashes:
            return None, None, hash_extras
        if req.lora_request is not None and self.lora_error:
            return None, None, hash_extras
        pool = self.rt.new_pool(8, eng.spec.lookahead)
        pool.cache_full_blocks(req, pool.get_new_blocks(-(-req.num_tokens // BS)), 0, len(req.block_hashes), BS, 0)
        (stored,) = pool.take_events()
        return _jsonable(stored.extra_keys), getattr(stored, "lookahead_token_ids", None), hash_extras

    # --- the scenario ----------------------------------------------------------------------
    def run(self) -> None:
        rt = self.rt
        hybrid = rt.hybrid
        lora_ok = self.lora_error is None
        self.add_engine(EngineSpec("main", ranks=(0, 1), hybrid=hybrid))
        m = "main"

        def run(name: str) -> Callable[[Engine], None]:
            return lambda e: e.run(name)

        # 1. P (3 full blocks + 2 tokens) on rank 0
        self.step(m, 0, run("P"))
        self.look(m, 0, "P", "P stored: its 3 full blocks")
        self.look(m, 0, "P+lora", "P's tokens under LoRA 'ad' hash differently: nothing cached")
        self.look(m, 0, "P+salt", "P's tokens with cache_salt: block 0 (and so all) differ")
        self.look(m, 0, "Q", "Q shares P's block 0 only")
        self.look(m, 1, "P", "rank 1 has cached nothing")
        # 2. Q reuses P's block 0: its store carries 2 blocks, parent = P's block 0
        self.step(m, 0, run("Q"))
        self.look(m, 0, "Q", "Q stored after a 1-block prefix hit")
        self.look(m, 0, "P", "P unchanged by Q")
        # 3. rank 1 caches D
        self.step(m, 1, run("D"))
        self.look(m, 1, "D", "D stored on rank 1")
        self.look(m, 0, "D", "D is on rank 1 only")
        self.look(m, 1, "P", "P is on rank 0 only")
        # 4. P with LoRA and P with a cache salt, one step
        self.step(m, 0, *([run("P+lora")] if lora_ok else []), run("P+salt"))
        self.look(m, 0, "P+lora", "P under LoRA 'ad'" if lora_ok else "LoRA stores crash this release's BlockPool: never cached")
        self.look(m, 0, "P+salt", "P with cache_salt 'salt-a'")
        self.look(m, 0, "P+lora+salt", "LoRA and salt together: another prompt")
        self.look(m, 0, "P+salt-b", "another salt: another prompt")
        self.look(m, 0, "P", "plain P still cached")
        # 5. an image (placeholder tokens 4..7) in block 1
        self.step(m, 0, run("M+img-A"))
        self.look(m, 0, "M+img-A", "the image request: block 0 is P's (no image in it), blocks 1-2 stored")
        self.look(m, 0, "M+img-B", "same tokens, another image: block 0 only")
        self.look(m, 0, "M", "same tokens, no image: block 0 only")
        # 6. prompt embeds (tokens all 0; the embeddings are in the hash)
        if rt.has_embeds:
            self.step(m, 0, run("E1"))
            self.look(m, 0, "E1", "prompt-embeds request stored")
            self.look(m, 0, "E2", "same (zero) tokens, other embeddings: nothing")
        # 7. allocation pressure evicts the least recently freed block: P's tail (group 0)
        self.step(m, 0, lambda e: e.pressure(1))
        self.look(m, 0, "P", "P's last block evicted")
        self.look(m, 0, "Q", "Q untouched")
        # 8. rank 1 caches Q: its block 0 is P's block 0, so P hits 1 there
        self.step(m, 1, run("Q"))
        self.look(m, 1, "Q", "Q stored on rank 1 (no prefix hit there: the whole prompt)")
        self.look(m, 1, "P", "rank 1 holds P's block 0 through Q")
        if hybrid:
            # 9. group 1 (sliding window) drops P's blocks 1-2: group 0 still holds block 1
            self.step(m, 0, lambda e: e.evict("P", 1, [1, 2]))
            self.look(m, 0, "P", "group-1 removals leave group 0 alone")
            # 10. R stored in both groups, 11. its group-0 blocks evicted: cached in group 1 only
            self.step(m, 0, run("R"))
            self.look(m, 0, "R", "R stored in groups 0 and 1")
            self.step(m, 0, lambda e: e.evict("R", 0, [0, 1, 2]))
            self.look(m, 0, "R", "R is cached in group 1 only: no hit")
        # 12. the prefix cache is reset on rank 0
        self.step(m, 0, lambda e: e.clear())
        self.look(m, 0, "P", "cleared")
        self.look(m, 0, "Q", "cleared")
        self.look(m, 1, "Q", "rank 1 was not cleared")
        self.look(m, 1, "D", "rank 1 was not cleared")
        main0 = self.engines[(m, 0)]
        frames = main0.replay(1)
        self.replay = {
            "engine": m,
            "dp_rank": 0,
            "request_from_seq": 1,
            "request": ["", (1).to_bytes(8, "big").hex()],
            "frames": [[f.hex() for f in fr] for fr in frames],
        }

        # raw digest bytes in the events
        self.add_engine(EngineSpec("raw-bytes", int_hashes=False))
        self.step("raw-bytes", 0, run("P"))
        self.look("raw-bytes", 0, "P", "P stored (hashes as raw sha256 digests)")
        self.step("raw-bytes", 0, run("Q"))
        self.look("raw-bytes", 0, "Q", "Q stored, parent = P's block 0 digest")
        self.step("raw-bytes", 0, lambda e: e.pressure(1))
        self.look("raw-bytes", 0, "P", "P's last block evicted")

        # lookahead hashing (each hash also covers the L tokens after its block)
        for la in range(1, rt.max_lookahead + 1):
            name = f"lookahead-{la}"
            self.add_engine(EngineSpec(name, lookahead=la))
            self.step(name, 0, run("LA"))
            self.look(name, 0, "LA", f"LA stored with lookahead {la}")
            self.look(name, 0, "LA~4", "token 4 (right after block 0) changed: block 0's hash changes")
            if la >= 2:
                self.look(name, 0, "LA~5", "token 5 (block 0's 2nd lookahead token) changed")
            self.look(name, 0, "LA~8", "token 8 (right after block 1) changed")
            self.look(name, 0, "LA~12", "token 12 (right after block 2) changed")
            self.look(name, 0, "LA~13", "token 13 changed")
            self.look(name, 0, "LA[:12]", "block 2 has no lookahead tokens yet: not hashed")
            self.look(name, 0, "LA[:13]", "13 tokens")
            self.step(name, 0, run("LM+img-A"))
            self.look(name, 0, "LM+img-A", "image at tokens 8..11 (block 2), inside block 1's lookahead window")
            self.look(name, 0, "LM+img-B", "another image: block 1's hash covers token 8 and so the image")

    def close(self) -> None:
        for eng in self.engines.values():
            eng.close()

    # --- what the run showed ---------------------------------------------------------------
    def features(self) -> dict[str, Any]:
        rt = self.rt
        stored = rt.fields(rt.BlockStored)

        def ev_extras(prompt: str) -> Any:
            for lk in self.lookups:
                if lk["prompt"] == prompt and lk["engine"] == "main":
                    return lk["extras"]
            return None

        def published(prompt: str, needle: str) -> bool:
            return needle in json.dumps(ev_extras(prompt))

        replay = self.replay or {}
        end = replay.get("frames", [[]])[-1]
        first = replay.get("frames", [[]])[0]
        return {
            "event_form": self.event_form(),
            "block_stored_fields": len(stored),
            "lora_id": "lora_id" in stored,
            "lora_name": "lora_name" in stored,
            "lora_events": self.lora_error is None,
            "lora_events_error": self.lora_error,
            "lora_in_hash": ev_hash_lora(self.lookups),
            "extra_keys": "extra_keys" in stored,
            "lora_in_extra_keys": published("P+lora", LORA_NAME),
            "salt_in_extra_keys": published("P+salt", "salt-a"),
            "mm_in_events": published("M+img-A", "img-A"),
            "embeds_in_events": bool(rt.has_embeds and ev_extras("E1") and any(ev_extras("E1"))),
            "prompt_embeds_hashed": rt.has_embeds,
            "group_idx": "group_idx" in stored,
            "hybrid_with_events": rt.hybrid,
            "kv_cache_spec_kind": "kv_cache_spec_kind" in stored,
            "kv_cache_spec_kind_set": rt.group_metadata is not None,
            "session_id": "session_id" in stored,
            "lookahead": "lookahead_token_ids" in stored,
            "num_hash_lookahead_tokens": rt.max_lookahead > 0,
            "dp_rank_in_batch": "data_parallel_rank" in rt.fields(rt.EventBatch),
            "replay": self.replay is not None,
            "replay_topic_frame": len(first) == 4,
            "end_marker": end,
            "none_hash_default_seed": getattr(rt.kvu, "DEFAULT_NONE_HASH_SEED", None),
            "event_hash_default": "int (low 64 bits of the digest, big-endian)",
        }

    def event_form(self) -> str:
        sample = self.rt.BlockRemoved(block_hashes=[1], medium="GPU")
        return "array" if isinstance(msgspec.msgpack.decode(self.enc.encode(sample)), list) else "map"

    def alt_hash(self) -> dict[str, Any] | None:
        """The same prompts hashed with sha256_cbor (vLLM's hasher, NONE_HASH re-initialised)."""
        try:
            self.rt.hash_fn("sha256_cbor")
        except ValueError:
            return None
        info = self.rt.init_none_hash("sha256_cbor")
        hasher = self.rt.block_hasher("sha256_cbor", 0)
        prompts = {}
        for name in ("P", "Q", "P+lora", "P+salt", "M+img-A", "D"):
            req = GoldenRequest(self.rt, PROMPTS[name], f"cbor-{name}", hasher)
            prompts[name] = [h.hex() for h in req.block_hashes]
        self.rt.init_none_hash("sha256")
        return {**info, "block_hashes": prompts}


def ev_hash_lora(lookups: list[dict[str, Any]]) -> Any:
    """How block 0 of a LoRA request carries the adapter in its hash (from vLLM's own keys)."""
    for lk in lookups:
        if lk["prompt"] == "P+lora":
            return lk["hash_extra_keys"][0]
    return None


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        sys.exit(__doc__)
    logging.basicConfig(level=logging.WARNING)
    wheel, version = Path(argv[0]), argv[1]
    rt = Runtime(wheel, version)
    golden = Golden(rt, version)
    try:
        golden.run()
    finally:
        golden.close()
    doc = {
        "vllm_version": version,
        "source": f"vllm {version}: {wheel.name} (sha256 {hashlib.sha256(wheel.read_bytes()).hexdigest()})",
        "generator": "tests/kvindex/make_goldens.py",
        "event_form": golden.event_form(),
        "model": MODEL,
        "block_size": BS,
        "features": golden.features(),
        "hash": {**golden.hash, "lora": {"name": LORA_NAME, "int_id": LORA_ID, "path": LORA_PATH}},
        "engines": {
            name: spec.describe(rt) | {"dp_rank_port_offsets": {str(r): golden.engines[(name, r)].endpoint_offset for r in spec.ranks}}
            for name, spec in golden.specs.items()
        },
        "schema": {c: _schema(getattr(rt.kv_events, c)) for c in ("EventBatch", "BlockStored", "BlockRemoved", "AllBlocksCleared")},
        "batches": golden.batches,
        "replay": golden.replay,
        "lookups": golden.lookups,
        "alt_hash": golden.alt_hash(),
        "provenance": {
            "ran": rt.release.ran,
            "definitions_run_alone": rt.release.took,
            "stubbed_modules": {k: sorted(set(v)) for k, v in sorted(rt.release.stubbed.items())},
        },
    }
    GOLDENS.mkdir(exist_ok=True)
    out = GOLDENS / f"vllm-{version}.json"
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}: {doc['event_form']} form, {len(golden.batches)} batches, {len(golden.lookups)} lookups")


if __name__ == "__main__":
    main(sys.argv[1:])
