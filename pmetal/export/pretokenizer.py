"""llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer (`tokenizer.ggml.pre`).

llama.cpp loads a GGUF only when this name is one it knows, and it picks the text-splitting rule
(and a few quirks) by the name, so a wrong name is either refused or silently tokenizes differently.
As llama.cpp's converter (`convert_hf_to_gguf.py`, `get_vocab_base_pre`) does, a tokenizer is
recognised by the SHA-256 of its token ids for llama.cpp's probe text; the hashes below are the
ones that converter lists, so a tokenizer it recognises gets the same name here. Unlike it, pmetal
also checks the tokenizer's own pre-tokenizer against the split rule of the name it found (an
edited pre-tokenizer on a known vocabulary is an error, not a guess), and an unknown tokenizer is a
clear error naming the override (`pre_tokenizer=` / `--gguf-pre-tokenizer`), never a fallback.
"""

from __future__ import annotations

import hashlib
import json

from pmetal.export.common import ExportError

# llama.cpp's probe text (convert_hf_to_gguf.py): whitespace runs, emojis (one with a zero-width
# joiner), digit runs, Khmer, Chinese, Bulgarian, quote and punctuation runs, English contractions.
PROBE_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n"
    "\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f (multiple emojis concatenated) \u2705 \U0001f999\U0001f999 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "\u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 "
    "?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
    "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? "
    "'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# SHA-256 of str(tokenizer.encode(PROBE_TEXT)) -> llama.cpp's name (the model that defines it in
# llama.cpp's table in the comment). Byte-level BPE tokenizers of the decoders GGUF export writes.
KNOWN_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # Smaug-Llama-3
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 .. Qwen3
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Embedding
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # GPT-2
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": "llama4",
}
# The GPT-2 byte-level split (ByteLevel with use_regex, no Split): llama.cpp's gpt-2 family of names.
GPT2_SPLIT = "byte-level (GPT-2 pattern)"
GPT2_SPLIT_NAMES = ("gpt-2", "smollm")


def _split_patterns(node) -> list[str]:
    if isinstance(node, dict):
        found = [node["pattern"]["Regex"]] if node.get("type") == "Split" and "Regex" in (node.get("pattern") or {}) else []
        return found + [p for value in node.values() for p in _split_patterns(value)]
    if isinstance(node, list):
        return [p for value in node for p in _split_patterns(value)]
    return []


def split_rule(spec: dict) -> str:
    """How the tokenizer (its tokenizer.json `spec`) splits text before merging: its Split regex,
    or the GPT-2 byte-level pattern (a Digits split in front of it is allowed: SmolLM's)."""
    patterns = _split_patterns(spec.get("pre_tokenizer"))
    if patterns:
        return " + ".join(patterns)
    text = json.dumps(spec.get("pre_tokenizer") or {})
    return GPT2_SPLIT if '"use_regex": true' in text else f"unrecognised ({text[:120]})"


def name_rules() -> dict[str, str]:
    """llama.cpp name -> the split rule a tokenizer of that name has (transformers' GGUF reader
    holds the regex of each name it rebuilds; the gpt-2 family splits with the byte-level pattern)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    return {**dict(GGUF_PRE_TOKENIZER_SPLITS), **dict.fromkeys(GPT2_SPLIT_NAMES, GPT2_SPLIT)}


def probe_hash(tokenizer) -> str:
    return hashlib.sha256(str(tokenizer.encode(PROBE_TEXT)).encode()).hexdigest()


def _ask_for_override(problem: str) -> ExportError:
    known = ", ".join(sorted(set(KNOWN_TOKENIZERS.values())))
    return ExportError(
        f"GGUF export cannot name this tokenizer's pre-tokenizer for llama.cpp: {problem}. Pass llama.cpp's "
        "name for it (tokenizer.ggml.pre, listed in llama.cpp's convert_hf_to_gguf.py get_vocab_base_pre): "
        f"`pmetal export ... --gguf-pre-tokenizer NAME` or export_model(..., pre_tokenizer=NAME); pmetal knows {known}"
    )


def pre_tokenizer_name(tokenizer, spec: dict, override: str | None = None) -> str:
    """llama.cpp's name for `tokenizer` (a fast tokenizer; `spec` its tokenizer.json as a dict).

    `override` is taken as given. Otherwise the probe-text hash must be a known tokenizer's and the
    tokenizer's split rule must be that name's; anything else is an ExportError naming the override.
    """
    if override:
        return override
    rule = split_rule(spec)
    rules = name_rules()
    digest = probe_hash(tokenizer)
    name = KNOWN_TOKENIZERS.get(digest)
    if name is None:
        alike = sorted(n for n, r in rules.items() if r == rule)
        hint = f"; names with its split rule: {', '.join(alike)}" if alike else ""
        raise _ask_for_override(f"its probe-text hash {digest[:16]}... is not a known tokenizer's{hint}")
    if rules.get(name) != rule:
        raise _ask_for_override(f"its vocabulary is {name!r}'s but it splits text by {rule[:120]!r}, "
                                f"not {str(rules.get(name))[:120]!r}")  # fmt: skip
    return name
