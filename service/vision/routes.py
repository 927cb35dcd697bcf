"""HTTP routes of the vision worker: /v1/images."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote

import torch
from fastapi import APIRouter, Depends, Path, Request, Response
from fastapi.responses import JSONResponse
from safetensors.torch import save as save_safetensors
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.config import Settings
from service.errors import ApiError
from service.guard import BodyLimit, BodyRefused
from service.ids import is_image_id
from service.store import ImageRecord
from service.vision.worker import Timings, VisionWorker

ImageId = Annotated[str, Path(description="hex sha256 of the uploaded bytes")]


async def get_vision(request: Request) -> VisionWorker:  # async: a sync one would hop to a thread
    return request.app.state.vision


Vision = Annotated[VisionWorker, Depends(get_vision)]


def check_id(image_id: str) -> str:
    if not is_image_id(image_id):
        raise ApiError(422, "invalid_image_id", "image_id must be 64 lowercase hex characters (the sha256 of the image bytes)")
    return image_id


def embeddings_file(record: ImageRecord) -> bytes:
    """safetensors: ``image_embeds`` [N, D], ``image_grid_thw`` [1, 3] and, for a family with DeepStack
    features, ``deepstack_image_embeds`` [L, N, D] (in the order of ``deepstack_visual_indexes``)."""
    tensors = {"image_embeds": record.embeds, "image_grid_thw": torch.tensor([record.grid_thw], dtype=torch.int64)}
    if record.deepstack is not None:
        tensors["deepstack_image_embeds"] = record.deepstack
    return save_safetensors(
        tensors, metadata={"image_id": record.image_id, "fingerprint": record.fingerprint, "model": record.model},
    )


# what a header value keeps as it is: printable ASCII; anything else (a model path in another script)
# is percent-encoded as UTF-8, where Starlette's latin-1 encoding of the headers would fail
_HEADER_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


def metadata_headers(meta: dict[str, Any]) -> dict[str, str]:
    out = {}
    for key, value in meta.items():
        name = "X-Splitvl-" + "-".join(p.capitalize() for p in key.split("_"))
        text = ",".join(str(v) for v in value) if isinstance(value, list) else str(value).lower() if isinstance(value, bool) else str(value)
        out[name] = quote(text, safe=_HEADER_SAFE)
    return out


# multipart framing around the file (boundaries, part headers): the body may be this much over the
# image limit, and the file in it is held to the limit exactly
MULTIPART_SLACK = 64 * 1024
_HOW = "send the image as multipart/form-data field 'file' or as a raw body with an image/* content type"


def body_limits(settings: Settings) -> dict[str, BodyLimit]:
    """What ``service.guard`` lets through to these routes while they read the body."""
    n = settings.max_upload_bytes
    return {router.prefix: BodyLimit(n + MULTIPART_SLACK, "image_too_large", f"an image of up to {n} bytes")}


async def read_upload(request: Request, max_bytes: int) -> bytes:
    """The image from multipart field ``file`` or from a raw ``image/*`` body (the body's size is
    bounded while it is read, by ``service.guard``; the image's here)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        try:
            form = await request.form(max_files=1, max_fields=8)
        except BodyRefused:
            raise
        except StarletteHTTPException as exc:
            raise ApiError(400, "invalid_multipart", f"the multipart body could not be parsed ({exc.detail}): "
                           f"{_HOW}") from None
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "missing_file", "the multipart body has no file field named 'file'")
        data = await upload.read(max_bytes + 1)
    elif content_type.startswith("image/") or content_type == "application/octet-stream":
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise ApiError(413, "image_too_large", f"the image is over the limit of {max_bytes} bytes")
            chunks.append(chunk)
        data = b"".join(chunks)
    else:
        raise ApiError(415, "unsupported_media_type", f"{_HOW}, not {content_type or 'no content type'}")
    if len(data) > max_bytes:
        raise ApiError(413, "image_too_large", f"the image is over the limit of {max_bytes} bytes")
    return data


def wants_embeddings(request: Request) -> bool:
    return "application/octet-stream" in request.headers.get("accept", "").lower()


router = APIRouter(prefix="/v1/images", tags=["images"])


@router.post("", status_code=200, responses={200: {"description": "image metadata (JSON) or embeddings (safetensors)"}})
async def upload_image(request: Request, vision: Vision) -> Response:
    timings = Timings()
    data = await read_upload(request, vision.settings.max_upload_bytes)
    timings.mark("read")
    embeddings = wants_embeddings(request)
    record, cached = await vision.encode(data, timings, load=embeddings)
    meta = record.metadata(cached=cached)
    if embeddings:
        return Response(embeddings_file(record), media_type="application/octet-stream",
                        headers={**metadata_headers(meta), "Server-Timing": timings.header()})
    return JSONResponse(meta, headers={"Server-Timing": timings.header()})


@router.get("/{image_id}")
async def get_image(image_id: ImageId, vision: Vision) -> dict[str, Any]:
    record = await vision.lookup(check_id(image_id), with_embeds=False)
    return record.metadata()


@router.get("/{image_id}/embeddings", response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}}, "description": "safetensors file"}})
async def get_embeddings(image_id: ImageId, vision: Vision) -> Response:
    record = await vision.lookup(check_id(image_id))
    return Response(embeddings_file(record), media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{image_id}.safetensors"'})


@router.delete("/{image_id}", status_code=204, response_class=Response)
async def delete_image(image_id: ImageId, vision: Vision) -> Response:
    if not await vision.store.delete(vision.fingerprint, check_id(image_id)):
        raise ApiError(404, "image_not_found", f"image {image_id} is not stored")
    return Response(status_code=204)
