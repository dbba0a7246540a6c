"""What a caller of a deployed flow may choose: the project folder and the MLflow server.

Anyone who can reach the Prefect API can start a flow run with parameters of their choice. Two
of them are powerful: ``root`` decides whose ``dvc.yaml`` the worker runs (``dvc repro``
executes its commands), and the tracking URI (``tracking_uri``, or ``tracking.uri`` through
``overrides`` or the params file) receives the MLflow credentials the worker holds. So both are
checked against what the deployment configured before anything runs:

- ``root`` must be the worker's project: ``KNET_ROOT`` (what ``prefect.yaml`` deploys with),
  the working directory the worker runs the flow in, or a folder listed in
  ``KNET_FLOW_ROOTS`` (``os.pathsep``-separated).
- ``params`` (the params file) must lie inside ``root``.
- ``address`` (a Ray cluster: the worker sends it its jobs and, with token auth, its
  ``RAY_AUTH_TOKEN``) must be empty (a local instance), ``auto`` (the cluster the worker
  belongs to), on 127.0.0.1 / localhost, the deployment's own (``RAY_ADDRESS``,
  ``KNET_RAY_ADDRESS``), or listed in
  ``KNET_FLOW_RAY_ADDRESSES`` (comma-separated).
- the tracking URI must be local (a ``sqlite:`` or file store inside ``root``, or a server on
  127.0.0.1 / localhost), the deployment's own (``KNET_TRACKING_URI``,
  ``MLFLOW_TRACKING_URI``), or listed in ``KNET_FLOW_TRACKING_URIS`` (comma-separated).
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

ROOTS_VAR = "KNET_FLOW_ROOTS"
TRACKING_VAR = "KNET_FLOW_TRACKING_URIS"
ADDRESSES_VAR = "KNET_FLOW_RAY_ADDRESSES"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


class FlowInputError(ValueError):
    """A flow parameter outside what the deployment allows."""


def allowed_roots() -> list[Path]:
    """The project folders a flow may work in (see the module docstring)."""
    listed = os.environ.get(ROOTS_VAR, "").split(os.pathsep)
    candidates = [*listed, os.environ.get("KNET_ROOT", ""), os.getcwd()]
    return [Path(p).resolve() for p in candidates if p]


def check_root(root: str | Path) -> str:
    """``root`` resolved, or :class:`FlowInputError` naming it and what is allowed."""
    resolved = Path(root).resolve()
    allowed = allowed_roots()
    if resolved not in allowed:
        shown = ", ".join(sorted({str(p) for p in allowed}))
        raise FlowInputError(
            f"root={str(root)!r} is not this deployment's project ({shown}); a flow runs only "
            f"in those (add folders to {ROOTS_VAR}, separated by {os.pathsep!r})"
        )
    return str(resolved)


def check_params(params: str | Path, root: str | Path) -> Path:
    """The params file inside ``root``, or :class:`FlowInputError` naming it."""
    resolved = (Path(root) / params).resolve()
    if not resolved.is_relative_to(Path(root).resolve()):
        raise FlowInputError(
            f"params={str(params)!r} is outside the project {root}; a flow reads only a "
            f"params file of its project"
        )
    return resolved


def check_address(address: str | None) -> str | None:
    """``address`` if a flow may send its Ray jobs there, else :class:`FlowInputError`."""
    if not address or address == "auto":
        return address or None
    host = urlparse(address if "://" in address else f"ray://{address}").hostname
    configured = [
        os.environ.get("RAY_ADDRESS", ""),
        os.environ.get("KNET_RAY_ADDRESS", ""),  # what the k8s deployment passes (config.yaml)
        *os.environ.get(ADDRESSES_VAR, "").split(","),
    ]
    if host in LOCAL_HOSTS or address in {a.strip() for a in configured if a.strip()}:
        return address
    raise FlowInputError(
        f"address={address!r} is not allowed: a flow sends its Ray jobs (and token) only to "
        f"a local instance, 'auto', a cluster on 127.0.0.1, RAY_ADDRESS / KNET_RAY_ADDRESS, "
        f"or an address listed "
        f"in {ADDRESSES_VAR}"
    )


def _local(uri: str, root: Path) -> bool:
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        return parsed.hostname in LOCAL_HOSTS
    if parsed.scheme == "sqlite":  # sqlite:///relative.db, sqlite:////absolute.db
        path = uri[len("sqlite:///") :] if uri.startswith("sqlite:///") else ""
    elif parsed.scheme == "file":
        path = parsed.path
    elif parsed.scheme == "" and uri.split("-")[0] not in ("databricks", "uc"):
        path = uri  # a plain folder, as MLflow reads one
    else:
        return False
    if not path:
        return False
    target = Path(path) if os.path.isabs(path) else root / path
    return target.resolve().is_relative_to(root)


def check_tracking_uri(uri: str, root: str | Path) -> None:
    """Refuse a tracking URI that is neither local nor one the deployment names."""
    if not uri:
        return
    configured = [
        os.environ.get("KNET_TRACKING_URI", ""),
        os.environ.get("MLFLOW_TRACKING_URI", ""),
        *os.environ.get(TRACKING_VAR, "").split(","),
    ]
    if uri in {u.strip() for u in configured if u.strip()} or _local(uri, Path(root).resolve()):
        return
    raise FlowInputError(
        f"tracking URI {uri!r} is not allowed: a flow sends its MLflow credentials only to a "
        f"local store inside the project, a server on 127.0.0.1, KNET_TRACKING_URI / "
        f"MLFLOW_TRACKING_URI, or a URI listed in {TRACKING_VAR}"
    )
