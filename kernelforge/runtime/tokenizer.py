"""Text <-> token ids with the `tokenizers` package, and the chat template."""
from __future__ import annotations

import functools
from typing import Optional, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers


class TextTokenizer:
    """A `tokenizers.Tokenizer` plus what generation needs around it."""

    def __init__(self, tok: Tokenizer, *, bos_token_id: Optional[int] = None,
                 add_bos: bool = False, eos_token_ids: Sequence[int] = (),
                 chat_template: Optional[str] = None, post_process: bool = False):
        self.tok = tok
        self.post_process = post_process    # tokenizer.json's own post-processor adds BOS etc.
        self.bos_token_id = bos_token_id
        self.add_bos = add_bos and bos_token_id is not None
        self.eos_token_ids = list(eos_token_ids)
        self.chat_template = chat_template

    def encode(self, text: str) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=self.post_process).ids
        if self.add_bos and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token(self, i: int) -> Optional[str]:
        return self.tok.id_to_token(i)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` ([{"role": ..., "content": ...}])."""
        if not self.chat_template:
            raise ValueError("this model has no chat template")
        return _compile(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.token(self.bos_token_id) if self.bos_token_id is not None else "",
            eos_token=self.token(self.eos_token_ids[0]) if self.eos_token_ids else "")


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise ValueError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


@functools.lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (bytes spelled as visible characters)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


#: llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) -> the split regex before byte-level
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS = {"llama3": _LLAMA3, "llama-bpe": _LLAMA3, "llama-v3": _LLAMA3,
               "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2}


def from_gguf_metadata(meta: dict) -> TextTokenizer:
    """A byte-level BPE tokenizer (``tokenizer.ggml.model == "gpt2"``) from GGUF metadata."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (only 'gpt2', "
                         "byte-level BPE)")
    tokens = list(meta["tokenizer.ggml.tokens"])
    alphabet = _byte_alphabet()
    chars = set(alphabet.values())
    # tokens are stored in the byte alphabet; respell any that are not (control tokens are
    # added as special tokens below under their own spelling)
    vocab = {}
    for i, t in enumerate(tokens):
        if not set(t) <= chars:
            t = "".join(alphabet[b] for b in t.encode("utf-8"))
        vocab.setdefault(t, i)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre in _PRE_SPLITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_PRE_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre == "smollm":    # llama.cpp: each digit alone, then GPT-2's split
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    types = list(meta.get("tokenizer.ggml.token_type") or [])
    control = [t for t, ty in zip(tokens, types) if ty == 3]      # 3: CONTROL
    user = [t for t, ty in zip(tokens, types) if ty == 4]         # 4: USER_DEFINED
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = [int(meta["tokenizer.ggml.eos_token_id"])] if "tokenizer.ggml.eos_token_id" in meta else []
    eot = meta.get("tokenizer.ggml.eot_token_id")
    if eot is not None and int(eot) not in eos:
        eos.append(int(eot))
    return TextTokenizer(tok, bos_token_id=None if bos is None else int(bos),
                         add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                         eos_token_ids=eos, chat_template=meta.get("tokenizer.chat_template"))


def from_hf_dir(path, eos_token_ids: Sequence[int], bos_token_id: Optional[int]) -> TextTokenizer:
    """tokenizer.json (+ tokenizer_config.json for the chat template and BOS flag)."""
    import json
    from pathlib import Path

    path = Path(path)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    cfg = {}
    if (path / "tokenizer_config.json").is_file():
        cfg = json.loads((path / "tokenizer_config.json").read_text())
    template = cfg.get("chat_template")
    if template is None and (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text()
    # tokenizer.json's post-processor adds BOS itself when the model wants it
    return TextTokenizer(tok, bos_token_id=bos_token_id, eos_token_ids=eos_token_ids,
                         chat_template=template, post_process=True)
