"""The built-in finetuning sets, made at run time from real text on the machine: the installed Python standard library.

`lmforge finetune sft --data builtin` (and `dpo --data builtin`) need no download. The facts are read with `ast` from
the stdlib's own source files (never imported, so nothing runs), in sorted order, so the same Python gives the same
sets on every machine. Nothing is committed to the repository.

Facts and the questions they answer:
  function  "What does the function `textwrap.fill` do?"    -> the first sentence of its docstring
  signature "What are the parameters of `textwrap.fill`?"   -> "fill(text, width=70, **kwargs)"
  class     "What is the class `json.JSONDecoder` for?"     -> the first sentence of its docstring
  method    "What does the method `json.JSONDecoder.decode` do?" -> the first sentence of its docstring
  module    "What is the Python module `textwrap` for?"     -> the module docstring's one-line summary
The documentation beside them (`stdlib_docs`, written as docs/MODULE.md by `write_builtin_sets`): for every public
module, its docstring's first paragraph, then every public function, class and method as a heading with its
signature and its docstring's first paragraph: the stdlib's API reference as pydoc would summarise it, read from
the same sources with `ast` (pydoc imports the modules; this never runs them). It is what a RAG index over the
stdlib's docs retrieves from (about 0.5 MB; whole docstrings would be over 1 MB, two to three times the time to embed). It
covers held-out subjects too: documentation exists for functions nobody wrote training questions about, which is
the situation the prompt-vs-RAG-vs-finetune decision is about.
Preference pairs (for DPO) ask every question: chosen = its own answer, rejected = the answer of another fact of the
same kind (another function's docstring sentence, another signature; a seeded choice): a preference that needs the
name to be read, not only the style to be copied.

The split is by subject (the dotted name), decided by a hash, so every question about a held-out function is
held out: 10% of subjects. Held-out files for eval (written by `write_builtin_sets`):
  heldout-qa.jsonl  {"prompt": question, "answer": answer}                 (answer log-likelihood / generation)
  heldout-mc.jsonl  {"question", "choices": [4 answers], "answer": index}  (the right answer among 4 of its kind)
Both in one seeded order, so the first N items of each are the same N questions (a fair sample of all kinds).
`lmforge data builtin --out DIR` writes them all, with the reference pages in DIR/docs/.
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
import re
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from lmforge.config import opt
from lmforge.errors import LmforgeError

# Packages and modules that are tests, demos, GUI toolkits, vendored tools or codec tables: not what people ask about.
_SKIP = {"test", "tests", "idlelib", "idle_test", "tkinter", "turtledemo", "lib2to3", "ensurepip", "distutils",
         "pydoc_data", "site-packages", "dist-packages", "encodings", "this", "antigravity", "msilib", "turtle",
         "lib-dynload"}
HELDOUT_PERCENT = 10
MAX_ANSWER_CHARS = 160
_SIGNATURE_LIKE = re.compile(r"^[\w.]+\(.*\)")  # docstrings that open with a C-style signature line


@dataclass(frozen=True)
class Fact:
    kind: str  # function | signature | class | module
    subject: str  # dotted name the question is about
    question: str
    answer: str


def _first_sentence(doc: str | None) -> str | None:
    if not doc:
        return None
    para = doc.strip().split("\n\n", 1)[0]
    if _SIGNATURE_LIKE.match(para):
        return None
    text = " ".join(para.split())
    m = re.search(r"(?<=[a-z0-9)`'\"][.!?])\s", text)
    sentence = text[:m.start()] if m else text
    if not sentence.endswith((".", "!", "?")):
        sentence += "."
    if not 12 <= len(sentence) <= MAX_ANSWER_CHARS or not sentence[0].isalpha():
        return None
    return sentence


def _module_files(root: Path) -> list[tuple[str, Path]]:
    """(dotted name, file) for the public modules, top level and inside packages, in sorted order."""
    out = []
    for p in sorted(root.iterdir()):
        name = p.stem if p.suffix == ".py" else p.name
        if name.startswith(("_", ".")) or name in _SKIP or name.startswith("config-"):
            continue
        if p.is_file() and p.suffix == ".py":
            out.append((name, p))
        elif p.is_dir() and (p / "__init__.py").is_file():
            for sub in sorted(p.rglob("*.py")):
                parts = sub.relative_to(root).with_suffix("").parts
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                if any(x.startswith("_") or x in _SKIP for x in parts):
                    continue
                out.append((".".join(parts), sub))
    return out


def _facts_of(module: str, source: str) -> list[Fact]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    facts = []
    summary = _first_sentence(ast.get_docstring(tree))
    if summary:
        facts.append(Fact("module", module, f"What is the Python module `{module}` for?", summary))
    exported = None
    for node in tree.body:  # respect __all__ when the module declares one
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            try:
                exported = set(ast.literal_eval(node.value))
            except (ValueError, TypeError, SyntaxError):
                exported = None
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if node.name.startswith("_") or (exported is not None and node.name not in exported):
            continue
        subject = f"{module}.{node.name}"
        sentence = _first_sentence(ast.get_docstring(node))
        if isinstance(node, ast.ClassDef):
            if sentence:
                facts.append(Fact("class", subject, f"What is the class `{subject}` for?", sentence))
            for item in node.body:  # its public methods answer the function question too
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and not item.name.startswith("_"):
                    said = _first_sentence(ast.get_docstring(item))
                    if said:
                        name = f"{subject}.{item.name}"
                        facts.append(Fact("function", name, f"What does the method `{name}` do?", said))
            continue
        if sentence:
            facts.append(Fact("function", subject, f"What does the function `{subject}` do?", sentence))
        args = node.args
        if args.posonlyargs or args.args or args.vararg or args.kwonlyargs or args.kwarg:
            sig = f"{node.name}({ast.unparse(args)})"
            if len(sig) <= MAX_ANSWER_CHARS:
                facts.append(Fact("signature", subject, f"What are the parameters of `{subject}`?", sig))
    return facts


@lru_cache(maxsize=1)
def stdlib_facts() -> tuple[Fact, ...]:
    """Every fact from the installed standard library, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise LmforgeError(f"the Python standard library source is not at {root}; the built-in sets need it "
                           "(give your own data with --data FILE.jsonl)")
    facts: list[Fact] = []
    seen: set[tuple[str, str]] = set()
    for module, f in _module_files(root):
        try:
            source = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for fact in _facts_of(module, source):
            if (fact.kind, fact.subject) not in seen:
                seen.add((fact.kind, fact.subject))
                facts.append(fact)
    if len(facts) < 100:
        raise LmforgeError(f"found only {len(facts)} documented names in {root}; the built-in sets need the stdlib "
                           "sources (.py files). Give your own data with --data FILE.jsonl")
    return tuple(facts)


def _first_paragraph(doc: str | None) -> str:
    return " ".join(doc.strip().split("\n\n", 1)[0].split()) if doc else ""


def _signature(name: str, args: ast.arguments) -> str:
    sig = f"{name}({ast.unparse(args)})"
    return sig if len(sig) <= MAX_ANSWER_CHARS else f"{name}(...)"


def _module_doc(module: str, source: str) -> str | None:
    """A module's reference page in Markdown (see the module docstring), or None if it documents nothing."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    exported = None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            try:
                exported = set(ast.literal_eval(node.value))
            except (ValueError, TypeError, SyntaxError):
                exported = None
    parts = [f"# Module `{module}`", ""]
    summary = _first_paragraph(ast.get_docstring(tree))
    if summary:
        parts += [summary, ""]
    entries = 0
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if node.name.startswith("_") or (exported is not None and node.name not in exported):
            continue
        name = f"{module}.{node.name}"
        if isinstance(node, ast.ClassDef):
            parts += [f"## class `{name}`", "", _first_paragraph(ast.get_docstring(node)) or "(undocumented)", ""]
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and not item.name.startswith("_"):
                    doc = _first_paragraph(ast.get_docstring(item))
                    if doc:
                        parts += [f"### method `{name}.{_signature(item.name, item.args)}`", "", doc, ""]
        else:
            parts += [f"## function `{module}.{_signature(node.name, node.args)}`", "",
                      _first_paragraph(ast.get_docstring(node)) or "(undocumented)", ""]
        entries += 1
    return "\n".join(parts) if summary or entries else None


@lru_cache(maxsize=1)
def stdlib_docs() -> tuple[tuple[str, str], ...]:
    """(module, Markdown reference page) for every public stdlib module that documents something, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for module, f in _module_files(root):
        try:
            page = _module_doc(module, f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
        if page:
            out.append((module, page))
    return tuple(out)


def is_heldout(subject: str) -> bool:
    return int(hashlib.sha256(subject.encode()).hexdigest()[:8], 16) % 100 < HELDOUT_PERCENT


def split_facts(split: str) -> list[Fact]:
    if split not in ("train", "heldout"):
        raise LmforgeError(f"unknown split {split!r}; use train or heldout")
    want = split == "heldout"
    return [f for f in stdlib_facts() if is_heldout(f.subject) == want]


def sft_records(split: str = "train") -> list[dict]:
    """{"messages": [user question, assistant answer]} records."""
    return [{"messages": [{"role": "user", "content": f.question}, {"role": "assistant", "content": f.answer}]}
            for f in split_facts(split)]


def _rng_for(subject: str, salt: str) -> random.Random:
    return random.Random(int(hashlib.sha256(f"{salt}:{subject}".encode()).hexdigest()[:12], 16))


def _other_answers(pool: list[Fact], fact: Fact, k: int, salt: str) -> list[str]:
    rng = _rng_for(fact.subject, salt)
    out: list[str] = []
    while len(out) < k:
        other = pool[rng.randrange(len(pool))]
        if other.answer != fact.answer and other.answer not in out:
            out.append(other.answer)
    return out


def _pools(facts: list[Fact]) -> dict[str, list[Fact]]:
    pools: dict[str, list[Fact]] = {}
    for f in facts:
        pools.setdefault(f.kind, []).append(f)
    return pools


def preference_records(split: str = "train") -> list[dict]:
    """{"prompt", "chosen", "rejected"}: a fact's own answer over the answer of another fact of the same kind."""
    facts = split_facts(split)
    pools = _pools(facts)
    return [{"prompt": f.question, "chosen": f.answer, "rejected": _other_answers(pools[f.kind], f, 1, "pref")[0]}
            for f in facts if len(pools[f.kind]) > 2]


def _heldout_order(n: int) -> list[int]:
    """One seeded order of the held-out facts for both held-out files, so their first N are the same questions."""
    order = list(range(n))
    random.Random(0).shuffle(order)
    return order


_N_CHOICES = 4


def heldout_qa(n_choices: int = _N_CHOICES) -> list[dict]:
    """{"prompt": question, "answer": answer} for every held-out fact: first the questions heldout_mc asks, in its
    order (so the first N of both files are the same questions), then any of a kind too rare for its choices."""
    facts = split_facts("heldout")
    pools = _pools(facts)
    asked = [f for f in facts if len(pools[f.kind]) >= 2 * n_choices]
    rest = [f for f in facts if len(pools[f.kind]) < 2 * n_choices]
    return [{"prompt": f.question, "answer": f.answer} for f in [asked[i] for i in _heldout_order(len(asked))] + rest]


def heldout_mc(n_choices: int = _N_CHOICES) -> list[dict]:
    """Multiple choice over every held-out fact: its answer among n_choices answers of held-out facts of the same
    kind, in a seeded order of items (so the first N are a fair sample of all kinds; heldout_qa asks the same
    questions in the same order)."""
    facts = split_facts("heldout")
    pools = _pools(facts)
    out = []
    for f in facts:
        if len(pools[f.kind]) < 2 * n_choices:
            continue
        choices = [f.answer] + _other_answers(pools[f.kind], f, n_choices - 1, "mc")
        _rng_for(f.subject, "order").shuffle(choices)
        out.append({"question": f.question, "choices": choices, "answer": choices.index(f.answer)})
    return [out[i] for i in _heldout_order(len(out))]


def write_stdlib_docs(out_dir: str | Path) -> Path:
    """Write stdlib_docs() as out_dir/MODULE.md, one page per module; returns out_dir."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    for module, page in stdlib_docs():
        (d / f"{module}.md").write_text(page, encoding="utf-8")
    return d


def write_builtin_sets(out_dir: str | Path, docs: bool = False) -> dict[str, Path]:
    """Write the built-in sets as JSONL into out_dir: sft-train, pref-train, pref-heldout, heldout-qa, heldout-mc;
    with docs, also the stdlib's reference pages into out_dir/docs/."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    sets = {"sft-train": sft_records("train"), "pref-train": preference_records("train"),
            "pref-heldout": preference_records("heldout"), "heldout-qa": heldout_qa(), "heldout-mc": heldout_mc()}
    paths = {}
    for name, records in sets.items():
        p = d / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        paths[name] = p
    if docs:
        paths["docs"] = write_stdlib_docs(d / "docs")
    return paths


@dataclass
class BuiltinConfig:
    out: str = opt("data/builtin", "directory to write the sets into")
    docs: bool = opt(True, "also write the stdlib's reference pages (docs/MODULE.md), e.g. for `lmforge rag index`")


def run(cfg: BuiltinConfig) -> int:
    """`lmforge data builtin`: the built-in sets as files, and what each holds."""
    import sys

    paths = write_builtin_sets(cfg.out, docs=cfg.docs)
    for p in paths.values():
        if p.is_dir():
            files = sorted(p.glob("*.md"))
            size = sum(f.stat().st_size for f in files)
            print(f"{p}/: {len(files)} reference pages, {size / 1e6:.2f} MB", file=sys.stderr)
        else:
            with p.open(encoding="utf-8") as fh:
                print(f"{p}: {sum(1 for _ in fh):,} records", file=sys.stderr)
    print(cfg.out)
    return 0
