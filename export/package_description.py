"""``ctrserve inspect``: a package's tables, inputs and outputs, parity and file integrity."""

from __future__ import annotations

from pathlib import Path

from .package import PackageError, file_problems, read_manifest


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    raise AssertionError


def describe(directory: str | Path) -> tuple[str, bool]:
    """A human-readable report and whether the package is intact."""
    directory = Path(directory)
    try:
        manifest = read_manifest(directory)
    except PackageError as error:
        return f"damaged: {error}", False
    problems = file_problems(directory, manifest)
    lines = [f"{manifest['name']} version {manifest['version']} "
             f"(created {manifest.get('created')})"]
    lines.append("inputs:  " + ", ".join(
        f"{io['name']} {io['dtype']}{io['shape']}" for io in manifest["inputs"]))
    lines.append("outputs: " + ", ".join(
        f"{io['name']} {io['dtype']}{io['shape']}" for io in manifest["outputs"]))
    lines.append(f"{'table':<12} {'scheme':<7} {'op':<16} {'rows':>14} {'dim':>4} "
                 f"{'bytes':>12} {'full':>12} {'ratio':>8}")
    for table in manifest["tables"]:
        lines.append(
            f"{table['table']:<12} {table['scheme']:<7} {table['op']:<16} {table['rows']:>14,} "
            f"{table['dim']:>4} {_size(table['bytes']):>12} {_size(table['full_bytes']):>12} "
            f"{table['ratio']:>7.2f}x"
        )
    sizes = manifest.get("bytes", {})
    if sizes:
        lines.append(
            f"embeddings {_size(sizes['embeddings'])} of {_size(sizes['full_embeddings'])} "
            f"full ({sizes['full_embeddings'] / sizes['embeddings']:.2f}x); "
            f"dense layers {_size(sizes['dense'])}"
        )
    parity = manifest.get("parity", {})
    if parity:
        lines.append(f"parity with torch: max |diff| {parity['max_abs_diff']:.3g} over "
                     f"{parity['rows']:,} rows (tolerance {parity['tolerance']:g})")
    test = manifest.get("training", {}).get("metrics", {}).get("test") or {}
    if test:
        lines.append(f"test AUC {test['auc']:.4f}, logloss {test['logloss']:.4f}, "
                     f"NE {test['ne']:.4f} ({test['rows']:,} rows)")
    if problems:
        lines.extend(f"DAMAGED: {problem}" for problem in problems)
    else:
        lines.append(f"files: {len(manifest['files'])} intact (sizes and sha256 match)")
    return "\n".join(lines), not problems
