"""The Kubernetes manifests: both overlays rendered offline by ``kubectl kustomize``, every object
validated against the Kubernetes schemas (kubernetes-validate, offline), and the deployment's shape."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from service.config import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "docker" / "k8s"
KUBERNETES_VERSION = "1.30.0"  # the oldest version the manifests are checked against


def render(overlay: str) -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    run = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    return [doc for doc in yaml.safe_load_all(run.stdout) if doc]


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


@pytest.mark.parametrize("overlay", ["in-cluster-redis", "external-redis"])
def test_manifests_are_valid_kubernetes_objects(overlay):
    import kubernetes_validate

    objects = render(overlay)
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)  # raises with what is wrong
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {"splitvl"}


@pytest.mark.parametrize("overlay", ["in-cluster-redis", "external-redis"])
def test_manifests_deploy_the_split_service(overlay):
    objects = render(overlay)
    deployments, services = by_kind(objects, "Deployment"), by_kind(objects, "Service")
    configmaps, secrets = by_kind(objects, "ConfigMap"), by_kind(objects, "Secret")
    config = next(c for name, c in configmaps.items() if name.startswith("splitvl-config-"))
    secret_name = next(name for name in secrets if name.startswith("splitvl-secrets-"))
    assert set(secrets[secret_name]["data"]) == {"redis-password", "api-keys"}

    fields = {f"SPLITVL_{name.upper()}" for name in Settings.model_fields}
    for role in ("vision", "llm"):
        pod = deployments[f"splitvl-{role}"]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["args"] == ["serve", role]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert "/readyz" in " ".join(container["readinessProbe"]["exec"]["command"])
        env = {e["name"]: e for e in container["env"]}
        for name in env:  # every setting the manifests pass is one the workers read
            assert not name.startswith("SPLITVL_") or name in fields, name
        assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == secret_name
        assert env["SPLITVL_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == secret_name
        assert env["SPLITVL_REDIS_URL"]["value"] == "redis://:$(REDIS_PASSWORD)@$(REDIS_ADDRESS)/0"
        assert container["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
        assert services[f"splitvl-{role}"]["spec"]["selector"] == {"app.kubernetes.io/name": f"splitvl-{role}"}
        # the pod runs as the image's own user (its home holds Triton's and torch's caches), not another uid
        dockerfile = (ROOT / "docker" / f"{role}.Dockerfile").read_text()
        uid = int(re.search(r"useradd .*--uid (\d+) splitvl", dockerfile).group(1))
        assert re.search(r"^USER splitvl$", dockerfile, re.MULTILINE)
        assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["fsGroup"] == uid
    assert set(config["data"]) - {"REDIS_ADDRESS", "HF_HUB_OFFLINE", "HF_HOME"} <= fields

    # the gateway renders the compose template, mounted from a ConfigMap made of that very file
    gateway = deployments["splitvl-gateway"]["spec"]["template"]["spec"]
    template_map = configmaps[gateway["volumes"][0]["configMap"]["name"]]
    template = (ROOT / "docker" / "gateway" / "gateway.conf.template").read_text()
    assert template_map["data"] == {"default.conf.template": template}
    gateway_env = {e["name"] for e in gateway["containers"][0]["env"]}
    assert set(re.findall(r"\$\{(\w+)\}", template)) <= gateway_env

    hpa = by_kind(objects, "HorizontalPodAutoscaler")["splitvl-vision"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "splitvl-vision"
    assert set(by_kind(objects, "PodDisruptionBudget")) == {"splitvl-vision", "splitvl-llm", "splitvl-gateway"}
    if overlay == "in-cluster-redis":
        assert config["data"]["REDIS_ADDRESS"] == "redis:6379" and "redis" in deployments and "redis" in services
        redis_args = " ".join(deployments["redis"]["spec"]["template"]["spec"]["containers"][0]["args"])
        assert "--requirepass $(REDIS_PASSWORD)" in redis_args and "allkeys-lru" in redis_args
    else:
        assert config["data"]["REDIS_ADDRESS"] != "redis:6379" and "redis" not in deployments
