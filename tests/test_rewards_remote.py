"""The remote reward (stages.rewards.remote) against servers this test starts on the loopback
interface: one that scores, one that hangs, one that answers garbage, one that fails then recovers,
and one that is not there."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from stages.rewards.remote import RemoteReward, decode_png
from stages.support.errors import TempflowError
from tests.conftest import invoke, make_rollout

Answer = Callable[[dict], tuple[int, bytes]]


def brightness(request: dict) -> tuple[int, bytes]:
    """A judge: mean pixel value / 255 plus the prompt's length / 1000, so order and pairing show."""
    scores = [float(decode_png(im).mean() / 255 + len(p) / 1000) for im, p in zip(request["images"], request["prompts"])]
    return 200, json.dumps({"scores": scores}).encode()


class Server:
    """A loopback HTTP server whose answer to each POST a test chooses; it counts the requests."""

    def __init__(self, answer: Answer) -> None:
        self.answer, self.requests = answer, 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                server.requests += 1
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, payload = server.answer(body)
                self.send_response(status)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/score"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def serve() -> Iterator[Callable[[Answer], Server]]:
    started: list[Server] = []

    def start(answer: Answer) -> Server:
        started.append(Server(answer))
        return started[-1]

    yield start
    for server in started:
        server.close()


@pytest.fixture
def images() -> np.ndarray:
    return np.stack([np.full((8, 8, 3), v, dtype=np.uint8) for v in (0, 64, 128, 255)])


PROMPTS = ["a", "bb", "ccc", "dddd"]


def test_scores_come_back_in_order(serve, images):
    server = serve(brightness)
    scores = RemoteReward("judge", server.url)(images, PROMPTS)
    np.testing.assert_allclose(scores, [v / 255 + (i + 1) / 1000 for i, v in enumerate((0, 64, 128, 255))])
    assert server.requests == 1


def test_a_server_that_hangs_times_out_after_its_retries(serve, images):
    server = serve(lambda request: (time.sleep(3), brightness(request))[1])
    began = time.perf_counter()
    with pytest.raises(TempflowError, match=r"did not answer within 0.3 s \(2 tries\)") as err:
        RemoteReward("judge", server.url, timeout=0.3, retries=1, backoff=0.05)(images, PROMPTS)
    assert time.perf_counter() - began < 2.5 and server.url in str(err.value)


@pytest.mark.parametrize("payload, needle", [
    (b"<html>Bad Gateway</html>", "not JSON: '<html>Bad Gateway</html>'"),
    (b'{"scores": [1, 2]}', 'without 4 numbers under "scores" (got 2 entries)'),
    (b'{"score": [1, 2, 3, 4]}', "(got NoneType)"),
    (b'{"scores": [1, "2", 3, 4]}', 'without 4 numbers under "scores"'),
])
def test_garbage_is_refused_in_one_line_without_retrying(serve, images, payload, needle):
    server = serve(lambda request: (200, payload))
    with pytest.raises(TempflowError) as err:
        RemoteReward("judge", server.url, retries=3, backoff=0.01)(images, PROMPTS)
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert server.requests == 1


def test_5xx_is_retried_with_back_off_and_4xx_is_not(serve, images, monkeypatch):
    import stages.rewards.remote as remote

    waits: list[float] = []
    monkeypatch.setattr(remote.time, "sleep", waits.append)
    answers = iter([(503, b"busy"), (507, b"full"), (429, b"slow down"), brightness])
    server = serve(lambda request: (lambda a: a(request) if callable(a) else a)(next(answers)))
    assert len(RemoteReward("judge", server.url, retries=3, backoff=0.5)(images, PROMPTS)) == 4
    assert server.requests == 4 and waits == [0.5, 1.0, 2.0]  # doubling
    waits.clear()
    down = serve(lambda request: (502, b"bad gateway"))
    with pytest.raises(TempflowError, match=r"answered HTTP 502: bad gateway \(9 tries\)"):
        RemoteReward("judge", down.url, retries=8, backoff=1.0)(images, PROMPTS)
    assert waits == [1, 2, 4, 8, 16, 32, 60, 60]  # capped at a minute
    bad = serve(lambda request: (400, b"no such prompt format\nsecond line"))
    with pytest.raises(TempflowError, match="answered HTTP 400: no such prompt format$"):
        RemoteReward("judge", bad.url, retries=3, backoff=0.01)(images, PROMPTS)
    assert bad.requests == 1


def test_a_cut_answer_is_retried_then_named(images):
    """A server that promises 100 bytes and hangs up after 2: http.client's IncompleteRead."""
    class Cut(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b"{}")
            self.close_connection = True

        def log_message(self, *args) -> None:
            pass

    http = ThreadingHTTPServer(("127.0.0.1", 0), Cut)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    try:
        with pytest.raises(TempflowError, match=r"sent a broken answer \(IncompleteRead\) \(2 tries\)"):
            RemoteReward("judge", f"http://127.0.0.1:{http.server_address[1]}/", retries=1, backoff=0.01)(images, PROMPTS)
    finally:
        http.shutdown()
        http.server_close()


def test_a_server_that_is_down(images):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(TempflowError, match=r"is down or unreachable .* \(3 tries\)"):
        RemoteReward("judge", f"http://127.0.0.1:{port}/", retries=2, backoff=0.01)(images, PROMPTS)


def test_score_with_a_remote_reward_end_to_end(serve, policy_dir, tmp_path):
    import pyarrow.parquet as pq

    server = serve(brightness)
    rollout = make_rollout(policy_dir, tmp_path / "r")
    out = tmp_path / "s.parquet"
    r = invoke("score", "--rollout", rollout, "--reward", "judge:2", "--reward", "jpeg_compressibility",
               "--reward-url", f"judge={server.url}", "--batch-size", "4", "--out", out)
    assert r.exit_code == 0, r.output
    table = pq.read_table(out)
    meta = json.loads(table.schema.metadata[b"tempflow"])
    assert meta["rewards"][0] == {"name": "judge", "weight": 2.0, "source": server.url}
    judged = table.column("reward_judge").to_numpy()
    assert np.isfinite(judged).all() and np.ptp(judged) > 0 and server.requests >= 2


def test_score_says_when_the_server_is_down(policy_dir, tmp_path):
    rollout = make_rollout(policy_dir, tmp_path / "r")
    r = invoke("score", "--rollout", rollout, "--reward", "judge", "--reward-url", "judge=http://127.0.0.1:9/",
               "--reward-retries", "0", "--out", tmp_path / "s.parquet")
    assert r.exit_code == 1 and "reward judge: http://127.0.0.1:9/ is down or unreachable" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "s.parquet").exists()


def test_the_example_server_serves_the_example_plugin(policy_dir, tmp_path):
    """examples/rewards/server.py behind --reward-url gives what the plugin gives in-process."""
    import subprocess
    import sys
    from pathlib import Path

    import pyarrow.parquet as pq

    examples = Path(__file__).resolve().parents[1] / "examples" / "rewards"
    server = subprocess.Popen([sys.executable, str(examples / "server.py"), "--reward", "colorfulness:colorfulness",
                               "--port", "0"], stdout=subprocess.PIPE, text=True,
                              env={"PYTHONPATH": str(examples), "PATH": "/usr/bin:/bin"})
    try:
        url = server.stdout.readline().split()[-1]
        rollout = make_rollout(policy_dir, tmp_path / "r")
        r = invoke("score", "--rollout", rollout, "--reward", "judge", "--reward-url", f"judge={url}",
                   "--out", tmp_path / "remote.parquet")
        assert r.exit_code == 0, r.output
    finally:
        server.terminate()
        server.wait(10)
    sys.path.insert(0, str(examples))
    try:
        r = invoke("score", "--rollout", rollout, "--reward", "colorfulness:colorfulness", "--out", tmp_path / "local.parquet")
    finally:
        sys.path.remove(str(examples))
    assert r.exit_code == 0, r.output
    remote = pq.read_table(tmp_path / "remote.parquet").column("reward_judge").to_numpy()
    local = pq.read_table(tmp_path / "local.parquet").column("reward_colorfulness.colorfulness").to_numpy()
    np.testing.assert_allclose(remote, local)  # PNG is lossless: the server saw the same pixels
    assert np.ptp(local) > 0
