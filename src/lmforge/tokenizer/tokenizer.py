"""The Tokenizer every lmforge stage uses: a `tokenizers.Tokenizer` plus the Hugging Face metadata around it.

It owns reading and writing the tokenizer half of an HF model directory so that lmforge and transformers agree on
every id and every prompt string:

- `tokenizer.json` is the tokenizer (the `tokenizers` library runs it; nothing is re-derived from vocab files);
- `tokenizer_config.json` names the special tokens (`bos_token`, `eos_token`, `pad_token`, `unk_token`, ... as
  strings or AddedToken dicts with "content"), adds tokens listed in `added_tokens_decoder` that tokenizer.json
  lacks, carries `model_max_length`, and may hold the chat template (a string, or a list of {name, template});
- `chat_template.jinja` (and `chat_templates/NAME.jinja`), as recent transformers writes them, win over the config;
- legacy `special_tokens_map.json` fills in special tokens the config does not name.
Named special tokens missing from the vocabulary are appended as special tokens, as transformers does. Whether
encode() adds BOS/EOS is tokenizer.json's post-processor alone: transformers 5 ignores `add_bos_token` /
`add_eos_token` in the config whenever tokenizer.json exists (4.x honoured them), and so does lmforge.

`save` writes tokenizer.json, tokenizer_config.json (tokenizer_class PreTrainedTokenizerFast unless the directory
came with another class) and special_tokens_map.json, so `AutoTokenizer.from_pretrained(dir)` loads it in
transformers 4.x and 5.x. Training lives in bpe.py, template rendering in chat.py; this module imports no torch.

`vocab_size` counts every id (base vocabulary plus added tokens, i.e. max id + 1): the size an embedding needs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tokenizers

from lmforge.errors import LmforgeError
from lmforge.tokenizer import chat

# The named special tokens transformers knows, in its order; each may be set in tokenizer_config.json.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# Tokens that end an assistant turn in common chat formats; they stop generation when the chat template emits them.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>")

# What transformers writes for "no limit".
_NO_MAX_LENGTH = int(1e30)


def _token_content(value: Any, where: str) -> str | None:
    """A special token from tokenizer_config.json: a string, an AddedToken dict with "content", or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise LmforgeError(f"{where}: a special token must be a string or a dict with 'content', got {value!r}")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LmforgeError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise LmforgeError(f"{path} must hold a JSON object")
    return data


def _templates_from_config(value: Any, where: str) -> dict[str, str]:
    """tokenizer_config.json's chat_template: a string, or a list of {"name", "template"} (or a name -> template map)."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return dict(value)
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in value):
        return {t["name"]: t["template"] for t in value}
    raise LmforgeError(f"{where}: chat_template must be a string or a list of {{'name', 'template'}} objects")


class StreamDecoder:
    """Incremental detokenization: push ids one by one, get the new text, never half a character.

    It decodes a small window of recent ids (so decoders that treat a sequence's first token specially, such as
    SentencePiece's leading space, see context) and emits the growth of the window's text. Text that ends in U+FFFD,
    the replacement character a byte-level decoder shows for an incomplete UTF-8 sequence, is held back until a later
    id completes it. The pushes' outputs plus `flush()` concatenate to `decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start: a position where earlier text was emitted whole
        self._read = 0  # ids[:read] are all emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip) if ids else ""

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes ('' while a character is still incomplete)."""
        self._ids.append(int(token_id))
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before):]

    def flush(self) -> str:
        """Text still held back (an incomplete character at the very end shows as U+FFFD, as decode shows it)."""
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return after[len(before):] if len(after) > len(before) else ""


class Tokenizer:
    """A byte-level (or any tokenizer.json) tokenizer with its special tokens and chat templates."""

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, unk_token: str | None = None,
                 chat_template: str | dict[str, str] | None = None, model_max_length: int | None = None,
                 config: dict | None = None, special_tokens: dict[str, str] | None = None):
        self._backend = backend
        # Encoding never truncates or pads behind the caller's back (transformers' encode does not either).
        self._backend.no_truncation()
        self._backend.no_padding()
        named = dict(special_tokens or {})
        for name, value in (("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token),
                            ("unk_token", unk_token)):
            if value is not None:
                named[name] = value
        self.special_tokens: dict[str, str] = {k: named[k] for k in SPECIAL_TOKEN_NAMES if named.get(k) is not None}
        missing = [t for t in self.special_tokens.values() if backend.token_to_id(t) is None]
        if missing:  # as transformers does: a named special token outside the vocabulary is appended
            backend.add_special_tokens(list(dict.fromkeys(missing)))
        if isinstance(chat_template, dict):
            self.chat_templates: dict[str, str] = dict(chat_template)
        else:
            self.chat_templates = {"default": chat_template} if chat_template is not None else {}
        self.model_max_length = model_max_length
        self._config = dict(config or {})  # other tokenizer_config.json keys, written back by save()
        self._vocab_size = max(backend.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    # ---------------------------------------------------------------- loading and saving

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load from an HF directory (tokenizer.json + tokenizer_config.json + chat template files)."""
        p = Path(path)
        if p.is_file() and p.suffix == ".json":
            directory, tok_file = p.parent, p
        else:
            directory, tok_file = p, p / "tokenizer.json"
        if not directory.is_dir():
            raise LmforgeError(f"tokenizer directory {directory} does not exist")
        if not tok_file.is_file():
            hint = ("; it has a SentencePiece tokenizer.model: convert it once with transformers "
                    "(AutoTokenizer.from_pretrained(dir).save_pretrained(dir)) to write tokenizer.json"
                    if (directory / "tokenizer.model").exists() else
                    "; train one with `lmforge tokenizer train` or point to an HF model directory")
            raise LmforgeError(f"no tokenizer.json in {directory}{hint}")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:  # the Rust side raises plain Exception on malformed files
            raise LmforgeError(f"{tok_file} is not a valid tokenizer.json: {e}") from None

        config_file = directory / "tokenizer_config.json"
        config = _read_json(config_file) if config_file.is_file() else {}
        map_file = directory / "special_tokens_map.json"
        legacy = _read_json(map_file) if map_file.is_file() else {}

        # Tokens declared in added_tokens_decoder but absent from tokenizer.json, in id order.
        declared = config.get("added_tokens_decoder") or {}
        if not isinstance(declared, dict):
            raise LmforgeError(f"{config_file}: added_tokens_decoder must be an object of id -> token")
        for key in sorted(declared, key=lambda k: int(k) if str(k).isdigit() else 0):
            spec = declared[key]
            content = _token_content(spec, f"{config_file} added_tokens_decoder[{key}]")
            if content is None or backend.token_to_id(content) is not None:
                continue
            spec = spec if isinstance(spec, dict) else {}
            token = tokenizers.AddedToken(content, single_word=bool(spec.get("single_word", False)),
                                          lstrip=bool(spec.get("lstrip", False)),
                                          rstrip=bool(spec.get("rstrip", False)),
                                          normalized=bool(spec.get("normalized", not spec.get("special", False))),
                                          special=bool(spec.get("special", False)))
            if token.special:
                backend.add_special_tokens([token])
            else:
                backend.add_tokens([token])

        special = {}
        for name in SPECIAL_TOKEN_NAMES:
            value = config[name] if name in config else legacy.get(name)
            special[name] = _token_content(value, f"{config_file} {name}")

        templates: dict[str, str] = {}
        if (directory / "chat_template.jinja").is_file():
            templates["default"] = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        if (directory / "chat_templates").is_dir():
            for f in sorted((directory / "chat_templates").glob("*.jinja")):
                templates[f.stem] = f.read_text(encoding="utf-8")
        if not templates:  # template files, when present, replace the config's template entirely
            templates = _templates_from_config(config.get("chat_template"), str(config_file))

        max_len = config.get("model_max_length")
        max_len = int(max_len) if isinstance(max_len, (int, float)) and max_len < _NO_MAX_LENGTH / 10 else None
        rest = {k: v for k, v in config.items()
                if k not in SPECIAL_TOKEN_NAMES and k not in ("chat_template", "added_tokens_decoder",
                                                              "model_max_length")}
        return cls(backend, chat_template=templates or None, model_max_length=max_len, config=rest,
                   special_tokens={k: v for k, v in special.items() if v is not None})

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into directory `path`."""
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(d / "tokenizer.json"))
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        config.update(self._config)
        config.update(self.special_tokens)
        config["model_max_length"] = self.model_max_length if self.model_max_length is not None else _NO_MAX_LENGTH
        config["added_tokens_decoder"] = {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(self._backend.get_added_tokens_decoder().items())}
        # Template files already in the directory would override the config on load: keep them in step.
        as_files = (d / "chat_template.jinja").exists() or (d / "chat_templates").is_dir()
        if as_files:
            self._write_template_files(d)
        elif list(self.chat_templates) == ["default"]:
            config["chat_template"] = self.chat_templates["default"]
        elif self.chat_templates:
            config["chat_template"] = [{"name": k, "template": v} for k, v in self.chat_templates.items()]
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                 encoding="utf-8")
        (d / "special_tokens_map.json").write_text(json.dumps(self.special_tokens, indent=2, ensure_ascii=False)
                                                   + "\n", encoding="utf-8")

    def _write_template_files(self, d: Path) -> None:
        default = d / "chat_template.jinja"
        if "default" in self.chat_templates:
            default.write_text(self.chat_templates["default"], encoding="utf-8")
        elif default.exists():
            default.unlink()
        others = {k: v for k, v in self.chat_templates.items() if k != "default"}
        folder = d / "chat_templates"
        if folder.is_dir():
            for f in folder.glob("*.jinja"):
                if f.stem not in others:
                    f.unlink()
        if others:
            folder.mkdir(exist_ok=True)
            for name, text in others.items():
                (folder / f"{name}.jinja").write_text(text, encoding="utf-8")

    # ---------------------------------------------------------------- ids

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer` (for batch encoding, offsets, inspection)."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (max id + 1): the embedding size a model needs."""
        return self._vocab_size

    def __len__(self) -> int:
        return self._vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(int(token_id))

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self._backend.token_to_id(token)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self.special_tokens.get("pad_token")

    @property
    def bos_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def unk_id(self) -> int | None:
        return self._special_id("unk_token")

    @property
    def special_ids(self) -> set[int]:
        """Ids of every token marked special (skipped by decode(skip_special_tokens=True))."""
        return {i for i, t in self._backend.get_added_tokens_decoder().items() if t.special}

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end generation: EOS, plus end-of-turn tokens (<|im_end|>, <|eot_id|>, ...) the template emits."""
        ids = [] if self.eos_id is None else [self.eos_id]
        templates = "".join(self.chat_templates.values())
        for token in END_OF_TURN_TOKENS:
            i = self._backend.token_to_id(token)
            if i is not None and token in templates and i not in ids:
                ids.append(i)
        return ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (e.g. <|im_start|>) become their ids.

        add_special_tokens applies the tokenizer's post-processor (BOS for Llama-3 checkpoints; none for tokenizers
        lmforge trains, whose callers add bos_id/eos_id where they want them).
        """
        if not isinstance(text, str):
            raise LmforgeError(f"encode takes a string, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """encode over many texts at once (parallel in the tokenizers library)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise LmforgeError("encode_batch takes a list of strings")
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        """Text of `ids` (a list of ints, or anything with .tolist(), such as a tensor)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        ids = [ids] if isinstance(ids, int) else list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self._vocab_size):
            bad = next(i for i in ids if i < 0 or i >= self._vocab_size)
            raise LmforgeError(f"token id {bad} is outside this tokenizer's vocabulary (0..{self._vocab_size - 1}); "
                               "was the model trained with a different tokenizer?")
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        """A fresh incremental decoder for one generated sequence."""
        return StreamDecoder(self, skip_special_tokens)

    # ---------------------------------------------------------------- chat

    @property
    def chat_template(self) -> str | None:
        """The default chat template (Jinja source), or None."""
        return self.chat_templates.get("default")

    @chat_template.setter
    def chat_template(self, template: str | None) -> None:
        if template is None:
            self.chat_templates.pop("default", None)
        else:
            self.chat_templates["default"] = template

    def _pick_template(self, chat_template: str | None, tools: list | None) -> str:
        if chat_template is not None:
            return self.chat_templates.get(chat_template, chat_template)
        if tools is not None and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if "default" in self.chat_templates:
            return self.chat_templates["default"]
        if self.chat_templates:
            raise LmforgeError(f"this tokenizer has several chat templates and no default; pass chat_template= "
                               f"one of: {', '.join(sorted(self.chat_templates))}")
        raise LmforgeError("this tokenizer has no chat template; set one (tokenizer.chat_template = JINJA, or "
                           "chat_template in tokenizer_config.json) or use a chat/instruct model")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, *,
                            chat_template: str | None = None, tools: list[dict] | None = None,
                            documents: list[dict] | None = None, **extra: Any) -> str:
        """The prompt string for `messages`, identical to transformers' apply_chat_template(tokenize=False).

        chat_template may name one of this tokenizer's templates or be Jinja source; `extra` reaches the template.
        """
        template = self._pick_template(chat_template, tools)
        variables = {**self.special_tokens, **extra}
        bos, eos = variables.pop("bos_token", None), variables.pop("eos_token", None)
        return chat.render(template, messages, add_generation_prompt, bos, eos, tools=tools, documents=documents,
                           **variables)

    def __repr__(self) -> str:
        names = ", ".join(f"{k}={v!r}" for k, v in self.special_tokens.items())
        return f"Tokenizer(vocab_size={self._vocab_size}, {names}, chat_templates={sorted(self.chat_templates)})"
