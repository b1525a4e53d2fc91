"""Where ``--mlflow`` tracks a search, checked before anything starts.

``--mlflow`` alone keeps an SQLite store in the experiment folder (``RESULTS/<name>/mlflow.db``,
its artifacts in ``RESULTS/<name>/mlflow-artifacts``); ``--mlflow URI`` names a tracking server
(``http(s)://HOST[:PORT]``), another SQLite file (``sqlite:////abs/path/mlflow.db``, shared by several
searches; artifacts in ``mlflow-artifacts/<name>`` beside it) or a database server
(``postgresql://...``, ``mysql://...``, ``mssql://...``, which need their drivers). MLflow's
experiment is named like the search (``--name``).

Everything here runs while the flags are read, before Ray starts: MLflow must be installed
(``pip install "iqa-ray[mlflow]"``), the URI's form must be one MLflow can use, a tracking server
must answer, and a new search must not log into an MLflow experiment of the same name that
another search filled. The logging itself is :mod:`iqa_ray.search.mlflow_runs`.
"""

from __future__ import annotations

import json
import shlex
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from iqa_ray.core.errors import LaunchError

LOCAL = "local"  # ``--mlflow`` without a URI: the SQLite store in the experiment folder
STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlflow-artifacts"
INSTALL_HINT = 'pip install "iqa-ray[mlflow]"'
SERVER_TIMEOUT_S = 10.0
_DATABASES = ("postgresql", "mysql", "mssql")
VALID_FORMS = ("--mlflow (no value: sqlite store in the experiment folder), --mlflow http(s)://HOST[:PORT], "
               "--mlflow sqlite:////absolute/path/mlflow.db, or --mlflow postgresql|mysql|mssql://...")


def require_mlflow() -> None:
    """Raise :class:`LaunchError` naming the extra to install when ``mlflow`` cannot be imported."""
    try:
        import mlflow  # noqa: F401
    except ImportError as exc:
        raise LaunchError(f"--mlflow needs MLflow, which is not installed ({exc}); install it with: "
                          f"{INSTALL_HINT}") from None


def default_store(experiment_dir: Path) -> str:
    """The tracking URI of the SQLite store in ``experiment_dir`` (an absolute path: four slashes)."""
    return f"sqlite:///{Path(experiment_dir).resolve() / STORE_FILE}"


def artifact_location(tracking_uri: str, experiment_dir: Path | None, name: str) -> str | None:
    """Where the MLflow experiment ``name`` keeps its artifacts: beside its SQLite store (MLflow's
    own default for one is ``./mlruns`` under whatever folder the search was started from), in the
    experiment folder for the default store; the server's choice for any other URI."""
    if experiment_dir is not None and tracking_uri == default_store(experiment_dir):
        return (Path(experiment_dir).resolve() / ARTIFACTS_DIR).as_uri()
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri.removeprefix("sqlite:///")).expanduser().resolve().parent / ARTIFACTS_DIR / name).as_uri()
    return None


def tracking_uri(flag: str | None, experiment_dir: Path | None, storage: str) -> str | None:
    """The tracking URI ``--mlflow`` asks for (``None`` without the flag), its form checked.

    Args:
        flag: the flag's value: ``None`` (not given), :data:`LOCAL` (given without a URI) or a URI.
        experiment_dir: the local experiment folder, or ``None`` on remote storage.
        storage: the results root as given (named in the error on remote storage).

    Raises:
        LaunchError: MLflow is not installed, or the URI is not one MLflow can track to.
    """
    if flag is None:
        return None
    require_mlflow()
    if flag == LOCAL:
        if experiment_dir is None:
            raise LaunchError(f"--mlflow without a URI keeps its store in the experiment folder, but --storage {storage} "
                              "is remote; name a tracking server instead: --mlflow http(s)://HOST[:PORT]")
        return default_store(experiment_dir)
    check_uri(flag)
    return flag


def check_uri(uri: str) -> None:
    """Refuse a tracking URI whose form MLflow cannot use, naming the valid forms."""
    parsed = urllib.parse.urlparse(uri)
    scheme = parsed.scheme.split("+", 1)[0]  # postgresql+psycopg2://...
    if scheme in ("http", "https"):
        if not parsed.hostname:
            raise LaunchError(f"--mlflow {uri!r}: a tracking server's URI needs a host, e.g. http://127.0.0.1:5000")
    elif scheme == "sqlite":
        path = uri.removeprefix("sqlite:///")
        if not uri.startswith("sqlite:///") or not path or path.startswith(":memory:"):
            raise LaunchError(f"--mlflow {uri!r}: an SQLite store is a file, sqlite:////absolute/path/mlflow.db "
                              "(four slashes before an absolute path)")
        folder = Path(path).expanduser().resolve().parent
        if not folder.is_dir():
            raise LaunchError(f"--mlflow {uri!r}: the folder {folder} does not exist (MLflow creates the database "
                              "file, not its folder); create it or choose another path")
    elif scheme in ("file", "") or len(scheme) == 1:  # a path, or a Windows drive letter
        raise LaunchError(f"--mlflow {uri!r}: MLflow 3 refuses file stores (./mlruns); use an SQLite file instead "
                          "(--mlflow sqlite:////absolute/path/mlflow.db), or --mlflow alone for one in the experiment "
                          "folder")
    elif scheme not in _DATABASES:
        raise LaunchError(f"--mlflow {uri!r}: unknown tracking URI scheme {parsed.scheme!r}; valid: {VALID_FORMS}")


def check_new_experiment(uri: str, name: str) -> None:
    """Before a new search: a tracking server must answer, and no MLflow experiment named ``name``
    may exist there (its runs would mix with this search's). SQLite files are checked when they exist.

    Raises:
        LaunchError: the server does not answer, or the experiment exists.
    """
    if uri.startswith(("http://", "https://")):
        exists = _server_has_experiment(uri, name)
    elif uri.startswith("sqlite:///") and Path(uri.removeprefix("sqlite:///")).expanduser().is_file():
        from mlflow.tracking import MlflowClient

        exists = MlflowClient(uri).get_experiment_by_name(name) is not None
    else:
        return  # a database server: MLflow's client reports a bad one when the search starts
    if exists:
        raise LaunchError(f"--mlflow {uri}: an MLflow experiment named {name!r} exists there already; its runs would "
                          "mix with this search's. Choose another --name, or delete that experiment "
                          "(it may be in the store's trash: `mlflow gc`)")


def _server_has_experiment(uri: str, name: str) -> bool:
    """Whether the tracking server at ``uri`` has an experiment ``name`` (REST ``get-by-name``)."""
    query = urllib.parse.urlencode({"experiment_name": name})
    url = f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name?{query}"
    try:
        with urllib.request.urlopen(url, timeout=SERVER_TIMEOUT_S) as response:
            return "experiment" in json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        # 404 RESOURCE_DOES_NOT_EXIST: no such experiment. Another status (401 or 403 where the server
        # wants the credentials MLflow's client sends) says only that the server answers; MLflow's own
        # client logs into whatever experiment of that name it finds.
        exc.close()
        return False
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise LaunchError(f"--mlflow {uri}: the tracking server does not answer ({reason}); start it "
                          "(`mlflow server --backend-store-uri sqlite:///mlflow.db --port 5000`), check the URI, or "
                          "drop the URI to track in the experiment folder") from None


def ui_hint(uri: str, experiment_id: str) -> str:
    """How to see the search in MLflow's UI: its page on a tracking server, else the ``mlflow ui``
    command that serves the store (full ``mlflow``, not the extra's ``mlflow-skinny``: docs/TRACKING.md)."""
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}"
    return shlex.join(["mlflow", "ui", "--backend-store-uri", uri])


def resumed_uri(flag: str | None, recorded: str | None, experiment_dir: Path) -> str | None:
    """The tracking URI of a resumed search: the recorded one. The restored Tuner keeps logging its
    trials where the search started, so ``--mlflow`` on the resume may only repeat it.

    Raises:
        LaunchError: ``--mlflow`` names another store, or asks for one on a search started without;
            MLflow is not installed for a search that tracks to it.
    """
    if recorded is not None:
        require_mlflow()  # the restored callback imports it
    if flag is None:
        return recorded
    wanted = default_store(experiment_dir) if flag == LOCAL else flag
    if recorded is None:
        raise LaunchError("--resume with --mlflow: the experiment was started without MLflow tracking, and a resumed "
                          "search keeps the loggers it started with; drop --mlflow, or start a new experiment with it")
    if wanted != recorded:
        raise LaunchError(f"--resume with --mlflow {flag}: the experiment tracks to {recorded} (recorded in "
                          "experiment.json) and a resumed search keeps logging there; drop --mlflow or repeat that URI")
    return recorded
