"""Typed Python clients for splitvl: ``SplitVL`` (blocking) and ``AsyncSplitVL`` (asyncio), over httpx.

    from clients import SplitVL

    with SplitVL("http://127.0.0.1:8000") as client:
        info = client.upload("cat.png")
        print(client.ask(info, "What is in this picture?").answer)
        for delta in client.ask("cat.png", "Describe it.", stream=True):
            print(delta, end="", flush=True)
"""

from clients.aio import AsyncSplitVL, AsyncTextStream
from clients.core import IMAGE_REF
from clients.sync import SplitVL, TextStream
from clients.types import Answer, Embeddings, ImageInfo, SplitVLError, Usage

__all__ = ["IMAGE_REF", "Answer", "AsyncSplitVL", "AsyncTextStream", "Embeddings", "ImageInfo", "SplitVL",
           "SplitVLError", "TextStream", "Usage"]
