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
        [--init-args '{"quality": 95}'] [--host 127.0.0.1] [--token-env GUARDRL_REWARD_TOKEN] \
        [--max-batch-size 4] [--max-request-mb 256] [--max-pixels 16777216]

Bad requests get a 4xx with a message, never a 500: a body that is not JSON or a payload that is malformed
(bad base64, not a PNG, a truncated PNG) 400; a body over `--max-request-mb` or an image over `--max-pixels`
(decompression bombs included: the PNG header is checked before any pixel is decoded) 413; input the reward
cannot score 422. The defaults fit the published recipes' batches (a rank's 48 images of 1024 x 1024 travel in
about 200 MB). Ctrl-C or SIGTERM stops the server and its worker processes at once and frees the port.

and train with `{"class_path": "guardrl.rewards.RemoteReward", "init_args": {"url": "http://127.0.0.1:8765"}}`.
Images travel as uint8 (what a PNG holds), so a remote score equals the local score of the quantised image.
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import os
import signal
from typing import Optional

import litserve as ls
import torch
from fastapi import HTTPException

from guardrl.rewards.base import Reward
from guardrl.rewards.remote import DEFAULT_MAX_PIXELS, ImagesTooLarge, decode_images

DEFAULT_MAX_REQUEST_MB = 256

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

    def __init__(
        self,
        reward_class: str,
        init_args: Optional[dict] = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.reward_class = reward_class
        self.init_args = init_args or {}
        self.max_pixels = max_pixels

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
            images = decode_images(request.get("images"), self.max_pixels)
        except ImagesTooLarge as e:
            raise HTTPException(413, str(e)) from None
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


def build_server(
    reward_class: str,
    init_args: Optional[dict] = None,
    token: Optional[str] = None,
    max_batch_size: int = 1,
    batch_timeout: float = 0.01,
    timeout: float = 60.0,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_MB * 2**20,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ls.LitServer:
    middlewares = [(_RequestBodyMiddleware, {"max_bytes": max_request_bytes})]
    if token:
        middlewares.append((_TokenMiddleware, {"token": token}))
    api = RewardAPI(
        reward_class,
        init_args,
        max_pixels=max_pixels,
        max_batch_size=max_batch_size,
        batch_timeout=batch_timeout,
    )
    return ls.LitServer(api, accelerator="auto", timeout=timeout, middlewares=middlewares)


async def _send_error(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class _RequestBodyMiddleware:
    """ASGI middleware for POST /predict: a body over `max_bytes` gets 413 (from its Content-Length, or while
    it arrives), one that is not JSON 400; LitServe would answer both with a bare 500. The checked body is
    then handed on unchanged."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") != "/predict":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        too_large = (
            f"the request body is larger than this server accepts ({self.max_bytes} bytes, "
            "--max-request-mb); send smaller batches"
        )
        declared = headers.get(b"content-length", b"").decode() or "0"
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await _send_error(send, 413, too_large)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await _send_error(send, 413, too_large)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        content_type = headers.get(b"content-type", b"").decode()
        if not content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            try:
                json.loads(body)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                return await _send_error(
                    send,
                    400,
                    f"the request body is not JSON ({e}); send a JSON object with 'prompts' and 'images'",
                )
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def _stop_at_once(signum, frame) -> None:
    """Ctrl-C / SIGTERM: end the worker processes LitServe started (the manager and the inference workers) and
    exit, which closes the listening socket. LitServe's own shutdown waits up to 30 s per API worker and, on
    SIGTERM, leaves its children running with the port held."""
    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    for child in children:
        child.join(timeout=5)
        if child.is_alive():
            child.kill()
    print(f"guardrl reward server: stopped ({signal.Signals(signum).name})", flush=True)
    os._exit(0)


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
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [(b"content-type", b"application/json")],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m guardrl.rewards.server", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--reward", required=True, help="class path of a guardrl Reward")
    parser.add_argument("--init-args", default="{}", help="JSON object of the reward's constructor arguments")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--token-env", default=None, help="environment variable holding the bearer token")
    parser.add_argument("--max-batch-size", type=int, default=1)
    parser.add_argument(
        "--max-request-mb",
        type=float,
        default=DEFAULT_MAX_REQUEST_MB,
        help="largest request body accepted, in MiB (413 beyond)",
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="largest image accepted, in pixels (413 beyond; checked before decoding)",
    )
    args = parser.parse_args(argv)
    if not args.max_request_mb > 0:
        parser.error(f"--max-request-mb must be > 0, got {args.max_request_mb}")
    if args.max_pixels < 1:
        parser.error(f"--max-pixels must be >= 1, got {args.max_pixels}")
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
    server = build_server(
        args.reward,
        init_args,
        token,
        args.max_batch_size,
        max_request_bytes=int(args.max_request_mb * 2**20),
        max_pixels=args.max_pixels,
    )
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, _stop_at_once)
    server.run(host=args.host, port=args.port, generate_client_file=False, api_server_worker_type="thread")


if __name__ == "__main__":  # pragma: no cover
    main()
