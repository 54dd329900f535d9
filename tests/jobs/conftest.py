"""A live server with the fine-tuning API on a loopback port (uvicorn in a thread, as tests/serve does), its jobs
directory in tmp, and training files in OpenAI's formats. Jobs train LoRA on the tiny model for a few steps."""

import json

import pytest

from tests.inference.tiny import make_model_dir
from tests.serve.conftest import LiveServer

KEY = "sk-test"
# every job: one thread, no FLOP/s measurement at start, fp32 (fast and deterministic on CPU)
RECIPE_ARGS = ("--train.peak-flops", "1e12", "--train.dtype", "fp32")


def chat_records(n: int = 12) -> list[dict]:
    out = []
    for i in range(n):
        a, b = i % 5, i % 3
        out.append({"messages": [{"role": "system", "content": "You add numbers."},
                                 {"role": "user", "content": f"What is {a} plus {b}?"},
                                 {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]})
    return out


def dpo_records(n: int = 12) -> list[dict]:
    return [{"input": {"messages": [{"role": "user", "content": f"Say {i}."}]},
             "preferred_output": [{"role": "assistant", "content": f"{i}."}],
             "non_preferred_output": [{"role": "assistant", "content": f"No, {i + 1}!"}]} for i in range(n)]


def jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def jobs_app(base, jobs_dir, **run):
    from lmforge.jobs.spec import RunOptions
    from lmforge.serve.app import create_app
    from lmforge.serve.fine_tuning import JobsOptions
    from lmforge.serve.server import make_loader, parse_specs
    from lmforge.serve.state import EngineOptions

    opts = RunOptions(lora_rank=4, lora_alpha=8.0, threads=1, **{"checkpoint_every": 2, "extra_args": RECIPE_ARGS,
                                                                  **run})
    return create_app(loader=make_loader(parse_specs([f"tiny={base}"], []), "float32", None), api_key=KEY,
                      engine=EngineOptions(max_batch=2), jobs=JobsOptions(jobs_dir, opts, max_file_bytes=200_000))


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("jobs-base") / "tiny")


@pytest.fixture(scope="module")
def jobs_server(base_dir, tmp_path_factory):
    server = LiveServer(jobs_app(base_dir, tmp_path_factory.mktemp("jobs"))).start()
    server.wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(jobs_server):
    import openai

    return openai.OpenAI(base_url=jobs_server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
