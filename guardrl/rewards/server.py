"""A reward server: any guardrl Reward behind HTTP, on LitServe, and `RemoteReward` to use it as if local.

Why a server: some scorers do not belong in the training process (GenEval's detector stack pins old
packages; a 7B VLM judge wants its own GPUs). The wire format is typed and pickle-free:

    POST /predict   {"prompts": [str, ...],
                     "images": {"format": "raw", "shape": [B, H, W, 3], "data": base64(uint8 bytes)}
                               | {"format": "png", "data": [base64(png), ...]}}
    ->              {"scores": [float, ...]}
    GET  /health    "ok" once the reward is loaded

Serve (loopback by default; a token, when set, is required as `Authorization: Bearer <token>`):

    python -m guardrl.rewards.server --reward guardrl.rewards.JpegCompressibility --port 8765 \
        [--init-args '{"quality": 95}'] [--host 127.0.0.1] [--token-env GUARDRL_REWARD_TOKEN] [--max-batch-size 4]

and train with `{"class_path": "guardrl.rewards.RemoteReward", "init_args": {"url": "http://127.0.0.1:8765"}}`.
Images travel as uint8 (what a PNG holds), so a remote score equals the local score of the quantised image.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
from typing import Optional

import litserve as ls
import torch
from fastapi import HTTPException

from guardrl.rewards.base import Reward
from guardrl.rewards.remote import decode_images

# ---------------------------------------------------------------- the server


def load_reward(class_path: str, init_args: Optional[dict] = None) -> Reward:
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"--reward={class_path!r}: cannot import it ({e})") from None
    if not (isinstance(cls, type) and issubclass(cls, Reward)):
        raise ValueError(f"--reward={class_path!r} is not a guardrl.rewards.Reward subclass")
    return cls(**(init_args or {}))


class RewardAPI(ls.LitAPI):
    """Serves one guardrl Reward (module level: LitServe pickles it into its worker process)."""

    def __init__(self, reward_class: str, init_args: Optional[dict] = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.reward_class = reward_class
        self.init_args = init_args or {}

    def setup(self, device):
        self.reward = load_reward(self.reward_class, self.init_args).to(device).eval()
        self.device_ = device

    def decode_request(self, request):
        if not isinstance(request, dict):
            raise HTTPException(400, "the body must be a JSON object with 'prompts' and 'images'")
        prompts = request.get("prompts")
        if not (isinstance(prompts, list) and all(isinstance(p, str) for p in prompts)):
            raise HTTPException(400, "'prompts' must be a list of strings")
        try:
            images = decode_images(request.get("images"))
        except (ValueError, TypeError) as e:
            raise HTTPException(400, str(e)) from None
        if len(prompts) != images.shape[0]:
            raise HTTPException(400, f"{images.shape[0]} images but {len(prompts)} prompts")
        return images, prompts

    def batch(self, inputs):
        # Several requests in one forward (max_batch_size > 1): concatenate, remember the split.
        images = torch.cat([i for i, _ in inputs])
        prompts = [p for _, ps in inputs for p in ps]
        return images, prompts, [len(ps) for _, ps in inputs]

    def predict(self, inputs):
        images, prompts = inputs[0], inputs[1]
        try:
            scores = self.reward(images.to(self.device_), prompts).cpu()
        except ValueError as e:
            # guardrl rewards raise ValueError for input they cannot score (a prompt a GenEval metadata file
            # lacks, a prompt without a quote for OCR): the client's request is wrong, retrying cannot help,
            # and the message must reach the trainer rather than a bare 500.
            raise HTTPException(422, f"{type(e).__name__}: {e}") from None
        return (scores, inputs[2]) if len(inputs) == 3 else scores

    def unbatch(self, output):
        scores, sizes = output
        return list(torch.split(scores, sizes))

    def encode_response(self, scores):
        return {"scores": [float(s) for s in scores]}



def build_server(reward_class: str, init_args: Optional[dict] = None, token: Optional[str] = None,
                 max_batch_size: int = 1, batch_timeout: float = 0.01, timeout: float = 60.0) -> ls.LitServer:
    middlewares = []
    if token:
        middlewares.append((_TokenMiddleware, {"token": token}))
    api = RewardAPI(reward_class, init_args, max_batch_size=max_batch_size, batch_timeout=batch_timeout)
    return ls.LitServer(api, accelerator="auto",
                        timeout=timeout, middlewares=middlewares)


class _TokenMiddleware:
    """ASGI middleware: every path but /health needs `Authorization: Bearer <token>`."""

    def __init__(self, app, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path") != "/health":
            headers = dict(scope.get("headers") or [])
            if headers.get(b"authorization") != self.expected:
                body = b'{"detail": "missing or wrong bearer token"}'
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m guardrl.rewards.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--reward", required=True, help="class path of a guardrl Reward")
    parser.add_argument("--init-args", default="{}", help="JSON object of the reward's constructor arguments")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--token-env", default=None, help="environment variable holding the bearer token")
    parser.add_argument("--max-batch-size", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        init_args = json.loads(args.init_args)
    except json.JSONDecodeError as e:
        parser.error(f"--init-args={args.init_args!r} is not JSON ({e.msg})")
    token = None
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            parser.error(f"--token-env={args.token_env!r}: that environment variable is not set or empty")
    load_reward(args.reward, init_args)  # fail here, clearly, before any process is spawned
    server = build_server(args.reward, init_args, token, args.max_batch_size)
    server.run(host=args.host, port=args.port, generate_client_file=False, api_server_worker_type="thread")


if __name__ == "__main__":  # pragma: no cover
    main()
