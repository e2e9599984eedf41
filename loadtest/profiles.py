"""Where a server's time goes: py-spy's raw (collapsed) samples grouped into areas of the
service (the session, the transform, decoding, HTTP, ...). The benchmark driver records the
shares, its report tabulates them in ``AREAS`` order.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

#: (area, substrings of a frame) from the most specific; a sample goes to the first area one of
#: its frames matches, scanning from the innermost frame out.
AREAS = (
    ("ONNX Runtime session", ("onnxruntime",)),
    ("feature transform", ("transform.py", "keys.py")),
    ("request decoding", ("friendly.py", "v2_codec.py (decode", "_from_binary", "_input (",
                          "decode_infer_request", "_tensor_features", "_raw_features")),
    ("response encoding", ("json_response", "encode_score_response", "encode_infer_response")),
    ("metrics", ("metrics.py", "prometheus_client")),
    ("batcher", ("batcher.py",)),
    ("HTTP server and framework", ("uvicorn", "starlette", "fastapi", "httptools", "h11")),
    ("event loop", ("asyncio", "uvloop")),
)

#: Every area a sample can go to, in report order.
AREA_NAMES = (*(name for name, _ in AREAS), "other")


def summarise_profile(path: Path) -> dict[str, float]:
    """Share of samples (active threads only) per area; from py-spy's raw (collapsed) output."""
    counts: Counter[str] = Counter()
    if not path.is_file():
        return {}
    for line in path.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        if not stack or not number.isdigit():
            continue
        frames = reversed(stack.split(";"))  # innermost first
        area = next((name for frame in frames for name, keys in AREAS
                     if any(key in frame for key in keys)), "other")
        counts[area] += int(number)
    total = sum(counts.values())
    return {area: counts[area] / total for area in AREA_NAMES if counts[area]} if total else {}
