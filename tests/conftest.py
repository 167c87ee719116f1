import functools
import http.server
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "fixtures" / "golden"
for path in (REPO, GOLDEN):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def release_server(tmp_path, monkeypatch):
    """Serve ``tmp_path/release`` on 127.0.0.1 as the release prefix; cache into ``tmp_path/cache``."""
    root = tmp_path / "release"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("PACAVIT_CHECKPOINT_BASE_URL", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("PACAVIT_CHECKPOINT_CACHE", str(tmp_path / "cache"))
    yield root
    server.shutdown()
    server.server_close()


@pytest.fixture
def train_config_of(monkeypatch, tmp_path):
    """train_config_of(config, default_scope, task, *args): the config that ``train_main`` hands
    to mmengine's Runner for these arguments (the Runner is not built, the dataset not checked)."""
    import mmengine.runner

    from models import openmmlab

    def run(config, default_scope, task, *args):
        handed = []
        monkeypatch.setattr(openmmlab, "check_data_roots", lambda cfg, loaders: None)
        monkeypatch.setattr(mmengine.runner.Runner, "from_cfg",
                            classmethod(lambda cls, cfg: handed.append(cfg) or SimpleNamespace(train=lambda: None)))
        openmmlab.train_main(default_scope, task, [str(config), "--work-dir", str(tmp_path / "work_dir"), *args])
        return handed[0]

    return run
