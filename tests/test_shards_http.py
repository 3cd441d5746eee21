"""Webdataset shards streamed over HTTP (a loopback server) and from pipe: commands, and what a run does
when a shard's connection drops or no shard can be read at all."""

import concurrent.futures
import http.server
import json
import socket
import threading
import warnings
from pathlib import Path

import pytest

from conftest import IMAGE_RECIPE, TINY_IMAGE
from multijepa.datasets.files import detect_format
from multijepa.datasets.shards import ShardDataset, shard_urls, write_shards
from multijepa.errors import DataError
from multijepa.recipe import load_recipe
from multijepa.train import pretrain

SHARDS = "shard-{000000..000001}.tar"


@pytest.fixture(scope="module")
def shard_dir(shapes, tmp_path_factory) -> Path:
    """Two shards of 16 tiny PNGs each."""
    out = tmp_path_factory.mktemp("shards")
    assert len(write_shards(shapes, out, per_shard=16)) == 2
    return out


class ShardServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), ShardHandler)
        self.root, self.drop_first, self.requests = root, set(), []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class ShardHandler(http.server.BaseHTTPRequestHandler):
    timeout = 10  # a stuck client cannot hold a server thread for long

    def do_GET(self):
        name = self.path.lstrip("/")
        self.server.requests.append(name)
        path = self.server.root / name
        if "/" in name or not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if name in self.server.drop_first:
            # A connection that breaks mid-shard: half the promised bytes, then the socket closes.
            self.server.drop_first.discard(name)
            self.wfile.write(data[:len(data) // 2])
            self.close_connection = True
            return
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(shard_dir, monkeypatch):
    for name in ("no_proxy", "NO_PROXY"):  # urllib honours http_proxy: loopback requests must not leave the machine
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    srv = ShardServer(shard_dir)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def within(seconds: float, fn, *args):
    """fn(*args), failing the test instead of hanging when it takes longer than ``seconds``."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        return pool.submit(fn, *args).result(timeout=seconds)
    except concurrent.futures.TimeoutError:
        pytest.fail(f"{fn.__name__} still running after {seconds} s: it hangs")
    finally:
        pool.shutdown(wait=False)


def tiny_run(tmp_path: Path, path: str, steps: int = 3):
    recipe = load_recipe(IMAGE_RECIPE, TINY_IMAGE + [f"data.path={path}", f"run.dir={tmp_path / 'run'}",
                                                   f"train.steps={steps}", "train.checkpoint_every=1000"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = within(60, pretrain, recipe)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return metrics, [str(w.message) for w in caught]


def test_pretrain__trains_from_http_shards(tmp_path, server):
    metrics, _ = tiny_run(tmp_path, f"{server.url}/{SHARDS}")
    assert [m["step"] for m in metrics] == [1, 2, 3] and metrics[-1]["bad_files"] == 0
    assert {"shard-000000.tar", "shard-000001.tar"} <= set(server.requests)


def test_pretrain__connection_dropped_mid_shard_is_skipped_named_and_counted(tmp_path, server):
    server.drop_first.add("shard-000001.tar")
    metrics, messages = tiny_run(tmp_path, f"{server.url}/{SHARDS}")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    lost = [m for m in messages if "lost the shard" in m]
    assert len(lost) == 1 and metrics[-1]["bad_files"] == 1, messages
    assert f"{server.url}/shard-000001.tar: lost the shard after " in lost[0] and "image samples" in lost[0]
    assert "the connection closed after " in lost[0] and " bytes" in lost[0]


def test_shard_dataset__reads_pipe_commands(shard_dir):
    path = f"pipe:cat {shard_dir / 'shard-000000.tar'}"
    assert shard_urls(path) == [path]
    recipe = load_recipe(IMAGE_RECIPE, TINY_IMAGE + [f"data.path={path}"])
    assert detect_format(recipe) == "shards"  # a pipe: data.path need not end in .tar
    stream = iter(ShardDataset([path], recipe, buffer=4))
    samples = [within(20, next, stream) for _ in range(20)]  # more than a pass over the shard's 16
    assert all(s["input"].shape == (3, 16, 16) and not s["bad"] for s in samples)
    assert len({s["name"] for s in samples}) == 16


def test_pretrain__every_shard_failing_stops_with_a_data_error(tmp_path, server):
    with socket.socket() as s:  # a port with nothing listening: the connection is refused
        s.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{s.getsockname()[1]}/shard-000000.tar"
    missing = f"{server.url}/missing-000000.tar"
    pipe = f"pipe:cat {tmp_path / 'nowhere.tar'}"
    recipe = load_recipe(IMAGE_RECIPE, TINY_IMAGE + [f"data.path={missing}", f"run.dir={tmp_path / 'run'}",
                                                   "train.steps=3"])
    stream = iter(ShardDataset([missing, refused, pipe], recipe, buffer=4))
    with pytest.raises(DataError, match="none of the shards could be read") as e:
        within(20, next, stream)
    assert missing in str(e.value) and "HTTP 404" in str(e.value)
    assert refused in str(e.value) and "cannot connect" in str(e.value)
    assert pipe in str(e.value) and "exited with status 1" in str(e.value) and "nowhere.tar" in str(e.value)
    with pytest.raises(DataError, match=f"none of the shards could be read.*{missing}"):
        within(60, pretrain, recipe)


def test_shard_dataset__small_data_set_reads_one_pass_before_the_first_sample(tmp_path, server):
    recipe = load_recipe(IMAGE_RECIPE, TINY_IMAGE + ["data.path=unused.tar"])
    urls = shard_urls(f"{server.url}/{SHARDS}")
    stream = iter(ShardDataset(urls, recipe, buffer=1000))  # the default: far more than the 32 samples
    names = [within(20, next, stream)["name"] for _ in range(64)]
    assert len(set(names)) == 32  # every sample, shuffled across passes
    assert len(server.requests) <= 8, server.requests  # not ~60 downloads to fill the buffer
