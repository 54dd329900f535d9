"""One real MiniLM embedder per test process (loading it takes seconds), shared by tests/rag and tests/eval."""

import functools


@functools.lru_cache(maxsize=1)
def embedder():
    from lmforge.rag.embed import Embedder

    return Embedder.load()


DOCS = {
    "cats.md": "# Cats\n\nCats are small carnivorous mammals. They sleep for up to sixteen hours a day. "
               "A group of cats is called a clowder.\n\nDomestic cats were first kept in the Near East about ten "
               "thousand years ago.\n",
    "rockets.txt": "A rocket engine produces thrust by expelling exhaust at high speed. The Saturn V was the rocket "
                   "that carried astronauts to the Moon. Liquid hydrogen and liquid oxygen are common propellants.\n",
    "code/fib.py": 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    a, b = 0, 1\n'
                   "    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
}


def write_docs(root, docs=DOCS):
    for name, text in docs.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root
