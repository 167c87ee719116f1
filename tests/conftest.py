import functools
import http.server
import threading
from pathlib import Path
from unittest import mock

import pytest

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "fixtures" / "golden"


@pytest.fixture(autouse=True)
def same_random_draw():
    """Each test starts from the same torch random state on every run and host, so a tolerance
    that holds once holds again, and one that fails can be reproduced."""
    import torch

    torch.manual_seed(0)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN


class _SiteHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the site's folder, logs each request path, and lets a test answer a path its own way."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.requests.append(self.path)
        answer = self.server.answers.get(self.path)
        if answer is None:
            super().do_GET()
        else:
            answer(self)


@pytest.fixture
def serve_folder():
    """Start an HTTP server on 127.0.0.1 for a folder: ``serve_folder(root)`` returns the server,
    with ``url``, ``requests`` (the paths asked for, in order) and ``answers`` (path -> function of
    the request handler, for faulty answers).  ``release`` is set at the end, for answers that stall."""
    servers = []
    release = threading.Event()

    def start(root: Path):
        server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(_SiteHandler, directory=str(root))
        )
        server.url, server.requests, server.answers, server.release = (
            f"http://127.0.0.1:{server.server_port}", [], {}, release
        )
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    release.set()
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def release_site(tmp_path, monkeypatch, serve_folder):
    """A server for ``tmp_path/release`` that plays the release prefix; the cache goes to ``tmp_path/cache``."""
    root = tmp_path / "release"
    root.mkdir()
    server = serve_folder(root)
    server.root = root
    monkeypatch.setenv("PACAVIT_CHECKPOINT_BASE_URL", server.url)
    monkeypatch.setenv("PACAVIT_CHECKPOINT_CACHE", str(tmp_path / "cache"))
    return server


@pytest.fixture
def release_server(release_site):
    """The folder that :func:`release_site` serves as the release prefix on 127.0.0.1."""
    return release_site.root


@pytest.fixture
def train_config_of(monkeypatch, tmp_path):
    """train_config_of(config, default_scope, task, *args): the config that ``train_main`` hands
    to mmengine's Runner for these arguments (the Runner is not built, the dataset not checked)."""
    import mmengine.runner

    from runtime import openmmlab

    runs = []

    def run(config, default_scope, task, *args):
        handed = []
        monkeypatch.setattr(openmmlab, "check_data_roots", lambda cfg, loaders: None)
        monkeypatch.setattr(mmengine.runner.Runner, "from_cfg",
                            classmethod(lambda cls, cfg: handed.append(cfg) or mock.Mock(name="runner")))
        # a folder per call: each marks its own FINISHED, which a later run would refuse
        runs.append(tmp_path / f"work_dir{len(runs)}")
        openmmlab.train_main(default_scope, task, [str(config), "--work-dir", str(runs[-1]), *args])
        return handed[0]

    return run
