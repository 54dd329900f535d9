"""`lmforge eval task`: accuracy on a JSONL file of examples, zero- or few-shot, optionally with retrieval.

    lmforge eval task --model runs/x/final --data heldout.jsonl [--shots 3] [--rag indexes/docs] [--metric exact]

Examples, one JSON object per line:
  {"prompt": ..., "answer": ...}                        generation, scored by `exact` or `contains`
  {"question": ..., "choices": [...], "answer": i}      multiple choice (answer: index, or the choice's text),
                                                        scored by `choice`
Metrics:
  exact     the normalised generation equals the normalised answer (case-folded, whitespace collapsed, outer
            quotes and a final period stripped)
  contains  the normalised answer occurs in the normalised generation
  rougel    ROUGE-L F1 (Lin 2004): the longest common subsequence of words, case-folded, against the reference;
            for short reference answers said in other words (a docstring's first sentence)
  f1        token F1 (SQuAD's: the harmonic mean of word precision and recall as multisets, case-folded, no
            punctuation or articles)
            Both give each item a score in [0, 1] ("score", its mean "mean_score" with a bootstrap 95% interval);
            an item is correct when its score is at least 0.5, so accuracy, its Wilson interval and the paired
            tests of `compare` work on them as on the other metrics.
  choice    the choice with the highest log-likelihood given the prompt wins ("accuracy"); "accuracy_norm" divides
            each choice's log-likelihood by its length in characters, so long choices are not penalised for
            length (lm-evaluation-harness's acc_norm). --length-norm makes it the headline figure. In chat format
            a choice is scored as the assistant's reply, its end-of-turn token included.
Prompt format: with a chat template (`--chat auto` uses one when the tokenizer has one) each example is a user
turn and the answer an assistant turn; few-shot examples are earlier turns. Without one, prompts are plain text:
"{prompt} {answer}" per shot, blank-line separated ("Question: {question}\nAnswer: {choice}" for choice items),
and generation stops at the first newline (or blank line, if some answer spans lines).
Few-shot examples for an item come from the same file, never the item itself, chosen by a seeded draw per item;
if they do not fit the context, shots are dropped until the prompt fits.
With --rag, sources retrieved for the item's prompt/question go before it (rag.prompt), within the context left
after the shots and the answer tokens.

Greedy decoding; latency, prompt tokens and generated tokens are measured per example (see lm.py), which is what
`lmforge compare` prices.
"""

from __future__ import annotations

import json
import random
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.config import opt
from lmforge.errors import LmforgeError

METRICS = ("exact", "contains", "choice", "rougel", "f1")
SCORE_PASS = 0.5  # a graded metric's score from which an item counts as correct


@dataclass
class TaskConfig:
    model: str = opt("", help="model directory (HF format, e.g. runs/NAME/final), a .gguf file or a packaged "
                     "model name")
    data: str = opt("", help="JSONL examples: {prompt, answer} or {question, choices, answer}")
    metric: str | None = opt(None, help="exact | contains | choice (default: choice for choice items, else exact)",
                             choices=[*METRICS])
    shots: int = opt(0, help="few-shot examples per item, drawn from the file's other items")
    rag: str = opt("", help="RAG index directory: retrieve sources for each item")
    top_k: int = opt(3, help="sources retrieved per item with --rag")
    chat: str = opt("auto", help="format prompts with the chat template: auto | on | off", choices=["auto", "on", "off"])
    length_norm: bool = opt(False, help="choice metric: report length-normalised accuracy as the headline")
    limit: int = opt(0, help="evaluate only the first N items (0: all)")
    max_new_tokens: int = opt(64, help="most tokens generated per item")
    concurrency: int = opt(1, help="requests in flight at once (1 = latency as one user sees it)")
    seed: int = opt(0, help="seed of the few-shot draw")
    dtype: str = opt("float32", help="weights and activations dtype", choices=["float32", "bfloat16", "float16"])
    device: str = opt("cpu", help="torch device")
    compile: bool = opt(True, help="compile the decode step for generated answers (a model's first compile takes "
                                   "minutes, cached after; --no-compile)")
    json: bool = opt(False, help="print the result as JSON")
    out: str = opt("", help="also write the result (with per-item records) as JSON to this file")


# ---- examples -------------------------------------------------------------------------------------------
@dataclass
class Example:
    prompt: str  # the prompt (or the question of a choice item)
    answer: str  # the gold answer text
    choices: list[str] | None = None
    answer_index: int | None = None
    raw: dict = field(default_factory=dict)

    @property
    def is_choice(self) -> bool:
        return self.choices is not None


def load_examples(path: str | Path) -> list[Example]:
    """Read and check a JSONL task file; errors name the line and what to fix."""
    p = Path(path)
    if not p.is_file():
        raise LmforgeError(f"task file {p} does not exist")
    out: list[Example] = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{p}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise LmforgeError(f"{where} is not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise LmforgeError(f"{where} must be a JSON object")
            if "choices" in rec:
                q, choices, ans = rec.get("question", rec.get("prompt")), rec["choices"], rec.get("answer")
                if not isinstance(q, str) or not isinstance(choices, list) or len(choices) < 2 or \
                        not all(isinstance(c, str) and c.strip() for c in choices):
                    raise LmforgeError(f"{where}: a choice item needs \"question\" (string) and \"choices\" (2 or "
                                       "more non-empty strings)")
                if isinstance(ans, bool) or not (isinstance(ans, int) and 0 <= ans < len(choices)) and ans not in choices:
                    raise LmforgeError(f"{where}: \"answer\" must be the index of the right choice (0..{len(choices) - 1}) "
                                       "or its exact text")
                idx = ans if isinstance(ans, int) else choices.index(ans)
                out.append(Example(q, choices[idx], list(choices), idx, rec))
            else:
                prompt, ans = rec.get("prompt", rec.get("question")), rec.get("answer")
                if isinstance(ans, (int, float)) and not isinstance(ans, bool):
                    ans = str(ans)
                if not isinstance(prompt, str) or not isinstance(ans, str):
                    raise LmforgeError(f"{where}: an item needs string \"prompt\" and \"answer\" fields (or "
                                       "\"question\", \"choices\", \"answer\" for multiple choice)")
                out.append(Example(prompt, ans, raw=rec))
    if not out:
        raise LmforgeError(f"{p} holds no examples")
    kinds = {e.is_choice for e in out}
    if len(kinds) > 1:
        raise LmforgeError(f"{p} mixes choice items and prompt/answer items; put them in separate files")
    return out


def shot_indices(n: int, i: int, k: int, seed: int) -> list[int]:
    """k distinct indices of other items for item i, drawn with a per-item seed (the same every run)."""
    if k <= 0:
        return []
    if k > n - 1:
        raise LmforgeError(f"--shots {k} needs at least {k + 1} items in the file, it has {n}")
    pool = [j for j in range(n) if j != i]
    return random.Random(seed * 1_000_003 + i).sample(pool, k)


# ---- metrics --------------------------------------------------------------------------------------------
def normalize(text: str) -> str:
    t = " ".join(text.casefold().split())
    t = t.strip("\"'`“”‘’ ")
    return t[:-1].rstrip() if t.endswith(".") else t


_WORD = re.compile(r"\w+")
_ARTICLES = {"a", "an", "the"}


def words(text: str) -> list[str]:
    """Case-folded word tokens (letters, digits, underscores): what the graded metrics compare."""
    return _WORD.findall(text.casefold())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: 2PR / (P + R) with P, R = LCS(words) / len(prediction words), / len(reference words)."""
    p, r = words(prediction), words(reference)
    if not p or not r:
        return float(p == r)
    prev = [0] * (len(r) + 1)  # one row of the LCS table at a time
    for x in p:
        row = [0]
        for j, y in enumerate(r):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
        prev = row
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1 over words without articles (multiset overlap)."""
    from collections import Counter

    p = [w for w in words(prediction) if w not in _ARTICLES]
    r = [w for w in words(reference) if w not in _ARTICLES]
    if not p or not r:
        return float(p == r)
    same = sum((Counter(p) & Counter(r)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(r)
    return 2 * precision * recall / (precision + recall)


def generation_score(prediction: str, answer: str, metric: str) -> float:
    """An item's score in [0, 1]: 1/0 for exact and contains, ROUGE-L or token F1 for the graded metrics."""
    if metric == "rougel":
        return rouge_l(prediction, answer)
    if metric == "f1":
        return token_f1(prediction, answer)
    return float(score_generation(prediction, answer, metric))


def score_generation(prediction: str, answer: str, metric: str) -> bool:
    if metric in ("rougel", "f1"):
        return generation_score(prediction, answer, metric) >= SCORE_PASS
    p, a = normalize(prediction), normalize(answer)
    if metric == "exact":
        return p == a
    if metric == "contains":
        return bool(a) and a in p
    raise LmforgeError(f"metric {metric!r} does not score generations; use exact, contains, rougel or f1")


# ---- prompts --------------------------------------------------------------------------------------------
def _join(prompt: str, answer: str) -> str:
    return prompt + answer if not prompt or prompt[-1].isspace() else f"{prompt} {answer}"


def _plain_item(e: Example) -> str:
    return f"Question: {e.prompt}\nAnswer:" if e.is_choice else e.prompt


def chat_messages(e: Example, shots: list[Example]) -> list[dict]:
    """The chat turns of an item: each shot a user turn and its answer an assistant turn, then the item."""
    messages: list[dict] = []
    for s in shots:
        messages += [{"role": "user", "content": s.prompt}, {"role": "assistant", "content": s.answer}]
    messages.append({"role": "user", "content": e.prompt})
    return messages


@dataclass
class Prompt:
    """A built prompt: token ids, how many shots it kept, the sources it cites."""

    ids: list[int]
    shots: int
    sources: list[dict]
    text: str
    messages: list[dict] | None = None  # the chat messages, in chat format


class Runner:
    """Builds prompts and scores items of one task with one model (and optionally one RAG index)."""

    def __init__(self, em, examples: list[Example], metric: str, shots: int = 0, chat: bool = False,
                 index=None, top_k: int = 3, seed: int = 0, max_new_tokens: int = 64):
        self.em, self.examples, self.metric = em, examples, metric
        self.shots, self.chat, self.index, self.top_k, self.seed = shots, chat, index, top_k, seed
        self.max_new_tokens = max_new_tokens
        multiline = any("\n" in e.answer.strip() for e in examples)
        self.stop = [] if chat else (["\n\n"] if multiline else ["\n"])

    def _reserve(self, e: Example) -> int:
        """Tokens kept free after the prompt: the answer to generate, or the longest choice to score."""
        if e.is_choice:
            # + a few for what a chat template adds around an answer (end-of-turn)
            return max(len(self.em.tokenizer.encode(" " + c, add_special_tokens=False)) for c in e.choices) + 4
        return self.max_new_tokens

    def build(self, i: int) -> Prompt:
        e = self.examples[i]
        shots = [self.examples[j] for j in shot_indices(len(self.examples), i, self.shots, self.seed)]
        budget = self.em.max_len - self._reserve(e)
        for k in range(len(shots), -1, -1):  # drop shots until the prompt fits
            p = self._build(e, shots[:k], budget)
            if len(p.ids) <= budget:
                return p
        raise LmforgeError(f"item {i + 1} does not fit the model's {self.em.max_len}-token context even without "
                           f"shots ({len(p.ids)} prompt tokens + {self._reserve(e)} reserved for the answer); "
                           "shorten it or lower --max-new-tokens")

    def _build(self, e: Example, shots: list[Example], budget: int) -> Prompt:
        from lmforge.rag.prompt import augment_messages, augment_prompt

        sources: list[dict] = []
        if self.chat:
            messages = chat_messages(e, shots)
            if self.index is not None:
                messages, sources = augment_messages(self.index, messages, self.em.tokenizer, budget, self.top_k,
                                                     count=self.em.count_chat)
            return Prompt(self.em.encode_chat(messages), len(shots), sources, self.em.render_chat(messages), messages)
        prefix = "".join(_join(_plain_item(s), s.answer) + "\n\n" for s in shots)
        item = _plain_item(e)
        if self.index is not None:
            text, sources = augment_prompt(self.index, item, self.em.tokenizer, budget, self.top_k, prefix=prefix,
                                           query=e.prompt, count=self.em.count_text)
        else:
            text = prefix + item
        return Prompt(self.em.encode_prompt(text), len(shots), sources, text)

    def choice_continuations(self, e: Example, messages: list[dict] | None = None) -> list[list[int]]:
        """Token ids scored for each choice: " choice" after a plain prompt; in chat format the assistant turn
        the template renders for it, up to and including its end-of-turn token (as finetune's held-out scoring
        and lm-evaluation-harness with chat templates do), so an answer that should have ended scores as ended."""
        tok = self.em.tokenizer
        if not self.chat or messages is None:
            return [tok.encode(" " + c, add_special_tokens=False) for c in e.choices]
        prefix = self.em.render_chat(messages)
        out = []
        for c in e.choices:
            full = tok.apply_chat_template(messages + [{"role": "assistant", "content": c}])
            if not full.startswith(prefix):  # a template that rewrites earlier turns: score the text alone
                out.append(tok.encode(c, add_special_tokens=False))
                continue
            ids = tok.encode(full[len(prefix):], add_special_tokens=False)
            end = next((j for j, t in enumerate(ids) if t in self.em.stop_ids), None)
            out.append(ids[:end + 1] if end is not None else ids)
        return out

    def run(self, limit: int = 0, concurrency: int = 1, advance=None, items: Sequence[int] | None = None) -> list[dict]:
        """Per-item records: prompt/prediction/answer, correct, tokens in/out, latency (retrieval included).

        Runs the first `limit` items (0: all), or exactly the indices in `items` (compare's timing passes)."""
        n = len(self.examples) if limit <= 0 else min(limit, len(self.examples))
        order = list(range(n)) if items is None else list(items)
        records: list[dict] = []
        if self.metric == "choice":
            for i in order:
                e = self.examples[i]
                if not e.is_choice:
                    raise LmforgeError("the choice metric needs {question, choices, answer} items")
                t0 = time.perf_counter()
                p = self.build(i)
                conts = self.choice_continuations(e, p.messages)
                ll = self.em.continuation_logprobs(p.ids, conts)
                latency = time.perf_counter() - t0
                lens = [max(1, len(c)) for c in e.choices]
                pred = max(range(len(ll)), key=lambda j: ll[j])
                pred_norm = max(range(len(ll)), key=lambda j: ll[j] / lens[j])
                records.append({"i": i, "prompt": p.text, "answer": e.answer, "prediction": e.choices[pred],
                                "correct": pred == e.answer_index, "correct_norm": pred_norm == e.answer_index,
                                "logprobs": [round(x, 4) for x in ll], "shots": p.shots, "sources": p.sources,
                                "prompt_tokens": len(p.ids) + sum(len(c) for c in conts), "output_tokens": 0,
                                "latency_s": latency})
                if advance:
                    advance(1, _running_acc(records))
            return records
        if self.examples[0].is_choice:
            raise LmforgeError(f"choice items are scored with --metric choice, not {self.metric}")
        built, t_build = [], []
        for i in order:
            t0 = time.perf_counter()
            built.append(self.build(i))
            t_build.append(time.perf_counter() - t0)  # retrieval and tokenization count toward latency
        recs: dict[int, dict] = {}

        def done(j: int, g) -> None:
            i, e = order[j], self.examples[order[j]]
            score = generation_score(g.text, e.answer, self.metric)
            recs[j] = {"i": i, "prompt": built[j].text, "answer": e.answer, "prediction": g.text.strip(),
                       "score": score, "correct": score >= SCORE_PASS, "shots": built[j].shots,
                       "sources": built[j].sources, "prompt_tokens": g.prompt_tokens, "output_tokens": g.output_tokens,
                       "latency_s": g.latency_s + t_build[j]}
            if advance:
                advance(1, _running_acc(list(recs.values())))

        self.em.generate([b.ids for b in built], self.max_new_tokens, self.stop, concurrency, on_done=done)
        return [recs[j] for j in range(len(order))]


def _running_acc(records: list[dict]) -> str:
    return f"acc {sum(r['correct'] for r in records) / len(records):.3f}"


def summarize(records: list[dict], seconds: float, length_norm: bool = False) -> dict:
    """Accuracy with its Wilson 95% interval, and per-query latency and token figures."""
    from lmforge.eval.stats import wilson_interval

    n = len(records)
    key = "correct_norm" if length_norm and records and "correct_norm" in records[0] else "correct"
    k = sum(bool(r[key]) for r in records)
    lo, hi = wilson_interval(k, n)
    tokens = sum(r["prompt_tokens"] + r["output_tokens"] for r in records)
    out = {"n": n, "correct": k, "accuracy": k / n if n else 0.0, "ci95": [lo, hi],
           "latency_s": sum(r["latency_s"] for r in records) / n if n else 0.0,
           "prompt_tokens": sum(r["prompt_tokens"] for r in records) / n if n else 0.0,
           "output_tokens": sum(r["output_tokens"] for r in records) / n if n else 0.0,
           "seconds": seconds, "tokens_per_s": tokens / seconds if seconds > 0 else None}
    if records and "correct_norm" in records[0]:
        kr = sum(bool(r["correct"]) for r in records)
        kn = sum(bool(r["correct_norm"]) for r in records)
        out["accuracy_raw"], out["accuracy_norm"] = kr / n, kn / n
        out["headline"] = "accuracy_norm" if key == "correct_norm" else "accuracy_raw"
    if records and "score" in records[0]:
        from lmforge.eval.stats import mean_interval

        scores = [r["score"] for r in records]
        out["mean_score"] = sum(scores) / n
        out["score_ci95"] = list(mean_interval(scores))
    return out


def resolve_chat(mode: str, em) -> bool:
    if mode == "on" and not em.has_chat_template:
        raise LmforgeError(f"{em.path} has no chat template; use --chat off (plain prompts)")
    return em.has_chat_template if mode == "auto" else mode == "on"


def evaluate(cfg: TaskConfig, em=None, index=None, label: str = "eval") -> dict:
    """Run one task evaluation; returns {config, summary, records}. em/index may be passed in to reuse them."""
    from lmforge.eval.lm import EvalModel
    from lmforge.eval.report import progress

    if not cfg.model:
        raise LmforgeError("say which model to evaluate: --model DIR")
    if not cfg.data:
        raise LmforgeError("say which examples to evaluate on: --data FILE.jsonl")
    if cfg.shots < 0 or cfg.max_new_tokens < 1 or cfg.top_k < 1:
        raise LmforgeError("--shots must be >= 0, --max-new-tokens and --top-k >= 1")
    examples = load_examples(cfg.data)
    metric = cfg.metric or ("choice" if examples[0].is_choice else "exact")
    if metric not in METRICS:
        raise LmforgeError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    if index is None and cfg.rag:
        from lmforge.rag.index import Index

        index = Index.open(cfg.rag)
        index.embedder  # noqa: B018  (load it now, not inside the first item's latency)
    em = em or EvalModel(cfg.model, cfg.dtype, cfg.device, compile=cfg.compile and metric != "choice")
    runner = Runner(em, examples, metric, cfg.shots, resolve_chat(cfg.chat, em), index, cfg.top_k, cfg.seed,
                    cfg.max_new_tokens)
    n = len(examples) if cfg.limit <= 0 else min(cfg.limit, len(examples))
    t0 = time.perf_counter()
    with progress(n, label) as advance:
        records = runner.run(cfg.limit, cfg.concurrency, advance)
    seconds = time.perf_counter() - t0
    summary = summarize(records, seconds, cfg.length_norm)
    summary.update({"model": str(em.path), "data": cfg.data, "metric": metric, "shots": cfg.shots,
                    "rag": cfg.rag or None, "chat": runner.chat})
    return {"summary": summary, "records": records}


def run(cfg: TaskConfig) -> int:
    from lmforge.eval.report import fmt, table, write_json

    result = evaluate(cfg)
    s = result["summary"]
    if cfg.out:
        write_json(result, cfg.out)
        print(f"wrote {cfg.out}", file=sys.stderr)
    if cfg.json:
        print(json.dumps(s, indent=1))
        return 0
    lo, hi = s["ci95"]
    rows = [["accuracy", f"{s['accuracy']:.3f} ({s['correct']}/{s['n']})"], ["95% CI (Wilson)", f"{lo:.3f} - {hi:.3f}"]]
    if "accuracy_norm" in s:
        rows += [["accuracy (raw log-lik)", fmt(s["accuracy_raw"])], ["accuracy (length-normalised)", fmt(s["accuracy_norm"])]]
    if "mean_score" in s:
        slo, shi = s["score_ci95"]
        rows += [[f"mean {s['metric']} score", f"{s['mean_score']:.3f} (95% CI {slo:.3f} - {shi:.3f}; correct: "
                  f"score >= {SCORE_PASS})"]]
    rows += [["metric", s["metric"]], ["shots", str(s["shots"])], ["prompt format", "chat" if s["chat"] else "plain"],
             ["mean latency (s)", fmt(s["latency_s"], 4)], ["prompt tokens / query", fmt(s["prompt_tokens"], 1)],
             ["output tokens / query", fmt(s["output_tokens"], 1)], ["seconds", fmt(s["seconds"], 2)]]
    if s["rag"]:
        rows.insert(4, ["rag", s["rag"]])
    print(f"{s['model']} on {s['data']}")
    print(table(["", "value"], rows))
    return 0
