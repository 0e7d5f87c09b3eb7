#!/usr/bin/env bash
# Checks the Kubernetes manifests of deploy/kubernetes/ without a cluster; part of
# deploy/local/test.sh. Takes a few seconds.
#
#   deploy/kubernetes/check.sh
#
#   1. render with kustomize (`kubectl kustomize`, kustomize v5 built into kubectl): the base,
#      every overlay under overlays/, and the base with each component of components/ (so a
#      component no overlay uses is checked too)
#   2. every rendered document against a schema, strictly (unknown fields are errors):
#      Kubernetes' own kinds with kubernetes-validate (pinned, deploy/kubernetes/requirements.txt)
#      for Kubernetes $KUBERNETES_VERSION; the custom kinds ScaledObject (KEDA) and ServiceMonitor
#      (Prometheus operator), for which kubernetes-validate has no schema and would only warn,
#      with our own schemas in deploy/kubernetes/schemas/; any other kind without a schema fails
#   3. what no schema knows (check_manifests.py): listeners on 0.0.0.0 and a declared port, probes
#      on /healthz and /readyz of the operations listener, ownership.replicas = a static
#      StatefulSet's replicas, ScaledObjects only on group ownership and matching the settings,
#      singletons, selectors, the ServiceMonitor's job names = deploy/prometheus/prometheus.yml's,
#      group_watchdog = false, no secret in the manifests
#
# Without kubectl (no renderer) it says so loudly and checks the files of base/ and the
# components' resources as they are (patches and overlays are then NOT checked).
# What it cannot check: anything a cluster decides (admission, the CRDs' own validation, quotas,
# whether the image runs): `kubectl apply --dry-run=server -k …` against a real cluster does.
#
# Environment (defaults in brackets):
#   AGENTMETER_CACHE     [$HOME/.cache/agentmeter]   holds venv-kubernetes-validate
#   KUBECTL              [kubectl]                   the kustomize renderer
#   KUBERNETES_VERSION   [1.30.0]                    the Kubernetes version validated against
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
AGENTMETER_CACHE="${AGENTMETER_CACHE:-$HOME/.cache/agentmeter}"
KUBECTL="${KUBECTL:-kubectl}"
KUBERNETES_VERSION="${KUBERNETES_VERSION:-1.30.0}"
VENV="$AGENTMETER_CACHE/venv-kubernetes-validate"
REQUIREMENTS="$SCRIPT_DIR/requirements.txt"

say() { printf '[kubernetes] %s\n' "$*"; }
die() { printf '[kubernetes] FAILED: %s\n' "$*" >&2; exit 1; }

[ -x "$VENV/bin/python" ] && cmp -s "$REQUIREMENTS" "$VENV/.agentmeter-requirements" \
    || die "$VENV is missing or not made from ${REQUIREMENTS#"$REPO_ROOT"/}: run 'deploy/local/services.sh install'"
say "kubernetes-validate $("$VENV/bin/kubernetes-validate" --version 2>&1 | awk '{print $NF}'), Kubernetes $KUBERNETES_VERSION"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/agentmeter-k8scheck.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
relative() { realpath --relative-to="$1" "$2"; }

if "$KUBECTL" kustomize --help >/dev/null 2>&1; then
    say "1/3 render with $("$KUBECTL" version --client 2>/dev/null | grep -i kustomize || echo "$KUBECTL kustomize")"
    renders=()
    render() { # name dir what
        "$KUBECTL" kustomize "$2" >"$WORK/$1.yaml" || die "kustomize could not render $3"
        renders+=(--render "$1=$WORK/$1.yaml")
        say "  $3 → $(grep -c '^kind:' "$WORK/$1.yaml") documents"
    }
    render base "$SCRIPT_DIR/base" "base"
    for overlay in "$SCRIPT_DIR"/overlays/*/; do
        render "overlay-$(basename "$overlay")" "$overlay" "overlays/$(basename "$overlay")"
    done
    for component in "$SCRIPT_DIR"/components/*/; do
        name="$(basename "$component")"
        mkdir -p "$WORK/with-$name"
        cat >"$WORK/with-$name/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - $(relative "$WORK/with-$name" "$SCRIPT_DIR/base")
components:
  - $(relative "$WORK/with-$name" "$component")
EOF
        render "base-with-$name" "$WORK/with-$name" "base + components/$name"
    done
    say "2/3 and 3/3 schemas (strict) and the project's rules"
    "$VENV/bin/python" "$SCRIPT_DIR/check_manifests.py" --kubernetes-version "$KUBERNETES_VERSION" "${renders[@]}" \
        || die "the manifests above do not pass"
else
    say "WARNING: '$KUBECTL kustomize' is not available: the manifests are NOT rendered."
    say "WARNING: checking base/*.yaml and the components' resources as files; patches, components and overlays are NOT checked."
    files=()
    for file in "$SCRIPT_DIR"/base/*.yaml; do
        [ "$(basename "$file")" = kustomization.yaml ] || files+=("$file")
    done
    "$VENV/bin/python" "$SCRIPT_DIR/check_manifests.py" --kubernetes-version "$KUBERNETES_VERSION" \
        --settings "$SCRIPT_DIR/base/agentmeter.toml" --files "${files[@]}" \
        --schema-only "$SCRIPT_DIR"/components/*/scaledobject.yaml "$SCRIPT_DIR"/components/*/servicemonitor.yaml \
        || die "the manifests above do not pass"
fi
say "all Kubernetes manifests passed"
