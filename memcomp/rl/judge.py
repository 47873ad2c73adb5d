"""A generative-judge reward through any OpenAI-compatible chat-completions endpoint (seed 002, section 3.3.3,
equation 3: R(y, a*) = 1[Judge(y, a*) = correct]; the paper judged with Qwen3-32B for the 7B policy and
Qwen2.5-72B-Instruct for the 32B one, Appendix I.3).

The judge prompt lives in one place (``JUDGE_SYSTEM_PROMPT`` / ``JUDGE_USER_TEMPLATE``): question, gold answers
and response in, one word out -- "yes" or "no". Anything else is not a verdict.

Transport is the official ``openai`` client (``pip install 'memcomp[rl]'``): a per-request time-out, and retries
of connection errors, time-outs and HTTP 408 / 409 / 429 / 5xx with exponential backoff (0.5 s doubling to 8 s,
with jitter; a server's Retry-After is honoured) -- the client's own, well-tested logic rather than a
hand-written loop. On top of that, a reply that is not a verdict is asked again (``verdict_retries`` times).
When all of that fails the judge raises ``JudgeError``: a batch never silently scores 0.

Verdicts are cached in memory and, with ``cache_path``, in an SQLite file (safe across processes and crashes:
each batch's new verdicts are committed in one transaction), keyed by SHA-256 of (model, rendered messages): a
new template or judge model never reuses old verdicts. Only verdicts are cached, never failures. A batch's
distinct uncached prompts are sent concurrently (``concurrency`` threads).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional

from memcomp.rl.rewards import validate_gold_answers

JUDGE_SYSTEM_PROMPT = "You are a strict grader of answers to questions. You reply with one word: yes or no."
JUDGE_USER_TEMPLATE = """Decide whether the response answers the question correctly.

Question: {question}

Reference answer(s), any one of which is correct: {gold_answers}

Response: {response}

The response may reason before giving its final answer; grade only the final answer (the one in \\boxed{{}} if there \
is one). It is correct if it means the same as a reference answer (a different wording, spelling, unit or level \
of detail that does not change the meaning is fine); it is wrong if it is missing, names something else, hedges \
between several answers or contradicts a reference answer.

Is the final answer correct? Reply with exactly one word: yes or no."""

# A verdict, strictly: one word, optionally wrapped in quotes / markdown bold and followed by a full stop.
_VERDICT = re.compile(r"""^[\s"'`*]*(yes|no)[\s.!"'`*]*$""", re.IGNORECASE)


class JudgeError(RuntimeError):
    """The judge could not give verdicts: endpoint down, timed out, HTTP errors after retries, or replies that are
    not verdicts."""


@dataclass(frozen=True)
class JudgeItem:
    """One response to judge: the ``question``, its ``gold_answers`` (at least one), the model's ``response``."""

    question: str
    gold_answers: Sequence[str]
    response: str


@dataclass(frozen=True)
class JudgeConfig:
    """Where and how to ask.

    ``base_url``: the endpoint's API root (``http://host:8000/v1`` for ``vllm serve``); ``model``: the served
    model name; ``api_key_env``: the environment variable holding the key (unset: "EMPTY", which servers started
    without ``--api-key`` accept); ``timeout_s``: per HTTP request; ``max_retries``: transport retries per
    request (the ``openai`` client's); ``verdict_retries``: re-asks after a reply that is not a verdict;
    ``concurrency``: requests in flight per batch; ``temperature`` / ``max_tokens``: the judge's decoding (a
    one-word verdict; raise ``max_tokens`` for a judge that thinks first -- a ``<think>...</think>`` block before
    the verdict is skipped -- or turn thinking off, for Qwen3 on vLLM with ``extra_body={"chat_template_kwargs":
    {"enable_thinking": False}}``); ``extra_body``: extra JSON fields of each request; ``cache_path``: an SQLite
    file for verdicts across runs (None: in memory only).

    Raises ``ValueError`` for an empty URL or model, or out-of-range numbers."""

    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 60.0
    max_retries: int = 3
    verdict_retries: int = 2
    concurrency: int = 16
    temperature: float = 0.0
    max_tokens: int = 16
    extra_body: Optional[Mapping[str, Any]] = field(default=None, hash=False)
    cache_path: Optional[str] = None

    def __post_init__(self) -> None:
        if not isinstance(self.base_url, str) or not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"JudgeConfig: base_url must be an http(s) URL, got {self.base_url!r}")
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("JudgeConfig: model (the served model name) is required")
        if not self.timeout_s > 0:
            raise ValueError(f"JudgeConfig: timeout_s must be > 0, got {self.timeout_s}")
        for name in ("max_retries", "verdict_retries"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"JudgeConfig: {name} must be an int >= 0, got {v!r}")
        for name in ("concurrency", "max_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"JudgeConfig: {name} must be an int >= 1, got {v!r}")
        if self.temperature < 0:
            raise ValueError(f"JudgeConfig: temperature must be >= 0, got {self.temperature}")


def render_messages(question: str, gold_answers: Sequence[str], response: str) -> list[dict[str, str]]:
    """The chat messages sent for one item (the one place the judge prompt is filled in). Raises what
    ``validate_gold_answers`` raises, and ``TypeError`` for a non-str question or response."""
    validate_gold_answers(gold_answers)
    for name, v in (("question", question), ("response", response)):
        if not isinstance(v, str):
            raise TypeError(f"judge: the {name} must be a str, got {type(v).__name__}")
    golds = "; ".join(json.dumps(a, ensure_ascii=False) for a in gold_answers)
    user = JUDGE_USER_TEMPLATE.format(question=question, gold_answers=golds, response=response)
    return [{"role": "system", "content": JUDGE_SYSTEM_PROMPT}, {"role": "user", "content": user}]


def parse_verdict(reply: Optional[str]) -> Optional[bool]:
    """True for "yes", False for "no" (case-insensitive; quotes, markdown bold and a final full stop allowed; a
    leading ``<think>...</think>`` block skipped), None for anything else -- "Yes, because ...", "maybe", "" or no
    content at all."""
    if not isinstance(reply, str):
        return None
    if "</think>" in reply:
        reply = reply.rsplit("</think>", 1)[1]
    m = _VERDICT.match(reply)
    return None if m is None else m.group(1).lower() == "yes"


class _VerdictCache:
    """In-memory dict in front of an optional SQLite table ``verdicts(key TEXT PRIMARY KEY, verdict INTEGER)``."""

    def __init__(self, path: Optional[str]) -> None:
        self._mem: dict[str, bool] = {}
        self._lock = threading.Lock()
        self._db: Optional[sqlite3.Connection] = None
        if path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            try:
                self._db = sqlite3.connect(path, timeout=30.0, check_same_thread=False)
                with self._db:
                    self._db.execute("CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, verdict INTEGER)")
            except sqlite3.DatabaseError as exc:
                raise ValueError(f"judge cache {path} is not a usable SQLite file ({exc}); delete it or choose "
                                 "another cache_path") from exc

    def get_many(self, keys: Sequence[str]) -> dict[str, bool]:
        with self._lock:
            found = {k: self._mem[k] for k in keys if k in self._mem}
            missing = [k for k in keys if k not in found]
            if self._db is not None and missing:
                for s in range(0, len(missing), 500):  # SQLite's bound-parameter limit
                    part = missing[s:s + 500]
                    rows = self._db.execute(f"SELECT key, verdict FROM verdicts WHERE key IN "
                                            f"({','.join('?' * len(part))})", part).fetchall()
                    for k, v in rows:
                        found[k] = self._mem[k] = bool(v)
            return found

    def put_many(self, verdicts: Mapping[str, bool]) -> None:
        if not verdicts:
            return
        with self._lock:
            self._mem.update(verdicts)
            if self._db is not None:
                with self._db:  # one transaction: all of the batch's verdicts or none
                    self._db.executemany("INSERT OR REPLACE INTO verdicts (key, verdict) VALUES (?, ?)",
                                         [(k, int(v)) for k, v in verdicts.items()])

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


class GenerativeJudge:
    """Binary rewards from a judge model behind an OpenAI-compatible endpoint.

    ``judge(question, gold_answers, response)`` -> 1.0 / 0.0; ``judge_batch(items)`` -> one per item, in order.
    ``requests_sent`` counts chat requests this object made (a re-ask counts; the client's transport retries do
    not), ``cache_hits`` the items answered from the cache. Use as a context manager, or call ``close()``.

    Raises ``ImportError`` naming the extra when ``openai`` is not installed."""

    def __init__(self, config: JudgeConfig) -> None:
        try:
            import openai
        except ImportError as exc:
            raise ImportError("the generative judge needs the openai client: pip install 'memcomp[rl]'") from exc
        if not isinstance(config, JudgeConfig):
            raise TypeError(f"GenerativeJudge: expected a JudgeConfig, got {type(config).__name__}")
        self.config = config
        self._openai = openai
        self._client = openai.OpenAI(base_url=config.base_url, api_key=os.environ.get(config.api_key_env) or "EMPTY",
                                     timeout=config.timeout_s, max_retries=config.max_retries)
        self._cache = _VerdictCache(config.cache_path)
        self._count_lock = threading.Lock()
        self.requests_sent = 0
        self.cache_hits = 0

    def __enter__(self) -> GenerativeJudge:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()
        self._cache.close()

    def _key(self, messages: list[dict[str, str]]) -> str:
        blob = json.dumps([self.config.model, messages], ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _ask(self, messages: list[dict[str, str]]) -> bool:
        """One item's verdict: the client retries transport failures; a reply that is not a verdict is asked
        again up to ``verdict_retries`` times. Raises ``JudgeError``."""
        cfg, openai = self.config, self._openai
        last: Any = None
        for _ in range(cfg.verdict_retries + 1):
            with self._count_lock:
                self.requests_sent += 1
            try:
                reply = self._client.chat.completions.create(
                    model=cfg.model, messages=messages, temperature=cfg.temperature, max_tokens=cfg.max_tokens,
                    extra_body=dict(cfg.extra_body) if cfg.extra_body else None)
            except openai.APITimeoutError as exc:
                raise JudgeError(f"judge {cfg.model} at {cfg.base_url} timed out ({cfg.timeout_s} s per request, "
                                 f"{cfg.max_retries} retries)") from exc
            except openai.APIConnectionError as exc:
                raise JudgeError(f"cannot reach the judge at {cfg.base_url} ({cfg.max_retries} retries): is the "
                                 f"server up? ({exc})") from exc
            except openai.APIStatusError as exc:
                raise JudgeError(f"judge {cfg.model} at {cfg.base_url} answered HTTP {exc.status_code} (after "
                                 f"{cfg.max_retries} retries where retryable): {str(exc)[:300]}") from exc
            except openai.APIError as exc:  # a 200 whose body is not a chat completion
                last = f"<unreadable response: {exc}>"
                continue
            try:
                content = reply.choices[0].message.content
            except (AttributeError, IndexError, TypeError):
                last = f"<no message in the response: {str(reply)[:200]}>"
                continue
            verdict = parse_verdict(content)
            if verdict is not None:
                return verdict
            last = content
        raise JudgeError(f"judge {cfg.model} at {cfg.base_url} gave no yes/no verdict in {cfg.verdict_retries + 1} "
                         f"tries; last reply: {str(last)[:300]!r}")

    def judge(self, question: str, gold_answers: Sequence[str], response: str) -> float:
        """1.0 if the judge says the response is correct, else 0.0. Raises ``JudgeError`` (see the class) and what
        ``render_messages`` raises for bad input."""
        return self.judge_batch([JudgeItem(question, gold_answers, response)])[0]

    def judge_batch(self, items: Sequence[JudgeItem]) -> list[float]:
        """Verdicts for ``items`` (1.0 / 0.0 each, in order): cached ones first, the distinct others sent
        concurrently. Every item's input is checked before anything is sent. When any request fails, the
        verdicts that did arrive are cached and ``JudgeError`` is raised naming how many failed -- never a
        partial list. Raises ``TypeError`` for items that are not ``JudgeItem``, and ``ValueError`` /
        ``TypeError`` for a record without gold answers or non-str fields."""
        if isinstance(items, JudgeItem) or not isinstance(items, Sequence):
            raise TypeError("judge_batch expects a list of JudgeItem")
        messages, keys = [], []
        for i, it in enumerate(items):
            if not isinstance(it, JudgeItem):
                raise TypeError(f"judge_batch: item {i} is a {type(it).__name__}, not a JudgeItem")
            try:
                m = render_messages(it.question, it.gold_answers, it.response)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"judge_batch: item {i}: {exc}") from exc
            messages.append(m)
            keys.append(self._key(m))
        verdicts = self._cache.get_many(keys)
        self.cache_hits += sum(k in verdicts for k in keys)
        todo = {k: m for k, m in zip(keys, messages) if k not in verdicts}  # distinct prompts once
        if todo:
            new: dict[str, bool] = {}
            errors: list[BaseException] = []
            with ThreadPoolExecutor(max_workers=min(self.config.concurrency, len(todo))) as pool:
                futures = {k: pool.submit(self._ask, m) for k, m in todo.items()}
                for k, f in futures.items():
                    exc = f.exception()
                    if exc is None:
                        new[k] = f.result()
                    else:
                        errors.append(exc)
            self._cache.put_many(new)
            if errors:
                raise JudgeError(f"{len(errors)} of {len(todo)} judge requests failed (the {len(new)} verdicts that "
                                 f"arrived are cached); first error: {errors[0]}") from errors[0]
            verdicts.update(new)
        return [1.0 if verdicts[k] else 0.0 for k in keys]
