"""lm-evaluation-harness itself scores a served model as it scores the model directory.

One local YAML task (`dataset_path: json` + `data_files`, nothing from the Hub) of multiple-choice items is run
through `--model local-completions` against a real `lmforge serve` on loopback (echo + logprobs, token-id
prompts, the server's own tokenizer through /tokenizer_info and /tokenize) and through `--model hf` on the same
directory: the per-item log-likelihoods agree. A generation task runs through `local-chat-completions
--apply_chat_template` and `hf --apply_chat_template`: the greedy generations are the same strings.

The four runs are lm-eval's own CLI (`lm_eval.__main__.cli_evaluate` with its argv), in one subprocess so that
lm-eval, transformers and datasets are imported once (about a minute on 2 busy cores; the generation runs
take 3 items).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lmforge.serve.app import create_app
from lmforge.serve.server import make_loader, parse_specs
from tests.serve.conftest import LiveServer

pytest.importorskip("lm_eval")

ITEMS = [
    {"question": "The quick brown", "choices": [" fox", " dog", " cat jumps"], "answer": 0},
    {"question": "A model learns the", "choices": [" language", " corpus of its", " code"], "answer": 0},
    {"question": "Numbers 0 1 2", "choices": [" 3", " 4 5", " nine"], "answer": 0},
    {"question": "Unicode too: café,", "choices": [" naïve", " 東京", " emoji 🙂"], "answer": 1},
    {"question": "def f(x):", "choices": [" return x + 1", " pass", " return"], "answer": 0},
]

TASKS = {
    "lmforge_mc": """
        output_type: multiple_choice
        doc_to_text: "{{question}}"
        doc_to_target: "{{answer}}"
        doc_to_choice: "{{choices}}"
        metric_list:
          - metric: acc
    """,
    "lmforge_gen": """
        output_type: generate_until
        doc_to_text: "{{question}}"
        doc_to_target: "{{choices[answer]}}"
        generation_kwargs:
          until: ["\\n"]
          max_gen_toks: 8
          do_sample: false
          temperature: 0
        metric_list:
          - metric: exact_match
    """,
}

RUNNER = """
import sys, time
t0 = time.time()
from lm_eval.__main__ import cli_evaluate
print(f"lmforge-timing import {time.time() - t0:.1f}", file=sys.stderr)
for line in sys.stdin.read().splitlines():
    t0 = time.time()
    sys.argv = ["lm_eval", *line.split("\\t")]
    cli_evaluate()
    print(f"lmforge-timing {sys.argv[2]} {time.time() - t0:.1f}", file=sys.stderr)
"""


def write_tasks(root: Path) -> Path:
    tasks = root / "tasks"
    tasks.mkdir()
    data = root / "items.jsonl"
    data.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in ITEMS), encoding="utf-8")
    for name, body in TASKS.items():
        head = f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        (tasks / f"{name}.yaml").write_text(head + textwrap.dedent(body).lstrip(), encoding="utf-8")
    return tasks


def samples(out: Path, task: str) -> dict[int, dict]:
    (path,) = out.glob(f"*/samples_{task}_*.jsonl")
    return {r["doc_id"]: r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}


def test_lm_eval_scores_the_server_as_the_model_directory(model_dirs, tmp_path):
    base, _ = model_dirs
    tasks = write_tasks(tmp_path)
    app = create_app(loader=make_loader(parse_specs([f"tiny={base}"], []), "float32", None), api_key="sk-eval")
    server = LiveServer(app).start()
    try:
        server.wait_ready()
        common = ["--include_path", str(tasks), "--log_samples", "--output_path"]
        api = f"model=tiny,auth_token=sk-eval,max_retries=1,base_url={server.url}"
        hf = f"pretrained={base},dtype=float32"
        runs = [
            ["--model", "local-completions", "--model_args", api + "/v1/completions", "--tasks", "lmforge_mc",
             *common, str(tmp_path / "api")],
            ["--model", "hf", "--model_args", hf, "--device", "cpu", "--tasks", "lmforge_mc",
             *common, str(tmp_path / "hf")],
            ["--model", "local-chat-completions", "--model_args", api + "/v1/chat/completions",
             "--apply_chat_template", "--tasks", "lmforge_gen", "--limit", "3", *common, str(tmp_path / "api_chat")],
            ["--model", "hf", "--model_args", hf, "--device", "cpu", "--apply_chat_template",
             "--tasks", "lmforge_gen", "--limit", "3", *common, str(tmp_path / "hf_chat")],
        ]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "OPENAI_API_KEY": "sk-eval",
               "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        proc = subprocess.run([sys.executable, "-c", RUNNER], input="\n".join("\t".join(r) for r in runs),
                              capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-4000:]
    finally:
        server.stop()

    served, local = samples(tmp_path / "api", "lmforge_mc"), samples(tmp_path / "hf", "lmforge_mc")
    assert sorted(served) == sorted(local) == list(range(len(ITEMS)))
    for i in served:
        got = [(float(ll), greedy) for ll, greedy in served[i]["filtered_resps"]]
        want = [(float(ll), greedy) for ll, greedy in local[i]["filtered_resps"]]
        assert len(got) == len(ITEMS[i]["choices"])
        for (a, ga), (b, gb) in zip(got, want):
            assert a == pytest.approx(b, abs=1e-4), (i, got, want)  # a choice scoring 0.0 would be the bug
            assert a < 0 and ga == gb
    chat, local_chat = samples(tmp_path / "api_chat", "lmforge_gen"), samples(tmp_path / "hf_chat", "lmforge_gen")
    assert [chat[i]["resps"] for i in sorted(chat)] == [local_chat[i]["resps"] for i in sorted(local_chat)]
    assert all(chat[i]["resps"][0][0] for i in chat)  # something was generated
