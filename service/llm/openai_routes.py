"""OpenAI-compatible ``POST /v1/chat/completions`` on the LLM worker (request forms: openai_schema).

An image sent as a data URL is hashed (sha256 = its image id); when its features are not in the
feature store, a vision worker encodes it first (this process's in ``serve all``, else the one at
``SPLITVL_VISION_URL``). Answers are those of ``/v1/questions`` for the same image and question.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from service.config import Settings
from service.errors import ApiError, unavailable
from service.guard import BodyLimit
from service.llm.generation import Delta, Finish, Generation
from service.llm.openai_schema import ChatRequest, ImageInput, check_parameters, parse_messages
from service.llm.routes import LLM, sse
from service.llm.vision_client import encode_image
from service.llm.worker import LLMWorker

router = APIRouter(tags=["openai"])

PATH = "/v1/chat/completions"
_RETRY_AFTER_ENCODE = ("image_not_found", "fingerprint_mismatch")


def body_limits(settings: Settings) -> dict[str, BodyLimit]:
    """What ``service.guard`` lets through while the body is read: an image travels base64 in a data
    URL (a third more than its bytes), plus the rest of the JSON."""
    n = settings.max_upload_bytes
    return {PATH: BodyLimit(n * 4 // 3 + 1024 * 1024, "payload_too_large",
                            f"a chat request with one image of up to {n} bytes")}


async def start_generation(request: Request, llm: LLMWorker, image: ImageInput, question: str,
                           body: ChatRequest) -> Generation:
    settings = llm.settings
    max_tokens = body.max_completion_tokens or body.max_tokens or settings.max_new_tokens
    params: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "seed": body.seed,
        "stream": bool(body.stream),
    }
    try:
        return await llm.ask(image.image_id, question, **params)
    except ApiError as exc:
        if exc.code not in _RETRY_AFTER_ENCODE or image.data is None:
            raise
    fingerprint = await encode_image(request, image.data)
    ours = await llm.fingerprint()
    if ours is not None and fingerprint != ours:
        raise unavailable("vision_model_mismatch", f"the vision worker encoded the image for fingerprint {fingerprint}, "
                          f"this LLM worker serves {ours}: SPLITVL_VISION_URL names a worker of another model", 30.0)
    return await llm.ask(image.image_id, question, **params)


def completion_body(cid: str, created: int, model: str, image_id: str, fingerprint: str | None,
                    finish: Finish) -> dict[str, Any]:
    return {
        "id": cid, "object": "chat.completion", "created": created, "model": model,
        "system_fingerprint": fingerprint, "image_id": image_id,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": finish.text},
                     "finish_reason": finish.finish_reason, "logprobs": None}],
        "usage": usage(finish),
    }


def usage(finish: Finish) -> dict[str, int]:
    return {"prompt_tokens": finish.prompt_tokens, "completion_tokens": finish.completion_tokens,
            "total_tokens": finish.prompt_tokens + finish.completion_tokens}


async def stream_chunks(llm: LLMWorker, generation: Generation, head: dict[str, Any],
                        include_usage: bool) -> AsyncIterator[bytes]:
    extra = {"usage": None} if include_usage else {}

    def chunk(delta: dict[str, str], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return sse({**head, "choices": [choice], **extra})

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for event in llm.events(generation):
            if isinstance(event, Delta):
                if event.text:
                    yield chunk({"content": event.text})
            else:
                yield chunk({}, event.finish_reason)
                if include_usage:
                    yield sse({**head, "choices": [], "usage": usage(event)})
    except ApiError as exc:  # headers are gone: the error travels in the stream, as OpenAI's servers send it
        yield sse({"error": {"code": exc.code, "message": exc.message, "type": "server_error"}})
    yield sse("[DONE]")


@router.post(PATH,
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "chat.completion JSON, or chat.completion.chunk events when stream"}})
async def chat_completions(body: ChatRequest, request: Request, llm: LLM) -> Any:
    check_parameters(body)
    image, question = parse_messages(body.messages, llm.settings.max_upload_bytes)
    generation = await start_generation(request, llm, image, question, body)
    try:
        fingerprint = await llm.fingerprint()  # known by now: the features were found under it
    except BaseException:
        generation.cancel()
        raise
    cid = "chatcmpl-" + uuid.uuid4().hex
    created = int(time.time())
    model = body.model or llm.settings.served_name()
    headers = {"X-Splitvl-Image-Id": image.image_id}
    if body.stream:
        head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": fingerprint}
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(stream_chunks(llm, generation, head, include_usage), media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    finish = await llm.answer(generation, request.receive)
    return JSONResponse(completion_body(cid, created, model, image.image_id, fingerprint, finish), headers=headers)
