"""A real server on a free loopback port (uvicorn in a thread), serving a tiny model and a LoRA adapter of it."""

import socket
import threading
import time

import httpx
import pytest

from tests.inference.tiny import make_model_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn.Server in a daemon thread; stop() asks it to exit and joins."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> "LiveServer":
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while httpx.get(self.url + "/health").status_code != 200:
            if time.time() > deadline:
                raise RuntimeError("server never became ready")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """A tiny model directory and a PEFT adapter for it (random, non-zero B so the adapter changes outputs)."""
    import torch

    from lmforge.checkpoint import load_model, save_adapter
    from lmforge.model.lora import apply_lora

    root = tmp_path_factory.mktemp("serve")
    base = make_model_dir(root / "tiny")
    m = load_model(base)
    apply_lora(m, rank=4, alpha=8.0)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.5)
    save_adapter(m, root / "adapter", base_model_name_or_path=str(base))
    return base, root / "adapter"


@pytest.fixture(scope="session")
def live(model_dirs):
    from lmforge.serve.app import create_app
    from lmforge.serve.server import make_loader, parse_specs
    from lmforge.serve.state import EngineOptions

    base, adapter = model_dirs
    specs = parse_specs([f"tiny={base}"], [f"tiny-sql=tiny:{adapter}"])
    app = create_app(loader=make_loader(specs, "float32", None), api_key="sk-test",
                     engine=EngineOptions(max_batch=4, max_queue=64))
    server = LiveServer(app).start()
    server.wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def client(live):
    import openai

    return openai.OpenAI(base_url=live.url + "/v1", api_key="sk-test", max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def live_long(tmp_path_factory):
    """A server over a tiny model with room for a tool prompt (2048 positions)."""
    from lmforge.serve.app import create_app
    from lmforge.serve.server import make_loader, parse_specs
    from lmforge.serve.state import EngineOptions

    d = make_model_dir(tmp_path_factory.mktemp("structured") / "tiny", max_seq_len=2048)
    app = create_app(loader=make_loader(parse_specs([f"tiny={d}"], []), "float32", None), api_key="sk-test",
                     engine=EngineOptions(max_batch=4))
    server = LiveServer(app).start()
    server.wait_ready()
    yield server
    server.stop()
