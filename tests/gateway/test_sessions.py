"""Sessions and request records live in Redis: a follow-up turn sends only the new
message, goes to the decode instance holding the conversation's KV, prefills only the
new tokens, and answers exactly what a stateless request with the whole history gets."""

import json

import httpx
import pytest
import redis

from .conftest import API_KEY

H = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def rds(stack):
    with redis.Redis.from_url(stack.redis_url, decode_responses=True) as r:
        yield r


def record(rds, rid, timeout=5.0):
    """The request's record once it is final (records are written in the background)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        rec = rds.hgetall(f"tandem:request:{rid}")
        if rec.get("status") in ("finished", "aborted", "failed", "cancelled") or time.monotonic() > deadline:
            return rec
        time.sleep(0.05)


def chat(stack, model, messages, session=None, n=24, header=True):
    body = {"model": model, "messages": messages, "max_tokens": n, "temperature": 0, "ignore_eos": True}
    headers = dict(H)
    if session and header:
        headers["X-Session-ID"] = session
    elif session:
        body["session_id"] = session
    r = httpx.post(stack.base_url + "/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("header", [True, False])
def test_two_turn_chat_session(stack, model_name, rds, header):
    sid = f"chat-session-{header}"
    turn1 = [{"role": "user", "content": "Tell me a long story about a dragon and a knight who became friends."}]
    a1 = chat(stack, model_name, turn1, sid, header=header)
    answer1 = a1["choices"][0]["message"]["content"]
    rec1 = record(rds, a1["id"])
    assert rec1["status"] == "finished" and rec1["session_id"] == sid

    turn2 = [{"role": "user", "content": "And then what happened?"}]
    a2 = chat(stack, model_name, turn2, sid, header=header)  # only the new message is sent
    rec2 = record(rds, a2["id"])
    assert rec2["decode"] == rec1["decode"] and rec2["route_reason"] == "session"

    # Decode already held turn 1's prompt and answer: only the new tokens were prefilled.
    p1, p2 = a1["usage"]["prompt_tokens"], a2["usage"]["prompt_tokens"]
    cached = a2["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= (p1 // 16) * 16, (p1, cached)
    assert p2 - cached <= (p2 - p1) + 16

    full = turn1 + [{"role": "assistant", "content": answer1}] + turn2
    stateless = chat(stack, model_name, full)
    assert a2["choices"][0]["message"]["content"] == stateless["choices"][0]["message"]["content"]
    assert stateless["usage"]["prompt_tokens"] == p2

    session = json.loads(rds.get(f"tandem:session:{sid}"))
    assert session["turns"] == 2 and len(session["messages"]) == 4 and session["decode"] == rec1["decode"]
    assert 0 < rds.pttl(f"tandem:session:{sid}") <= 3600 * 1000


def test_completion_session_appends_tokens(stack, model_name, offline):
    sid = "completion-session"
    post = lambda prompt: httpx.post(stack.base_url + "/v1/completions", headers=H, timeout=60, json={
        "model": model_name, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
        "session_id": sid}).json()
    r1 = post("The history of the printing press begins in")
    r2 = post(" Meanwhile, in another city,")
    ids = offline.tokenizer.encode("The history of the printing press begins in")
    assert r2["usage"]["prompt_tokens"] > len(ids) + 8
    assert r2["usage"]["prompt_tokens_details"]["cached_tokens"] >= ((len(ids) + 8) // 16) * 16
    assert r1["choices"][0]["text"] and r2["choices"][0]["text"]


def test_concurrent_turns_of_one_session_conflict(stack, model_name):
    """Two turns at once would each extend a history the other never saw: the second
    one gets 409 while the first runs, and the session keeps exactly one turn."""
    import threading

    body = {"model": model_name, "messages": [{"role": "user", "content": "long answer please"}],
            "max_tokens": 60, "ignore_eos": True, "session_id": "busy-session"}
    first = {}
    t = threading.Thread(target=lambda: first.update(r=httpx.post(stack.base_url + "/v1/chat/completions",
                                                                  json=body, headers=H, timeout=60)))
    t.start()
    import time

    time.sleep(0.5)
    second = httpx.post(stack.base_url + "/v1/chat/completions", json=body, headers=H, timeout=60)
    t.join()
    assert first["r"].status_code == 200
    assert second.status_code == 409 and second.json()["error"]["param"] == "session_id"
    third = httpx.post(stack.base_url + "/v1/chat/completions", json={**body, "max_tokens": 2}, headers=H, timeout=60)
    assert third.status_code == 200  # the lock went with the first turn


def test_session_kind_mismatch_is_a_400(stack, model_name):
    r = httpx.post(stack.base_url + "/v1/completions", headers={**H, "X-Session-ID": "chat-session-True"},
                   json={"model": model_name, "prompt": "hi", "max_tokens": 2}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "session_id"


def test_request_record_tracks_progress(stack, model_name, rds):
    r = httpx.post(stack.base_url + "/v1/completions", headers=H, timeout=60, json={
        "model": model_name, "prompt": "abc", "max_tokens": 5, "temperature": 0, "ignore_eos": True}).json()
    rec = record(rds, r["id"])
    assert rec["status"] == "finished" and rec["finish_reason"] == "length"
    tokens = rds.lrange(f"tandem:request:{r['id']}:tokens", 0, -1)
    assert int(rec["output_tokens"]) == 5 and len(tokens) == 5
    assert rec["decode"].startswith("decode-") and float(rec["ttft"]) > 0 and float(rec["e2e"]) >= float(rec["ttft"])
    assert 0 < rds.pttl(f"tandem:request:{r['id']}") <= 86400 * 1000
