"""training.synthetic: determinism, funnel rates, sample-selection bias, table consistency."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from training.config import load_dataset_spec
from training.synthetic import (
    HISTORY_DAYS,
    ITEM_COLUMNS,
    TODAY_DAY,
    USER_COLUMNS,
    generate_ecommerce,
    generate_mmoe,
    main,
    split_census,
)

SPLITS = ("train", "valid", "test")


def impressions(d: Path, fmt: str = "parquet") -> pa.Table:
    read = pq.read_table if fmt == "parquet" else pacsv.read_csv
    return pa.concat_tables([read(d / f"{s}.{fmt}") for s in SPLITS])


@pytest.fixture(scope="module")
def imps(ecommerce_dir: Path) -> dict[str, np.ndarray]:
    t = impressions(ecommerce_dir)
    return {name: t.column(name).to_numpy() for name in t.column_names}


# --------------------------------------------------------------------------- ecommerce
def test_same_seed_same_data_other_seed_other_data(tmp_path: Path) -> None:
    a = generate_ecommerce(tmp_path / "a", 3000, seed=11)
    b = generate_ecommerce(tmp_path / "b", 3000, seed=11)
    c = generate_ecommerce(tmp_path / "c", 3000, seed=12)
    assert a == b and a["rates"] != c["rates"]
    for name in [f"{s}.parquet" for s in SPLITS] + ["users.parquet", "items.parquet"]:
        assert pq.read_table(tmp_path / "a" / name).equals(pq.read_table(tmp_path / "b" / name))
    ta, tc = impressions(tmp_path / "a"), impressions(tmp_path / "c")
    assert not np.array_equal(ta.column("click").to_numpy(), tc.column("click").to_numpy())


def test_csv_holds_the_same_rows_as_parquet(tmp_path: Path) -> None:
    assert main(["ecommerce", "--out", str(tmp_path / "c"), "--impressions", "2000",
                 "--seed", "5", "--format", "csv"]) == 0  # fmt: skip
    generate_ecommerce(tmp_path / "p", 2000, seed=5)
    c, p = impressions(tmp_path / "c", "csv"), impressions(tmp_path / "p")
    assert c.num_rows == p.num_rows == 2000
    for name in ("user_id", "item_id", "gender", "click", "purchase", "price", "true_cvr"):
        a, b = c.column(name).to_pylist(), p.column(name).to_pylist()
        assert a == pytest.approx(b) if isinstance(a[0], float) else a == b
    assert json.loads((tmp_path / "c" / "meta.json").read_text())["format"] == "csv"


def test_rates_in_range(ecommerce_dir: Path, imps: dict[str, np.ndarray]) -> None:
    meta = json.loads((ecommerce_dir / "meta.json").read_text())
    clicked = imps["click"] == 1
    ctr, cvr = clicked.mean(), imps["purchase"][clicked].mean()
    assert 0.03 <= ctr <= 0.08
    assert 0.05 <= cvr <= 0.15
    assert meta["rates"]["ctr"] == pytest.approx(ctr)
    assert meta["rates"]["cvr_after_click"] == pytest.approx(cvr)
    assert sum(meta["splits"].values()) == len(clicked) == 20_000
    # the truth is calibrated: labels agree with the true probabilities that drew them
    n = len(clicked)
    for label, truth in (("click", "true_ctr"), ("cf_purchase", "true_cvr")):
        p = imps[truth]
        se = np.sqrt(np.sum(p * (1 - p))) / n
        assert abs(imps[label].mean() - p.mean()) < 4 * se


def test_funnel_structure(imps: dict[str, np.ndarray]) -> None:
    click = imps["click"]
    np.testing.assert_array_equal(imps["purchase"], click * imps["cf_purchase"])
    for after_click in ("cart", "collect", "purchase"):
        assert not (imps[after_click] & (1 - click)).any()
    np.testing.assert_array_equal(imps["stay_seconds"] > 0, click == 1)
    # cf_purchase exists for unclicked impressions too: CVR on the entire space is measurable
    assert imps["cf_purchase"][click == 0].sum() > 100


def test_sample_selection_bias_is_real(imps: dict[str, np.ndarray]) -> None:
    """Conversion drivers are distributed differently among clicked impressions than among all."""
    clicked = imps["click"] == 1
    for driver, sign in (("quality", -1), ("true_cvr", -1)):
        x = imps[driver]
        diff = x[clicked].mean() - x.mean()
        se = x.std() / np.sqrt(clicked.sum())
        assert sign * diff / se > 5, (driver, diff, se)
    # the click and conversion drivers pull in opposite directions through quality
    assert np.corrcoef(imps["quality"], imps["true_ctr"])[0, 1] < -0.1
    assert np.corrcoef(imps["quality"], imps["true_cvr"])[0, 1] > 0.2


def test_selection_bias_knob_widens_the_gap_between_clicked_and_entire_space_cvr(
    tmp_path: Path,
) -> None:
    """Stronger clickbait: clicked impressions convert ever less than the impression space."""
    gaps, label_gaps = [], []
    for strength in (0.0, 1.0, 2.0):
        meta = generate_ecommerce(tmp_path / str(strength), 20_000, seed=3, selection_bias=strength)
        r = meta["rates"]
        assert meta["selection_bias"] == strength
        gaps.append(r["mean_true_cvr_all"] - r["mean_true_cvr_clicked"])  # truth
        label_gaps.append(r["cf_purchase"] - r["cvr_after_click"])  # what labels show
    assert gaps[0] < gaps[1] < gaps[2], gaps
    assert label_gaps[0] < label_gaps[1] < label_gaps[2], label_gaps
    assert gaps[2] - gaps[0] > 0.05  # a large effect, not noise
    # the world is the same one: the strength changes the funnel, not the users or items
    for table in ("users.parquet", "items.parquet"):
        assert pq.read_table(tmp_path / "0.0" / table).equals(
            pq.read_table(tmp_path / "2.0" / table)
        )


def test_selection_bias_default_is_the_original_world_and_the_cli_flag_sets_it(
    tmp_path: Path,
) -> None:
    default = generate_ecommerce(tmp_path / "d", 2000, seed=5)
    explicit = generate_ecommerce(tmp_path / "e", 2000, seed=5, selection_bias=1.0)
    assert default["selection_bias"] == 1.0 and default["rates"] == explicit["rates"]
    argv = ["ecommerce", "--out", str(tmp_path / "c"), "--impressions", "2000", "--seed", "5"]
    assert main([*argv, "--selection-bias", "2.5"]) == 0
    assert json.loads((tmp_path / "c" / "meta.json").read_text())["selection_bias"] == 2.5
    with pytest.raises(ValueError, match="selection_bias"):
        generate_ecommerce(tmp_path / "n", 2000, seed=5, selection_bias=-1.0)


def test_hidden_confounding_moves_both_logits_by_an_unlogged_draw(tmp_path: Path) -> None:
    """The same impressions are shown; only an unlogged per-impression draw tilts the funnel."""

    def logit(p: np.ndarray) -> np.ndarray:
        out: np.ndarray = np.log(p) - np.log1p(-p)
        return out

    base = generate_ecommerce(tmp_path / "0", 20_000, seed=4)
    hid = generate_ecommerce(tmp_path / "h", 20_000, seed=4, hidden_confounding=1.5)
    assert base["hidden_confounding"] == 0.0 and hid["hidden_confounding"] == 1.5
    a = pq.read_table(tmp_path / "0" / "train.parquet").to_pydict()
    b = pq.read_table(tmp_path / "h" / "train.parquet").to_pydict()
    for col in ("ts", "user_id", "item_id", "price", "quality", "hour", "device"):
        assert a[col] == b[col], col  # every logged feature is unchanged
    shift = logit(np.array(b["true_ctr"])) - logit(np.array(a["true_ctr"]))
    back = logit(np.array(b["true_cvr"])) - logit(np.array(a["true_cvr"]))
    np.testing.assert_allclose(back, -shift, atol=1e-6)  # + click logit, - purchase logit
    assert abs(float(np.std(shift)) - 1.5) < 0.05  # 1.5 x a standard normal
    for col in ("quality", "price", "user_activity", "hour"):  # not a function of the features
        assert abs(np.corrcoef(shift, np.array(a[col], dtype=float))[0, 1]) < 0.05, col
    r0, r1 = base["rates"], hid["rates"]  # clicks now select the impressions that will not buy
    gap0 = r0["mean_true_cvr_all"] - r0["mean_true_cvr_clicked"]
    assert r1["mean_true_cvr_all"] - r1["mean_true_cvr_clicked"] > gap0 + 0.02
    with pytest.raises(ValueError, match="hidden_confounding"):
        generate_ecommerce(tmp_path / "n", 2000, seed=5, hidden_confounding=-0.5)
    argv = ["ecommerce", "--out", str(tmp_path / "c"), "--impressions", "2000", "--seed", "5"]
    assert main([*argv, "--hidden-confounding", "0.5"]) == 0
    assert json.loads((tmp_path / "c" / "meta.json").read_text())["hidden_confounding"] == 0.5


def test_personalization_shows_users_their_taste(tmp_path: Path) -> None:
    """With a share of impressions drawn from each user's taste, a user's impressions (and clicks)
    concentrate on fewer categories; the users, times and other draws stay the same."""

    def top_category_share(path: Path, clicked: bool) -> float:
        t = pq.read_table(path, columns=["user_id", "category", "click"]).to_pydict()
        user, cat = np.array(t["user_id"]), np.array(t["category"])
        if clicked:
            keep = np.array(t["click"]) == 1
            user, cat = user[keep], cat[keep]
        pairs = np.unique(np.stack([user, cat]), axis=1, return_counts=True)
        per_user: dict[int, list[int]] = {}
        for (u, _), n in zip(pairs[0].T, pairs[1], strict=True):
            per_user.setdefault(int(u), []).append(int(n))
        busy = [c for c in per_user.values() if sum(c) >= 5]
        return float(np.mean([max(c) / sum(c) for c in busy]))

    base = generate_ecommerce(tmp_path / "0", 40_000, seed=2)
    tuned = generate_ecommerce(tmp_path / "p", 40_000, seed=2, personalization=0.6)
    assert base["personalization"] == 0.0 and tuned["personalization"] == 0.6
    a = pq.read_table(tmp_path / "0" / "train.parquet", columns=["ts", "user_id", "item_id"])
    b = pq.read_table(tmp_path / "p" / "train.parquet", columns=["ts", "user_id", "item_id"])
    assert a.column("user_id").equals(b.column("user_id")) and a.column("ts").equals(b.column("ts"))
    moved = np.mean(a.column("item_id").to_numpy() != b.column("item_id").to_numpy())
    assert 0.45 < moved < 0.6  # 60% re-drawn, a few land on the same item
    for clicked in (False, True):
        share0 = top_category_share(tmp_path / "0" / "train.parquet", clicked)
        share1 = top_category_share(tmp_path / "p" / "train.parquet", clicked)
        assert share1 > share0 + 0.1, (clicked, share0, share1)
    assert tuned["rates"]["ctr"] > base["rates"]["ctr"]  # shown what they like, users click more
    with pytest.raises(ValueError, match="personalization"):
        generate_ecommerce(tmp_path / "n", 2000, seed=5, personalization=1.5)


def test_attribute_tables_match_impressions(
    ecommerce_dir: Path, imps: dict[str, np.ndarray]
) -> None:
    for table, key, columns in (
        ("users.parquet", "user_id", USER_COLUMNS),
        ("items.parquet", "item_id", ITEM_COLUMNS),
    ):
        t = pq.read_table(ecommerce_dir / table)
        ids = t.column(key).to_numpy()
        assert len(np.unique(ids)) == len(ids)
        order = np.argsort(ids)
        rows = order[np.searchsorted(ids, imps[key], sorter=order)]
        np.testing.assert_array_equal(ids[rows], imps[key])
        for name in columns:
            np.testing.assert_array_equal(t.column(name).to_numpy()[rows], imps[name], name)


def test_item_rule_attributes(ecommerce_dir: Path, imps: dict[str, np.ndarray]) -> None:
    items = pq.read_table(ecommerce_dir / "items.parquet")
    first_seen = items.column("first_seen_day").to_numpy()
    assert ((first_seen >= TODAY_DAY - 7) & (first_seen < TODAY_DAY)).sum() > 5
    assert len(np.unique(items.column("category").to_numpy())) > 30
    quality = items.column("quality").to_numpy()
    assert 0.0 <= quality.min() < quality.max() <= 1.0
    cap = items.column("exposure_cap")
    assert 0 < cap.null_count < len(items) and min(c for c in cap.to_pylist() if c) > 0
    # no impression of an item before it first appeared; impressions inside the history window
    by_id = dict(zip(items.column("item_id").to_pylist(), first_seen.tolist(), strict=True))
    seen = np.array([by_id[i] for i in imps["item_id"].tolist()])
    assert (imps["day"] >= seen).all()
    assert imps["day"].min() >= TODAY_DAY - HISTORY_DAYS and imps["day"].max() < TODAY_DAY


def test_split_by_time(ecommerce_dir: Path) -> None:
    ts = [pq.read_table(ecommerce_dir / f"{s}.parquet").column("ts").to_numpy() for s in SPLITS]
    assert [len(t) for t in ts] == [16_000, 2_000, 2_000]
    assert ts[0].max() <= ts[1].min() and ts[1].max() <= ts[2].min()


# --------------------------------------------------------------------------- mmoe
def test_mmoe_label_correlation_falls_with_rho(tmp_path: Path) -> None:
    measured = []
    for rho in (1.0, 0.7, 0.3, 0.0):
        d = tmp_path / f"rho{rho}"
        meta = generate_mmoe(d, rho, 6000, seed=3, dim=16, n_sines=5)
        t = pa.concat_tables([pq.read_table(d / f"{s}.parquet") for s in SPLITS])
        r = np.corrcoef(t.column("y1").to_numpy(), t.column("y2").to_numpy())[0, 1]
        assert r == pytest.approx(meta["label_correlation"], abs=1e-9)
        assert t.column_names == [f"x{j}" for j in range(16)] + ["y1", "y2"]
        measured.append(r)
    assert measured[0] > 0.95 and abs(measured[-1]) < 0.1
    assert all(a - b > 0.1 for a, b in zip(measured, measured[1:], strict=False)), measured


def test_mmoe_deterministic(tmp_path: Path) -> None:
    generate_mmoe(tmp_path / "a", 0.5, 500, seed=1, dim=4)
    generate_mmoe(tmp_path / "b", 0.5, 500, seed=1, dim=4)
    generate_mmoe(tmp_path / "c", 0.5, 500, seed=2, dim=4)
    a, b, c = (pq.read_table(tmp_path / x / "train.parquet") for x in "abc")
    assert a.equals(b) and not a.equals(c)
    with pytest.raises(ValueError, match="correlation"):
        generate_mmoe(tmp_path / "d", 1.5, 10, seed=0)


# --------------------------------------------------------------------------- census
def test_split_census(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / "census-income" / "census-income.test.gz"
    with gzip.open(src, "rt", newline="") as f:
        rows = list(csv.reader(f))
    rich = sum(r[41].strip() == "50000+." for r in rows)
    single = sum(r[7].strip() == "Never married" for r in rows)
    degrees = ("Associates", "Bachelors", "Masters", "Prof school", "Doctorate")
    college = sum(r[4].strip().startswith(degrees) for r in rows)
    assert college == 19456  # every degree spelt as in the file: none silently left out
    assert main(["census", "--src", str(src), "--out", str(tmp_path / "c"), "--seed", "0"]) == 0
    parts = [pq.read_table(tmp_path / "c" / f"{s}.parquet") for s in SPLITS]
    assert [p.num_rows for p in parts] == [79809, 9976, 9977]
    t = pa.concat_tables(parts)
    assert t.num_rows == len(rows)
    assert sum(t.column("income_50k").to_pylist()) == rich
    assert sum(t.column("never_married").to_pylist()) == single
    assert sum(t.column("college_degree").to_pylist()) == college
    edu = t.column("education").to_pylist()  # kept: an input of task group 1
    assert t.column("college_degree").to_pylist() == [int(e.startswith(degrees)) for e in edu]
    assert {"instance_weight", "income", "marital_stat"}.isdisjoint(t.column_names)
    assert t.num_columns == 42
    assert "Private" in t.column("class_of_worker").to_pylist()  # leading blanks stripped
    # a fixed seed fixes the split
    again = split_census(src, tmp_path / "d", seed=0)
    assert again["splits"] == {"train": 79809, "valid": 9976, "test": 9977}
    assert pq.read_table(tmp_path / "d" / "test.parquet").equals(parts[2])


def test_census_task_groups_share_inputs() -> None:
    """Group 2 reads group 1's inputs minus the column its label comes from, never a label."""
    configs = Path(__file__).resolve().parents[2] / "training" / "configs"
    income = load_dataset_spec(configs / "census_income.dataset.yaml")
    education = load_dataset_spec(configs / "census_education.dataset.yaml")
    assert [t.label for t in income.tasks] == ["income_50k", "never_married"]
    assert [t.label for t in education.tasks] == ["college_degree", "never_married"]
    assert [c.name for c in education.sparse] == [
        c.name for c in income.sparse if c.name != "education"
    ]
    assert education.dense == income.dense
    assert [income.train, income.valid, income.test] == [
        education.train,
        education.valid,
        education.test,
    ]
