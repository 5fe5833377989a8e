"""``autocompress serve`` as a command: bad input is one line and exit status 2, and a server
killed with SIGKILL resumes (``--resume``) with its stage and its event log."""
from __future__ import annotations

import copy
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from serve_helpers import CHAT_TEMPLATE

from autocompress.cli import main
from autocompress.serve.events import read_events

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    """A tiny Llama saved twice (original and candidate) as Hugging Face model directories."""
    from tiny import tiny_model

    root = tmp_path_factory.mktemp("serve-models")
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    for name in ("original", "candidate"):
        tiny_model("llama").save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return str(root / "original"), str(root / "candidate")


def fails(capsys, argv, words):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1, err


def test_bad_input_is_one_line_and_exit_status_2(models, tmp_path, capsys):
    original, candidate = models
    out = tmp_path / "run"
    for argv, words in [(["--canary", "150"], "expected a percentage from 0 to 100"),
                        (["--shadow", "lots"], "expected a percentage"), (["--port", "70000"], "expected a port")]:
        with pytest.raises(SystemExit) as stop:
            main(["serve", original, candidate, *argv])
        assert stop.value.code == 2
        assert words in capsys.readouterr().err
    fails(capsys, ["serve", str(tmp_path / "nothing"), candidate, "--out", str(out)], "neither a model directory")
    fails(capsys, ["serve", original, candidate, "--out", str(out), "--resume"], "does not exist")
    policy = tmp_path / "policy.yaml"
    policy.write_text("stages: [5, 25]\nspeed: 3\n")
    fails(capsys, ["serve", original, candidate, "--out", str(out), "--policy", str(policy)], "unknown key 'speed'")
    fails(capsys, ["serve", original, candidate, "--out", str(out), "--admin-token-file", str(tmp_path / "no")],
          "cannot read it")
    (tmp_path / "short").write_text("abc")
    fails(capsys, ["serve", original, candidate, "--out", str(out), "--admin-token-file", str(tmp_path / "short")],
          "at least 8 characters")
    out.mkdir()
    (out / "events.jsonl").write_text(json.dumps({"v": 1, "t": 1, "type": "start", "original": "x",
                                                  "candidate": candidate, "policy": {}}) + "\n")
    fails(capsys, ["serve", original, candidate, "--out", str(out)], "pass --resume")
    fails(capsys, ["serve", original, candidate, "--out", str(out), "--resume"], "a rollout of original 'x'")
    fails(capsys, ["serve", original, candidate, "--out", str(out), "--resume", "--canary", "5"], "keeps its stage")


def launch(models, out: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """Start ``autocompress serve`` on a free loopback port; returns the process and its URL."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen([sys.executable, "-m", "autocompress", "serve", *models, "--port", "0", "--out",
                                str(out), "--threads", "1", *extra], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env)
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline, seen = time.monotonic() + 120, []
    while time.monotonic() < deadline and process.poll() is None:
        if selector.select(timeout=1):
            line = process.stdout.readline()
            seen.append(line)
            found = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
            if found:
                return process, found.group(1)
    process.kill()
    process.wait(10)
    raise AssertionError(f"serve did not start: {''.join(seen)}{process.stdout.read() if process.stdout else ''}")


def test_kill_9_and_resume_keep_the_stage_and_the_log(models, tmp_path):
    out = tmp_path / "run"
    policy = tmp_path / "policy.yaml"
    policy.write_text("stages: [10, 50, 100]\nmin_requests: 3\nmin_shadow: 1\n")
    process, url = launch(models, out, "--canary", "10", "--shadow", "100%", "--policy", str(policy))
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            for _ in range(6):
                response = client.post("/v1/completions", json={"prompt": "The module", "max_tokens": 3},
                                       headers={"X-Autocompress-Arm": "candidate"})
                assert response.status_code == 200
            deadline = time.monotonic() + 30
            while client.get("/ready").json()["stage"] < 1 and time.monotonic() < deadline:
                time.sleep(0.1)
            before = client.get("/ready").json()
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    assert before["stage"] >= 1 and before["share"] >= 50
    logged = read_events(out / "events.jsonl")

    assert main(["serve", *models, "--port", "0", "--out", str(out)]) == 2  # an existing log needs --resume

    process, url = launch(models, out, "--resume")
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            after = client.get("/ready").json()
            metrics = client.get("/metrics").text
            assert client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                             "max_tokens": 2}).status_code == 200
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    assert (after["stage"], after["share"], after["stages"]) == (before["stage"], before["share"], before["stages"])
    assert 'autocompress_serve_requests_total{arm="candidate"} 6' in metrics  # counters survive the restart
    events = read_events(out / "events.jsonl")
    assert events[:len(logged)] == logged  # the old log is kept as it was
    starts = [e for e in events if e["type"] == "start"]
    assert [s["resumed"] for s in starts] == [False, True] and starts[1]["stage"] == before["stage"]
