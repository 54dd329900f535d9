"""`lmforge doctor`: is a model directory the same model for training, serving and export?

    lmforge doctor --model runs/lora/final [--data train.jsonl | --data builtin] [--gguf] [--prompts heldout.jsonl]

One table of checks, each pass / warn / fail / skip, with what was found and, for every warning and failure, what
to change. The exit status is 1 when a check fails (0 otherwise; 2 for a usage error), so CI can gate on it.

The checks, and the failure each one catches:
  vocab               a token id the tokenizer can produce has no embedding row (the model crashes or reads garbage)
  round trip          decode(encode(text)) != text on unicode, code and whitespace (a tokenizer.json missing its
                      decoder or normalizing text): what the model writes is not what users read
  chat template       there is a template to render chats with
  template: transformers  lmforge and transformers render a conversation to the same text and the same ids (they
                      can disagree when tokenizer_config.json and tokenizer.json say different things about a
                      token, e.g. rstrip on <|im_end|>); skipped with a note when transformers is not installed
  template: train = serve  the prompt serving sends (data/sft would train on this conversation's rendering, the
                      server sends its render up to the assistant header) is the prefix training saw, and the loss
                      starts exactly where generation starts (a generation prompt that differs from the assistant
                      header, e.g. a missing newline, teaches the model to answer a prompt it never gets)
  end of turn         the template ends an assistant turn with a special token, and that token is among
                      generation_config.json's eos_token_id (what transformers, vLLM and TGI stop on; lmforge also
                      stops on the template's end-of-turn, other runtimes do not)
  stops               greedy replies to held-out prompts end with an end-of-turn within --max-new-tokens: the
                      "finetuned model never stops" failure (common when pad == eos and a collator masking pad ids
                      also masked every EOS out of the loss)
  sft masks           (--data) each example rendered by data/sft.py trains on the end-of-turn token once per
                      assistant turn (a {% generation %} block that leaves it outside, or truncation at the context)
  context             config.json's context (max_position_embeddings) and RoPE scaling agree with the tokenizer's
                      model_max_length
  gguf                (--gguf) the GGUF export (inference/convert.py) carries the same chat template and end-of-turn
                      id, and llama.cpp (llama-cpp-python, when installed) tokenizes the rendered chats to the same
                      ids, BOS handled as llama.cpp's server handles it

The probe conversations are fixed (unicode, a system turn, several turns) so every run checks the same thing. A
template that refuses a system turn is probed without one.
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from lmforge.config import opt
from lmforge.errors import LmforgeError

# Short questions a chat model answers in a few tokens: the stop check's prompts when none are given.
DEFAULT_PROMPTS = ("What is the capital of France? Answer in one word.",
                   "Name one colour of the rainbow, in one word.",
                   "What is 2 + 3? Reply with the number only.",
                   "Say hello in one short sentence.")
# Text the round trip must survive: accents, CJK, emoji, code, runs of spaces and newlines, digits.
ROUND_TRIP = ("Hello world! It's 2024-05-17; café, naïve, 東京, emoji 🙂.",
              "def f(x):\n    return x ** 2  # squared\n\n\n\tTabs  and   spaces ",
              " leading space, trailing newline\n", "1234567890 3.14159 -42 0x1F")
PROBE = "lmforge doctor probe"
STATUSES = ("pass", "warn", "fail", "skip")


@dataclass
class DoctorConfig:
    model: str = opt("", help="model directory (HF format, e.g. runs/NAME/final), a .gguf file or a packaged "
                     "model name")
    data: str = opt("", help="SFT JSONL (or 'builtin') whose assistant masks must hold the end-of-turn token")
    prompts: str = opt("", help="held-out prompts for the stop check: JSONL with 'prompt' or 'question' (default: "
                       "built-in held-out questions with --data builtin, else short built-in questions)")
    num_prompts: int = opt(4, help="prompts the stop check generates from")
    max_new_tokens: int = opt(64, help="N: a reply must end with an end-of-turn within this many tokens")
    gguf: bool = opt(False, help="also export a GGUF and check its template, end-of-turn and llama.cpp's ids")
    seq_len: int = opt(0, help="context the SFT examples are cut to (default: the model's)")
    max_records: int = opt(1000, help="SFT records checked (the first N)")
    threads: int = opt(0, help="CPU threads for torch (0 = torch's default)")
    json: bool = opt(False, help="print the checks as JSON")


@dataclass
class Check:
    name: str
    status: str  # pass | warn | fail | skip
    detail: str
    fix: str = ""


class Doctor:
    """The model under examination: its directory, tokenizer, ids that stop generation, and the probe chats."""

    def __init__(self, model: str):
        from lmforge import checkpoint
        from lmforge.inference.load import resolve_model

        self.source = model
        self.path = resolve_model(model)  # a .gguf or packaged name: its cached import
        self.cfg = checkpoint.load_config(self.path)
        try:
            self.tok = checkpoint.load_tokenizer(self.path)
        except LmforgeError as e:
            raise LmforgeError(f"{self.path} has no usable tokenizer ({e}); doctor checks a model with its "
                               "tokenizer (tokenizer.json + tokenizer_config.json)") from None
        self.gen_eos = list(checkpoint.eos_ids(self.path))
        self._model = None
        self.eot: int | None = None
        self.conversations = self._probe_conversations()

    @property
    def model(self):
        if self._model is None:
            from lmforge import checkpoint

            self._model = checkpoint.load_model(self.path).eval().requires_grad_(False)
        return self._model

    def token(self, i: int | None) -> str:
        return "none" if i is None else f"{self.tok.id_to_token(i)!r} (id {i})"

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)

    def serve_ids(self, messages: list[dict]) -> list[int]:
        from lmforge.inference.generate import chat_ids

        return chat_ids(self.tok, messages)

    def _probe_conversations(self) -> list[list[dict]]:
        """Conversations ending on a user turn (what a server renders); those the template refuses are left out."""
        system = {"role": "system", "content": "You answer briefly."}
        turns = [{"role": "user", "content": "Hello! Is café spelt with an accent? 東京 🙂"},
                 {"role": "assistant", "content": "Yes: café.\n\n  Indented   text stays."},
                 {"role": "user", "content": "def f(x):\n    return x  # and code?"}]
        out = []
        if self.tok.chat_template is None:
            return out
        for conv in ([turns[0]], turns, [system, *turns]):
            try:
                self.render(conv, True)
            except LmforgeError:
                continue
            out.append(conv)
        return out


# ---- checks ---------------------------------------------------------------------------------------------
def check_vocab(d: Doctor) -> Check:
    n_tok, n_emb = d.tok.vocab_size, d.cfg.vocab_size
    named = [("bos", d.tok.bos_id), ("eos", d.tok.eos_id), ("pad", d.tok.pad_id)] + \
        [("generation_config eos", i) for i in d.gen_eos]
    outside = [f"{k} {i}" for k, i in named if i is not None and i >= n_emb]
    if n_tok > n_emb or outside:
        return Check("vocab", "fail", f"the tokenizer has {n_tok} ids, the embedding {n_emb} rows"
                     + (f"; outside it: {', '.join(outside)}" if outside else ""),
                     "use the tokenizer the model was trained with, or resize the embedding (and train the new "
                     "rows) before adding tokens")
    return Check("vocab", "pass", f"{n_tok} tokenizer ids fit {n_emb} embedding rows")


def check_round_trip(d: Doctor) -> Check:
    for text in ROUND_TRIP:
        back = d.tok.decode(d.tok.encode(text, add_special_tokens=False), skip_special_tokens=False)
        if back != text:
            return Check("round trip", "fail", f"decode(encode({text!r})) = {back!r}",
                         "the tokenizer.json decoder (or a normalizer) changes text: for byte-level BPE its "
                         "\"decoder\" must be ByteLevel; save the tokenizer with the library that trained it")
    return Check("round trip", "pass", f"{len(ROUND_TRIP)} texts (unicode, code, whitespace) come back unchanged")


def check_template(d: Doctor) -> Check:
    if d.tok.chat_template is None:
        return Check("chat template", "fail", "the tokenizer has no chat template: servers cannot render chats and "
                     "finetuning falls back to lmforge's default ChatML",
                     "put the template the model was trained with in tokenizer_config.json (\"chat_template\"); "
                     "lmforge finetune saves the one it used")
    if not d.conversations:
        return Check("chat template", "fail", "the template fails on every probe conversation (user / assistant "
                     "turns)", "fix the template: it must render alternating user and assistant turns")
    return Check("chat template", "pass", f"renders {len(d.conversations)} probe conversations")


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _show_ids(d: Doctor, ids: list[int], at: int) -> str:
    return " ".join(repr(d.tok.id_to_token(i)) for i in ids[max(0, at - 1):at + 3]) or "(end)"


def check_transformers(d: Doctor) -> Check:
    name = "template: transformers"
    if not d.conversations:
        return Check(name, "skip", "no chat template to compare")
    try:
        import transformers
    except ImportError:
        return Check(name, "skip", "transformers is not installed (pip install transformers to compare)")
    try:
        hf = transformers.AutoTokenizer.from_pretrained(str(d.path))
    except Exception as e:  # noqa: BLE001  (any loading failure is the finding)
        return Check(name, "fail", f"transformers cannot load the tokenizer: {type(e).__name__}: {e}",
                     "save the tokenizer as tokenizer.json + tokenizer_config.json (lmforge's Tokenizer.save)")
    for conv in d.conversations:
        ours_text = d.render(conv, True)
        theirs_text = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        if ours_text != theirs_text:
            at = _first_difference(list(ours_text), list(theirs_text))
            return Check(name, "fail", f"the rendered text differs at character {at}: lmforge "
                         f"{ours_text[at:at + 20]!r}, transformers {theirs_text[at:at + 20]!r}",
                         "one template for both: keep it in tokenizer_config.json (or chat_template.jinja) only")
        ours = d.serve_ids(conv)
        theirs = list(hf(theirs_text, add_special_tokens=False)["input_ids"])  # what apply_chat_template(tokenize=True) does
        if ours != theirs:
            at = _first_difference(ours, theirs)
            theirs_tokens = " ".join(repr(t) for t in hf.convert_ids_to_tokens(theirs[max(0, at - 1):at + 3]))
            return Check(name, "fail", f"the same text tokenizes differently at token {at} ({len(ours)} vs "
                         f"{len(theirs)} ids): lmforge {_show_ids(d, ours, at)}, transformers {theirs_tokens}",
                         "tokenizer_config.json and tokenizer.json disagree about a token (added_tokens_decoder's "
                         "lstrip/rstrip/normalized, or a token one of them lacks): make the two files say the same")
    return Check(name, "pass", f"{len(d.conversations)} conversations: the same text and ids "
                 f"(transformers {transformers.__version__})")


def check_train_serve(d: Doctor) -> Check:
    from lmforge.data.sft import RecordError, chat_renderer, encode_chat

    name = "template: train = serve"
    if not d.conversations:
        return Check(name, "skip", "no chat template")
    render = chat_renderer(d.tok)
    conv = d.conversations[-1]
    full = [*conv, {"role": "assistant", "content": PROBE}]
    try:
        ex = encode_chat(d.tok, render, full)
    except (LmforgeError, RecordError) as e:
        return Check(name, "fail", f"data/sft cannot render a training example: {e}",
                     "fix the template so that it renders a conversation ending on an assistant turn")
    served = d.serve_ids(conv)
    if ex.ids[:len(served)] != served:
        at = _first_difference(ex.ids, served)
        return Check(name, "fail", f"the served prompt is not what training saw: they part at token {at} "
                     f"(training {_show_ids(d, ex.ids, at)}, serving {_show_ids(d, served, at)})",
                     "make the template's add_generation_prompt text exactly the assistant header its turns "
                     "write (e.g. '<|im_start|>assistant\\n' in both)")
    n = len(served)  # ex.train[j]: the loss covers predicting token j
    first = next((j for j in range(n - 1, len(ex.ids)) if ex.train[j]), None)
    if first != n:
        gap = _show_ids(d, ex.ids, n + 1) if first is None or first > n else _show_ids(d, ex.ids, first + 1)
        where = ("training put the reply after more header text the served prompt lacks"
                 if first is not None and first > n else "the loss covers the header's end")
        return Check(name, "fail", f"generation starts at token {n}, the trained reply at token {first}: {where} "
                     f"(around it: {gap})", "make the template's add_generation_prompt text exactly the assistant "
                     "header its turns write (e.g. '<|im_start|>assistant\\n' in both), and keep the header out of "
                     "{% generation %} marks")
    return Check(name, "pass", f"the served prompt ({len(served)} ids) is the training prefix; the loss starts at "
                 "the reply")


def find_end_of_turn(d: Doctor) -> tuple[int | None, str]:
    """The first special token the template writes after an assistant reply, and that text."""
    if not d.conversations:
        return None, ""
    conv = [*d.conversations[0], {"role": "assistant", "content": PROBE}]
    text = d.render(conv)
    tail = text[text.rindex(PROBE) + len(PROBE):] if PROBE in text else ""
    specials = d.tok.special_ids | set(d.tok.stop_ids)
    eot = next((i for i in d.tok.encode(tail, add_special_tokens=False) if i in specials), None)
    return eot, tail


def check_end_of_turn(d: Doctor) -> Check:
    name = "end of turn"
    if not d.conversations:
        return Check(name, "skip", "no chat template")
    d.eot, tail = find_end_of_turn(d)
    if d.eot is None:
        return Check(name, "fail", f"after a reply the template writes {tail!r}: no special token ends the turn, "
                     "so nothing tells a model (or a server) that the reply is over",
                     "end assistant turns with a special token in the template (e.g. {{ eos_token }} or <|im_end|>)")
    gen = ", ".join(d.token(i) for i in d.gen_eos) or "none"
    if d.eot not in d.gen_eos:
        return Check(name, "fail", f"replies end with {d.token(d.eot)}, generation_config.json's eos_token_id is "
                     f"{gen}: transformers, vLLM and TGI would not stop at the end of a reply",
                     f"set \"eos_token_id\": {sorted({*d.gen_eos, d.eot})} in generation_config.json")
    return Check(name, "pass", f"replies end with {d.token(d.eot)}, one of generation_config's eos ids ({gen})")


def held_out_prompts(cfg: DoctorConfig) -> tuple[list[str], str]:
    """The stop check's prompts and where they came from."""
    n = max(1, cfg.num_prompts)
    if cfg.prompts:
        p = Path(cfg.prompts)
        if not p.is_file():
            raise LmforgeError(f"--prompts {p} does not exist; give a JSONL file with 'prompt' or 'question' fields")
        out = []
        for line in p.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise LmforgeError(f"--prompts {p}: a line is not JSON ({e.msg})") from None
                q = rec.get("prompt", rec.get("question")) if isinstance(rec, dict) else None
                if not isinstance(q, str):
                    raise LmforgeError(f"--prompts {p}: each line needs a string 'prompt' or 'question'")
                out.append(q)
        if not out:
            raise LmforgeError(f"--prompts {p} holds no prompts")
        return out[:n], str(p)
    if cfg.data == "builtin":
        from lmforge.data import builtin_sets

        return [r["prompt"] for r in builtin_sets.heldout_qa()[:n]], "the built-in held-out questions"
    return list(DEFAULT_PROMPTS[:n]), "built-in short questions"


def check_stops(d: Doctor, prompts: list[str], where: str, max_new_tokens: int) -> Check:
    from lmforge.inference.engine import Engine
    from lmforge.inference.sampling import SamplingParams

    name = "stops"
    if not d.conversations:
        return Check(name, "skip", "no chat template")
    stop = [i for i in dict.fromkeys([*([d.eot] if d.eot is not None else []), *d.gen_eos]) if i is not None]
    ids = [d.serve_ids([{"role": "user", "content": p}]) for p in prompts]
    max_len = min(d.cfg.max_seq_len, max(map(len, ids)) + max_new_tokens)  # a KV cache no longer than needed
    engine = Engine(d.model, max_batch=len(ids), max_len=max_len, eos_ids=stop)
    outs = engine.generate(ids, SamplingParams(temperature=0.0, max_tokens=max_new_tokens))
    ended = [o for o in outs if o and o[-1] in stop]
    lengths = [len(o) for o in ended]
    detail = (f"{len(ended)}/{len(outs)} greedy replies to {where} ended with "
              f"{' or '.join(d.token(i) for i in stop) or 'an end-of-turn'} within {max_new_tokens} tokens"
              + (f" (after {min(lengths)}-{max(lengths)})" if lengths else ""))
    if len(ended) == len(outs):
        return Check(name, "pass", detail)
    fix = ("train with the end-of-turn token inside the loss (lmforge finetune does; `doctor --data` checks the "
           "masks). If pad == eos, a collator that masks pad ids masks every EOS too: mask by position, or give "
           "the tokenizer its own pad token")
    sample = d.tok.decode(next(o for o in outs if not o or o[-1] not in stop)[:24])
    return Check(name, "fail" if not ended else "warn", f"{detail}; one that ran on: {sample!r}...", fix)


def check_sft_masks(d: Doctor, data: str, seq_len: int, max_records: int) -> Check:
    from lmforge.data.sft import RecordError, chat_renderer, encode_chat, read_jsonl, to_messages, truncate

    name = "sft masks"
    if not data:
        return Check(name, "skip", "no --data given")
    if d.eot is None:
        return Check(name, "skip", "no end-of-turn token to look for (see 'end of turn')")
    render = chat_renderer(d.tok)
    if data == "builtin":
        from lmforge.data import builtin_sets

        records = [(f"builtin sft-train {i + 1}", r) for i, r in enumerate(builtin_sets.sft_records("train"))]
    else:
        records = list(read_jsonl(data, lambda r: r))
    checked = missing = cut = 0
    first_bad = ""
    for where, rec in records[:max_records]:
        try:
            messages = to_messages(rec)
            ex = encode_chat(d.tok, render, messages)
        except (RecordError, LmforgeError) as e:
            return Check(name, "fail", f"{where}: data/sft cannot render it: {e}",
                         "fix the record or the template (lmforge finetune would stop on it too)")
        ex, truncated = truncate(ex, seq_len + 1)
        turns = sum(m.get("role") == "assistant" for m in messages)
        trained_eot = sum(1 for i, t in zip(ex.ids, ex.train) if t and i == d.eot)
        checked += 1
        if trained_eot < turns:
            cut += truncated
            missing += 1
            first_bad = first_bad or f"{where} ({trained_eot} of {turns} replies{', truncated' if truncated else ''})"
    detail = f"{checked - missing}/{checked} examples train on {d.token(d.eot)} after every reply"
    if not missing:
        return Check(name, "pass", detail + f" (at {seq_len} tokens)")
    if missing == cut:
        return Check(name, "warn", f"{detail}; {cut} lose it to truncation at {seq_len} tokens, e.g. {first_bad}",
                     "raise --seq-len or drop overlong examples: a cut reply teaches the model not to stop")
    fix = ("the template's {% generation %} block must include the end-of-turn: move {% endgeneration %} after it"
           if "generation" in (d.tok.chat_template or "") else
           "make the template write the end-of-turn token right after each assistant reply")
    return Check(name, "fail", f"{detail}; e.g. {first_bad}: the model is never taught to stop", fix)


_NO_LIMIT = 1e29  # transformers writes 1e30 for "no limit"


def check_context(d: Doctor) -> Check:
    from lmforge.model.config import rope_type

    n = d.cfg.max_seq_len
    mml = d.tok.model_max_length
    rs = d.cfg.rope_scaling or {}
    kind = rope_type(rs)
    rope = f"RoPE theta {d.cfg.rope_theta:g}" + (f", {kind} scaling x{rs.get('factor')}" if rs else "")
    orig = rs.get("original_max_position_embeddings")
    if orig and rs.get("factor") and n > orig * float(rs["factor"]):
        return Check("context", "fail", f"config.json's context {n} is beyond what its {kind} scaling reaches "
                     f"({orig} x {rs['factor']} = {int(orig * float(rs['factor']))})",
                     "lower max_position_embeddings, or raise the scaling factor and train at the longer length")
    if mml is None or mml >= _NO_LIMIT:
        return Check("context", "pass", f"config {n} positions ({rope}); the tokenizer sets no model_max_length")
    if mml > n:
        return Check("context", "fail", f"tokenizer model_max_length {mml} > config.json's {n} positions ({rope}): "
                     "prompts past the trained positions are accepted", f"set \"model_max_length\": {n} in "
                     "tokenizer_config.json (or extend the context with RoPE scaling and update both)")
    if mml < n:
        return Check("context", "warn", f"tokenizer model_max_length {mml} < config.json's {n} ({rope}): "
                     "transformers truncates and warns at the tokenizer's limit",
                     f"set \"model_max_length\": {n} in tokenizer_config.json")
    return Check("context", "pass", f"config and tokenizer agree on {n} positions ({rope})")


def check_gguf(d: Doctor, enabled: bool) -> Check:
    name = "gguf"
    if not enabled:
        return Check(name, "skip", "not asked (--gguf)")
    if not d.conversations:
        return Check(name, "skip", "no chat template to compare")
    from lmforge.inference.convert import export_gguf

    with tempfile.TemporaryDirectory(prefix="lmforge-doctor-") as tmp:
        try:
            report = export_gguf(d.path, Path(tmp) / "model.gguf", "f16")
        except LmforgeError as e:
            return Check(name, "fail", f"the export fails: {e}", "see docs/gguf.md for what the export supports")
        notes = "; ".join(report.warnings)
        if d.eot is not None and report.eot_id != d.eot and d.eot not in report.stop_ids:
            return Check(name, "fail", f"the GGUF's end-of-turn is {d.token(report.eot_id)}, the template's "
                         f"{d.token(d.eot)}", "make the template's end-of-turn token the tokenizer's eos_token or "
                         "one of generation_config's eos ids before exporting")
        try:
            import llama_cpp
        except ImportError:
            return Check(name, "pass", f"exported (end-of-turn {d.token(report.eot_id)}, add_bos "
                         f"{str(report.add_bos).lower()}); llama.cpp ids not compared: pip install "
                         "llama-cpp-python" + (f"; notes: {notes}" if notes else ""))
        llm = llama_cpp.Llama(str(report.path), vocab_only=True, verbose=False)
        template = llm.metadata.get("tokenizer.chat_template")
        if template != d.tok.chat_template:
            return Check(name, "fail", "the GGUF's tokenizer.chat_template is not the tokenizer's",
                         "re-export: the export writes the tokenizer's own template")
        bos = d.tok.bos_token or ""
        for conv in d.conversations:
            text = d.render(conv, True)
            if report.add_bos and bos and text.startswith(bos):  # llama.cpp's server drops it and adds the id
                text = text[len(bos):]
            theirs = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
            ours = d.serve_ids(conv)
            if theirs != ours:
                at = _first_difference(ours, theirs)
                shown = " ".join(repr(llm.detokenize([t], special=True).decode("utf-8", "replace"))
                                 for t in theirs[max(0, at - 1):at + 3])
                return Check(name, "fail", f"llama.cpp tokenizes the chat differently at token {at} ({len(ours)} "
                             f"vs {len(theirs)} ids): lmforge {_show_ids(d, ours, at)}, llama.cpp {shown}"
                             + (f"; export notes: {notes}" if notes else ""),
                             "a tokenizer llama.cpp cannot reproduce (a normalizer, an unknown pre-tokenizer): "
                             "export from a tokenizer without them, or pass --pre-tokenizer NAME to the export")
    return Check(name, "pass", f"llama.cpp {llama_cpp.__version__}: the same template and ids for "
                 f"{len(d.conversations)} chats; end-of-turn {d.token(report.eot_id)}, add_bos "
                 f"{str(report.add_bos).lower()}" + (f"; notes: {notes}" if notes else ""))


def diagnose(cfg: DoctorConfig) -> list[Check]:
    """Every check, in order (later checks use what earlier ones found: the end-of-turn token)."""
    if not cfg.model:
        raise LmforgeError("say which model to examine: --model DIR (or a .gguf file / packaged model name)")
    if cfg.max_new_tokens < 1 or cfg.num_prompts < 1:
        raise LmforgeError("--max-new-tokens and --num-prompts must be at least 1")
    prompts, where = held_out_prompts(cfg)
    if cfg.threads > 0:
        import torch

        torch.set_num_threads(cfg.threads)
    d = Doctor(cfg.model)
    seq_len = cfg.seq_len or d.cfg.max_seq_len
    vocab = check_vocab(d)
    checks = [vocab, check_round_trip(d), check_template(d), check_transformers(d), check_train_serve(d),
              check_end_of_turn(d)]
    if vocab.status == "fail":  # the model cannot run on this tokenizer's ids
        checks += [Check("stops", "skip", "the vocabulary does not fit the model (see 'vocab')")]
    else:
        checks += [check_stops(d, prompts, where, cfg.max_new_tokens)]
    checks += [check_sft_masks(d, cfg.data, seq_len, cfg.max_records), check_context(d)]
    checks += [Check("gguf", "skip", "the vocabulary does not fit the model (see 'vocab')") if vocab.status == "fail"
               else check_gguf(d, cfg.gguf)]
    return checks


def run(cfg: DoctorConfig) -> int:
    from lmforge.eval.report import table

    checks = diagnose(cfg)
    failed = [c for c in checks if c.status == "fail"]
    if cfg.json:
        print(json.dumps([asdict(c) for c in checks], indent=1, ensure_ascii=False))
    else:
        print(f"lmforge doctor: {cfg.model}")
        print(table(["check", "result", "found", "fix"],
                    [[c.name, c.status.upper() if c.status in ("fail", "warn") else c.status, c.detail, c.fix or "-"]
                     for c in checks]))
        counts = {s: sum(c.status == s for c in checks) for s in STATUSES}
        print(", ".join(f"{v} {k}" for k, v in counts.items() if v), file=sys.stderr)
    return 1 if failed else 0
