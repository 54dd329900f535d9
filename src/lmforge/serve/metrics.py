"""GET /metrics in Prometheus' text exposition format (version 0.0.4).

Owns: the server's own counters (HTTP requests by endpoint and status) and the rendering of each engine's
counters (requests, prompt and generated tokens, time to first token histogram, decode tokens/s, queue length,
running batch size, background compiling), labelled by model. The engine measures; this module only writes the
numbers out.
"""

from __future__ import annotations

import threading
from collections import Counter

from lmforge.inference.engine import TTFT_BUCKETS, Engine


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.http = Counter()  # (endpoint, status) -> count

    def record(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.http[(endpoint, str(status))] += 1

    def render(self, engines: dict[str, Engine]) -> str:
        out: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")

        family("lmforge_http_requests_total", "counter", "HTTP requests by endpoint and status code.")
        with self._lock:
            items = sorted(self.http.items())
        for (endpoint, status), n in items:
            out.append(f'lmforge_http_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
        rows = [(name, e.stats, e.queue_stats()) for name, e in engines.items()]
        simple = [
            ("lmforge_requests_total", "counter", "Generation requests submitted to the engine.",
             lambda s, ld: s.requests_total),
            ("lmforge_requests_finished_total", "counter", "Generation requests finished (any reason).",
             lambda s, ld: s.requests_finished),
            ("lmforge_prompt_tokens_total", "counter", "Prompt tokens prefilled.", lambda s, ld: s.prompt_tokens_total),
            ("lmforge_generation_tokens_total", "counter", "Tokens generated.",
             lambda s, ld: s.generation_tokens_total),
            ("lmforge_decode_tokens_per_second", "gauge", "Tokens per second of the last batched decode step.",
             lambda s, ld: round(s.last_tokens_per_s, 3)),
            ("lmforge_decode_tokens_per_second_avg", "gauge", "Generated tokens per second of decode time, overall.",
             lambda s, ld: round(s.decode_tokens / s.decode_seconds, 3) if s.decode_seconds else 0.0),
            ("lmforge_queue_length", "gauge", "Requests waiting for a slot.", lambda s, ld: ld["waiting"]),
            ("lmforge_running_requests", "gauge", "Requests in the running batch (slots in use).",
             lambda s, ld: ld["running"]),
            ("lmforge_compiling", "gauge", "1 while the decode packages of larger batch sizes compile in the background "
             "(batches run eagerly, slower, until then).", lambda s, ld: ld["compiling"]),
        ]
        for name, kind, help_text, get in simple:
            family(name, kind, help_text)
            for model, s, ld in rows:
                out.append(f'{name}{{model="{model}"}} {get(s, ld)}')
        name = "lmforge_time_to_first_token_seconds"
        family(name, "histogram", "Time from submission to the first generated token.")
        for model, s, _ in rows:
            cum = 0
            for bound, n in zip(TTFT_BUCKETS, list(s.ttft_hist)):
                cum += n
                out.append(f'{name}_bucket{{model="{model}",le="{bound}"}} {cum}')
            out.append(f'{name}_bucket{{model="{model}",le="+Inf"}} {s.ttft_count}')
            out.append(f'{name}_sum{{model="{model}"}} {round(s.ttft_sum, 6)}')
            out.append(f'{name}_count{{model="{model}"}} {s.ttft_count}')
        return "\n".join(out) + "\n"
