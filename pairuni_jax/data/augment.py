"""Aligned pairs by LLM augmentation: a generation prompt for each understanding item, a
multiple-choice question for each generation item, then a verification pass.

  understanding item (image, question, answer)
      -> LLM writes a text-to-image prompt in which the answer is visible
      -> verify: the LLM answers the question from that prompt alone; kept if it gives the answer
  generation item (image, prompt)
      -> LLM writes an MC question (JSON: question, options, answer letter) about the prompt
      -> verify: the LLM answers the new question from the prompt alone; kept if it agrees
Each kept item becomes an aligned PairUG record (both anns on the same image, similarity 1.0).
Rejections are counted by reason in the report; nothing is dropped silently.

Backends implement `generate(prompts: list[str]) -> list[str]` (`TextBackend`):
  OpenAIChatBackend  any OpenAI-compatible chat-completions endpoint; base URL and key from the
                     environment (OPENAI_BASE_URL, OPENAI_API_KEY by default); retries with
                     exponential backoff (honouring Retry-After), a request-rate limit, threads.
  CachedBackend      wraps any backend with a JSONL cache appended and fsynced per response, so a
                     crash loses nothing and a rerun only asks for what is missing.
  any callable       e.g. the Janus model's text rollout (offline): wrap a function
                     `generate(prompts) -> texts` with `CallableBackend`.

CLI: python -m pairuni_jax.data.augment --understanding U.jsonl --generation G.jsonl \\
         --out aligned.jsonl --model NAME [--cache cache.jsonl] [--rpm 60] [--limit N]
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import requests

from pairuni_jax.data import augment_prompts, pairug


class TextBackend(Protocol):
    """Anything that turns a list of prompts into a list of completions (same order)."""

    def generate(self, prompts: list[str]) -> list[str]: ...


@dataclasses.dataclass
class CallableBackend:
    """Adapts a plain function `generate(prompts) -> texts` (e.g. a Janus text rollout)."""

    fn: Callable[[list[str]], list[str]]
    name: str = "callable"

    def generate(self, prompts: list[str]) -> list[str]:
        out = list(self.fn(list(prompts)))
        if len(out) != len(prompts):
            raise ValueError(f"{self.name}: {len(prompts)} prompts but {len(out)} completions")
        return out


class RateLimiter:
    """At most `per_minute` request starts per minute, evenly spaced; thread-safe."""

    def __init__(self, per_minute: float, clock=time.monotonic, sleep=time.sleep):
        self.interval = 60.0 / per_minute if per_minute > 0 else 0.0
        self.clock, self.sleep = clock, sleep
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            now = self.clock()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            self.sleep(start - now)


class BackendError(RuntimeError):
    pass


class OpenAIChatBackend:
    """Chat completions over HTTP: one user message per prompt, text of the first choice back."""

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        base_url_env: str = "OPENAI_BASE_URL",
        api_key_env: str = "OPENAI_API_KEY",
        temperature: float = 0.0,
        max_tokens: int = 512,
        requests_per_minute: float = 60.0,
        max_retries: int = 6,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        timeout: float = 120.0,
        concurrency: int = 4,
    ):
        self.base_url = (base_url or os.environ.get(base_url_env, "")).rstrip("/")
        if not self.base_url:
            raise ValueError(f"no endpoint: pass base_url or set {base_url_env}")
        self.api_key = api_key if api_key is not None else os.environ.get(api_key_env, "")
        self.model, self.temperature, self.max_tokens = model, temperature, max_tokens
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self.timeout, self.concurrency = timeout, concurrency
        self.limiter = RateLimiter(requests_per_minute)
        self.session = requests.Session()
        self.name = f"openai:{model}:t{temperature}:m{max_tokens}"

    def complete(self, prompt: str) -> str:
        """One completion, retrying connection errors, 408/409/429 and 5xx with backoff."""
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        url = f"{self.base_url}/chat/completions"
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))
            self.limiter.wait()
            try:
                resp = self.session.post(url, json=body, headers=headers, timeout=self.timeout)
            except requests.RequestException as e:
                last = f"{type(e).__name__}: {e}"
                continue
            if resp.status_code in (408, 409, 429) or resp.status_code >= 500:
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
                retry_after = resp.headers.get("Retry-After")
                if retry_after and retry_after.replace(".", "", 1).isdigit():
                    time.sleep(min(self.max_backoff, float(retry_after)))
                continue
            if resp.status_code != 200:
                raise BackendError(f"{url}: HTTP {resp.status_code}: {resp.text[:500]}")
            try:
                return resp.json()["choices"][0]["message"]["content"] or ""
            except (ValueError, KeyError, IndexError, TypeError) as e:
                raise BackendError(f"{url}: unexpected response {resp.text[:500]!r}") from e
        raise BackendError(f"{url}: gave up after {self.max_retries + 1} attempts; last: {last}")

    def generate(self, prompts: list[str]) -> list[str]:
        with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(self.complete, prompts))


class CachedBackend:
    """A resumable on-disk cache in front of a backend: JSONL of {"key", "prompt", "response"}.

    Keys hash (namespace, prompt); the namespace defaults to the backend's name (model and
    sampling settings), so answers of different models never mix. Each response is appended and
    fsynced as soon as it arrives.
    """

    def __init__(self, backend, path: str, namespace: str | None = None, chunk: int = 64):
        self.backend, self.path, self.chunk = backend, path, chunk
        self.namespace = namespace or getattr(backend, "name", type(backend).__name__)
        self.table: dict[str, str] = {}
        self.hits = self.misses = 0
        self._lock = threading.Lock()
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                        self.table[row["key"]] = row["response"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue  # a line cut by a crash: that request is simply redone
        self.name = self.namespace

    def key(self, prompt: str) -> str:
        return hashlib.sha256(f"{self.namespace}\0{prompt}".encode()).hexdigest()

    def _store(self, prompt: str, response: str) -> None:
        row = {"key": self.key(prompt), "prompt": prompt, "response": response}
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            self.table[row["key"]] = response

    def generate(self, prompts: list[str]) -> list[str]:
        missing = list(dict.fromkeys(p for p in prompts if self.key(p) not in self.table))
        self.hits += len(prompts) - len(missing)
        self.misses += len(missing)
        for s in range(0, len(missing), self.chunk):  # small chunks: a crash loses little
            part = missing[s : s + self.chunk]
            for prompt, response in zip(part, self.backend.generate(part), strict=True):
                self._store(prompt, response)
        return [self.table[self.key(p)] for p in prompts]


# ---------------------------------------------------------------------------------------------
# Parsing LLM outputs


def option_text(question: str, letter: str) -> str:
    """The text of option `letter` in an MC question ("" when absent)."""
    for line in question.splitlines():
        m = re.match(rf"^\s*{letter}\.\s+(.*\S)", line)
        if m:
            return m.group(1)
    return ""


def parse_prompt(text: str, max_words: int = 120) -> str | None:
    """A generation prompt from an LLM reply: first non-empty paragraph, quotes and labels off."""
    text = re.sub(r"^\s*(prompt|text-to-image prompt)\s*:\s*", "", text.strip(), flags=re.I)
    text = text.split("\n\n")[0].strip().strip('"').strip("'").strip()
    if not text or len(text.split()) > max_words:
        return None
    return " ".join(text.split())


def parse_question(text: str) -> tuple[str, str] | None:
    """(question in PairUG format, answer letter) from an LLM JSON reply, or None if unusable."""
    m = re.search(r"\{.*\}", text, flags=re.S)
    if not m:
        return None
    try:
        obj = json.loads(m.group(0))
        stem, options, answer = obj["question"], obj["options"], obj["answer"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    if not (isinstance(stem, str) and stem.strip() and isinstance(options, list)):
        return None
    if not 2 <= len(options) <= 26 or not all(isinstance(o, str) and o.strip() for o in options):
        return None
    if len({o.strip().lower() for o in options}) != len(options):
        return None
    letters = [chr(ord("A") + i) for i in range(len(options))]
    answer = str(answer).strip().rstrip(".").upper()
    if answer not in letters:
        return None
    question = pairug.format_mc_question(stem, [" ".join(o.split()) for o in options])
    return question, answer


def parse_letter(text: str) -> str | None:
    """The option letter in a short answer ("B", "B.", "Answer: B", "<answer>B</answer>")."""
    m = re.search(r"<answer>\s*([A-Z])\s*</answer>", text)
    if m:
        return m.group(1)
    m = re.fullmatch(r"\s*(?:answer\s*:\s*)?\(?([A-Z])\)?[.:)]?(\s.*)?", text, flags=re.S | re.I)
    return m.group(1).upper() if m else None


# ---------------------------------------------------------------------------------------------
# The augmentation


@dataclasses.dataclass
class AugmentResult:
    records: list[pairug.PairRecord]
    report: dict


def augment(
    backend: TextBackend,
    understanding: Sequence[pairug.UnderstandingAnn] = (),
    generation: Sequence[pairug.GenerationAnn] = (),
) -> AugmentResult:
    """Aligned records from both item sets (understanding-derived first), with a report."""
    rejected: dict[str, collections.Counter] = {
        "understanding": collections.Counter(), "generation": collections.Counter()
    }
    # 1. write
    fmt = augment_prompts.WRITE_GENERATION_PROMPT.format
    write_u = [
        fmt(question=u.question, answer=u.answer, answer_text=option_text(u.question, u.answer))
        for u in understanding
    ]
    write_g = [augment_prompts.WRITE_QUESTION.format(prompt=g.prompt) for g in generation]
    replies = backend.generate(write_u + write_g) if write_u or write_g else []
    u_prompts = [parse_prompt(r) for r in replies[: len(write_u)]]
    g_questions = [parse_question(r) for r in replies[len(write_u) :]]
    rejected["understanding"]["unparseable_prompt"] += sum(p is None for p in u_prompts)
    rejected["generation"]["unparseable_question"] += sum(q is None for q in g_questions)

    # 2. verify: the question must be answered correctly from the prompt text alone
    checks = []  # (kind, index, prompt text, question, expected letter)
    for i, (u, p) in enumerate(zip(understanding, u_prompts, strict=True)):
        if p is not None:
            checks.append(("understanding", i, p, u.question, u.answer))
    for i, (g, q) in enumerate(zip(generation, g_questions, strict=True)):
        if q is not None:
            checks.append(("generation", i, g.prompt, q[0], q[1]))
    verify = [augment_prompts.VERIFY.format(prompt=p, question=q) for _, _, p, q, _ in checks]
    answers = backend.generate(verify) if verify else []

    records, written = [], collections.Counter()
    for (kind, i, prompt, question, expected), reply in zip(checks, answers, strict=True):
        if parse_letter(reply) != expected:
            rejected[kind]["verification_failed"] += 1
            continue
        if kind == "understanding":
            u = understanding[i]
            gen = pairug.GenerationAnn(u.image_path, prompt, u.tag)
            und = dataclasses.replace(u, prompt=prompt)
        else:
            g = generation[i]
            gen = dataclasses.replace(g, question=question, answer=expected)
            und = pairug.UnderstandingAnn(g.image_path, question, expected, g.tag, g.prompt)
        records.append(pairug.PairRecord(1.0, "aligned", gen, und))
        written[kind] += 1
    report = {
        "inputs": {"understanding": len(understanding), "generation": len(generation)},
        "written": {"understanding": written["understanding"],
                    "generation": written["generation"]},
        "rejected": {k: dict(v) for k, v in rejected.items()},
    }
    return AugmentResult(records, report)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pairuni_jax.data.augment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--understanding", help="understanding-set JSONL")
    p.add_argument("--generation", help="generation-set JSONL")
    p.add_argument("--root", help="image root of both sets (default: each file's directory)")
    p.add_argument("--out", required=True, help="aligned PairUG JSONL to write")
    p.add_argument("--out-root", help="dataset root of the output (default: --out's directory)")
    p.add_argument("--model", required=True, help="model name sent to the endpoint")
    p.add_argument("--cache", help="response cache JSONL (default: <out>.cache.jsonl)")
    p.add_argument("--rpm", type=float, default=60.0, help="requests per minute")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--limit", type=int, help="use only the first N items of each set")
    p.add_argument("--on-error", default="raise", choices=["raise", "skip"])
    a = p.parse_args(argv)
    if not (a.understanding or a.generation):
        p.error("give --understanding and/or --generation")
    out_root = os.path.realpath(a.out_root or os.path.dirname(os.path.abspath(a.out)))

    def items(path, reader):
        if not path:
            return []
        r = reader(path, root=a.root, on_error=a.on_error)
        print(r.summary())
        return [  # image paths re-expressed relative to the output's root
            dataclasses.replace(x, image_path=pairug.relative_image_path(
                os.path.join(r.root, x.image_path), out_root, path))
            for x in r.records[: a.limit]
        ]

    und = items(a.understanding, pairug.read_understanding_set)
    gen = items(a.generation, pairug.read_generation_set)
    backend = CachedBackend(
        OpenAIChatBackend(a.model, temperature=a.temperature, requests_per_minute=a.rpm,
                          concurrency=a.concurrency),
        a.cache or os.path.splitext(a.out)[0] + ".cache.jsonl",
    )
    result = augment(backend, und, gen)
    pairug.write_pairug(a.out, result.records)
    result.report["cache"] = {"hits": backend.hits, "misses": backend.misses}
    with open(os.path.splitext(a.out)[0] + ".report.json", "w") as f:
        json.dump(result.report, f, indent=1)
    print(json.dumps(result.report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
