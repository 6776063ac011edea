"""Augmentation against a real HTTP server on 127.0.0.1 speaking the chat-completions protocol.

The server is a small rule-based "LLM" that reads the task from the prompt text, so the whole
write -> verify flow, retries, the rate limiter and the on-disk cache run for real.
"""

import http.server
import json
import os
import re
import subprocess
import sys
import threading

import pytest

from pairuni_jax.data import augment, pairug

Q_COLOUR = pairug.format_mc_question("What colour is the car?", ["red", "blue", "green"])
Q_COUNT = pairug.format_mc_question("How many dogs are there?", ["one", "two"])
Q_TRICK = pairug.format_mc_question("Is it raining?", ["yes", "no"])


def fake_llm(prompt: str) -> str:
    """Deterministic answers to the three augmentation templates."""
    if prompt.startswith("You write prompts"):
        if "raining" in prompt:  # an unhelpful prompt, which verification must reject
            return "A quiet street."
        answer = re.search(r"Correct answer: [A-Z]\. (.*)", prompt).group(1)
        subject = "car" if "car" in prompt else "dogs"
        return f'Prompt: "A photo of {answer} {subject} on a sunny street."'
    if prompt.startswith("You write multiple-choice"):
        text = re.search(r"Prompt: (.*)", prompt).group(1)
        if "broken" in text:
            return "I cannot do that."
        colour = re.search(r"\b(red|blue|green)\b", text).group(1)
        options = ["red", "blue", "green"]
        return "```json\n" + json.dumps({"question": "What colour is the object?",
                                        "options": options,
                                        "answer": "ABC"[options.index(colour)]}) + "\n```"
    if prompt.startswith("Read the image description"):
        desc = re.search(r"Description: (.*)", prompt).group(1).lower()
        for letter, text in re.findall(r"^([A-Z])\. (.*)$", prompt, flags=re.M):
            if re.search(rf"\b{re.escape(text.lower())}\b", desc):
                return f"{letter}."
        return "none"
    return "?"


class Server:
    """ThreadingHTTPServer with failure injection and request accounting."""

    def __init__(self, fail_first: int = 0, fail_status: int = 500):
        self.requests, self.auth, self.fail_left = [], set(), fail_first
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.auth.add(self.headers.get("Authorization"))
                    fail = outer.fail_left > 0
                    outer.fail_left -= fail
                    if not fail:
                        outer.requests.append(body)
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": "not found"})
                if fail:
                    return self._send(fail_status, {"error": "try again"}, {"Retry-After": "0"})
                text = fake_llm(body["messages"][-1]["content"])
                self._send(200, {
                    "id": "x", "object": "chat.completion", "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": text}}],
                })

            def _send(self, code, obj, headers=None):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def backend(url, **kw):
    kw = {"requests_per_minute": 0, "backoff": 0.01, **kw}
    return augment.OpenAIChatBackend("test-model", base_url=url, api_key="sk-test", **kw)


UND = [
    pairug.UnderstandingAnn("u0.png", Q_COLOUR, "B", "color"),
    pairug.UnderstandingAnn("u1.png", Q_COUNT, "B", "count"),
    pairug.UnderstandingAnn("u2.png", Q_TRICK, "A", "weather"),
]
GEN = [
    pairug.GenerationAnn("g0.png", "a green car parked by a wall", "color"),
    pairug.GenerationAnn("g1.png", "a broken prompt", "other"),
]


def test_augment_writes_verified_aligned_pairs(server, tmp_path):
    cached = augment.CachedBackend(backend(server.url), str(tmp_path / "cache.jsonl"))
    result = augment.augment(cached, UND, GEN)
    assert server.auth == {"Bearer sk-test"}
    assert {r["model"] for r in server.requests} == {"test-model"}
    recs = result.records
    assert [r.understand_ann.image_path for r in recs] == ["u0.png", "u1.png", "g0.png"]
    assert all(r.pair_type == "aligned" and r.similarity == 1.0 for r in recs)
    assert all(r.generate_ann.image_path == r.understand_ann.image_path for r in recs)
    assert recs[0].generate_ann.prompt == "A photo of blue car on a sunny street."
    assert recs[0].understand_ann.prompt == recs[0].generate_ann.prompt
    g = recs[2]
    assert g.understand_ann.answer == "C" and pairug.mc_options(g.understand_ann.question) == [
        "A", "B", "C"]
    assert g.generate_ann.question == g.understand_ann.question and g.generate_ann.answer == "C"
    assert result.report["written"] == {"understanding": 2, "generation": 1}
    assert result.report["rejected"] == {
        "understanding": {"unparseable_prompt": 0, "verification_failed": 1},
        "generation": {"unparseable_question": 1},
    }
    # the output is valid PairUG (images aside)
    out = tmp_path / "aligned.jsonl"
    pairug.write_pairug(str(out), recs)
    assert pairug.validate(str(out), check_images=False).errors == []

    # rerun: everything comes from the cache, the server sees nothing new
    n = len(server.requests)
    again = augment.augment(
        augment.CachedBackend(backend(server.url), str(tmp_path / "cache.jsonl")), UND, GEN
    )
    assert again.records == recs and len(server.requests) == n


def test_cache_resumes_after_a_crash(server, tmp_path):
    path = str(tmp_path / "cache.jsonl")
    real = backend(server.url)
    calls = []

    def dies_after_two(prompts):
        if len(calls) >= 2:
            raise RuntimeError("killed")
        calls.append(prompts)
        return real.generate(prompts)

    crashing = augment.CachedBackend(augment.CallableBackend(dies_after_two), path,
                                     namespace=real.name, chunk=2)
    with pytest.raises(RuntimeError, match="killed"):
        augment.augment(crashing, UND, GEN)
    assert len(server.requests) == 4  # two chunks of two answered before the crash
    with open(path, "a") as f:
        f.write('{"key": "half a line')  # a line cut by the crash is ignored
    resumed = augment.CachedBackend(real, path)
    result = augment.augment(resumed, UND, GEN)
    assert resumed.hits == 4 and len(result.records) == 3
    assert len(server.requests) == 4 + resumed.misses


@pytest.mark.parametrize("status", [500, 429])
def test_retries_with_backoff(status, tmp_path):
    s = Server(fail_first=3, fail_status=status)
    try:
        assert backend(s.url).generate(["Read the image description\nDescription: red\n"
                                        "A. red"]) == ["A."]
        assert len(s.requests) == 1 and s.fail_left == 0
        s.fail_left = 10
        with pytest.raises(augment.BackendError, match=f"gave up after 3 attempts.*{status}"):
            backend(s.url, max_retries=2).complete("x")
    finally:
        s.close()


def test_client_errors_are_not_retried(server):
    b = augment.OpenAIChatBackend("m", base_url=server.url + "/wrong", api_key="k", backoff=0)
    with pytest.raises(augment.BackendError, match="HTTP 404"):
        b.complete("x")
    b = augment.OpenAIChatBackend("m", base_url="http://127.0.0.1:9", max_retries=1, backoff=0)
    with pytest.raises(augment.BackendError, match="ConnectionError"):
        b.complete("x")


def test_endpoint_from_environment(server, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    assert augment.OpenAIChatBackend("m").generate(["?"]) == ["?"]
    assert server.auth == {"Bearer sk-env"}
    monkeypatch.delenv("OPENAI_BASE_URL")
    with pytest.raises(ValueError, match="OPENAI_BASE_URL"):
        augment.OpenAIChatBackend("m")


def test_rate_limiter_spaces_request_starts():
    now, slept = [0.0], []

    def sleep(dt):
        slept.append(dt)
        now[0] += dt

    limiter = augment.RateLimiter(120, clock=lambda: now[0], sleep=sleep)  # one per 0.5 s
    for _ in range(4):
        limiter.wait()
    assert slept == [0.5, 0.5, 0.5]
    now[0] += 10  # idle time is not banked
    limiter.wait()
    assert slept == [0.5, 0.5, 0.5]


def test_callable_backend_plugs_in():
    result = augment.augment(
        augment.CallableBackend(lambda prompts: [fake_llm(p) for p in prompts]), UND[:1], GEN[:1]
    )
    assert len(result.records) == 2
    with pytest.raises(ValueError, match="2 prompts but 1"):
        augment.CallableBackend(lambda p: ["x"]).generate(["a", "b"])


def test_parsers():
    assert augment.parse_letter("B") == "B"
    assert augment.parse_letter("Answer: c.") == "C"
    assert augment.parse_letter("<think>hm</think><answer>D</answer>") == "D"
    assert augment.parse_letter("none") is None
    assert augment.parse_prompt('Prompt: "A red ball."\n\nNotes: x') == "A red ball."
    assert augment.parse_prompt("   ") is None
    duplicate = '{"question": "Q?", "options": ["a", "a"], "answer": "A"}'
    assert augment.parse_question(duplicate) is None
    not_an_option = '{"question": "Q?", "options": ["a", "b"], "answer": "C"}'
    assert augment.parse_question(not_an_option) is None
    q, a = augment.parse_question('{"question": "Q?", "options": ["a", "b"], "answer": "b"}')
    assert a == "B" and q.endswith(pairug.MC_SUFFIX) and pairug.mc_options(q) == ["A", "B"]


def test_cli(server, tmp_path):
    u = tmp_path / "und.jsonl"
    u.write_text("".join(json.dumps({"image_path": x.image_path, "question": x.question,
                                     "answer": x.answer, "tag": x.tag}) + "\n" for x in UND))
    out = tmp_path / "aligned.jsonl"
    env = {**os.environ, "OPENAI_BASE_URL": server.url, "OPENAI_API_KEY": "sk-cli"}
    res = subprocess.run(
        [sys.executable, "-m", "pairuni_jax.data.augment", "--understanding", str(u),
         "--out", str(out), "--model", "m", "--rpm", "0"],
        capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert res.returncode == 0, res.stderr
    assert len(pairug.read_pairug(str(out)).records) == 2
    report = json.loads((tmp_path / "aligned.report.json").read_text())
    assert report["written"] == {"understanding": 2, "generation": 0}
    assert report["cache"] == {"hits": 0, "misses": 6}
    assert (tmp_path / "aligned.cache.jsonl").exists()
