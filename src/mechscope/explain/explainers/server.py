"""The server explainer: any OpenAI-compatible chat endpoint (``--server URL --model NAME``).

The official ``openai`` client talks to it (``base_url=URL``; llama.cpp's server, vLLM,
Ollama and hosted APIs all speak this protocol). Design:

- One request per sample (``n`` is not supported by every server), sent from a thread pool of
  ``concurrency`` workers across units and samples; the client retries connection errors,
  timeouts and 5xx answers ``retries`` times with backoff, each attempt bounded by ``timeout``.
- Samples after the first use ``temperature`` (the first is greedy, temperature 0), so one
  sample is reproducible and several differ; ``describe`` keeps the best one by score.
- A prompt longer than the server's context (HTTP 400, code ``context_length_exceeded`` or a
  message about the context length) is sent again with half the exemplars, down to one; each
  unit starts from ``MAX_EXEMPLARS`` (no cap learned across units, so a unit's prompt, and its
  greedy description, do not depend on which units came before). Found against llama.cpp's
  server at its default 2,048-token context: 12 windows of a dense unit of the embedded model
  make a 2,034-token prompt (session 18; ``tests/integration/test_llama_server.py``).
- A server that does not answer, refuses the model or the key (401/403/404) or keeps limiting
  the rate (429) raises ``MechscopeError`` (one sentence, exit 2 at the CLI, with the server's
  own message where it gave one). A failure of one unit's request (another error status,
  malformed JSON, no choice, content that is not text or is empty, a prompt that does not fit)
  is that unit's ``UnitFailed``: ``describe`` stores the other units' descriptions, says which
  failed, and a rerun retries them (a sweep found one always-refused unit blocking every run:
  its chunk's 31 good answers were dropped and the units after it never tried). A chunk whose
  every unit fails stops the run (a setup that fails everything). ``describe`` stores each
  chunk as soon as it is done, so an error loses nothing already stored.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mechscope.errors import MechscopeError
from mechscope.explain.explainers.base import (
    MAX_EXEMPLARS,
    SYSTEM_PROMPT,
    Explainer,
    UnitFailed,
    explain_prompt,
    parse_description,
)
from mechscope.explain.types import Exemplar, UnitRecord


class ServerExplainer(Explainer):
    """Descriptions from a chat-completions endpoint, ``concurrency`` requests at a time."""

    name = "server"

    def __init__(self, url: str, model: str, api_key: str | None = None, temperature: float = 0.7,
                 max_tokens: int = 60, timeout: float = 60.0, retries: int = 2, concurrency: int = 8):
        import openai

        if not url.startswith(("http://", "https://")):
            raise MechscopeError(f"--server {url!r} is not an http(s) URL; give e.g. http://127.0.0.1:8080/v1.")
        if not model:
            raise MechscopeError("The server explainer needs --model NAME (the model name the server serves).")
        import math

        if not (math.isfinite(timeout) and timeout > 0):
            raise MechscopeError(f"--timeout must be a positive number of seconds; got {timeout}.")
        if concurrency < 1:
            raise MechscopeError(f"--concurrency must be at least 1 request in flight; got {concurrency}.")
        self.url, self.model, self.temperature, self.max_tokens = url, model, temperature, max_tokens
        self.timeout, self.retries, self.concurrency = timeout, retries, max(1, concurrency)
        self.client = openai.OpenAI(base_url=url, api_key=api_key or "not-needed", timeout=timeout, max_retries=retries)

    @property
    def model_name(self) -> str:
        return self.model

    @property
    def settings(self) -> dict[str, Any]:
        # The URL is where the model runs, not what it writes: left out of the key on purpose.
        return {"model": self.model, "temperature": self.temperature, "max_tokens": self.max_tokens}

    def _ask_unit(self, unit: UnitRecord, train: list[Exemplar], sample: int) -> str:
        """One sample for one unit, with fewer exemplars while the prompt overflows the server's context."""
        n = MAX_EXEMPLARS
        while True:
            try:
                return self._ask(explain_prompt(unit, train, n), sample)
            except _ContextTooLong as e:
                shown = min(n, len(train))
                if shown <= 1:
                    what = f"even 1 exemplar(s) of unit {unit.unit.key}" if shown else f"the prompt of unit {unit.unit.key} even without exemplars"
                    raise UnitFailed(f"The server at {self.url} cannot fit {what} in its context ({e.args[0]}); start it with a larger context.") from None
                n = shown // 2

    def _ask(self, user: str, sample: int) -> str:
        import openai

        try:
            reply = self.client.chat.completions.create(
                model=self.model,
                messages=[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}],
                temperature=0.0 if sample == 0 else self.temperature,
                max_tokens=self.max_tokens,
            )
        except openai.APITimeoutError:
            raise MechscopeError(f"The server at {self.url} did not answer within {self.timeout:g} s ({self.retries} retries); check that it runs, or raise the timeout.") from None
        except openai.APIConnectionError:
            raise MechscopeError(f"Could not connect to the server at {self.url}; check the URL and that the server runs.") from None
        except openai.APIStatusError as exc:
            said = _server_message(exc)
            if exc.status_code == 400 and (getattr(exc, "code", None) == "context_length_exceeded" or _CONTEXT.search(said)):
                raise _ContextTooLong(said) from None
            detail = f" ({said})" if said else ""
            if exc.status_code == 429:
                advice = f"it is limiting the request rate even after {self.retries} retries; lower --concurrency or try again later"
            elif exc.status_code >= 500:
                advice = f"the server failed (after {self.retries} retries); check its log"
            else:
                advice = "check --model and the server's log"
            failed = MechscopeError if exc.status_code in (401, 403, 404, 429) else UnitFailed  # these fail every unit alike
            raise failed(f"The server at {self.url} answered HTTP {exc.status_code} for model {self.model!r}{detail}; {advice}.") from None
        except (openai.APIResponseValidationError, json.JSONDecodeError, ValueError):
            raise UnitFailed(f"The server at {self.url} answered something that is not a chat-completions JSON response; check that it is OpenAI-compatible.") from None
        choices = getattr(reply, "choices", None)
        if not isinstance(choices, list) or not choices or getattr(choices[0], "message", None) is None:
            raise UnitFailed(f"The server at {self.url} answered without any choice; check that it is OpenAI-compatible.")
        content = getattr(choices[0].message, "content", None)
        if content is not None and not isinstance(content, str):
            raise UnitFailed(f"The server at {self.url} answered a message whose content is a {type(content).__name__}, "
                                 "not text; check that it is an OpenAI-compatible chat-completions endpoint.")
        text = parse_description(content)
        if not text:
            raise UnitFailed(f"The server at {self.url} answered with empty content for model {self.model!r}; check the model and max_tokens.")
        return text

    def explain(self, unit: UnitRecord, train: list[Exemplar], n_samples: int = 1) -> list[str]:
        return self.explain_many([(unit, train)], n_samples)[0]

    def explain_each(self, items: list[tuple[UnitRecord, list[Exemplar]]],
                     n_samples: int = 1) -> list[list[str] | UnitFailed]:
        jobs = [(i, s) for i in range(len(items)) for s in range(max(1, n_samples))]
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(jobs) or 1))
        texts: list[str | UnitFailed] = []
        try:
            futures = [pool.submit(self._ask_unit, items[i][0], items[i][1], s) for i, s in jobs]
            for f in futures:
                try:
                    texts.append(f.result())
                except UnitFailed as e:  # this unit's answer only: the others go on
                    texts.append(e)
        finally:  # on an error about the server itself, drop the requests not yet sent instead of waiting for them
            pool.shutdown(wait=True, cancel_futures=True)
        out: list[list[str]] = [[] for _ in items]
        errors: dict[int, UnitFailed] = {}
        for (i, _), text in zip(jobs, texts):
            if isinstance(text, UnitFailed):
                errors.setdefault(i, text)
            elif text not in out[i]:
                out[i].append(text)
        # A unit with at least one sample is described; one whose every sample failed carries the first error.
        return [got if got or i not in errors else errors[i] for i, got in enumerate(out)]

    def close(self) -> None:
        self.client.close()


_CONTEXT = re.compile(r"context (length|window|size)|exceeds? (the )?(available )?context|context_length_exceeded", re.I)
"""What servers say when a prompt does not fit their context (OpenAI, llama.cpp, vLLM wordings)."""


class _ContextTooLong(Exception):
    """The server refused a prompt longer than its context (args[0]: what it said)."""


def _server_message(exc: Exception) -> str:
    """The error message an OpenAI-style error body carries, as one short line ('' if none)."""
    body = getattr(exc, "body", None)
    msg = body.get("message") if isinstance(body, dict) else None
    if msg is None and isinstance(body, dict) and isinstance(body.get("error"), dict):
        msg = body["error"].get("message")
    text = " ".join(str(msg or "").split()).split(". ")[0].rstrip(".")  # its first sentence
    return text[:160]
