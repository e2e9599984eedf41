"""Values training never saw: the missing and out-of-vocabulary rows learn in every scheme when
training hides values now and then, and rows whose every value is unseen then score near the
base rate instead of far off it."""

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tqdm import tqdm

from ctrserve.models.data import DataConfig
from ctrserve.models.dlrm import ModelConfig, build_model
from ctrserve.models.embeddings.scheme_settings import SETTINGS, EmbeddingConfig
from ctrserve.models.evaluate import evaluate
from ctrserve.models.generate import CriteoLikeConfig, write_criteo_like
from ctrserve.models.schemes import SCHEMES
from ctrserve.models.train import fit
from ctrserve.models.trainer import TrainConfig, Trainer, hide_values
from ctrserve.models.transform import MISSING_ID, OOV_ID, TransformConfig, fit_transform

CARDINALITIES = (50, 400, 3000, 7, 20_000)


@pytest.fixture(scope="module")
def known_only(tmp_path_factory) -> DataConfig:
    """Generated rows with no missing value; the vocabulary keeps every training value, so
    training meets neither the missing nor the out-of-vocabulary id unless it hides values."""
    out = tmp_path_factory.mktemp("known")
    write_criteo_like(CriteoLikeConfig(n_rows=20_000, cardinalities=CARDINALITIES, seed=3,
                                       target_ctr=0.05, categorical_missing_rate=0.0),
                      out, progress=False)
    return DataConfig(path=str(out / "data.parquet"), format="parquet",
                      spec_path=str(out / "spec.json"), split="random")


def test_hidden_values_are_missing_or_unseen_in_rows_of_every_count():
    sparse = np.full((20_000, 10), 7, dtype=np.int64)
    unseen = np.array([OOV_ID] * 9 + [MISSING_ID])  # the last column hashed: no OOV id
    rng = np.random.default_rng(0)
    assert np.array_equal(hide_values(sparse, 0.0, unseen, rng), sparse)
    hidden = hide_values(sparse, 0.2, unseen, rng)
    changed = hidden != 7
    assert set(np.unique(hidden[changed])) == {MISSING_ID, OOV_ID}
    assert not (hidden[:, -1] == OOV_ID).any()
    assert (changed.any(axis=1).mean()) == pytest.approx(0.2 * 0.9, abs=0.02)
    assert changed.mean() == pytest.approx(0.2 / 2, abs=0.01)
    per_row = changed.sum(axis=1)
    assert set(range(1, 11)) <= set(per_row.tolist())  # one to every value of a row hidden
    assert (hidden[changed] == OOV_ID).mean() == pytest.approx(0.45, abs=0.03)


def unknown_rows(model) -> list[torch.Tensor]:
    """Each table's vectors for the missing and the out-of-vocabulary id."""
    with torch.no_grad():
        return [table(torch.tensor([MISSING_ID, OOV_ID])).clone()
                for table in model.embedding_tables()]


@pytest.mark.parametrize("name", list(SCHEMES))
def test_the_unknown_rows_learn_in_every_scheme(known_only, name):
    transform = fit_transform(known_only.spec(), known_only.batches("train"), TransformConfig())
    chunk = transform.transform(next(known_only.batches("train", batch_rows=4000)))
    assert not np.isin(chunk.sparse, (MISSING_ID, OOV_ID)).any()
    settings = SETTINGS[name](min_rows=0)
    config = ModelConfig(dim=8, bottom=(16,), top=(16,),
                         embeddings=EmbeddingConfig(default=settings).for_training())
    torch.manual_seed(0)
    model = build_model(transform.n_dense, transform.table_sizes,
                        list(transform.spec.categorical_names), config)
    before = unknown_rows(model)
    trainer = Trainer(model, TrainConfig(batch_size=256, progress=False), transform.unseen_ids)
    trainer.epoch([chunk], tqdm(disable=True))
    moved = [not torch.equal(a, b) for a, b in zip(before, unknown_rows(model), strict=True)]
    assert all(moved), moved


def test_without_hidden_values_full_tables_keep_their_unknown_rows_at_random(known_only):
    transform = fit_transform(known_only.spec(), known_only.batches("train"), TransformConfig())
    chunk = transform.transform(next(known_only.batches("train", batch_rows=4000)))
    torch.manual_seed(0)
    model = build_model(transform.n_dense, transform.table_sizes,
                        list(transform.spec.categorical_names),
                        ModelConfig(dim=8, bottom=(16,), top=(16,)))
    before = unknown_rows(model)
    trainer = Trainer(model, TrainConfig(batch_size=256, unknown_rate=0.0, progress=False),
                      transform.unseen_ids)
    trainer.epoch([chunk], tqdm(disable=True))
    assert all(torch.equal(a, b) for a, b in zip(before, unknown_rows(model), strict=True))


def test_rows_of_unseen_values_score_near_the_base_rate(known_only, tmp_path):
    test_rows = pq.read_table(known_only.path).slice(0, 4000)
    unseen = test_rows
    for index, name in enumerate(test_rows.column_names):
        if name.startswith("C"):  # values far above every table's ids: never seen
            unseen = unseen.set_column(index, name, pa.array(np.arange(4000) + 10**9))
    path = tmp_path / "unseen.parquet"
    pq.write_table(unseen, path)
    scored = replace(known_only, test_path=str(path), fractions=(0.9, 0.1))
    model = ModelConfig(dim=8, bottom=(32,), top=(32,))
    ratios = {}
    for rate in (0.1, 0.0):
        train = TrainConfig(epochs=3, batch_size=256, unknown_rate=rate, progress=False)
        result = fit(known_only, model, train, TransformConfig(), str(tmp_path / f"r{rate}"))
        (group,) = evaluate(tmp_path / f"r{rate}", scored)["by_unseen_fields"]
        assert group["unseen_fields"] == len(CARDINALITIES) and group["rows"] == 4000
        ratios[rate] = group["mean_prediction"] / result["metrics"]["test"]["ctr"]
    assert 0.5 < ratios[0.1] < 2, ratios
    assert abs(np.log(ratios[0.0])) > 2 * abs(np.log(ratios[0.1])), ratios
