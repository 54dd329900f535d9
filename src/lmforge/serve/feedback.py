"""Users' ratings of replies: POST /v1/feedback (an lmforge extension) and the memory of recent replies it names.

    POST /v1/feedback {"response_id": "chatcmpl-...", "rating": "up" | "down", "corrected_text": "...",
                       "choice_index": 0, "comment": "..."}

A rating, a corrected text (the reply as it should have been), or both. The feedback row keeps the prompt
messages and the reply's text beside the rating, so `lmforge feedback export` (jobs/feedback.py) can write KTO or
DPO data without the server. Later feedback on the same reply updates it (a thumbs up, then an edit: both kept). The chat page posts here
too (thumbs up/down and "edit the reply").

`RememberReplies` is the memory: an ASGI middleware that keeps every successful /v1/chat/completions reply
(request messages, each choice's text, by response id) in the jobs database, bounded to the newest N. It reads
the request as the route received it and the reply as the client received it, whole or streamed, so the chat
route and the reply builder know nothing of feedback.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from lmforge.jobs.store import Store
from lmforge.serve.errors import APIError
from lmforge.serve.fine_tuning import runner_of
from lmforge.serve.request import read_body, require_key

log = logging.getLogger("lmforge.serve")
router = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])
RATINGS = {"up": 1, "down": -1, "good": 1, "bad": -1, 1: 1, -1: -1}


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    response_id: str = Field(min_length=1)
    rating: Literal["up", "down", "good", "bad", 1, -1] | None = None
    corrected_text: str | None = None
    choice_index: int = Field(default=0, ge=0, le=127)
    comment: str | None = Field(default=None, max_length=4000)


@router.post("/feedback")
async def post_feedback(request: Request):
    runner, _ = runner_of(request)
    req = await read_body(request, FeedbackRequest)
    if req.rating is None and req.corrected_text is None:
        raise APIError(400, "Give a 'rating' ('up' or 'down'), a 'corrected_text', or both.", param="rating",
                       code="missing_required_parameter")
    reply = runner.store.response(req.response_id)
    if reply is None:
        raise APIError(404, f"No reply with id '{req.response_id}' is remembered (the server keeps the newest "
                            "chat completions it returned).", param="response_id", code="response_not_found")
    if req.choice_index >= len(reply["choices"]):
        raise APIError(400, f"Reply '{req.response_id}' has {len(reply['choices'])} choice(s); choice_index "
                            f"{req.choice_index} does not exist.", param="choice_index", code="invalid_value")
    row = runner.store.add_feedback({
        "response_id": req.response_id, "choice": req.choice_index, "model": reply["model"],
        "messages": reply["messages"], "response": reply["choices"][req.choice_index],
        "rating": RATINGS[req.rating] if req.rating is not None else 0, "corrected": req.corrected_text,
        "comment": req.comment})
    return feedback_object(row)


def feedback_object(row: dict) -> dict:
    return {"id": row["id"], "object": "feedback", "created_at": row["created_at"], "response_id": row["response_id"],
            "choice_index": row["choice"], "model": row["model"],
            "rating": {1: "up", -1: "down"}.get(row["rating"]), "corrected_text": row["corrected"]}


class RememberReplies:
    """Pure ASGI (streaming passes through untouched): tees the request body and the reply of each
    POST /v1/chat/completions, then stores (id, model, messages, choice texts) when the status was 200."""

    PATH = "/v1/chat/completions"

    def __init__(self, app, store: Store, limit: int = 8_000_000):
        self.app, self.store, self.limit = app, store, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != self.PATH:
            return await self.app(scope, receive, send)
        request, reply, status = bytearray(), Reply(), [0]

        async def tee_receive():
            message = await receive()
            if message["type"] == "http.request" and len(request) < self.limit:
                request.extend(message.get("body", b""))
            return message

        async def tee_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                reply.stream = any(k == b"content-type" and v.startswith(b"text/event-stream")
                                   for k, v in message.get("headers", []))
            elif message["type"] == "http.response.body" and status[0] == 200:
                try:
                    reply.feed(message.get("body", b""), self.limit)
                except ValueError:  # not the JSON it should be: not remembered, still sent
                    status[0] = -1
            await send(message)

        try:
            await self.app(scope, tee_receive, tee_send)
        finally:
            if status[0] == 200:  # off the event loop: the database write waits for the disk
                await asyncio.to_thread(self.remember, bytes(request), reply)

    def remember(self, request: bytes, reply: Reply) -> None:
        try:
            body = json.loads(request)
            rid, choices = reply.result()
            if rid and isinstance(body, dict):
                self.store.remember_response(rid, str(body.get("model", "")), body.get("messages") or [], choices)
        except Exception:  # never fail a reply because it could not be remembered
            log.exception("could not remember a chat reply")


class Reply:
    """The id and per-choice text of a chat reply, from its JSON body or its SSE chunks."""

    def __init__(self):
        self.stream = False
        self.buffer = bytearray()
        self.id: str | None = None
        self.texts: dict[int, str] = {}

    def feed(self, data: bytes, limit: int) -> None:
        if len(self.buffer) + len(data) > limit:
            return
        self.buffer.extend(data)
        if not self.stream:
            return
        while (cut := self.buffer.find(b"\n\n")) >= 0:
            event, self.buffer = bytes(self.buffer[:cut]), self.buffer[cut + 2:]
            for line in event.split(b"\n"):
                if line.startswith(b"data: ") and line[6:] != b"[DONE]":
                    self._chunk(json.loads(line[6:]))

    def _chunk(self, chunk: Any) -> None:
        if not isinstance(chunk, dict) or "choices" not in chunk:
            return
        self.id = self.id or chunk.get("id")
        for c in chunk["choices"]:
            piece = (c.get("delta") or {}).get("content")
            if piece:
                self.texts[c["index"]] = self.texts.get(c["index"], "") + piece
            else:
                self.texts.setdefault(c["index"], "")

    def result(self) -> tuple[str | None, list[str]]:
        if not self.stream:
            body = json.loads(self.buffer)
            return body.get("id"), [(c.get("message") or {}).get("content") or "" for c in body.get("choices", [])]
        n = max(self.texts, default=-1) + 1
        return self.id, [self.texts.get(i, "") for i in range(n)]
