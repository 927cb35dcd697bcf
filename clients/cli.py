"""The ``splitvl`` CLI's client verbs: ``embed IMAGE`` and ``ask IMAGE_OR_ID QUESTION``."""

from __future__ import annotations

import argparse
import sys

from clients.core import is_image_id
from clients.sync import SplitVL
from clients.types import SplitVLError


def _client(args: argparse.Namespace) -> SplitVL:
    return SplitVL(args.url, api_key=args.api_key, timeout=args.timeout)


def embed(args: argparse.Namespace) -> int:
    """Upload IMAGE (or name a stored id); print its id; with --save write its embeddings file."""
    try:
        with _client(args) as client:
            if args.save:
                emb = client.embeddings(args.image)
                emb.save(args.save)
                image_id = emb.info.image_id
            elif is_image_id(args.image):
                image_id = client.get(args.image).image_id
            else:
                image_id = client.upload(args.image).image_id
    except (SplitVLError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(image_id)
    return 0


def ask(args: argparse.Namespace) -> int:
    """Stream the answer to stdout; a file is uploaded when the service does not have it yet."""
    wrote = False
    try:
        with _client(args) as client:
            stream = client.ask(args.image, args.question, max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, seed=args.seed, stream=True)
            for delta in stream:
                sys.stdout.write(delta)
                sys.stdout.flush()
                wrote = True
    except (SplitVLError, OSError, ValueError) as exc:
        if wrote:
            sys.stdout.write("\n")
        print(f"error: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write("\n")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="service URL (env SPLITVL_URL; default http://127.0.0.1:8000)")
    common.add_argument("--api-key", dest="api_key", help="bearer key (env SPLITVL_API_KEY)")
    common.add_argument("--timeout", type=float, default=300.0, help="seconds per request")

    p = sub.add_parser("embed", parents=[common], help="upload an image; print its id (--save: its embeddings)")
    p.add_argument("image", help="image file (or the id of a stored image)")
    p.add_argument("--save", metavar="FILE", help="write the embeddings as a safetensors file")
    p.set_defaults(func=embed)

    p = sub.add_parser("ask", parents=[common], help="ask a question about an image; streams the answer")
    p.add_argument("image", metavar="IMAGE_OR_ID", help="image file (uploaded when needed) or a 64-hex image id")
    p.add_argument("question")
    p.add_argument("--max-tokens", dest="max_tokens", type=int)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-p", dest="top_p", type=float)
    p.add_argument("--seed", type=int)
    p.set_defaults(func=ask)
