"""deploy/k8s: every kustomization rendered, every object validated, every cross-reference checked.

Rendering: a small kustomize in this file (``render``) implementing exactly what the
kustomizations here use (resources, strategic-merge patches with ``$patch: delete``, images,
namespace); any other key is an error, so it never renders a kustomization silently wrong. Where
``kubectl`` is installed its own kustomize (``kubectl kustomize``) must render the same objects.

Validation: every built-in object against the Kubernetes OpenAPI schemas that the
``kubernetes-validate`` package ships (strict: unknown fields are errors), offline; the
LeaderWorkerSet (a CRD) structurally, as its controller reads it.

Cross-checks, with the project's own code wherever it decides: the gateway ConfigMaps parse with
``gateway.config.parse_config``; a pod of each workload is turned into a replica by
``gateway.discovery.pod_replica`` with each config and must land on the right port and role;
``kvgate <cmd> --help`` knows every subcommand and flag; vLLM's JSON flags have the fields of
vLLM 0.33's KVEventsConfig / KVTransferConfig; Services select pods; RBAC allows what
gateway/discovery.py calls; the HPA's metric is one a running gateway exports.
"""

from __future__ import annotations

import copy
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import typing
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import msgspec
import pytest
import yaml

from gateway.config import DiscoveryConfig, GatewayConfig, parse_config
from gateway.discovery import DEFAULT_POD_SELECTOR, pod_replica
from tests.deploy.test_deploy import check_kvgate_args
from tests.helpers.gateway import GatewayThread, fleet_config
from tests.helpers.kube_api import label_matcher, make_pod

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
#: the Kubernetes release the objects are validated against (kubernetes-validate's schemas)
K8S_VERSION = "1.35.0"
KUSTOMIZATIONS = {"base": K8S, "aws": K8S / "overlays" / "aws", "lws": K8S / "overlays" / "lws", "gie": K8S / "overlays" / "gie"}

# -- a small kustomize ------------------------------------------------------------------------------

#: strategic-merge keys of the lists our patches touch (Kubernetes' patchMergeKey for each field)
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name", "volumeMounts": "mountPath", "ports": "containerPort"}
#: kinds whose pod template the images transformer reaches (kustomize's built-in image field specs)
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}
KNOWN_KEYS = {"apiVersion", "kind", "resources", "patches", "images", "namespace"}


def _load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def merge(base: Any, patch: Any, key: str | None = None) -> Any:
    """Strategic merge of ``patch`` into ``base``: maps recursively (null deletes), lists of
    objects by their merge key (items the base lacks go first, as kustomize puts them), any
    other list replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = merge(out[k], v, k)
            else:
                out[k] = copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_KEYS:
        mk = MERGE_KEYS[key]
        out = [copy.deepcopy(b) for b in base]
        added = []
        for item in patch:
            match = next((i for i, b in enumerate(out) if b.get(mk) == item.get(mk)), None)
            if match is None:
                added.append(copy.deepcopy(item))
            else:
                out[match] = merge(out[match], item)
        return added + out  # as kustomize orders them: the patch's new items first
    return copy.deepcopy(patch)


def _ident(obj: dict[str, Any]) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def _pod_specs(obj: dict[str, Any]):
    if obj["kind"] in WORKLOADS:
        yield obj["spec"]["template"]["spec"]
    elif obj["kind"] == "LeaderWorkerSet":
        lwt = obj["spec"]["leaderWorkerTemplate"]
        for tpl in ("leaderTemplate", "workerTemplate"):
            if tpl in lwt:
                yield lwt[tpl]["spec"]


def _set_image(spec: dict[str, Any], images: list[dict[str, str]]) -> None:
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        ref = c["image"]
        name = ref.split("@")[0]
        if ":" in name.rsplit("/", 1)[-1]:
            name = name.rsplit(":", 1)[0]
        for img in images:
            if img["name"] == name:
                unknown = set(img) - {"name", "newName", "newTag"}
                assert not unknown, f"images: {unknown} not supported here"
                tag = img.get("newTag") or (ref.rsplit(":", 1)[1] if ref != name else None)
                c["image"] = img.get("newName", name) + (f":{tag}" if tag else "")


@functools.cache
def _render(directory: Path) -> tuple[dict[str, Any], ...]:
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert set(kust) <= KNOWN_KEYS, f"{directory}: kustomization keys {set(kust) - KNOWN_KEYS} are beyond this renderer"
    objs: list[dict[str, Any]] = []
    for res in kust.get("resources", []):
        path = (directory / res).resolve()
        objs += [copy.deepcopy(o) for o in (_render(path) if path.is_dir() else _load(path))]
    for p in kust.get("patches", []):
        assert set(p) == {"path"}, "only file patches (strategic merge, matched by kind and name) are used here"
        for patch in _load(directory / p["path"]):
            i = next(i for i, o in enumerate(objs) if _ident(o) == _ident(patch))
            if patch.get("$patch") == "delete":
                del objs[i]
            else:
                objs[i] = merge(objs[i], patch)
    for obj in objs:
        if obj["kind"] in WORKLOADS:  # kustomize's images transformer knows no CRD's image fields
            for spec in _pod_specs(obj):
                _set_image(spec, kust.get("images", []))
    if "namespace" in kust:
        accounts = {o["metadata"]["name"] for o in objs if o["kind"] == "ServiceAccount"}
        for obj in objs:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = kust["namespace"]
            for s in obj.get("subjects", []) if obj["kind"] in ("RoleBinding", "ClusterRoleBinding") else []:
                if s["kind"] == "ServiceAccount" and s["name"] in accounts:
                    s["namespace"] = kust["namespace"]
    return tuple(objs)


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects ``kubectl apply -k directory`` would send (a fresh copy each call)."""
    return copy.deepcopy(list(_render(directory.resolve())))


def by_ident(objs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    out = {_ident(o): o for o in objs}
    assert len(out) == len(objs), "two objects of one kind share a name"
    return out


def pod_templates(objs: list[dict[str, Any]]):
    """(owner, template) for every pod template: Deployments' and LeaderWorkerSets' leader/worker."""
    for o in objs:
        if o["kind"] in WORKLOADS:
            yield o, o["spec"]["template"]
        elif o["kind"] == "LeaderWorkerSet":
            lwt = o["spec"]["leaderWorkerTemplate"]
            for tpl in ("leaderTemplate", "workerTemplate"):
                yield o, lwt[tpl]


def containers(objs: list[dict[str, Any]], *, init: bool = False):
    for owner, tpl in pod_templates(objs):
        for c in tpl["spec"]["containers"] + (tpl["spec"].get("initContainers", []) if init else []):
            yield owner, tpl, c


def flag(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name:
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def gateway_config(objs: list[dict[str, Any]], name: str) -> GatewayConfig:
    return parse_config(yaml.safe_load(by_ident(objs)[("ConfigMap", name)]["data"]["gateway.yaml"]))


ALL = pytest.mark.parametrize("variant", list(KUSTOMIZATIONS))


# -- rendering ---------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed (its kustomize cross-checks the renderer)")
def test_renderer_agrees_with_kubectl_kustomize(tmp_path):
    """Our renderer and kubectl's kustomize build the same objects, for every kustomization and for
    the base under a namespace (which must rewrite the RoleBinding's ServiceAccount subject)."""
    ns = tmp_path / "ns"
    ns.mkdir()
    (ns / "kustomization.yaml").write_text(yaml.safe_dump({"namespace": "llm", "resources": [os.path.relpath(K8S / "base", ns)]}))
    for directory in [*KUSTOMIZATIONS.values(), ns]:
        r = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr[-2000:]
        theirs = by_ident([d for d in yaml.safe_load_all(r.stdout) if d])
        ours = by_ident(render(directory))
        assert set(ours) == set(theirs), directory
        for ident, obj in ours.items():
            assert obj == theirs[ident], f"{directory}: {ident} differs"
    [binding] = [o for o in render(ns) if o["kind"] == "RoleBinding"]
    assert binding["subjects"][0]["namespace"] == "llm"


def test_base_is_namespace_agnostic_and_applied_by_deploy_k8s():
    assert render(K8S) == render(K8S / "base")
    for obj in render(K8S):
        assert "namespace" not in obj["metadata"], _ident(obj)


# -- schema validation ----------------------------------------------------------------------------------


def check_inference_pool(obj: dict[str, Any]) -> None:
    """A GIE InferencePool (inference.networking.k8s.io/v1) as gateway.discovery and GIE gateways
    read it: a matchLabels selector, target ports, the endpoint picker's Service and port."""
    spec = obj["spec"]
    assert set(spec) <= {"selector", "targetPorts", "endpointPickerRef"}
    assert set(spec["selector"]) == {"matchLabels"} and all(isinstance(v, str) for v in spec["selector"]["matchLabels"].values())
    assert 1 <= len(spec["targetPorts"]) <= 8 and all(set(p) == {"number"} and 0 < p["number"] < 65536 for p in spec["targetPorts"])
    ref = spec["endpointPickerRef"]
    assert set(ref) <= {"group", "kind", "name", "port", "failureMode"} and ref.get("kind", "Service") == "Service"
    assert ref.get("failureMode", "FailClose") in ("FailOpen", "FailClose") and set(ref["port"]) == {"number"}


def check_lws(obj: dict[str, Any]) -> None:
    """A LeaderWorkerSet (leaderworkerset.x-k8s.io/v1) as its controller reads it: the fields and
    types of its API, each pod template a valid PodTemplateSpec."""
    import kubernetes_validate

    spec = obj["spec"]
    assert set(spec) <= {"replicas", "leaderWorkerTemplate", "rolloutStrategy", "startupPolicy", "networkConfig"}
    assert isinstance(spec["replicas"], int) and spec["replicas"] >= 1
    assert spec.get("startupPolicy", "LeaderCreated") in ("LeaderCreated", "LeaderReady")
    lwt = spec["leaderWorkerTemplate"]
    assert set(lwt) <= {"leaderTemplate", "workerTemplate", "size", "restartPolicy", "subGroupPolicy", "resourcePolicy"}
    assert isinstance(lwt["size"], int) and lwt["size"] >= 1
    assert lwt.get("restartPolicy", "RecreateGroupOnPodRestart") in ("RecreateGroupOnPodRestart", "None", "Default")
    for tpl in ("leaderTemplate", "workerTemplate"):
        # each template is a core PodTemplateSpec: validate it as the spec of a PodTemplate
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": lwt[tpl]}, K8S_VERSION, strict=True)


@ALL
def test_every_object_validates(variant):
    import kubernetes_validate

    objs = render(KUSTOMIZATIONS[variant])
    kinds = set()
    for obj in objs:
        kinds.add(obj["kind"])
        if obj["apiVersion"].startswith("leaderworkerset.x-k8s.io/"):
            assert obj["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
            check_lws(obj)
        elif obj["kind"] == "InferencePool":
            assert obj["apiVersion"] == "inference.networking.k8s.io/v1"
            check_inference_pool(obj)
        else:
            try:
                kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{variant}: {_ident(obj)} invalid at {'/'.join(map(str, exc.path))}: {exc.message}")
    expected = {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    assert expected <= kinds
    assert ("LeaderWorkerSet" in kinds) == (variant == "lws")
    assert ("InferencePool" in kinds) == (variant == "gie")


def test_the_validator_catches_mistakes():
    """Strict schema validation is on: a misspelt field or a wrong type fails."""
    import kubernetes_validate

    dep = copy.deepcopy(by_ident(render(K8S))[("Deployment", "kvgate")])
    dep["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)
    hpa = copy.deepcopy(by_ident(render(K8S))[("HorizontalPodAutoscaler", "kvgate")])
    hpa["spec"]["metrics"][0]["pods"]["target"]["averageValue"] = {"x": 1}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(hpa, K8S_VERSION, strict=True)


# -- references between objects -----------------------------------------------------------------------------


@ALL
def test_selectors_mounts_and_accounts_resolve(variant):
    objs = render(KUSTOMIZATIONS[variant])
    idx = by_ident(objs)
    templates = list(pod_templates(objs))
    for owner, tpl in templates:
        if owner["kind"] in WORKLOADS:
            assert owner["spec"]["selector"]["matchLabels"].items() <= tpl["metadata"]["labels"].items(), _ident(owner)
        spec = tpl["spec"]
        for v in spec.get("volumes", []):
            if "configMap" in v:
                assert ("ConfigMap", v["configMap"]["name"]) in idx, v
            assert "persistentVolumeClaim" not in v, "a claim nothing here creates keeps the pod Pending"
        if "serviceAccountName" in spec:
            assert ("ServiceAccount", spec["serviceAccountName"]) in idx
        names = {v["name"] for v in spec.get("volumes", [])}
        for c in spec["containers"] + spec.get("initContainers", []):
            assert {m["name"] for m in c.get("volumeMounts", [])} <= names, c["name"]
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                assert ref is None or ref.get("optional") is True, f"{c['name']}: secret {ref} must be optional (none is created here)"
    # every Service selects pods of some workload, on ports those pods declare
    for (kind, name), svc in idx.items():
        if kind != "Service":
            continue
        selected = [tpl for _, tpl in templates if svc["spec"]["selector"].items() <= tpl["metadata"]["labels"].items()]
        assert selected, f"Service {name} selects no pod"
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for tpl in selected:
                declared = {p.get("name") for c in tpl["spec"]["containers"] for p in c.get("ports", [])}
                declared |= {p["containerPort"] for c in tpl["spec"]["containers"] for p in c.get("ports", [])}
                assert target in declared, f"Service {name} port {target} not on its pods"


def _discovering(objs: list[dict[str, Any]]):
    """Containers that run kvgate with a config holding a ``discovery:`` section, and that config."""
    for owner, tpl, c in containers(objs):
        if not c["image"].startswith("kvgate"):
            continue
        path = flag(c["args"], "--config")
        if path is None:
            continue
        mount = next(m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
        vol = next(v for v in tpl["spec"]["volumes"] if v["name"] == mount["name"])
        cfg = gateway_config(objs, vol["configMap"]["name"])
        if cfg.discovery is not None:
            yield owner, tpl, c, cfg


@ALL
def test_rbac_covers_what_discovery_calls(variant):
    objs = render(KUSTOMIZATIONS[variant])
    idx = by_ident(objs)
    # gateway/discovery.py: list + watch on pods (CoreV1Api), and on inferencepools in the pool's
    # API group (CustomObjectsApi), either of the groups DiscoveryConfig accepts
    pool_groups = {api.split("/")[0] for api in typing.get_args(typing.get_type_hints(DiscoveryConfig)["inference_pool_api"])}
    assert pool_groups == {"inference.networking.k8s.io", "inference.networking.x-k8s.io"}
    needed = [("", "pods", v) for v in ("get", "list", "watch")] + [(g, "inferencepools", v) for g in pool_groups for v in ("get", "list", "watch")]
    users = {c["name"]: tpl["spec"].get("serviceAccountName") for _, tpl, c, _ in _discovering(objs)}
    assert {"gateway", "extproc", "indexer", "sidecar"} <= set(users)
    for container, account in users.items():
        assert account, f"{container} discovers pods but runs without a service account"
        roles = [
            idx[("Role", b["roleRef"]["name"])]
            for (kind, _), b in idx.items()
            if kind == "RoleBinding" and any(s["kind"] == "ServiceAccount" and s["name"] == account for s in b["subjects"])
        ]
        for group, resource, verb in needed:
            assert any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for role in roles for r in role["rules"]), (
                f"{account} may not {verb} {resource} in {group or 'core'}"
            )


# -- the gateway, the picker, the indexer -------------------------------------------------------------------------


@ALL
def test_gateway_configs_parse_and_point_at_real_things(variant):
    objs = render(KUSTOMIZATIONS[variant])
    idx = by_ident(objs)
    found = list(_discovering(objs))
    for owner, tpl, c, cfg in found:
        d = cfg.discovery
        if d.kind == "inferencepool":  # overlays/gie: the picker follows the pool
            assert variant == "gie" and c["name"] == "extproc"
            pool = idx[("InferencePool", d.inference_pool)]
            assert pool["apiVersion"] == d.inference_pool_api
        else:
            assert d.kind == "pods" and (d.label_selector or DEFAULT_POD_SELECTOR) == "llm-d.ai/inferenceServing=true"
        assert d.role_label == "llm-d.ai/role" and d.namespace is None  # the pod's own namespace
        if c["name"] == "sidecar":  # the decode pod's sidecar: no index, no tokenizer (sidecar_config)
            assert cfg.index == parse_config({}).index and not cfg.models
            continue
        # the shared index: the Redis Service, on its port
        u = urlparse(cfg.index.backend)
        assert u.scheme == "redis" and (cfg.index.ingest is False or c["name"] == "indexer")  # the indexer ingests whatever it says
        svc = idx[("Service", u.hostname)]
        assert u.port in {p["port"] for p in svc["spec"]["ports"]}
        redis = next(c for _, t, c in containers(objs) if svc["spec"]["selector"].items() <= t["metadata"]["labels"].items())
        assert flag(redis["args"], "--maxmemory") and flag(redis["args"], "--maxmemory-policy") == "volatile-lru"
        # tokenizers: the init container fetches each model into the directory the config names
        for model, mc in cfg.models.items():
            init = {e["name"]: e.get("value") for i in tpl["spec"].get("initContainers", []) for e in i.get("env", [])}
            if c["name"] == "indexer":
                continue
            assert init["MODEL"] == model and mc.tokenizer == f"{init['TOKENIZER_ROOT']}/{model}"
            assert any(m["mountPath"] == init["TOKENIZER_ROOT"] for m in c["volumeMounts"])
    gateway = by_ident(objs)[("Deployment", "kvgate")]
    spec = gateway["spec"]["template"]["spec"]
    [g] = [c for c in spec["containers"] if c["name"] == "gateway"]
    assert gateway["spec"]["replicas"] >= 2
    assert g["readinessProbe"]["httpGet"]["path"] == "/ready" and g["livenessProbe"]["httpGet"]["path"] == "/health"
    assert g["resources"]["requests"]["cpu"] and g["resources"]["requests"]["memory"]
    assert spec["affinity"]["podAntiAffinity"] and spec["topologySpreadConstraints"]
    assert idx[("Deployment", "kvgate-indexer")]["spec"]["replicas"] == 1
    for _, _, c in containers(objs):
        if c["image"].startswith("kvgate"):
            check_kvgate_args(c["args"])


@ALL
def test_the_indexer_follows_the_gateways_pods_and_is_scraped(variant):
    """The indexer's own config finds the gateways' pods under the gateways' ids and keys them as
    the gateways look them up; Prometheus scrapes its /metrics, Kubernetes probes its /health."""
    objs = render(KUSTOMIZATIONS[variant])
    by_name = {c["name"]: (tpl, c, cfg) for _, tpl, c, cfg in _discovering(objs)}
    tpl, c, indexer = by_name["indexer"]
    gateway = by_name["gateway"][2]
    assert indexer.discovery == gateway.discovery  # the same pods, the same replica ids (pod names)
    assert indexer.index.backend == gateway.index.backend and indexer.index.ttl_s == gateway.index.ttl_s
    keying = lambda cfg: {m: (mc.block_size, mc.prefix_hash_algo, mc.prefix_hash_seed) for m, mc in cfg.models.items()}  # noqa: E731
    assert keying(indexer) == keying(gateway)
    port = int(flag(c["args"], "--metrics-port"))
    assert {"name": "metrics", "containerPort": port} in c["ports"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "metrics"}
    ann = tpl["metadata"]["annotations"]
    assert (ann["prometheus.io/scrape"], ann["prometheus.io/port"], ann["prometheus.io/path"]) == ("true", str(port), "/metrics")


def test_the_image_can_discover():
    """The configs here use discovery: the image kvgate runs from installs its client (the k8s extra)."""
    line = next(line for line in (ROOT / "deploy" / "Dockerfile").read_text().splitlines() if line.startswith("RUN pip install"))
    extras = line.split("'.[", 1)[1].split("]")[0].split(",")
    assert "k8s" in extras


def _serving_pods(objs: list[dict[str, Any]]):
    """A pod as the API server would show it for every serving pod template (IP 10.0.0.x)."""
    for i, (owner, tpl) in enumerate(pod_templates(objs)):
        labels = tpl["metadata"]["labels"]
        if labels.get("app.kubernetes.io/name") == "vllm":
            pod = make_pod(f"{owner['metadata']['name']}-{i}", ip=f"10.0.0.{i + 1}", labels=labels, annotations=tpl["metadata"].get("annotations"))
            yield owner, tpl, pod


@ALL
def test_discovery_finds_each_serving_pod_where_it_listens(variant):
    """gateway.discovery turns each pod into a replica: the gateway reaches vLLM itself, the picker
    reaches decode pods at their sidecar and prefill pods at vLLM; KV events where vLLM publishes."""
    objs = render(KUSTOMIZATIONS[variant])
    idx = by_ident(objs)
    configs = {c["name"]: cfg for _, _, c, cfg in _discovering(objs)}

    def selects(cfg: GatewayConfig, labels: dict[str, str]) -> tuple[bool, int | None]:
        """Whether discovery with ``cfg`` takes a pod with these labels, and the pool's port."""
        d = cfg.discovery
        assert d is not None
        if d.kind == "pods":
            return label_matcher(d.label_selector or DEFAULT_POD_SELECTOR)(labels), None
        pool = idx[("InferencePool", d.inference_pool)]["spec"]
        ok = pool["selector"]["matchLabels"].items() <= labels.items() and (d.label_selector is None or label_matcher(d.label_selector)(labels))
        return ok, pool["targetPorts"][0]["number"]

    roles_seen = set()
    for owner, tpl, pod in _serving_pods(objs):
        [vllm] = [c for c in tpl["spec"]["containers"] if c["name"] == "vllm"]
        sidecar = next((c for c in tpl["spec"]["containers"] if c["name"] == "sidecar"), None)
        selected = {name: selects(cfg, pod["metadata"]["labels"])[0] for name, cfg in configs.items()}
        if "--headless" in vllm["args"]:  # an LWS worker: no API server, never a replica
            assert not any(selected.values()), _ident(owner)
            continue
        assert all(selected.values()), f"{_ident(owner)} is not selected by every discovering config"
        vllm_port = int(flag(vllm["args"], "--port"))
        kv = json.loads(flag(vllm["args"], "--kv-events-config"))
        for name, cfg in configs.items():
            r = pod_replica(pod, cfg.discovery, selects(cfg, pod["metadata"]["labels"])[1])
            assert r is not None and r.ready
            roles_seen.add(r.role)
            port = urlparse(r.url).port
            if name == "sidecar":  # allowed prefill targets: where the picker names the prefill pods
                if r.role in ("prefill", "both"):
                    picker = pod_replica(pod, configs["extproc"].discovery, selects(configs["extproc"], pod["metadata"]["labels"])[1])
                    assert picker is not None and r.url == picker.url and port == vllm_port
                assert r.kv_events is None  # the sidecar subscribes to nothing
                continue
            if name == "extproc" and r.role == "decode":
                assert sidecar is not None and port == int(flag(sidecar["args"], "--port")), "the picker must reach decode pods through their sidecar"
            else:
                assert port == vllm_port, f"{name} would call {_ident(owner)} on {port}, vLLM listens on {vllm_port}"
            assert r.kv_events == f"tcp://{pod['status']['podIP']}:{urlparse(kv['endpoint'].replace('*', 'x')).port}"
            assert r.replay == f"tcp://{pod['status']['podIP']}:{urlparse(kv['replay_endpoint'].replace('*', 'x')).port}"
            assert cfg.discovery.topic == kv["topic"]
            assert set(r.models) == set(cfg.models) == {vllm["args"][0]}
    assert roles_seen == {"prefill", "decode"}


# -- vLLM ----------------------------------------------------------------------------------------------------

#: vLLM 0.33's flags used here (vllm/engine/arg_utils.py; --headless: vllm/entrypoints/common/cli_args.py)
VLLM_FLAGS = {
    "--port",
    "--enable-prefix-caching",
    "--prefix-caching-hash-algo",
    "--block-size",
    "--kv-events-config",
    "--kv-transfer-config",
    "--tensor-parallel-size",
    "--pipeline-parallel-size",
    "--distributed-executor-backend",
    "--nnodes",
    "--node-rank",
    "--master-addr",
    "--master-port",
    "--headless",
}
#: vllm/config/kv_events.py KVEventsConfig and vllm/config/kv_transfer.py KVTransferConfig (0.33)
KV_EVENTS_FIELDS = {"enable_kv_cache_events", "publisher", "endpoint", "replay_endpoint", "buffer_steps", "hwm", "max_queue_size", "topic"}
KV_TRANSFER_FIELDS = {
    "kv_connector",
    "engine_id",
    "kv_buffer_device",
    "kv_role",
    "kv_port",
    "kv_connector_extra_config",
    "kv_connector_module_path",
    "enable_permute_local_kv",
    "kv_load_failure_policy",
}
#: NIXL backends vLLM's NIXL worker passes to nixl_agent_config (kv_connector_extra_config "backends", default ["UCX"])
NIXL_BACKENDS = {"UCX", "LIBFABRIC"}


def _port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


@ALL
def test_vllm_pods_run_vllms_real_flags(variant):
    objs = render(KUSTOMIZATIONS[variant])
    gw = gateway_config(objs, "kvgate-config")
    seeds = set()
    vllms = [(o, t, c) for o, t, c in containers(objs) if c["name"] == "vllm"]
    assert vllms
    for owner, tpl, c in vllms:
        where = f"{variant}: {_ident(owner)}"
        assert c["command"] == ["vllm", "serve"], where
        args = c["args"]
        assert args[0] in gw.models, where  # the served model, as the gateway knows it
        for a in args[1:]:
            assert a.startswith("--"), f"{where}: stray argument {a!r}"
            assert a.split("=")[0] in VLLM_FLAGS, f"{where}: unverified vLLM flag {a}"
        model = gw.models[args[0]]
        assert flag(args, "--prefix-caching-hash-algo") == model.prefix_hash_algo
        assert int(flag(args, "--block-size")) == model.block_size
        kv = json.loads(flag(args, "--kv-events-config"))
        assert set(kv) <= KV_EVENTS_FIELDS and kv["enable_kv_cache_events"] is True and kv["publisher"] == "zmq"
        xfer = json.loads(flag(args, "--kv-transfer-config"))
        assert set(xfer) <= KV_TRANSFER_FIELDS and xfer["kv_connector"] == "NixlConnector" and xfer["kv_role"] == "kv_both"
        assert set(xfer.get("kv_connector_extra_config", {})) <= {"backends"}
        assert set(xfer.get("kv_connector_extra_config", {}).get("backends", ["UCX"])) <= NIXL_BACKENDS
        env = {e["name"]: e for e in c["env"]}
        seeds.add(env["PYTHONHASHSEED"]["value"])
        assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        side = int(env["VLLM_NIXL_SIDE_CHANNEL_PORT"]["value"])
        declared = {p["containerPort"] for p in c["ports"]}
        if "--headless" in args:
            assert side in declared
        else:
            assert {side, _port(kv["endpoint"]), _port(kv["replay_endpoint"]), int(flag(args, "--port"))} <= declared, where
        assert len({side, _port(kv["endpoint"]), _port(kv["replay_endpoint"]), int(flag(args, "--port"))}) == 4
        assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"]
        role = tpl["metadata"]["labels"]["llm-d.ai/role"]
        assert role in ("prefill", "decode")
    assert seeds == {model.prefix_hash_seed for model in gw.models.values()}, "every vLLM pod needs the gateway's PYTHONHASHSEED"


@ALL
def test_decode_pods_sidecar_reaches_local_vllm_and_prefill_pods(variant):
    objs = render(KUSTOMIZATIONS[variant])
    idx = by_ident(objs)
    decode = [
        (o, t)
        for o, t in pod_templates(objs)
        if t["metadata"]["labels"].get("llm-d.ai/role") == "decode" and "llm-d.ai/inferenceServing" in t["metadata"]["labels"]
    ]
    assert decode
    for owner, tpl in decode:
        cs = {c["name"]: c for c in tpl["spec"]["containers"]}
        side, vllm = cs["sidecar"], cs["vllm"]
        check_kvgate_args(side["args"])
        assert urlparse(flag(side["args"], "--vllm")).hostname == "127.0.0.1"
        assert urlparse(flag(side["args"], "--vllm")).port == int(flag(vllm["args"], "--port"))
        assert int(flag(side["args"], "--port")) in {p["containerPort"] for p in side["ports"]}
        assert side["readinessProbe"]["httpGet"]["path"] == "/sidecar/health"
        # the prefill pods it may call come from its discovery, live (no --prefill list resolved once)
        assert flag(side["args"], "--prefill") is None
        [(_, _, _, cfg)] = [d for d in _discovering(objs) if d[2] is side]
        assert cfg.discovery is not None and cfg.discovery.kind == "pods"
        # its service account's token reaches the sidecar only: vLLM gets none
        spec = tpl["spec"]
        assert spec["automountServiceAccountToken"] is False and ("ServiceAccount", spec["serviceAccountName"]) in idx
        sa_dir = "/var/run/secrets/kubernetes.io/serviceaccount"
        [mount] = [m for m in side["volumeMounts"] if m["mountPath"] == sa_dir]
        [vol] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        sources = vol["projected"]["sources"]
        assert {"path": "token", "expirationSeconds": 3607} in [x.get("serviceAccountToken") for x in sources]
        assert any(x.get("configMap", {}).get("name") == "kube-root-ca.crt" for x in sources)
        assert any(i["path"] == "namespace" for x in sources for i in x.get("downwardAPI", {}).get("items", []))
        assert all(m["mountPath"] != sa_dir for c in spec["containers"] if c["name"] != "sidecar" for m in c.get("volumeMounts", []))


# -- autoscaling -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported_families() -> set[str]:
    """The metric families a running gateway serves on /metrics (no replicas needed)."""
    from prometheus_client.parser import text_string_to_metric_families

    with GatewayThread(fleet_config([])) as g:
        text = httpx.get(f"{g.url}/metrics", timeout=5).text
    return {f.name for f in text_string_to_metric_families(text)}


def test_hpa_scales_the_gateway_on_its_own_metric_with_a_cpu_fallback(exported_families):
    objs = render(K8S)
    idx = by_ident(objs)
    hpa = idx[("HorizontalPodAutoscaler", "kvgate")]
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) in idx and ref["apiVersion"] == "apps/v1"
    target = idx[(ref["kind"], ref["name"])]
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["minReplicas"] <= target["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    [pods] = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    name = pods["metric"]["name"]
    assert name in exported_families, f"the gateway exports no {name}"
    assert pods["target"]["type"] == "AverageValue"
    limit = gateway_config(objs, "kvgate-config").limits.max_inflight
    assert 0 < float(pods["target"]["averageValue"]) < limit, "scale before admission starts queueing"
    [cpu] = [m["resource"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"]
    assert cpu["name"] == "cpu" and cpu["target"]["type"] == "Utilization"
    assert all(c["resources"]["requests"].get("cpu") for c in target["spec"]["template"]["spec"]["containers"]), "CPU utilization needs CPU requests"
    # the adapter rule that serves it on the custom metrics API names the same series
    [rule] = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter-rules.yaml").read_text())["rules"]["custom"]
    assert rule["name"]["as"] == name and rule["seriesQuery"].startswith(name + "{")
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    # the PDB keeps one gateway through voluntary disruptions, and selects the gateway's pods
    pdb = idx[("PodDisruptionBudget", "kvgate")]
    labels = target["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert 1 <= pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]


# -- overlays ---------------------------------------------------------------------------------------------------


def test_aws_overlay_moves_kv_over_efa_and_changes_nothing_else():
    base, aws = by_ident(render(K8S)), by_ident(render(KUSTOMIZATIONS["aws"]))
    assert set(base) == set(aws)
    changed = {i for i in base if base[i] != aws[i]}
    assert changed == {("Deployment", "vllm-prefill"), ("Deployment", "vllm-decode")}
    for ident in changed:
        spec = aws[ident]["spec"]["template"]["spec"]
        [c] = [c for c in spec["containers"] if c["name"] == "vllm"]
        assert c["image"].startswith("ghcr.io/llm-d/llm-d-aws:")
        xfer = json.loads(flag(c["args"], "--kv-transfer-config"))
        assert xfer["kv_connector_extra_config"] == {"backends": ["LIBFABRIC"]}
        efa = c["resources"]["requests"]["vpc.amazonaws.com/efa"]
        assert int(efa) >= 1 and c["resources"]["limits"]["vpc.amazonaws.com/efa"] == efa
        assert "IPC_LOCK" in c["securityContext"]["capabilities"]["add"]
        zone = spec["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
        assert zone["topologyKey"] == "topology.kubernetes.io/zone"  # EFA stays within a zone
        # the rest of the vLLM command is the base's
        [b] = [b for b in base[ident]["spec"]["template"]["spec"]["containers"] if b["name"] == "vllm"]
        assert [a for a in c["args"] if not a.startswith("--kv-transfer-config")] == [a for a in b["args"] if not a.startswith("--kv-transfer-config")]
        others = [x for x in spec["containers"] if x["name"] != "vllm"]
        assert others == [x for x in base[ident]["spec"]["template"]["spec"]["containers"] if x["name"] != "vllm"]


def test_lws_overlay_runs_each_replica_across_nodes():
    base, lws = by_ident(render(K8S)), by_ident(render(KUSTOMIZATIONS["lws"]))
    assert ("Deployment", "vllm-prefill") not in lws and ("Deployment", "vllm-decode") not in lws
    assert {k: v for k, v in base.items() if k[0] != "Deployment" or not k[1].startswith("vllm-")} == {
        k: v for k, v in lws.items() if k[0] != "LeaderWorkerSet"
    }
    for role in ("prefill", "decode"):
        lwt = lws[("LeaderWorkerSet", f"vllm-{role}")]["spec"]["leaderWorkerTemplate"]
        size = lwt["size"]
        leader = next(c for c in lwt["leaderTemplate"]["spec"]["containers"] if c["name"] == "vllm")
        worker = next(c for c in lwt["workerTemplate"]["spec"]["containers"] if c["name"] == "vllm")
        assert flag(leader["args"], "--node-rank") == "0" and "--headless" not in leader["args"]
        assert flag(worker["args"], "--node-rank") == "$(LWS_WORKER_INDEX)" and "--headless" in worker["args"]
        for c in (leader, worker):
            assert int(flag(c["args"], "--nnodes")) == size
            assert flag(c["args"], "--master-addr") == "$(LWS_LEADER_ADDRESS)"
            gpus = int(c["resources"]["limits"]["nvidia.com/gpu"])
            assert int(flag(c["args"], "--tensor-parallel-size")) * int(flag(c["args"], "--pipeline-parallel-size")) == gpus * size
        # everything but the node's own part of the command is the same on leader and workers
        strip = lambda args: [a for a in args if not a.startswith("--node-rank") and a != "--headless"]  # noqa: E731
        assert strip(leader["args"]) == strip(worker["args"])
        assert lwt["leaderTemplate"]["metadata"]["labels"]["llm-d.ai/inferenceServing"] == "true"
        assert "llm-d.ai/inferenceServing" not in lwt["workerTemplate"]["metadata"]["labels"]


def test_gie_overlay_makes_the_picker_the_pools_endpoint_picker():
    base, gie = by_ident(render(K8S)), by_ident(render(KUSTOMIZATIONS["gie"]))
    assert set(gie) - set(base) == {("InferencePool", "kvgate")}
    assert {i for i in base if base[i] != gie[i]} == {("ConfigMap", "kvgate-extproc-config")}
    pool = gie[("InferencePool", "kvgate")]
    ref = pool["spec"]["endpointPickerRef"]
    svc = gie[("Service", ref["name"])]
    picker = gie[("Deployment", "kvgate-extproc")]["spec"]["template"]["spec"]["containers"][0]
    assert svc["spec"]["selector"].items() <= gie[("Deployment", "kvgate-extproc")]["spec"]["template"]["metadata"]["labels"].items()
    assert ref["port"]["number"] == int(flag(picker["args"], "--port")) in {p["port"] for p in svc["spec"]["ports"]}
    ours, theirs = gateway_config(list(base.values()), "kvgate-extproc-config"), gateway_config(list(gie.values()), "kvgate-extproc-config")
    assert theirs.discovery.inference_pool == "kvgate" and theirs.discovery.kind == "inferencepool"
    # nothing else in the picker's config moved
    strip = lambda c: {k: v for k, v in msgspec.to_builtins(c).items() if k != "discovery"}  # noqa: E731
    assert strip(ours) == strip(theirs)


# -- the tokenizer init container -------------------------------------------------------------------------


def test_tokenizer_init_container_fetches_what_the_gateway_loads(tmp_path):
    """The fetch script (ConfigMap kvgate-tokenizer-fetch) run for real against a stand-in hub:
    the directory it fills loads with kvindex's tokenizer loader; a second run fetches nothing;
    a repository without chat_template.jinja is fine, one without tokenizer.json is an error."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from kvindex.tokenize import load_tokenizer

    objs = render(K8S)
    script = by_ident(objs)[("ConfigMap", "kvgate-tokenizer-fetch")]["data"]["fetch_tokenizer.py"]
    init = by_ident(objs)[("Deployment", "kvgate")]["spec"]["template"]["spec"]["initContainers"][0]
    env = {e["name"]: e["value"] for e in init["env"] if "value" in e}
    hub = tmp_path / "hub"
    repo = hub / env["MODEL"] / "resolve" / "main"
    repo.mkdir(parents=True)
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(repo / "tokenizer.json"))
    (repo / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}))
    requests: list[str] = []

    class Hub(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, directory=str(hub), **kw)

        def log_message(self, *a: Any) -> None:
            requests.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = tmp_path / "models"
        run_env = {**os.environ, **env, "TOKENIZER_ROOT": str(out), "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}"}
        for _ in range(2):
            r = subprocess.run([sys.executable, "-c", script], env=run_env, capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
        assert sorted(p.name for p in (out / env["MODEL"]).iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
        assert len([p for p in requests if "tokenizer.json" in p]) == 1  # the second run found it there
        assert load_tokenizer(str(out / env["MODEL"])).encode("hello world") == [1, 2]
        (repo / "tokenizer.json").unlink()
        run_env["TOKENIZER_ROOT"] = str(tmp_path / "other")
        r = subprocess.run([sys.executable, "-c", script], env=run_env, capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and "404" in r.stderr
    finally:
        server.shutdown()
