"""The printed table, the targets, and the JSON files under bench/results/."""

import json
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# The targets for this 2-core machine: (name, section, key, comparison, bound). Issue 5's, with
# issue 15's where it restated them (end to end >= 65/s with refunds, Stripe and scale-out in).
TARGETS = (
    ("burst end-to-end orders/s", "burst", "e2e_per_s", ">=", 65),
    ("burst API create orders/s", "burst", "api_create_per_s", ">=", 400),
    ("steady p99 create->completed ms", "steady", "p99_ms", "<=", 500),
    ("SQL statements per order", None, "queries_per_order", "<=", 40),
    # Our own processes' CPU per completed order in the burst.
    ("burst product CPU ms per order", "burst", "product_cpu_ms_per_order", "<=", 25),
    ("growth e2e and p99 within 10 %", "growth", "within_10pct", "==", True),
    ("growth CPU and SQL/order within 10 %", "growth", "work_within_10pct", "==", True),
)


def targets(results: dict) -> list[dict]:
    out = []
    for name, section, key, op, bound in TARGETS:
        if section == "growth":
            value = (results.get("growth") or {}).get("comparison", {}).get(key)
        else:
            value = (results.get(section) or {}).get(key) if section else results.get(key)
        if value is None:
            met = None
        elif op == ">=":
            met = value >= bound
        elif op == "<=":
            met = value <= bound
        else:
            met = value == bound
        out.append({"target": name, "bound": f"{op} {bound}", "value": value, "met": met})
    return out


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(results: dict) -> str:
    lines = []
    m = results["machine"]
    end = results.get("machine_end", {}).get("loadavg")
    lines.append(
        f"machine: {m['cores']} cores ({m['cpu_model']}), loadavg {' '.join(map(str, m['loadavg']))}"
        + (f" at start, {' '.join(map(str, end))} at end" if end else "")
    )
    lines.append(f"stack: {results['stack']}")
    rows = [
        (
            "phase",
            "orders",
            "stored",
            "create/s",
            "e2e/s",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "SQL/order",
            "tasks/order",
            "CPU %",
            "not done",
        )
    ]
    for phase in ("burst", "steady", "growth"):
        r = results.get(phase)
        if not r:
            continue
        rows.append(
            (
                phase,
                _fmt(r["created"]),
                _fmt(r["stored_orders"]),
                _fmt(r.get("api_create_per_s")) if phase != "steady" else f"({_fmt(r['offered_per_s'])})",
                _fmt(r.get("e2e_per_s", r.get("achieved_per_s"))),
                _fmt(r["p50_ms"], 0),
                _fmt(r["p95_ms"], 0),
                _fmt(r["p99_ms"], 0),
                _fmt(r["queries_per_order"]),
                _fmt(r["tasks_per_order"], 2),
                _fmt(r["cpu_busy_pct"]),
                _fmt(r["not_completed"] + r["create_failures"]),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for index, row in enumerate(rows):
        lines.append("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    steady = results.get("steady")
    if steady:
        lines.append(
            f"steady: offered {_fmt(steady['offered_per_s'])}/s for {_fmt(steady['seconds'])} s,"
            f" achieved {_fmt(steady['achieved_per_s'])}/s,"
            f" send lag p99 {_fmt(steady['send_lag_p99_ms'])} ms,"
            f" kept up: {_fmt(steady['kept_up'])}"
        )
    growth = results.get("growth")
    if growth:
        c = growth["comparison"]
        if c.get("baseline"):
            lines.append(
                f"growth vs burst on {_fmt(c['baseline']['stored_orders'])} stored orders:"
                f" e2e {_fmt(c['e2e_change_pct'])} %, p99 {_fmt(c['p99_change_pct'])} %,"
                f" create {_fmt(c['api_create_change_pct'])} %,"
                f" CPU/order {_fmt(c['cpu_per_order_change_pct'])} %,"
                f" SQL/order {_fmt(c['queries_per_order_change_pct'])} %"
                + ("" if c["comparable"] else " (baseline table not small: not comparable)")
            )
        else:
            lines.append("growth: no burst baseline to compare with (run --mode all)")
    for phase in ("burst", "steady", "growth"):
        r = results.get(phase)
        if r:
            parts = ", ".join(f"{name} {value}" for name, value in r["cpu_ms_per_order"].items())
            outside = ", ".join(f"{name} {value}" for name, value in r["cpu_s_outside_stack"].items())
            lines.append(f"{phase} CPU ms/order: {parts}; CPU s outside the stack: {outside}")
            lines.append(
                f"{phase}: {m['cores']} cores / {_fmt(r['cpu_ms_per_order']['total'])} ms per order"
                f" = at most {_fmt(r['cpu_bound_per_s'])} orders/s"
                " if the stack had the machine alone (estimate)"
            )
    for phase in ("burst", "growth"):
        r = results.get(phase)
        if r and r.get("product_cpu_ms_per_order") is not None:
            parts = ", ".join(
                f"{name} {value}" for name, value in r["product_cpu_ms_per_order_parts"].items()
            )
            lines.append(
                f"{phase} product CPU: {_fmt(r['product_cpu_ms_per_order'])} ms/completed order ({parts});"
                f" counted: {r['product_cpu_note']}"
            )
    lines.extend(_ceiling_lines(results))
    if results.get("queries_per_order") is not None:
        lines.append(
            f"SQL statements per order: {_fmt(results['queries_per_order'])}"
            f" = {_fmt(results['app_queries_per_order'])} sent by the application"
            f" + {_fmt(results['fk_check_queries_per_order'])} foreign-key checks PostgreSQL runs at COMMIT"
        )
    if results.get("commits_per_order") is not None:
        lines.append(
            f"writes per order: {_fmt(results['commits_per_order'])} commits in the payments database;"
            f" WAL {_fmt(results['wal_records_per_order'])} records, {_fmt(results['wal_fpi_per_order'])}"
            f" full-page images, {_fmt(results['wal_bytes_per_order'])} bytes"
            " (whole server, the sandbox's ledger included)"
        )
    if results.get("tasks"):
        lines.append("tasks in the burst: " + ", ".join(f"{k} {v}" for k, v in results["tasks"].items()))
    lines.append("targets:")
    for t in results["targets"]:
        verdict = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        lines.append(f"  {t['target']:<37} {t['bound']:<8} {_fmt(t['value']):>10}  {verdict}")
    return "\n".join(lines)


def _ceiling_lines(results: dict) -> list[str]:
    c = results.get("ceiling")
    if not c:
        return []
    if not c.get("ran"):
        return [f"ceiling: not measured: {c.get('error')}"]
    chain = c["chain"]
    lines = [
        f"ceiling (bare chain, shared/bench/ceiling, {c['orders']} orders, {c['worker']},"
        f" {c['product_stack']}): {_fmt(c['orders_per_s'])} orders/s"
        f" ({_fmt(chain['tasks_per_s'])} tasks/s, machine CPU busy {_fmt(chain['cpu_busy_pct'])} %)"
    ]
    if c.get("api_create_per_s") is not None:
        lines.append(
            f"ceiling API create (bare DRF insert, {c['http_server']}): {_fmt(c['api_create_per_s'])}/s"
        )
    elif c.get("http_error"):
        lines.append(f"ceiling API create: not measured: {c['http_error']}")
    for phase in ("burst", "growth"):
        r = results.get(phase)
        if r and r.get("ratio_to_ceiling") is not None:
            line = (
                f"{phase} / ceiling: end to end {_fmt(r['e2e_per_s'])} / {_fmt(c['orders_per_s'])}"
                f" = {_fmt(100 * r['ratio_to_ceiling'])} %"
            )
            if r.get("api_create_ratio_to_ceiling") is not None:
                line += (
                    f"; API create {_fmt(r['api_create_per_s'])} / {_fmt(c['api_create_per_s'])}"
                    f" = {_fmt(100 * r['api_create_ratio_to_ceiling'])} %"
                )
            lines.append(line)
    return lines


def write(results: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(tz=UTC).strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(results, indent=2, default=str) + "\n"
    path = RESULTS / f"{stamp}.json"
    path.write_text(text)
    (RESULTS / "latest.json").write_text(text)
    return path
