"""The shipped RBAC (config/kubernetes/rbac.yaml) against a real kube-apiserver (RBAC
authorization, service-account tokens): its service account's token is enough for fleetd's
Kubernetes source to list and watch the cluster, and gets nothing else."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml

from fleetd.sources.kubernetes import KubernetesSource, KubernetesSourceSettings
from fleetd.sources.memory import FleetView
from tests.integration.sources_support import AWAIT_S, running, unique

pytestmark = pytest.mark.testbed

RBAC = Path(__file__).resolve().parents[2] / "config" / "kubernetes" / "rbac.yaml"
CONTEXT = "rbac-cluster"


def _apply(api: Any) -> list[dict[str, Any]]:
    """Create the manifest's objects (as `kubectl apply -f` would on a fresh cluster)."""
    from kubernetes import utils

    docs = [doc for doc in yaml.safe_load_all(RBAC.read_text()) if doc]
    utils.create_from_yaml(api, yaml_objects=docs)
    return docs


def _remove(api: Any) -> None:
    from kubernetes import client

    rbac = client.RbacAuthorizationV1Api(api)
    rbac.delete_cluster_role_binding("fleetd-reader")
    rbac.delete_cluster_role("fleetd-reader")
    client.CoreV1Api(api).delete_namespaced_service_account("fleetd", "fleetd-system")
    # (The namespace stays: without a controller manager nothing would finalize it.)


def _token(api: Any) -> str:
    """A token of the manifest's service account (`kubectl create token fleetd`)."""
    from kubernetes import client

    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=3600)
    )
    made = client.CoreV1Api(api).create_namespaced_service_account_token(
        "fleetd", "fleetd-system", request
    )
    return str(made.status.token)


def _kubeconfig(path: Path, server: str, ca_path: Path, token: str) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": CONTEXT,
                        "cluster": {"server": server, "certificate-authority": str(ca_path)},
                    }
                ],
                "users": [{"name": "fleetd", "user": {"token": token}}],
                "contexts": [{"name": CONTEXT, "context": {"cluster": CONTEXT, "user": "fleetd"}}],
                "current-context": CONTEXT,
            }
        )
    )
    return path


def _denied(kubeconfig: Path) -> list[str]:
    """What the service account may not do, among what a reader should not: each denied
    request's description (403 expected for all)."""
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    api = config.new_client_from_config(config_file=str(kubeconfig), context=CONTEXT)
    core = client.CoreV1Api(api)
    attempts = {
        "list secrets": lambda: core.list_secret_for_all_namespaces(),
        "patch a node": lambda: core.patch_node("any", {"spec": {"unschedulable": True}}),
        "delete a pod": lambda: core.delete_namespaced_pod("any", "default"),
        "list configmaps": lambda: core.list_config_map_for_all_namespaces(),
    }
    denied = []
    try:
        for what, attempt in attempts.items():
            try:
                attempt()
            except ApiException as exc:
                if exc.status == 403:
                    denied.append(what)
        version = client.VersionApi(api).get_code()  # (fleetd's liveness probe of a cluster)
        assert version.git_version
    finally:
        api.close()
    return denied


async def test_the_shipped_rbac_lets_fleetd_read_a_cluster_and_nothing_more(
    kube: Any, tmp_path: Path
) -> None:
    context = kube.contexts[1]
    api = kube.api(context)
    name = unique("rbac-gpu")
    await asyncio.to_thread(_apply, api)
    try:
        token = await asyncio.to_thread(_token, api)
        kubeconfig = _kubeconfig(
            tmp_path / "kubeconfig", kube.servers[context], kube.ca_path, token
        )
        await asyncio.to_thread(kube.create_gpu_node, context, name, gpus=4)
        view = FleetView()
        settings = KubernetesSourceSettings(kubeconfig=str(kubeconfig), contexts=(CONTEXT,))
        async with running(KubernetesSource(settings, view).run):
            await view.wait_for(
                lambda: ("kubernetes", CONTEXT) in view.synced and (CONTEXT, name) in view.nodes,
                AWAIT_S,
            )
        assert view.nodes[(CONTEXT, name)].allocatable.gpus == 4
        denied = await asyncio.to_thread(_denied, kubeconfig)
        assert denied == ["list secrets", "patch a node", "delete a pod", "list configmaps"]
    finally:
        await asyncio.to_thread(kube.delete_node, context, name)
        await asyncio.to_thread(_remove, api)
