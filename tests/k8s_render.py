"""A small kustomize emulation and the manifest checkers used by tests/test_deploy.py.

The renderer implements only the kustomize features that k8s/ uses, with kustomize v5 semantics:
`resources` (files and directories), `components`, `namespace` (which also renames Namespace
objects), `images` (every `containers`/`initContainers` list at any depth, as kustomize's image
transformer does, so RayCluster and RayJob pod templates are covered), `configMapGenerator` with
literals and `generatorOptions.disableNameSuffixHash: true`, and `replacements` (kind/name
selectors, `[key=value]` list selectors, `\\.` escapes; a missing target field is an error and the
target keeps its YAML type). Any other kustomization field raises, so a new feature in k8s/ fails
the tests instead of being silently ignored.

Every checker returns a list of human-readable findings (empty means fine), so that the tests can
feed it deliberately broken input and assert that it complains.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Iterator
from pathlib import Path

import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
SCHEMA_DIR = Path(__file__).resolve().parent / "data" / "k8s_schemas"

_KUSTOMIZE_FIELDS = {"apiVersion", "kind", "resources", "components", "namespace", "images",
                     "generatorOptions", "configMapGenerator", "replacements"}
_CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|KEY|TOKEN", re.IGNORECASE)
_URI_CREDENTIAL = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:([^@\s/]+)@", re.IGNORECASE)
_VAR_REF = re.compile(r"^(\$\([A-Za-z_][A-Za-z0-9_]*\)|\$\{[A-Za-z_][A-Za-z0-9_]*\})+$")


# ---------------------------------------------------------------- rendering
def load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(Path(path).read_text()) if doc]


def build(directory: Path) -> list[dict]:
    """Render a kustomization directory like `kubectl kustomize DIR`."""
    return _build(Path(directory), component=False, accumulated=[])


def _build(root: Path, component: bool, accumulated: list[dict]) -> list[dict]:
    kz = yaml.safe_load((root / "kustomization.yaml").read_text())
    unknown = set(kz) - _KUSTOMIZE_FIELDS
    if unknown:
        raise ValueError(f"{root}: kustomize fields not emulated by tests/k8s_render.py: {sorted(unknown)}")
    if kz.get("kind", "Kustomization") != ("Component" if component else "Kustomization"):
        raise ValueError(f"{root}: kind {kz.get('kind')!r} used as {'component' if component else 'kustomization'}")
    objs = accumulated
    for entry in kz.get("resources", []):
        path = (root / entry).resolve()
        if path.is_dir():
            objs = objs + build(path)
        elif path.parent == root.resolve() or root.resolve() in path.parents:
            objs = objs + load_docs(path)
        else:  # kustomize's default load restrictor
            raise ValueError(f"{root}: resource file {entry} is outside the kustomization root")
    for entry in kz.get("components", []):
        objs = _build((root / entry).resolve(), component=True, accumulated=objs)
    objs = objs + _generate(root, kz)
    if "namespace" in kz:
        for obj in objs:
            if obj["kind"] == "Namespace":
                obj["metadata"]["name"] = kz["namespace"]
            elif obj["kind"] not in _CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = kz["namespace"]
    for image in kz.get("images", []):
        for obj in objs:
            _set_images(obj, image)
    for replacement in kz.get("replacements", []):
        _replace(objs, replacement)
    return objs


def _generate(root: Path, kz: dict) -> list[dict]:
    out = []
    for gen in kz.get("configMapGenerator", []):
        if not kz.get("generatorOptions", {}).get("disableNameSuffixHash"):
            raise ValueError(f"{root}: configMapGenerator name hashing is not emulated")
        if set(gen) - {"name", "literals"}:
            raise ValueError(f"{root}: configMapGenerator fields not emulated: {sorted(set(gen) - {'name', 'literals'})}")
        data = dict(literal.split("=", 1) for literal in gen.get("literals", []))
        out.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    return out


def split_image(image: str) -> tuple[str, str]:
    """'reg:5000/a/b:tag@sha256:x' -> ('reg:5000/a/b', ':tag@sha256:x')."""
    name, at, digest = image.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon:] + at + digest
    return name, at + digest


def _set_images(node: object, image: dict) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    if isinstance(container, dict) and isinstance(container.get("image"), str):
                        name, suffix = split_image(container["image"])
                        if name == image["name"]:
                            new = image.get("newName", name)
                            tag = f":{image['newTag']}" if "newTag" in image else suffix
                            container["image"] = new + (f"@{image['digest']}" if "digest" in image else tag)
            _set_images(value, image)
    elif isinstance(node, list):
        for item in node:
            _set_images(item, image)


def _path(field_path: str) -> list[str]:
    return [part.replace("\\.", ".") for part in re.split(r"(?<!\\)\.", field_path)]


def _select(objs: list[dict], selector: dict) -> list[dict]:
    if set(selector) - {"kind", "name"}:
        raise ValueError(f"replacement selector fields not emulated: {selector}")
    return [o for o in objs if o["kind"] == selector.get("kind", o["kind"])
            and o["metadata"].get("name") == selector.get("name", o["metadata"].get("name"))]


def _walk(node: object, parts: list[str]) -> tuple[object, object]:
    """Return (container, key) addressing the field at `parts` (raises KeyError if absent)."""
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        match = re.fullmatch(r"\[([^=\]]+)=([^\]]*)\]", part)
        if match:
            hits = [item for item in node if isinstance(item, dict) and str(item.get(match[1])) == match[2]]
            if len(hits) != 1:
                raise KeyError(part)
            node = hits[0]
            continue
        if not isinstance(node, dict) or part not in node:
            raise KeyError(part)
        if last:
            return node, part
        node = node[part]
    raise KeyError(".".join(parts))


def _replace(objs: list[dict], rep: dict) -> None:
    if set(rep) - {"source", "targets"} or set(rep["source"]) - {"kind", "name", "fieldPath"}:
        raise ValueError(f"replacement fields not emulated: {rep}")
    sources = _select(objs, {k: rep["source"][k] for k in ("kind", "name") if k in rep["source"]})
    if len(sources) != 1:
        raise ValueError(f"replacement source {rep['source']} matches {len(sources)} objects")
    holder, key = _walk(sources[0], _path(rep["source"]["fieldPath"]))
    value = holder[key]
    for target in rep["targets"]:
        if set(target) - {"select", "fieldPaths"}:
            raise ValueError(f"replacement target fields not emulated: {target}")
        for obj in _select(objs, target["select"]):
            for field_path in target["fieldPaths"]:
                try:
                    holder, key = _walk(obj, _path(field_path))
                except KeyError as err:
                    raise ValueError(f"unable to find field {field_path!r} in replacement target "
                                     f"{obj['kind']}/{obj['metadata']['name']}") from err
                old = holder[key]  # the target keeps its YAML type, as in kustomize
                holder[key] = int(value) if isinstance(old, int) and not isinstance(old, bool) else str(value)


# ---------------------------------------------------------------- schemas
def _registry() -> Registry:
    resources = []
    for path in sorted(SCHEMA_DIR.glob("*.schema.json")):
        schema = json.loads(path.read_text())
        resources.append((schema["$id"], Resource.from_contents(schema)))
    return Registry().with_resources(resources)


_REGISTRY = _registry()


def schema_errors(obj: dict) -> list[str]:
    path = SCHEMA_DIR / f"{str(obj.get('kind', '')).lower()}.schema.json"
    if not path.exists():
        return [f"no schema for kind {obj.get('kind')!r}"]
    validator = Draft202012Validator(json.loads(path.read_text()), registry=_REGISTRY)
    return [f"{obj['kind']}/{obj.get('metadata', {}).get('name')}: "
            f"{'.'.join(map(str, err.absolute_path)) or '<root>'}: {err.message}"
            for err in validator.iter_errors(obj)]


# ---------------------------------------------------------------- walking pods
def cluster_specs(obj: dict) -> list[dict]:
    if obj["kind"] == "RayCluster":
        return [obj["spec"]]
    if obj["kind"] == "RayJob" and "rayClusterSpec" in obj["spec"]:
        return [obj["spec"]["rayClusterSpec"]]
    return []


def pod_specs(obj: dict) -> Iterator[tuple[str, dict]]:
    name = f"{obj['kind']}/{obj['metadata']['name']}"
    if obj["kind"] in ("Deployment", "StatefulSet"):
        yield name, obj["spec"]["template"]["spec"]
    for spec in cluster_specs(obj):
        yield f"{name} head", spec["headGroupSpec"]["template"]["spec"]
        for group in spec.get("workerGroupSpecs", []):
            yield f"{name} worker {group['groupName']}", group["template"]["spec"]
    if obj["kind"] == "RayJob" and "submitterPodTemplate" in obj["spec"]:
        yield f"{name} submitter", obj["spec"]["submitterPodTemplate"]["spec"]


def containers(obj: dict) -> Iterator[tuple[str, dict, dict]]:
    """(where, container, pod spec) for every container, init container and autoscaler sidecar."""
    for where, pod in pod_specs(obj):
        for container in pod.get("initContainers", []) + pod.get("containers", []):
            yield f"{where} container {container['name']}", container, pod
    for spec in cluster_specs(obj):
        if spec.get("enableInTreeAutoscaling"):
            head = spec["headGroupSpec"]["template"]["spec"]
            yield f"{obj['kind']}/{obj['metadata']['name']} autoscaler", spec.get("autoscalerOptions", {}), head


# ---------------------------------------------------------------- security
def security_findings(obj: dict) -> list[str]:
    found = []
    for where, pod in pod_specs(obj):
        found += [f"{where}: {flag}" for flag in ("hostNetwork", "hostPID", "hostIPC") if pod.get(flag)]
        found += [f"{where}: hostPath volume {v['name']}" for v in pod.get("volumes", []) if "hostPath" in v]
    for where, ctr, pod in containers(obj):
        psc, csc = pod.get("securityContext", {}), ctr.get("securityContext", {})
        if not csc.get("runAsNonRoot", psc.get("runAsNonRoot")):
            found.append(f"{where}: runAsNonRoot is not true")
        if csc.get("runAsUser", psc.get("runAsUser")) == 0:
            found.append(f"{where}: runs as uid 0")
        if csc.get("privileged"):
            found.append(f"{where}: privileged")
        if csc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{where}: allowPrivilegeEscalation is not false")
        if "ALL" not in csc.get("capabilities", {}).get("drop", []) or csc.get("capabilities", {}).get("add"):
            found.append(f"{where}: capabilities do not drop ALL (or add some)")
        for kind in ("requests", "limits"):
            missing = {"cpu", "memory"} - set(ctr.get("resources", {}).get(kind, {}))
            if missing:
                found.append(f"{where}: no resources.{kind} for {sorted(missing)}")
        for env in ctr.get("env", []):
            if SECRET_NAME.search(env["name"]) and "value" in env:
                found.append(f"{where}: env {env['name']} has a plaintext value")
    found += [f"{obj['kind']}/{obj['metadata']['name']}: {hit}" for hit in uri_credentials(yaml.safe_dump(obj))]
    return found


def uri_credentials(text: str) -> list[str]:
    """URIs that carry a literal password (user:PASSWORD@host); $(VAR)/${VAR} references are fine."""
    return [f"credential in URI {m[0]!r}" for m in _URI_CREDENTIAL.finditer(text) if not _VAR_REF.match(m[1])]


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", text)
    lines = [line.strip() for line in joined.splitlines()]
    return [(line.split(None, 1)[0].upper(), (line.split(None, 1) + [""])[1])
            for line in lines if line and not line.startswith("#")]


def dockerfile_findings(text: str) -> list[str]:
    found = []
    users = [arg.split(":")[0] for op, arg in dockerfile_instructions(text) if op == "USER"]
    if not users or users[-1] in ("root", "0"):
        found.append(f"final USER is {users[-1] if users else 'unset (root)'}")
    for op, arg in dockerfile_instructions(text):
        if op in ("ENV", "ARG"):
            for name in re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)(?==|\s|$)", arg):
                if SECRET_NAME.search(name):
                    found.append(f"{op} {name} looks like a secret")
    return found


# ---------------------------------------------------------------- references
def env_refs(obj: dict) -> list[tuple[str, str, str | None]]:
    """('secret'|'configmap', name, key or None for a whole-object envFrom) used by obj."""
    refs = []
    for _, ctr, _ in containers(obj):
        for env in ctr.get("env", []):
            source = env.get("valueFrom", {})
            for kind, field in (("secret", "secretKeyRef"), ("configmap", "configMapKeyRef")):
                if field in source:
                    refs.append((kind, source[field]["name"], source[field]["key"]))
        for env_from in ctr.get("envFrom", []):
            for kind, field in (("secret", "secretRef"), ("configmap", "configMapRef")):
                if field in env_from:
                    refs.append((kind, env_from[field]["name"], None))
    for spec in cluster_specs(obj):
        if spec.get("authOptions", {}).get("secretName"):
            refs.append(("secret", spec["authOptions"]["secretName"], "auth_token"))
    return refs


def missing_refs(refs: list[tuple[str, str, str | None]], available: dict[tuple[str, str], set[str]]) -> list[str]:
    return [f"{kind} {name}" + (f" key {key}" if key else "") for kind, name, key in refs
            if (kind, name) not in available or (key is not None and key not in available[(kind, name)])]


def host_allowed(allowed_hosts: list[str], host: str) -> bool:
    """mlflow.server.security_utils.is_allowed_host_header (MLflow 3.17): whole Host header, fnmatch."""
    return "*" in allowed_hosts or any(
        fnmatch.fnmatchcase(host, pattern) if "*" in pattern else host == pattern for pattern in allowed_hosts)


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or one of its parents wins."""
    def regex(pattern: str) -> re.Pattern:
        out = re.escape(pattern.strip("/")).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        return re.compile("^" + out.replace(r"\*", "[^/]*").replace(r"\?", "[^/]") + "$")
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        if any(regex(pattern.lstrip("!")).match(c) for c in candidates):
            excluded = not negate
    return excluded


def env_reference_findings(obj: dict) -> list[str]:
    """Kubernetes expands $(VAR) only for variables defined earlier in the same container's env."""
    found = []
    for where, ctr, _ in containers(obj):
        defined: set[str] = set()
        for env in ctr.get("env", []):
            found += [f"{where}: env {env['name']} uses $({ref}) before it is defined"
                      for ref in re.findall(r"\$\(([A-Za-z_]\w*)\)", env.get("value", "")) if ref not in defined]
            defined.add(env["name"])
        for arg in ctr.get("command", []) + ctr.get("args", []):
            found += [f"{where}: argument uses undefined $({ref})"
                      for ref in re.findall(r"\$\(([A-Za-z_]\w*)\)", arg) if ref not in defined]
    return found


def service_findings(objs: list[dict]) -> list[str]:
    """Each Service selects exactly one workload, and its targetPorts are ports of that workload."""
    found, workloads = [], [o for o in objs if o["kind"] in ("Deployment", "StatefulSet")]
    for svc in (o for o in objs if o["kind"] == "Service"):
        hits = [w for w in workloads
                if svc["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        if len(hits) != 1:
            found.append(f"Service {svc['metadata']['name']} selects {len(hits)} workloads")
            continue
        ports = [p for c in hits[0]["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])]
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if not any(target in (p.get("name"), p["containerPort"]) for p in ports):
                found.append(f"Service {svc['metadata']['name']} targetPort {target} is no container port")
    for w in workloads:
        if not w["spec"]["selector"]["matchLabels"].items() <= w["spec"]["template"]["metadata"]["labels"].items():
            found.append(f"{w['kind']}/{w['metadata']['name']}: selector does not match its pod labels")
    return found


def volume_findings(objs: list[dict]) -> list[str]:
    """PVCs named by pod volumes exist; every volumeMount names a volume or a volumeClaimTemplate."""
    found, pvcs = [], {o["metadata"]["name"] for o in objs if o["kind"] == "PersistentVolumeClaim"}
    for obj in objs:
        templates = {t["metadata"]["name"] for t in obj.get("spec", {}).get("volumeClaimTemplates", [])}
        for where, pod in pod_specs(obj):
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            claims = [v["persistentVolumeClaim"]["claimName"] for v in volumes.values() if "persistentVolumeClaim" in v]
            found += [f"{where}: PVC {claim} does not exist" for claim in claims if claim not in pvcs]
            mounts = [m["name"] for c in pod.get("initContainers", []) + pod["containers"] for m in c.get("volumeMounts", [])]
            found += [f"{where}: volumeMount {m} has no volume" for m in mounts if m not in volumes and m not in templates]
    return found


# ---------------------------------------------------------------- KubeRay rules
def ray_findings(obj: dict) -> list[str]:
    """The operator's validation rules (KubeRay v1.7.0 utils/validation.go) and this project's policy."""
    found = []
    for spec in cluster_specs(obj):
        head = spec["headGroupSpec"]
        head_pod = head["template"]["spec"]
        if head.get("rayStartParams", {}).get("num-cpus") != "0":
            found.append("head rayStartParams num-cpus is not '0': trials could land on the head")
        version = spec.get("autoscalerOptions", {}).get("version")
        if not spec.get("enableInTreeAutoscaling") or version != "v2":
            found.append("autoscaler v2 is not enabled (enableInTreeAutoscaling + autoscalerOptions.version v2)")
        if version and any(e["name"] == "RAY_enable_autoscaler_v2" for c in head_pod["containers"] for e in c.get("env", [])):
            found.append("RAY_enable_autoscaler_v2 env and autoscalerOptions.version both set: the operator rejects it")
        if head_pod.get("restartPolicy", "Never") != "Never":
            found.append("autoscaler v2 needs the head restartPolicy Never or unset")
        if spec.get("authOptions", {}).get("mode") != "token":
            found.append("token authentication is off")
        elif tuple(int(x) for x in re.findall(r"\d+", spec.get("rayVersion", "0"))[:3]) < (2, 52, 0):
            found.append("token authentication needs rayVersion >= 2.52.0")
        for group in spec.get("workerGroupSpecs", []):
            pod, name = group["template"]["spec"], group["groupName"]
            if group.get("minReplicas", 0) != 0 or group.get("minReplicas", 0) > group.get("maxReplicas", 0):
                found.append(f"worker group {name} does not scale from zero (or minReplicas > maxReplicas)")
            if "nvidia.com/gpu" not in pod["containers"][0].get("resources", {}).get("limits", {}):
                found.append(f"worker group {name} has no nvidia.com/gpu limit")
            if not any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])):
                found.append(f"worker group {name} has no toleration for nvidia.com/gpu")
    if obj["kind"] == "RayJob":
        spec = obj["spec"]
        if spec.get("backoffLimit", 0) > 0 and spec.get("clusterSelector"):
            found.append("backoffLimit is incompatible with clusterSelector")
        if not spec.get("shutdownAfterJobFinishes"):
            found.append("the job's cluster is not shut down after the job")
        runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}") or {}
        if set(runtime_env) - {"env_vars"} or not all(isinstance(v, str) for v in runtime_env.get("env_vars", {}).values()):
            found.append("runtimeEnvYAML must hold string env_vars only (code and working dir come from the image)")
        if "$(" in spec["entrypoint"]:
            found.append("$(...) in the entrypoint is bash command substitution in the submitter, not a variable")
        if "${" in spec["entrypoint"]:
            found.append("${...} in the entrypoint reaches the driver unexpanded (Ray keeps the quotes): the driver "
                         "reads OPTUNA_STORAGE_URL from its environment instead")
        if "--resume" not in spec["entrypoint"].split():
            found.append("the entrypoint lacks --resume: a retry would start the search over")
    return found


# ---------------------------------------------------------------- database drivers and network policies
def postgres_driver(uri: str) -> str | None:
    """The SQLAlchemy driver a PostgreSQL URI names (None for a bare postgresql://, whose meaning depends on
    the SQLAlchemy version: psycopg2 before 2.1, psycopg 3 since)."""
    m = re.match(r"postgres(?:ql)?(?:\+(\w+))?://", uri)
    return m[1] if m else None


def labels_of(obj: dict, where: str) -> dict:
    """The pod labels of the pod template that pod_specs() calls ``where``."""
    if obj["kind"] in ("Deployment", "StatefulSet"):
        return obj["spec"]["template"]["metadata"]["labels"]
    for spec in cluster_specs(obj):
        if where.endswith(" head"):
            return spec["headGroupSpec"]["template"]["metadata"]["labels"]
        for group in spec.get("workerGroupSpecs", []):
            if where.endswith(f" worker {group['groupName']}"):
                return group["template"]["metadata"]["labels"]
    if where.endswith(" submitter"):
        return obj["spec"]["submitterPodTemplate"]["metadata"]["labels"]
    raise KeyError(where)


def _pods(objs: list[dict], selector: dict) -> set[str]:
    match = selector.get("matchLabels", {})
    return {where for o in objs for where, _ in pod_specs(o) if match.items() <= labels_of(o, where).items()}


def policy_target(objs: list[dict], policy: dict) -> str:
    hits = _pods(objs, policy["spec"]["podSelector"])
    return next(iter(hits)) if len(hits) == 1 else f"{len(hits)} pods"


def policy_sources(objs: list[dict], policy: dict) -> set[str]:
    return {where for rule in policy["spec"].get("ingress", []) for peer in rule.get("from", [])
            for where in _pods(objs, peer.get("podSelector", {}))}


def network_policy_findings(objs: list[dict]) -> list[str]:
    """Each policy selects exactly one workload's pods, restricts ingress, names ports that the pods
    expose, and every peer selector matches some pod (a typo would silently lock everyone out)."""
    found = []
    for pol in (o for o in objs if o["kind"] == "NetworkPolicy"):
        name, spec = pol["metadata"]["name"], pol["spec"]
        targets = _pods(objs, spec["podSelector"])
        if len(targets) != 1:
            found.append(f"NetworkPolicy {name} selects {len(targets)} pod templates")
            continue
        if "Ingress" not in spec.get("policyTypes", []) or not spec.get("ingress"):
            found.append(f"NetworkPolicy {name} does not restrict ingress")
        target = next(iter(targets))
        pod = next(p for o in objs for w, p in pod_specs(o) if w == target)
        ports = {p["containerPort"] for c in pod["containers"] for p in c.get("ports", [])}
        for rule in spec.get("ingress", []):
            if not rule.get("from"):
                found.append(f"NetworkPolicy {name}: an ingress rule without `from` admits every pod")
            for peer in rule.get("from", []):
                if "namespaceSelector" in peer or "ipBlock" in peer:
                    found.append(f"NetworkPolicy {name}: a peer outside the namespace's pods")
                elif not _pods(objs, peer.get("podSelector", {})):
                    found.append(f"NetworkPolicy {name}: peer {peer} matches no pod")
            for port in rule.get("ports", []):
                if port.get("port") not in ports:
                    found.append(f"NetworkPolicy {name}: port {port.get('port')} is no port of {target}")
    return found
