"""Plain-text tables and metric lines for the command line."""

from __future__ import annotations


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
    """Per-table scheme, size and bytes at inference, with totals."""
    rows = []
    for table in tables:
        settings = ",".join(f"{k}={v}" for k, v in table["settings"].items())
        rows.append([table["table"], table["scheme"], settings or "-", f"{table['rows']:,}",
                     str(table["dim"]), f"{table['parameters']:,}", format_bytes(table["bytes"]),
                     format_bytes(table["full_bytes"]), f"{table['ratio']:.2f}x"])
    stored = sum(t["bytes"] for t in tables)
    full = sum(t["full_bytes"] for t in tables)
    rows.append(["total", "", "", f"{sum(t['rows'] for t in tables):,}", "",
                 f"{sum(t['parameters'] for t in tables):,}", format_bytes(stored),
                 format_bytes(full), f"{full / stored:.2f}x"])
    header = ["table", "scheme", "settings", "rows", "dim", "params", "bytes", "full bytes",
              "ratio"]
    print(text_table(header, rows))


def print_metrics(title: str, metrics: dict) -> None:
    print(f"{title}: AUC {metrics['auc']:.4f}  logloss {metrics['logloss']:.4f}  "
          f"NE {metrics['ne']:.4f}  calibration {metrics['calibration']:.3f}  "
          f"rows {metrics['rows']:,}")
