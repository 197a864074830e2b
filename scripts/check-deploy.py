#!/usr/bin/env python3
"""Static checks of deploy/: what `kubeconform` would catch for our manifests, without a cluster.

No kubeconform or modern kubectl is installable from the package registries this project may
use, so this script checks what breaks deployments of *these* manifests:

- every kustomization's resources exist (followed recursively through overlays) and parse;
- every object has apiVersion, kind and metadata.name, and the fields its kind requires;
- selectors match the labels they select (StatefulSet template, Service, PDB, ServiceMonitor),
  after the kustomization's label transformers;
- probes name a declared container port; envFrom names a ConfigMap/Secret of the same base;
- JSON patches in overlays target an existing object and an existing path;
- the Grafana dashboard parses and every panel has a query.

`--self-test` breaks copies of the manifests in several ways and fails unless each is caught.
Exit status 0 when everything holds; 1 with one line per problem otherwise.
"""

import copy
import json
import os
import sys

import yaml

REQUIRED = {
    ("apps/v1", "StatefulSet"): ["spec.selector.matchLabels", "spec.template.metadata.labels",
                                 "spec.template.spec.containers", "spec.serviceName"],
    ("v1", "Service"): ["spec.selector", "spec.ports"],
    ("v1", "ConfigMap"): ["data"],
    ("v1", "Secret"): [],
    ("policy/v1", "PodDisruptionBudget"): ["spec.selector.matchLabels"],
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ["spec.selector.matchLabels", "spec.endpoints"],
}


def get(obj, dotted):
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def load_kustomization(directory, problems):
    """The objects a kustomization produces (resources, label and suffix transformers, patches)."""
    path = os.path.join(directory, "kustomization.yaml")
    try:
        with open(path) as f:
            k = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        problems.append(f"{path}: {e}")
        return []
    objects = []
    for res in k.get("resources", []):
        target = os.path.normpath(os.path.join(directory, res))
        if os.path.isdir(target):
            objects.extend(load_kustomization(target, problems))
        elif os.path.isfile(target):
            try:
                with open(target) as f:
                    docs = [d for d in yaml.safe_load_all(f) if d is not None]
            except yaml.YAMLError as e:
                problems.append(f"{target}: {e}")
                continue
            for d in docs:
                objects.append((target, d))
        else:
            problems.append(f"{path}: resource {res} does not exist")
    for label in k.get("labels", []):
        pairs = label.get("pairs", {})
        for _, obj in objects:
            obj.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)
            if label.get("includeSelectors"):
                for sel in ("spec.selector.matchLabels", "spec.template.metadata.labels"):
                    m = get(obj, sel)
                    if isinstance(m, dict):
                        m.update(pairs)
                if obj.get("kind") == "Service" and isinstance(get(obj, "spec.selector"), dict):
                    obj["spec"]["selector"].update(pairs)
    for patch in k.get("patches", []):
        t = patch.get("target", {})
        matches = [o for _, o in objects
                   if o.get("kind") == t.get("kind") and get(o, "metadata.name") == t.get("name")]
        if not matches:
            problems.append(f"{path}: patch target {t} matches nothing")
            continue
        for op in yaml.safe_load(patch.get("patch", "[]")) or []:
            parts = [p for p in op.get("path", "").split("/") if p]
            for o in matches:
                parent = get(o, ".".join(parts[:-1])) if len(parts) > 1 else o
                if not isinstance(parent, dict) or (op.get("op") == "replace" and parts[-1] not in parent):
                    problems.append(f"{path}: patch path {op.get('path')} does not exist in {t}")
                else:
                    parent[parts[-1]] = op.get("value")
    suffix = k.get("nameSuffix", "")
    if suffix:
        names = {get(o, "metadata.name") for _, o in objects}
        for _, o in objects:
            o["metadata"]["name"] += suffix
            if get(o, "spec.serviceName") in names:
                o["spec"]["serviceName"] += suffix
            for c in get(o, "spec.template.spec.containers") or []:
                for ref in c.get("envFrom", []):
                    for kind in ("configMapRef", "secretRef"):
                        if kind in ref and ref[kind].get("name") in names:
                            ref[kind]["name"] += suffix
    return objects


def subset(selector, labels):
    return isinstance(selector, dict) and selector and all(
        (labels or {}).get(k) == v for k, v in selector.items())


def check_objects(objects, where, problems):
    by_kind = {}
    for path, o in objects:
        for field in ("apiVersion", "kind", "metadata.name"):
            if not get(o, field):
                problems.append(f"{path}: missing {field}")
        key = (o.get("apiVersion"), o.get("kind"))
        if key not in REQUIRED:
            problems.append(f"{path}: unknown apiVersion/kind {key}")
            continue
        for field in REQUIRED[key]:
            if get(o, field) in (None, [], {}):
                problems.append(f"{path}: {o['kind']} {get(o, 'metadata.name')} lacks {field}")
        by_kind.setdefault(o.get("kind"), []).append((path, o))
    names = {(o.get("kind"), get(o, "metadata.name")) for _, o in objects}
    pod_labels = []
    for path, s in by_kind.get("StatefulSet", []):
        labels = get(s, "spec.template.metadata.labels")
        pod_labels.append(labels)
        if not subset(get(s, "spec.selector.matchLabels"), labels):
            problems.append(f"{path}: StatefulSet selector does not match its pod template labels")
        if get(s, "spec.replicas") != 1:
            problems.append(f"{path}: StatefulSet must have exactly one replica (one writer per slot)")
        if ("Service", get(s, "spec.serviceName")) not in names:
            problems.append(f"{path}: serviceName {get(s, 'spec.serviceName')} is no Service here")
        for c in get(s, "spec.template.spec.containers") or []:
            if not c.get("image"):
                problems.append(f"{path}: container {c.get('name')} has no image")
            ports = {p.get("name") for p in c.get("ports", [])} | {p.get("containerPort") for p in c.get("ports", [])}
            for probe in ("livenessProbe", "readinessProbe"):
                port = get(c, f"{probe}.httpGet.port")
                if probe in c and port not in ports:
                    problems.append(f"{path}: {probe} port {port} is not a container port")
            for ref in c.get("envFrom", []):
                for kind, k in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                    if k in ref and (kind, ref[k].get("name")) not in names:
                        problems.append(f"{path}: envFrom {kind} {ref[k].get('name')} is not defined")
    services = by_kind.get("Service", [])
    for path, svc in services:
        if not any(subset(get(svc, "spec.selector"), l) for l in pod_labels):
            problems.append(f"{path}: Service selector matches no pod template")
    for path, pdb in by_kind.get("PodDisruptionBudget", []):
        if not any(subset(get(pdb, "spec.selector.matchLabels"), l) for l in pod_labels):
            problems.append(f"{path}: PodDisruptionBudget selector matches no pod template")
    for path, sm in by_kind.get("ServiceMonitor", []):
        if not any(subset(get(sm, "spec.selector.matchLabels"), get(s, "metadata.labels")) for _, s in services):
            problems.append(f"{path}: ServiceMonitor selector matches no Service")
        svc_ports = {p.get("name") for _, s in services for p in get(s, "spec.ports") or []}
        for ep in get(sm, "spec.endpoints") or []:
            if ep.get("port") not in svc_ports:
                problems.append(f"{path}: ServiceMonitor port {ep.get('port')} is not a Service port")
    if not objects:
        problems.append(f"{where}: produces no objects")


def check_dashboard(path, problems):
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        problems.append(f"{path}: {e}")
        return
    for p in d.get("panels", []):
        if not p.get("targets") or not all(t.get("expr") for t in p["targets"]):
            problems.append(f"{path}: panel {p.get('title')!r} has no query")


def check(deploy_dir):
    problems = []
    for k in ("base", "overlays/two-databases"):
        where = os.path.join(deploy_dir, k)
        check_objects(load_kustomization(where, problems), where, problems)
    check_dashboard(os.path.join(deploy_dir, "monitoring/dashboard.json"), problems)
    return problems


def self_test(deploy_dir):
    """Each breakage must be reported."""
    import shutil
    import tempfile

    def broken(edit_file, mutate):
        with tempfile.TemporaryDirectory() as tmp:
            dst = os.path.join(tmp, "deploy")
            shutil.copytree(deploy_dir, dst)
            path = os.path.join(dst, edit_file)
            with open(path) as f:
                text = f.read()
            with open(path, "w") as f:
                f.write(mutate(text))
            return check(dst)

    cases = {
        "selector mismatch": ("base/service.yaml", lambda t: t.replace("component: cdc", "component: other")),
        "two replicas": ("base/statefulset.yaml", lambda t: t.replace("replicas: 1", "replicas: 2")),
        "missing resource": ("base/kustomization.yaml", lambda t: t.replace("pdb.yaml", "nope.yaml")),
        "bad probe port": ("base/statefulset.yaml", lambda t: t.replace("port: metrics\n", "port: http\n", 1)),
        "bad patch path": ("overlays/two-databases/orders/kustomization.yaml",
                           lambda t: t.replace("/data/SLOTLAKE_SINK", "/data/NO_SUCH_KEY")),
        "invalid yaml": ("base/pdb.yaml", lambda t: t + "\n  : : ["),
        "dashboard without query": ("monitoring/dashboard.json", lambda t: t.replace('"expr"', '"exp"', 1)),
    }
    failures = []
    for name, (f, mutate) in cases.items():
        if not broken(f, mutate):
            failures.append(f"self-test: {name} was not detected")
    return failures


def main():
    deploy_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "deploy")
    problems = check(deploy_dir)
    if "--self-test" in sys.argv[1:]:
        problems += self_test(deploy_dir)
    for p in problems:
        print(p)
    if problems:
        return 1
    print("deploy/: manifests, overlays and dashboard check out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
