"""POST an image, then questions about it: real uvicorn, real Redis, answers equal to HF's generate."""

from __future__ import annotations

import asyncio
import io
import json
import time
from pathlib import Path

import httpx
import pytest
import redis
import torch
from PIL import Image

from service.app import create_app
from service.config import Settings
from service.store import latest_key, record_key


@pytest.fixture
def server(tiny_checkpoint, redis_url, parts, live_server):
    encoder, engine = parts
    settings = Settings(model=str(tiny_checkpoint), redis_url=redis_url, device="cpu", max_new_tokens=64,
                        max_question_tokens=200)
    app = create_app(settings, "all", workers={"vision_encoder": encoder, "llm_engine": engine})
    with live_server(app) as live:
        yield live


def hf_answer(checkpoint: Path, data: bytes, question: str, max_new_tokens: int) -> list[int]:
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    model = Qwen2VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    processor = Qwen2VLImageProcessorPil.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    inputs = processor(images=[Image.open(io.BytesIO(data)).convert("RGB")], return_tensors="pt")
    n = int(inputs["image_grid_thw"][0].prod()) // 4
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                         chat_template=(checkpoint / "chat_template.jinja").read_text())
    text = text.replace("<|image_pad|>", "<|image_pad|>" * n)
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    # without mm_token_type_ids HF silently falls back to 1-D positions for the image
    mm_types = (ids == model.config.image_token_id).int()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm_types,
                         pixel_values=inputs["pixel_values"],
                         image_grid_thw=inputs["image_grid_thw"], max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def test_image_then_questions_match_hf(server, tiny_checkpoint, parts, image_bytes):
    _, engine = parts
    data = image_bytes(150, 110, seed=5)
    questions = ["What is in this picture?", "How many people are there?", "Is it day or night?"]
    with httpx.Client(base_url=server.url, timeout=120) as client:
        image_id = client.post("/v1/images", content=data, headers={"Content-Type": "image/png"}).json()["image_id"]
        for q in questions:
            r = client.post("/v1/questions", json={"image_id": image_id, "question": q, "max_tokens": 12})
            assert r.status_code == 200, r.text
            body = r.json()
            expected = hf_answer(tiny_checkpoint, data, q, 12)
            assert body["answer"] == engine.prompts.decode(expected)
            assert body["usage"]["completion_tokens"] == len(expected)
            assert body["finish_reason"] == ("stop" if expected[-1] in engine.eos_token_ids else "length")
    assert engine.stats()["prefix_hits"] >= len(questions) - 1


def test_streaming_equals_plain(server, image_bytes):
    data = image_bytes(90, 120, seed=6)
    with httpx.Client(base_url=server.url, timeout=120) as client:
        image_id = client.post("/v1/images", content=data, headers={"Content-Type": "image/png"}).json()["image_id"]
        req = {"image_id": image_id, "question": "Describe the image in detail.", "max_tokens": 16}
        plain = client.post("/v1/questions", json=req).json()
        with client.stream("POST", "/v1/questions", json={**req, "stream": True}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    final = json.loads(events[-2])
    deltas = "".join(json.loads(e)["delta"] for e in events[:-2])
    assert deltas == plain["answer"] == final["answer"]
    assert final["finish_reason"] == plain["finish_reason"]


def test_question_errors(server, redis_url, image_bytes):
    data = image_bytes(64, 64, seed=7)
    with httpx.Client(base_url=server.url, timeout=60) as client:
        image_id = client.post("/v1/images", content=data, headers={"Content-Type": "image/png"}).json()["image_id"]

        def ask(**kw):
            return client.post("/v1/questions", json={"image_id": image_id, "question": "hi", "max_tokens": 8, **kw})

        assert ask(question="").status_code == 422
        assert ask(question="   ").json()["error"]["code"] == "invalid_request"
        assert ask(max_tokens=0).status_code == 422
        r = ask(max_tokens=65)
        assert r.status_code == 422 and "64" in r.json()["error"]["message"]
        r = ask(question="word " * 400, max_tokens=8)
        assert r.status_code == 422 and r.json()["error"]["code"] == "question_too_long"
        assert ask(temperature=-1).status_code == 422
        r = client.post("/v1/questions", json={"image_id": "f" * 64, "question": "hi", "max_tokens": 8})
        assert r.status_code == 404 and r.json()["error"]["code"] == "image_not_found"
        r = client.post("/v1/questions", content=b'{"image_id": "\xff\xfe", "question": 1}',
                        headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_body"

        # the same image stored only under another model's fingerprint
        other = image_bytes(64, 64, seed=8)
        other_id = client.post("/v1/images", content=other, headers={"Content-Type": "image/png"}).json()["image_id"]
        r_ = redis.Redis.from_url(redis_url)
        fp = client.get(f"/v1/images/{other_id}").json()["fingerprint"]
        r_.rename(record_key(fp, other_id), record_key("0000000000000000", other_id))
        r_.set(latest_key(other_id), "0000000000000000")
        r = client.post("/v1/questions", json={"image_id": other_id, "question": "hi", "max_tokens": 8})
        assert r.status_code == 409 and r.json()["error"]["code"] == "fingerprint_mismatch"


async def test_concurrent_questions(server, image_bytes):
    data = image_bytes(100, 100, seed=9)
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        r = await client.post("/v1/images", content=data, headers={"Content-Type": "image/png"})
        image_id = r.json()["image_id"]
        qs = [f"Question number {i}?" for i in range(6)]
        rs = await asyncio.gather(*(client.post("/v1/questions", json={"image_id": image_id, "question": q,
                                                                         "max_tokens": 8}) for q in qs))
        alone = [(await client.post("/v1/questions", json={"image_id": image_id, "question": q,
                                                            "max_tokens": 8})).json()["answer"] for q in qs]
    assert [r.json()["answer"] for r in rs] == alone


def test_a_cached_prefix_spares_reading_the_embeddings(server, redis_url, image_bytes):
    """Once the engine holds an image's prefix KV, a question reads only the record's metadata from
    Redis (it must still exist), not its embeddings; the answer stays the same."""
    data = image_bytes(224, 224, seed=8)  # 64 image tokens: 4 KB of float32 embeddings at hidden 16
    r = redis.Redis.from_url(redis_url)

    def sent_by_redis() -> int:
        return int(r.info("stats")["total_net_output_bytes"])

    with httpx.Client(base_url=server.url, timeout=120) as client:
        meta = client.post("/v1/images", content=data, headers={"Content-Type": "image/png"}).json()
        embeds_bytes = len(r.hget(record_key(meta["fingerprint"], meta["image_id"]), "embeds"))
        req = {"image_id": meta["image_id"], "question": "What is in this picture?", "max_tokens": 8}
        before = sent_by_redis()
        first = client.post("/v1/questions", json=req)
        first_cost = sent_by_redis() - before
        before = sent_by_redis()
        second = client.post("/v1/questions", json=req)
        second_cost = sent_by_redis() - before
    r.close()
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    assert first_cost > embeds_bytes  # the prefix was computed from the stored embeddings
    assert second_cost < embeds_bytes // 2, (first_cost, second_cost, embeds_bytes)


def test_a_deleted_image_is_not_answered_from_its_cached_prefix(server, parts, image_bytes):
    """The engine may still hold the prefix KV of a deleted image: the question starts on it while the
    record is looked up, and is then refused (404) and dropped from the engine."""
    _, engine = parts
    data = image_bytes(120, 96, seed=11)
    with httpx.Client(base_url=server.url, timeout=120) as client:
        meta = client.post("/v1/images", content=data, headers={"Content-Type": "image/png"}).json()
        req = {"image_id": meta["image_id"], "question": "Which colour?", "max_tokens": 64}
        assert client.post("/v1/questions", json=req).status_code == 200
        assert engine.prefix_grid(f"{meta['fingerprint']}:{meta['image_id']}") == tuple(meta["grid_thw"])
        assert client.delete(f"/v1/images/{meta['image_id']}").status_code == 204
        for stream in (False, True):
            r = client.post("/v1/questions", json={**req, "stream": stream})
            assert r.status_code == 404 and r.json()["error"]["code"] == "image_not_found", r.text
    deadline = time.monotonic() + 30
    while engine.stats()["active"] or engine.stats()["waiting"]:  # the started answers were dropped
        assert time.monotonic() < deadline, engine.stats()
        time.sleep(0.01)
