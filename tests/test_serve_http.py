"""autocompress serve over real HTTP (uvicorn on an ephemeral loopback port) with two tiny models:
the OpenAI endpoints (SSE included), batching, admin auth, promotion through every stage, and
failover under load for each injected fault with zero failed requests."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serve_helpers import one_torch_thread  # noqa: F401 (autouse: one torch thread)
from serve_helpers import read_sse, run_load, start_server, tiny_pair, valid_answer

from autocompress.serve.engine import Fault, FaultKind
from autocompress.serve.events import read_events
from autocompress.serve.policy import Policy, Thresholds
from autocompress.serve.routing import Arm

pytestmark = pytest.mark.timeout(120)

# Never promotes (so the share stays where the test put it); the default windows and thresholds.
HOLD = Policy(stages=(50, 100), min_requests=10**9)


@pytest.fixture(scope="module")
def pair(tokenizer):
    return tiny_pair(tokenizer)


@pytest.fixture
def server(pair, tmp_path):
    server = start_server(pair, tmp_path / "run", HOLD, shadow=50.0)
    yield server
    server.stop()


def test_openai_endpoints_non_streaming_and_streaming(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        body = {"prompt": "The module", "max_tokens": 6, "temperature": 0}
        plain = client.post("/v1/completions", json=body, headers={"X-Autocompress-Arm": "original"})
        assert plain.status_code == 200 and plain.headers["x-autocompress-arm"] == "original"
        answer = plain.json()
        assert answer["object"] == "text_completion" and answer["arm"] == "original" and not answer["retried"]
        assert answer["usage"]["completion_tokens"] == 6 and answer["choices"][0]["finish_reason"] == "length"
        assert answer["model"] == "tiny-original"

        streamed = client.post("/v1/completions", json={**body, "stream": True},
                               headers={"X-Autocompress-Arm": "original"})
        assert streamed.headers["content-type"].startswith("text/event-stream")
        events = read_sse(streamed.text)
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
        # greedy: the streamed pieces add up to the same text
        assert "".join(e["choices"][0]["text"] for e in events[:-1]) == answer["choices"][0]["text"]

        messages = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0}
        chat = client.post("/v1/chat/completions", json=messages, headers={"X-Autocompress-Arm": "candidate"})
        assert chat.status_code == 200 and chat.headers["x-autocompress-arm"] == "candidate"
        reply = chat.json()
        assert reply["object"] == "chat.completion" and reply["arm"] == "candidate"
        assert reply["choices"][0]["message"]["role"] == "assistant"
        chunks = read_sse(client.post("/v1/chat/completions", json={**messages, "stream": True},
                                      headers={"X-Autocompress-Arm": "candidate"}).text)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert chunks[-2]["choices"][0]["finish_reason"] == "length" and chunks[-1] == "[DONE]"
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == \
            reply["choices"][0]["message"]["content"]
        assert all(c["object"] == "chat.completion.chunk" and c["arm"] == "candidate" for c in chunks[:-1])

        models = client.get("/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["tiny-original"]
        assert client.get("/health").json() == {"status": "ok"}
        ready = client.get("/ready")
        assert ready.status_code == 200 and ready.json()["share"] == 50
        metrics = client.get("/metrics")
        assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert 'autocompress_serve_requests_total{arm="candidate"} 2' in metrics.text


def test_bad_requests_get_one_clear_openai_error(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        cases = [
            (client.post("/v1/completions", content=b"{nope"), 400, None),
            (client.post("/v1/completions", json={"prompt": "x", "model": "gpt-4"}), 404, "model"),
            (client.post("/v1/completions", json={"prompt": "x", "max_tokens": 10_000}), 400, "max_tokens"),
            (client.post("/v1/completions", json={"prompt": "x", "n": 3}), 400, "n"),
            (client.post("/v1/completions", json={"prompt": "x"}, headers={"X-Autocompress-Arm": "both"}), 400,
             "X-Autocompress-Arm"),
            (client.post("/v1/completions", json={"prompt": "word " * 300, "max_tokens": 8}), 400, "max_tokens"),
            (client.post("/v1/chat/completions", json={"messages": "hi"}), 400, "messages"),
        ]
        for response, status, param in cases:
            assert response.status_code == status, response.text
            error = response.json()["error"]
            assert error["param"] == param and error["message"] and "\n" not in error["message"]


def test_concurrent_requests_are_batched(server):
    def one(i):
        with httpx.Client(base_url=server.url, timeout=30) as client:
            return client.post("/v1/completions", json={"prompt": "The module", "max_tokens": 12, "temperature": 0},
                               headers={"X-Autocompress-Arm": "original"})

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(16)))
    assert all(a.status_code == 200 for a in answers)
    assert len({a.json()["choices"][0]["text"] for a in answers}) == 1  # batching (left padding) changes nothing
    assert server.engine.largest_batch[Arm.ORIGINAL] > 1


def test_admin_is_off_without_a_token_and_refuses_a_missing_or_wrong_one(pair, tmp_path, server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.post("/admin/promote").status_code == 404  # no --admin-token-file: admin is off
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    guarded = start_server(pair, tmp_path / "guarded", Policy(stages=(5, 25, 50, 100)), admin_token_file=str(token))
    try:
        with httpx.Client(base_url=guarded.url, timeout=30) as client:
            missing = client.post("/admin/promote")
            assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
            assert client.post("/admin/rollback", headers={"Authorization": "Basic s3cret-token"}).status_code == 401
            for header in ("Bearer wrong-token", "Bearer s3cret-token-and-more", "Bearer s3cret"):
                assert client.post("/admin/rollback", headers={"Authorization": header}).status_code == 403
            assert guarded.controller.rollout.share == 5  # nothing changed
            auth = {"Authorization": "Bearer s3cret-token"}
            promoted = client.post("/admin/promote", headers=auth)
            assert promoted.status_code == 200 and promoted.json()["share"] == 25
            assert client.post("/admin/pause", headers=auth).json()["status"] == "paused"
            assert client.post("/admin/pause", headers=auth, json={"paused": False}).json()["status"] == "ramping"
            assert client.post("/admin/rollback", headers=auth).json()["share"] == 0
            bad = client.post("/admin/promote", headers=auth, json={"stage": 7})
            assert bad.status_code == 409 and "stage must be" in bad.json()["error"]["message"]
            assert client.post("/admin/restart", headers=auth).status_code == 404
        kinds = [e["type"] for e in read_events(tmp_path / "guarded" / "events.jsonl")]
        assert kinds == ["start", "promote", "pause", "pause", "rollback"]
    finally:
        guarded.stop()


def test_a_healthy_candidate_is_promoted_through_every_stage(pair, tmp_path):
    policy = Policy(stages=(5, 25, 50, 100), min_requests=8, min_shadow=3)
    server = start_server(pair, tmp_path / "run", policy, shadow=50.0)
    try:
        for _ in range(8):  # bounded: at most 8 x 60 requests
            load = run_load(server.url, 60)
            assert load.failed == 0
            if server.controller.rollout.status.value == "complete":
                break
    finally:
        server.stop()
    events = read_events(tmp_path / "run" / "events.jsonl")
    promotions = [e for e in events if e["type"] == "promote"]
    assert [(e["stage"], e["share"]) for e in promotions] == [(1, 25), (2, 50), (3, 100)], \
        [e["reason"] for e in events if e["type"] == "failover"]
    assert all(e["by"] == "policy" and "within thresholds" in e["reason"] for e in promotions)
    assert not [e["reason"] for e in events if e["type"] == "failover"]
    assert sum(e["type"] == "shadow" for e in events) >= 9


@pytest.mark.parametrize("kind, words", [(FaultKind.ERRORS, "error rate"), (FaultKind.SLOW, "p95 latency"),
                                         (FaultKind.GARBAGE, "shadow")])
def test_failover_under_load(pair, tmp_path, kind, words):
    """8 clients, 400 bounded requests at a 25% share, a fault injected after 100: the share
    reaches 0 within 20 requests sent to the candidate, every request gets a valid answer, the
    log says why.

    A slow candidate cannot be told from a busy one before its requests have run for
    ``latency`` x the original's p95, and the requests routed to it meanwhile grow with the
    share: at 50% this is 7 to 18 of them on this machine, too near 20 to test reliably.

    Only the rule under test may fire: for errors and garbage the latency ceiling is raised, since
    a loaded CI machine once put the candidate's p95 at 2.2 x the original's before the shadow
    scores came in (183 against 85 ms), and the log then named latency, not the garbage.
    """
    latency = 2.0 if kind is FaultKind.SLOW else 100.0
    policy = Policy(stages=(25, 100), min_requests=10**9, thresholds=Thresholds(latency=latency))
    server = start_server(pair, tmp_path / "run", policy, shadow=50.0)
    fault_at = []

    def inject(done):
        if done == 100 and not fault_at:
            fault_at.append(time.time())
            server.engine.fault = Fault(kind, factor=5.0)

    try:
        load = run_load(server.url, 400, workers=8, max_tokens=4, on_done=inject)
        share = server.controller.rollout.share
    finally:
        server.stop()
    assert len(load.answers) == 400 and load.failed == 0, [a for a in load.answers if not a[1]][:3]
    assert share == 0
    events = read_events(tmp_path / "run" / "events.jsonl")
    failovers = [e for e in events if e["type"] == "failover"]
    assert len(failovers) == 1 and words in failovers[0]["reason"], failovers
    after = [e for e in events if e["type"] == "request" and e["arm"] == "candidate" and not e.get("retried")
             and fault_at[0] <= e["started"] <= failovers[0]["t"]]
    assert len(after) <= 20, (len(after), failovers[0]["reason"])
    before = [e for e in events if e["type"] == "request" and e["t"] < fault_at[0]]
    assert not any(e.get("error") for e in before)
    if kind is FaultKind.ERRORS:
        retried = [e for e in events if e["type"] == "request" and e.get("retried")]
        assert retried and all(e["arm"] == "original" for e in retried)


def test_requests_in_flight_on_the_candidate_finish_on_the_original(pair, tmp_path):
    token = tmp_path / "token"
    token.write_text("another-token")
    server = start_server(pair, tmp_path / "run", HOLD, admin_token_file=str(token))
    server.engine.fault = Fault(FaultKind.SLOW, factor=50.0)  # keeps them in flight
    results, started = [], threading.Barrier(5)

    def one(stream):
        with httpx.Client(base_url=server.url, timeout=60) as client:
            started.wait()
            response = client.post("/v1/completions", json={"prompt": "The module", "max_tokens": 20,
                                                            "temperature": 0, "stream": stream},
                                   headers={"X-Autocompress-Arm": "candidate"})
            results.append((response, stream))

    try:
        threads = [threading.Thread(target=one, args=(i % 2 == 0,)) for i in range(4)]
        for thread in threads:
            thread.start()
        started.wait()
        deadline = time.time() + 30
        while len(server.controller.inflight) < 4 and time.time() < deadline:
            time.sleep(0.01)
        with httpx.Client(base_url=server.url, timeout=30) as client:
            assert client.post("/admin/rollback", headers={"Authorization": "Bearer another-token"}).status_code == 200
        for thread in threads:
            thread.join(60)
    finally:
        server.stop()
    assert len(results) == 4 and all(valid_answer(r, stream) for r, stream in results)
    for response, stream in results:
        if stream:
            assert read_sse(response.text)[-2]["arm"] == "original"  # the original finished the stream
        else:
            assert response.json()["arm"] == "original" and response.json()["retried"]
    events = read_events(tmp_path / "run" / "events.jsonl")
    assert sum(e["type"] == "request" and e.get("aborted") for e in events) == 4
    assert sum(e["type"] == "request" and e.get("retried") for e in events) == 4
