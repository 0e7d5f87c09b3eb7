#!/usr/bin/env python3
"""Check agentmeter's ClickHouse DDL and views against a real ClickHouse, with exact expected values.

Two backends, same checks, same expected values:

  * default: chdb (PyPI `chdb`), an in-process current ClickHouse (26.x), in a throw-away directory;
  * --http URL: a ClickHouse server over HTTP (e.g. Debian's 18.16 started by services.sh), in a
    fresh database `agentmeter_sqlcheck_<pid>` that is dropped at the end (tables only; nothing
    else on the server is touched).

Steps: split the migration files exactly like aggregator/src/migrate.rs (drop lines starting with
`--`, split on `;`, trim, skip empty, replace `{database}`), run every statement, insert a small fixed
data set into `actions`, `usage` and `aggregator_progress` (merges stopped, one INSERT per row: every
row sits in its own part, checked, so FINAL has to collapse the versions at read time), then read
every view and compare names, types and values with what this script computes itself in Python
`decimal` (exact, no float). The comparison runs twice: unmerged, and after `OPTIMIZE TABLE ... FINAL`
(merged parts must give the same answers). Beyond the views: docs/sql.md's billing queries (which
filter inside `usage FINAL`), and usage_exact's SELECT from migration 0003 with its server-version test
forced both ways (two FINAL scans split by day of month, and one scan), so that both shapes are checked
on every server. With --docs, every ```sql block of docs/sql.md is run as well (database `agentmeter`
replaced by the test database) and must not return a Float column.

--dump FILE writes the canonical results (JSON), so two backends can be compared byte for byte
(check_sql_current_clickhouse.sh does that). Exit status: 0 all good, 1 a difference or failure.
Standard library only, plus chdb for the default backend.
"""

import argparse
import datetime as dt
import decimal
import json
import os
import re
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from decimal import Decimal

decimal.getcontext().prec = 80  # far above Decimal(38, 12): Python's arithmetic here is exact
SCALE = Decimal("1e-12")
DECIMAL_TEXT = re.compile(r"^-?[0-9]+(\.[0-9]+)?$")

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))
DEFAULT_MIGRATIONS = os.path.join(REPO_ROOT, "aggregator", "migrations")


class CheckFailed(Exception):
    pass


# ----------------------------------------------------------------------------- migrations


def split_statements(sql, database):
    """The statements of a migration file, exactly as migrate.rs `statements()` makes them."""
    lines = [line[:-1] if line.endswith("\r") else line for line in sql.split("\n")]  # str::lines
    without_comments = "\n".join(line for line in lines if not line.lstrip().startswith("--"))
    return [
        statement.strip().replace("{database}", database)
        for statement in without_comments.split(";")
        if statement.strip()
    ]


def migration_files(directory):
    names = sorted(name for name in os.listdir(directory) if re.match(r"^\d{4}_.*\.sql$", name))
    if not names:
        raise CheckFailed(f"no NNNN_*.sql migration files in {directory}")
    return [os.path.join(directory, name) for name in names]


# ----------------------------------------------------------------------------- backends

TSV_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "0": "\0", "b": "\b", "f": "\f", "\\": "\\", "'": "'"}


def tsv_unescape(field):
    if field == "\\N":
        return None
    out, i = [], 0
    while i < len(field):
        ch = field[i]
        if ch == "\\" and i + 1 < len(field):
            out.append(TSV_ESCAPES.get(field[i + 1], field[i + 1]))
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def parse_tsv_with_names_and_types(text):
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) < 2:
        raise CheckFailed(f"expected a TabSeparatedWithNamesAndTypes answer, got {text!r}")
    names = [tsv_unescape(f) for f in lines[0].split("\t")]
    types = [tsv_unescape(f) for f in lines[1].split("\t")]
    rows = [[tsv_unescape(f) for f in line.split("\t")] for line in lines[2:]]
    return names, types, rows


class ChdbBackend:
    def __init__(self):
        from chdb import session  # imported here: the --http mode needs no chdb

        import chdb

        self.directory = tempfile.mkdtemp(prefix="agentmeter-sqlcheck-chdb-")
        self.session = session.Session(self.directory)
        self.label = f"chdb {chdb.__version__}"

    def execute(self, sql):
        self.session.query(sql, "TabSeparated")

    def select(self, sql):
        result = self.session.query(sql, "TabSeparatedWithNamesAndTypes")
        return parse_tsv_with_names_and_types(result.data())

    def close(self):
        try:
            self.session.close()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


class HttpBackend:
    def __init__(self, url):
        self.url = url.rstrip("/") + "/"
        self.label = f"ClickHouse over HTTP at {self.url}"

    def _post(self, sql):
        request = urllib.request.Request(self.url, data=sql.encode("utf-8"), method="POST")
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                return answer.read().decode("utf-8")
        except urllib.error.HTTPError as error:
            raise RuntimeError(error.read().decode("utf-8", "replace").strip()) from None
        except urllib.error.URLError as error:
            raise RuntimeError(f"cannot reach {self.url}: {error.reason}") from None

    def execute(self, sql):
        self._post(sql)

    def select(self, sql):
        return parse_tsv_with_names_and_types(self._post(sql + "\nFORMAT TabSeparatedWithNamesAndTypes"))

    def close(self):
        pass


# ----------------------------------------------------------------------------- data set

USAGE_COLUMNS = [
    "window_start", "window_seconds", "workspace_id", "account_id", "agent_instance_id", "user_key",
    "action_name", "measure", "tracked", "outcome", "currency", "source_partition", "batch_start",
    "action_count", "quantity", "cost", "outcome_count", "first_seen", "last_seen", "version",
]
USAGE_KEY = [
    "workspace_id", "account_id", "window_start", "agent_instance_id", "user_key", "action_name",
    "measure", "tracked", "outcome", "currency", "source_partition", "batch_start",
]

# The biggest cost here has 29 significant digits: a float anywhere on its way would change it.
BIG_COST = "12345678901234567.123456789012"


def usage(ws, account, window, user, action, measure, tracked, outcome, partition, batch, version,
          count, quantity, cost, agent="inst_1", currency="USD"):
    window_start = dt.datetime.strptime(window, "%Y-%m-%d %H:%M:%S")
    return {
        "window_start": window_start, "window_seconds": 60, "workspace_id": ws, "account_id": account,
        "agent_instance_id": agent, "user_key": user, "action_name": action, "measure": measure,
        "tracked": tracked, "outcome": outcome, "currency": currency, "source_partition": partition,
        "batch_start": batch, "action_count": count, "quantity": Decimal(quantity),
        "cost": Decimal(cost), "outcome_count": count if outcome else 0,
        "first_seen": window_start, "last_seen": window_start + dt.timedelta(seconds=59),
        "version": version,
    }


# In insertion order. Several rows share a key (same window, dimensions, partition and batch) with
# different versions, inserted out of order: only the highest version may count.
USAGE_ROWS = [
    # ws_1/acme u1, last minute of January, one key in three versions (9 wins), a replay of v9,
    # plus the same window from two more batches (summed).
    usage("ws_1", "acme", "2025-01-31 23:59:00", "u1", "llm_call", "token", 1, 0, 0, 0, 3, 1, "100", "0.00015"),
    usage("ws_1", "acme", "2025-01-31 23:59:00", "u1", "llm_call", "token", 1, 0, 0, 0, 9, 3, "350", "0.000525"),
    usage("ws_1", "acme", "2025-01-31 23:59:00", "u1", "llm_call", "token", 1, 0, 0, 0, 7, 2, "250", "0.000375"),
    usage("ws_1", "acme", "2025-01-31 23:59:00", "u1", "llm_call", "token", 1, 0, 0, 0, 9, 3, "350", "0.000525"),
    usage("ws_1", "acme", "2025-01-31 23:59:00", "u1", "llm_call", "token", 1, 0, 0, 1000, 1001, 2, "20", "0.00003"),
    usage("ws_1", "acme", "2025-01-31 23:59:00", "u1", "llm_call", "token", 1, 0, 1, 0, 5, 1, "12345678.000000000001", BIG_COST),
    # February 1st: u1 again (two versions), u2 with outcomes (two versions), an untracked action of u2.
    usage("ws_1", "acme", "2025-02-01 00:00:00", "u1", "web_search", "unit", 1, 0, 0, 0, 10, 3, "3", "0.03"),
    usage("ws_1", "acme", "2025-02-01 00:00:00", "u1", "web_search", "unit", 1, 0, 0, 0, 12, 4, "4", "0.04"),
    usage("ws_1", "acme", "2025-02-01 10:15:00", "u2", "deliver_report", "unit", 1, 1, 1, 0, 8, 2, "2", "1.5"),
    usage("ws_1", "acme", "2025-02-01 10:15:00", "u2", "deliver_report", "unit", 1, 1, 1, 0, 6, 1, "1", "0.75"),
    usage("ws_1", "acme", "2025-02-01 10:15:00", "u2", "debug_probe", "unit", 0, 0, 1, 0, 8, 7, "7", "0.7"),
    # A user seen only in untracked actions counts nowhere.
    usage("ws_1", "acme", "2025-02-03 09:00:00", "u4", "debug_probe", "unit", 0, 0, 1, 0, 9, 1, "1", "0"),
    # An action without a user: billable, but no @user / @seat.
    usage("ws_1", "acme", "2025-02-20 08:00:00", "", "web_search", "unit", 1, 0, 0, 1000, 1002, 1, "1", "0.01"),
    # March: u3, and a second agent instance of the same account in the same window.
    usage("ws_1", "acme", "2025-03-05 12:00:00", "u3", "llm_call", "token", 1, 0, 0, 2000, 2000, 1, "1000", "0.0015"),
    usage("ws_1", "acme", "2025-03-05 12:00:00", "u3", "llm_call", "token", 1, 0, 0, 2000, 2001, 1, "1000", "0.0015", agent="inst_2"),
    # ws_1/globex: two windows of one day, an outcome on another day.
    usage("ws_1", "globex", "2025-01-15 09:00:00", "u9", "llm_call", "token", 1, 0, 2, 0, 20, 5, "5000", "0.0075"),
    usage("ws_1", "globex", "2025-01-15 09:01:00", "u9", "llm_call", "token", 1, 0, 2, 0, 21, 1, "1000", "0.0015"),
    # ... and, after a configuration change, the same action priced by another measure that day:
    # per-user and per-account quantities must keep the two measures apart.
    usage("ws_1", "globex", "2025-01-15 09:02:00", "u9", "llm_call", "output_token", 1, 0, 2, 0, 23, 1, "300", "0.0009"),
    usage("ws_1", "globex", "2025-02-14 17:30:00", "u8", "deliver_report", "unit", 1, 1, 2, 0, 22, 1, "1", "2.000000000001"),
    # Both sides of usage_exact's split between the 15th and the 16th (0003), each key in two
    # versions, inserted out of order.
    usage("ws_1", "acme", "2025-02-15 23:59:00", "u2", "web_search", "unit", 1, 0, 3, 0, 31, 2, "2", "0.02"),
    usage("ws_1", "acme", "2025-02-15 23:59:00", "u2", "web_search", "unit", 1, 0, 3, 0, 30, 1, "1", "0.01"),
    usage("ws_1", "acme", "2025-02-16 00:00:00", "u2", "web_search", "unit", 1, 0, 3, 0, 30, 1, "1", "0.01"),
    usage("ws_1", "acme", "2025-02-16 00:00:00", "u2", "web_search", "unit", 1, 0, 3, 0, 33, 5, "5", "0.05"),
    # The same account id in another workspace, in another currency.
    usage("ws_2", "acme", "2025-01-31 23:59:00", "u1", "llm_call", "token", 1, 0, 0, 0, 1, 1, "10", "0.00001", currency="EUR"),
]

ACTION_COLUMNS = [
    "event_id", "workspace_id", "account_id", "agent_instance_id", "kind", "action_name", "trace_event",
    "user_id", "anonymous_id", "user_key", "occurred_at", "occurred_at_micros", "received_at",
    "description", "llm_provider", "llm_model", "input_tokens", "output_tokens", "total_tokens",
    "reported_cost", "attributes_json", "source", "tracked", "outcome", "measure", "quantity",
    "unit_cost", "cost", "cost_source", "currency", "config_version", "enriched_at",
    "source_partition", "source_offset",
]


def action(event_id, ws, account, kind, name, user, occurred, attributes, tracked, outcome, measure,
           quantity, unit_cost, cost, reported_cost=None, partition=0, offset=0, currency="USD"):
    occurred_at = dt.datetime.strptime(occurred, "%Y-%m-%d %H:%M:%S")
    micros = int((occurred_at - dt.datetime(1970, 1, 1)).total_seconds()) * 1_000_000 + 123456
    return {
        "event_id": event_id, "workspace_id": ws, "account_id": account, "agent_instance_id": "inst_1",
        "kind": kind, "action_name": name, "trace_event": "", "user_id": user, "anonymous_id": "anon_" + user,
        "user_key": user, "occurred_at": occurred_at, "occurred_at_micros": micros,
        "received_at": occurred_at + dt.timedelta(seconds=1), "description": "",
        "llm_provider": "openai" if kind == "llm" else "", "llm_model": "gpt-4" if kind == "llm" else "",
        "input_tokens": 2500 if kind == "llm" else None, "output_tokens": 400 if kind == "llm" else None,
        "total_tokens": 2900 if kind == "llm" else None,
        "reported_cost": None if reported_cost is None else Decimal(reported_cost),
        "attributes_json": attributes, "source": "otlp_grpc", "tracked": tracked, "outcome": outcome,
        "measure": measure, "quantity": Decimal(quantity), "unit_cost": Decimal(unit_cost),
        "cost": Decimal(cost), "cost_source": "allocated" if tracked else "none", "currency": currency,
        "config_version": 3, "enriched_at": occurred_at + dt.timedelta(seconds=2),
        "source_partition": partition, "source_offset": offset,
    }


ACTION_ROWS = [
    action("e1", "ws_1", "acme", "action", "delivery", "u1", "2025-12-15 16:11:43",
           '{"delivery_method": "email"}', 0, 0, "", "0", "0", "0", offset=1),
    action("e2", "ws_1", "acme", "action", "llm_call", "u1", "2025-12-15 16:11:43",
           '{"model": "gpt-4", "input_tokens": 2500, "cost_usd": 0.0123}', 1, 1, "unit", "1",
           "0.25", "0.25", reported_cost="0.0123", offset=2),
    action("e3", "ws_1", "acme", "action", "web_search", "u2", "2025-12-15 16:11:44",
           '{"results_count": 2, "search_provider": "it\'s \\"quoted\\"\\tand tabbed"}', 0, 0, "",
           "0", "0", "0", offset=3),
    action("e4", "ws_1", "acme", "llm", "openai_llm_gpt-4", "u2", "2025-12-15 16:11:45",
           '{}', 1, 0, "token", "2900", "0.000001500000", "0.00435", reported_cost=BIG_COST, offset=4),
    # A replay writes the identical row again: FINAL shows it once.
    action("e4", "ws_1", "acme", "llm", "openai_llm_gpt-4", "u2", "2025-12-15 16:11:45",
           '{}', 1, 0, "token", "2900", "0.000001500000", "0.00435", reported_cost=BIG_COST, offset=4),
    action("e5", "ws_1", "acme", "action", "web_search", "u3", "2025-11-30 23:59:59",
           '{"results_count": 0}', 1, 0, "unit", "1", "0.01", "0.01", partition=1, offset=7),
    action("e6", "ws_2", "acme", "action", "web_search", "u1", "2025-12-15 16:11:46",
           '{}', 1, 0, "unit", "1", "0.01", "0.01", currency="EUR", offset=5),
]

PROGRESS_COLUMNS = ["topic", "source_partition", "batch_start", "batch_size", "window_seconds",
                    "dedupe_from", "end_offset", "written_at"]
TOPIC = "agentmeter.actions.enriched"


def progress(partition, batch, end_offset, written):
    return {"topic": TOPIC, "source_partition": partition, "batch_start": batch, "batch_size": 1000,
            "window_seconds": 60, "dedupe_from": max(0, batch - 1000), "end_offset": end_offset,
            "written_at": dt.datetime.strptime(written, "%Y-%m-%d %H:%M:%S")}


PROGRESS_ROWS = [
    progress(0, 0, 9, "2025-02-01 00:00:01"),
    progress(0, 0, 999, "2025-02-01 00:00:09"),
    progress(0, 0, 500, "2025-02-01 00:00:05"),
    progress(0, 1000, 1002, "2025-02-01 00:00:10"),
    progress(1, 0, 8, "2025-02-01 00:00:02"),
    progress(2, 0, 22, "2025-02-01 00:00:03"),
]

EPOCH_COLUMNS = ["topic", "source_partition", "logical_start", "physical_start", "created_at"]


def epoch(partition, logical, physical, created):
    return {"topic": TOPIC, "source_partition": partition, "logical_start": logical,
            "physical_start": physical, "created_at": dt.datetime.strptime(created, "%Y-%m-%d %H:%M:%S")}


# `agentmeter reset-input` rows (migration 0005): partition 0 reset twice, partition 1 once.
EPOCH_ROWS = [
    epoch(0, 1003, 0, "2025-02-02 00:00:00"),
    epoch(0, 1503, 120, "2025-02-03 00:00:00"),
    epoch(1, 9, 0, "2025-02-02 00:00:00"),
]


INVOICE_COLUMNS = ["workspace_id", "invoice_id", "number", "status", "account_id", "subscription_id",
                   "product", "rate_plan", "agent_type", "period_start", "period_end", "currency",
                   "total", "cost", "cost_currency", "margin", "config_version", "finalized_at",
                   "void_reason", "content", "log_offset", "version"]


def invoice(ws, invoice_id, number, status, account, total, log_offset, version, reason=""):
    cost = Decimal("1.250000000000")
    return {"workspace_id": ws, "invoice_id": invoice_id, "number": number, "status": status,
            "account_id": account, "subscription_id": f"sub_{account}",
            "product": "research", "rate_plan": "pro", "agent_type": "research_agent",
            "period_start": dt.datetime(2025, 2, 1), "period_end": dt.datetime(2025, 3, 1),
            "currency": "USD", "total": Decimal(total), "cost": cost, "cost_currency": "USD",
            "margin": Decimal(total) - cost, "config_version": 3,
            "finalized_at": dt.datetime(2025, 3, 4), "void_reason": reason,
            "content": '{"total":"' + total + '"}', "log_offset": log_offset, "version": version}


# The projection of a finalization log (migrations 0006, 0007): ws_1's invoice 1 finalized, then voided
# (a newer version of the same row); invoice 2 finalized; ws_2's own invoice 1.
INVOICE_ROWS = [
    invoice("ws_1", "a" * 32, 1, "finalized", "acc_a", "142.500000000000", 0, 0),
    invoice("ws_1", "b" * 32, 2, "finalized", "acc_b", "10.250000000000", 1, 1),
    invoice("ws_2", "c" * 32, 1, "finalized", "acc_a", "99.000000000000", 2, 2),
    invoice("ws_1", "a" * 32, 1, "void", "acc_a", "142.500000000000", 0, 3, "wrong contact"),
]


def sql_literal(value):
    if value is None:
        return "NULL"
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, dt.datetime):
        return "'" + value.strftime("%Y-%m-%d %H:%M:%S") + "'"
    if isinstance(value, Decimal):
        return format(value, "f")  # read by the Values parser as the column's text: exact
    return str(value)


def insert_rows(backend, database, table, columns, rows):
    for row in rows:  # one INSERT per row: one part per row, FINAL must collapse at read time
        values = ", ".join(sql_literal(row[column]) for column in columns)
        backend.execute(f"INSERT INTO {database}.{table} ({', '.join(columns)}) VALUES ({values})")


# ----------------------------------------------------------------------------- expected values


def canon(value, type_name):
    """One text form for a value, whichever server printed it (18.16 pads decimals, 26.x trims)."""
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, dt.date):
        return value.strftime("%Y-%m-%d")
    if "Decimal" in type_name:
        text = format(value, "f") if isinstance(value, Decimal) else value
        if not DECIMAL_TEXT.match(text):
            raise CheckFailed(f"decimal printed as {text!r} (type {type_name})")
        return format(Decimal(text).quantize(SCALE), "f")
    return str(value)


def final_usage():
    winners = {}
    for row in USAGE_ROWS:
        key = tuple(row[column] for column in USAGE_KEY)
        if key not in winners or row["version"] > winners[key]["version"]:
            winners[key] = row
    return list(winners.values())


def group_sum(rows, keys, sums):
    """keys: list of (name, function of row); sums: list of (name, column)."""
    groups = {}
    for row in rows:
        key = tuple(function(row) for _, function in keys)
        totals = groups.setdefault(key, [0] * len(sums))
        for index, (_, column) in enumerate(sums):
            totals[index] += row[column]
    return [list(key) + totals for key, totals in groups.items()]


def col(name):
    return lambda row: row[name]


def day_of(row):
    return row["window_start"].date()


def month_of(row):
    return row["window_start"].date().replace(day=1)


def expected_views():
    final = final_usage()
    tracked = [row for row in final if row["tracked"] == 1]
    with_user = [row for row in tracked if row["user_key"] != ""]
    billable = [("actions", "action_count"), ("quantity", "quantity"), ("cost", "cost"),
                ("outcomes", "outcome_count")]
    views = {}
    views["usage_exact"] = [[row[column] for column in USAGE_COLUMNS if column != "version"] for row in final]
    views["usage_by_account_day"] = group_sum(tracked, [
        ("workspace_id", col("workspace_id")), ("account_id", col("account_id")), ("day", day_of),
        ("action_name", col("action_name")), ("measure", col("measure")), ("currency", col("currency"))],
        billable)
    views["usage_by_account_month"] = group_sum(tracked, [
        ("workspace_id", col("workspace_id")), ("account_id", col("account_id")), ("month", month_of),
        ("action_name", col("action_name")), ("measure", col("measure")), ("currency", col("currency"))],
        billable)
    views["usage_by_user_day"] = group_sum(tracked, [
        ("workspace_id", col("workspace_id")), ("account_id", col("account_id")),
        ("user_key", col("user_key")), ("day", day_of), ("action_name", col("action_name")),
        ("measure", col("measure")), ("currency", col("currency"))], billable)
    views["outcomes_by_account_day"] = group_sum(
        [row for row in tracked if row["outcome"] == 1],
        [("workspace_id", col("workspace_id")), ("account_id", col("account_id")), ("day", day_of),
         ("action_name", col("action_name"))],
        [("outcomes", "outcome_count"), ("cost", "cost")])
    users = {}
    for row in with_user:
        users.setdefault((row["workspace_id"], row["account_id"], month_of(row)), set()).add(row["user_key"])
    views["users_by_account_month"] = [list(key) + [len(names)] for key, names in users.items()]
    # @seat: distinct users active on any day of D-29 .. D.
    active = {}
    for row in with_user:
        active.setdefault((row["workspace_id"], row["account_id"]), set()).add((row["user_key"], day_of(row)))
    seats = []
    for (ws, account), user_days in active.items():
        days = {day + dt.timedelta(days=offset) for _, day in user_days for offset in range(30)}
        for as_of in days:
            earliest = as_of - dt.timedelta(days=29)
            count = len({user for user, day in user_days if earliest <= day <= as_of})
            seats.append([ws, account, as_of, count])
    views["seats_by_account_day"] = seats
    views["cost_by_account_month"] = group_sum(tracked, [
        ("workspace_id", col("workspace_id")), ("account_id", col("account_id")), ("month", month_of),
        ("currency", col("currency"))],
        [("actions", "action_count"), ("outcomes", "outcome_count"), ("cost", "cost")])
    live = {}
    for row in ACTION_ROWS:  # actions FINAL: one row per sorting key (replays are identical rows)
        key = tuple(row[c] for c in ("workspace_id", "account_id", "occurred_at", "event_id",
                                     "source_partition", "source_offset"))
        live[key] = row
    views["live_data"] = [[
        row["workspace_id"], row["account_id"], row["agent_instance_id"], row["event_id"],
        row["occurred_at"],
        "@outcome" if row["outcome"] == 1 else ("@action" if row["tracked"] == 1 else "-"),
        row["action_name"] if row["kind"] == "llm" else "-",
        row["action_name"], row["attributes_json"], row["user_key"], row["tracked"], row["outcome"],
        row["quantity"], row["cost"], row["currency"]] for row in live.values()]
    return views


DT = "DateTime('UTC')"
DEC = "Decimal(38, 12)"
VIEW_COLUMNS = {
    "usage_exact": [
        ("window_start", DT), ("window_seconds", "UInt32"), ("workspace_id", "String"),
        ("account_id", "String"), ("agent_instance_id", "String"), ("user_key", "String"),
        ("action_name", "String"), ("measure", "String"), ("tracked", "UInt8"), ("outcome", "UInt8"),
        ("currency", "String"), ("source_partition", "UInt32"), ("batch_start", "UInt64"),
        ("action_count", "UInt64"), ("quantity", DEC), ("cost", DEC), ("outcome_count", "UInt64"),
        ("first_seen", DT), ("last_seen", DT)],
    "usage_by_account_day": [
        ("workspace_id", "String"), ("account_id", "String"), ("day", "Date"), ("action_name", "String"),
        ("measure", "String"), ("currency", "String"), ("actions", "UInt64"), ("quantity", DEC),
        ("cost", DEC), ("outcomes", "UInt64")],
    "usage_by_account_month": [
        ("workspace_id", "String"), ("account_id", "String"), ("month", "Date"), ("action_name", "String"),
        ("measure", "String"), ("currency", "String"), ("actions", "UInt64"), ("quantity", DEC),
        ("cost", DEC), ("outcomes", "UInt64")],
    "usage_by_user_day": [
        ("workspace_id", "String"), ("account_id", "String"), ("user_key", "String"), ("day", "Date"),
        ("action_name", "String"), ("measure", "String"), ("currency", "String"), ("actions", "UInt64"), ("quantity", DEC),
        ("cost", DEC), ("outcomes", "UInt64")],
    "outcomes_by_account_day": [
        ("workspace_id", "String"), ("account_id", "String"), ("day", "Date"), ("action_name", "String"),
        ("outcomes", "UInt64"), ("cost", DEC)],
    "users_by_account_month": [
        ("workspace_id", "String"), ("account_id", "String"), ("month", "Date"), ("users", "UInt64")],
    "seats_by_account_day": [
        ("workspace_id", "String"), ("account_id", "String"), ("day", "Date"), ("seats", "UInt64")],
    "cost_by_account_month": [
        ("workspace_id", "String"), ("account_id", "String"), ("month", "Date"), ("currency", "String"),
        ("actions", "UInt64"), ("outcomes", "UInt64"), ("cost", DEC)],
    "live_data": [
        ("workspace_id", "String"), ("account_id", "String"), ("agent_instance_id", "String"),
        ("event_id", "String"), ("created_at", DT), ("measure", "String"), ("tag", "String"),
        ("value_action_name", "String"), ("value_action_user_attributes", "String"),
        ("user_key", "String"), ("tracked", "UInt8"), ("outcome", "UInt8"), ("quantity", DEC),
        ("cost", DEC), ("currency", "String")],
}


# The migration that splits usage_exact in two FINAL scans on servers before 22, and the version
# test it uses: the checks below run its SELECT with the test replaced by 1 and by 0, so that both
# shapes are checked on every server.
SPLIT_MIGRATION = "0003_usage_exact_parallel.sql"
SPLIT_GATE = "toUInt32OrZero(splitByChar('.', version())[1]) < 22"
MIGRATIONS_DIR = [DEFAULT_MIGRATIONS]  # set by run()


def usage_exact_split_select(database, old_server):
    """The SELECT of usage_exact as 0003 defines it, as a server before 22 (or a newer one) runs it."""
    path = os.path.join(MIGRATIONS_DIR[0], SPLIT_MIGRATION)
    if not os.path.exists(path):
        return None
    for statement in split_statements(open(path, encoding="utf-8").read(), database):
        head = f"CREATE VIEW IF NOT EXISTS {database}.usage_exact AS"
        if statement.startswith(head):
            if statement.count(SPLIT_GATE) != 2:
                raise CheckFailed(f"{SPLIT_MIGRATION}: expected the version test `{SPLIT_GATE}` twice")
            return statement[len(head):].replace(SPLIT_GATE, "1" if old_server else "0")
    raise CheckFailed(f"{SPLIT_MIGRATION}: no CREATE VIEW IF NOT EXISTS ...usage_exact AS")


# docs/sql.md's billing queries ("Billing queries on large tables"), with {db} for the database.
BILLING_ONE_ACCOUNT = """
SELECT action_name, measure, currency,
       sum(action_count) AS actions, sum(quantity) AS quantity, sum(cost) AS cost,
       sum(outcome_count) AS outcomes
FROM {db}.usage FINAL
WHERE workspace_id = 'ws_1' AND account_id = 'acme' AND toStartOfMonth(window_start) = '2025-02-01'
  AND tracked = 1
GROUP BY action_name, measure, currency"""
BILLING_ONE_WORKSPACE = """
SELECT account_id, action_name, measure, currency,
       sum(action_count) AS actions, sum(quantity) AS quantity, sum(cost) AS cost,
       sum(outcome_count) AS outcomes
FROM {db}.usage FINAL
WHERE workspace_id = 'ws_1' AND toStartOfMonth(window_start) = '2025-02-01' AND tracked = 1
GROUP BY account_id, action_name, measure, currency"""
BILLING_ONE_WORKSPACE_HALVES = """
SELECT account_id, action_name, measure, currency,
       sum(action_count) AS actions, sum(quantity) AS quantity, sum(cost) AS cost,
       sum(outcome_count) AS outcomes
FROM
(
    SELECT account_id, action_name, measure, currency, action_count, quantity, cost, outcome_count
    FROM {db}.usage FINAL
    PREWHERE toDayOfMonth(window_start) <= 15
    WHERE workspace_id = 'ws_1' AND toStartOfMonth(window_start) = '2025-02-01' AND tracked = 1
    UNION ALL
    SELECT account_id, action_name, measure, currency, action_count, quantity, cost, outcome_count
    FROM {db}.usage FINAL
    PREWHERE toDayOfMonth(window_start) >= 16
    WHERE workspace_id = 'ws_1' AND toStartOfMonth(window_start) = '2025-02-01' AND tracked = 1
)
GROUP BY account_id, action_name, measure, currency"""


BILLABLE = [("actions", "action_count"), ("quantity", "quantity"), ("cost", "cost"),
            ("outcomes", "outcome_count")]
WORKSPACE_BILLING_KEYS = [("account_id", col("account_id")), ("action_name", col("action_name")),
                          ("measure", col("measure")), ("currency", col("currency"))]
WORKSPACE_BILLING_COLUMNS = [
    ("account_id", "String"), ("action_name", "String"), ("measure", "String"), ("currency", "String"),
    ("actions", "UInt64"), ("quantity", DEC), ("cost", DEC), ("outcomes", "UInt64")]


def february_ws1_tracked(final, account=None):
    return [row for row in final if row["workspace_id"] == "ws_1" and row["tracked"] == 1
            and month_of(row) == dt.date(2025, 2, 1)
            and (account is None or row["account_id"] == account)]


def extra_checks(database):
    """(name, SQL, columns, expected rows): table reads the docs describe, beyond the views."""
    final = final_usage()
    progress_final = {}
    for row in PROGRESS_ROWS:
        key = (row["topic"], row["source_partition"], row["batch_start"])
        if key not in progress_final or row["end_offset"] > progress_final[key]["end_offset"]:
            progress_final[key] = row
    resume = {}
    for row in progress_final.values():
        current = resume.get(row["source_partition"])
        if current is None or row["batch_start"] > current["batch_start"]:
            resume[row["source_partition"]] = row
    actions_final = {row["event_id"]: row for row in ACTION_ROWS}  # event ids are unique here
    small = [row for row in final if row["action_count"] < 3]
    latest_epoch = {}
    for row in EPOCH_ROWS:
        current = latest_epoch.get(row["source_partition"])
        if current is None or row["created_at"] > current["created_at"]:
            latest_epoch[row["source_partition"]] = row
    invoices_final = {}
    for row in INVOICE_ROWS:
        key = (row["workspace_id"], row["invoice_id"])
        if key not in invoices_final or row["version"] > invoices_final[key]["version"]:
            invoices_final[key] = row
    return [
        ("invoices FINAL: the newest version of each invoice",
         f"SELECT workspace_id, number, status, total, void_reason FROM {database}.invoices FINAL",
         [("workspace_id", "String"), ("number", "UInt64"), ("status", "String"), ("total", DEC),
          ("void_reason", "String")],
         [[r["workspace_id"], r["number"], r["status"], r["total"], r["void_reason"]]
          for r in invoices_final.values()]),
        ("current input epoch per partition (docs/sql.md, reset-input)",
         f"SELECT source_partition, argMax(logical_start, created_at) AS logical_start, "
         f"argMax(physical_start, created_at) AS physical_start "
         f"FROM {database}.aggregator_input_epochs WHERE topic = '{TOPIC}' GROUP BY source_partition",
         [("source_partition", "UInt32"), ("logical_start", "UInt64"), ("physical_start", "UInt64")],
         [[p, r["logical_start"], r["physical_start"]] for p, r in latest_epoch.items()]),
        ("aggregator_progress FINAL",
         f"SELECT topic, source_partition, batch_start, end_offset, written_at "
         f"FROM {database}.aggregator_progress FINAL",
         [("topic", "String"), ("source_partition", "UInt32"), ("batch_start", "UInt64"),
          ("end_offset", "UInt64"), ("written_at", DT)],
         [[r["topic"], r["source_partition"], r["batch_start"], r["end_offset"], r["written_at"]]
          for r in progress_final.values()]),
        ("resume point per partition (latest batch)",
         f"SELECT source_partition, max(batch_start) AS latest_batch_start, "
         f"argMax(end_offset, batch_start) AS end_offset "
         f"FROM {database}.aggregator_progress FINAL WHERE topic = '{TOPIC}' GROUP BY source_partition",
         [("source_partition", "UInt32"), ("latest_batch_start", "UInt64"), ("end_offset", "UInt64")],
         [[p, r["batch_start"], r["end_offset"]] for p, r in resume.items()]),
        ("actions FINAL: Nullable(Decimal) reported_cost",
         f"SELECT event_id, reported_cost, quantity, unit_cost, cost FROM {database}.actions FINAL",
         [("event_id", "String"), ("reported_cost", "Nullable(Decimal(38, 12))"), ("quantity", DEC),
          ("unit_cost", DEC), ("cost", DEC)],
         [[r["event_id"], r["reported_cost"], r["quantity"], r["unit_cost"], r["cost"]]
          for r in actions_final.values()]),
        ("sum of Nullable(Decimal) skips NULLs",
         f"SELECT sum(reported_cost) AS reported, count(reported_cost) AS with_cost "
         f"FROM {database}.actions FINAL",
         [("reported", "Nullable(Decimal(38, 12))"), ("with_cost", "UInt64")],
         [[sum(r["reported_cost"] for r in actions_final.values() if r["reported_cost"] is not None),
           sum(1 for r in actions_final.values() if r["reported_cost"] is not None)]]),
        # Older versions match this filter where the winning version does not: filtering before
        # FINAL (e.g. WHERE moved to PREWHERE) would resurrect them.
        ("usage_exact filtered on a non-key column (FINAL applies before WHERE)",
         f"SELECT count() AS keys, sum(action_count) AS actions, sum(cost) AS cost "
         f"FROM {database}.usage_exact WHERE action_count < 3",
         [("keys", "UInt64"), ("actions", "UInt64"), ("cost", DEC)],
         [[len(small), sum(r["action_count"] for r in small), sum(r["cost"] for r in small)]]),
        ("usage FINAL filtered on a non-key column",
         f"SELECT count() AS keys, sum(action_count) AS actions, sum(cost) AS cost "
         f"FROM {database}.usage FINAL WHERE action_count < 3",
         [("keys", "UInt64"), ("actions", "UInt64"), ("cost", DEC)],
         [[len(small), sum(r["action_count"] for r in small), sum(r["cost"] for r in small)]]),
        ("billing query: one account and month (docs/sql.md)",
         BILLING_ONE_ACCOUNT.format(db=database),
         [("action_name", "String"), ("measure", "String"), ("currency", "String"),
          ("actions", "UInt64"), ("quantity", DEC), ("cost", DEC), ("outcomes", "UInt64")],
         group_sum(february_ws1_tracked(final, "acme"),
                   [("action_name", col("action_name")), ("measure", col("measure")),
                    ("currency", col("currency"))], BILLABLE)),
        ("billing query: one workspace and month (docs/sql.md)",
         BILLING_ONE_WORKSPACE.format(db=database), WORKSPACE_BILLING_COLUMNS,
         group_sum(february_ws1_tracked(final), WORKSPACE_BILLING_KEYS, BILLABLE)),
        ("billing query: one workspace and month in two halves (docs/sql.md)",
         BILLING_ONE_WORKSPACE_HALVES.format(db=database), WORKSPACE_BILLING_COLUMNS,
         group_sum(february_ws1_tracked(final), WORKSPACE_BILLING_KEYS, BILLABLE)),
    ] + [
        (f"usage_exact as 0003 defines it, split {'on (servers before 22)' if old else 'off (22 and later)'}",
         select, VIEW_COLUMNS["usage_exact"], expected_views()["usage_exact"])
        for old, select in ((old, usage_exact_split_select(database, old)) for old in (True, False))
        if select is not None
    ] + [
        ("usage FINAL totals over all keys",
         f"SELECT sum(action_count) AS actions, sum(quantity) AS quantity, sum(cost) AS cost "
         f"FROM {database}.usage FINAL",
         [("actions", "UInt64"), ("quantity", DEC), ("cost", DEC)],
         [[sum(r["action_count"] for r in final), sum(r["quantity"] for r in final),
           sum(r["cost"] for r in final)]]),
    ]


# ----------------------------------------------------------------------------- comparison


def canonical_rows(rows, types):
    return sorted(([canon(v, t) for v, t in zip(row, types)] for row in rows),
                  key=lambda row: [("" if v is None else v) for v in row])


def compare(name, backend, sql, columns, expected_rows, problems, results):
    try:
        names, types, rows = backend.select(sql)
    except Exception as error:  # noqa: BLE001 - any server error is a finding
        problems.append(f"{name}: query failed: {error}\n  SQL: {sql}")
        return
    want_names = [c for c, _ in columns]
    want_types = [t for _, t in columns]
    if names != want_names:
        problems.append(f"{name}: columns {names}, expected {want_names}")
        return
    if types != want_types:
        problems.append(f"{name}: types {types}, expected {want_types}")
    floats = [f"{n} {t}" for n, t in zip(names, types) if "Float" in t]
    if floats:
        problems.append(f"{name}: float columns: {floats}")
    try:
        actual = canonical_rows(rows, types)
    except CheckFailed as error:
        problems.append(f"{name}: {error}")
        return
    expected = canonical_rows(expected_rows, want_types)
    results[name] = {"columns": [f"{n} {t}" for n, t in zip(names, types)], "rows": actual}
    if actual != expected:
        missing = [row for row in expected if row not in actual]
        unexpected = [row for row in actual if row not in expected]
        lines = [f"{name}: {len(actual)} rows, expected {len(expected)}"]
        lines += [f"  missing:    {row}" for row in missing[:20]]
        lines += [f"  unexpected: {row}" for row in unexpected[:20]]
        problems.append("\n".join(lines))


def check_all(backend, database, label, problems, results):
    views = expected_views()
    for view, columns in VIEW_COLUMNS.items():
        compare(f"{label} view {view}", backend, f"SELECT * FROM {database}.{view}", columns,
                views[view], problems, results)
    for name, sql, columns, rows in extra_checks(database):
        compare(f"{label} {name}", backend, sql, columns, rows, problems, results)


def active_parts(backend, database):
    _, _, rows = backend.select(
        f"SELECT table, count() AS parts FROM system.parts WHERE database = '{database}' AND active "
        f"GROUP BY table")
    return {table: int(count) for table, count in rows}


def use_database(sql, database):
    """`agentmeter.<name>` -> `<database>.<name>`, outside string literals (topic names stay)."""
    pieces = sql.split("'")
    for index in range(0, len(pieces), 2):
        pieces[index] = re.sub(r"\bagentmeter\.", database + ".", pieces[index])
    return "'".join(pieces)


def check_rollup_backfill(backend, database, problems):
    """Runs the backfill of the daily rollups (migration 0010, ADR 0008) again, now that `usage`
    holds the test rows in unmerged parts, and checks that `usage_daily` and `users_daily` read
    with FINAL equal `usage FINAL` grouped by day, without each partition's latest batch."""
    path = next((os.path.join(MIGRATIONS_DIR[0], name) for name in os.listdir(MIGRATIONS_DIR[0])
                 if name.endswith("_daily_rollups.sql")), None)
    if path is None:
        return
    inserts = [statement for statement in split_statements(open(path, encoding="utf-8").read(), database)
               if statement.startswith("INSERT ")]
    for statement in inserts:
        backend.execute(statement)
    latest = (f"(source_partition, batch_start) NOT IN (SELECT source_partition, max(batch_start) "
              f"FROM {database}.aggregator_progress GROUP BY source_partition)")
    sums = "sum(action_count) AS actions, toString(sum(cost)) AS cost_total, sum(outcome_count) AS outcomes"
    for table, dimension in (("usage_daily", "action_name"), ("users_daily", "user_key")):
        keys = f"account_id, d, {dimension}, tracked"
        _, _, from_rollup = backend.select(
            f"SELECT account_id, toString(day) AS d, {dimension}, tracked, {sums} "
            f"FROM {database}.{table} FINAL GROUP BY {keys} ORDER BY {keys}")
        _, _, from_usage = backend.select(
            f"SELECT account_id, toString(toStartOfDay(window_start)) AS d, {dimension}, tracked, {sums} "
            f"FROM {database}.usage FINAL WHERE source_partition != 4294967295 AND {latest} "
            f"GROUP BY {keys} ORDER BY {keys}")
        if not from_rollup or from_rollup != from_usage:
            problems.append(f"{table} after the backfill {from_rollup} != usage FINAL by day {from_usage}")
    print(f"[sqlcheck] ran the {len(inserts)} backfill statements of {os.path.basename(path)}; "
          f"usage_daily and users_daily compared with usage FINAL by day", flush=True)


def docs_sql_blocks(path):
    text = open(path, encoding="utf-8").read()
    return [block.strip().rstrip(";") for block in re.findall(r"```sql\n(.*?)```", text, re.S)]


def run(args):
    backend = HttpBackend(args.http) if args.http else ChdbBackend()
    database = args.database or f"agentmeter_sqlcheck_{os.getpid()}"
    MIGRATIONS_DIR[0] = args.migrations
    problems, results = [], {}
    created = False
    version = "?"
    try:
        version = backend.select("SELECT version() AS v")[2][0][0]
        print(f"[sqlcheck] {backend.label}: ClickHouse {version}; database {database}", flush=True)
        if args.http:
            exists = backend.select(f"SELECT count() AS n FROM system.databases WHERE name = '{database}'")
            if exists[2][0][0] != "0":
                raise CheckFailed(f"database {database} already exists on {args.http}: refusing to use it")
        backend.execute(f"CREATE DATABASE {database}")
        created = True
        statements = 0
        for path in migration_files(args.migrations):
            for statement in split_statements(open(path, encoding="utf-8").read(), database):
                try:
                    backend.execute(statement)
                except Exception as error:  # noqa: BLE001
                    raise CheckFailed(f"{os.path.basename(path)} statement failed: {error}\n{statement}") from None
                statements += 1
            # migrate must be re-runnable: every statement again changes nothing.
            for statement in split_statements(open(path, encoding="utf-8").read(), database):
                try:
                    backend.execute(statement)
                except Exception as error:  # noqa: BLE001
                    raise CheckFailed(f"{os.path.basename(path)} not idempotent: {error}\n{statement}") from None
        print(f"[sqlcheck] ran {statements} migration statements (twice: idempotent)", flush=True)
        # No background merge may collapse versions before the first read: FINAL must do it.
        tables = {"usage": (USAGE_COLUMNS, USAGE_ROWS), "actions": (ACTION_COLUMNS, ACTION_ROWS),
                  "aggregator_progress": (PROGRESS_COLUMNS, PROGRESS_ROWS),
                  "aggregator_input_epochs": (EPOCH_COLUMNS, EPOCH_ROWS),
                  "invoices": (INVOICE_COLUMNS, INVOICE_ROWS)}
        for table in tables:
            backend.execute(f"SYSTEM STOP MERGES {database}.{table}")
        for table, (columns, rows) in tables.items():
            insert_rows(backend, database, table, columns, rows)
        parts = active_parts(backend, database)
        if parts != {table: len(rows) for table, (_, rows) in tables.items()}:
            raise CheckFailed(f"expected one active part per inserted row, found {parts}")
        print(f"[sqlcheck] inserted {len(USAGE_ROWS)} usage, {len(ACTION_ROWS)} actions, "
              f"{len(PROGRESS_ROWS)} aggregator_progress, {len(EPOCH_ROWS)} aggregator_input_epochs rows, one unmerged part each: {parts}", flush=True)
        check_rollup_backfill(backend, database, problems)
        check_all(backend, database, "unmerged:", problems, results)
        for table in tables:
            backend.execute(f"SYSTEM START MERGES {database}.{table}")
            backend.execute(f"OPTIMIZE TABLE {database}.{table} FINAL")
        print(f"[sqlcheck] after OPTIMIZE FINAL: active parts {active_parts(backend, database)}", flush=True)
        check_all(backend, database, "merged:", problems, results)
        print(f"[sqlcheck] compared {len(VIEW_COLUMNS)} views and {len(extra_checks(database))} table "
              f"reads, before and after OPTIMIZE FINAL", flush=True)
        if args.docs:
            blocks = docs_sql_blocks(args.docs)
            for name, query in (("one account", BILLING_ONE_ACCOUNT), ("one workspace", BILLING_ONE_WORKSPACE),
                                ("one workspace in two halves", BILLING_ONE_WORKSPACE_HALVES)):
                text = query.format(db="agentmeter").strip()
                if not any(block.startswith(text) for block in blocks):
                    problems.append(f"{args.docs} no longer has the billing query ({name}) this script "
                                    f"checks; update BILLING_* here:\n{text}")
            for index, block in enumerate(blocks, 1):
                sql = use_database(block, database)
                try:
                    names, types, rows = backend.select(sql)
                except Exception as error:  # noqa: BLE001
                    problems.append(f"{args.docs} example {index} failed: {error}\n{block}")
                    continue
                floats = [f"{n} {t}" for n, t in zip(names, types) if "Float" in t]
                if floats:
                    problems.append(f"{args.docs} example {index} returns float columns {floats}\n{block}")
                if not rows:
                    problems.append(f"{args.docs} example {index} returns no row on the test data\n{block}")
                results[f"docs example {index}"] = {
                    "columns": [f"{n} {t}" for n, t in zip(names, types)],
                    "rows": canonical_rows(rows, types)}
            print(f"[sqlcheck] ran {len(blocks)} example queries of {args.docs}", flush=True)
    except CheckFailed as error:
        problems.append(str(error))
    finally:
        if created and not args.keep:
            try:
                backend.execute(f"DROP DATABASE IF EXISTS {database}")
            except Exception as error:  # noqa: BLE001
                problems.append(f"cannot drop database {database}: {error}")
        backend.close()
    if args.dump:
        with open(args.dump, "w", encoding="utf-8") as out:
            json.dump({"version_independent_results": results}, out, indent=1, sort_keys=True)
            out.write("\n")
    if problems:
        print(f"[sqlcheck] FAILED on {backend.label} (ClickHouse {version}):", file=sys.stderr)
        for problem in problems:
            print("  - " + problem.replace("\n", "\n    "), file=sys.stderr)
        return 1
    print(f"[sqlcheck] OK: DDL, {len(VIEW_COLUMNS)} views and table reads match on ClickHouse {version} "
          f"({backend.label})", flush=True)
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--migrations", default=DEFAULT_MIGRATIONS,
                        help="directory of NNNN_*.sql migration files (default: the repo's)")
    parser.add_argument("--http", metavar="URL",
                        help="check a ClickHouse server over HTTP (e.g. http://127.0.0.1:8123) instead of chdb")
    parser.add_argument("--database", help="database to create and drop (default agentmeter_sqlcheck_<pid>)")
    parser.add_argument("--docs", metavar="FILE", help="also run every ```sql block of this file (docs/sql.md)")
    parser.add_argument("--dump", metavar="FILE", help="write the canonical results as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the test database (for debugging)")
    args = parser.parse_args()
    if args.database and not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", args.database):
        parser.error("--database must be letters, digits and '_'")
    try:
        sys.exit(run(args))
    except Exception as error:  # noqa: BLE001 - report, do not dump a traceback at users
        print(f"[sqlcheck] FAILED: {type(error).__name__}: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
