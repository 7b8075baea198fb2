"""VLMJudgeReward: a vision-language model asked a yes/no question about each image, over an OpenAI-compatible
chat-completions endpoint (vLLM, SGLang, llama.cpp server, LM Studio), scored P(yes) / (P(yes) + P(no)) from
the first generated token's top log-probabilities: the yes/no judge of VLM rewards such as Flow-Factory's
`vllm_evaluate` and UnifiedReward (not compared against their code). See docs/rewards.md, "VLM judge"."""

from __future__ import annotations

import base64
import concurrent.futures
import email.utils
import io
import json
import math
import os
import time
from typing import Any, NoReturn, Optional, Sequence
from urllib.parse import urlsplit

import torch

from guardrl.rewards.base import Reward
from guardrl.rewards.calling import RewardError
from guardrl.rewards.remote import images_to_uint8

DEFAULT_QUESTION = "Does this image show {prompt}? Answer yes or no."
# A Retry-After longer than this is cut to it: a server asking for an hour would stall the run silently.
MAX_RETRY_AFTER_S = 60.0
_IMAGE_FORMATS = {"png": "PNG", "jpeg": "JPEG"}


class VLMJudgeReward(Reward):
    """Asks a served VLM `question` (with the image's prompt substituted) about each image and scores the
    first answer token: P(yes) / (P(yes) + P(no)), in [0, 1], where P(yes) sums the probabilities of the top
    log-probabilities whose token, stripped of white space and lower-cased, is one of `yes_tokens` (P(no)
    likewise). An answer with neither among its top log-probabilities is an error (`on_missing: error`,
    default) or NaN (`on_missing: nan`: the run leaves that image's prompt group out of the update).

    One request per image, at most `max_concurrency` in flight; each bounded by `timeout_s` and retried
    `max_retries` times on connection errors, timeouts, HTTP 429 and 5xx (doubling `retry_delay_s`, or the
    server's Retry-After). Any other HTTP error (4xx) or a malformed answer fails at once with a RewardError
    naming the endpoint, the image, its prompt and what came back.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: Optional[str] = None,
        api_key_env: Optional[str] = "OPENAI_API_KEY",
        question: str = DEFAULT_QUESTION,
        yes_tokens: Sequence[str] = ("yes",),
        no_tokens: Sequence[str] = ("no",),
        top_logprobs: int = 20,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        retry_delay_s: float = 1.0,
        max_concurrency: int = 8,
        image_format: str = "png",
        on_missing: str = "error",
        weight: float = 1.0,
        name: Optional[str] = "vlm_judge",
    ) -> None:
        super().__init__(weight=weight, name=name)
        bad = self._bad_option
        if not (isinstance(base_url, str) and base_url.startswith(("http://", "https://"))):
            bad("base_url", base_url, "an http:// or https:// URL, e.g. http://127.0.0.1:8000/v1")
        if not urlsplit(base_url).netloc:
            bad("base_url", base_url, "an http:// or https:// URL with a host, e.g. http://127.0.0.1:8000/v1")
        if not (isinstance(model, str) and model.strip()):
            bad("model", model, "the served model's name, a non-empty string (vLLM: its --served-model-name)")
        if api_key is not None and not (isinstance(api_key, str) and api_key):
            # The value itself is never shown: it may be a real key of the wrong type.
            raise ValueError(
                f"reward {self.name!r}: api_key (model.rewards[...].init_args.api_key) must be a non-empty "
                f"string or null, got a {type(api_key).__name__}"
            )
        if api_key_env is not None and not (isinstance(api_key_env, str) and api_key_env):
            bad("api_key_env", api_key_env, "an environment variable's name or null")
        if not (isinstance(question, str) and "{prompt}" in question):
            bad("question", question, "a string holding {prompt}, where each image's prompt goes")
        self.yes_tokens = self._token_list("yes_tokens", yes_tokens)
        self.no_tokens = self._token_list("no_tokens", no_tokens)
        if set(self.yes_tokens) & set(self.no_tokens):
            bad(
                "no_tokens",
                list(no_tokens),
                f"tokens not among yes_tokens {list(yes_tokens)!r} (compared stripped and lower-cased)",
            )
        if not (_is_int(top_logprobs) and 1 <= top_logprobs <= 20):
            bad("top_logprobs", top_logprobs, "an integer in [1, 20] (the OpenAI API's limit)")
        if not (_is_number(timeout_s) and math.isfinite(timeout_s) and timeout_s > 0):
            bad("timeout_s", timeout_s, "a finite number of seconds > 0")
        if not (_is_int(max_retries) and max_retries >= 0):
            bad("max_retries", max_retries, "an integer >= 0")
        if not (_is_number(retry_delay_s) and math.isfinite(retry_delay_s) and retry_delay_s >= 0):
            bad("retry_delay_s", retry_delay_s, "a finite number of seconds >= 0")
        if not (_is_int(max_concurrency) and max_concurrency >= 1):
            bad("max_concurrency", max_concurrency, "an integer >= 1")
        if image_format not in _IMAGE_FORMATS:
            bad("image_format", image_format, "'png' or 'jpeg'")
        if on_missing not in ("error", "nan"):
            bad("on_missing", on_missing, "'error' or 'nan'")
        base = base_url.rstrip("/")
        self.endpoint = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.model = model
        self.question = question
        self.top_logprobs = top_logprobs
        self.timeout_s = float(timeout_s)
        self.max_retries = max_retries
        self.retry_delay_s = float(retry_delay_s)
        self.max_concurrency = max_concurrency
        self.image_format = image_format
        self.on_missing = on_missing
        self.api_key_env = api_key_env
        # Kept out of every message, repr and log.
        self._api_key = api_key or (os.environ.get(api_key_env) or None if api_key_env else None)

    # ------------------------------------------------------------ options

    def _bad_option(self, option: str, value: Any, allowed: str) -> NoReturn:
        raise ValueError(
            f"reward {self.name!r}: {option} (model.rewards[...].init_args.{option}) must be {allowed}, "
            f"got {value!r}"
        )

    def _token_list(self, option: str, tokens: Any) -> tuple[str, ...]:
        if isinstance(tokens, str) or not isinstance(tokens, (list, tuple)):
            self._bad_option(option, tokens, 'a non-empty list of strings, e.g. ["yes"]')
        normalised = tuple(t.strip().lower() if isinstance(t, str) else t for t in tokens)
        if not normalised or not all(isinstance(t, str) and t for t in normalised):
            self._bad_option(option, tokens, 'a non-empty list of non-blank strings, e.g. ["yes"]')
        return normalised

    def extra_repr(self) -> str:
        return f"endpoint={self.endpoint!r}, model={self.model!r}, api_key={'set' if self._api_key else None}"

    # ------------------------------------------------------------ scoring

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        arrays = images_to_uint8(images)
        workers = min(self.max_concurrency, len(prompts)) or 1
        executor = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vlm-judge")
        futures = [
            executor.submit(self._score_one, index, array, prompt)
            for index, (array, prompt) in enumerate(zip(arrays, prompts))
        ]
        try:
            scores = [future.result() for future in futures]  # input order, whatever order they finish in
        except BaseException:
            # Fail fast: requests not started are dropped; those in flight end within their timeout.
            executor.shutdown(wait=False, cancel_futures=True)
            raise
        executor.shutdown(wait=True)
        return torch.tensor(scores, dtype=torch.float32, device=images.device)

    def _score_one(self, index: int, array, prompt: str) -> float:
        question = self.question.replace("{prompt}", prompt)
        body = {
            "model": self.model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": self._data_url(array)}},
                        {"type": "text", "text": question},
                    ],
                }
            ],
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": self.top_logprobs,
        }
        where = f"VLM judge {self.endpoint} (model {self.model!r}), image {index} (prompt {_short(prompt)})"
        text = self._post(body, where)
        return self._parse(text, where)

    def _data_url(self, array) -> str:
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format=_IMAGE_FORMATS[self.image_format], quality=95)
        return f"data:image/{self.image_format};base64," + base64.b64encode(buffer.getvalue()).decode()

    def _post(self, body: dict, where: str) -> str:
        """The response text of a 2xx answer, after retries; RewardError otherwise."""
        import requests

        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        data = json.dumps(body).encode()
        errors: list[str] = []
        delay = self.retry_delay_s
        attempts = self.max_retries + 1
        for attempt in range(1, attempts + 1):
            wait = delay
            try:
                response = requests.post(self.endpoint, data=data, headers=headers, timeout=self.timeout_s)
            except requests.Timeout:
                errors.append(f"attempt {attempt}: no answer within timeout_s={self.timeout_s} s")
            except requests.RequestException as error:  # connection refused or reset, DNS...
                errors.append(f"attempt {attempt}: {type(error).__name__}: {_short(str(error), 300)}")
            else:
                status = response.status_code
                if status < 400:
                    return response.text
                if status != 429 and status < 500:
                    # The request itself is wrong (a bad model name, an image the server refuses, no key):
                    # retrying cannot help.
                    raise RewardError(
                        f"{where}: the server refused the request (HTTP {status}), not retried: "
                        f"{_short(response.text, 500)}{self._key_hint(status)}"
                    )
                errors.append(f"attempt {attempt}: HTTP {status}: {_short(response.text, 300)}")
                retry_after = _retry_after_s(response.headers.get("Retry-After"))
                if retry_after is not None:
                    wait = retry_after
            if attempt < attempts:
                time.sleep(wait)
                delay *= 2
        raise RewardError(
            f"{where}: failed {attempts} time(s) (max_retries={self.max_retries}, "
            f"timeout_s={self.timeout_s}); " + "; ".join(errors)
        )

    def _key_hint(self, status: int) -> str:
        if status not in (401, 403):
            return ""
        if self._api_key:
            return " (an API key was sent; is it the server's?)"
        return (
            f" (no API key was sent: api_key is unset and so is ${self.api_key_env})"
            if self.api_key_env
            else " (no API key was sent: api_key and api_key_env are unset)"
        )

    def _parse(self, text: str, where: str) -> float:
        try:
            payload = json.loads(text)
        except ValueError:
            raise RewardError(f"{where}: the answer is not JSON: {_short(text, 300)}") from None
        try:
            top = payload["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            if not isinstance(top, list) or not top:
                raise TypeError
        except (KeyError, IndexError, TypeError):
            raise RewardError(
                f"{where}: the answer has no choices[0].logprobs.content[0].top_logprobs (does the server "
                f"return logprobs? vLLM needs --max-logprobs >= {self.top_logprobs}): "
                f"{_short(text, 300)}"
            ) from None
        p_yes = p_no = 0.0
        for entry in top:
            token = entry.get("token") if isinstance(entry, dict) else None
            value = entry.get("logprob") if isinstance(entry, dict) else None
            if not (
                isinstance(token, str)
                and isinstance(value, (int, float))
                and not isinstance(value, bool)
                and not math.isnan(value)
            ):
                raise RewardError(f"{where}: a malformed top_logprobs entry {_cut(repr(entry), 200)}")
            logprob = float(value)
            if logprob > 1e-3:
                raise RewardError(f"{where}: a log-probability above 0 in {_cut(repr(entry), 200)}")
            key = token.strip().lower()
            if key in self.yes_tokens:
                p_yes += math.exp(logprob)
            elif key in self.no_tokens:
                p_no += math.exp(logprob)
        if p_yes + p_no > 0:
            return min(max(p_yes / (p_yes + p_no), 0.0), 1.0)
        if self.on_missing == "nan":
            return math.nan
        answered = [(e["token"], round(float(e["logprob"]), 3)) for e in top]
        raise RewardError(
            f"{where}: neither yes_tokens {list(self.yes_tokens)!r} nor no_tokens {list(self.no_tokens)!r} "
            f"among the first answer token's {len(top)} top log-probabilities {_cut(repr(answered), 400)}; "
            "check the question and the model (on_missing: nan scores such answers NaN and the run drops "
            "their prompt group)"
        )


def _retry_after_s(value: Optional[str]) -> Optional[float]:
    """Retry-After in seconds (a number or an HTTP date), capped at MAX_RETRY_AFTER_S; None when absent or
    unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _short(text: str, limit: int = 100) -> str:
    return repr(_cut(text, limit))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
