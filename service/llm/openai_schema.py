"""The subset of OpenAI's chat-completions request that splitvl serves, and its parsing.

One user message holding one image and the question:

    {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR..."}},
        {"type": "text", "text": "What is in this picture?"}]}

The image may instead name an image already uploaded to ``POST /v1/images``:
``{"type": "image_url", "image_url": {"url": "splitvl://images/<image_id>"}}`` or the extension
part ``{"type": "image_id", "image_id": "<image_id>"}``. Several text parts are joined as HF's chat
template joins them (no separator); the image always goes before the text in the prompt.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from service.errors import ApiError
from service.ids import image_id_of, is_image_id

IMAGE_REF = "splitvl://images/"
_DATA_URL = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?((?:;[\w.+-]+=[\w.+-]+)*);base64,", re.IGNORECASE)


class ImageURL(BaseModel):
    url: str = Field(description="data:image/...;base64,... or splitvl://images/<image_id>")
    detail: str | None = Field(None, description="accepted and ignored: the checkpoint's preprocessing decides")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None
    image_url: ImageURL | str | None = Field(None, description="{url: ...}, or the URL alone")
    image_id: str | None = Field(None, description="splitvl extension: an id POST /v1/images returned")


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class ChatRequest(BaseModel):
    """Parameters OpenAI defines that would change the answer but are not served are refused (400);
    others (``user``, ``metadata``, ``store``, ...) are accepted and ignored. Every number is held to
    its range here (422), before anything reads it: the ranges of OpenAI's API, ``seed`` that of
    the 64-bit generator it seeds."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    model: str | None = Field(None, description="echoed in the answer; the worker serves one model")
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="wins over max_tokens")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="default 1 as OpenAI's; 0 is greedy")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**64 - 1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=128)
    stop: str | list[str] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None


def unsupported(what: str, message: str) -> ApiError:
    return ApiError(400, "unsupported_" + what, message)


def check_parameters(req: ChatRequest) -> None:
    if req.n not in (None, 1):
        raise unsupported("parameter", "n must be 1: one answer per request")
    if req.tools or req.functions or req.tool_choice not in (None, "none") or req.function_call not in (None, "none"):
        raise unsupported("parameter", "tools and function calling are not supported")
    if req.stop:
        raise unsupported("parameter", "stop sequences are not supported: answers end at the model's end token "
                          "or max_tokens")
    if req.logprobs or req.top_logprobs:
        raise unsupported("parameter", "logprobs are not supported")
    if req.frequency_penalty or req.presence_penalty or req.logit_bias:
        raise unsupported("parameter", "frequency_penalty, presence_penalty and logit_bias are not supported")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise unsupported("parameter", "response_format must be text")


@dataclass(frozen=True)
class ImageInput:
    image_id: str
    data: bytes | None  # the image's bytes when the request carried them (data URL)


def parse_messages(messages: list[Message], max_bytes: int) -> tuple[ImageInput, str]:
    """The image and the question of the conversation, or a 400 saying what is not supported."""
    roles = [m.role for m in messages]
    if any(r in ("system", "developer") for r in roles):
        raise unsupported("message", "system prompts are not supported: the prompt is the checkpoint's chat template "
                          "with the image and the question in one user message")
    if roles != ["user"]:
        raise unsupported("message", f"send exactly one user message with the image and the question (got roles "
                          f"{roles}); multi-turn conversations are not supported")
    content = messages[0].content
    if not isinstance(content, list):
        raise ApiError(400, "missing_image", "the user message needs an image part and a text part, e.g. "
                       '[{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}, '
                       '{"type": "text", "text": "..."}]')
    images: list[ImageInput] = []
    texts: list[str] = []
    for part in content:
        if part.type == "text":
            texts.append(part.text or "")
        elif part.type == "image_url" and part.image_url is not None:
            url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
            images.append(parse_image_url(url, max_bytes))
        elif part.type == "image_id" and part.image_id is not None:
            images.append(ImageInput(check_image_id(part.image_id), None))
        else:
            raise unsupported("content", f"content part of type {part.type!r} is not supported or lacks its "
                              "value: use text, image_url {url} or image_id")
    if len(images) != 1:
        raise (ApiError(400, "missing_image", "the user message has no image part") if not images else
               unsupported("content", f"one image per request; the message has {len(images)}"))
    question = "".join(texts)
    if not question.strip():
        raise ApiError(400, "missing_question", "the user message needs a text part with the question")
    return images[0], question


def check_image_id(image_id: str) -> str:
    if not is_image_id(image_id):
        raise ApiError(400, "invalid_image_id",
                       "an image id is 64 lowercase hex characters (the sha256 POST /v1/images returned)")
    return image_id


def parse_image_url(url: str, max_bytes: int) -> ImageInput:
    if url.startswith(IMAGE_REF):
        return ImageInput(check_image_id(url[len(IMAGE_REF):]), None)
    match = _DATA_URL.match(url)
    if match is None:
        kind = "remote image URLs are not fetched" if url.startswith(("http:", "https:")) else "unknown image URL"
        raise ApiError(400, "unsupported_image_url",
                       f"{kind}: send the image as a data URL (data:image/png;base64,...) or name an uploaded "
                       f"image as {IMAGE_REF}<image_id>")
    media = (match.group(1) or "").lower()
    if media and not (media.startswith("image/") or media == "application/octet-stream"):
        raise ApiError(400, "unsupported_image_url", f"the data URL holds {media}, not an image")
    encoded = url[match.end():]
    if len(encoded) > (max_bytes + 2) // 3 * 4 + 4:
        raise ApiError(413, "image_too_large", f"the image is over the limit of {max_bytes} bytes")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        try:  # some clients wrap base64 in lines
            data = base64.b64decode(re.sub(r"\s+", "", encoded), validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "invalid_image_url", "the data URL's base64 payload does not decode") from None
    if not data:
        raise ApiError(400, "empty_image", "the data URL holds no bytes")
    if len(data) > max_bytes:
        raise ApiError(413, "image_too_large", f"the image is {len(data)} bytes; the limit is {max_bytes}")
    return ImageInput(image_id_of(data), data)
