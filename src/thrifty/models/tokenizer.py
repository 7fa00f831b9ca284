"""Tokenizer: text <-> token ids for one model, its special tokens and its chat template, from a GGUF file's
metadata (thrifty.models.gguf_tokenizer builds it; the serialized result is cached under
`home()/tokenizers/<hash of the vocabulary>.json`) or a Hugging Face folder's tokenizer.json."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import tokenizers

from thrifty.errors import InvalidRequestError, ModelFileError
from thrifty.models.chat_template import ChatTemplate, builtin_template
from thrifty.models.gguf_tokenizer import build_from_metadata, meta_hash as _meta_hash
from thrifty.paths import atomic_write, home

if TYPE_CHECKING:
    from thrifty.models.detokenizer import IncrementalDetokenizer

log = logging.getLogger(__name__)

# End-of-turn markers that stop generation besides EOS, where the vocabulary has them.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|eom_id|>")


class Tokenizer:
    """Text <-> token ids for one model, plus its chat template and special tokens."""

    def __init__(self, backend: tokenizers.Tokenizer, *, vocab_size: int | None = None,
                 bos_token_id: int | None = None, eos_token_id: int | None = None,
                 pad_token_id: int | None = None, unk_token_id: int | None = None,
                 chat_template: str | None = None, add_bos_token: bool = False,
                 extra_stop_ids: Iterable[int] = ()) -> None:
        self.backend = backend
        self._vocab_size = vocab_size or backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        self.pad_token_id, self.unk_token_id = pad_token_id, unk_token_id
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template
        self._compiled: ChatTemplate | None = None
        stops = {eos_token_id, *extra_stop_ids}
        stops.update(backend.token_to_id(t) for t in END_OF_TURN_TOKENS)
        self._stop_ids = tuple(sorted(i for i in stops if i is not None))

    # ----- construction
    @classmethod
    def from_gguf(cls, gguf: Any, cache: bool = True) -> Tokenizer:
        """Build from a `GGUFFile`'s metadata, through the cache under home()/tokenizers/."""
        md = gguf.metadata
        backend = None
        path = None
        if cache:
            path = home() / "tokenizers" / f"{_meta_hash(md)}.json"
            if path.is_file():
                try:
                    backend = tokenizers.Tokenizer.from_file(str(path))
                except Exception as e:  # a damaged cache entry is rebuilt, never fatal
                    log.warning("ignoring unreadable tokenizer cache %s: %s", path, e)
        if backend is None:
            backend = build_from_metadata(md)
            if path is not None:
                try:
                    with atomic_write(path, "w") as f:
                        f.write(backend.to_str())
                except OSError as e:
                    log.warning("could not cache the tokenizer at %s: %s", path, e)
        tokens = md["tokenizer.ggml.tokens"]

        def token_id(name: str) -> int | None:
            i = md.get(f"tokenizer.ggml.{name}_token_id")
            return int(i) if i is not None and 0 <= int(i) < len(tokens) else None

        return cls(backend, vocab_size=len(tokens), bos_token_id=token_id("bos"), eos_token_id=token_id("eos"),
                   pad_token_id=token_id("padding"), unk_token_id=token_id("unknown"),
                   chat_template=md.get("tokenizer.chat_template") or builtin_template(md.get("general.architecture")),
                   add_bos_token=bool(md.get("tokenizer.ggml.add_bos_token", False)))

    @classmethod
    def from_hf_folder(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json + tokenizer_config.json (+ chat_template.jinja, generation_config.json)."""
        folder = Path(path)
        tj = folder / "tokenizer.json"
        if not tj.is_file():
            raise ModelFileError(f"{folder} has no tokenizer.json",
                                 "save the tokenizer with transformers' save_pretrained into the model folder")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tj))
        except Exception as e:
            raise ModelFileError(f"{tj} is not a valid tokenizer.json ({e})", "save the tokenizer again") from None
        config = _read_json(folder / "tokenizer_config.json")
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")

        def token_id(name: str) -> int | None:
            token = config.get(name)
            if isinstance(token, dict):
                token = token.get("content")
            return backend.token_to_id(token) if isinstance(token, str) else None

        generation = _read_json(folder / "generation_config.json")
        eos = generation.get("eos_token_id")
        extra = [e for e in (eos if isinstance(eos, list) else [eos]) if isinstance(e, int)]
        eos_id = token_id("eos_token")
        if eos_id is None and extra:
            eos_id = extra[0]
        add_bos = config.get("add_bos_token")
        if add_bos is None:  # what the post-processor does is what counts
            bos_id = token_id("bos_token")
            add_bos = bos_id is not None and backend.encode("a").ids[:1] == [bos_id]
        return cls(backend, bos_token_id=token_id("bos_token"), eos_token_id=eos_id,
                   pad_token_id=token_id("pad_token"), unk_token_id=token_id("unk_token"),
                   chat_template=template, add_bos_token=bool(add_bos), extra_stop_ids=extra)

    # ----- properties
    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """EOS plus the end-of-turn tokens this vocabulary has."""
        return self._stop_ids

    @property
    def bos_token(self) -> str | None:
        return self.id_to_token(self.bos_token_id) if self.bos_token_id is not None else None

    @property
    def eos_token(self) -> str | None:
        return self.id_to_token(self.eos_token_id) if self.eos_token_id is not None else None

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    # ----- encoding and decoding
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; add_special_tokens adds BOS (and EOS) where the model asks for them.
        Special tokens written in the text ("<|im_start|>") are always matched as single ids."""
        if not isinstance(text, str):
            raise InvalidRequestError(f"text to encode must be a string, not {type(text).__name__}", param="prompt")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        for t in texts:
            if not isinstance(t, str):
                raise InvalidRequestError(f"texts to encode must be strings, not {type(t).__name__}", param="prompt")
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if ids and (min(ids) < 0 or max(ids) >= self._vocab_size):
            bad = next(i for i in ids if not 0 <= i < self._vocab_size)
            raise InvalidRequestError(f"token id {bad} is outside the vocabulary (0..{self._vocab_size - 1})")
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def incremental_detokenizer(self, prompt_ids: Iterable[int] = (),
                                skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        """A streaming detokenizer for the tokens generated after `prompt_ids` (its last few are context)."""
        from thrifty.models.detokenizer import IncrementalDetokenizer

        return IncrementalDetokenizer(self, prompt_ids, skip_special_tokens)

    # ----- chat
    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: Sequence[dict[str, Any]] | None = None, **extra: Any) -> str:
        """The prompt text for `messages`, rendered as Hugging Face does (sandboxed jinja2)."""
        if not self.chat_template:
            raise InvalidRequestError("this model has no chat template, so chat messages cannot be turned "
                                      "into a prompt", "send a plain completion prompt instead", param="messages")
        if self._compiled is None or self._compiled.source != self.chat_template:
            self._compiled = ChatTemplate(self.chat_template)
        specials = {name: self.id_to_token(i) for name, i in (
            ("bos_token", self.bos_token_id), ("eos_token", self.eos_token_id),
            ("pad_token", self.pad_token_id), ("unk_token", self.unk_token_id)) if i is not None}
        import jinja2

        try:
            return self._compiled.render(**{**specials, **extra, "messages": list(messages), "tools": tools,
                                            "add_generation_prompt": add_generation_prompt})
        except jinja2.exceptions.TemplateError as e:
            raise InvalidRequestError(f"the chat template rejected the messages: {e}", param="messages") from None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{path} is not valid JSON ({e})", "restore the file from the model's source") from None
    return data if isinstance(data, dict) else {}
