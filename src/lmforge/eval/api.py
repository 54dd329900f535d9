"""An OpenAI-compatible endpoint as a compare variant: `--variant NAME=openai:MODEL@BASE_URL`.

    lmforge compare --task heldout.jsonl --variant local=runs/x/final --variant api=openai:gpt-4o-mini@https://api.openai.com/v1

The endpoint is asked through its chat completions route (POST BASE_URL/chat/completions) with httpx, greedy
(temperature 0), one request per item, `concurrency` at a time, so a local model and a hosted one answer the same
items in the same order with the same few-shot draws:
  - prompt/answer items: the same chat turns a local variant in chat format sends (task.chat_messages), scored by
    the same metric (exact / contains) on the reply;
  - multiple choice: an API gives no log-likelihoods of arbitrary continuations, so the item is asked as a lettered
    question ("A. ..., B. ...; answer with the letter") and scored by the letter (or the choice's text) the reply
    gives (`parse_choice`); a reply naming no single choice is wrong. results.md says "generation (answer letter)"
    for such a variant, beside "log-likelihood" for local ones: the two are not the same measurement;
  - retrieval (rag=INDEX): the local index's top_k chunks for the item's question go into the last user turn as
    numbered sources (rag.prompt.rag_user_content, as for a local chat variant), without a token budget: hosted
    models' contexts are far longer than a few chunks.
Tokens are what the endpoint reports in `usage` (what it bills); latency is each request's wall time, retries
included. The key is read from the environment (OPENAI_API_KEY, or the variable --api-key-env names) and sent
only to BASE_URL. Failures become LmforgeError with what to do: an unreachable host, a refused key (401/403), an
unknown model (404); 429 and 5xx are retried with backoff (3 tries), as the official client does.
The endpoint applies its own chat template: results.md says "endpoint's" in the template column.
"""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from lmforge.errors import LmforgeError

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
RETRIES = 3


@dataclass
class Reply:
    text: str
    prompt_tokens: int | None
    output_tokens: int | None
    latency_s: float
    finish_reason: str


class ApiClient:
    """Chat completions against one OpenAI-compatible base URL (e.g. http://127.0.0.1:8000/v1)."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 120.0):
        try:
            import httpx
        except ImportError:
            raise LmforgeError("API variants need httpx: pip install 'lmforge[api]' (or pip install httpx)") from None
        if not re.match(r"^https?://[^/\s]+", base_url):
            raise LmforgeError(f"the base URL {base_url!r} must start with http:// or https://, e.g. "
                               "https://api.openai.com/v1 or http://127.0.0.1:8000/v1")
        self.base_url, self.model = base_url.rstrip("/"), model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)
        self._httpx = httpx

    def close(self) -> None:
        self._http.close()

    def chat(self, messages: list[dict], max_tokens: int) -> Reply:
        body = {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": max_tokens}
        t0 = time.perf_counter()
        for attempt in range(RETRIES):
            try:
                r = self._http.post("/chat/completions", json=body)
            except self._httpx.TransportError as e:
                if attempt + 1 < RETRIES and isinstance(e, self._httpx.TimeoutException):
                    time.sleep(2 ** attempt)
                    continue
                raise LmforgeError(f"cannot reach {self.base_url}: {e}; is the server up and the URL right "
                                   "(it ends in /v1 for OpenAI-compatible servers)?") from None
            if r.status_code == 429 or r.status_code >= 500:
                if attempt + 1 < RETRIES:
                    time.sleep(2 ** attempt)
                    continue
            if r.status_code != 200:
                raise LmforgeError(self._error(r))
            break
        try:
            data = r.json()
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise LmforgeError(f"{self.base_url}/chat/completions answered something that is not an OpenAI chat "
                               f"completion: {r.text[:200]!r}") from None
        usage = data.get("usage") or {}
        return Reply(text, usage.get("prompt_tokens"), usage.get("completion_tokens"), time.perf_counter() - t0,
                     choice.get("finish_reason") or "stop")

    def _error(self, r: Any) -> str:
        try:
            detail = r.json().get("error", {}).get("message") or r.text[:200]
        except (ValueError, AttributeError):
            detail = r.text[:200]
        where = f"{self.base_url} (model {self.model})"
        if r.status_code in (401, 403):
            return (f"{where} refused the API key ({r.status_code}: {detail}); put the key in OPENAI_API_KEY, or "
                    "in another variable named with --api-key-env")
        if r.status_code == 404:
            return f"{where} answered 404 ({detail}); check the model name and that the URL ends in /v1"
        return f"{where} answered {r.status_code}: {detail}"


# ---- multiple choice by generation ----------------------------------------------------------------------
def choice_question(question: str, choices: list[str]) -> str:
    """A multiple-choice item as a lettered question for a chat model."""
    if len(choices) > len(LETTERS):
        raise LmforgeError(f"an API variant can ask at most {len(LETTERS)} choices by letter, an item has {len(choices)}")
    lines = [question, ""] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    return "\n".join(lines + ["", "Answer with the letter of the correct choice only."])


_LEAD = re.compile(r"^\W*(?:(?:the\s+)?(?:correct\s+)?answer(?:\s+is)?\s*[:\-]?\s*)?[(\[]?([A-Z])[)\]]?"
                   r"(?:$|[.:,]|(?=\s))", re.IGNORECASE)


def parse_choice(reply: str, choices: list[str]) -> int | None:
    """Which choice a reply names, or None if it names none or several.

    A leading capital letter on its own or before punctuation ("B", "(B)", "B.", "Answer: B") is that letter; a
    letter before more text counts only when the text is that choice's ("B. apple"; "A cow..." is not a letter);
    otherwise the one choice whose text the reply is, or alone contains as words.
    """
    from lmforge.eval.task import normalize

    letters = LETTERS[:len(choices)]
    text = reply.strip()
    norm = [normalize(c) for c in choices]
    m = _LEAD.match(text)
    if m and (m.group(1).isupper() or len(text) == 1) and m.group(1).upper() in letters:
        k = letters.index(m.group(1).upper())
        rest = normalize(text[m.end():].lstrip(" .:)]"))
        if not rest or m.group(0).rstrip()[-1:] in ".:,)]" or rest.startswith(norm[k]):
            return k
    whole = normalize(text)
    exact = [i for i, c in enumerate(norm) if c and whole == c]
    if len(exact) == 1:
        return exact[0]
    inside = [i for i, c in enumerate(norm) if c and re.search(rf"(?<!\w){re.escape(c)}(?!\w)", whole)]
    return inside[0] if len(inside) == 1 else None


# ---- the runner: the same contract as task.Runner.run ---------------------------------------------------
class ApiRunner:
    """Scores a task's items through an ApiClient; run() returns records shaped as task.Runner's."""

    def __init__(self, client: ApiClient, examples: list, metric: str, shots: int = 0, index=None, top_k: int = 3,
                 seed: int = 0, max_new_tokens: int = 64):
        if metric == "choice" and not examples[0].is_choice:
            raise LmforgeError("the choice metric needs {question, choices, answer} items")
        if metric != "choice" and examples[0].is_choice:
            raise LmforgeError(f"choice items are scored with --metric choice, not {metric}")
        self.client, self.examples, self.metric = client, examples, metric
        self.shots, self.index, self.top_k, self.seed = shots, index, top_k, seed
        # a letter needs a few tokens at most; a reasoning preamble is the model's own loss
        self.max_new_tokens = max_new_tokens if metric != "choice" else min(max_new_tokens, 16)

    def _turn(self, e) -> tuple[str, str]:
        if e.is_choice:
            return choice_question(e.prompt, e.choices), LETTERS[e.answer_index]
        return e.prompt, e.answer

    def build(self, i: int) -> tuple[list[dict], int, list[dict]]:
        """(messages, shots used, sources) for item i."""
        from lmforge.eval.task import shot_indices

        e = self.examples[i]
        messages: list[dict] = []
        picks = shot_indices(len(self.examples), i, self.shots, self.seed)
        for j in picks:
            q, a = self._turn(self.examples[j])
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": self._turn(e)[0]})
        sources: list[dict] = []
        if self.index is not None:
            from lmforge.rag.prompt import rag_user_content, sources_of

            # retrieve for the question itself (not its lettered form); no token budget, see the docstring
            hits = sorted(self.index.search(e.prompt, self.top_k), key=lambda h: -h.score)
            messages[-1]["content"] = rag_user_content(messages[-1]["content"], hits)
            sources = sources_of(hits)
        return messages, len(picks), sources

    def one(self, i: int) -> dict:
        from lmforge.eval.task import SCORE_PASS, generation_score

        e = self.examples[i]
        t0 = time.perf_counter()
        messages, shots, sources = self.build(i)
        reply = self.client.chat(messages, self.max_new_tokens)
        latency = time.perf_counter() - t0
        rec = {"i": i, "prompt": messages, "answer": e.answer, "reply": reply.text, "shots": shots,
               "sources": sources, "prompt_tokens": reply.prompt_tokens, "output_tokens": reply.output_tokens,
               "latency_s": latency, "finish_reason": reply.finish_reason}
        if e.is_choice:
            pick = parse_choice(reply.text, e.choices)
            rec.update(prediction=None if pick is None else e.choices[pick], correct=pick == e.answer_index,
                       parsed=pick is not None)
        else:
            score = generation_score(reply.text, e.answer, self.metric)
            rec.update(prediction=reply.text.strip(), score=score, correct=score >= SCORE_PASS)
        return rec

    def run(self, limit: int = 0, concurrency: int = 1, advance=None, items=None) -> list[dict]:
        n = len(self.examples) if limit <= 0 else min(limit, len(self.examples))
        order = list(range(n)) if items is None else list(items)
        if concurrency < 1:
            raise LmforgeError(f"concurrency must be at least 1, got {concurrency}")
        records: dict[int, dict] = {}
        lock = threading.Lock()

        def work(j: int) -> None:
            rec = self.one(order[j])
            with lock:
                records[j] = rec
                if advance:
                    done = list(records.values())
                    advance(1, f"acc {sum(r['correct'] for r in done) / len(done):.3f}")

        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="lmforge-api") as pool:
            for f in [pool.submit(work, j) for j in range(len(order))]:
                f.result()  # re-raises a worker's error
        return [records[j] for j in range(len(order))]
