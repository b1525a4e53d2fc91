"""MLflow tracking of a search (``--mlflow``): the flag and its checks before anything starts."""

from __future__ import annotations

import http.server
import json
import socket
import sys
import threading
import time

import pytest

from iqa_ray.cli.tune import build_parser, main
from iqa_ray.core.errors import LaunchError
from iqa_ray.search.mlflow_store import INSTALL_HINT, check_uri, default_store
from iqa_ray.search.settings import settings_from_args


def parse(*argv):
    return build_parser("ranking").parse_args(list(argv))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- the flag and its checks


def test_the_flag_alone_means_a_store_in_the_experiment_folder(tmp_path):
    assert parse().mlflow is None
    assert settings_from_args(parse("--name", "exp", "--storage", str(tmp_path)), "ranking").mlflow is None
    settings = settings_from_args(parse("--name", "exp", "--storage", str(tmp_path), "--mlflow"), "ranking")
    assert settings.mlflow == f"sqlite:///{tmp_path.resolve()}/exp/mlflow.db"
    assert not any(tmp_path.iterdir()), "reading the flags writes nothing: the experiment folder must stay free"
    # Before --resume in argparse's eyes, the flag still takes no value.
    assert parse("--mlflow", "--resume").mlflow == "local" and parse("--mlflow", "--resume").resume


@pytest.mark.parametrize("uri, match", [
    ("mlruns", "MLflow 3 refuses file stores"),
    ("file:///tmp/mlruns", "MLflow 3 refuses file stores"),
    ("ftp://host/x", "unknown tracking URI scheme 'ftp'; valid: --mlflow \\(no value"),
    ("sqlite://relative.db", "four slashes"),
    ("sqlite:///:memory:", "four slashes"),
    ("sqlite:////no/such/folder/mlflow.db", "the folder /no/such/folder does not exist"),
    ("http://", "needs a host"),
])
def test_a_uri_mlflow_cannot_use_is_refused_naming_the_valid_forms(uri, match, capsys, monkeypatch):
    import iqa_ray.search.run

    monkeypatch.setattr(iqa_ray.search.run, "run_search", lambda *a: pytest.fail("the search started"))
    assert main(["--mlflow", uri], study="ranking") == 2
    import re

    assert re.search(match, capsys.readouterr().err)


def test_uris_mlflow_can_use_pass(tmp_path):
    for uri in (f"sqlite:///{tmp_path}/shared.db", "postgresql+psycopg2://u@db:5432/mlflow", "mysql://db/mlflow",
                "https://mlflow.example.org", "http://10.0.0.5:5000/prefix"):
        check_uri(uri)


def test_the_default_store_needs_a_local_experiment_folder(capsys):
    assert main(["--storage", "s3://bucket/iqa", "--mlflow"], study="ranking") == 2
    err = capsys.readouterr().err
    assert "--storage s3://bucket/iqa is remote" in err and "--mlflow http(s)://HOST[:PORT]" in err


def test_without_mlflow_the_flag_fails_before_anything_starts(monkeypatch, capsys):
    import iqa_ray.search.run
    import iqa_ray.search.settings

    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    monkeypatch.setattr(iqa_ray.search.settings, "load_study", lambda *a: pytest.fail("the study was loaded"))
    monkeypatch.setattr(iqa_ray.search.run, "run_search", lambda *a: pytest.fail("the search started"))
    assert main(["--mlflow"], study="ranking") == 2
    assert INSTALL_HINT in capsys.readouterr().err


def test_without_the_flag_mlflow_is_not_needed(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    assert settings_from_args(parse("--name", "exp", "--storage", str(tmp_path)), "ranking").mlflow is None


class Server(http.server.BaseHTTPRequestHandler):
    """A stand-in tracking server: ``get-by-name`` finds only the experiment ``taken``."""

    def do_GET(self):
        taken = "experiment_name=taken" in self.path and self.path.startswith("/api/2.0/mlflow/experiments/get-by-name")
        body = (json.dumps({"experiment": {"experiment_id": "7", "name": "taken"}}) if taken
                else json.dumps({"error_code": "RESOURCE_DOES_NOT_EXIST"})).encode()
        self.send_response(200 if taken else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def tracking_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_tracking_server_must_answer_and_not_hold_the_experiment_already(tracking_server, tmp_path):
    fresh = settings_from_args(parse("--name", "fresh", "--storage", str(tmp_path), "--mlflow", tracking_server),
                               "ranking")
    assert fresh.mlflow == tracking_server
    with pytest.raises(LaunchError, match="an MLflow experiment named 'taken' exists there already"):
        settings_from_args(parse("--name", "taken", "--storage", str(tmp_path), "--mlflow", tracking_server), "ranking")
    down = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(LaunchError, match="the tracking server does not answer"):
        settings_from_args(parse("--name", "x", "--storage", str(tmp_path), "--mlflow", down), "ranking")
    assert time.monotonic() - started < 15


def _started(tmp_path, *argv):
    """Record an experiment as the launcher does when a search starts; return its settings."""
    from iqa_ray.search.run import write_experiment_info

    args = parse("--name", "exp", "--storage", str(tmp_path), *argv)
    settings = settings_from_args(args, "ranking")
    write_experiment_info(settings, args)
    return settings


def test_a_resume_keeps_logging_where_the_search_started(tmp_path):
    started = _started(tmp_path, "--mlflow")
    record = json.loads((tmp_path / "exp" / "experiment.json").read_text())
    assert record["mlflow"] == {"tracking_uri": default_store(tmp_path / "exp"), "experiment": "exp"}
    resume = ("--name", "exp", "--storage", str(tmp_path), "--resume")
    assert settings_from_args(parse(*resume), "ranking").mlflow == started.mlflow, "recorded: no flag needed"
    assert settings_from_args(parse(*resume, "--mlflow"), "ranking").mlflow == started.mlflow
    with pytest.raises(LaunchError, match="the experiment tracks to sqlite:///"):
        settings_from_args(parse(*resume, "--mlflow", f"sqlite:///{tmp_path}/other.db"), "ranking")


def test_a_resume_cannot_start_tracking_a_search_started_without(tmp_path):
    _started(tmp_path)
    resume = ("--name", "exp", "--storage", str(tmp_path), "--resume")
    assert settings_from_args(parse(*resume), "ranking").mlflow is None
    with pytest.raises(LaunchError, match="started without MLflow tracking"):
        settings_from_args(parse(*resume, "--mlflow"), "ranking")
