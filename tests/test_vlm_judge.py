"""VLMJudgeReward (guardrl/rewards/vlm_judge.py) against a small OpenAI-compatible chat-completions server on
loopback, written here: it records every request and answers with top log-probabilities decided from the
request (the image's brightness or the prompt), so scores can be checked exactly."""

from __future__ import annotations

import base64
import email.utils
import http.server
import io
import json
import math
import socket
import threading
import time
import types

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_fit_args
from guardrl.rewards import RewardError, VLMJudgeReward, vlm_judge
from guardrl.rewards.remote import images_to_uint8
from guardrl.rewards.vlm_judge import MAX_RETRY_AFTER_S, _retry_after_s
from test_reward_server import _RecordTraining

PATH = "/v1/chat/completions"


def completion(top: list[tuple[str, float]]) -> dict:
    """An OpenAI chat completion whose one generated token has these (token, logprob) top
    log-probabilities."""
    entries = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top]
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "model": "judge",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": top[0][0]},
                "logprobs": {"content": [dict(entries[0], top_logprobs=entries)]},
                "finish_reason": "length",
            }
        ],
    }


def ok(top: list[tuple[str, float]], delay: float = 0.0):
    return 200, {}, json.dumps(completion(top)).encode(), delay


def decode_image(body: dict) -> np.ndarray:
    url = body["messages"][0]["content"][0]["image_url"]["url"]
    data = base64.b64decode(url.split(",", 1)[1])
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def question_of(body: dict) -> str:
    return body["messages"][0]["content"][1]["text"]


def by_brightness(number: int, body: dict, headers):
    """P(yes) = 0.9 m, P(no) = 0.9 (1 - m) with m the image's mean 8-bit level / 255: the score is m."""
    m = float(decode_image(body).astype(np.float64).mean()) / 255
    top = [("Maybe", math.log(0.05))]
    if m > 0:
        top.insert(0, ("Yes", math.log(0.9 * m)))
    if m < 1:
        top.insert(1, (" no", math.log(0.9 * (1 - m))))
    return ok(top)


def yes_06_no_02(number: int, body: dict, headers):
    """P(yes) 0.6, P(no) 0.2: the score is 0.75."""
    return ok([("Yes", math.log(0.6)), (" no", math.log(0.2)), ("Maybe", math.log(0.1))])


class JudgeServer:
    """http.server.ThreadingHTTPServer on 127.0.0.1 (port 0) in a thread. `answer(number, body, headers)`
    returns (status, headers, body bytes, seconds to wait before answering); every request is recorded (its
    arrival time, JSON body, headers) and the most requests in flight at once is counted."""

    def __init__(self, answer):
        self.answer = answer
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.finished: list[int] = []
        self.active = 0
        self.max_active = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - the http.server API
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with server.lock:
                    number = len(server.requests)
                    server.requests.append(
                        {"time": time.monotonic(), "body": json.loads(raw), "headers": dict(self.headers)}
                    )
                    server.active += 1
                    server.max_active = max(server.max_active, server.active)
                try:
                    if self.path != PATH:
                        status, extra, payload, delay = 404, {}, b'{"error": "not found"}', 0.0
                    else:
                        status, extra, payload, delay = server.answer(
                            number, server.requests[number]["body"], self.headers
                        )
                    time.sleep(delay)
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    for key, value in extra.items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout)
                    pass
                finally:
                    with server.lock:
                        server.active -= 1
                        server.finished.append(number)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        self.endpoint = self.base_url + "/chat/completions"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def gaps(self) -> list[float]:
        times = [r["time"] for r in self.requests]
        return [b - a for a, b in zip(times, times[1:])]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(answer) -> JudgeServer:
        servers.append(JudgeServer(answer))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture(autouse=True)
def _no_key_in_environment(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def judge(server: JudgeServer, **kwargs) -> VLMJudgeReward:
    kwargs.setdefault("timeout_s", 5.0)
    kwargs.setdefault("retry_delay_s", 0.0)
    return VLMJudgeReward(server.base_url, model="judge", **kwargs)


def constant_images(levels: list[int], size: int = 8) -> torch.Tensor:
    """One image per 8-bit level, every pixel at that level."""
    return torch.tensor(levels, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, size, size) / 255


# ---------------------------------------------------------------- scores


def test_scores_are_p_yes_over_p_yes_plus_no(serve):
    server = serve(yes_06_no_02)
    scores = judge(server)(torch.rand(2, 3, 8, 8), ["a cat", "a dog"])
    # 0.6 / (0.6 + 0.2); "Maybe" counts for neither
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, torch.tensor([0.75, 0.75]), atol=1e-6, rtol=0)
    assert len(server.requests) == 2


def test_scores_come_back_in_input_order_when_answers_finish_out_of_order(serve):
    n = 8

    def answer(number, body, headers):
        # image k (prompt "object k") has level 10k + 5; it is answered after (n - 1 - k) * 50 ms, so the
        # first images finish last. A prompt paired with the wrong image is refused.
        k = int(question_of(body).split("object ")[1].split("?")[0])
        level = int(decode_image(body)[0, 0, 0])
        if level != 10 * k + 5:
            return 400, {}, f"image level {level} sent with prompt 'object {k}'".encode(), 0.0
        status, extra, payload, _ = by_brightness(number, body, headers)
        return status, extra, payload, (n - 1 - k) * 0.05

    server = serve(answer)
    levels = [10 * k + 5 for k in range(n)]
    scores = judge(server, max_concurrency=4)(constant_images(levels), [f"object {k}" for k in range(n)])
    torch.testing.assert_close(scores, torch.tensor(levels, dtype=torch.float32) / 255, atol=1e-6, rtol=0)
    # they did finish out of order: of the first 4 in flight, 3 answered first and 0 last
    finished_prompts = [
        int(question_of(server.requests[i]["body"]).split("object ")[1].split("?")[0])
        for i in server.finished
    ]
    first_four = [finished_prompts.index(k) for k in range(4)]
    assert first_four == sorted(first_four, reverse=True)  # 3 answered before 2, 2 before 1, 1 before 0
    assert sorted(finished_prompts) == list(range(n))


@pytest.mark.parametrize("max_concurrency", [1, 3])
def test_at_most_max_concurrency_requests_are_in_flight(serve, max_concurrency):
    server = serve(lambda number, body, headers: yes_06_no_02(number, body, headers)[:3] + (0.15,))
    scores = judge(server, max_concurrency=max_concurrency)(torch.rand(4, 3, 8, 8), ["a"] * 4)
    torch.testing.assert_close(scores, torch.full((4,), 0.75), atol=1e-6, rtol=0)
    assert len(server.requests) == 4  # more images than max_concurrency, each held 0.15 s by the server
    assert server.max_active == max_concurrency


@pytest.mark.parametrize(
    "kwargs, top, expected",
    [
        # several spellings of yes are summed; tokens are matched stripped and case-insensitively
        ({}, [("Yes", math.log(0.3)), (" yes", math.log(0.3)), ("NO", math.log(0.2)), ("The", -1.0)], 0.75),
        # configured token lists: "no" is not a no_token here, so it counts for neither
        (
            {"yes_tokens": ["ja", "Yes "], "no_tokens": ["nein"]},
            [("Ja", math.log(0.4)), ("yes", math.log(0.2)), (" Nein", math.log(0.2)), ("no", math.log(0.1))],
            0.75,
        ),
        ({}, [("Yes", math.log(0.7)), ("Maybe", math.log(0.2))], 1.0),  # no "no" among the top: 1
        ({}, [("No", math.log(0.7)), ("Maybe", math.log(0.2))], 0.0),
        ({}, [("no", -9999.0), ("yes", -0.5)], 1.0),  # vLLM's -9999 for an impossible token: probability 0
    ],
)
def test_yes_and_no_tokens(serve, kwargs, top, expected):
    server = serve(lambda number, body, headers: ok(top))
    scores = judge(server, **kwargs)(torch.rand(1, 3, 8, 8), ["a cat"])
    torch.testing.assert_close(scores, torch.tensor([expected]), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- the request


def test_the_request_carries_model_image_question_and_sampling_settings(serve):
    server = serve(yes_06_no_02)
    images = torch.rand(1, 3, 12, 10)
    reward = VLMJudgeReward(
        server.base_url + "/",
        model="Qwen/Qwen2.5-VL-7B-Instruct",
        question="Is there {prompt} ({prompt})?",
        top_logprobs=5,
        timeout_s=5,
    )
    assert reward.endpoint == server.endpoint  # the trailing slash dropped, /chat/completions appended
    reward(images, ["a cat"])
    (request,) = server.requests
    body = request["body"]
    assert body["model"] == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert (body["max_tokens"], body["temperature"], body["logprobs"], body["top_logprobs"]) == (
        1,
        0,
        True,
        5,
    )
    (message,) = body["messages"]
    assert message["role"] == "user"
    assert [part["type"] for part in message["content"]] == ["image_url", "text"]
    assert message["content"][1]["text"] == "Is there a cat (a cat)?"
    url = message["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    # the PNG holds exactly the 8-bit image
    np.testing.assert_array_equal(decode_image(body), images_to_uint8(images)[0])
    assert request["headers"]["Content-Type"] == "application/json"
    assert "Authorization" not in request["headers"]


def test_the_default_question_and_a_full_endpoint_url(serve):
    server = serve(yes_06_no_02)
    reward = VLMJudgeReward(server.endpoint, model="judge", timeout_s=5)
    assert reward.endpoint == server.endpoint  # a URL already ending in /chat/completions is kept
    reward(torch.rand(1, 3, 8, 8), ["a red circle"])
    assert question_of(server.requests[0]["body"]) == "Does this image show a red circle? Answer yes or no."


def test_jpeg_images(serve):
    server = serve(yes_06_no_02)
    images = constant_images([200, 40], size=16)
    # one request at a time: server.requests is in arrival order, compared with the images' order below
    judge(server, image_format="jpeg", max_concurrency=1)(images, ["a", "b"])
    for request, level in zip(server.requests, [200, 40]):
        url = request["body"]["messages"][0]["content"][0]["image_url"]["url"]
        assert url.startswith("data:image/jpeg;base64,")
        with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as image:
            assert image.format == "JPEG" and image.size == (16, 16)
        assert np.abs(decode_image(request["body"]).astype(int) - level).max() <= 2


def test_the_api_key_is_sent_from_the_option_or_the_environment_and_never_shown(serve, monkeypatch):
    server = serve(yes_06_no_02)
    images, prompts = torch.rand(1, 3, 8, 8), ["a"]
    with_key = judge(server, api_key="sk-option-123")
    with_key(images, prompts)
    assert "sk-option-123" not in repr(with_key) and "api_key=set" in repr(with_key)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env-456")
    judge(server)(images, prompts)
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-mine-789")
    judge(server, api_key_env="MY_JUDGE_KEY")(images, prompts)
    judge(server, api_key_env=None)(images, prompts)  # OPENAI_API_KEY is set but not read
    assert [r["headers"].get("Authorization") for r in server.requests] == [
        "Bearer sk-option-123",
        "Bearer sk-env-456",
        "Bearer sk-mine-789",
        None,
    ]


# ---------------------------------------------------------------- failures


def test_a_timeout_is_retried_as_asked_then_names_the_endpoint_and_timeout(serve):
    server = serve(lambda number, body, headers: yes_06_no_02(number, body, headers)[:3] + (0.6,))
    reward = judge(server, timeout_s=0.2, max_retries=2, retry_delay_s=0.01)
    start = time.monotonic()
    with pytest.raises(RewardError) as caught:
        reward(torch.rand(1, 3, 8, 8), ["a cat"])
    elapsed = time.monotonic() - start
    assert str(caught.value) == (
        f"VLM judge {server.endpoint} (model 'judge'), image 0 (prompt 'a cat'): failed 3 time(s) "
        "(max_retries=2, timeout_s=0.2); attempt 1: no answer within timeout_s=0.2 s; attempt 2: no answer "
        "within timeout_s=0.2 s; attempt 3: no answer within timeout_s=0.2 s"
    )
    assert len(server.requests) == 3  # 1 + max_retries
    assert elapsed >= 0.6  # each attempt waited its 0.2 s


def test_a_refused_connection_is_retried_then_reported():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    reward = VLMJudgeReward(f"http://127.0.0.1:{port}/v1", model="judge", max_retries=1, retry_delay_s=0.0)
    with pytest.raises(
        RewardError,
        match=rf"VLM judge http://127.0.0.1:{port}/v1/chat/completions \(model 'judge'\), "
        r"image 0 \(prompt 'a'\): "
        r"failed 2 time\(s\) \(max_retries=1, timeout_s=60.0\); attempt 1: ConnectionError: .*; "
        r"attempt 2: ConnectionError: ",
    ):
        reward(torch.rand(1, 3, 8, 8), ["a"])


def sleep_spy(monkeypatch) -> list[float]:
    """The seconds VLMJudgeReward sleeps between attempts (it still sleeps them)."""
    slept: list[float] = []

    def sleep(seconds):
        slept.append(seconds)
        time.sleep(seconds)

    monkeypatch.setattr(vlm_judge, "time", types.SimpleNamespace(sleep=sleep, time=time.time))
    return slept


def test_503_then_success_is_retried_with_doubling_delays(serve, monkeypatch):
    def answer(number, body, headers):
        if number < 3:
            return 503, {}, b"model loading", 0.0
        return yes_06_no_02(number, body, headers)

    server = serve(answer)
    slept = sleep_spy(monkeypatch)
    scores = judge(server, max_retries=3, retry_delay_s=0.05)(torch.rand(1, 3, 8, 8), ["a"])
    torch.testing.assert_close(scores, torch.tensor([0.75]), atol=1e-6, rtol=0)
    assert len(server.requests) == 4
    assert slept == [0.05, 0.1, 0.2]
    assert all(gap >= delay for gap, delay in zip(server.gaps(), slept))


def test_429_honours_retry_after(serve, monkeypatch):
    def answer(number, body, headers):
        if number == 0:
            return 429, {"Retry-After": "0.3"}, b"slow down", 0.0
        return yes_06_no_02(number, body, headers)

    server = serve(answer)
    slept = sleep_spy(monkeypatch)
    scores = judge(server, max_retries=1, retry_delay_s=0.0)(torch.rand(1, 3, 8, 8), ["a"])
    torch.testing.assert_close(scores, torch.tensor([0.75]), atol=1e-6, rtol=0)
    assert slept == [0.3]  # the server's 0.3 s, not retry_delay_s=0
    (gap,) = server.gaps()
    assert gap >= 0.3


def test_retry_after_values():
    assert _retry_after_s(None) is None and _retry_after_s("") is None and _retry_after_s("soon") is None
    assert _retry_after_s("2") == 2.0 and _retry_after_s("0.5") == 0.5 and _retry_after_s("-3") == 0.0
    assert _retry_after_s("86400") == MAX_RETRY_AFTER_S == 60.0
    in_5_s = email.utils.formatdate(time.time() + 5, usegmt=True)  # an HTTP date (second resolution)
    assert 3.5 <= _retry_after_s(in_5_s) <= 5.5


def test_server_errors_that_persist_are_reported_with_their_bodies(serve):
    server = serve(lambda number, body, headers: (503, {}, b"overloaded", 0.0))
    with pytest.raises(RewardError) as caught:
        judge(server, max_retries=1)(torch.rand(1, 3, 8, 8), ["a"])
    assert str(caught.value).endswith(
        "failed 2 time(s) (max_retries=1, timeout_s=5.0); attempt 1: HTTP 503: 'overloaded'; "
        "attempt 2: HTTP 503: 'overloaded'"
    )
    assert len(server.requests) == 2


def test_a_400_is_not_retried_and_its_body_is_shown(serve):
    body = b'{"error": {"message": "The model `judg` does not exist.", "code": 404}}'
    server = serve(lambda number, request, headers: (400, {}, body, 0.0))
    with pytest.raises(RewardError) as caught:
        judge(server, max_retries=3, retry_delay_s=5.0)(torch.rand(1, 3, 8, 8), ["a cat"])
    assert str(caught.value) == (
        f"VLM judge {server.endpoint} (model 'judge'), image 0 (prompt 'a cat'): the server refused the "
        f"request (HTTP 400), not retried: {body.decode()!r}"
    )
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    "kwargs, hint",
    [
        ({}, "(no API key was sent: api_key is unset and so is $OPENAI_API_KEY)"),
        ({"api_key": "sk-wrong"}, "(an API key was sent; is it the server's?)"),
    ],
)
def test_a_401_says_whether_a_key_was_sent(serve, kwargs, hint):
    server = serve(lambda number, body, headers: (401, {}, b"unauthorized", 0.0))
    with pytest.raises(RewardError) as caught:
        judge(server, **kwargs)(torch.rand(1, 3, 8, 8), ["a"])
    assert str(caught.value).endswith(f"(HTTP 401), not retried: 'unauthorized' {hint}")
    assert "sk-wrong" not in str(caught.value)


@pytest.mark.parametrize(
    "payload, message",
    [
        (
            b"<html>Bad Gateway</html>",
            r"image 0 \(prompt 'a cat'\): the answer is not JSON: '<html>Bad Gateway</html>'$",
        ),
        (
            json.dumps({"choices": [{"message": {"content": "Yes"}, "logprobs": None}]}).encode(),
            r"image 0 \(prompt 'a cat'\): the answer has no "
            r"choices\[0\]\.logprobs\.content\[0\]\.top_logprobs "
            r"\(does the server return logprobs\? vLLM needs --max-logprobs >= 20\): '\{\"choices\"",
        ),
        (
            json.dumps(completion([("Maybe", math.log(0.5)), ("The", math.log(0.2))])).encode(),
            r"image 0 \(prompt 'a cat'\): neither yes_tokens \['yes'\] nor no_tokens \['no'\] among the "
            r"first answer token's 2 top log-probabilities \[\('Maybe', -0\.693\), \('The', -1\.609\)\]; "
            r"check the question and the model \(on_missing: nan scores such answers NaN",
        ),
        (
            json.dumps(completion([("Yes", "high")])).encode(),
            r"image 0 \(prompt 'a cat'\): a malformed top_logprobs entry \{'token': 'Yes', 'logprob': 'high'",
        ),
        (
            json.dumps(completion([("Yes", 0.5)])).encode(),
            r"image 0 \(prompt 'a cat'\): a log-probability above 0 in \{'token': 'Yes', 'logprob': 0\.5",
        ),
    ],
    ids=["not-json", "no-logprobs", "neither-yes-nor-no", "logprob-not-a-number", "logprob-above-0"],
)
def test_garbage_answers_are_clear_errors_never_scores(serve, payload, message):
    server = serve(lambda number, body, headers: (200, {}, payload, 0.0))
    with pytest.raises(RewardError, match=rf"^VLM judge {server.endpoint} \(model 'judge'\), {message}"):
        judge(server, max_retries=2)(torch.rand(1, 3, 8, 8), ["a cat"])
    assert len(server.requests) == 1  # an answer at temperature 0 is not retried: it would come back the same


def test_on_missing_nan_scores_unanswered_images_nan(serve):
    def answer(number, body, headers):
        if "blurry" in question_of(body):
            return ok([("Maybe", math.log(0.5)), ("The", math.log(0.2))])
        return yes_06_no_02(number, body, headers)

    server = serve(answer)
    scores = judge(server, on_missing="nan")(torch.rand(3, 3, 8, 8), ["a cat", "something blurry", "a dog"])
    assert scores[1].isnan()
    torch.testing.assert_close(scores[[0, 2]], torch.tensor([0.75, 0.75]), atol=1e-6, rtol=0)


def test_on_missing_nan_does_not_hide_a_server_without_logprobs(serve):
    payload = json.dumps({"choices": [{"message": {"content": "Yes"}}]}).encode()
    server = serve(lambda number, body, headers: (200, {}, payload, 0.0))
    with pytest.raises(RewardError, match=r"the answer has no choices\[0\]\.logprobs"):
        judge(server, on_missing="nan")(torch.rand(1, 3, 8, 8), ["a"])


# ---------------------------------------------------------------- options


def _option(option: str, value: str, allowed: str) -> str:
    return (
        f"reward 'vlm_judge': {option} (model.rewards[...].init_args.{option}) must be {allowed}, got {value}"
    )


GOOD = {"base_url": "http://127.0.0.1:8000/v1", "model": "judge"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"base_url": "127.0.0.1:8000/v1"},
            _option(
                "base_url", "'127.0.0.1:8000/v1'", "an http:// or https:// URL, e.g. http://127.0.0.1:8000/v1"
            ),
        ),
        (
            {"base_url": "http:///v1"},
            _option(
                "base_url",
                "'http:///v1'",
                "an http:// or https:// URL with a host, e.g. http://127.0.0.1:8000/v1",
            ),
        ),
        (
            {"model": ""},
            _option(
                "model", "''", "the served model's name, a non-empty string (vLLM: its --served-model-name)"
            ),
        ),
        (
            {"question": "Does this image show the prompt?"},
            _option(
                "question",
                "'Does this image show the prompt?'",
                "a string holding {prompt}, where each image's prompt goes",
            ),
        ),
        ({"yes_tokens": "yes"}, _option("yes_tokens", "'yes'", 'a non-empty list of strings, e.g. ["yes"]')),
        (
            {"no_tokens": []},
            _option("no_tokens", "[]", 'a non-empty list of non-blank strings, e.g. ["yes"]'),
        ),
        (
            {"no_tokens": [" "]},
            _option("no_tokens", "[' ']", 'a non-empty list of non-blank strings, e.g. ["yes"]'),
        ),
        (
            {"yes_tokens": ["yes", "ok"], "no_tokens": ["no", "OK"]},
            _option(
                "no_tokens",
                "['no', 'OK']",
                "tokens not among yes_tokens ['yes', 'ok'] (compared stripped and lower-cased)",
            ),
        ),
        ({"top_logprobs": 0}, _option("top_logprobs", "0", "an integer in [1, 20] (the OpenAI API's limit)")),
        (
            {"top_logprobs": 21},
            _option("top_logprobs", "21", "an integer in [1, 20] (the OpenAI API's limit)"),
        ),
        ({"timeout_s": 0}, _option("timeout_s", "0", "a finite number of seconds > 0")),
        ({"timeout_s": float("inf")}, _option("timeout_s", "inf", "a finite number of seconds > 0")),
        ({"max_retries": -1}, _option("max_retries", "-1", "an integer >= 0")),
        ({"max_retries": 1.5}, _option("max_retries", "1.5", "an integer >= 0")),
        ({"retry_delay_s": -1}, _option("retry_delay_s", "-1", "a finite number of seconds >= 0")),
        ({"max_concurrency": 0}, _option("max_concurrency", "0", "an integer >= 1")),
        ({"image_format": "webp"}, _option("image_format", "'webp'", "'png' or 'jpeg'")),
        ({"on_missing": "zero"}, _option("on_missing", "'zero'", "'error' or 'nan'")),
        ({"api_key_env": ""}, _option("api_key_env", "''", "an environment variable's name or null")),
        (
            {"api_key": 12345678},
            "reward 'vlm_judge': api_key (model.rewards[...].init_args.api_key) must be a non-empty string "
            "or null, got a int",
        ),
        (
            {"weight": float("nan")},
            "reward 'vlm_judge': weight (model.rewards[...].init_args.weight) must be a finite number, "
            "got nan",
        ),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError) as caught:
        VLMJudgeReward(**{**GOOD, **kwargs})
    assert str(caught.value) == message
    assert "12345678" not in str(caught.value)


def test_the_name_in_messages_follows_the_name_option():
    with pytest.raises(ValueError, match=r"^reward 'qwen_judge': timeout_s \(model.rewards\[...\]"):
        VLMJudgeReward(**GOOD, timeout_s=-1, name="qwen_judge")


# ---------------------------------------------------------------- in a run


def test_a_tiny_run_trains_on_the_judge_scores(serve, tmp_path, prompt_file):
    from guardrl.cli import main

    server = serve(by_brightness)
    rewards = json.dumps(
        [
            {
                "class_path": "guardrl.rewards.VLMJudgeReward",
                "init_args": {"base_url": server.base_url, "model": "tiny-judge", "max_concurrency": 2},
            }
        ]
    )
    args = tiny_fit_args(
        prompt_file, str(tmp_path / "runs"), **{"--model.rewards": rewards, "--model.max_iterations": "1"}
    )
    cli = main(args, run=False)
    record = _RecordTraining()
    cli.trainer.callbacks.append(record)
    cli.trainer.fit(cli.model, cli.datamodule)
    (outputs,) = record.outputs
    # one request per image (2 prompts x 2 samples), each with its own prompt in the question
    assert len(server.requests) == 4
    assert sorted(question_of(r["body"]) for r in server.requests) == sorted(
        f"Does this image show {p}? Answer yes or no." for p in outputs["prompts"]
    )
    assert {r["body"]["model"] for r in server.requests} == {"tiny-judge"}
    # the server scored each image's mean 8-bit level / 255, and those are the iteration's rewards
    expected = torch.from_numpy(
        images_to_uint8(outputs["images"]).astype(np.float64).mean(axis=(1, 2, 3)) / 255
    )
    torch.testing.assert_close(outputs["rewards"].double(), expected, atol=1e-6, rtol=0)
    assert float(cli.trainer.callback_metrics["reward/vlm_judge/mean"]) == pytest.approx(
        float(expected.mean()), abs=1e-6
    )
    assert cli.trainer.global_step == 2
