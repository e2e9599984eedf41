"""Ranking requests: entity ids in, one probability per candidate out, features joined from the
online store (see ``feature_view.py`` and ``feature_store.py``), scored through the data plane."""

from __future__ import annotations

import logging

import numpy as np

from . import metrics
from .dataplane import DataPlane
from .errors import NotFound, Unavailable
from .feature_store import EmbeddedFeatureStore
from .feature_view import FeatureView, assemble_rows, entity_keys, load_view
from .friendly import features_from_columns, parse_json
from .raw_values import json_values_bound
from .repository import ServedModel

log = logging.getLogger("ctrserve.ranking")


class Ranker:
    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane
        self.store = dataplane.store
        self._views: dict[tuple[str, int], FeatureView | str] = {}

    def view(self, served: ServedModel) -> FeatureView:
        """The served version's feature view (read once per version)."""
        runtime = served.runtime
        key = (runtime.name, runtime.version)
        if key not in self._views:
            try:
                loaded = load_view(runtime.package.directory.parent, runtime.transform)
                if loaded is not None and isinstance(self.store, EmbeddedFeatureStore):
                    self.store.add_view(loaded)
                self._views[key] = loaded or f"model {runtime.name!r} has no feature view"
            except (ValueError, OSError) as error:
                log.error("%s", error)
                self._views[key] = f"model {runtime.name!r}: {error}"
        view = self._views[key]
        if isinstance(view, str):
            raise (NotFound if "no feature view" in view else Unavailable)(view)
        return view

    async def rank(self, name: str, body: bytes) -> dict:
        served = self.dataplane.model(name)
        transform = served.runtime.transform
        settings = self.dataplane.settings
        payload = parse_json(body, json_values_bound(settings.max_request_rows,
                                                     len(transform.column_names)))
        view = self.view(served)
        entities, candidates, context = entity_keys(payload, view, settings.max_request_rows,
                                                    settings.max_value_bytes)
        keys = list(dict.fromkeys(
            [(e, str(k)) for e, k in entities.items()]
            + [(e, str(k)) for c in candidates for e, k in c.items() if e in view.entities]
        ))
        stored = await self.store.fetch(keys, view, transform)
        missing = [key for key in keys if stored.get(key) is None]
        for entity, _ in missing:
            metrics.MISSING_ENTITIES.labels(name, entity).inc()
        rows = assemble_rows(view, entities, candidates, context, stored)
        known = [e.name for e in transform.dense] + [e.column.name for e in transform.categorical]
        columns = {c: [row.get(c) for row in rows] for c in known}
        features = features_from_columns(columns, len(rows), transform,
                                         settings.max_value_bytes)
        served = self.dataplane.model(name)  # the store answered: score on the current version
        probabilities = (await self.dataplane.score(served, features) if rows
                         else np.zeros(0, np.float32))
        return {"model": name, "version": served.version, "probabilities": probabilities,
                "missing_entities": [f"{entity}:{key}" for entity, key in missing]}
