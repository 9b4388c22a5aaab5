"""One dataset download per node: workers that ask at once share one fetch, and a broken fetch is never used.

A fabricated CIFAR-100 archive (torchvision's layout, a few images) is served by
an HTTP server on 127.0.0.1; torchvision's URL and checksums are pointed at it.
Nothing is downloaded from the internet.
"""

import hashlib
import io
import pickle
import subprocess
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from trainables.datasets import load_cifar100
from trainables.errors import DataError

from .conftest import ROOT

N_TRAIN, N_TEST = 30, 10


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def fabricated_cifar100() -> tuple[bytes, dict[str, str], np.ndarray]:
    """(the .tar.gz, md5 of each member, the train labels): torchvision's CIFAR-100 layout, tiny."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 100, N_TRAIN + N_TEST)
    images = rng.integers(0, 256, (N_TRAIN + N_TEST, 3 * 32 * 32), dtype=np.uint8)
    members = {
        "train": pickle.dumps({"data": images[:N_TRAIN], "fine_labels": labels[:N_TRAIN].tolist()}),
        "test": pickle.dumps({"data": images[N_TRAIN:], "fine_labels": labels[N_TRAIN:].tolist()}),
        "meta": pickle.dumps({"fine_label_names": [f"class{i}" for i in range(100)]}),
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), {name: _md5(data) for name, data in members.items()}, labels[:N_TRAIN]


class ArchiveServer:
    """Serves one archive at /cifar-100-python.tar.gz; counts the GETs that fetch it.

    ``mode``: whole, short (a truncated file served as if whole) or cut (the
    connection drops halfway); ``delay`` holds each GET that long first."""

    def __init__(self, archive: bytes):
        self.archive, self.gets, self.mode, self.delay = archive, 0, "whole", 0.0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _head(self, length):
                self.send_response(200)
                self.send_header("Content-Type", "application/gzip")
                self.send_header("Content-Length", str(length))
                self.end_headers()

            def do_HEAD(self):
                self._head(len(server.archive))

            def do_GET(self):
                if self.headers.get("Method") == "HEAD":  # torchvision's redirect probe is a GET saying so
                    return self._head(len(server.archive))
                server.gets += 1
                time.sleep(server.delay)
                body = server.archive
                if server.mode == "short":
                    body = body[: len(body) // 2]
                self._head(len(body))
                self.wfile.write(body[: len(body) // 2] if server.mode == "cut" else body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/cifar-100-python.tar.gz"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def served():
    archive, md5s, labels = fabricated_cifar100()
    server = ArchiveServer(archive)
    yield server, md5s, labels
    server.httpd.shutdown()


def point_torchvision_at(server: ArchiveServer, md5s: dict[str, str]) -> dict:
    """The CIFAR100 class attributes that send torchvision to the local server (URL and every checksum)."""
    return {"url": server.url, "tgz_md5": _md5(server.archive), "train_list": [["train", md5s["train"]]],
            "test_list": [["test", md5s["test"]]],
            "meta": {"filename": "meta", "key": "fine_label_names", "md5": md5s["meta"]}}


@pytest.fixture
def local_cifar(served, monkeypatch):
    from torchvision.datasets import CIFAR100

    server, md5s, labels = served
    for name, value in point_torchvision_at(server, md5s).items():
        monkeypatch.setattr(CIFAR100, name, value)
    server.gets, server.mode, server.delay = 0, "whole", 0.0
    return server, labels


WORKER = """
import json, sys
from torchvision.datasets import CIFAR100
for name, value in json.loads(sys.argv[1]).items():
    setattr(CIFAR100, name, value)
from trainables.datasets import load_cifar100
images, labels = load_cifar100(sys.argv[2], train=True, download=True)
print(json.dumps({"shape": list(images.shape), "labels": labels.tolist(), "sum": int(images.sum())}))
"""


def test_workers_that_fetch_at_once_download_the_archive_once_and_all_load_it(served, tmp_path):
    import json

    server, md5s, labels = served
    server.gets, server.mode, server.delay = 0, "whole", 1.5  # a slow download: the others arrive while it runs
    root = tmp_path / "data"
    patch = json.dumps(point_torchvision_at(server, md5s))
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, patch, str(root)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=180) for p in procs]
    server.delay = 0.0
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    assert server.gets == 1, f"the archive was fetched {server.gets} times for 3 workers on one node"
    loaded = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert all(x["shape"] == [N_TRAIN, 3, 32, 32] for x in loaded)
    assert all(x["labels"] == labels.tolist() for x in loaded), "every worker read the labels that were served"
    assert len({x["sum"] for x in loaded}) == 1
    assert _md5((root / "cifar-100-python.tar.gz").read_bytes()) == _md5(server.archive), "one intact copy"
    assert sorted(p.name for p in (root / "cifar-100-python").iterdir()) == ["meta", "test", "train"]


def test_a_half_written_archive_is_fetched_again_not_used(local_cifar, tmp_path):
    server, labels = local_cifar
    root = tmp_path / "data"
    root.mkdir()
    (root / "cifar-100-python.tar.gz").write_bytes(server.archive[: len(server.archive) // 3])  # a killed download
    images, got = load_cifar100(root, train=True, download=True)
    assert server.gets == 1, "the partial archive failed its checksum and was fetched again"
    assert torch.equal(got, torch.as_tensor(labels)) and images.shape == (N_TRAIN, 3, 32, 32)


@pytest.mark.parametrize("mode", ["short", "cut"])
def test_a_broken_download_is_one_error_and_the_next_attempt_fetches_it_whole(local_cifar, tmp_path, mode):
    """A truncated file served as whole, or a connection dropped halfway (urllib then returns what came)."""
    server, labels = local_cifar
    root = tmp_path / "data"
    server.mode = mode
    with pytest.raises(DataError) as info:
        load_cifar100(root, train=True, download=True)
    assert str(info.value) == (
        f"the CIFAR-100 archive downloaded to {root / 'cifar-100-python.tar.gz'} does not match its checksum (an "
        "interrupted or altered download); run again to fetch it anew")
    assert not (root / "cifar-100-python").exists(), "nothing was extracted from the broken archive"
    server.mode = "whole"
    _, got = load_cifar100(root, train=True, download=True)
    assert torch.equal(got, torch.as_tensor(labels))
    assert server.gets == 2
