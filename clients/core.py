"""The client's logic, written once for both transports.

Each operation is a generator: it yields the ``Call``s it needs, receives each ``httpx.Response``,
and returns the result. ``SplitVL`` drives it with a blocking ``httpx.Client``, ``AsyncSplitVL``
with an ``httpx.AsyncClient``; neither knows what an operation does. So the transparent re-upload
on 404 ``image_not_found`` and all request building and parsing live here only.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import struct
from collections import OrderedDict
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Union

import httpx

from clients.types import Answer, Embeddings, ImageInfo, SplitVLError, Usage

T = TypeVar("T")
Op = Generator["Call", httpx.Response, T]
ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, ImageInfo, Any]  # Any: a PIL image
IMAGE_REF = "splitvl://images/"
DEFAULT_URL = "http://127.0.0.1:8000"
_IMAGE_ID = re.compile(r"[0-9a-f]{64}")
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
_MAGIC = {b"\x89PNG": "image/png", b"\xff\xd8\xff": "image/jpeg", b"GIF8": "image/gif", b"BM": "image/bmp",
          b"RIFF": "image/webp"}


@dataclass
class Call:
    """One HTTP request. ``stream``: leave the body unread for the caller (when the status is ok)."""

    method: str
    path: str
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    stream: bool = False


def resolve_url(url: str | None) -> str:
    return (url or os.environ.get("SPLITVL_URL") or DEFAULT_URL).rstrip("/")


def auth_headers(api_key: str | None) -> dict[str, str]:
    key = api_key if api_key is not None else os.environ.get("SPLITVL_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


class ImageCache:
    """Bytes of the images this client has seen, by id: a small LRU bounded in count and size."""

    def __init__(self, max_items: int = 32, max_bytes: int = 256 * 1024 * 1024) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, image_id: str, data: bytes) -> None:
        if len(data) > self.max_bytes or self.max_items <= 0:
            return
        self.discard(image_id)
        self._items[image_id] = data
        self._size += len(data)
        while len(self._items) > self.max_items or self._size > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self._size -= len(old)

    def get(self, image_id: str) -> bytes | None:
        data = self._items.get(image_id)
        if data is not None:
            self._items.move_to_end(image_id)
        return data

    def discard(self, image_id: str) -> None:
        old = self._items.pop(image_id, None)
        if old is not None:
            self._size -= len(old)


def is_image_id(image: object) -> bool:
    """A 64-hex image id (and not the name of a file that happens to look like one)."""
    return isinstance(image, str) and bool(_IMAGE_ID.fullmatch(image)) and not os.path.isfile(image)


def image_bytes(image: Any) -> bytes | None:
    """The bytes of a path, bytes-like or PIL image; None for an image id or ``ImageInfo``."""
    if isinstance(image, ImageInfo):
        return None
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if is_image_id(image):
        return None
    if isinstance(image, (str, os.PathLike)):
        path = Path(image).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{image}: no such file (and not a 64-hex image id)")
        return path.read_bytes()
    if hasattr(image, "save") and hasattr(image, "mode"):  # PIL.Image.Image
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(f"an image is a path, bytes, a PIL image, an image id or ImageInfo, not {type(image).__name__}")


def image_id_of(image: Any, data: bytes | None) -> str:
    if isinstance(image, ImageInfo):
        return image.image_id
    return hashlib.sha256(data).hexdigest() if data is not None else str(image)


def content_type(data: bytes) -> str:
    for magic, kind in _MAGIC.items():
        if data.startswith(magic):
            return kind
    return "application/octet-stream"


def error_of(r: httpx.Response) -> SplitVLError:
    try:
        err = r.json()["error"]
        code, message = str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", r.text[:500] or r.reason_phrase
    retry = r.headers.get("retry-after")
    return SplitVLError(r.status_code, code, message, request_id=r.headers.get("x-request-id"),
                        retry_after=float(retry) if retry and retry.replace(".", "", 1).isdigit() else None)


def transport_error(what: str, exc: httpx.HTTPError) -> SplitVLError:
    """No response (status None): ``timeout`` when httpx timed out, else ``connection_error``."""
    if isinstance(exc, httpx.TimeoutException):
        return SplitVLError(None, "timeout", f"{what} timed out: {exc}")
    return SplitVLError(None, "connection_error", f"{what}: {exc}")


def check(r: httpx.Response) -> httpx.Response:
    if r.status_code >= 400:
        raise error_of(r)
    return r


def image_not_found(r: httpx.Response) -> bool:
    return r.status_code == 404 and error_of(r).code == "image_not_found"


def embeddings_of(data: bytes, cached: bool | None = None) -> Embeddings:
    """Parse a safetensors file's header (no torch needed) into the image's metadata."""
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        meta, embeds, grid = header["__metadata__"], header["image_embeds"], header["image_grid_thw"]
        t, h, w = (int(x) for x in struct.unpack("<3q", data[8 + n + grid["data_offsets"][0]:][:24]))
        deepstack = header.get("deepstack_image_embeds")
        info = ImageInfo(meta["image_id"], meta.get("model", ""), meta.get("fingerprint", ""), (t, h, w),
                         int(embeds["shape"][0]), int(embeds["shape"][1]),
                         _SAFETENSORS_DTYPES.get(embeds["dtype"], embeds["dtype"].lower()), cached,
                         int(deepstack["shape"][0]) if deepstack else 0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError) as exc:
        raise SplitVLError(200, "invalid_response", f"the embeddings file does not parse: {exc}") from exc
    return Embeddings(info, data)


def question_body(image_id: str, question: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"image_id": image_id, "question": question, **{k: v for k, v in params.items() if v is not None}}


def chat_body(image: dict[str, Any], question: str, params: dict[str, Any]) -> dict[str, Any]:
    content = [{"type": "image_url", "image_url": image}, {"type": "text", "text": question}]
    return {"messages": [{"role": "user", "content": content}], **{k: v for k, v in params.items() if v is not None}}


def answer_of(body: dict[str, Any]) -> Answer:
    usage = body["usage"]
    return Answer(body["image_id"], body["answer"], body["finish_reason"],
                  Usage(int(usage["prompt_tokens"]), int(usage["completion_tokens"])))


def chat_answer_of(body: dict[str, Any], image_id: str) -> Answer:
    choice, usage = body["choices"][0], body.get("usage") or {}
    return Answer(body.get("image_id", image_id), choice["message"]["content"] or "", choice["finish_reason"],
                  Usage(int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))))


class StreamParser:
    """Server-sent events of ``/v1/questions`` (kind "questions") or ``/v1/chat/completions``
    ("chat"), one line at a time: ``feed`` returns the text delta a line carries."""

    def __init__(self, kind: str, image_id: str) -> None:
        self.kind = kind
        self.image_id = image_id
        self.done = False
        self.answer: Answer | None = None
        self._text: list[str] = []
        self._finish: str | None = None
        self._usage = Usage(0, 0)

    def feed(self, line: str) -> str:
        if not line.startswith("data:"):
            return ""
        data = line[5:].strip()
        if data == "[DONE]":
            self.done = True
            if self.answer is None and self._finish is not None:
                self.answer = Answer(self.image_id, "".join(self._text), self._finish, self._usage)
            return ""
        event = json.loads(data)
        if "error" in event:
            err = event["error"]
            raise SplitVLError(200, str(err.get("code", "stream_error")), str(err.get("message", err)))
        if self.kind == "questions":
            if "answer" in event:
                self.answer = answer_of(event)
                return ""
            return str(event.get("delta", ""))
        if event.get("usage"):
            self._usage = Usage(int(event["usage"]["prompt_tokens"]), int(event["usage"]["completion_tokens"]))
        if not event.get("choices"):
            return ""
        choice = event["choices"][0]  # one choice is asked for
        self._finish = choice.get("finish_reason") or self._finish
        text = (choice.get("delta") or {}).get("content") or ""
        self._text.append(text)
        return text


Streaming = tuple[httpx.Response, StreamParser]  # an open response and the parser of its events


@dataclass(frozen=True)
class Source:
    image_id: str
    data: bytes | None  # the image's bytes: given, or remembered from earlier
    given: bool  # the caller passed the image itself, not its id


class Core:
    """The operations; ``cache`` keeps the bytes of images seen, for transparent re-upload."""

    def __init__(self, cache: ImageCache) -> None:
        self.cache = cache

    def source(self, image: ImageSource) -> Source:
        data = image_bytes(image)
        image_id = image_id_of(image, data)
        if data is not None:
            self.cache.put(image_id, data)
            return Source(image_id, data, True)
        if not _IMAGE_ID.fullmatch(image_id):
            raise ValueError(f"{image_id!r} is not an image id (64 lowercase hex characters)")
        return Source(image_id, self.cache.get(image_id), False)

    def _post_image(self, data: bytes, embeddings: bool) -> Op[httpx.Response]:
        headers = {"Content-Type": content_type(data)}
        if embeddings:
            headers["Accept"] = "application/octet-stream"
        return check((yield Call("POST", "/v1/images", content=data, headers=headers)))

    def upload(self, image: ImageSource) -> Op[ImageInfo]:
        src = self.source(image)
        if not src.given or src.data is None:
            raise ValueError("upload needs the image itself (a path, bytes or a PIL image), not an id")
        r = yield from self._post_image(src.data, embeddings=False)
        return ImageInfo.from_json(r.json())

    def get(self, image_id: str) -> Op[ImageInfo]:
        r = yield Call("GET", f"/v1/images/{image_id}")
        return ImageInfo.from_json(check(r).json())

    def delete(self, image_id: str) -> Op[None]:
        check((yield Call("DELETE", f"/v1/images/{image_id}")))
        self.cache.discard(image_id)

    def embeddings(self, image: ImageSource) -> Op[Embeddings]:
        """An id is fetched (re-uploaded when evicted and still known); an image is uploaded and its
        embeddings come back in the same response."""
        src = self.source(image)
        if not src.given:
            r = yield Call("GET", f"/v1/images/{src.image_id}/embeddings")
            if not (image_not_found(r) and src.data is not None):
                return embeddings_of(check(r).content)
        assert src.data is not None
        r = yield from self._post_image(src.data, embeddings=True)
        return embeddings_of(r.content, r.headers.get("x-splitvl-cached") == "true")

    def ask(self, image: ImageSource, question: str, params: dict[str, Any]) -> Op[Answer | Streaming]:
        """POST /v1/questions by id; on 404 image_not_found with the bytes at hand, upload and retry."""
        src = self.source(image)
        stream = bool(params.get("stream"))
        call = Call("POST", "/v1/questions", json=question_body(src.image_id, question, params), stream=stream)
        r = yield call
        if image_not_found(r) and src.data is not None:
            yield from self._post_image(src.data, embeddings=False)
            r = yield call
        check(r)
        return (r, StreamParser("questions", src.image_id)) if stream else answer_of(r.json())

    def chat(self, image: ImageSource, question: str, params: dict[str, Any]) -> Op[Answer | Streaming]:
        """POST /v1/chat/completions naming the image by id; on 404 send it as a data URL (the server encodes it)."""
        src = self.source(image)
        stream = bool(params.get("stream"))
        r = yield Call("POST", "/v1/chat/completions", stream=stream,
                       json=chat_body({"url": IMAGE_REF + src.image_id}, question, params))
        if image_not_found(r) and src.data is not None:
            url = f"data:{content_type(src.data)};base64,{base64.b64encode(src.data).decode()}"
            r = yield Call("POST", "/v1/chat/completions", json=chat_body({"url": url}, question, params), stream=stream)
        check(r)
        return (r, StreamParser("chat", src.image_id)) if stream else chat_answer_of(r.json(), src.image_id)

    def probe(self, path: str) -> Op[dict[str, Any]]:
        """GET /healthz or /readyz: the JSON body; a not-ready 503 is an answer, not an error."""
        r = yield Call("GET", path)
        if r.status_code == 503 and path == "/readyz":
            return r.json()
        return check(r).json()
