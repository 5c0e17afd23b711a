"""Offline checks of the deployment: Dockerfile, k8s/ (rendered like kustomize) and k8s/README.md.

No cluster, docker or kubectl is needed (one test compares the renderer with `kubectl kustomize` when
kubectl is installed). Every checker also gets a deliberately broken input, so that it can fail.
"""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
from urllib.parse import urlparse

import pytest
import yaml

try:  # tests/ as a package or as a plain directory on sys.path
    from . import k8s_render as kr
except ImportError:
    import k8s_render as kr

REPO, K8S = kr.REPO, kr.K8S
PLATFORM = kr.build(K8S)
SEARCH = kr.build(K8S / "search")
RENDERED = PLATFORM + SEARCH
EXAMPLE_SECRETS = kr.load_docs(K8S / "secrets.example.yaml")
SETTINGS = yaml.safe_load((K8S / "settings" / "kustomization.yaml").read_text())
IMAGE = next(i for i in SETTINGS["images"] if i["name"] == "capt")
PROJECT_IMAGE = f"{IMAGE['newName']}:{IMAGE['newTag']}"
NAMESPACE = SETTINGS["namespace"]
DOCKERFILE = (REPO / "Dockerfile").read_text()
INSTRUCTIONS = kr.dockerfile_instructions(DOCKERFILE)
README = (K8S / "README.md").read_text()
README_FLAT = README.replace("\\\n", " ")


def ids(obj: dict) -> str:
    return f"{obj['kind']}-{obj['metadata']['name']}"


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    hits = [o for o in objs if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


RAYCLUSTER, RAYJOB = one(PLATFORM, "RayCluster"), one(SEARCH, "RayJob")
MLFLOW = one(PLATFORM, "Deployment", "mlflow")
SETTINGS_DATA = one(PLATFORM, "ConfigMap", "capt-settings")["data"]


def container(obj: dict, name: str) -> dict:
    return next(c for _, c, _ in kr.containers(obj) if c.get("name") == name)


def copy_sources() -> list[str]:
    out = []
    for op, arg in INSTRUCTIONS:
        if op == "COPY":
            out += [p for p in arg.split() if not p.startswith("--")][:-1]
    return out


def copied(path: str) -> bool:
    return any(path == s.rstrip("/") or path.startswith(s.rstrip("/") + "/") for s in copy_sources())


# ------------------------------------------------------------------ rendering
def test_platform_and_search_render_the_expected_objects():
    required = {f"Namespace-{NAMESPACE}", "ConfigMap-capt-settings", "PersistentVolumeClaim-capt-shared",
                "PersistentVolumeClaim-capt-models", "Service-mlflow", "Deployment-mlflow", "RayCluster-capt",
                "NetworkPolicy-mlflow-from-ray", "NetworkPolicy-postgres-from-capt", "NetworkPolicy-minio-from-mlflow"}
    optional = {"Service-postgres", "StatefulSet-postgres", "Service-minio", "StatefulSet-minio"}  # managed ones
    assert required <= {ids(o) for o in PLATFORM} <= required | optional
    assert len(PLATFORM) == len({ids(o) for o in PLATFORM})
    assert sorted(ids(o) for o in SEARCH) == ["ConfigMap-capt-settings", "RayJob-capt-search"]
    assert one(PLATFORM, "Namespace")["metadata"]["name"] == NAMESPACE
    assert all(o["metadata"]["namespace"] == NAMESPACE for o in RENDERED if o["kind"] != "Namespace")
    assert not [o for o in RENDERED if o["kind"] == "Secret"], "credentials must not come from the repository"
    for kz in (K8S / "kustomization.yaml", K8S / "search" / "kustomization.yaml"):
        assert "secrets.example.yaml" not in kz.read_text()


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed: renderer not compared")
@pytest.mark.parametrize("directory", ["k8s", "k8s/search"])
def test_renderer_matches_kubectl_kustomize(directory):
    out = subprocess.run(["kubectl", "kustomize", directory], cwd=REPO, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    real = {ids(o): o for o in yaml.safe_load_all(out) if o}
    assert {ids(o): o for o in kr.build(REPO / directory)} == real


def test_renderer_emulates_namespace_images_configmap_and_replacements(tmp_path):
    (tmp_path / "app.yaml").write_text(yaml.safe_dump_all([
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}},
        {"apiVersion": "ex/v1", "kind": "Deep", "metadata": {"name": "d"},
         "spec": {"a": {"template": {"spec": {"containers": [{"name": "c", "image": "capt:old"}]}}}, "n": 1}}]))
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": ["app.yaml"], "namespace": "ns",
        "images": [{"name": "capt", "newName": "reg/capt", "newTag": "v2"}],
        "generatorOptions": {"disableNameSuffixHash": True},
        "configMapGenerator": [{"name": "s", "literals": ["N=7"]}],
        "replacements": [{"source": {"kind": "ConfigMap", "name": "s", "fieldPath": "data.N"},
                          "targets": [{"select": {"kind": "Deep"}, "fieldPaths": ["spec.n"]}]}]}))
    ns, deep, cm = kr.build(tmp_path)
    assert ns["metadata"]["name"] == "ns" and "namespace" not in ns["metadata"]
    assert deep["spec"]["a"]["template"]["spec"]["containers"][0]["image"] == "reg/capt:v2"
    assert deep["spec"]["n"] == 7 and deep["metadata"]["namespace"] == cm["metadata"]["namespace"] == "ns"


@pytest.mark.parametrize("extra, message", [
    ({"patches": []}, "not emulated"),
    ({"replacements": [{"source": {"kind": "ConfigMap", "name": "s", "fieldPath": "data.N"},
                        "targets": [{"select": {"kind": "ConfigMap"}, "fieldPaths": ["data.MISSING"]}]}]},
     "unable to find field"),
])
def test_renderer_refuses_what_kustomize_would_or_what_it_does_not_emulate(tmp_path, extra, message):
    kz = {"generatorOptions": {"disableNameSuffixHash": True},
          "configMapGenerator": [{"name": "s", "literals": ["N=7"]}], **extra}
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kz))
    with pytest.raises(ValueError, match=message):
        kr.build(tmp_path)


# ------------------------------------------------------------------ schemas
@pytest.mark.parametrize("obj", RENDERED + EXAMPLE_SECRETS, ids=ids)
def test_objects_match_schemas(obj):
    assert kr.schema_errors(obj) == []


def _worker(o):
    return o["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("base, breaker", [
    ("rc", lambda o: o["spec"]["headGroupSpec"].update(rayStartParam={})),            # misspelled field
    ("rc", lambda o: o["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0})),  # not a string
    ("rc", lambda o: o["spec"]["workerGroupSpecs"][0].pop("groupName")),              # required field
    ("rc", lambda o: _worker(o)["resources"]["limits"].update(memory="32GB")),        # bad quantity
    ("rc", lambda o: _worker(o).update(volumeMount=[])),                              # misspelled field
    ("rc", lambda o: o["spec"]["autoscalerOptions"].update(version="v3")),
    ("rj", lambda o: o["spec"].update(clusterSelector={"ray.io/cluster": "capt"})),   # both modes at once
    ("rj", lambda o: o["spec"].update(ttlSecondsAfterFinished="600")),
    ("rj", lambda o: o["spec"].update(submissionMode="K8sMode")),
    ("mlflow", lambda o: o["spec"].update(replica=1)),
    ("mlflow", lambda o: o["spec"]["template"]["spec"]["containers"][0]["ports"][0].update(containerPort=70000)),
])
def test_schemas_reject_broken_manifests(base, breaker):
    obj = copy.deepcopy({"rc": RAYCLUSTER, "rj": RAYJOB, "mlflow": MLFLOW}[base])
    breaker(obj)
    assert kr.schema_errors(obj)


# ------------------------------------------------------------------ security
@pytest.mark.parametrize("obj", RENDERED, ids=ids)
def test_security_policy(obj):
    assert kr.security_findings(obj) == []


def _ctr(o):
    return o["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("breaker", [
    lambda o: _ctr(o)["securityContext"].update(privileged=True),
    lambda o: _ctr(o)["resources"].pop("limits"),
    lambda o: _ctr(o)["resources"]["requests"].pop("memory"),
    lambda o: _ctr(o)["securityContext"].pop("allowPrivilegeEscalation"),
    lambda o: _ctr(o)["securityContext"].update(capabilities={"drop": ["ALL"], "add": ["NET_ADMIN"]}),
    lambda o: o["spec"]["template"]["spec"]["securityContext"].pop("runAsNonRoot"),
    lambda o: o["spec"]["template"]["spec"]["securityContext"].update(runAsUser=0),
    lambda o: o["spec"]["template"]["spec"].update(hostNetwork=True),
    lambda o: o["spec"]["template"]["spec"].setdefault("volumes", []).append({"name": "h", "hostPath": {"path": "/"}}),
    lambda o: _ctr(o)["env"].append({"name": "DB_PASSWORD", "value": "hunter2"}),
    lambda o: _ctr(o)["env"].append({"name": "DB_URL", "value": "postgresql://capt:hunter2@postgres/mlflow"}),
])
def test_security_checker_catches_broken_manifests(breaker):
    obj = copy.deepcopy(MLFLOW)
    breaker(obj)
    assert kr.security_findings(obj)


def test_no_plaintext_credentials_in_repository_files():
    files = [p for p in K8S.rglob("*") if p.is_file() and p.name != "secrets.example.yaml"]
    for path in files + [REPO / "Dockerfile", REPO / ".dockerignore"]:
        text = path.read_text()
        assert kr.uri_credentials(text) == [], path
        assert "CHANGE_ME" not in text, path
    assert kr.uri_credentials("postgresql://u:$(POSTGRES_PASSWORD)@h/db ${X}") == []
    assert kr.uri_credentials("s3://key:secret@bucket") and kr.uri_credentials("x://u:password@h")
    for secret in EXAMPLE_SECRETS:  # only placeholders in the example
        for key, value in secret["stringData"].items():
            assert value == "CHANGE_ME" or not kr.SECRET_NAME.search(key), (secret["metadata"]["name"], key)


def test_env_var_references_are_defined_before_use():
    assert [f for o in RENDERED for f in kr.env_reference_findings(o)] == []
    broken = copy.deepcopy(MLFLOW)
    env = _ctr(broken)["env"]
    env.insert(0, env.pop(next(i for i, e in enumerate(env) if e["name"] == "MLFLOW_BACKEND_STORE_URI")))
    assert kr.env_reference_findings(broken)


# ------------------------------------------------------------------ Dockerfile and image
def test_dockerfile_base_user_installs_and_mount_points():
    assert kr.dockerfile_findings(DOCKERFILE) == []
    args = dict(a.split("=", 1) for op, a in INSTRUCTIONS if op == "ARG" and "=" in a)
    base = next(a for op, a in INSTRUCTIONS if op == "FROM").replace("${RAY_IMAGE}", args.get("RAY_IMAGE", ""))
    assert base == "rayproject/ray:2.60.0-py311-gpu"
    lock = dict(line.split("==") for line in (REPO / "requirements.lock").read_text().split() if "==" in line)
    for obj in (RAYCLUSTER, RAYJOB):
        assert kr.cluster_specs(obj)[0]["rayVersion"] == lock["ray"] == base.split(":")[1].split("-")[0]
    runs = " ".join(a for op, a in INSTRUCTIONS if op == "RUN")
    assert "-c requirements.lock ." in runs and "--no-deps torchattacks==3.5.1" in runs
    env = " ".join(a for op, a in INSTRUCTIONS if op == "ENV")
    assert "OPENCLIP_CACHE_DIR=/models" in env and "HF_HOME=/models" in env
    workdir = [a for op, a in INSTRUCTIONS if op == "WORKDIR"][-1]
    assert [a for op, a in INSTRUCTIONS if op == "USER"][-1].split(":")[0] == "1000"
    for obj in (RAYCLUSTER, RAYJOB):
        for where, ctr, _ in kr.containers(obj):
            if ctr.get("name") in ("ray-head", "ray-worker"):
                assert ctr["workingDir"] == workdir, where


@pytest.mark.parametrize("text", [
    "FROM x\nUSER 1000\nUSER root\n",
    "FROM x\nRUN true\n",
    "FROM x\nENV AWS_SECRET_ACCESS_KEY=abc\nUSER 1000\n",
    "FROM x\nARG GITHUB_TOKEN\nUSER 1000\n",
    "FROM x\nENV A=1 \\\n    DB_PASSWORD=x\nUSER 1000\n",
])
def test_dockerfile_checker_catches_broken_dockerfiles(text):
    assert kr.dockerfile_findings(text)


def test_copy_sources_exist_and_pass_the_dockerignore():
    ignore = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines() if p.strip() and p[0] != "#"]
    for src in copy_sources():
        assert not kr.dockerignore_excludes(ignore, src), src
    for leaked in (".git/config", "data/shard-000000.tar", "runs/x/mlflow.db", "pipeline/__pycache__/a.pyc"):
        assert kr.dockerignore_excludes(ignore, leaked), leaked
    readme = re.search(r'^readme\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    assert readme is None or copied(readme[1]), "pyproject's readme must be in the image for `pip install .`"
    present = [s for s in copy_sources() if (REPO / s).is_file() or any(p.is_file() for p in (REPO / s).rglob("*"))]
    assert {"pyproject.toml", "requirements.lock"} <= set(present)
    pending = sorted(set(copy_sources()) - set(present))
    if pending:
        pytest.skip(f"COPY sources not in the repository yet (docker build needs them): {pending}")


def test_every_project_container_runs_the_kustomize_image():
    for obj in RENDERED:
        for where, ctr, _ in kr.containers(obj):
            image = ctr.get("image", PROJECT_IMAGE if "autoscaler" in where else None)  # autoscaler = head image
            assert kr.split_image(image)[0] != "capt", f"{where}: placeholder image left"
            if obj["kind"] in ("RayCluster", "RayJob") or obj["metadata"]["name"] == "mlflow":
                assert image == PROJECT_IMAGE, where
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{where}: unpinned {image}"
    built = {t.split("/")[-1].split(":")[0] for t in re.findall(r"docker build -t (\S+) \.", README + DOCKERFILE)}
    assert built == {IMAGE["newName"].split("/")[-1]} and "docker push" in README


# ------------------------------------------------------------------ cross references
SECRET_KEYS = {("secret", s["metadata"]["name"]): set(s["stringData"]) for s in EXAMPLE_SECRETS}
CONFIG_KEYS = {("configmap", o["metadata"]["name"]): set(o["data"]) for o in RENDERED if o["kind"] == "ConfigMap"}


def readme_secrets() -> dict[tuple[str, str], set[str]]:
    commands = re.findall(r"create secret generic (\S+)([^\n]*)", README_FLAT)
    return {("secret", name): set(re.findall(r"--from-literal=([\w.-]+)=", rest)) for name, rest in commands}


def test_every_secret_and_configmap_reference_exists_and_is_documented():
    refs = [ref for obj in RENDERED for ref in kr.env_refs(obj)]
    assert {name for kind, name, _ in refs if kind == "secret"} == {name for _, name in SECRET_KEYS}
    assert kr.missing_refs(refs, {**SECRET_KEYS, **CONFIG_KEYS}) == []
    assert readme_secrets() == SECRET_KEYS, "README's kubectl create secret commands != secrets.example.yaml"
    assert kr.missing_refs([("secret", "capt-s3", "AWS_SESSION_TOKEN")], SECRET_KEYS)
    assert kr.missing_refs([("configmap", "other", None)], CONFIG_KEYS)


def test_services_reach_their_pods():
    assert kr.service_findings(PLATFORM) == []
    broken = copy.deepcopy(PLATFORM)
    _ctr(one(broken, "Deployment", "mlflow"))["ports"][0].update(name="web", containerPort=5001)
    assert kr.service_findings(broken)


def test_volumes_exist_and_ray_pods_share_storage():
    assert kr.volume_findings(RENDERED) == []
    broken = copy.deepcopy(RENDERED)
    one(broken, "RayJob")["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"][0][
        "persistentVolumeClaim"]["claimName"] = "capt-shard"
    assert kr.volume_findings(broken)
    rwx = {o["metadata"]["name"] for o in PLATFORM
           if o["kind"] == "PersistentVolumeClaim" and o["spec"]["accessModes"] == ["ReadWriteMany"]}
    for obj in (RAYCLUSTER, RAYJOB):
        for where, pod in list(kr.pod_specs(obj))[:2]:  # head, gpu workers
            volumes = {v["name"]: v for v in pod["volumes"]}
            mounts = {m["mountPath"]: volumes[m["name"]] for m in pod["containers"][0]["volumeMounts"]}
            assert mounts["/mnt/shared"]["persistentVolumeClaim"]["claimName"] in rwx, where
            assert mounts["/models"]["persistentVolumeClaim"]["claimName"] in rwx, where
            assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory", where


def test_mlflow_tracking_uri_service_and_allowed_hosts():
    uri = urlparse(SETTINGS_DATA["MLFLOW_TRACKING_URI"])
    service = one(PLATFORM, "Service", uri.hostname)
    assert uri.port in [p["port"] for p in service["spec"]["ports"]]
    for obj in (RAYCLUSTER, RAYJOB):
        for name in ("ray-head", "ray-worker"):
            env = {e["name"]: e for e in container(obj, name)["env"]}
            assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["configMapKeyRef"] == {
                "name": "capt-settings", "key": "MLFLOW_TRACKING_URI"}
    args = container(MLFLOW, "mlflow")["args"]
    hosts = next(a for a in args if a.startswith("--allowed-hosts=")).split("=", 1)[1]
    hosts = hosts.replace("$(POD_NAMESPACE)", NAMESPACE).split(",")
    for host in (uri.netloc, f"{uri.hostname}.{NAMESPACE}.svc:{uri.port}", "localhost:5000", "127.0.0.1:5000"):
        assert kr.host_allowed(hosts, host), host
    assert not kr.host_allowed(["mlflow", "localhost"], "mlflow:5000")  # the port is part of the Host header
    assert "--serve-artifacts" in args and "--artifacts-destination=s3://$(MLFLOW_ARTIFACTS_BUCKET)/mlflow" in args


# ------------------------------------------------------------------ what the local stack proved (issue 16)
LOCK = dict(line.split("==") for line in (REPO / "requirements.lock").read_text().split() if "==" in line)
STACK = (REPO / "scripts" / "local_stack.py").read_text()


def _env(obj: dict, name: str) -> dict:
    return {e["name"]: e for e in container(obj, name)["env"]}


def test_postgres_uris_name_the_installed_driver_everywhere():
    """A bare postgresql:// means psycopg 3 with SQLAlchemy 2.1 and psycopg2 before: the URIs name psycopg 3,
    which the lock (so the image) installs; psycopg2 is neither installed nor named anywhere."""
    assert "psycopg" in LOCK and "psycopg-binary" in LOCK and LOCK["SQLAlchemy"].startswith("2.")
    uris = [_env(MLFLOW, "mlflow")["MLFLOW_BACKEND_STORE_URI"]["value"],
            _env(MLFLOW, "bootstrap")["MLFLOW_BACKEND_STORE_URI"]["value"],
            *[_env(o, "ray-head")["OPTUNA_STORAGE_URL"]["value"] for o in (RAYCLUSTER, RAYJOB)]]
    assert uris and all(kr.postgres_driver(u) == "psycopg" for u in uris), uris
    assert {kr.postgres_driver(u) for u in re.findall(r"postgresql[+\w]*://", STACK)} == {"psycopg"}
    for text in (DOCKERFILE, yaml.safe_dump_all(RENDERED), README):
        assert "psycopg2" not in text
    assert kr.postgres_driver("postgresql://u:$(P)@h/db") is None and kr.postgres_driver("postgresql+psycopg2://h")


def test_search_reads_its_stores_from_the_environment_no_shell_expansion():
    """The RayJob entrypoint passes no credential or ${VAR}: the driver reads OPTUNA_STORAGE_URL and the
    MLflow user from the head's environment, and passes the MLflow user to the trials itself."""
    from pipeline.search_stores import FORWARDED_ENV, OPTUNA_ENV

    entry = RAYJOB["spec"]["entrypoint"]
    assert "${" not in entry and "$(" not in entry and "optuna_storage" not in entry
    assert "optuna_storage=${" not in README_FLAT and "optuna_storage=$" not in README_FLAT
    for obj in (RAYCLUSTER, RAYJOB):
        head = _env(obj, "ray-head")
        assert {OPTUNA_ENV, "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= set(head)
        assert head["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "capt-mlflow-auth"
        assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= set(FORWARDED_ENV)
        assert int(head["RAY_JOB_STOP_WAIT_TIME_S"]["value"]) >= 30  # Ray's default 3 s kills the driver mid-stop
        worker = _env(obj, "ray-worker")  # the workers get no credentials: the driver forwards them
        assert "MLFLOW_TRACKING_PASSWORD" not in worker and OPTUNA_ENV not in worker
    assert f'"{OPTUNA_ENV}"' in STACK or f"'{OPTUNA_ENV}'" in STACK


def test_mlflow_server_requires_authentication_with_credentials_from_a_secret():
    args = container(MLFLOW, "mlflow")["args"]
    assert "--app-name=basic-auth" in args
    env = _env(MLFLOW, "mlflow")
    for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "capt-mlflow-auth", name
    assert env["MLFLOW_AUTH_ADMIN_USERNAME"]["valueFrom"]["secretKeyRef"]["key"] == "MLFLOW_TRACKING_USERNAME"
    ini = env["MLFLOW_AUTH_CONFIG_PATH"]["value"]  # written by the init container into an in-memory volume
    pod = MLFLOW["spec"]["template"]["spec"]
    mount = next(m for m in container(MLFLOW, "mlflow")["volumeMounts"] if ini.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["emptyDir"]["medium"] == "Memory"
    assert ini in container(MLFLOW, "bootstrap")["args"][0]
    assert "--app-name" in STACK and "basic-auth" in STACK and "MLFLOW_AUTH_ADMIN_PASSWORD" in STACK
    assert "mlflow[auth]" in (REPO / "pyproject.toml").read_text() and "Flask-WTF" in LOCK


def test_network_policies_let_only_ray_pods_reach_the_stores():
    policies = [o for o in PLATFORM if o["kind"] == "NetworkPolicy"]
    assert kr.network_policy_findings(PLATFORM) == []
    allowed = {kr.policy_target(PLATFORM, p): kr.policy_sources(PLATFORM, p) for p in policies}
    ray = {"RayCluster/capt head", "RayCluster/capt worker gpu"}
    assert allowed["Deployment/mlflow"] == ray
    assert allowed["StatefulSet/postgres"] == ray | {"Deployment/mlflow"}
    assert allowed["StatefulSet/minio"] == {"Deployment/mlflow"}
    for where, _pod in kr.pod_specs(RAYJOB):  # the RayJob's cluster is let in too (same labels)
        if "submitter" not in where:
            assert kr.labels_of(RAYJOB, where)["app.kubernetes.io/name"] == "capt-ray"
    broken = copy.deepcopy(PLATFORM)
    one(broken, "NetworkPolicy", "mlflow-from-ray")["spec"]["ingress"][0]["from"][0]["podSelector"][
        "matchLabels"] = {"app.kubernetes.io/name": "capt-raay"}
    assert kr.network_policy_findings(broken)


# ------------------------------------------------------------------ KubeRay
@pytest.mark.parametrize("obj", [RAYCLUSTER, RAYJOB], ids=ids)
def test_kuberay_rules_and_policy(obj):
    assert kr.ray_findings(obj) == []


def _spec(o):
    return kr.cluster_specs(o)[0]


@pytest.mark.parametrize("breaker", [
    lambda o: _spec(o)["headGroupSpec"]["rayStartParams"].pop("num-cpus"),
    lambda o: _spec(o)["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "RAY_enable_autoscaler_v2", "value": "1"}),
    lambda o: _spec(o).update(enableInTreeAutoscaling=False),
    lambda o: _spec(o).update(rayVersion="2.51.0"),
    lambda o: _spec(o).pop("authOptions"),
    lambda o: _spec(o)["workerGroupSpecs"][0].update(minReplicas=1),
    lambda o: _spec(o)["workerGroupSpecs"][0]["template"]["spec"].pop("tolerations"),
    lambda o: _worker({"spec": _spec(o)})["resources"]["limits"].pop("nvidia.com/gpu"),
    lambda o: o["spec"].update(shutdownAfterJobFinishes=False),
    lambda o: o["spec"].update(clusterSelector={"ray.io/cluster": "capt"}),
    lambda o: o["spec"].update(runtimeEnvYAML="working_dir: .\n"),
    lambda o: o["spec"].update(entrypoint=o["spec"]["entrypoint"] + " --set 'search.optuna_storage=${OPTUNA_STORAGE_URL}'"),
    lambda o: o["spec"].update(entrypoint=o["spec"]["entrypoint"] + " --set search.optuna_storage=$(OPTUNA_STORAGE_URL)"),
    lambda o: o["spec"].update(entrypoint=o["spec"]["entrypoint"].replace("--resume", "")),
])
def test_kuberay_checker_catches_broken_specs(breaker):
    obj = copy.deepcopy(RAYJOB)
    breaker(obj)
    assert kr.ray_findings(obj)


def test_rayjob_cluster_is_a_copy_of_the_raycluster():
    assert RAYJOB["spec"]["rayClusterSpec"] == RAYCLUSTER["spec"]
    assert RAYJOB["spec"]["backoffLimit"] == 2 and RAYJOB["spec"]["ttlSecondsAfterFinished"] > 0
    gpu = _worker(RAYCLUSTER)["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == int(SETTINGS_DATA["GPU_WORKER_GPUS"])
    assert gpu["requests"]["cpu"] == gpu["limits"]["cpu"] == SETTINGS_DATA["GPU_WORKER_CPUS"]
    assert RAYCLUSTER["spec"]["workerGroupSpecs"][0]["maxReplicas"] == int(SETTINGS_DATA["GPU_WORKER_MAX_REPLICAS"])


def test_rayjob_entrypoint_runs_a_script_and_config_shipped_in_the_image():
    argv = shlex.split(RAYJOB["spec"]["entrypoint"])  # what the submitter's bash hands to `ray job submit`
    assert argv[:2] == ["python", "pipeline/search.py"]
    config = argv[argv.index("--config") + 1]
    sets = dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--set")
    assert sets["search.storage_path"].startswith("/mnt/shared/")
    assert "search.optuna_storage" not in sets  # read from OPTUNA_STORAGE_URL by the driver
    assert "OPTUNA_STORAGE_URL" in {e["name"] for e in container(RAYJOB, "ray-head")["env"]}
    assert copied("pipeline/search.py") and copied(config), "the Dockerfile must COPY the script and config"
    assert f"--config {config}" in README_FLAT, "README's ray job submit should use the same config"
    if not (REPO / config).is_file():
        pytest.skip(f"{config} is not in the repository yet")


# ------------------------------------------------------------------ README and headers
def test_readme_commands_match_the_manifests():
    for command in ("kubectl apply -k k8s/", "kubectl apply -k k8s/search/", "helm install kuberay-operator",
                    f"port-forward svc/{RAYCLUSTER['metadata']['name']}-head-svc 8265",
                    "port-forward svc/mlflow 5000:5000", "RAY_AUTH_TOKEN", "ray job submit --address",
                    f"secret {RAYCLUSTER['spec']['authOptions']['secretName']} -o jsonpath='{{.data.auth_token}}'",
                    f"kubectl create namespace {NAMESPACE}", "search.resources.gpu: 0.25"):
        assert command in README_FLAT, command


@pytest.mark.parametrize("path", sorted(K8S.rglob("*.yaml")), ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_starts_with_how_to_apply_it(path):
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert len(header) >= 3 and "kubectl" in "\n".join(header), f"{path}: no usage header"
