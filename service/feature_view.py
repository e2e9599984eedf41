"""Feature views: which raw columns of a model come from which entity, for ranking requests.

A model's view is ``REPO/NAME/feature_view.json`` (it applies to every version):

    {
      "entities": {
        "user": {"key_column": "user_id", "columns": ["age_bucket", "gender"],
                 "source": "users.parquet"},
        "item": {"key_column": "item_id", "columns": ["genre", "year", "price"],
                 "source": "items.parquet"}
      },
      "context": ["hour", "device"],
      "defaults": {"gender": "unknown"}
    }

An entity's ``columns`` are read from its stored features (one hash per entity id); its
``key_column``, when the model uses it, is the id itself. ``context`` columns come with the
request. ``defaults`` fill a field that is absent, or every field of an entity that is not
stored; a column without a default is then a missing value, as in training. ``source`` (relative
to the view file) is the table the embedded store loads when no Redis is configured.

A ranking request names request-level entities, context, and candidates, each candidate naming
its own entities and optionally its own context values:

    {"entities": {"user": "u42"}, "context": {"hour": 14},
     "candidates": [{"item": "i7"}, {"item": "i9", "hour": 15}]}

An entity id is a string of at most ``max_value_bytes`` UTF-8 bytes, or an integer; context
values follow the friendly API's rules for their columns (``friendly.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ctrserve.models.keys import shown
from ctrserve.models.transform import FeatureTransform

from .errors import BadRequest, PayloadTooLarge
from .raw_values import TextLimit

VIEW_FILE = "feature_view.json"


@dataclass(frozen=True)
class Entity:
    name: str
    key_column: str | None
    columns: tuple[str, ...]
    source: Path | None = None


@dataclass(frozen=True)
class FeatureView:
    entities: dict[str, Entity]
    context: tuple[str, ...] = ()
    defaults: dict[str, object] = field(default_factory=dict)


def load_view(model_directory: Path, transform: FeatureTransform) -> FeatureView | None:
    """The model's view, checked against the package's features; None when it has none."""
    path = Path(model_directory) / VIEW_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        entities = {
            name: Entity(name, spec.get("key_column"), tuple(spec.get("columns", ())),
                         path.parent / spec["source"] if spec.get("source") else None)
            for name, spec in data["entities"].items()
        }
        view = FeatureView(entities, tuple(data.get("context", ())),
                           dict(data.get("defaults", {})))
    except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as error:
        raise ValueError(f"{path}: not a valid feature view ({error!r})") from None
    known = {e.name for e in transform.dense} | {e.column.name for e in transform.categorical}
    named = [c for e in view.entities.values() for c in e.columns] + list(view.context)
    unknown = sorted(set(named) - known)
    if unknown:
        raise ValueError(f"{path}: columns the model does not have: {', '.join(unknown)}")
    return view


def entity_keys(payload: object, view: FeatureView, max_rows: int,
                max_value_bytes: int) -> tuple[dict[str, str], list[dict], dict]:
    """Checks a ranking request's shape and entity ids (its context values are checked as the
    friendly API's are); returns its request-level entity ids, candidates and context."""
    if not isinstance(payload, dict) or not isinstance(payload.get("candidates"), list):
        raise BadRequest('a ranking request is an object with "candidates" (a list of objects), '
                         'and optionally "entities" and "context" (objects)')
    entities = payload.get("entities") or {}
    context = payload.get("context") or {}
    candidates = payload["candidates"]
    if not isinstance(entities, dict) or not isinstance(context, dict):
        raise BadRequest('"entities" and "context" must be objects')
    if len(candidates) > max_rows:
        raise PayloadTooLarge(f"{len(candidates):,} candidates; the limit is {max_rows:,}")
    id_limit = TextLimit.of("string", max_value_bytes)
    for name, key in entities.items():
        _check_entity(name, key, view, "entities", id_limit)
    _check_context(context, view, "context")
    for index, candidate in enumerate(candidates):
        if not isinstance(candidate, dict):
            raise BadRequest(f"candidate {index}: expected an object")
        for name, value in candidate.items():
            if name in view.entities:
                _check_entity(name, value, view, f"candidate {index}", id_limit)
            else:
                _check_context({name: value}, view, f"candidate {index}")
    return entities, candidates, context


def _check_entity(name: str, key: object, view: FeatureView, where: str,
                  id_limit: TextLimit) -> None:
    if name not in view.entities:
        raise BadRequest(f"{where}: unknown entity {shown(name)} (the view has "
                         f"{', '.join(sorted(view.entities))})")
    if not isinstance(key, (str, int)) or isinstance(key, bool):
        raise BadRequest(f"{where}: the {name} id must be a string or an integer, got "
                         f"{shown(key)}")
    if isinstance(key, str) and not id_limit.fits(key):
        raise id_limit.error(f"{where}: the {name} id", shown(key))


def _check_context(values: dict, view: FeatureView, where: str) -> None:
    for name in values:
        if name not in view.context:
            raise BadRequest(f"{where}: {shown(name)} is neither an entity nor a context "
                             "column of the feature view")


def assemble_rows(view: FeatureView, entities: dict[str, str], candidates: list[dict],
                  context: dict, stored: dict[tuple[str, str], dict | None]) -> list[dict]:
    """One raw row per candidate: its entities' stored features (or defaults), the key
    columns, the request's context and the candidate's own context values."""
    shared: dict = {}
    for name, key in entities.items():
        shared.update(_entity_row(view.entities[name], str(key), stored, view.defaults))
    shared.update(context)
    rows = []
    for candidate in candidates:
        row = dict(shared)
        for name, value in candidate.items():
            if name in view.entities:
                row.update(_entity_row(view.entities[name], str(value), stored, view.defaults))
            else:
                row[name] = value
        rows.append(row)
    return rows


def _entity_row(entity: Entity, key: str, stored: dict[tuple[str, str], dict | None],
                defaults: dict) -> dict:
    values = stored.get((entity.name, key)) or {}
    row = {c: values.get(c, defaults.get(c)) for c in entity.columns}
    if entity.key_column:
        row[entity.key_column] = key
    return row
