"""Byte-level BPE tokenizer (HuggingFace `tokenizers`), with one end-of-text special token."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"
FILENAME = "tokenizer.json"
CONFIG = "tokenizer_config.json"  # an imported model's: its end-of-text token, chat template
TEMPLATE = "chat_template.jinja"  # where newer transformers keep the chat template
# What travels with a tokenizer from directory to directory (data, run, model export).
FILES = (FILENAME, CONFIG, TEMPLATE, "special_tokens_map.json")


def copy_files(src: str | Path, dst: str | Path, skip: tuple[str, ...] = ()) -> None:
    """The tokenizer's files that `src` has, copied into `dst`."""
    for name in FILES:
        if name not in skip and (Path(src) / name).is_file():
            (Path(dst) / name).write_bytes((Path(src) / name).read_bytes())


# The BPE trainer's time grows faster than linearly with the length of one pre-tokenized
# "word", and the byte-level pre-tokenizer makes a whole run without whitespace (or of only
# whitespace) one word: a 250 KB line took 35 s, 20 MB did not finish in 300 s. Real words
# and indentation are far shorter than this.
RUN_BLOCK = 500


def bounded_runs(texts: Iterable[str], block: int = RUN_BLOCK) -> Iterator[str]:
    """The texts in pieces whose runs of non-space (or of space) characters are shorter than
    2 * block: every aligned block of `block` characters of one kind becomes its own piece, and
    any longer run covers such a block. For tokenizer training only; encoding is unaffected.
    """
    for text in texts:
        start = 0
        for i in range(0, len(text) - block + 1, block):
            part = text[i : i + block]
            if part.isspace() or part.split(maxsplit=1) == [part]:
                if start < i:
                    yield text[start:i]
                yield part
                start = i + block
        if start < len(text):
            yield text[start:]


def train_bpe(text_iterator: Iterable[str] | Iterator[str], vocab_size: int) -> HFTokenizer:
    """Byte-level BPE: every string encodes (no unknown token) and decodes back exactly.

    Deterministic: the same texts in the same order give a byte-identical tokenizer.json.
    """
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(bounded_runs(text_iterator), trainer=trainer)
    return tok


class Tokenizer:
    """Ids for text. EOT is only ever emitted by the caller (between documents): the literal
    string "<|endoftext|>" inside a text is encoded as ordinary bytes, so a document that
    quotes it cannot fake a document boundary. decode(encode(s)) == s for every string."""

    def __init__(self, tok: HFTokenizer, chat_template: str | None = None, specials: dict[str, str] | None = None):
        tok.encode_special_tokens = True  # not stored in tokenizer.json, so set on every load
        self._tok = tok
        # encode_batch_fast (tokenizers >= 0.20) skips offset tracking: same ids, ~15% faster.
        self._encode_batch = getattr(tok, "encode_batch_fast", tok.encode_batch)
        self.specials = dict(specials or {})  # bos_token, eos_token, ... by name, for chat templates
        eot = self.specials.get("eos_token", EOT)
        eot_id = tok.token_to_id(eot)
        if eot_id is None:
            raise ValueError(f"tokenizer has no {eot} token")
        self._eot, self.eot = eot_id, eot
        self.chat_template = chat_template
        self._chat_tok: HFTokenizer | None = None

    @classmethod
    def load(cls, data_dir: str | Path) -> "Tokenizer":
        """tokenizer.json from `data_dir`; with an imported model's tokenizer_config.json beside
        it, its end-of-text (eos) token and chat template (or chat_template.jinja's)."""
        path = Path(data_dir) / FILENAME
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer at {path}; run `stoker prepare` first")
        config = Path(data_dir) / CONFIG
        specials: dict[str, str] = {}
        template = None
        if config.is_file():
            try:
                c = json.loads(config.read_text())
            except (ValueError, UnicodeDecodeError) as e:
                raise ValueError(f"{config}: not JSON ({e})") from None
            for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
                v = c.get(key)
                v = v.get("content") if isinstance(v, dict) else v
                if isinstance(v, str):
                    specials[key] = v
            template = c.get("chat_template") if isinstance(c.get("chat_template"), str) else None
        if template is None and (Path(data_dir) / TEMPLATE).is_file():
            template = (Path(data_dir) / TEMPLATE).read_text()
        return cls(HFTokenizer.from_file(str(path)), template, specials)

    def chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as the model was tuned to read it: its chat template (Jinja, from
        tokenizer_config.json) rendered in a sandbox, so a template from elsewhere cannot run
        code. `chat_ids` gives its ids. ValueError when the tokenizer has no template."""
        if not self.chat_template:
            raise ValueError("this model's tokenizer has no chat template (tokenizer_config.json's chat_template)")
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.specials)
        except TemplateError as e:
            raise ValueError(f"chat template: {e}") from None

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The ids of `chat(messages)`. Unlike `encode`, special-token strings in it are the
        special tokens (the template's markers are written as text), as transformers' own
        apply_chat_template reads them; a user's message that spells one out gets it too."""
        if self._chat_tok is None:  # its own instance: `encode` keeps reading special strings as text
            self._chat_tok = HFTokenizer.from_str(self._tok.to_str())
            self._chat_tok.encode_special_tokens = False
        return self._chat_tok.encode(self.chat(messages, add_generation_prompt), add_special_tokens=False).ids

    def save(self, data_dir: str | Path) -> None:
        self._tok.save(str(Path(data_dir) / FILENAME))

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Ids of `text`, with the special tokens the tokenizer adds around a text (an imported
        model's beginning-of-text, say) unless `special` is False."""
        return self._tok.encode(text, add_special_tokens=special).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._encode_batch(texts)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @property
    def eot_id(self) -> int:
        return self._eot
