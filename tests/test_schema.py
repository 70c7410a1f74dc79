"""Data described, not coded: the schema reader, the built-in Amazon and Alibaba schemas on their generated
samples, hashing, joins, the official day split, memory-mapped splits, bad schemas and files."""
import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import get_dataset as gd
from conftest import ROOT
from model_config import Config
from util import UserError


def cfg(tmp_path, **kw):
    return Config(data_dir=str(tmp_path / "data"), **kw)


@pytest.fixture(scope="module")
def alibaba(tmp_path_factory):
    return gd.generate_alibaba(tmp_path_factory.mktemp("ali") / "alibaba", 600, 200, 15, seed=1)


@pytest.fixture(scope="module")
def amazon(tmp_path_factory):
    return gd.generate_amazon(tmp_path_factory.mktemp("amz") / "amazon", 300, 120, 8, seed=1)


# ---------------------------------------------------------------- built-in schemas on their samples

def test_builtin_schemas_load():
    for name in ("ml-1m", "ml-100k", "amazon", "alibaba"):
        s = gd.load_schema(name)
        assert s["name"] == name and s["features"]


@pytest.mark.parametrize("protocol", ["paper", "random", "temporal"])
def test_alibaba_sample(tmp_path, alibaba, protocol):
    raw = gd.read_source(gd.builtin_schema("alibaba"), alibaba)
    header = (alibaba / "user_profile.csv").read_text().splitlines()[0]
    assert header.endswith("new_user_class_level ")  # the official header's trailing space
    assert raw.users["pvalue_level"].isna().any() and raw.items["brand"].isna().any()  # empty / NULL
    meta, a, catalog = gd.build(raw, cfg(tmp_path, protocol=protocol))
    towers = meta["towers"]
    assert [f["name"] for f in towers["user"]["sparse"]][:2] == ["userid", "cms_segid"]
    assert towers["user"]["id"] == "userid" and towers["item"]["id"] == "adgroup_id"
    assert "pid" in [f["name"] for f in towers["item"]["sparse"]] and towers["item"]["dense"] == ["price"]
    assert meta["inputs"] == ["user_sparse", "item_sparse", "item_dense"] and not meta["leaky"]
    # join accounting: impressions of users without a profile are dropped (the published inner join), counted
    profiled = set(raw.users["userid"])
    missing = int((~raw.ratings["user"].isin(profiled)).sum())
    assert missing > 0 and meta["join"]["users"] == {**meta["join"]["users"], "policy": "drop",
                                                     "interactions_without_row": missing}
    assert sum(meta["rows"].values()) == len(raw.ratings) - missing
    assert set(np.concatenate([a[s]["user_key"] for s in gd.SPLITS])) <= profiled
    for s in gd.SPLITS:
        for k, v in a[s].items():
            assert len(v) == meta["rows"][s], (s, k)
    assert catalog["items"]["item_sparse"].shape == (len(raw.items), 6)


def test_alibaba_official_day_split(tmp_path, alibaba):
    meta, a, _ = gd.build(gd.read_source(gd.builtin_schema("alibaba"), alibaba), cfg(tmp_path, protocol="temporal"))
    day = {s: (a[s]["timestamp"] + 8 * 3600) // 86400 for s in gd.SPLITS}
    last = max(d.max() for d in day.values())
    assert np.all(day["test"] == last) and day["train"].max() < last and day["val"].max() < last
    assert len(np.unique(np.concatenate([day["train"], day["val"]]))) == 7  # the first 7 days
    assert 0.05 < meta["rows"]["val"] / (meta["rows"]["train"] + meta["rows"]["val"]) < 0.15


@pytest.mark.parametrize("release", [2014, 2018])
def test_amazon_sample_both_releases(tmp_path, release):
    folder = gd.generate_amazon(tmp_path / f"amz{release}", 200, 80, 8, seed=2, release=release)
    meta_line = gzip.decompress((folder / "meta_Electronics.json.gz").read_bytes()).decode().splitlines()[0]
    assert meta_line.startswith("{'asin'" if release == 2014 else '{"asin"')  # Python literal vs JSON
    raw = gd.read_source(gd.builtin_schema("amazon"), folder)
    meta, a, catalog = gd.build(raw, cfg(tmp_path, protocol="random"))
    assert [f["name"] for f in meta["towers"]["item"]["multi"]] == ["categories"]
    assert meta["towers"]["item"]["dense"] == ["price", "item_mean_rating"]
    assert raw.items["price"].isna().any() and raw.items["price"].dropna().between(0, 1e5).all()  # "$x.xx" parsed
    assert raw.items["categories"].isna().any()
    assert "Electronics" in gd.Plan(raw, cfg(tmp_path, protocol="random")).vocab["categories"]
    # the reviewed item without a meta line: out of vocabulary, counted, never silent
    assert meta["join"]["items"]["policy"] == "oov" and meta["join"]["items"]["interactions_without_row"] > 0
    # label overall >= 4; 3 stays a negative (as the published script)
    labels = np.concatenate([a[s]["label"] for s in gd.SPLITS])
    assert sum(meta["rows"].values()) == len(raw.ratings) and labels.mean() < 1
    assert "name" in catalog["users"] and catalog["users"]["name"][0].startswith("A")


def test_amazon_literal_meta_parser(tmp_path, amazon):
    lines = gzip.decompress((amazon / "meta_Electronics.json.gz").read_bytes()).decode().splitlines()
    assert any('"title": "Kid\'s' in x or "'title': \"Kid's" in x for x in lines)  # repr switched quotes
    table = gd.read_table(gd.Files(amazon), gd.builtin_schema("amazon")["items"], "items")
    assert len(table.df) == len(lines)
    first = table.df.iloc[0]
    assert first["categories"].split("|")[0] == "Electronics" and isinstance(first["price"], float)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "reviews_Electronics_5.json.gz").write_bytes((amazon / "reviews_Electronics_5.json.gz").read_bytes())
    lines[4] = lines[4][:-5]  # a truncated literal
    (broken / "meta_Electronics.json.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    with pytest.raises(UserError, match=r"meta_Electronics.json.gz line 5: cannot parse the line"):
        table = gd.read_table(gd.Files(broken), gd.builtin_schema("amazon")["items"], "items")


# ---------------------------------------------------------------- vocabulary control

def test_hash_buckets_bound_the_tables(tmp_path, alibaba):
    raw = gd.read_source(gd.builtin_schema("alibaba"), alibaba)
    meta, a, catalog = gd.build(raw, cfg(tmp_path, protocol="random", hash_buckets=16))
    for t in ("user", "item"):
        for k, f in enumerate(meta["towers"][t]["sparse"]):
            assert f["vocab_size"] <= 17
            for s in gd.SPLITS:
                assert a[s][f"{t}_sparse"][:, k].max() < f["vocab_size"]
    assert meta["towers"]["user"]["sparse"][0]["hash_buckets"] == 16
    assert meta["embedding_rows"]["user"] <= 9 * 17
    again = gd.build(raw, cfg(tmp_path, protocol="random", hash_buckets=16))[1]
    assert np.array_equal(again["train"]["user_sparse"], a["train"]["user_sparse"])  # the same in every process
    assert gd.hash_ids(["a", "b", 7], 5).tolist() == gd.hash_ids(["a", "b", "7"], 5).tolist()


def test_min_count_sends_rare_ids_out_of_vocabulary(tmp_path, alibaba):
    schema = gd.builtin_schema("alibaba")
    schema["features"][0]["min_count"] = 20
    raw = gd.read_source(schema, alibaba)
    meta, a, _ = gd.build(raw, cfg(tmp_path, protocol="random"))
    train = a["train"]
    counts = np.bincount(np.unique(train["user_key"], return_inverse=True)[1])
    assert meta["towers"]["user"]["sparse"][0]["vocab_size"] == int((counts >= 20).sum()) + 1
    assert (train["user_sparse"][:, 0] == 0).any()


# ---------------------------------------------------------------- the cache: memory-mapped splits

def test_memory_mapped_batches_equal_in_memory(tmp_path):
    import runtime
    data = gd.load_dataset(cfg(tmp_path, dataset="alibaba-synthetic", synthetic_users=300, synthetic_items=100,
                               synthetic_ratings=10), quiet=True)
    mapped, loaded = data.arrays("train"), data.arrays("train", mmap=False)
    assert isinstance(mapped["user_sparse"].base, np.memmap) and loaded["user_sparse"].flags.owndata
    names = data.meta["inputs"] + ["label"]
    order = runtime.epoch_order(1, 0, len(loaded["label"]))
    for x, y in zip(runtime.batches(mapped, names, 64, order), runtime.batches(loaded, names, 64, order)):
        for u, v in zip(x, y):
            assert np.array_equal(u.asnumpy(), v.asnumpy())
    assert list(mapped) == list(data.meta["order"]["train"])  # the order arrays were built in


def test_chunked_cache_equals_in_memory_build(tmp_path, alibaba, monkeypatch):
    monkeypatch.setattr(gd, "CHUNK_ROWS", 1000)
    c = cfg(tmp_path, schema=str(ROOT / "schemas" / "alibaba.toml"), data_path=str(alibaba), protocol="temporal")
    data = gd.load_dataset(c, quiet=True)
    _, arrays, _ = gd.build(gd.read_source(gd.builtin_schema("alibaba"), alibaba), c)
    for s in gd.SPLITS:
        for k, v in arrays[s].items():
            assert np.array_equal(data.arrays(s)[k], v), (s, k)


# ---------------------------------------------------------------- bad schemas and files

def write_schema(path, text):
    path.write_text(text)
    return path


GOOD = """
name = "mylog"
features = [
  { name = "user_id", column = "uid", side = "user", id = true },
  { name = "age", column = "age", side = "user", kind = "numeric", norm = "minmax" },
  { name = "item_id", column = "iid", side = "item", id = true },
  { name = "tags", column = "tags", side = "item", kind = "multi", sep = ";", max_len = 3 },
  { name = "shop", column = "shop", side = "item", min_count = 2 },
]
[interactions]
files = ["clicks*.csv"]
header = true
columns = ["uid", "iid", "ts", "stars"]
types = { uid = "int", iid = "str", ts = "int", stars = "int" }
user_key = "uid"
item_key = "iid"
timestamp = "ts"
[users]
files = ["users.csv.gz"]
header = true
columns = ["uid", "age"]
types = { uid = "int", age = "float" }
nullable = ["age"]
key = "uid"
missing = "oov"
[items]
files = ["items.tsv"]
sep = "\\t"
columns = ["iid", "shop", "tags"]
nullable = ["tags"]
key = "iid"
missing = "drop"
[label]
column = "stars"
above = 3
drop = [3]
[target_means]
item = "item_mean_stars"
"""


def write_user_data(folder, n_users=60, n_items=40, per_user=12, seed=0):
    """A user's own logs: two click files (a glob), a gzipped users table, a headerless TSV items table."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [(u, f"it{rng.integers(0, n_items + 3)}", 1_600_000_000 + int(rng.integers(0, 10**6)),
             int(rng.integers(1, 6))) for u in range(1, n_users + 1) for _ in range(per_user)]
    half = len(rows) // 2
    for name, part in (("clicks-1.csv", rows[:half]), ("clicks-2.csv", rows[half:])):
        (folder / name).write_text("uid,iid,ts,stars\n" + "".join(f"{u},{i},{t},{s}\n" for u, i, t, s in part))
    users = "uid,age\n" + "".join(f"{u},{'' if u % 7 == 0 else 18 + u % 40}\n" for u in range(1, n_users - 2))
    (folder / "users.csv.gz").write_bytes(gzip.compress(users.encode()))
    (folder / "items.tsv").write_text("".join(f"it{i}\tshop{i % 9}\t{'' if i % 5 == 0 else 'a;b;c;d'[:1 + 2 * (i % 4)]}\n"
                                              for i in range(n_items)))
    return folder


def test_user_schema_end_to_end_reader(tmp_path):
    schema = write_schema(tmp_path / "my.toml", GOOD)
    data = write_user_data(tmp_path / "logs")
    d = gd.load_dataset(cfg(tmp_path, schema=str(schema), data_path=str(data)), quiet=True)
    m = d.meta
    assert m["dataset"] == "mylog" and m["protocol"] == "temporal"
    assert m["inputs"] == ["user_sparse", "user_dense", "item_sparse", "item_tags", "item_tags_mask", "item_dense"]
    assert m["towers"]["item"]["multi"][0]["max_len"] == 3 and m["towers"]["user"]["dense"] == ["age"]
    # three users without a row: out-of-vocabulary, counted (rows left after the label rule drops 3 stars)
    assert m["join"]["users"]["keys_without_row"] == 3 and 0 < m["join"]["users"]["interactions_without_row"] <= 36
    assert m["join"]["items"]["interactions_without_row"] > 0  # ids it40..it42 are not in items.tsv: dropped
    age = d.arrays("train")["user_dense"][:, 0]
    assert age.min() >= -1e-6 and age.max() <= 1 + 1e-6  # min-max fitted on training rows
    assert set(d.arrays("vocab")["shop"]) <= {f"shop{i}" for i in range(9)}


BAD_SCHEMAS = {
    "duplicate feature": (GOOD.replace('name = "age"', 'name = "user_id"'),
                          r"key features\[1\].name: duplicate feature name 'user_id'"),
    "unknown column": (GOOD.replace('column = "shop"', 'column = "store"'),
                       r"key features\[4\].column: 'store' is not a column of items or interactions"),
    "missing policy": (GOOD.replace('missing = "oov"\n', ''), r"key users.missing: missing: say what happens"),
    "unknown key": (GOOD.replace('[label]', '[label]\ntreshold = 3'), r"key label.treshold: unknown key"),
    "bad kind": (GOOD.replace('kind = "numeric"', 'kind = "number"'), r"key features\[1\].kind: one of"),
    "unknown option": (GOOD.replace("above = 3", 'above = "--treshold"'), r"key label.above: '--treshold' names no"),
    "not toml": ("name = ", r"not valid TOML"),
}


@pytest.mark.parametrize("case", sorted(BAD_SCHEMAS))
def test_bad_schemas_name_the_key(tmp_path, case):
    text, message = BAD_SCHEMAS[case]
    with pytest.raises(UserError, match=message):
        gd.load_schema(write_schema(tmp_path / "bad.toml", text))


def _load(tmp_path, text, data, **kw):
    return gd.load_dataset(cfg(tmp_path, schema=str(write_schema(tmp_path / "s.toml", text)), data_path=str(data), **kw),
                           quiet=True)


def test_bad_data_one_line_nothing_cached(tmp_path):
    data = write_user_data(tmp_path / "logs")
    (data / "others.csv").write_text("uid,age\n" + "".join(f"{5000 + u},30\n" for u in range(20)))  # never matches
    cases = [
        (GOOD.replace('"ts", "stars"]', '"ts", "rating"]').replace('stars = "int"', 'rating = "int"')
         .replace('column = "stars"', 'column = "rating"'), r"clicks-1.csv: schema key interactions.columns: "
                                                            r"'rating' is not in the file's header"),
        (GOOD.replace("users.csv.gz", "others.csv"), r"schema key users.key: no uid of .* matches a uid of .*others.csv"),
        (GOOD.replace("above = 3\ndrop = [3]", ""), r"schema key label: column stars is neither binary"),
    ]
    for text, message in cases:
        with pytest.raises(UserError, match=message):
            _load(tmp_path, text, data)
    with pytest.raises(UserError, match="protocol 'temporal' splits by time, but the schema declares no"):
        _load(tmp_path, GOOD.replace('timestamp = "ts"', ""), data, protocol="temporal")
    assert not (tmp_path / "data" / "cache").exists() or not any((tmp_path / "data" / "cache").iterdir())


def test_random_bytes_say_not_a_text_file(tmp_path):
    from conftest import random_ratings, write_ml1m
    folder = write_ml1m(tmp_path / "ml", random_ratings())
    (folder / "ratings.dat").write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(UserError, match=r"ratings.dat: not a delimited text file \(binary data\)"):
        gd.read_movielens("ml-1m", folder)
    (folder / "ratings.dat").write_bytes(gzip.compress(b"1::1::5::1\n"))
    with pytest.raises(UserError, match=r"gzip data: name it .gz"):
        gd.read_movielens("ml-1m", folder)


def test_cli_schema_error_is_one_line(tmp_path):
    schema = write_schema(tmp_path / "bad.toml", BAD_SCHEMAS["duplicate feature"][0])
    out = subprocess.run([sys.executable, "get_dataset.py", "--schema", str(schema), "--data_path", str(tmp_path),
                          "--data_dir", str(tmp_path / "d")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1
    assert "duplicate feature name" in out.stderr and not (tmp_path / "d" / "cache").exists()


# ---------------------------------------------------------------- end to end from a user's schema

@pytest.mark.e2e
def test_user_schema_train_export_infer(tmp_path):
    schema = write_schema(tmp_path / "my.toml", GOOD)
    data = write_user_data(tmp_path / "logs", n_users=150, n_items=60, per_user=20)
    common = ["--schema", str(schema), "--data_path", str(data), "--data_dir", str(tmp_path / "d")]
    run = tmp_path / "run"
    for args in (["train.py", *common, "--run_dir", str(run), "--epochs", "1", "--mlp", "16,8", "--heads", "2",
                  "--head_dim", "4", "--embed_dim", "4", "--batch_size", "128", "--model", "inttower"],
                 ["export.py", *common, "--run_dir", str(run)],
                 ["infer.py", "--run_dir", str(run), "--user_id", "5", "--top_k", "3"]):
        out = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert out.returncode == 0, (args[0], out.stderr[-2000:])
    result = json.loads(out.stdout)
    assert len(result["items"]) == 3 and result["known_user"]
