"""memcomp.rl.judge against a real local HTTP server playing an OpenAI-compatible chat-completions endpoint:
verdicts, garbage, 500s then success, a server that is down, a slow one, the cache and concurrency."""

import json
import re
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("openai")

from memcomp.rl.judge import (  # noqa: E402
    JUDGE_USER_TEMPLATE,
    GenerativeJudge,
    JudgeConfig,
    JudgeError,
    JudgeItem,
    parse_verdict,
    render_messages,
)

MAX_REQUESTS = 64  # every test stays far below; a runaway retry loop gets 400s instead of hanging the suite


class FakeJudgeServer:
    """``POST /v1/chat/completions`` on 127.0.0.1 in a thread. ``behaviour(n, body)`` (n: 1-based request count)
    returns (status, reply text or None, extra headers) or sleeps first; the default plays a judge that says yes
    when a reference answer appears in the response."""

    def __init__(self, behaviour=None):
        self.behaviour = behaviour or self.honest
        self.count = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.bodies = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.count += 1
                    n = server.count
                    server.bodies.append(body)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    if self.path != "/v1/chat/completions" or n > MAX_REQUESTS:
                        status, reply, headers = 400, None, {"x-should-retry": "false"}
                    else:
                        status, reply, headers = server.behaviour(n, body)
                    payload = (json.dumps(completion(body["model"], reply)) if status == 200 and reply is not None
                               else json.dumps({"error": {"message": "boom", "type": "server_error"}}))
                    data = payload.encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (time-out test)
                    pass
                finally:
                    with server.lock:
                        server.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @staticmethod
    def honest(n, body):
        user = body["messages"][-1]["content"]
        golds = json.loads("[" + re.search(r"any one of which is correct: (.*)\n", user).group(1).replace("; ", ", ")
                           + "]")
        response = re.search(r"\nResponse: (.*)\n\nThe response may", user, re.S).group(1)
        return 200, "yes" if any(g.lower() in response.lower() for g in golds) else "No.", {}

    @property
    def url(self):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def completion(model, content):
    return {"id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def config(url, **kw):
    return JudgeConfig(**{"base_url": url, "model": "judge-test", "timeout_s": 5.0, "max_retries": 2, **kw})


ITEMS = [JudgeItem("Capital of France?", ["Paris"], "I think it is \\boxed{Paris}"),
         JudgeItem("Capital of France?", ["Paris"], "\\boxed{Lyon}"),
         JudgeItem("Who wrote Hamlet?", ["Shakespeare", "William Shakespeare"], "\\boxed{William Shakespeare}"),
         JudgeItem("Who wrote Hamlet?", ["Shakespeare"], "Marlowe, surely.")]


def test_correct_verdicts_prompt_and_request():
    with FakeJudgeServer() as srv, GenerativeJudge(config(srv.url)) as judge:
        assert judge.judge_batch(ITEMS) == [1.0, 0.0, 1.0, 0.0]
        assert judge.judge("Q?", ["x"], "\\boxed{x}") == 1.0
        assert srv.count == 5 and judge.requests_sent == 5
        body = srv.bodies[0]
        assert body["model"] == "judge-test" and body["temperature"] == 0.0 and body["max_tokens"] == 16
        assert body["messages"][0]["role"] == "system" and "yes or no" in body["messages"][-1]["content"]
    # One template fills the prompt: question, every gold answer, the response.
    text = render_messages("Q?", ["x", "y \"z\""], "resp")[-1]["content"]
    assert text == JUDGE_USER_TEMPLATE.format(question="Q?", gold_answers='"x"; "y \\"z\\""', response="resp")


@pytest.mark.parametrize("reply, verdict", [
    ("yes", True), ("No", False), (" YES.\n", True), ("**no**", False), ("'yes'", True),
    ("<think>the reference says Paris; the response says Paris</think>\nyes", True),
    ("Yes, because it matches", None), ("maybe", None), ("", None), (None, None), ("yesno", None),
])
def test_parse_verdict_is_strict(reply, verdict):
    assert parse_verdict(reply) is verdict


def test_garbage_replies_are_asked_again_then_a_clear_error():
    with FakeJudgeServer(lambda n, body: (200, "It depends on the definition.", {})) as srv:
        with GenerativeJudge(config(srv.url, verdict_retries=2)) as judge:
            with pytest.raises(JudgeError, match=r"no yes/no verdict in 3 tries; last reply: 'It depends"):
                judge.judge_batch(ITEMS[:1])
        assert srv.count == 3
    # Garbage, then a verdict on the re-ask: fine.
    with FakeJudgeServer(lambda n, body: (200, "hmm" if n == 1 else "yes", {})) as srv:
        with GenerativeJudge(config(srv.url, verdict_retries=1)) as judge:
            assert judge.judge_batch(ITEMS[:1]) == [1.0]
        assert srv.count == 2


def test_one_garbage_item_fails_the_batch_but_keeps_the_others_verdicts(tmp_path):
    def behaviour(n, body):
        if "Marlowe" in body["messages"][-1]["content"]:
            return 200, "unsure", {}
        return FakeJudgeServer.honest(n, body)

    with FakeJudgeServer(behaviour) as srv:
        with GenerativeJudge(config(srv.url, verdict_retries=0, cache_path=str(tmp_path / "v.sqlite"))) as judge:
            with pytest.raises(JudgeError, match="1 of 4 judge requests failed"):
                judge.judge_batch(ITEMS)               # never a list with a silent 0 for the failed item
            assert judge.judge_batch(ITEMS[:3]) == [1.0, 0.0, 1.0]
        assert srv.count == 4                          # the three good verdicts came from the cache


def test_server_errors_are_retried_with_backoff_then_succeed():
    # Two 500s, then the honest judge. retry-after-ms keeps the client's backoff short in the test.
    def behaviour(n, body):
        return (500, None, {"retry-after-ms": "20"}) if n <= 2 else FakeJudgeServer.honest(n, body)

    with FakeJudgeServer(behaviour) as srv, GenerativeJudge(config(srv.url, max_retries=2)) as judge:
        assert judge.judge_batch(ITEMS[:1]) == [1.0]
        assert srv.count == 3 and judge.requests_sent == 1   # the client's transport retries, one judge request


def test_persistent_server_errors_raise_after_the_retries():
    with FakeJudgeServer(lambda n, body: (503, None, {"retry-after-ms": "10"})) as srv:
        with GenerativeJudge(config(srv.url, max_retries=2)) as judge:
            with pytest.raises(JudgeError, match="HTTP 503"):
                judge.judge_batch(ITEMS[:1])
        assert srv.count == 3


def test_server_down_connection_refused():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with GenerativeJudge(config(f"http://127.0.0.1:{port}/v1", max_retries=1)) as judge:
        with pytest.raises(JudgeError, match=f"cannot reach the judge at http://127.0.0.1:{port}/v1"):
            judge.judge_batch(ITEMS)
    assert time.monotonic() - t0 < 10


def test_slow_server_times_out():
    def slow(n, body):
        time.sleep(3.0)
        return FakeJudgeServer.honest(n, body)

    with FakeJudgeServer(slow) as srv:
        t0 = time.monotonic()
        with GenerativeJudge(config(srv.url, timeout_s=0.2, max_retries=1)) as judge:
            with pytest.raises(JudgeError, match=r"timed out \(0.2 s per request, 1 retries\)"):
                judge.judge_batch(ITEMS[:1])
        assert time.monotonic() - t0 < 2.5          # gave up before the server would have answered
        assert srv.count == 2                        # the first try and one retry


def test_cache_in_memory_and_on_disk(tmp_path):
    path = str(tmp_path / "cache" / "verdicts.sqlite")
    with FakeJudgeServer() as srv:
        with GenerativeJudge(config(srv.url, cache_path=path)) as judge:
            assert judge.judge_batch(ITEMS + ITEMS[:2]) == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
            assert srv.count == 4                    # duplicates within a batch are asked once
            assert judge.judge_batch(ITEMS) == [1.0, 0.0, 1.0, 0.0]
            assert srv.count == 4 and judge.cache_hits == 4
        with GenerativeJudge(config(srv.url, cache_path=path)) as judge:     # a new run: the file answers
            assert judge.judge_batch(ITEMS) == [1.0, 0.0, 1.0, 0.0]
            assert srv.count == 4
        with GenerativeJudge(config(srv.url, cache_path=path, model="other-judge")) as judge:
            judge.judge_batch(ITEMS[:1])             # another judge model is another key
            assert srv.count == 5
    bad = tmp_path / "not.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ValueError, match="not a usable SQLite file"):
        GenerativeJudge(config("http://127.0.0.1:1/v1", cache_path=str(bad)))


def test_batches_run_concurrently_up_to_the_limit():
    def slowish(n, body):
        time.sleep(0.15)
        return FakeJudgeServer.honest(n, body)

    items = [JudgeItem(f"Q{i}?", ["alpha"], f"\\boxed{{{'alpha' if i % 2 else 'beta'}}}") for i in range(8)]
    with FakeJudgeServer(slowish) as srv, GenerativeJudge(config(srv.url, concurrency=4)) as judge:
        assert judge.judge_batch(items) == [0.0, 1.0] * 4
        assert 2 <= srv.max_in_flight <= 4


def test_bad_input_is_refused_before_anything_is_sent():
    with FakeJudgeServer() as srv, GenerativeJudge(config(srv.url)) as judge:
        with pytest.raises(ValueError, match="item 1: .*without gold answers"):
            judge.judge_batch([ITEMS[0], JudgeItem("Q?", [], "r")])
        with pytest.raises(TypeError, match="item 0: .*list of strings"):
            judge.judge_batch([JudgeItem("Q?", "Paris", "r")])
        with pytest.raises(TypeError, match="JudgeItem"):
            judge.judge_batch([("Q?", ["a"], "r")])
        assert srv.count == 0
    for kw in ({"base_url": "127.0.0.1:8000"}, {"model": ""}, {"timeout_s": 0}, {"max_retries": -1},
               {"concurrency": 0}, {"max_tokens": 0}):
        with pytest.raises(ValueError):
            JudgeConfig(**{"base_url": "http://x/v1", "model": "m", **kw})


def test_missing_client_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "openai", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'memcomp\[rl\]'"):
        GenerativeJudge(config("http://127.0.0.1:1/v1"))
