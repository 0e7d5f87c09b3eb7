#!/usr/bin/env bash
# Checks the Prometheus rules, their unit tests, the example scrape configuration and the Grafana
# dashboard with promtool (Debian's `prometheus` package, installed by
# `deploy/local/services.sh install`). Needs no running service; takes a second or two.
#
#   deploy/prometheus/check.sh
#
#   1. promtool check config deploy/prometheus/prometheus.yml   (also checks the rule files it loads)
#   2. promtool check rules  deploy/prometheus/rules.yml
#   3. promtool test rules   deploy/prometheus/rules.test.yml
#   4. every alert in rules.yml has `for`, a severity label, summary, description and a runbook_url
#      whose anchor is a heading of docs/operations.md, and a unit test where it fires and one
#      where it does not
#   5. deploy/grafana/agentmeter.json is well-formed JSON, and every PromQL `expr` in it parses
#      (each becomes a recording rule of a throw-away rules file, checked by promtool check rules;
#      Grafana's $__rate_interval, $__interval and $__range become fixed durations)
#   6. every metric name in rules.yml, rules.test.yml and the dashboard is in the metric catalogue
#      of docs/settings.md (histogram series: their _bucket/_sum/_count), so a renamed metric fails
#
# Exits non-zero on the first failing step.
#
# Environment (defaults in brackets):
#   PROMTOOL   [promtool]   the promtool binary
#   PYTHON     [python3]    interpreter for steps 4–6 (standard library only)
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
PROMTOOL="${PROMTOOL:-promtool}"
PYTHON="${PYTHON:-python3}"
RULES="$SCRIPT_DIR/rules.yml"
TESTS="$SCRIPT_DIR/rules.test.yml"
CONFIG="$SCRIPT_DIR/prometheus.yml"
DASHBOARD="$REPO_ROOT/deploy/grafana/agentmeter.json"
SETTINGS="$REPO_ROOT/docs/settings.md"
OPERATIONS="$REPO_ROOT/docs/operations.md"

say() { printf '[prometheus] %s\n' "$*"; }
die() { printf '[prometheus] FAILED: %s\n' "$*" >&2; exit 1; }

command -v "$PROMTOOL" >/dev/null 2>&1 \
    || die "$PROMTOOL not found: run 'deploy/local/services.sh install' (Debian package prometheus)"
say "$("$PROMTOOL" --version 2>&1 | head -n 1)"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/agentmeter-promcheck.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

say "1/6 promtool check config ${CONFIG#"$REPO_ROOT"/}"
"$PROMTOOL" check config "$CONFIG" || die "promtool check config"

say "2/6 promtool check rules ${RULES#"$REPO_ROOT"/}"
"$PROMTOOL" check rules "$RULES" || die "promtool check rules"

say "3/6 promtool test rules ${TESTS#"$REPO_ROOT"/}"
(cd "$SCRIPT_DIR" && "$PROMTOOL" test rules "$(basename "$TESTS")") || die "promtool test rules"

say "4/6 every alert: for, severity, summary, description, runbook in docs/operations.md, firing and quiet unit tests"
"$PYTHON" - "$RULES" "$TESTS" "$OPERATIONS" <<'PY' || die "alert conventions"
import re, sys
rules, tests, operations = (open(p, encoding="utf-8").read() for p in sys.argv[1:4])

def slug(heading):
    # GitHub's heading anchors: lower case, punctuation dropped, spaces to '-'.
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")

anchors = {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.+)$", operations, re.M)}
blocks = re.split(r"^\s*- (?=alert:|record:|name:)", rules, flags=re.M)
alerts = {}
for block in blocks:
    m = re.match(r"alert:\s*(\S+)", block)
    if m:
        alerts[m.group(1)] = block
if not alerts:
    sys.exit("no alert found in rules.yml")

# Test cases: "- alertname: X" ... "exp_alerts: []" (quiet) or "exp_alerts:" + a list (fires).
cases = re.findall(r"-\s*alertname:\s*(\S+)\s*\n\s*eval_time:\s*\S+[^\n]*\n\s*exp_alerts:\s*(\[\])?", tests)
fires = {name for name, empty in cases if not empty}
quiet = {name for name, empty in cases if empty}

problems = []
for name, block in alerts.items():
    for what, pattern in [("for", r"^\s*for:\s*\d+[smhdwy]"), ("severity label", r"^\s*severity:\s*(critical|warning|info)\s*$"),
                          ("summary", r"^\s*summary:"), ("description", r"^\s*description:")]:
        if not re.search(pattern, block, re.M):
            problems.append(f"{name}: no {what}")
    m = re.search(r'^\s*runbook_url:\s*"?docs/operations\.md#([\w-]+)"?\s*$', block, re.M)
    if not m:
        problems.append(f"{name}: no runbook_url docs/operations.md#…")
    elif m.group(1) not in anchors:
        problems.append(f"{name}: runbook_url anchor #{m.group(1)} is no heading of docs/operations.md")
    if name not in fires:
        problems.append(f"{name}: no unit test where it fires")
    if name not in quiet:
        problems.append(f"{name}: no unit test where it does not fire")
unknown = sorted({name for name, _ in cases} - set(alerts))
if unknown:
    problems.append(f"tests name alerts that rules.yml does not have: {unknown}")
if problems:
    sys.exit("\n".join(problems))
print(f"  {len(alerts)} alerts, each with for/severity/summary/description/runbook and a firing and a quiet test:")
for name in alerts:
    print(f"    {name}")
PY

say "5/6 dashboard ${DASHBOARD#"$REPO_ROOT"/}: JSON, and every expr parses (promtool check rules)"
"$PYTHON" - "$DASHBOARD" "$WORK/dashboard_rules.yml" <<'PY' || die "dashboard JSON"
import json, sys
dashboard = json.load(open(sys.argv[1], encoding="utf-8"))
if not any(v.get("type") == "datasource" and v.get("query") == "prometheus"
           for v in dashboard.get("templating", {}).get("list", [])):
    sys.exit("the dashboard has no Prometheus datasource variable")
exprs = []
def walk(node, title):
    if isinstance(node, dict):
        title = node.get("title", title)
        if isinstance(node.get("expr"), str):
            exprs.append((title, node["expr"]))
        for value in node.values():
            walk(value, title)
    elif isinstance(node, list):
        for value in node:
            walk(value, title)
walk(dashboard, "")
if not exprs:
    sys.exit("no expr in the dashboard")
substitutions = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}
with open(sys.argv[2], "w", encoding="utf-8") as out:
    out.write("groups:\n  - name: dashboard\n    rules:\n")
    for number, (title, expr) in enumerate(exprs):
        for variable, value in substitutions.items():
            expr = expr.replace(variable, value)
        if "$" in expr:
            sys.exit(f"panel {title!r}: a variable check.sh does not substitute: {expr}")
        out.write(f"      # {title}\n      - record: dashboard:expr_{number}\n        expr: {json.dumps(expr)}\n")
print(f"  {len(exprs)} expressions in {sum(1 for _ in dashboard['panels'])} panels")
PY
"$PROMTOOL" check rules "$WORK/dashboard_rules.yml" || die "a dashboard expression does not parse (dashboard:expr_N is the dashboard's expr number N, counted from 0 in panel order)"

say "6/6 every metric name in the rules, their tests and the dashboard is in docs/settings.md"
"$PYTHON" - "$SETTINGS" "$RULES" "$TESTS" "$DASHBOARD" <<'PY' || die "metric names not in docs/settings.md"
import re, sys
settings = open(sys.argv[1], encoding="utf-8").read()
# As tests/metrics_catalogue.rs reads it: every `agentmeter_…` name in backticks.
documented = set()
for quoted in settings.split("`")[1::2]:
    name = re.match(r"[a-z_]*", quoted).group(0)
    if name.startswith("agentmeter_") and len(name) > len("agentmeter_"):
        documented.add(name)
missing = {}
used = set()
for path in sys.argv[2:]:
    text = open(path, encoding="utf-8").read()
    # A metric name, not part of a recording rule's level:name:operation.
    for name in re.findall(r"(?<![\w:])agentmeter_[a-z_]+(?![\w:])", text):
        used.add(name)
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if name not in documented and base not in documented:
            missing.setdefault(name, set()).add(path.rsplit("/", 1)[-1])
if not used:
    sys.exit("no metric name found")
if missing:
    sys.exit("\n".join(f"  {name} ({', '.join(sorted(files))}) is not in docs/settings.md" for name, files in sorted(missing.items())))
print(f"  {len(used)} metric names, all in docs/settings.md ({len(documented)} there)")
PY

say "all Prometheus and Grafana checks passed"
