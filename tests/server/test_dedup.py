"""performance.dedup through the OpenAI API (the official client), on the default model.

The server runs in scheduler mode off (one generation at a time) behind a "blocker" stream,
so that the identical requests a test sends are all queued, nothing generated yet, when they
arrive: whether they share is decided by dedup, not by timing. The test waits until
/metrics counts the followers, then closes the blocker.

With dedup on, identical concurrent greedy requests give identical outputs (equal to the same
request alone), each with its own response id and usage, and krserve_dedup_requests_total
rises; a follower that disconnects mid-stream and a leader that disconnects mid-stream both
leave the others' outputs whole. With dedup off (the default) nothing is shared.
"""
import concurrent.futures as cf
import json
import threading

import openai
import pytest

from srv_helpers import Server, wait_for

PROMPT = "List the planets of the solar system in order, with one fact about each:"
OFF = ("--set", "performance.gpuScheduler.mode=off")


def metric(srv, name):
    st, _, raw = srv.get("/metrics")
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in raw.decode().splitlines()
               if ln.startswith(name + "{") or ln.startswith(name + " "))


def dedups(srv):
    return metric(srv, "krserve_dedup_requests_total")


def queued(srv):
    st, _, raw = srv.get("/stats")
    return json.loads(raw)["models"][0]["scheduler"]["queued"]["default"]


def client_for(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)


class Blocker:
    """A long streaming generation that keeps the engine (mode off) busy until closed."""

    def __init__(self, client):
        self.stream = client.completions.create(model="default", prompt="Tell a long story:",
                                                max_tokens=400, temperature=0, stream=True)
        next(iter(self.stream))  # running: what comes next queues behind it

    def close(self):
        self.stream.close()


def greedy(client, max_tokens=24, **kw):
    return client.completions.create(model="default", prompt=PROMPT, max_tokens=max_tokens,
                                     temperature=0, **kw)


@pytest.fixture(scope="module")
def dedup_server():
    s = Server(args=OFF, env={"KRSERVE_DEDUP": "1"})
    yield s
    s.stop()


def test_identical_greedy_requests_share_one_generation(dedup_server):
    srv, client = dedup_server, client_for(dedup_server)
    ref = greedy(client)  # alone
    before = dedups(srv)
    blocker = Blocker(client)
    with cf.ThreadPoolExecutor(4) as ex:
        futs = [ex.submit(greedy, client) for _ in range(4)]
        assert wait_for(lambda: dedups(srv) - before >= 3, timeout=60)
        blocker.close()
        got = [f.result() for f in futs]
    assert dedups(srv) - before == 3  # one leader, three followers
    assert len({r.id for r in got}) == 4  # each its own response
    for r in got:
        assert r.choices[0].text == ref.choices[0].text
        assert r.choices[0].finish_reason == ref.choices[0].finish_reason
        assert r.usage.prompt_tokens == ref.usage.prompt_tokens
        assert r.usage.completion_tokens == ref.usage.completion_tokens == 24
    st, _, raw = srv.get("/stats")
    assert json.loads(raw)["models"][0]["metrics"]["dedup"]["requests"] >= 3


def stream_text(stream, stop_after=None):
    """Concatenated text of a completions stream; with stop_after, closes it after that many
    chunks and returns None."""
    text = ""
    for i, ch in enumerate(stream):
        if stop_after is not None and i + 1 >= stop_after:
            stream.close()
            return None
        if ch.choices:
            text += ch.choices[0].text
    return text


@pytest.mark.parametrize("quitter", [0, 1], ids=["leader", "follower"])
def test_disconnect_does_not_disturb_the_others(dedup_server, quitter):
    """Request 0 leads (it arrived first), 1..2 follow; `quitter` disconnects after 3 chunks.
    The others still get the whole text of the request alone."""
    srv, client = dedup_server, client_for(dedup_server)
    ref = greedy(client, max_tokens=48).choices[0].text
    before = dedups(srv)
    blocker = Blocker(client)
    streams = [None] * 3
    for n in range(3):  # sent one after another: the first one queues and leads
        threading.Thread(target=lambda i=n: streams.__setitem__(
            i, greedy(client, max_tokens=48, stream=True)), daemon=True).start()
        if n == 0:
            assert wait_for(lambda: queued(srv) == 1, timeout=60)
        else:
            assert wait_for(lambda i=n: dedups(srv) - before == i, timeout=60)
    blocker.close()
    assert wait_for(lambda: all(s is not None for s in streams), timeout=60)
    with cf.ThreadPoolExecutor(3) as ex:
        futs = [ex.submit(stream_text, s, 3 if i == quitter else None)
                for i, s in enumerate(streams)]
        got = [f.result(timeout=120) for f in futs]
    for i, text in enumerate(got):
        if i == quitter:
            assert text is None
        else:
            assert text == ref, f"request {i} after request {quitter} left"
    assert dedups(srv) - before == 2
    # The server is healthy and serves the same text afterwards.
    assert greedy(client, max_tokens=48).choices[0].text == ref


def test_dedup_off_shares_nothing():
    srv = Server(args=OFF)
    try:
        client = client_for(srv)
        ref = greedy(client, max_tokens=8)
        blocker = Blocker(client)
        with cf.ThreadPoolExecutor(3) as ex:
            futs = [ex.submit(greedy, client, 8) for _ in range(3)]
            assert wait_for(lambda: queued(srv) == 3, timeout=60)  # none shared
            blocker.close()
            got = [f.result() for f in futs]
        assert all(r.choices[0].text == ref.choices[0].text for r in got)
        assert dedups(srv) == 0
    finally:
        srv.stop()
