"""The reward server (guardrl/rewards/server.py, on LitServe) and RemoteReward: a real round trip on
loopback, and a killed server, a timeout, a refused token and malformed responses each ending in a clear
RewardError after bounded retries, never a silent zero."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests
import torch
from lightning.pytorch.callbacks import Callback

from conftest import REPO_ROOT, tiny_fit_args
import guardrl.rewards.remote as remote_module
from guardrl.rewards import JpegCompressibility, RewardError
from guardrl.rewards.remote import RemoteReward, images_to_uint8

pytest.importorskip("litserve", reason="the reward server needs the `server` extra (litserve)")

TOKEN = "s3cret-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(
    reward: str, init_args: dict, port: int, token: bool = False, extra: list[str] | None = None
) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1", "GUARDRL_TEST_TOKEN": TOKEN}
    command = [
        sys.executable,
        "-m",
        "guardrl.rewards.server",
        "--reward",
        reward,
        "--port",
        str(port),
        "--init-args",
        json.dumps(init_args),
    ] + (["--token-env", "GUARDRL_TEST_TOKEN"] if token else [])
    command += extra or []
    # A session of its own: LitServe runs workers in child processes, and "killing the server" means all of
    # them.
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()[-3000:]
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    _kill(process)
    raise AssertionError("the reward server did not become healthy in 90 s")


def _kill(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


@pytest.fixture(scope="module")
def server():
    # Call 1 (0-based, counted in the server) sleeps 4 s: the timeout test makes exactly that call.
    port = _free_port()
    process = _start_server(
        "guardrl.rewards.FaultInjectionReward", {"sleep_at_calls": [1], "sleep_s": 4.0}, port, token=True
    )
    yield f"http://127.0.0.1:{port}", process
    _kill(process)


def _quantised(images: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(images_to_uint8(images)).permute(0, 3, 1, 2).float() / 255


class _PostSpy:
    """Wraps requests.post (RemoteReward's only way out): each call's URL and timeout, and what it returned
    (the parsed scores, or the exception's class name)."""

    def __init__(self, monkeypatch):
        self.calls = []
        original = requests.post

        def post(url, *args, **kwargs):
            call = {"url": url, "timeout": kwargs.get("timeout")}
            self.calls.append(call)
            try:
                response = original(url, *args, **kwargs)
            except Exception as error:
                call["raised"] = type(error).__name__
                raise
            call["status"] = response.status_code
            if response.status_code == 200:
                call["scores"] = response.json()["scores"]
            return response

        monkeypatch.setattr(requests, "post", post)


def test_round_trip_equals_the_local_reward_on_the_quantised_images(server, monkeypatch):
    url, _ = server
    monkeypatch.setenv("TOKEN_FOR_TEST", TOKEN)
    images = torch.rand(3, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    prompts = ["a", "b", "c"]
    remote = RemoteReward(url, token_env="TOKEN_FOR_TEST", max_attempts=1)
    expected = JpegCompressibility()(_quantised(images), prompts)
    assert torch.equal(remote(images, prompts), expected)  # call 0


def test_a_timeout_is_bounded_and_reported(server, monkeypatch):
    # No wall clock (it flakes under load): the bound is shown by what happened. The request went out once,
    # with timeout=1.0, and ended in a ReadTimeout: the client gave up without a response, while the server
    # would only answer this call after its 4 s sleep; and no second attempt was made.
    url, _ = server
    monkeypatch.setenv("TOKEN_FOR_TEST", TOKEN)
    remote = RemoteReward(url, token_env="TOKEN_FOR_TEST", timeout_s=1.0, max_attempts=1)
    posts = _PostSpy(monkeypatch)
    with pytest.raises(
        RewardError,
        match=r"failed 1 time\(s\) \(RemoteReward.max_attempts=1, timeout_s=1.0\); "
        r"attempt 1: ReadTimeout",
    ):
        remote(torch.rand(2, 3, 8, 8), ["a", "b"])  # call 1 sleeps 4 s
    assert posts.calls == [{"url": f"{url}/predict", "timeout": 1.0, "raised": "ReadTimeout"}]


def test_health_and_png_payload_and_server_side_validation(server, monkeypatch):
    url, _ = server
    assert requests.get(f"{url}/health", timeout=5).text.strip('"') == "ok"
    monkeypatch.setenv("TOKEN_FOR_TEST", TOKEN)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    remote = RemoteReward(url, token_env="TOKEN_FOR_TEST", image_format="png", max_attempts=1, timeout_s=30)
    assert torch.equal(remote(images, ["a", "b"]), JpegCompressibility()(_quantised(images), ["a", "b"]))
    bad = {"prompts": ["a"], "images": {"format": "raw", "shape": [1, 4, 4, 3], "data": "AAAA"}}
    response = requests.post(
        f"{url}/predict", json=bad, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
    )
    assert response.status_code == 400 and "holds 3 bytes, shape [1, 4, 4, 3] needs 48" in response.text


def test_a_missing_or_wrong_token_is_refused_without_retrying(server, monkeypatch):
    # "Without retrying", shown by events rather than the wall clock: one POST per call, answered 401, and no
    # retry delay slept (RemoteReward sleeps retry_delay_s between attempts; 3 attempts were allowed).
    url, _ = server
    monkeypatch.setenv("WRONG_TOKEN", "nope")
    slept = []
    monkeypatch.setattr(remote_module.time, "sleep", slept.append)
    posts = _PostSpy(monkeypatch)
    for remote in (
        RemoteReward(url, max_attempts=3, retry_delay_s=5.0),
        RemoteReward(url, token_env="WRONG_TOKEN", max_attempts=3, retry_delay_s=5.0),
    ):
        posts.calls.clear()
        with pytest.raises(RewardError, match=r"refused the request \(401\).*missing or wrong bearer token"):
            remote(torch.rand(1, 3, 8, 8), ["a"])
        assert [(c["url"], c["status"]) for c in posts.calls] == [(f"{url}/predict", 401)]
    assert slept == []


def test_a_killed_server_fails_after_bounded_retries(monkeypatch):
    port = _free_port()
    process = _start_server("guardrl.rewards.JpegCompressibility", {}, port)
    remote = RemoteReward(f"http://127.0.0.1:{port}", max_attempts=2, retry_delay_s=0.1, timeout_s=5)
    assert remote(torch.rand(1, 3, 8, 8), ["a"]).shape == (1,)
    _kill(process)
    with pytest.raises(
        RewardError,
        match=r"failed 2 time\(s\).*attempt 1: ConnectionError.*attempt 2: "
        r"ConnectionError",
    ):
        remote(torch.rand(1, 3, 8, 8), ["a"])


class _BadServer(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_POST(self):  # noqa: N802 - the http.server API
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(type(self).body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(
    "body, message",
    [
        (b"<html>oops</html>", r"is not JSON: '<html>oops</html>'"),
        (b'{"scores": [1.0]}', r"must hold 'scores', a list of 2 numbers"),
        (b'{"result": 3}', r"must hold 'scores'"),
        (b'{"scores": [1.0, "x"]}', r"non-numeric scores"),
    ],
)
def test_malformed_responses_are_errors_never_zeros(body, message):
    handler = type("Handler", (_BadServer,), {"body": body})
    httpd = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        remote = RemoteReward(f"http://127.0.0.1:{httpd.server_port}", max_attempts=2, retry_delay_s=0.0)
        with pytest.raises(RewardError, match=rf"failed 2 time\(s\).*attempt 2: ValueError: .*{message}"):
            remote(torch.rand(2, 3, 8, 8), ["a", "b"])
    finally:
        httpd.shutdown()


class _RecordTraining(Callback):
    """The trainable weights when training starts, and each iteration's outputs (rewards, advantages, the
    advantages every trained step's loss was computed with)."""

    def on_train_start(self, trainer, pl_module):
        self.start = {
            n: p.detach().clone()
            for n, p in pl_module.policy.transformer.named_parameters()
            if p.requires_grad
        }
        self.outputs = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.outputs.append(outputs)


def test_remote_reward_trains_a_policy_through_guardrl_fit(tmp_path, prompt_file, monkeypatch):
    from guardrl.cli import main

    port = _free_port()
    process = _start_server("guardrl.rewards.JpegCompressibility", {}, port)
    try:
        rewards = json.dumps(
            [
                {
                    "class_path": "guardrl.rewards.RemoteReward",
                    "init_args": {"url": f"http://127.0.0.1:{port}", "name": "jpeg_remote"},
                }
            ]
        )
        args = tiny_fit_args(
            prompt_file, str(tmp_path / "runs"), **{"--model.rewards": rewards, "--model.max_iterations": "1"}
        )
        cli = main(args, run=False)
        record = _RecordTraining()
        cli.trainer.callbacks.append(record)
        posts = _PostSpy(monkeypatch)
        cli.trainer.fit(cli.model, cli.datamodule)
    finally:
        _kill(process)
    assert cli.model.num_iterations == 1
    (outputs,) = record.outputs
    # 1. the rewards came from the server: one POST for the iteration's 4 images (2 prompts x 2 samples),
    #    answered 200, and its scores are exactly the iteration's rewards; the server computed JPEG
    #    compressibility of the images it was sent (8-bit quantised)
    assert [(c["url"], c["status"]) for c in posts.calls] == [(f"http://127.0.0.1:{port}/predict", 200)]
    received = torch.tensor(posts.calls[0]["scores"], dtype=torch.float32)
    assert received.shape == (4,) and torch.equal(outputs["rewards"], received)
    local = JpegCompressibility()(_quantised(outputs["images"]), outputs["prompts"])
    torch.testing.assert_close(received, local, atol=1e-6, rtol=0)
    assert float(cli.trainer.callback_metrics["reward/jpeg_remote/mean"]) == pytest.approx(
        float(received.double().mean()), abs=1e-6
    )
    # 2. they entered the loss: the advantages are each pair's group z-scores, A = +-d / (d + 1e-4) with d
    #    half the pair's reward gap (population std of two values; eps 1e-4), the better image of each pair
    #    positive; and every loss term of the update (3 trained steps x 2 inner epochs) used exactly them
    pairs = received.view(2, 2)
    assert (pairs[:, 0] != pairs[:, 1]).all()
    half_gap = (pairs[:, 0] - pairs[:, 1]).double() / 2
    expected = (torch.stack([half_gap, -half_gap], dim=1) / (half_gap.abs().unsqueeze(1) + 1e-4)).float()
    # (1e-3: the module works in float32 on rewards of about -13, ulp 1e-6, over half-gaps of about 0.02, an
    # error of ~5e-5; the eps alone moves A by 5e-3 here)
    torch.testing.assert_close(outputs["advantages"], expected.flatten(), atol=1e-3, rtol=0)
    assert len(outputs["step_stats"]) == 3
    for stats in outputs["step_stats"]:
        assert len(stats.advantages) == 2
        assert all(torch.equal(a, outputs["advantages"]) for a in stats.advantages)
    # 3. and the optimizer changed the trainable weights: 2 steps (2 inner epochs of 1 minibatch) of AdamW
    #    with lr 0.01 from B = 0, each moving a LoRA B element by at most ~1.0014 lr (Adam's bias-corrected
    #    step at t <= 2): between 0 and 0.02003 per element, measured mean 0.016; a no-op update gives 0
    assert cli.trainer.global_step == 2
    after = dict(cli.model.policy.transformer.named_parameters())
    lora_b = [n for n in record.start if "lora_B" in n]
    assert lora_b and all(torch.equal(record.start[n], torch.zeros_like(record.start[n])) for n in lora_b)
    moved = torch.cat([(after[n].detach() - record.start[n]).abs().flatten() for n in lora_b])
    assert float(moved.mean()) > 5e-3 and float(moved.max()) <= 0.02003


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"url": "localhost:8000"},
            r"RemoteReward.url='localhost:8000': must start with http:// or https://",
        ),
        ({"url": "http://x", "timeout_s": 0}, r"RemoteReward.timeout_s must be a finite number > 0, got 0"),
        ({"url": "http://x", "max_attempts": 0}, r"RemoteReward.max_attempts must be an integer >= 1, got 0"),
        (
            {"url": "http://x", "image_format": "jpeg"},
            r"RemoteReward.image_format='jpeg': must be 'raw' or 'png'",
        ),
        (
            {"url": "http://x", "token_env": "GUARDRL_UNSET_VARIABLE"},
            r"RemoteReward.token_env='GUARDRL_UNSET_VARIABLE': that environment variable is not set or empty",
        ),
    ],
)
def test_bad_remote_reward_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RemoteReward(**kwargs)
