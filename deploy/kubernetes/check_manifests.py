#!/usr/bin/env python3
"""Validates rendered Kubernetes manifests of agentmeter (run by deploy/kubernetes/check.sh).

Each `--render NAME=FILE` is one kustomize output (a YAML stream). For every document:

1. Schema. Kinds of Kubernetes itself: kubernetes-validate's schema of the pinned Kubernetes
   version, strict (unknown fields are errors). A kind it has no schema for is an ERROR here,
   not the warning kubernetes-validate prints (a typo in an apiVersion would otherwise pass).
   The custom kinds ScaledObject (keda.sh/v1alpha1) and ServiceMonitor (monitoring.coreos.com/v1):
   the strict schemas of our own in deploy/kubernetes/schemas/ (kubernetes-validate has none).
2. What the schemas cannot know, across documents and against the rest of the repository:
   listeners bind 0.0.0.0 on a declared containerPort, probes hit /healthz and /readyz on the
   stage's operations listener, static ownership's replica count equals the StatefulSet's
   replicas, a ScaledObject targets a workload in group ownership and matches the settings file,
   the singletons stay single, Services, PDBs and HPAs select what exists, the ServiceMonitor
   yields the job names of deploy/prometheus/prometheus.yml, and no secret is in the manifests.

`--files FILE...` instead of `--render` validates plain manifest files (no kustomize renderer):
the same checks, with the settings file read from `--settings`; `--schema-only FILE...` checks
files against their schemas only (the components' resources, which need their patches).

Exit status 1 when anything fails; every problem is listed.
"""

import argparse
import json
import pathlib
import re
import sys
import tomllib

import jsonschema
import kubernetes_validate
import kubernetes_validate.utils as kv_utils
import yaml

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent
CUSTOM_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): HERE / "schemas" / "scaledobject.keda.sh-v1alpha1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): HERE / "schemas" / "servicemonitor.monitoring.coreos.com-v1.json",
}
CONFIG_PATH = "/etc/agentmeter/agentmeter.toml"
SETTINGS_KEY = "agentmeter.toml"
SECTIONS = {"kafka", "clickhouse", "ingest", "enricher", "aggregator", "billing", "outcomes"}
# subcommand → (settings section, operations listener key or None, input topic suffix or None)
STAGES = {
    "ingest": ("ingest", None, None),
    "enrich": ("enricher", "METRICS_LISTEN", "actions.raw"),
    "aggregate": ("aggregator", "METRICS_LISTEN", "actions.enriched"),
    "billing": ("billing", "METRICS_LISTEN", None),
    "outcomes": ("outcomes", "METRICS_LISTEN", None),
}
ONE_SHOTS = {"migrate", "topics", "config"}
SINGLETONS = {"billing", "outcomes"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "Job"}


class Problems:
    def __init__(self):
        self.items = []

    def add(self, where, message):
        item = f"{where}: {message}"
        if item not in self.items:
            self.items.append(item)


def name_of(doc):
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def load_stream(path):
    with open(path, encoding="utf-8") as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc]


def validate_schema(doc, version, problems, where):
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CUSTOM_SCHEMAS:
        schema = json.loads(CUSTOM_SCHEMAS[key].read_text(encoding="utf-8"))
        validator = jsonschema.Draft202012Validator(schema)
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        for error in errors:
            path = ".".join(str(p) for p in error.absolute_path) or "(document)"
            problems.add(where, f"{name_of(doc)} against {CUSTOM_SCHEMAS[key].name}: {path}: {error.message}")
        return "custom" if not errors else None
    try:
        kubernetes_validate.validate(doc, version, strict=True)
        return "kubernetes"
    except kv_utils.ValidationError as error:
        path = ".".join(str(p) for p in error.path) or "(document)"
        problems.add(where, f"{name_of(doc)} does not validate against Kubernetes {error.version} (strict): {path}: {error.message}")
    except kv_utils.SchemaNotFoundError as error:
        problems.add(where, f"{name_of(doc)}: no schema for kind {error.kind} of {error.api_version} in Kubernetes "
                            f"{error.version}, and none of our own (deploy/kubernetes/schemas/): a wrong apiVersion or kind?")
    return None


def selector_matches(selector, labels):
    """A LabelSelector (matchLabels / matchExpressions) against a label map."""
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values") or []
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def as_int(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        return value


def literal_env(container):
    return {e["name"]: e.get("value") for e in container.get("env") or [] if "value" in e}


def subcommand(container):
    args = container.get("args") or []
    if len(args) >= 3 and args[0] == "--config":
        return args[2]
    return None


def check_set(label, docs, settings_text, version, problems):
    counts = {"kubernetes": 0, "custom": 0}
    for doc in docs:
        kind = validate_schema(doc, version, problems, label)
        if kind:
            counts[kind] += 1

    by_kind = {}
    seen = set()
    for doc in docs:
        key = (doc.get("kind"), doc.get("metadata", {}).get("name"))
        if key in seen:
            problems.add(label, f"{name_of(doc)} appears twice")
        seen.add(key)
        by_kind.setdefault(doc.get("kind"), []).append(doc)

    # ---- the settings file: from the rendered ConfigMap (what the pods read), else --settings
    configmaps = [d for d in by_kind.get("ConfigMap", []) if SETTINGS_KEY in (d.get("data") or {})]
    if configmaps:
        if len(configmaps) != 1:
            problems.add(label, f"{len(configmaps)} ConfigMaps hold {SETTINGS_KEY}; expected one")
        settings_text = configmaps[0]["data"][SETTINGS_KEY]
        settings_configmap = configmaps[0]["metadata"]["name"]
    else:
        settings_configmap = None
    if settings_text is None:
        problems.add(label, f"no ConfigMap with {SETTINGS_KEY} and no --settings file")
        return counts
    try:
        settings = tomllib.loads(settings_text)
    except tomllib.TOMLDecodeError as error:
        problems.add(label, f"the settings file is not TOML: {error}")
        return counts
    unknown = set(settings) - SECTIONS
    if unknown:
        problems.add(label, f"settings sections not known to agentmeter: {sorted(unknown)}")
    kafka = settings.get("kafka", {})
    partitions = kafka.get("partitions", 4)
    prefix = kafka.get("topic_prefix", "agentmeter.")
    for section in ("enricher", "aggregator"):
        if settings.get(section, {}).get("ownership", {}).get("group_watchdog", True) is not False:
            problems.add(label, f"settings: [{section}.ownership] group_watchdog must be false (a real Kafka cluster; "
                                "the watchdog is for the local broker)")
    if re.search(r"127\.0\.0\.1|localhost", settings_text):
        problems.add(label, "settings: a loopback address (127.0.0.1/localhost) — in a pod that reaches nothing and serves no one")

    # ---- workloads and their containers
    workloads = [d for d in docs if d.get("kind") in WORKLOAD_KINDS]
    scaled_objects = by_kind.get("ScaledObject", [])
    hpas = by_kind.get("HorizontalPodAutoscaler", [])
    autoscaled = {}
    for hpa in hpas:
        ref = hpa["spec"]["scaleTargetRef"]
        autoscaled[(ref["kind"], ref["name"])] = name_of(hpa)
    for so in scaled_objects:
        ref = so["spec"]["scaleTargetRef"]
        autoscaled[(ref.get("kind", "Deployment"), ref["name"])] = name_of(so)
    images = set()
    stage_workloads = {}
    for workload in workloads:
        where = f"{label} {name_of(workload)}"
        spec = workload["spec"]
        pod = spec["template"]["spec"]
        settings_volumes = {v["name"] for v in pod.get("volumes") or []
                            if v.get("configMap", {}).get("name") == (settings_configmap or "agentmeter-settings")}
        if pod.get("enableServiceLinks") is not False:
            problems.add(where, "enableServiceLinks must be false (Kubernetes would add *_SERVICE_* variables to the environment)")
        for container in (pod.get("initContainers") or []) + pod["containers"]:
            cwhere = f"{where} container {container['name']}"
            images.add(container.get("image"))
            command = subcommand(container)
            if command is None or container["args"][1] != CONFIG_PATH:
                problems.add(cwhere, f"args must start with --config {CONFIG_PATH} and a subcommand")
                continue
            if command not in STAGES and command not in ONE_SHOTS:
                problems.add(cwhere, f"unknown subcommand {command!r}")
            mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts") or []}
            if not any(mounts.get(v) == "/etc/agentmeter" for v in settings_volumes):
                problems.add(cwhere, "does not mount the settings ConfigMap at /etc/agentmeter")
            resources = container.get("resources") or {}
            for path in (("requests", "cpu"), ("requests", "memory"), ("limits", "memory")):
                if path[1] not in (resources.get(path[0]) or {}):
                    problems.add(cwhere, f"no resources.{path[0]}.{path[1]}")
            env = literal_env(container)
            for entry in container.get("env") or []:
                name = entry["name"]
                parts = name.split("__")
                if not name.startswith("AGENTMETER__") or len(parts) < 3 or parts[1].lower() not in SECTIONS:
                    problems.add(cwhere, f"env {name}: not AGENTMETER__<SECTION>__<KEY> of a known section")
                if re.search(r"PASSWORD|SECRET|TOKEN", name) and "value" in entry:
                    problems.add(cwhere, f"env {name} has a literal value: secrets come from a Secret (valueFrom)")
            ports = {p["name"]: as_int(p["containerPort"]) for p in container.get("ports") or []}
            listens = {}
            for name, value in env.items():
                if name.endswith("_LISTEN"):
                    match = re.fullmatch(r"0\.0\.0\.0:(\d+)", value or "")
                    if not match:
                        problems.add(cwhere, f"env {name}={value}: a listener in a pod binds 0.0.0.0:PORT")
                        continue
                    port = int(match.group(1))
                    listens[name] = port
                    if port not in ports.values():
                        problems.add(cwhere, f"env {name} listens on {port}, which is no containerPort")
            for port_name, port in ports.items():
                if port not in listens.values():
                    problems.add(cwhere, f"containerPort {port_name} ({port}) has no AGENTMETER__…_LISTEN on it")
            if command in STAGES:
                if container in (pod.get("initContainers") or []):
                    problems.add(cwhere, "a stage as an init container")
                section, operations_key, _ = STAGES[command]
                stage_workloads.setdefault(command, []).append(workload)
                if command == "ingest":
                    operations_key = ("OPERATIONS_LISTEN" if f"AGENTMETER__INGEST__OPERATIONS_LISTEN" in env
                                      else "HTTP_LISTEN")
                operations_env = f"AGENTMETER__{section.upper()}__{operations_key}"
                operations_port = listens.get(operations_env)
                if operations_port is None:
                    problems.add(cwhere, f"no {operations_env}=0.0.0.0:PORT (/metrics, /healthz, /readyz)")
                for probe_kind, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
                    probe = container.get(probe_kind)
                    get = (probe or {}).get("httpGet")
                    if not get:
                        problems.add(cwhere, f"no {probe_kind} (httpGet {path})")
                        continue
                    if get.get("path") != path:
                        problems.add(cwhere, f"{probe_kind} path {get.get('path')}, expected {path}")
                    port = get.get("port")
                    port = ports.get(port, port) if isinstance(port, str) else port
                    if operations_port is not None and port != operations_port:
                        problems.add(cwhere, f"{probe_kind} on port {port}, but {operations_env} is {operations_port}")
                if workload["kind"] == "Job":
                    problems.add(cwhere, "a long-running stage in a Job")
        # ---- replicas, ownership, singletons
        stage_commands = {subcommand(c) for c in pod["containers"]} & set(STAGES)
        target = (workload["kind"], workload["metadata"]["name"])
        if target in autoscaled and "replicas" in spec:
            problems.add(where, f"sets spec.replicas although {autoscaled[target]} scales it (every apply would reset it)")
        for command in stage_commands & {"enrich", "aggregate"}:
            section = STAGES[command][0]
            if workload["kind"] != "StatefulSet":
                problems.add(where, f"the {section} runs as a {workload['kind']}: a StatefulSet gives each pod its ordinal")
                continue
            container = next(c for c in pod["containers"] if subcommand(c) == command)
            env = literal_env(container)
            mode = env.get(f"AGENTMETER__{section.upper()}__OWNERSHIP__MODE",
                           settings.get(section, {}).get("ownership", {}).get("mode", "static"))
            replicas_env = env.get(f"AGENTMETER__{section.upper()}__OWNERSHIP__REPLICAS")
            if mode == "static":
                replicas = spec.get("replicas", 1)
                ownership = int(replicas_env) if replicas_env is not None else \
                    settings.get(section, {}).get("ownership", {}).get("replicas", 1)
                if ownership != replicas:
                    problems.add(where, f"static ownership: AGENTMETER__{section.upper()}__OWNERSHIP__REPLICAS is {ownership} "
                                        f"but spec.replicas is {replicas}: change both together (ADR 0003)")
                if replicas > partitions:
                    problems.add(where, f"{replicas} replicas but kafka.partitions is {partitions}: the extra replicas own nothing")
                if target in autoscaled:
                    problems.add(where, f"static ownership cannot follow {autoscaled[target]}: it changes replicas but not "
                                        f"ownership.replicas; use ownership mode \"group\" (components/*-lag-autoscaling)")
            elif mode == "group":
                if replicas_env is not None:
                    problems.add(where, f"AGENTMETER__{section.upper()}__OWNERSHIP__REPLICAS is set in group mode, where it means nothing")
            else:
                problems.add(where, f"unknown ownership mode {mode!r}")
        for command in stage_commands & SINGLETONS:
            if spec.get("replicas", 1) != 1 or target in autoscaled:
                problems.add(where, f"{command} is a singleton: replicas must stay 1 and nothing may scale it")
            if workload["kind"] == "Deployment" and spec.get("strategy", {}).get("type") != "Recreate":
                problems.add(where, f"{command} as a Deployment needs strategy Recreate (never two during a rollout)")
    if len(images) > 1:
        problems.add(label, f"containers use different images: {sorted(map(str, images))}")
    for command in STAGES:
        if command not in stage_workloads:
            problems.add(label, f"no workload runs `agentmeter {command}`")
    for one_shot in ONE_SHOTS:
        if not any(w["kind"] == "Job" and subcommand(c) == one_shot
                   for w in workloads for c in w["spec"]["template"]["spec"]["containers"]):
            problems.add(label, f"no Job runs `agentmeter {one_shot}`")

    # ---- ScaledObjects: a workload in group mode, the settings' brokers, group, topic, partitions
    for so in scaled_objects:
        where = f"{label} {name_of(so)}"
        ref = so["spec"]["scaleTargetRef"]
        target = next((w for w in workloads if w["kind"] == ref.get("kind", "Deployment")
                       and w["metadata"]["name"] == ref["name"]), None)
        if target is None:
            problems.add(where, f"scaleTargetRef {ref.get('kind')}/{ref['name']} is not in the manifests")
            continue
        commands = {subcommand(c) for c in target["spec"]["template"]["spec"]["containers"]} & {"enrich", "aggregate"}
        if not commands:
            problems.add(where, "targets no enricher or aggregator")
            continue
        section, _, input_suffix = STAGES[commands.pop()]
        if so["spec"].get("maxReplicaCount", 100) > partitions:
            problems.add(where, f"maxReplicaCount {so['spec'].get('maxReplicaCount', 100)} above kafka.partitions ({partitions})")
        for trigger in so["spec"]["triggers"]:
            if trigger["type"] != "kafka":
                continue
            meta = trigger["metadata"]
            expected = {
                "bootstrapServers": kafka.get("brokers", "127.0.0.1:9092"),
                "consumerGroup": settings.get(section, {}).get("group_id", f"agentmeter-{section}"),
                "topic": prefix + input_suffix,
            }
            for key, value in expected.items():
                if meta.get(key) != value:
                    problems.add(where, f"kafka trigger {key} is {meta.get(key)!r}, the settings say {value!r}")

    # ---- Services, StatefulSets' governing Services, PDBs, HPAs
    pod_labels = [(w, w["spec"]["template"]["metadata"].get("labels") or {}) for w in workloads if w["kind"] != "Job"]
    services = by_kind.get("Service", [])
    for service in services:
        where = f"{label} {name_of(service)}"
        selected = [w for w, labels in pod_labels if selector_matches({"matchLabels": service["spec"].get("selector")}, labels)]
        if not selected:
            problems.add(where, "its selector matches no workload")
        for port in service["spec"].get("ports") or []:
            target_port = port.get("targetPort", port["port"])
            for workload in selected:
                container_ports = [p for c in workload["spec"]["template"]["spec"]["containers"] for p in c.get("ports") or []]
                if not any(p.get("name") == target_port or p["containerPort"] == target_port for p in container_ports):
                    problems.add(where, f"targetPort {target_port} is no port of {name_of(workload)}")
    for workload in workloads:
        if workload["kind"] == "StatefulSet":
            governing = next((s for s in services if s["metadata"]["name"] == workload["spec"]["serviceName"]), None)
            if governing is None or governing["spec"].get("clusterIP") != "None":
                problems.add(f"{label} {name_of(workload)}", f"serviceName {workload['spec']['serviceName']} is no headless Service")
    for pdb in by_kind.get("PodDisruptionBudget", []):
        if not any(selector_matches(pdb["spec"].get("selector"), labels) for _, labels in pod_labels):
            problems.add(f"{label} {name_of(pdb)}", "its selector matches no workload")
    for hpa in hpas:
        ref = hpa["spec"]["scaleTargetRef"]
        if not any(w["kind"] == ref["kind"] and w["metadata"]["name"] == ref["name"] for w in workloads):
            problems.add(f"{label} {name_of(hpa)}", f"scaleTargetRef {ref['kind']}/{ref['name']} is not in the manifests")

    # ---- scraping: job names as deploy/prometheus/prometheus.yml (and so rules.yml) has them
    prometheus = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text(encoding="utf-8"))
    jobs = {job["job_name"] for job in prometheus["scrape_configs"]}
    job_services = {s["metadata"]["labels"]["agentmeter/job"]: s for s in services
                    if "agentmeter/job" in (s["metadata"].get("labels") or {})}
    if set(job_services) != jobs:
        problems.add(label, f"Services labelled agentmeter/job carry {sorted(job_services)}; "
                            f"deploy/prometheus/prometheus.yml's jobs are {sorted(jobs)}")
    for monitor in by_kind.get("ServiceMonitor", []):
        where = f"{label} {name_of(monitor)}"
        spec = monitor["spec"]
        selected = [s for s in services if selector_matches(spec["selector"], s["metadata"].get("labels") or {})]
        job_label = spec.get("jobLabel")
        names = {(s["metadata"].get("labels") or {}).get(job_label, s["metadata"]["name"]) for s in selected}
        if names != jobs:
            problems.add(where, f"yields the jobs {sorted(names)}; rules.yml alerts on {sorted(jobs)}")
        for endpoint in spec["endpoints"]:
            for service in selected:
                if not any(p.get("name") == endpoint.get("port") for p in service["spec"].get("ports") or []):
                    problems.add(where, f"endpoint port {endpoint.get('port')} is no port of {name_of(service)}")

    # ---- secrets stay out
    for doc in by_kind.get("Secret", []):
        problems.add(label, f"{name_of(doc)}: no Secret belongs in these manifests (create it in the cluster)")
    text = yaml.safe_dump_all(docs)
    if re.search(r"am_demo_|_SECRET=|secret_sha256", text):
        problems.add(label, "an agent secret or the metering configuration is in the manifests")
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kubernetes-version", required=True)
    parser.add_argument("--render", action="append", default=[], metavar="NAME=FILE")
    parser.add_argument("--files", nargs="*", default=[])
    parser.add_argument("--settings")
    parser.add_argument("--schema-only", nargs="*", default=[])
    args = parser.parse_args()
    problems = Problems()
    for path in args.schema_only:
        docs = load_stream(path)
        valid = sum(1 for doc in docs if validate_schema(doc, args.kubernetes_version, problems, path))
        print(f"  {path}: {valid} of {len(docs)} documents valid against their schemas (schema only)")
    sets = []
    for item in args.render:
        name, _, path = item.partition("=")
        sets.append((name, load_stream(path), None))
    if args.files:
        docs = [doc for path in args.files for doc in load_stream(path)]
        settings = pathlib.Path(args.settings).read_text(encoding="utf-8") if args.settings else None
        sets.append(("files", docs, settings))
    if not sets and not args.schema_only:
        sys.exit("nothing to check: give --render NAME=FILE or --files")
    for name, docs, settings in sets:
        counts = check_set(name, docs, settings, args.kubernetes_version, problems)
        kinds = sorted({d.get("kind") for d in docs})
        print(f"  {name}: {len(docs)} documents ({', '.join(kinds)}); {counts['kubernetes']} valid against "
              f"Kubernetes {args.kubernetes_version} (strict), {counts['custom']} against our custom-resource schemas")
    if problems.items:
        print("\n".join(f"  FAILED {item}" for item in problems.items), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
