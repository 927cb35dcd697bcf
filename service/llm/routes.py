"""HTTP routes of the LLM worker: /v1/questions."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from service.config import Settings
from service.errors import ApiError
from service.guard import BodyLimit
from service.ids import IMAGE_ID_PATTERN
from service.llm.generation import Delta, Finish, Generation
from service.llm.worker import LLMWorker


async def get_llm(request: Request) -> LLMWorker:  # async: FastAPI runs a sync dependency in a thread
    return request.app.state.llm


LLM = Annotated[LLMWorker, Depends(get_llm)]


PATH = "/v1/questions"
MAX_QUESTION_CHARS = 65536
# a question's JSON body: the question as \\uXXXX escapes (12 bytes a character outside the BMP, a
# surrogate pair), and the other fields
QUESTION_BODY_BYTES = 12 * MAX_QUESTION_CHARS + 64 * 1024


def body_limits(settings: Settings) -> dict[str, BodyLimit]:
    """What ``service.guard`` lets through to these routes while they read the body."""
    return {PATH: BodyLimit(QUESTION_BODY_BYTES, "payload_too_large",
                          f"a JSON question of at most {MAX_QUESTION_CHARS} characters")}


class QuestionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image_id: str = Field(pattern=IMAGE_ID_PATTERN, description="the id POST /v1/images returned")
    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS)
    max_tokens: int | None = Field(None, ge=1, description="at most the server's max_new_tokens; "
                                   "default 128 or that limit if lower")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 is greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = Field(False, description="answer as server-sent events")
    seed: int | None = Field(None, ge=0, le=2**64 - 1, description="makes sampling reproducible")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class Answer(BaseModel):
    image_id: str
    answer: str
    finish_reason: str
    usage: Usage


def answer_body(image_id: str, finish: Finish) -> dict[str, Any]:
    return {"image_id": image_id, "answer": finish.text, "finish_reason": finish.finish_reason,
            "usage": {"prompt_tokens": finish.prompt_tokens, "completion_tokens": finish.completion_tokens}}


def sse(data: dict[str, Any] | str, event: str | None = None) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return ((f"event: {event}\n" if event else "") + f"data: {payload}\n\n").encode()


async def stream_answer(llm: LLMWorker, image_id: str, generation: Generation) -> AsyncIterator[bytes]:
    try:
        async for event in llm.events(generation):
            if isinstance(event, Delta):
                if event.text:
                    yield sse({"delta": event.text})
            else:
                yield sse(answer_body(image_id, event))
        yield sse("[DONE]")
    except ApiError as exc:  # headers are gone: the error travels as an event
        yield sse({"error": {"code": exc.code, "message": exc.message}}, event="error")


router = APIRouter(tags=["questions"])


@router.post(PATH, response_model=Answer,
             responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream"}})
async def ask(body: QuestionRequest, request: Request, llm: LLM) -> Any:
    max_tokens = body.max_tokens if body.max_tokens is not None else min(128, llm.settings.max_new_tokens)
    generation = await llm.ask(body.image_id, body.question, max_tokens=max_tokens,
                               temperature=body.temperature, top_p=body.top_p, seed=body.seed, stream=body.stream)
    if body.stream:
        return StreamingResponse(stream_answer(llm, body.image_id, generation), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    finish = await llm.answer(generation, request.receive)
    return answer_body(body.image_id, finish)
