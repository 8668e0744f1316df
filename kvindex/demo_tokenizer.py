"""A small, real BPE tokenizer built in-process, for the demo, the simulator and the tests.

No model weights or hub downloads are possible here, so the fleet needs *some* tokenizer that
the gateway and the simulated replicas share bit for bit. This trains a byte-level BPE with
HF ``tokenizers`` on a fixed corpus generated in code (deterministic: two builds give the same
``tokenizer.json``), adds ChatML special tokens and a ChatML chat template like Qwen's, and
writes the usual ``tokenizer.json`` + ``tokenizer_config.json`` pair, cached on disk.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

VERSION = "v3"  # bump whenever the files written change (they are cached on disk)
VOCAB_SIZE = 4096
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHATML_TEMPLATE = (
    # tools go first, as a system block (Qwen-style templates render them into the prompt too)
    "{%- if tools %}{{- '<|im_start|>system\\n# Tools\\n' }}"
    "{%- for tool in tools %}{{- tool | tojson }}{{- '\\n' }}{%- endfor %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by word but not "
    "what all were we when your can said there use an each which she do how their if will up other about out many then them "
    "these so some her would make like him into time has look two more write go see number no way could people my than first "
    "water been call who oil its now find long down day did get come made may part system assistant user question answer model "
    "request cache token block prefix replica gateway latency throughput python code function return value error test rule "
    "policy refund storage plan upgrade travel train ticket document clause tenant summary review bug style"
).split()


_SYLLABLES = "ka ri to ne mu sa lo pe di va gu shi an el or ix um et qua zen bro fil mar cor tin".split()


def _corpus(seed: int = 1234, lines: int = 6000) -> list[str]:
    rng = random.Random(seed)
    # invented words widen the vocabulary towards VOCAB_SIZE (English alone saturates early)
    invented = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))) for _ in range(1500)]
    vocab = _WORDS + invented
    out = []
    for i in range(lines):
        n = rng.randint(4, 24)
        words = [rng.choice(vocab) for _ in range(n)]
        if i % 5 == 0:
            words.append(str(rng.randint(0, 99999)))
        if i % 7 == 0:
            words.append(rng.choice(["def f(x):", "return x + 1", '{"key": [1, 2]}', "a_b = c.d()", "#", "->", "..."]))
        out.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ",", ":"]))
    return out


def _train() -> str:
    # deferred for start-up cost: ``tokenize`` imports this module, and only a first build trains
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok.to_str()


def _config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 8192,
        "add_bos_token": False,
        "chat_template": CHATML_TEMPLATE,
    }


def default_cache_dir() -> Path:
    base = os.environ.get("KVGATE_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "kvgate")
    return Path(base) / f"demo-tokenizer-{VERSION}"


def build_demo_tokenizer(dest: Path | None = None) -> Path:
    """Write (once) and return the directory holding the demo tokenizer files."""
    dest = Path(dest) if dest is not None else default_cache_dir()
    tj, tc = dest / "tokenizer.json", dest / "tokenizer_config.json"
    if tj.is_file() and tc.is_file():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    # write atomically: several simulators may build it at the same moment
    for path, text in ((tj, _train()), (tc, json.dumps(_config(), indent=2))):
        fd, tmp = tempfile.mkstemp(dir=dest, prefix=path.name + ".")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    return dest
