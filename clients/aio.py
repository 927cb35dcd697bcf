"""``AsyncSplitVL``: the asyncio client (operations in ``clients.core``, the same as ``SplitVL``'s)."""

from __future__ import annotations

from collections.abc import AsyncIterator
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


class AsyncTextStream:
    """``async for delta in stream``; ``answer`` holds the whole ``Answer`` once iterated."""

    def __init__(self, response: httpx.Response, parser: StreamParser) -> None:
        self.response = response
        self.parser = parser

    @property
    def answer(self) -> Answer | None:
        return self.parser.answer

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            async for line in self.response.aiter_lines():
                delta = self.parser.feed(line)
                if delta:
                    yield delta
                if self.parser.done:
                    break
        except httpx.HTTPError as exc:
            raise transport_error("reading the stream", exc) from exc
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        await self.response.aclose()

    async def __aenter__(self) -> AsyncTextStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncSplitVL:
    """The asyncio twin of ``SplitVL`` (same methods, awaited). A streamed answer is
    ``async for delta in await client.ask(image, question, stream=True)``."""

    def __init__(self, base_url: str | None = None, *, api_key: str | None = None, timeout: float = 120.0,
                 cache_images: int = 32, cache_bytes: int = 256 * 1024 * 1024,
                 http_client: httpx.AsyncClient | None = None) -> None:
        self.base_url = resolve_url(base_url)
        self._core = Core(ImageCache(cache_images, cache_bytes))
        self._http = http_client or httpx.AsyncClient()
        self._headers = auth_headers(api_key)
        self._timeout = timeout  # on every request, a given http_client's too (its own may be none)

    async def _send(self, call: Call) -> httpx.Response:
        request = self._http.build_request(call.method, self.base_url + call.path, json=call.json, content=call.content,
                                           headers={**self._headers, **call.headers}, timeout=self._timeout)
        try:
            response = await self._http.send(request, stream=call.stream)
        except httpx.HTTPError as exc:
            raise transport_error(f"{call.method} {self.base_url}{call.path}", exc) from exc
        if call.stream and response.status_code >= 400:
            await response.aread()
            await response.aclose()
        return response

    async def _run(self, op: Op[T]) -> T:
        try:
            call = next(op)
            while True:
                call = op.send(await self._send(call))
        except StopIteration as stop:
            return stop.value

    async def _answer(self, op: Op[Any]) -> Answer | AsyncTextStream:
        result = await self._run(op)
        return result if isinstance(result, Answer) else AsyncTextStream(*result)

    async def upload(self, image: ImageSource) -> ImageInfo:
        return await self._run(self._core.upload(image))

    async def get(self, image_id: str) -> ImageInfo:
        return await self._run(self._core.get(image_id))

    async def embeddings(self, image: ImageSource) -> Embeddings:
        return await self._run(self._core.embeddings(image))

    async def delete(self, image_id: str) -> None:
        await self._run(self._core.delete(image_id))

    @overload
    async def ask(self, image: ImageSource, question: str, *, max_tokens: int | None = ..., temperature: float = ...,
                  top_p: float | None = ..., seed: int | None = ..., stream: Literal[False] = ...) -> Answer: ...
    @overload
    async def ask(self, image: ImageSource, question: str, *, max_tokens: int | None = ..., temperature: float = ...,
                  top_p: float | None = ..., seed: int | None = ..., stream: Literal[True]) -> AsyncTextStream: ...

    async def ask(self, image: ImageSource, question: str, *, max_tokens: int | None = None, temperature: float = 0.0,
                  top_p: float | None = None, seed: int | None = None,
                  stream: bool = False) -> Answer | AsyncTextStream:
        params = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed, "stream": stream}
        return await self._answer(self._core.ask(image, question, params))

    @overload
    async def chat(self, image: ImageSource, question: str, *, model: str = ..., max_tokens: int | None = ...,
                   temperature: float = ..., top_p: float | None = ..., seed: int | None = ...,
                   stream: Literal[False] = ...) -> Answer: ...
    @overload
    async def chat(self, image: ImageSource, question: str, *, model: str = ..., max_tokens: int | None = ...,
                   temperature: float = ..., top_p: float | None = ..., seed: int | None = ...,
                   stream: Literal[True]) -> AsyncTextStream: ...

    async def chat(self, image: ImageSource, question: str, *, model: str = "splitvl", max_tokens: int | None = None,
                   temperature: float = 0.0, top_p: float | None = None, seed: int | None = None,
                   stream: bool = False) -> Answer | AsyncTextStream:
        params = {"model": model, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed,
                  "stream": stream}
        return await self._answer(self._core.chat(image, question, params))

    async def healthz(self) -> dict[str, Any]:
        return await self._run(self._core.probe("/healthz"))

    async def readyz(self) -> dict[str, Any]:
        return await self._run(self._core.probe("/readyz"))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncSplitVL:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
