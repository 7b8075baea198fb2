"""The reward server against bad payloads (4xx with a message, never a 500), its size and pixel limits, and
its shutdown (Ctrl-C or SIGTERM frees the port and leaves no process behind); RemoteReward never retries a
4xx."""

from __future__ import annotations

import base64
import http.server
import io
import os
import signal
import socket
import struct
import threading
import time
import zlib

import pytest
import requests
import torch
from PIL import Image

from guardrl.rewards import RewardError
from guardrl.rewards.remote import RemoteReward, decode_images

pytest.importorskip("litserve", reason="the reward server needs the `server` extra (litserve)")
from test_reward_server import _free_port, _kill, _start_server  # noqa: E402


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (255, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A 1 x 1 PNG whose header says width x height (a decompression bomb's header), with a valid CRC."""
    data = bytearray(_png(1, 1))
    start = 8 + 8  # signature, then the IHDR chunk's length and type
    data[start : start + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12 : start + 13])) & 0xFFFFFFFF  # type + 13 bytes of IHDR data
    data[start + 13 : start + 17] = struct.pack(">I", crc)
    return bytes(data)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def test_decode_images_refuses_bad_pngs_and_bombs_before_decoding():
    with pytest.raises(
        ValueError, match=r"'images.data\[0\]' is not a readable PNG \(UnidentifiedImageError"
    ):
        decode_images({"format": "png", "data": [_b64(os.urandom(64))]})
    with pytest.raises(ValueError, match=r"'images.data\[0\]' is not a readable PNG"):
        decode_images({"format": "png", "data": [_b64(_png(8, 8)[:40])]})
    with pytest.raises(
        ValueError, match=r"20000 x 20000 pixels is larger than this server accepts \(1000000 pixels"
    ):
        decode_images({"format": "png", "data": [_b64(_png_claiming(20000, 20000))]}, max_pixels=1_000_000)
    with pytest.raises(ValueError, match=r"2000 x 1000 pixels"):
        decode_images({"format": "raw", "shape": [1, 1000, 2000, 3], "data": ""}, max_pixels=1_000_000)
    ok = decode_images({"format": "png", "data": [_b64(_png(4, 2))]})
    assert ok.shape == (1, 3, 2, 4) and float(ok[0, 0].min()) == 1.0


@pytest.fixture(scope="module")
def limited_server():
    port = _free_port()
    process = _start_server(
        "guardrl.rewards.JpegCompressibility",
        {},
        port,
        extra=["--max-request-mb", "1", "--max-pixels", "1000000"],
    )
    yield f"http://127.0.0.1:{port}", process
    _kill(process)


@pytest.mark.timeout(300)
def test_bad_payloads_get_4xx_with_a_message(limited_server):
    url, _ = limited_server

    def post(**kwargs):
        return requests.post(f"{url}/predict", timeout=30, **kwargs)

    cases = {
        "random bytes as PNG": (
            post(json={"prompts": ["a"], "images": {"format": "png", "data": [_b64(os.urandom(99))]}}),
            400,
            "not a readable PNG",
        ),
        "truncated PNG": (
            post(json={"prompts": ["a"], "images": {"format": "png", "data": [_b64(_png(8, 8)[:40])]}}),
            400,
            "not a readable PNG",
        ),
        "20000 x 20000 header": (
            post(
                json={
                    "prompts": ["a"],
                    "images": {"format": "png", "data": [_b64(_png_claiming(20000, 20000))]},
                }
            ),
            413,
            "20000 x 20000 pixels",
        ),
        "not JSON": (
            post(data=b"\x00\x01 not json", headers={"content-type": "application/json"}),
            400,
            "not JSON",
        ),
        "too large": (
            post(data=b"x" * (2 * 2**20), headers={"content-type": "application/json"}),
            413,
            "larger than this server accepts",
        ),
    }
    for name, (response, status, text) in cases.items():
        assert response.status_code == status, (name, response.status_code, response.text)
        assert text in response.json()["detail"], (name, response.text)
    # and a good request still works
    good = post(json={"prompts": ["a"], "images": {"format": "png", "data": [_b64(_png(8, 8))]}})
    assert good.status_code == 200 and len(good.json()["scores"]) == 1


def _session_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_stopping_frees_the_port_and_leaves_no_process(stop):
    port = _free_port()
    process = _start_server("guardrl.rewards.JpegCompressibility", {}, port)
    try:
        os.kill(process.pid, stop)  # the main process only, as a terminal's Ctrl-C or `kill` would do
        process.wait(timeout=20)
        deadline = time.monotonic() + 10
        while _session_alive(process.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _session_alive(process.pid), "worker processes survived the server"
        assert _port_free(port)
    finally:
        _kill(process)


def test_remote_reward_does_not_retry_a_4xx():
    calls = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            calls.append(self.path)
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(404)
            self.end_headers()
            self.wfile.write(b'{"detail": "no such endpoint"}')

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        reward = RemoteReward(f"http://127.0.0.1:{server.server_port}", max_attempts=3, retry_delay_s=0.01)
        with pytest.raises(RewardError, match=r"refused the request \(404\)"):
            reward(torch.zeros(1, 3, 4, 4), ["a"])
        assert len(calls) == 1
    finally:
        server.shutdown()
