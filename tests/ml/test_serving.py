"""The deployed model as the pipeline sees it: alias followed, file fetched once."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.ml import serving
from pipeline.ml.data import CandidateDataset
from pipeline.ml.model import ModelConfig, RealBogusNet, seed_everything
from pipeline.ml.registry import ModelRegistry
from pipeline.ml.serving import deployed_model, forget_served_models
from pipeline.ml.train import TrainConfig, TrainedModel, load_model


def _model(seed: int) -> TrainedModel:
    seed_everything(seed)
    config = TrainConfig(model=ModelConfig(width=4, dense=8))
    return TrainedModel(RealBogusNet(config.model).eval(), 1.0, config, [], 0, "toy")


def _test_set(n: int = 12) -> CandidateDataset:
    rng = np.random.default_rng(0)
    return CandidateDataset(
        triplets=rng.normal(size=(n, 4, 63, 63)).astype(np.float32),
        label=(np.arange(n) % 2).astype(np.int8),
        kind_code=np.where(np.arange(n) % 2, 0, 6).astype(np.int8),
        snr=np.full(n, 9.0, np.float32),
        injected_snr=np.full(n, np.nan, np.float32),
        image=np.full(n, "toy", dtype="U64"),
        split=np.full(n, "test", dtype="U10"),
    )


@pytest.fixture(autouse=True)
def _fresh_cache():
    forget_served_models()
    yield
    forget_served_models()


def test_no_tracking_file_means_no_model_and_creates_nothing(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert deployed_model(uri, cache_dir=tmp_path / "models") is None
    assert not (tmp_path / "mlflow.db").exists()


def test_follows_the_alias_and_fetches_each_version_once(tmp_path, monkeypatch) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    registry = ModelRegistry(uri)
    assert deployed_model(uri, cache_dir=tmp_path / "models") is None  # store, no version
    first, second = _model(1), _model(2)
    v1 = registry.log_model(first, score_reference=[5, 0, 0, 0, 0, 0, 0, 0, 0, 1])
    v2 = registry.log_model(second)
    test = _test_set()
    registry.deploy(v1, "production", test, force=True)

    fetched = []
    original = serving._fetch
    monkeypatch.setattr(serving, "_fetch", lambda *a: fetched.append(a[2]) or original(*a))
    served = deployed_model(uri, cache_dir=tmp_path / "models")
    assert served.version == 1 and served.score_reference == (5, 0, 0, 0, 0, 0, 0, 0, 0, 1)
    np.testing.assert_allclose(
        load_model(served.path).predict_proba(test.triplets),
        first.predict_proba(test.triplets),
        rtol=1e-6,
    )
    assert deployed_model(uri, cache_dir=tmp_path / "models").path == served.path
    registry.deploy(v2, "production", test, force=True)  # no restart needed
    assert deployed_model(uri, cache_dir=tmp_path / "models").version == 2
    assert deployed_model(uri, cache_dir=tmp_path / "models").score_reference is None
    registry.rollback("production")
    assert deployed_model(uri, cache_dir=tmp_path / "models").version == 1
    assert fetched == [1, 2]  # each version's file looked up once per process
    assert deployed_model(uri, "staging", cache_dir=tmp_path / "models") is None
