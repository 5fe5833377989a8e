"""autocompress serve without HTTP or models: routing, policy files, the rollout fold and its
verdicts, the event log, metrics, the dashboard's data step and the OpenAI request checks."""
from __future__ import annotations

import math

import pytest
import torch

from autocompress.errors import UserError
from autocompress.serve import openai
from autocompress.serve.dashboard import dashboard_data
from autocompress.serve.events import EventLog, read_events
from autocompress.serve.generation import TextAssembler
from autocompress.serve.metrics import render_metrics
from autocompress.serve.monitor import Monitor
from autocompress.serve.policy import Policy, Thresholds, load_policy, policy_from_dict
from autocompress.serve.rollout import Rollout, Status, admin_event
from autocompress.serve.routing import Arm, choose_arm, draw, take_shadow
from autocompress.serve.scoring import compare
from autocompress.serve.stats import quantile


# -- routing --------------------------------------------------------------------------------
@pytest.mark.parametrize("share", [5, 25, 50, 75, 95])
@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_routing_over_2000_requests_stays_within_two_points(share, seed):
    arms = [choose_arm(share, seed, i) for i in range(2000)]
    realised = 100 * sum(a is Arm.CANDIDATE for a in arms) / len(arms)
    assert abs(realised - share) <= 2, realised
    # and over any window of 2,000 later requests too (a restarted server continues the sequence)
    later = [choose_arm(share, seed, i) for i in range(50_000, 52_000)]
    assert abs(100 * sum(a is Arm.CANDIDATE for a in later) / 2000 - share) <= 2


def test_routing_is_seeded_per_request_and_pins_override():
    assert [choose_arm(30, 7, i) for i in range(50)] == [choose_arm(30, 7, i) for i in range(50)]
    assert [choose_arm(30, 7, i) for i in range(50)] != [choose_arm(30, 8, i) for i in range(50)]
    assert all(0 <= draw(3, i) < 1 for i in range(100))
    assert choose_arm(0, 0, 0) is Arm.ORIGINAL and choose_arm(100, 0, 0) is Arm.CANDIDATE
    assert choose_arm(0, 0, 0, pin=Arm.CANDIDATE) is Arm.CANDIDATE
    assert choose_arm(100, 0, 0, pin=Arm.ORIGINAL) is Arm.ORIGINAL
    shadow = sum(take_shadow(20, 0, i) for i in range(1000))
    assert 190 <= shadow <= 210
    # routing and shadow sampling are different sequences
    assert [draw(0, i) for i in range(5)] != [draw(0, i, "shadow") for i in range(5)]


# -- policy files ---------------------------------------------------------------------------
def test_policy_yaml_defaults_and_strict_reading(tmp_path):
    assert load_policy(None) == Policy()
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nstages: [10, 50, 100]\nmin_requests: 7\nthresholds:\n  kl: 0.2\n")
    policy = load_policy(path)
    assert policy.stages == (10.0, 50.0, 100.0) and policy.min_requests == 7
    assert policy.thresholds == Thresholds(kl=0.2)
    assert policy_from_dict(policy.to_dict()) == policy
    for text, words in [("stage: [5]", "unknown key 'stage'"), ("stages: [50, 5]", "increasing"),
                        ("min_requests: lots", "expected an integer"), ("thresholds: {agreement: 2}", "out of range"),
                        ("thresholds: {speed: 1}", "unknown key 'speed'"), ("version: 9", "version 9"),
                        ("stages: [", "not valid YAML"), ("window: 5\nmin_samples: 9", "min_samples")]:
        path.write_text(text)
        with pytest.raises(UserError, match=words):
            load_policy(path)
    with pytest.raises(UserError, match="cannot read"):
        load_policy(tmp_path / "missing.yaml")


def test_canary_sets_the_first_stage():
    assert Policy().with_start(10).stages == (10.0, 25.0, 50.0, 100.0)
    assert Policy().with_start(60).stages == (60.0, 100.0)
    assert Policy().with_start(None).stages == Policy().stages
    with pytest.raises(UserError, match="--canary"):
        Policy().with_start(150)


# -- the rollout fold -----------------------------------------------------------------------
def request(arm, latency=0.1, error=False, **extra):
    return {"type": "request", "arm": arm, "latency": None if error else latency, "error": error, **extra}


def shadow(kl=0.01, agreement=0.95):
    return {"type": "shadow", "kl": kl, "agreement": agreement, "logprob": -2.0}


def feed(rollout, events):
    """Apply events the way the controller does; returns the verdicts it acted on."""
    verdicts = []
    for event in events:
        rollout.apply(event)
        verdict = rollout.verdict()
        if verdict is not None:
            rollout.apply(verdict)
            verdicts.append(verdict)
    return verdicts


POLICY = Policy(stages=(5, 25, 50, 100), min_requests=10, min_shadow=3, window=20, shadow_window=5, min_samples=10,
                min_shadow_samples=3)


def healthy(n):
    for _ in range(n):
        yield request("original")
        yield request("candidate")
        yield shadow()


def test_a_healthy_candidate_is_promoted_through_every_stage():
    rollout = Rollout(POLICY)
    assert rollout.share == 5 and rollout.status is Status.RAMPING
    verdicts = feed(rollout, healthy(60))
    assert [v["stage"] for v in verdicts] == [1, 2, 3] and all(v["type"] == "promote" for v in verdicts)
    assert rollout.share == 100 and rollout.status is Status.COMPLETE
    assert "10 candidate requests" in verdicts[0]["reason"]


@pytest.mark.parametrize("bad, words, most", [
    (lambda: request("candidate", error=True), "error rate", 3),
    # latency compares this stage's requests only: 5 so far, min_samples is 10
    (lambda: request("candidate", latency=0.5), "p95 latency", 7),
    (lambda: shadow(agreement=0.1), "agreement", 3),
    (lambda: shadow(kl=3.0), "KL", 3),
])
def test_each_threshold_fails_over_at_once_and_says_why(bad, words, most):
    rollout = Rollout(POLICY)
    feed(rollout, healthy(25))
    assert rollout.stage == 2
    verdicts = []
    for count in range(1, 10):
        verdicts += feed(rollout, [request("original"), bad()])
        if verdicts:
            break
    assert count <= most, count  # a handful of bad events, not a stage's worth
    assert verdicts[-1]["type"] == "failover" and words in verdicts[-1]["reason"]
    assert rollout.share == 0 and rollout.status is Status.FAILED_OVER
    assert feed(rollout, healthy(30)) == []  # it stays failed until an admin acts


def test_a_hanging_candidate_fails_over_on_its_unfinished_requests():
    rollout = Rollout(POLICY)
    feed(rollout, [request("original"), request("candidate")] * 10)
    assert rollout.verdict(inflight=[0.15]) is None
    verdict = rollout.verdict(inflight=[5.0, 5.0])
    assert verdict["type"] == "failover" and "2 still running" in verdict["reason"]


def test_latency_is_compared_within_a_stage():
    rollout = Rollout(POLICY)
    feed(rollout, [request("original", latency=0.01), request("candidate", latency=0.015)] * 10)
    rollout.apply({"type": "promote", "stage": 3, "share": 100.0})
    # at 100% the candidate carries all the load and the original none: no stale comparison
    assert feed(rollout, [request("candidate", latency=0.05)] * 30) == []
    assert rollout.status is Status.COMPLETE


def test_thresholds_wait_for_enough_samples():
    rollout = Rollout(POLICY)
    assert feed(rollout, [request("original"), request("candidate", error=True)]) == []
    assert feed(rollout, [shadow(agreement=0.0), shadow(agreement=0.0)]) == []
    assert feed(rollout, [shadow(agreement=0.0)])[0]["type"] == "failover"


def test_admin_actions_and_pause():
    rollout = Rollout(POLICY)
    rollout.apply(admin_event(rollout, "pause"))
    assert rollout.status is Status.PAUSED
    assert feed(rollout, healthy(40)) == []  # paused: no promotion ...
    assert feed(rollout, [request("candidate", error=True)] * 3)[0]["type"] == "failover"  # ... but still guarded
    event = admin_event(rollout, "promote")
    assert event["stage"] == 0  # a failed rollout starts again at the first stage
    rollout.apply(event)
    assert rollout.status is Status.RAMPING and rollout.share == 5
    assert feed(rollout, [request("original"), request("candidate")]) == []  # the old errors are forgotten
    rollout.apply(admin_event(rollout, "promote", {"stage": 3}))
    assert rollout.status is Status.COMPLETE and rollout.share == 100
    with pytest.raises(UserError, match="last stage"):
        admin_event(rollout, "promote")
    rollout.apply(admin_event(rollout, "rollback"))
    assert rollout.share == 0 and rollout.status is Status.ROLLED_BACK
    for body, words in [({"stage": 9}, "stage must be"), ({"stage": "1"}, "stage must be")]:
        with pytest.raises(UserError, match=words):
            admin_event(rollout, "promote", body)
    with pytest.raises(UserError, match="paused must be"):
        admin_event(rollout, "pause", {"paused": "no"})


def test_replaying_the_log_gives_the_same_state(tmp_path):
    log = EventLog(tmp_path)
    live = Rollout(POLICY)
    for event in healthy(25):
        stamped = log.append(event)
        live.apply(stamped)
        verdict = live.verdict()
        if verdict:
            live.apply(log.append(verdict))
    log.close()
    replayed = Rollout(POLICY)
    for event in read_events(tmp_path / "events.jsonl"):
        replayed.apply(event)
    assert replayed.snapshot() == live.snapshot() and replayed.stage == 2


# -- the event log --------------------------------------------------------------------------
def test_event_log_drops_a_torn_last_line_and_refuses_damage(tmp_path):
    log = EventLog(tmp_path)
    log.append({"type": "pause", "paused": True})
    log.close()
    path = tmp_path / "events.jsonl"
    with open(path, "a") as handle:
        handle.write('{"v":1,"t":1,"type":"requ')  # killed mid-write
    assert len(read_events(path)) == 1
    log = EventLog(tmp_path)
    assert len(log.past) == 1
    log.append({"type": "rollback", "reason": "x"})
    log.close()
    assert [e["type"] for e in read_events(path)] == ["pause", "rollback"]
    with pytest.raises(ValueError):
        EventLog(tmp_path).append({"type": "nonsense"})
    path.write_text('{"v":1,"t":1,"type":"pause","paused":true}\nnot json\n')
    with pytest.raises(UserError, match="line 2 is not JSON"):
        read_events(path)
    path.write_text('{"v":2,"t":1,"type":"pause"}\n')
    with pytest.raises(UserError, match="line 1"):
        read_events(path)


# -- monitor, metrics, dashboard data -------------------------------------------------------
def monitored():
    monitor, rollout = Monitor(bucket_s=1.0), Rollout(POLICY)
    events = [{"type": "start", "share": 5.0, "t": 100.0}]
    for i in range(20):
        events.append({**request("original", latency=0.1 + i / 1000, ttft=0.01, tokens=4), "t": 100.0 + i / 10})
        events.append({**request("candidate", latency=0.2, ttft=0.02, tokens=8), "t": 100.0 + i / 10})
    events += [{**request("candidate", error=True), "t": 103.0}, {**shadow(), "t": 103.5},
               {"type": "promote", "stage": 1, "share": 25.0, "reason": "ok", "by": "policy", "t": 104.0},
               {"type": "failover", "stage": 1, "reason": "boom", "t": 105.0}]
    for event in events:
        monitor.apply(event)
        rollout.apply(event)
    return monitor, rollout


def test_monitor_summaries_and_prometheus_text():
    monitor, rollout = monitored()
    original, candidate = monitor.arms[Arm.ORIGINAL].summary(), monitor.arms[Arm.CANDIDATE].summary()
    assert original["requests"] == 20 and candidate["requests"] == 21 and candidate["errors"] == 1
    assert candidate["tokens_per_s"] == pytest.approx(40.0)
    assert original["latency_p50"] == pytest.approx(quantile([0.1 + i / 1000 for i in range(20)], 0.5))
    text = render_metrics(monitor, rollout)
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert line.startswith(("# HELP autocompress_serve_", "# TYPE autocompress_serve_"))
            continue
        name, value = line.rsplit(" ", 1)
        samples[name] = float(value)
    assert samples['autocompress_serve_requests_total{arm="candidate"}'] == 21
    assert samples['autocompress_serve_errors_total{arm="candidate"}'] == 1
    assert samples['autocompress_serve_latency_seconds{arm="candidate",quantile="0.95"}'] == pytest.approx(0.2)
    assert samples["autocompress_serve_canary_share"] == 0 and samples["autocompress_serve_failovers_total"] == 1
    assert samples['autocompress_serve_status{status="failed_over"}'] == 1
    assert math.isnan(samples['autocompress_serve_ttft_seconds{arm="original",quantile="0.5"}']) is False


def test_dashboard_data_marks_promotions_and_failovers():
    monitor, rollout = monitored()
    data = dashboard_data(monitor, rollout, now=106.0)
    assert [m["kind"] for m in data["markers"]] == ["start", "promote", "failover"]
    assert data["markers"][-1]["t"] == 105_000 and data["markers"][-1]["text"] == "boom"
    series = data["series"]
    assert series["t"] == [100_000, 101_000, 103_000, 104_000, 105_000]  # no bucket for a second without events
    assert series["share"] == [5.0, 5.0, 5.0, 25.0, 0.0]
    assert series["share_t"] == [100_000, 104_000, 105_000, 106_000] and series["share_steps"] == [5, 25, 0, 0]
    assert series["rate"]["original"][0] == 10 and series["p95"]["candidate"][0] == pytest.approx(0.2)
    assert data["state"]["status"] == "failed_over" and data["arms"]["candidate"]["errors"] == 1


# -- shadow scores --------------------------------------------------------------------------
def test_shadow_scores_of_equal_and_of_random_distributions():
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    same = torch.log_softmax(logits, -1)
    tokens = logits.argmax(-1).tolist()
    score = compare(same, same.clone(), tokens)
    assert score["kl"] == pytest.approx(0, abs=1e-6) and score["agreement"] == 1 and score["tokens"] == 6
    noise = torch.log_softmax(torch.randn(6, 50) * 10, -1)
    bad = compare(same, noise, noise.argmax(-1).tolist())
    assert bad["kl"] > 1 and bad["agreement"] < 0.5 and bad["logprob"] < score["logprob"]


# -- the wire format ------------------------------------------------------------------------
def test_openai_request_checks():
    params = openai.parse_params({"max_tokens": 8, "temperature": 0, "stop": "\n", "seed": 3, "user": "x"}, 64)
    assert params == openai.Params(max_tokens=8, temperature=0.0, stop=("\n",), seed=3)
    assert openai.parse_params({"max_completion_tokens": 5}, 64).max_tokens == 5
    for body, param in [({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 65}, "max_tokens"),
                        ({"temperature": 3}, "temperature"), ({"n": 2}, "n"), ({"echo": True}, "echo"),
                        ({"logprobs": 2}, "logprobs"), ({"stop": [1]}, "stop"), ({"stream": "yes"}, "stream"),
                        ({"seed": 1.5}, "seed"), ({"top_p": True}, "top_p")]:
        with pytest.raises(openai.BadRequest) as caught:
            openai.parse_params(body, 64)
        assert caught.value.param == param and caught.value.status == 400
    assert openai.parse_prompt({"prompt": ["hi"]}) == "hi"
    with pytest.raises(openai.BadRequest, match="prompt must be"):
        openai.parse_prompt({"prompt": [1, 2]})
    messages = openai.parse_messages({"messages": [{"role": "developer", "content": [{"type": "text", "text": "a"}]},
                                                   {"role": "user", "content": "b"}]})
    assert messages == [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]
    for body in [{}, {"messages": []}, {"messages": [{"role": "robot", "content": "x"}]},
                 {"messages": [{"role": "user", "content": None}]}]:
        with pytest.raises(openai.BadRequest):
            openai.parse_messages(body)


class CharTokenizer:
    """Decodes ids as characters (id 0xFFFD stands for a half-finished UTF-8 sequence)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_text_assembler_holds_back_stop_strings_and_partial_characters():
    text = TextAssembler(CharTokenizer(), ("END",))
    pieces = [text.push(ord(c)) for c in "abcE"]
    assert "".join(pieces) == "ab"  # "cE" could start "END"
    assert text.push(ord("N")) == "c" and text.push(ord("D")) == "" and text.stopped
    assert text.out == "abc"
    plain = TextAssembler(CharTokenizer(), ())
    assert plain.push(ord("x")) == "x" and plain.push(0xFFFD) == "" and plain.flush() == "\ufffd"
