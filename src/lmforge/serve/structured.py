"""Structured output and tools, as a request asks for them: the grammar that constrains its tokens, the tools its
chat template shows, and the tool-call format its reply is parsed in.

Owns: reading `response_format` (json_object, json_schema), vLLM's `structured_outputs` (json, regex, choice,
grammar as Lark in llguidance's dialect, json_object), `tools` / `tool_choice` / `parallel_tool_calls`, and
saying what is wrong as a 400 naming the parameter (a schema keyword the engine cannot enforce included: a
field is never accepted and then ignored). One grammar engine Vocabulary per served model, built on first use.
Leaves to inference/constrain.py the grammars and masks, to inference/tools.py the tool-call formats, to
reply.py how calls are worded.

tool_choice: "none" leaves the tools out of the prompt and parses nothing; "auto" (the default with tools)
shows them and parses calls when the model writes them; "required" and a named function constrain the reply
to calls in the template's format whose arguments follow each function's parameter schema.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

from lmforge.errors import LmforgeError
from lmforge.inference.constrain import Grammar, GrammarError, Vocabulary
from lmforge.inference.tools import ToolFormat, call_grammar, detect_format
from lmforge.serve.errors import APIError
from lmforge.serve.schemas import ChatCompletionRequest, StructuredOutputs

_vocab_lock = threading.Lock()


def vocabulary(lm, engine) -> Vocabulary:
    """The served model's Vocabulary (kept on its LoadedModel after the first constrained request)."""
    with _vocab_lock:
        if lm.vocabulary is None:
            lm.vocabulary = Vocabulary(lm.tokenizer, engine.vocab_size, sorted(engine.eos_ids))
        return lm.vocabulary


def _grammar_error(e: LmforgeError, param: str) -> APIError:
    keyword = getattr(e, "keyword", None)
    return APIError(400, f"Invalid '{param}': {e}", param=param,
                    code="unsupported_schema_keyword" if keyword else "invalid_grammar")


async def compile_grammar(lm, engine, make, param: str) -> Grammar:
    """make(vocab) -> Grammar, off the event loop (building the vocabulary or a large grammar takes a while)."""
    if lm.tokenizer is None:
        raise APIError(400, "This model has no tokenizer, so its output cannot be constrained.", param=param)

    def build():
        return make(vocabulary(lm, engine))

    try:
        return await asyncio.to_thread(build)
    except GrammarError as e:
        raise _grammar_error(e, param) from None
    except LmforgeError as e:
        raise APIError(400, str(e), param=param) from None


def structured_outputs_maker(so: StructuredOutputs):
    given = so.given()
    if len(given) != 1:
        raise APIError(400, "structured_outputs takes exactly one of json, regex, choice, grammar, json_object "
                            f"(got {', '.join(given) or 'none'}).", param="structured_outputs")
    kind = given[0]
    if kind == "json":
        schema = so.json_
        if isinstance(schema, str):
            import json

            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise APIError(400, f"structured_outputs.json is not JSON: {e}", param="structured_outputs.json") \
                    from None
        return (lambda v: v.json_schema(schema, "the schema")), "structured_outputs.json"
    if kind == "regex":
        return (lambda v: v.regex(so.regex)), "structured_outputs.regex"
    if kind == "choice":
        return (lambda v: v.choice(so.choice)), "structured_outputs.choice"
    if kind == "grammar":
        return (lambda v: v.lark(so.grammar)), "structured_outputs.grammar"
    return (lambda v: v.json_object()), "structured_outputs.json_object"


async def completion_grammar(req, lm, engine) -> Grammar | None:
    if req.structured_outputs is None:
        return None
    make, param = structured_outputs_maker(req.structured_outputs)
    return await compile_grammar(lm, engine, make, param)


@dataclass
class ChatPlan:
    """What a chat request's structured output and tools come to."""

    grammar: Grammar | None = None
    tools: list[dict] | None = None  # for the chat template (None: no tools shown)
    tool_format: ToolFormat | None = None  # parse the reply's calls in this format (None: plain text)
    functions: list[dict] = field(default_factory=list)


def _template_of(tok) -> str | None:
    try:
        return tok._pick_template(None, [])
    except LmforgeError:
        return None


async def chat_plan(req: ChatCompletionRequest, lm, engine) -> ChatPlan:
    plan = ChatPlan()
    makers = []
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        makers.append(((lambda v: v.json_object()), "response_format"))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None:
            raise APIError(400, "response_format of type 'json_schema' needs a 'json_schema' object with 'name' "
                                "and 'schema'.", param="response_format.json_schema")
        schema = rf.json_schema.schema_ if rf.json_schema.schema_ is not None else {}
        what = f"the schema '{rf.json_schema.name}'"
        makers.append(((lambda v: v.json_schema(schema, what)), "response_format.json_schema.schema"))
    if req.structured_outputs is not None:
        makers.append(structured_outputs_maker(req.structured_outputs))

    choice = req.tool_choice
    if choice is not None and not req.tools and choice != "none":
        raise APIError(400, "tool_choice is set but no tools were given.", param="tool_choice")
    if req.tools and choice != "none":
        functions = [t.function.model_dump(exclude_none=True) for t in req.tools]
        names = [f["name"] for f in functions]
        if len(set(names)) != len(names):
            raise APIError(400, "Two tools have the same name; tool names must be unique.", param="tools")
        template = _template_of(lm.tokenizer) if lm.tokenizer is not None else None
        fmt = detect_format(template)
        if fmt is None:
            raise APIError(400, f"Model '{req.model}' has a chat template that does not show tools to the model "
                                "(no tool-call format found in it); use a tool-capable model or drop 'tools'.",
                           param="tools")
        plan.tools = [t.model_dump(exclude_none=True) for t in req.tools]
        plan.tool_format, plan.functions = fmt, functions
        forced: list[dict] | None = None
        if choice == "required":
            forced = functions
        elif choice is not None and not isinstance(choice, str):
            forced = [f for f in functions if f["name"] == choice.function.name]
            if not forced:
                raise APIError(400, f"tool_choice names the function '{choice.function.name}', which is not "
                                    f"among the tools ({', '.join(names)}).", param="tool_choice")
        if forced is not None:
            if makers:
                raise APIError(400, "A required or named tool call cannot be combined with response_format or "
                                    "structured_outputs; use one.", param="tool_choice")
            parallel = req.parallel_tool_calls and choice == "required"
            opener_id = lm.tokenizer.token_to_id(fmt.opener)
            special = {fmt.opener: opener_id} if opener_id in lm.tokenizer.special_ids else {}
            for f in forced:
                index = functions.index(f)
                makers.append(((lambda v, f=f: v.json_schema(f.get("parameters") or {}, f"tool '{f['name']}'")),
                               f"tools[{index}].function.parameters"))
            makers.append(((lambda v: v.lark(call_grammar(fmt, forced, parallel, special), "the tool grammar")),
                           "tools"))
    if len([m for m in makers if m[1] != "tools" and not m[1].startswith("tools[")]) > 1:
        raise APIError(400, "Give response_format or structured_outputs, not both.", param="structured_outputs")
    for make, param in makers:  # each schema is checked on its own, so an error names its parameter
        plan.grammar = await compile_grammar(lm, engine, make, param)
    return plan
