"""``SplitVL``: the blocking client (operations in ``clients.core``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal, TypeVar, overload

import httpx

from clients.core import (
    Call,
    Core,
    ImageCache,
    ImageSource,
    Op,
    StreamParser,
    auth_headers,
    resolve_url,
    transport_error,
)
from clients.types import Answer, Embeddings, ImageInfo

T = TypeVar("T")


class TextStream:
    """The answer's text deltas as they come; ``answer`` holds the whole ``Answer`` once iterated."""

    def __init__(self, response: httpx.Response, parser: StreamParser) -> None:
        self.response = response
        self.parser = parser

    @property
    def answer(self) -> Answer | None:
        return self.parser.answer

    def __iter__(self) -> Iterator[str]:
        try:
            for line in self.response.iter_lines():
                delta = self.parser.feed(line)
                if delta:
                    yield delta
                if self.parser.done:
                    break
        except httpx.HTTPError as exc:
            raise transport_error("reading the stream", exc) from exc
        finally:
            self.close()

    def close(self) -> None:
        self.response.close()

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SplitVL:
    """Blocking client for a splitvl service (a gateway, or a worker of the right kind).

    ``base_url`` defaults to ``$SPLITVL_URL`` or http://127.0.0.1:8000, ``api_key`` to
    ``$SPLITVL_API_KEY``. Images are a path, bytes, a PIL image, a 64-hex image id or an
    ``ImageInfo``; the bytes of the last ``cache_images`` images seen are kept, so a question on an
    image the service evicted re-uploads it and retries. ``timeout`` (seconds) bounds every request
    and every wait for the next piece of a stream. Failures raise ``SplitVLError``.
    """

    def __init__(self, base_url: str | None = None, *, api_key: str | None = None, timeout: float = 120.0,
                 cache_images: int = 32, cache_bytes: int = 256 * 1024 * 1024,
                 http_client: httpx.Client | None = None) -> None:
        self.base_url = resolve_url(base_url)
        self._core = Core(ImageCache(cache_images, cache_bytes))
        self._http = http_client or httpx.Client()
        self._headers = auth_headers(api_key)
        self._timeout = timeout  # on every request, a given http_client's too (its own may be none)

    def _send(self, call: Call) -> httpx.Response:
        request = self._http.build_request(call.method, self.base_url + call.path, json=call.json, content=call.content,
                                           headers={**self._headers, **call.headers}, timeout=self._timeout)
        try:
            response = self._http.send(request, stream=call.stream)
        except httpx.HTTPError as exc:
            raise transport_error(f"{call.method} {self.base_url}{call.path}", exc) from exc
        if call.stream and response.status_code >= 400:
            response.read()
            response.close()
        return response

    def _run(self, op: Op[T]) -> T:
        try:
            call = next(op)
            while True:
                call = op.send(self._send(call))
        except StopIteration as stop:
            return stop.value

    def _answer(self, op: Op[Any]) -> Answer | TextStream:
        result = self._run(op)
        return result if isinstance(result, Answer) else TextStream(*result)

    # -- vision worker ----------------------------------------------------------------------------

    def upload(self, image: ImageSource) -> ImageInfo:
        return self._run(self._core.upload(image))

    def get(self, image_id: str) -> ImageInfo:
        return self._run(self._core.get(image_id))

    def embeddings(self, image: ImageSource) -> Embeddings:
        return self._run(self._core.embeddings(image))

    def delete(self, image_id: str) -> None:
        self._run(self._core.delete(image_id))

    # -- LLM worker -------------------------------------------------------------------------------

    @overload
    def ask(self, image: ImageSource, question: str, *, max_tokens: int | None = ..., temperature: float = ...,
            top_p: float | None = ..., seed: int | None = ..., stream: Literal[False] = ...) -> Answer: ...
    @overload
    def ask(self, image: ImageSource, question: str, *, max_tokens: int | None = ..., temperature: float = ...,
            top_p: float | None = ..., seed: int | None = ..., stream: Literal[True]) -> TextStream: ...

    def ask(self, image: ImageSource, question: str, *, max_tokens: int | None = None, temperature: float = 0.0,
            top_p: float | None = None, seed: int | None = None, stream: bool = False) -> Answer | TextStream:
        """``/v1/questions``; greedy by default. ``stream=True`` gives a ``TextStream`` of deltas."""
        params = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed, "stream": stream}
        return self._answer(self._core.ask(image, question, params))

    @overload
    def chat(self, image: ImageSource, question: str, *, model: str = ..., max_tokens: int | None = ...,
             temperature: float = ..., top_p: float | None = ..., seed: int | None = ...,
             stream: Literal[False] = ...) -> Answer: ...
    @overload
    def chat(self, image: ImageSource, question: str, *, model: str = ..., max_tokens: int | None = ...,
             temperature: float = ..., top_p: float | None = ..., seed: int | None = ...,
             stream: Literal[True]) -> TextStream: ...

    def chat(self, image: ImageSource, question: str, *, model: str = "splitvl", max_tokens: int | None = None,
             temperature: float = 0.0, top_p: float | None = None, seed: int | None = None,
             stream: bool = False) -> Answer | TextStream:
        """``/v1/chat/completions`` with the image by id, or as a data URL when the service lacks it."""
        params = {"model": model, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed,
                  "stream": stream}
        return self._answer(self._core.chat(image, question, params))

    # -- both -------------------------------------------------------------------------------------

    def healthz(self) -> dict[str, Any]:
        return self._run(self._core.probe("/healthz"))

    def readyz(self) -> dict[str, Any]:
        """The readiness body; ``["ready"]`` is False (not an error) while the service is not ready."""
        return self._run(self._core.probe("/readyz"))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SplitVL:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
