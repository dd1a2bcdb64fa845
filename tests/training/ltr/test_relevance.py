"""Value-graded relevance: levels by quantile, gains proportional to value, the same labels after
a round trip through the metadata, and group weights that turn NDCG lambdas into DCG ones."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tests.support.ltr import toy_config, toy_split
from training.config import ConfigError
from training.ltr.config import LtrConfig, ValueConfig
from training.ltr.lambdamart import group_weights
from training.ltr.relevance import Relevance, ideal_dcg


def value_config(levels: int = 4, scale: float = 1.0) -> LtrConfig:
    return toy_config(Path("unused")).model_copy(
        update={"value": ValueConfig(levels=levels, scale=scale)}
    )


def test_plain_grades_are_the_labels() -> None:
    split = toy_split(30)
    rel = Relevance.fit(toy_config(Path("unused")), split)
    assert rel.gains == [0.0, 1.0, 2.0, 3.0]
    assert np.array_equal(rel.labels(split), split.grades)


def test_purchases_are_split_into_value_levels_with_proportional_gains() -> None:
    split = toy_split(200)
    cfg = value_config(levels=4, scale=2.0)
    rel = Relevance.fit(cfg, split)
    labels = rel.labels(split)
    bought = split.labels["purchase"] > 0
    assert set(labels[~bought]) <= {0, 1, 2} and set(labels[bought]) == {4, 5, 6, 7}
    counts = np.bincount(labels[bought] - 4)
    assert counts.max() - counts.min() <= 1  # quantile levels: equally full
    price = split.env["price"]
    means = [price[bought][labels[bought] == lv].mean() for lv in range(4, 8)]
    gains = np.asarray(rel.gains[4:])
    np.testing.assert_allclose(gains, 2.0 * 3.0 * np.asarray(means) / price[bought].mean())
    # the same item value always lands in the same level, higher value in a higher level
    assert np.all(np.diff(gains) > 0)
    assert rel.base_gains == [0.0, 1.0, 2.0, 3.0]


def test_the_metadata_round_trip_labels_a_split_identically() -> None:
    train, test = toy_split(200, seed=1), toy_split(80, seed=2)
    rel = Relevance.fit(value_config(levels=5), train)
    saved = json.loads(json.dumps(rel.to_json()))
    back = Relevance.from_metadata({"impression": 0, "click": 1, "cart": 2, "purchase": 3},
                                   saved["label_gain"], saved)  # fmt: skip
    assert back == rel
    assert np.array_equal(back.labels(test), rel.labels(test))


def test_too_many_levels_is_refused() -> None:
    with pytest.raises(ConfigError, match="value.levels: labels would reach 31"):
        Relevance.fit(value_config(levels=28), toy_split(400))
    few = replace(toy_split(2), labels={**toy_split(2).labels, "purchase": np.zeros(40)})
    with pytest.raises(ConfigError, match="0 train rows with purchase"):
        Relevance.fit(value_config(), few)


def test_ideal_dcg_and_group_weights() -> None:
    gains = np.array([0.0, 3.0, 1.0, 0.0, 0.0, 10.0, 1.0])
    sizes = np.array([3, 2, 2])
    want = [3.0 + 1.0 / np.log2(3), 0.0, 10.0 + 1.0 / np.log2(3)]
    np.testing.assert_allclose(ideal_dcg(gains, sizes, 30), want)
    np.testing.assert_allclose(ideal_dcg(gains, sizes, 1), [3.0, 0.0, 10.0])
    split = replace(toy_split(3, 3), grades=np.array([0, 3, 1, 0, 0, 0, 0, 2, 1], np.int32),
                    sizes=np.array([3, 3, 3]))  # fmt: skip
    w = group_weights(split, [0.0, 1.0, 2.0, 3.0], 30)
    assert w.mean() == pytest.approx(1.0)
    assert w[0] == w[1] == w[2] and w[3] == 0.0 and w[0] > w[6] > 0
