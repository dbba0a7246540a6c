"""A flow's caller cannot point the worker at another project or send credentials elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.guard import (
    FlowInputError,
    check_address,
    check_params,
    check_root,
    check_tracking_uri,
)


@pytest.fixture
def project(tmp_path, monkeypatch):
    for var in ("KNET_FLOW_ROOTS", "KNET_ROOT", "KNET_TRACKING_URI", "MLFLOW_TRACKING_URI",
                "KNET_FLOW_TRACKING_URIS"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_working_directory_and_the_deployments_root_are_allowed(project, monkeypatch):
    assert check_root(".") == str(project)
    other = project.parent / "other"
    with pytest.raises(FlowInputError, match=r"root='.*other' is not this deployment's project"):
        check_root(other)
    monkeypatch.setenv("KNET_ROOT", str(other))
    assert check_root(other) == str(other.resolve())


def test_more_roots_come_from_the_allow_list(project, monkeypatch, tmp_path_factory):
    a, b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    with pytest.raises(FlowInputError, match="KNET_FLOW_ROOTS"):
        check_root(a)
    monkeypatch.setenv("KNET_FLOW_ROOTS", f"{a}:{b}")
    assert check_root(a) == str(a) and check_root(b) == str(b)
    with pytest.raises(FlowInputError):
        check_root(project.parent)  # a parent of an allowed root is not allowed


@pytest.mark.parametrize(
    "uri",
    [
        "sqlite:///mlflow.db",
        "sqlite:///sub/dir/m.db",
        "http://127.0.0.1:5000",
        "http://localhost:5000",
        "mlruns",
        "",
    ],
)
def test_local_tracking_uris_pass(project, uri):
    check_tracking_uri(uri, project)


@pytest.mark.parametrize(
    "uri",
    [
        "http://attacker.example:5000",
        "https://10.0.0.7",
        "sqlite:////tmp/elsewhere.db",
        "sqlite:///../outside.db",
        "databricks",
        "file:///etc",
    ],
)
def test_remote_or_outside_tracking_uris_are_refused(project, uri):
    with pytest.raises(FlowInputError, match="is not allowed"):
        check_tracking_uri(uri, project)


def test_the_deployments_tracking_uri_and_the_allow_list_pass(project, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.knet.svc:5000")
    check_tracking_uri("http://mlflow.knet.svc:5000", project)
    monkeypatch.setenv("KNET_FLOW_TRACKING_URIS", "https://mlflow.team.example, http://x:1")
    check_tracking_uri("https://mlflow.team.example", project)
    with pytest.raises(FlowInputError):
        check_tracking_uri("https://mlflow.team.example.attacker.net", project)


@pytest.mark.slow
def test_a_flow_refuses_a_foreign_root_and_tracking_uri_before_running(project, tmp_path_factory):
    """Through Prefect: the run fails with the one-line reason, nothing ran in the folder."""
    from prefect.testing.utilities import prefect_test_harness

    from pipelines.flows import train_knet

    foreign = tmp_path_factory.mktemp("foreign")
    (foreign / "dvc.yaml").write_text("stages: {}\n")
    with prefect_test_harness(server_startup_timeout=120):
        state = train_knet(root=str(foreign), return_state=True)
        assert state.is_failed()
        with pytest.raises(FlowInputError, match="not this deployment's project"):
            state.result()
        params = Path(__file__).resolve().parents[1] / "params.yaml"
        state = train_knet(params=str(params), return_state=True)  # another project's file
        with pytest.raises(FlowInputError, match="is outside the project"):
            state.result()
        (project / "params.yaml").write_text(params.read_text())
        state = train_knet(tracking_uri="http://attacker.example:5000", return_state=True)
        with pytest.raises(FlowInputError, match="attacker.example.*is not allowed"):
            state.result()
        state = train_knet(address="10.0.0.9:6379", return_state=True)
        with pytest.raises(FlowInputError, match="address='10.0.0.9:6379' is not allowed"):
            state.result()
    assert sorted(p.name for p in foreign.iterdir()) == ["dvc.yaml"]


@pytest.mark.parametrize("address", ["", None, "auto", "127.0.0.1:6379", "localhost:6379",
                                     "ray://127.0.0.1:10001"])  # fmt: skip
def test_local_ray_addresses_pass(project, monkeypatch, address):
    for var in ("RAY_ADDRESS", "KNET_RAY_ADDRESS", "KNET_FLOW_RAY_ADDRESSES"):
        monkeypatch.delenv(var, raising=False)
    assert check_address(address) == (address or None)


def test_a_foreign_ray_address_is_refused_unless_the_deployment_names_it(project, monkeypatch):
    """The worker's jobs and Ray token go only where the deployment says."""
    for var in ("RAY_ADDRESS", "KNET_RAY_ADDRESS", "KNET_FLOW_RAY_ADDRESSES"):
        monkeypatch.delenv(var, raising=False)
    for address in ("10.0.0.9:6379", "ray://attacker.example:10001"):
        with pytest.raises(FlowInputError, match=f"address='{address}' is not allowed"):
            check_address(address)
    monkeypatch.setenv("KNET_FLOW_RAY_ADDRESSES", "10.0.0.9:6379")
    assert check_address("10.0.0.9:6379") == "10.0.0.9:6379"
    monkeypatch.setenv("RAY_ADDRESS", "ray://head.internal:10001")
    assert check_address("ray://head.internal:10001") == "ray://head.internal:10001"
    monkeypatch.setenv("KNET_RAY_ADDRESS", "knet-head-svc.knet.svc:6379")  # infra/k8s
    assert check_address("knet-head-svc.knet.svc:6379") == "knet-head-svc.knet.svc:6379"


def test_the_params_file_must_be_inside_the_project(project):
    (project / "params.yaml").write_text("{}\n")
    assert check_params("params.yaml", project) == project / "params.yaml"
    for outside in ("/etc/passwd", "../params.yaml"):
        with pytest.raises(FlowInputError, match="is outside the project"):
            check_params(outside, project)
