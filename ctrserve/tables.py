"""Plain-text tables and metric lines for the command line."""

from __future__ import annotations

import math


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:,.0f} {unit}" if unit == "B" else f"{count:,.2f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(str(cell).rjust(width) for cell, width in zip(row, widths, strict=True))
        for row in (header, *rows)
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def print_tables(tables: list[dict]) -> None:
    """Per-table scheme, size and bytes at inference, with totals; where a table stays full
    against its configured scheme, why (``full_because``)."""
    rows = []
    for table in tables:
        settings = ",".join(f"{k}={v}" for k, v in table["settings"].items())
        rows.append([table["table"], table["scheme"], settings or "-", f"{table['rows']:,}",
                     str(table["dim"]), f"{table['parameters']:,}", format_bytes(table["bytes"]),
                     format_bytes(table["full_bytes"]), f"{table['ratio']:.2f}x",
                     table.get("full_because") or ""])
    stored = sum(t["bytes"] for t in tables)
    full = sum(t["full_bytes"] for t in tables)
    rows.append(["total", "", "", f"{sum(t['rows'] for t in tables):,}", "",
                 f"{sum(t['parameters'] for t in tables):,}", format_bytes(stored),
                 format_bytes(full), f"{full / stored:.2f}x", ""])
    header = ["table", "scheme", "settings", "rows", "dim", "params", "bytes", "full bytes",
              "ratio", "full because"]
    print(text_table(header, rows))


def print_metrics(title: str, metrics: dict) -> None:
    """One line of metrics; one the labels leave undefined (None or NaN) reads, for example,
    "undefined (no positive labels)"."""
    def shown(name: str, digits: int) -> str:
        value = metrics[name]
        if value is None or math.isnan(value):
            return f"undefined ({metrics['undefined']})"
        return f"{value:.{digits}f}"

    print(f"{title}: AUC {shown('auc', 4)}  logloss {shown('logloss', 4)}  "
          f"NE {shown('ne', 4)}  calibration {shown('calibration', 3)}  "
          f"rows {metrics['rows']:,}")


def print_unseen(groups: list[dict]) -> None:
    """Rows by their number of values unseen in training: rows, mean prediction, and where
    labelled CTR, calibration and AUC ('-' where the group's labels leave them undefined)."""
    def shown(value: float | None, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    labeled = any("auc" in group for group in groups)
    header = ["unseen fields", "rows", "mean prediction"]
    header += ["CTR", "calibration", "AUC"] if labeled else []
    rows = []
    for group in groups:
        row = [str(group["unseen_fields"]), f"{group['rows']:,}",
               shown(group["mean_prediction"], 4)]
        if labeled:
            row += [shown(group["ctr"], 4), shown(group["calibration"], 3),
                    shown(group["auc"], 4)]
        rows.append(row)
    print("by the number of values unseen in training:")
    print(text_table(header, rows))
