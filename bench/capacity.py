"""How much Redis memory an image's stored features take, per family and image size (CPU).

    python bench/capacity.py [--memory-gib 16,64] [--out DIR]

For each family's released checkpoints (the language model's hidden size D and, for Qwen3-VL, its
DeepStack layers L), and a few image sizes, it computes the image's grid exactly as the vision
worker does (the family's processor defaults: patch, merge, min/max pixels; ``preprocess.target_size``),
writes one real record of that shape (bf16, as on a GPU) through ``FeatureStore.put`` into a real
redis-server, and reads Redis' own ``MEMORY USAGE`` of every key the image owns (the record and its
id index). Prints the README table: bytes per image and how many images fit in the given memory.
Redis' ``maxmemory`` + LRU then evicts the least recently used images; a question about an evicted
image gets 404 and the client uploads it again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.embedded_redis import EmbeddedRedis  # noqa: E402
from service.models import family  # noqa: E402
from service.ports import free_port  # noqa: E402
from service.preprocess import target_size  # noqa: E402
from service.store import FeatureStore, ImageRecord  # noqa: E402

# (checkpoint, family, D = its language model's hidden size, L = its DeepStack layers: len(deepstack_visual_indexes))
MODELS = [
    ("Qwen2-VL-2B", "qwen2_vl", 1536, 0),
    ("Qwen2-VL-7B", "qwen2_vl", 3584, 0),
    ("Qwen2.5-VL-3B", "qwen2_5_vl", 2048, 0),
    ("Qwen2.5-VL-7B", "qwen2_5_vl", 3584, 0),
    ("Qwen3-VL-2B", "qwen3_vl", 2048, 3),
    ("Qwen3-VL-8B", "qwen3_vl", 4096, 3),
]
IMAGES = [(448, 448), (1280, 720), (1920, 1080)]


def grid_of(family_name: str, width: int, height: int) -> tuple[int, int, int]:
    cfg = family(family_name).published_preprocess  # the published checkpoints' pixel bounds
    h, w = target_size(height, width, cfg)
    return 1, h // cfg.patch_size, w // cfg.patch_size


async def measure(url: str) -> list[dict]:
    store = FeatureStore(url)
    rows = []
    for i, (name, fam, hidden, layers) in enumerate(MODELS):
        for j, (width, height) in enumerate(IMAGES):
            grid = grid_of(fam, width, height)
            tokens = grid[0] * grid[1] * grid[2] // 4
            image_id = f"{i:02x}{j:02x}" * 16
            deepstack = torch.randn(layers, tokens, hidden).to(torch.bfloat16) if layers else None
            record = ImageRecord(image_id, f"fp{i}", name, grid, torch.randn(tokens, hidden).to(torch.bfloat16),
                                 deepstack)
            await store.put(record)
            client = await store.client()
            keys = [k async for k in client.scan_iter(match=f"*{image_id}*")]  # the record and its id index
            used = sum([await client.memory_usage(k, samples=0) or 0 for k in keys])
            rows.append({"model": name, "family": fam, "image": f"{width}x{height}", "grid": list(grid),
                         "tokens": tokens, "hidden": hidden, "deepstack_layers": layers,
                         "feature_bytes": (1 + layers) * tokens * hidden * 2, "redis_bytes": used, "keys": len(keys)})
            await store.delete(f"fp{i}", image_id)
    await store.close()
    return rows


def table(rows: list[dict], memories_gib: list[int]) -> str:
    head = "| model | image | tokens | features | in Redis | " + " | ".join(
        f"images in {m} GiB" for m in memories_gib) + " |"
    lines = [head, "|" + "---|" * (5 + len(memories_gib))]
    for r in rows:
        fits = " | ".join(f"{int(m * 2**30 // r['redis_bytes']):,}" for m in memories_gib)
        extra = f" (+{r['deepstack_layers']} DeepStack)" if r["deepstack_layers"] else ""
        lines.append(f"| {r['model']} | {r['image']} | {r['tokens']:,}{extra} | {r['feature_bytes'] / 2**20:.2f} MiB "
                     f"| {r['redis_bytes'] / 2**20:.2f} MiB | {fits} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memory-gib", default="16,64", help="comma list of Redis memory sizes for the table")
    ap.add_argument("--out", type=Path, help="also write capacity.json there")
    args = ap.parse_args()
    with EmbeddedRedis(tcp_port=free_port()) as redis:
        rows = asyncio.run(measure(redis.url))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "capacity.json").write_text(json.dumps(rows, indent=1))
    print(table(rows, [int(m) for m in args.memory_gib.split(",")]))


if __name__ == "__main__":
    main()
