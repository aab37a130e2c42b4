"""Readable reports: dry run, validation, move summary (plain text tables a person reads)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from orgmover.pgcopy import _fmt_bytes as fmt_bytes
from orgmover.plan import Plan


def table(headers: list[str], rows: list[list[Any]], align: str | None = None) -> str:
    cells = [[str(h) for h in headers]] + [["" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = align or "l" * len(headers)

    def fmt(r):
        return "  ".join(c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(r, widths, align)).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(cells[0]), sep] + [fmt(r) for r in cells[1:]])


def _secs(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.2f}s" if s < 120 else f"{s / 60:.1f}min"


def dry_run_report(org_id: int, source: str, target: str, plan: Plan | None, problems: list[str], notes: list[str],
                   bytes_per_second: float) -> str:
    out = [f"DRY RUN: move organization {org_id} from {source} to {target}",
           "Nothing was changed on any cell, in the Topology Service or in the mover's state.", ""]
    if problems:
        out += ["ERRORS (the move would be refused):"] + [f"  - {p}" for p in problems] + [""]
    else:
        out += ["Preflight: all checks passed.", ""]
    if notes:
        out += ["Notes:"] + [f"  - {n}" for n in notes] + [""]
    if plan is None:
        out.append("No plan: the tables could not be classified or the cells could not be read.")
        return "\n".join(out) + "\n"
    rows, total_rows, total_bytes = [], 0, 0
    for tp in sorted(plan.tables.values(), key=lambda t: (t.strategy != "org", t.strategy, t.table)):
        if tp.strategy == "skip":
            rows.append([tp.table, "skip", "-", "-", tp.how])
            continue
        if tp.strategy == "org":
            total_rows += tp.est_rows
            total_bytes += tp.est_bytes
        rows.append([tp.table, tp.strategy, f"{tp.est_rows:,}", fmt_bytes(tp.est_bytes),
                     tp.how + (" [inferred]" if tp.inferred else "")])
    out.append(table(["table", "strategy", "org rows", "bytes", "how rows are selected"], rows, "llrrl"))
    out.append("")
    out.append(f"Organization rows: {total_rows:,} in {len(plan.of('org'))} tables, {fmt_bytes(total_bytes)}")
    if bytes_per_second > 0:
        # reading the sample measured the source's streaming rate; writing on the target is assumed as fast,
        # and the checksum pass reads both cells once more.
        copy_s = total_bytes / bytes_per_second
        out.append(f"Measured source streaming rate: {fmt_bytes(bytes_per_second)}/s (sample of the largest table)")
        out.append(f"Estimated copy time: {_secs(copy_s)}; estimated write window (copy + validation): {_secs(copy_s * 2)}")
    else:
        out.append("Estimated copy time: no rows to copy")
    if plan.warnings:
        out += ["", "Warnings:"] + [f"  - {w}" for w in plan.warnings]
    return "\n".join(out) + "\n"


def validation_report(m: dict, tables: list[dict]) -> str:
    out = [f"VALIDATION of migration #{m['id']}: organization {m['organization_id']} "
           f"{m['source_cell']} -> {m['target_cell']}", ""]
    rows = []
    for t in tables:
        d = t.get("validation_detail") or {}
        enc = d.get("encrypted")
        rows.append([t["table_name"], t["strategy"], t["source_rows"], t["target_rows"],
                     "yes" if t["source_checksum"] is not None and t["source_checksum"] == t["target_checksum"] else "NO",
                     "-" if not enc else ("ok" if not (enc["mismatched"] or enc["missing_on_target"] or enc["extra_on_target"])
                                          else f"{enc['mismatched']} differ"),
                     t["validation_state"].upper() if t["validation_state"] != "passed" else "ok"])
    out.append(table(["table", "strategy", "source rows", "target rows", "checksum equal", "secrets", "result"], rows,
                     "llrrlll"))
    bad = [t for t in tables if t["validation_state"] != "passed"]
    inc = [(t.get("validation_detail") or {}).get("incremental") for t in tables]
    inc = [i for i in inc if i]
    if inc:
        out += ["", f"{len(inc)} tables validated against the baseline taken after the pre-copy ({inc[0]['baseline_at']}): "
                    f"their chunks were equal then, {sum(i['written_rows_compared'] for i in inc):,} rows written since on "
                    f"either cell (change capture) compared row by row now; row counts are the baseline's."]
    out.append("")
    if not bad:
        out.append(f"RESULT: PASSED: {len(tables)} tables identical on both cells.")
    else:
        out.append(f"RESULT: FAILED: {len(bad)} of {len(tables)} tables differ or were not validated.")
        for t in bad:
            d = (t.get("validation_detail") or {}).get("diff")
            if d:
                s = d["samples"]
                out.append(f"  {t['table_name']}: matching {d['matching']}, mismatched {d['mismatched']} "
                           f"(keys {', '.join(s['mismatched']) or '-'}), missing on target {d['missing_on_target']} "
                           f"(keys {', '.join(s['missing_on_target']) or '-'}), extra on target {d['extra_on_target']} "
                           f"(keys {', '.join(s['extra_on_target']) or '-'})")
                ch = d.get("chunks")
                if ch and ch["total"] > 1:
                    out.append(f"    chunks: {ch['differ']} of {ch['total']} differ ({'; '.join(ch['differing_ranges'])})")
            w = (t.get("validation_detail") or {}).get("written")
            if w and (w["mismatched"] or w["missing_on_target"] or w["extra_on_target"]):
                s = w["samples"]
                out.append(f"  {t['table_name']}: rows written since the baseline: mismatched {w['mismatched']} "
                           f"(keys {', '.join(s['mismatched']) or '-'}), missing on target {w['missing_on_target']} "
                           f"(keys {', '.join(s['missing_on_target']) or '-'}), extra on target {w['extra_on_target']} "
                           f"(keys {', '.join(s['extra_on_target']) or '-'})")
            enc = (t.get("validation_detail") or {}).get("encrypted")
            if enc and (enc["mismatched"] or enc["missing_on_target"] or enc["extra_on_target"]):
                out.append(f"  {t['table_name']}: decrypted secrets differ for keys {', '.join(enc['samples']['mismatched'])}")
    return "\n".join(out) + "\n"


def summary(m: dict, tables: list[dict], phases: list[dict], route: dict | None) -> tuple[dict, str]:
    org_tables = [t for t in tables if t["strategy"] == "org"]
    rows = sum(t["rows_copied"] or 0 for t in org_tables)
    nbytes = sum(t["bytes_copied"] or 0 for t in org_tables)
    maint = None
    if m["maintenance_started_at"] and m["maintenance_ended_at"]:
        maint = (m["maintenance_ended_at"] - m["maintenance_started_at"]).total_seconds()
    val = m.get("validation") or {}
    data = {
        "migration_id": m["id"], "organization_id": m["organization_id"], "source_cell": m["source_cell"],
        "target_cell": m["target_cell"], "state": m["state"], "tables": len(org_tables),
        "shared_tables": len([t for t in tables if t["strategy"] == "shared"]), "rows": rows, "bytes": nbytes,
        "phases": {p["phase"]: round(float(p["seconds"]), 3) for p in phases},
        "maintenance_seconds": maint, "validation_ok": val.get("ok"), "validation_report": val.get("report"),
        "route": route,
    }
    lines = [
        f"MOVE SUMMARY: migration #{m['id']}: organization {m['organization_id']} {m['source_cell']} -> {m['target_cell']}",
        f"state:            {m['state']}",
        f"tables copied:    {len(org_tables)} org tables + {data['shared_tables']} shared",
        f"rows copied:      {rows:,}",
        f"bytes copied:     {fmt_bytes(nbytes)}",
        f"in maintenance:   {_secs(maint)} (writes blocked)",
        f"validation:       {'PASSED' if val.get('ok') else 'FAILED' if val else 'not run'}"
        + (f" ({val.get('report')})" if val.get("report") else ""),
    ]
    if route:
        lines.append(f"route now:        cell {route['cell']} (version {route['version']}, "
                     f"maintenance {'on' if route['maintenance'] else 'off'})")
    lines += ["", "phases:", table(["phase", "state", "duration"],
                                   [[p["phase"], p["state"], _secs(float(p["seconds"]))] for p in phases], "llr")]
    top = sorted(org_tables, key=lambda t: t["rows_copied"] or 0, reverse=True)[:10]
    lines += ["", "largest tables:", table(["table", "rows", "bytes", "copy time"],
                                           [[t["table_name"], f"{t['rows_copied']:,}", fmt_bytes(t["bytes_copied"] or 0),
                                             _secs(t["copy_seconds"])] for t in top], "lrrr")]
    if m.get("error"):
        lines += ["", f"error: {m['error']}"]
    return data, "\n".join(lines) + "\n"


def now() -> str:
    return datetime.now().isoformat(timespec="seconds")
