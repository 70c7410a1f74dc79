"""get_dataset.py: parsing, labels, protocols and their leak properties, cache, download, bad input."""
import functools
import gzip
import hashlib
import http.server
import io
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import get_dataset as gd
from conftest import ROOT, random_ratings, real_file, write_ml1m
from util import UserError


def cfg_for(tmp_path, path, **kw):
    from model_config import Config
    return Config(data_path=str(path), data_dir=str(tmp_path / "data"), **kw)


# ---------------------------------------------------------------- parsing

def test_ml1m_parsing_with_latin1_titles(tmp_path):
    movies = [(1, "Café Society (1999)", "Comedy|Drama"), (2, "Star Wars: Episode IV (1977)", "Action|Sci-Fi")]
    folder = write_ml1m(tmp_path / "ml", [(1, 1, 5, 978300760), (2, 2, 1, 978300761)], movies=movies)
    raw = gd.read_movielens("ml-1m", folder)
    assert raw.has_timestamp and list(raw.ratings.columns) == ["user", "item", "rating", "timestamp"]
    assert raw.ratings["rating"].tolist() == [5, 1] and raw.ratings["user"].dtype == np.int64
    assert raw.movies["title"].tolist()[0] == "Café Society (1999)"
    assert raw.movies["title"].tolist()[1] == "Star Wars: Episode IV (1977)"  # ':' inside '::' fields
    assert set(raw.sources) == {"ratings.dat", "users.dat", "movies.dat"}


def test_three_column_ratings_random_ok_temporal_refused(tmp_path):
    folder = write_ml1m(tmp_path / "ml", random_ratings(timestamp=False))
    raw = gd.read_movielens("ml-1m", folder)
    assert not raw.has_timestamp
    meta, arrays, _ = gd.build(raw, cfg_for(tmp_path, folder, protocol="random"))
    assert meta["protocol"] == "random" and sum(meta["rows"].values()) == len(raw.ratings.query("rating != 3"))
    with pytest.raises(UserError, match="timestamp"):
        gd.build(raw, cfg_for(tmp_path, folder, protocol="temporal"))
    # auto picks random without timestamps, temporal with them; temporal without them is refused
    assert gd.resolve_protocol(cfg_for(tmp_path, folder), "ml-1m", folder) == "random"
    with pytest.raises(UserError, match="timestamp"):
        gd.resolve_protocol(cfg_for(tmp_path, folder, protocol="temporal"), "ml-1m", folder)
    stamped = write_ml1m(tmp_path / "stamped", random_ratings())
    assert gd.resolve_protocol(cfg_for(tmp_path, stamped), "ml-1m", stamped) == "temporal"


def test_gzip_zip_and_ratings_file_paths(tmp_path):
    rows = random_ratings()
    plain = gd.read_movielens("ml-1m", write_ml1m(tmp_path / "plain", rows)).ratings
    assert plain.equals(gd.read_movielens("ml-1m", write_ml1m(tmp_path / "gz", rows, gz=True)).ratings)
    # the GroupLens zip layout: ml-1m/ratings.dat ...
    zpath = tmp_path / "ml-1m.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for f in (tmp_path / "plain").iterdir():
            z.write(f, f"ml-1m/{f.name}")
    raw = gd.read_movielens("ml-1m", zpath)
    assert raw.ratings.equals(plain) and "ml-1m.zip" in raw.sources
    # a ratings file with another name, users/movies beside it (as in ../shared/data/ml-1m)
    other = tmp_path / "plain" / "ratings-subset.dat"
    other.write_bytes((tmp_path / "plain" / "ratings.dat").read_bytes())
    assert gd.read_movielens("ml-1m", other).ratings.equals(plain)


def write_ml100k(folder, n_users=30, n_items=20, seed=0):
    """Small files in the exact ML-100K format: u.data (tab), u.user / u.item ('|', latin-1)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    data = "".join(f"{u}\t{i}\t{rng.integers(1, 6)}\t{881250949 + k}\n"
                   for k, (u, i) in enumerate((u, i) for u in range(1, n_users + 1)
                                              for i in rng.choice(np.arange(1, n_items + 1), 8, replace=False)))
    (folder / "u.data").write_text(data)
    occupations = ["technician", "other", "writer", "executive"]
    (folder / "u.user").write_text("".join(f"{u}|{15 + 2 * u}|{'MF'[u % 2]}|{occupations[u % 4]}|{85711 + u}\n"
                                           for u in range(1, n_users + 1)))
    lines = []
    for i in range(1, n_items + 1):
        flags = ["0"] * 19
        flags[i % 19] = "1"
        flags[(i * 7) % 19] = "1"
        title = "Amélie (2001)" if i == 1 else f"Film {i} (1995)"
        url = "" if i == 2 else f"http://us.imdb.com/M/title-exact?Film%20{i}"
        lines.append("|".join([str(i), title, "01-Jan-1995", "", url] + flags))
    (folder / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    return folder


def test_ml100k_same_features(tmp_path):
    folder = write_ml100k(tmp_path / "ml-100k")
    raw = gd.read_movielens("ml-100k", folder)
    assert raw.movies["title"].iat[0] == "Amélie (2001)"
    assert set(raw.users["age"]) <= set(gd.ML1M_AGES)
    assert all(1 <= len(g.split("|")) <= 2 for g in raw.movies["genres"])
    cfg = cfg_for(tmp_path, folder, dataset="ml-100k")
    data = gd.load_dataset(cfg, quiet=True)
    assert data.meta["dataset"] == "ml-100k" and data.meta["protocol"] == "temporal"
    assert [f["name"] for f in data.meta["towers"]["user"]["sparse"]] == ["user_id", "gender", "age", "occupation"]
    # auto-detection of the format from the files
    assert gd.resolve_source(cfg_for(tmp_path, folder))[0] == "ml-100k"


# ---------------------------------------------------------------- labels and protocols

def test_label_rule_and_neutral_drop(tmp_path):
    rows = [(1, 1, r, 978300000 + r) for r in (1, 2, 3, 4, 5)] * 4
    rows = [(u + k // 5, m + k, r, t) for k, (u, m, r, t) in enumerate(rows)]
    folder = write_ml1m(tmp_path / "ml", rows)
    raw = gd.read_movielens("ml-1m", folder)
    meta, arrays, _ = gd.build(raw, cfg_for(tmp_path, folder, protocol="random"))
    labels = np.concatenate([arrays[s]["label"] for s in gd.SPLITS])
    assert len(labels) == 16 and labels.sum() == 8  # 3s dropped, 4 and 5 positive
    meta, arrays, _ = gd.build(raw, cfg_for(tmp_path, folder, protocol="random", drop_neutral=False,
                                            label_threshold=4))
    labels = np.concatenate([arrays[s]["label"] for s in gd.SPLITS])
    assert len(labels) == 20 and labels.sum() == 4  # only 5 > 4


@pytest.fixture
def sample(tmp_path):
    folder = write_ml1m(tmp_path / "ml", random_ratings(n_users=60, n_items=40, per_user=15, seed=3))
    return folder, gd.read_movielens("ml-1m", folder)


def test_random_split_sizes_and_seed(tmp_path, sample):
    folder, raw = sample
    n = int((raw.ratings["rating"] != 3).sum())
    meta, arrays, _ = gd.build(raw, cfg_for(tmp_path, folder, protocol="paper", seed=1))
    n_test = round(n * 0.2)
    assert meta["rows"] == {"train": n - n_test - round((n - n_test) * 0.2), "val": round((n - n_test) * 0.2),
                            "test": n_test}
    same = gd.build(raw, cfg_for(tmp_path, folder, protocol="random", seed=1))[1]
    other = gd.build(raw, cfg_for(tmp_path, folder, protocol="random", seed=2))[1]
    # paper and random share the split of a seed; another seed gives another split
    assert np.array_equal(same["test"]["user_key"], arrays["test"]["user_key"])
    assert np.array_equal(same["test"]["item_key"], arrays["test"]["item_key"])
    assert not np.array_equal(other["test"]["item_key"], arrays["test"]["item_key"])


@pytest.mark.parametrize("protocol", ["random", "temporal"])
def test_splits_are_disjoint_and_cover_every_labelled_rating(tmp_path, sample, protocol):
    folder, raw = sample
    meta, arrays, _ = gd.build(raw, cfg_for(tmp_path, folder, protocol=protocol))
    pairs = {s: set(zip(arrays[s]["user_key"].tolist(), arrays[s]["item_key"].tolist())) for s in gd.SPLITS}
    assert all(len(pairs[s]) == meta["rows"][s] for s in gd.SPLITS)  # a (user, movie) pair is one rating
    assert not pairs["train"] & pairs["val"] and not pairs["train"] & pairs["test"] and not pairs["val"] & pairs["test"]
    labelled = raw.ratings[raw.ratings["rating"] != 3]
    assert set().union(*pairs.values()) == set(zip(labelled["user"].tolist(), labelled["item"].tolist()))
    if protocol == "random":  # drawn from the same rows: validation looks like test
        rate = {s: arrays[s]["label"].mean() for s in ("val", "test")}
        assert abs(rate["val"] - rate["test"]) < 0.05, rate


def test_temporal_split_is_ordered_in_time(tmp_path, sample):
    folder, raw = sample
    meta, arrays, _ = gd.build(raw, cfg_for(tmp_path, folder, protocol="temporal"))
    n = sum(meta["rows"].values())
    assert meta["rows"]["train"] == round(0.8 * n) and meta["rows"]["test"] == n - round(0.9 * n)
    t = {s: arrays[s]["timestamp"] for s in gd.SPLITS}
    assert t["train"].max() <= t["val"].min() and t["val"].max() <= t["test"].min()


def _expected_means(train_keys, train_labels, keys, prior, weight):
    df = pd.DataFrame({"k": train_keys, "y": train_labels})
    g = df.groupby("k")["y"].agg(["sum", "count"])
    s = pd.Series(keys).map(g["sum"]).fillna(0).to_numpy()
    c = pd.Series(keys).map(g["count"]).fillna(0).to_numpy()
    return (s + weight * prior) / (c + weight)


@pytest.mark.parametrize("protocol", ["random", "temporal"])
def test_leak_free_statistics_and_vocabularies(tmp_path, sample, protocol):
    folder, raw = sample
    cfg = cfg_for(tmp_path, folder, protocol=protocol, mean_prior=5.0)
    meta, a, catalog = gd.build(raw, cfg)
    tr = a["train"]
    prior = tr["label"].mean()
    for split in ("val", "test"):
        exp_user = _expected_means(tr["user_key"], tr["label"], a[split]["user_key"], prior, 5.0)
        exp_item = _expected_means(tr["item_key"], tr["label"], a[split]["item_key"], prior, 5.0)
        np.testing.assert_allclose(a[split]["user_dense"][:, 0], exp_user, rtol=1e-5)
        np.testing.assert_allclose(a[split]["item_dense"][:, 0], exp_item, rtol=1e-5)
    # a training row's own label never enters its feature (leave-one-out)
    df = pd.DataFrame({"k": tr["user_key"], "y": tr["label"]})
    s = df.groupby("k")["y"].transform("sum").to_numpy()
    c = df.groupby("k")["y"].transform("count").to_numpy()
    np.testing.assert_allclose(tr["user_dense"][:, 0], (s - tr["label"] + 5.0 * prior) / (c - 1 + 5.0), rtol=1e-5)
    # vocabularies from training rows only: a user or movie never seen in training is id 0
    train_users, train_items = set(tr["user_key"]), set(tr["item_key"])
    for split in ("val", "test"):
        unseen_u = ~np.isin(a[split]["user_key"], list(train_users))
        unseen_i = ~np.isin(a[split]["item_key"], list(train_items))
        assert np.all((a[split]["user_sparse"][:, 0] == 0) == unseen_u)
        assert np.all((a[split]["item_sparse"][:, 0] == 0) == unseen_i)
    assert meta["towers"]["user"]["sparse"][0]["vocab_size"] == len(train_users) + 1
    assert not meta["leaky"]


def test_temporal_oov_users_and_prior(tmp_path):
    rows = random_ratings(n_users=20, n_items=15, per_user=6, seed=5)
    late = [(99, m, 5, 2_000_000_000 + m) for m in range(1, 10)]  # a user who only appears at the end
    folder = write_ml1m(tmp_path / "ml", rows + late)
    meta, a, catalog = gd.build(gd.read_movielens("ml-1m", folder), cfg_for(tmp_path, folder, protocol="temporal"))
    rows99 = a["test"]["user_key"] == 99
    assert rows99.any() and np.all(a["test"]["user_sparse"][rows99, 0] == 0)
    prior = a["train"]["label"].mean()
    np.testing.assert_allclose(a["test"]["user_dense"][rows99, 0], prior, rtol=1e-6)
    assert meta["oov_rate"]["test"]["user_id"] > 0


def test_paper_protocol_leaks_as_published(tmp_path, sample):
    folder, raw = sample
    meta, a, _ = gd.build(raw, cfg_for(tmp_path, folder, protocol="paper"))
    assert meta["leaky"] and "leak" in meta["note"]
    for split in gd.SPLITS:  # each split's features are its own label means: the leak
        d = a[split]
        exp = pd.Series(d["label"]).groupby(d["user_key"]).transform("mean").to_numpy()
        np.testing.assert_allclose(d["user_dense"][:, 0], exp, rtol=1e-6)
    # vocabularies from all rows: no out-of-vocabulary ids anywhere
    assert all(a[s]["user_sparse"][:, 0].min() > 0 for s in gd.SPLITS)


def test_genres_padded_with_mask(tmp_path, sample):
    folder, raw = sample
    meta, a, catalog = gd.build(raw, cfg_for(tmp_path, folder, protocol="random"))
    spec = meta["towers"]["item"]["multi"][0]
    assert spec["name"] == "genres" and spec["max_len"] == 3
    g, m = catalog["items"]["item_genres"], catalog["items"]["item_genres_mask"]
    counts = [len(x.split("|")) for x in raw.movies["genres"]]
    np.testing.assert_array_equal(m.sum(1), counts)
    assert np.all(g[m == 0] == 0) and np.all(g[m == 1] > 0)


def test_zip_prefix_field(tmp_path, sample):
    folder, raw = sample
    meta, a, _ = gd.build(raw, cfg_for(tmp_path, folder, protocol="random", zip_prefix=2))
    assert [f["name"] for f in meta["towers"]["user"]["sparse"]][-1] == "zip_prefix"
    assert a["train"]["user_sparse"].shape[1] == 5


# ---------------------------------------------------------------- the generated sample

def test_synthetic_is_deterministic_ml1m_format(tmp_path):
    a = gd.generate_synthetic(tmp_path / "a", 200, 80, 30, seed=7)
    b = gd.generate_synthetic(tmp_path / "b", 200, 80, 30, seed=7)
    for name in ("ratings.dat", "users.dat", "movies.dat"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    raw = gd.read_movielens("ml-1m", a)  # the ML-1M reader accepts it: same format
    assert raw.has_timestamp and raw.ratings["user"].nunique() == 200
    hist = raw.ratings["rating"].value_counts(normalize=True).sort_index().to_numpy()
    np.testing.assert_allclose(hist, [0.056, 0.108, 0.261, 0.349, 0.226], atol=0.02)  # ML-1M's histogram
    assert raw.movies["title"].iat[0].startswith("Café")


# ---------------------------------------------------------------- cache

def test_cache_reuse_and_invalidation(tmp_path, sample):
    folder, _ = sample
    cfg = cfg_for(tmp_path, folder, protocol="random")
    first = gd.load_dataset(cfg, quiet=True)
    stamp = (first.path / "meta.json").stat().st_mtime_ns
    again = gd.load_dataset(cfg, quiet=True)
    assert again.path == first.path and (again.path / "meta.json").stat().st_mtime_ns == stamp
    assert gd.load_dataset(cfg.replace(seed=5), quiet=True).path != first.path
    assert gd.load_dataset(cfg.replace(mean_prior=1.0), quiet=True).path != first.path
    ratings = folder / "ratings.dat"
    ratings.write_bytes(ratings.read_bytes() + b"1::1::5::978300000\n")
    changed = gd.load_dataset(cfg, quiet=True)
    assert changed.path != first.path and changed.meta["ratings_read"] == first.meta["ratings_read"] + 1
    split = changed.arrays("train")
    assert split["user_sparse"].dtype == np.int32 and split["label"].dtype == np.float32
    assert split["user_dense"].dtype == np.float32
    assert changed.meta["sources"]["ratings.dat"] == hashlib.md5(ratings.read_bytes()).hexdigest()
    # no temporary folders left behind
    assert not [p for p in (tmp_path / "data" / "cache").iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------- bad input

BAD_CASES = {
    "wrong separator": (["1,1,5,978300000"], r"ratings.dat line 1: expected 4 columns"),
    "extra column": (["1::1::5::978300000", "1::2::5::978300000::7"], r"ratings.dat line 2: expected 4 columns"),
    "missing column": (["1::1::5::978300000", "1::2::5"], r"ratings.dat line 2: missing field"),
    "non-numeric id": (["1::1::5::978300000", "x1::2::5::978300000"], r"ratings.dat line 2: user must be an integer"),
    "rating out of range": (["1::1::5::978300000", "1::2::7::978300000"], r"ratings.dat line 2: rating must be 1-5"),
    "blank line": (["1::1::5::978300000", "", "1::2::4::978300000"], r"ratings.dat line 2: missing field"),
    "unknown movie": (["1::1::5::978300000", "1::999::4::978300000"], r"ratings.dat line 2: item 999 is not in"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_ratings_lines(tmp_path, case):
    lines, message = BAD_CASES[case]
    folder = write_ml1m(tmp_path / "ml", lines, users=[(1, "F", 1, 10, "48067")],
                        movies=[(1, "A (1999)", "Comedy"), (2, "B (1998)", "Drama")])
    with pytest.raises(UserError, match=message):
        gd.read_movielens("ml-1m", folder)


def test_bad_files(tmp_path):
    good = write_ml1m(tmp_path / "good", random_ratings())
    with pytest.raises(UserError, match="data not found"):
        gd.read_movielens("ml-1m", tmp_path / "nowhere")
    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / "ratings.dat").write_bytes((good / "ratings.dat").read_bytes())
    with pytest.raises(UserError, match="users.dat or users.dat.gz not found"):
        gd.read_movielens("ml-1m", missing)
    empty = write_ml1m(tmp_path / "empty", random_ratings())
    (empty / "ratings.dat").write_bytes(b"")
    with pytest.raises(UserError, match="ratings.dat: the file is empty"):
        gd.read_movielens("ml-1m", empty)
    trunc = write_ml1m(tmp_path / "trunc", random_ratings(), gz=True)
    data = (trunc / "ratings.dat.gz").read_bytes()
    (trunc / "ratings.dat.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="ratings.dat.gz: corrupt or truncated gzip"):
        gd.read_movielens("ml-1m", trunc)
    (trunc / "ratings.dat.gz").write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match="corrupt or truncated gzip"):
        gd.read_movielens("ml-1m", trunc)
    zpath = tmp_path / "ml-1m.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        z.write(good / "ratings.dat", "ml-1m/ratings.dat")
    zpath.write_bytes(zpath.read_bytes()[:-30])
    with pytest.raises(UserError, match="ml-1m.zip: not a zip file, or a truncated one"):
        gd.read_movielens("ml-1m", zpath)
    dup = write_ml1m(tmp_path / "dup", [(1, 1, 5, 1)], users=[(1, "F", 1, 1, "1"), (1, "M", 1, 1, "1")])
    with pytest.raises(UserError, match="user id 1 appears twice"):
        gd.read_movielens("ml-1m", dup)


def test_cli_bad_input_one_line_nothing_written(tmp_path):
    folder = write_ml1m(tmp_path / "ml", ["1::1::5::978300000", "1::2::x::978300000"],
                        users=[(1, "F", 1, 10, "48067")], movies=[(1, "A", "Comedy"), (2, "B", "Drama")])
    out = subprocess.run([sys.executable, str(ROOT / "get_dataset.py"), "--data_path", str(folder),
                          "--data_dir", str(tmp_path / "data")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [f"error: {folder / 'ratings.dat'} line 2: rating must be an integer, "
                                               "got 'x'"]
    assert not (tmp_path / "data" / "cache").exists() or not any((tmp_path / "data" / "cache").iterdir())


def test_explicit_dataset_missing_and_auto_fallback(tmp_path, capsys):
    from model_config import Config
    with pytest.raises(UserError, match="--download"):
        gd.resolve_source(Config(dataset="ml-1m", data_dir=str(tmp_path)))
    cfg = Config(data_dir=str(tmp_path), synthetic_users=50, synthetic_items=30, synthetic_ratings=20)
    name, path = gd.resolve_source(cfg)
    assert name == "synthetic" and (path / "ratings.dat").exists()
    assert "using the generated sample" in capsys.readouterr().out


# ---------------------------------------------------------------- download

class _Handler(http.server.SimpleHTTPRequestHandler):
    truncate = False

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.truncate and self.path.endswith(".zip"):
            data = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])  # then the connection closes: an interrupted transfer
            return
        super().do_GET()


@pytest.fixture
def server(tmp_path):
    """A local http.server on 127.0.0.1 serving a generated ml-1m.zip and its .md5."""
    root = tmp_path / "www"
    root.mkdir()
    folder = write_ml1m(tmp_path / "src", random_ratings())
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in folder.iterdir():
            z.write(f, f"ml-1m/{f.name}")
    (root / "ml-1m.zip").write_bytes(buf.getvalue())
    (root / "ml-1m.zip.md5").write_text(f"MD5 (ml-1m.zip) = {hashlib.md5(buf.getvalue()).hexdigest()}\n")
    handler = type("H", (_Handler,), {})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root, handler
    httpd.shutdown()


def test_download_good_archive(tmp_path, server):
    url, root, _ = server
    from model_config import Config
    cfg = Config(dataset="ml-1m", download=True, download_url=url, data_dir=str(tmp_path / "d"))
    name, path = gd.resolve_source(cfg)
    assert name == "ml-1m" and (path / "ratings.dat").exists() and (path / "movies.dat").exists()
    assert gd.load_dataset(cfg, quiet=True).meta["dataset"] == "ml-1m"


def test_download_tampered_archive(tmp_path, server):
    url, root, _ = server
    data = bytearray((root / "ml-1m.zip").read_bytes())
    data[100] ^= 0xFF
    (root / "ml-1m.zip").write_bytes(bytes(data))
    with pytest.raises(UserError, match="checksum mismatch"):
        gd.download("ml-1m", tmp_path / "d", url)
    assert not (tmp_path / "d" / "ml-1m").exists() and not (tmp_path / "d" / "ml-1m.zip").exists()
    assert not list((tmp_path / "d").iterdir())


def test_download_interrupted(tmp_path, server):
    url, root, handler = server
    handler.truncate = True
    with pytest.raises(UserError, match="interrupted|cannot download"):
        gd.download("ml-1m", tmp_path / "d", url)
    assert not list((tmp_path / "d").iterdir())


def test_download_offline_is_an_error_auto_or_not(tmp_path, capsys):
    """A download that was asked for and failed never falls back to the generated sample."""
    from model_config import Config
    cfg = Config(download=True, download_url="http://127.0.0.1:9", data_dir=str(tmp_path),
                 synthetic_users=50, synthetic_items=30, synthetic_ratings=20)
    for dataset in ("auto", "ml-1m"):
        with pytest.raises(UserError, match="cannot download .* pass it with --data_path, or extract it to"):
            gd.resolve_source(cfg.replace(dataset=dataset))
    assert "generated sample" not in capsys.readouterr().out
    out = subprocess.run([sys.executable, "get_dataset.py", "--download", "--download_url", "http://127.0.0.1:9",
                          "--data_dir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 1 and out.stderr.startswith("error: cannot download") and "Traceback" not in out.stderr


# ---------------------------------------------------------------- the genuine files

@pytest.mark.realdata
def test_real_ml1m_row_counts(tmp_path):
    full = gd.read_movielens("ml-1m", real_file("ratings-all-users-no-timestamp.dat.gz"))
    assert len(full.ratings) == 1_000_209 and not full.has_timestamp
    assert len(full.users) == 6040 and len(full.movies) == 3883
    assert full.ratings["rating"].value_counts().sort_index().tolist() == [56174, 107557, 261197, 348971, 226310]
    part = gd.read_movielens("ml-1m", real_file("ratings-users-1-2999.dat.gz"))
    assert len(part.ratings) == 487_650 and part.has_timestamp and part.ratings["user"].max() == 2999
    meta, a, _ = gd.build(full, cfg_for(tmp_path, "x", protocol="paper"))
    assert sum(meta["rows"].values()) == 1_000_209 - 261_197
    assert abs(meta["positive_rate"]["train"] - 575_281 / 739_012) < 0.005
    meta, a, _ = gd.build(part, cfg_for(tmp_path, "x", protocol="temporal"))
    assert a["train"]["timestamp"].max() <= a["test"]["timestamp"].min()


def test_unknown_inputs_use_numeric_fills_and_the_prior():
    """A user or item without a row: ids 0, no multi-valued ids, a numeric feature its training fill, a
    mean-label feature the prior."""
    towers = {"item": {"sparse": [{"name": "item_id", "vocab_size": 9}],
                       "multi": [{"name": "categories", "vocab_size": 5, "max_len": 3}],
                       "dense": ["price", "item_mean_rating"]}}
    meta = {"fields": [{"name": "price", "kind": "numeric", "fill": 3.1}, {"name": "item_id", "kind": "categorical"}]}
    assert gd.dense_fills(meta) == {"price": 3.1}
    rows = gd.unknown_inputs(towers, "item", 0.4, gd.dense_fills(meta))
    assert rows["item_sparse"].tolist() == [[0]] and rows["item_categories"].tolist() == [[0, 0, 0]]
    assert rows["item_categories_mask"].sum() == 0
    np.testing.assert_allclose(rows["item_dense"], [[3.1, 0.4]], rtol=1e-6)
    assert list(rows) == gd.tower_inputs(towers, "item")


def test_temporal_validation_like_test_matches_the_test_share_of_unseen_users():
    """--temporal_val like_test: test rows as before; validation from the period before test, its share of
    rows from users without a training row close to the test split's; every row in exactly one split."""
    from get_dataset import split_rows
    rng = np.random.default_rng(0)
    n, users = 20_000, 600
    joined = np.sort(rng.uniform(0, 1, users)) ** 0.5  # more users join late, as in MovieLens
    user = rng.integers(0, users, n)
    stamp = (joined[user] + rng.exponential(0.05, n)) * 1e6
    base = split_rows(n, "temporal", 1, stamp)
    like = split_rows(n, "temporal", 1, stamp, users=user, val="like_test")
    np.testing.assert_array_equal(np.sort(like["test"]), np.sort(base["test"]))
    np.testing.assert_array_equal(np.sort(np.concatenate([like["train"], like["val"]])),
                                  np.sort(np.concatenate([base["train"], base["val"]])))
    assert set(like["val"]) <= set(base["val"])

    def unseen(split, train):
        return np.mean(~np.isin(user[split], user[train]))
    before = unseen(base["val"], base["train"]), unseen(base["test"], base["train"])
    after = unseen(like["val"], like["train"]), unseen(like["test"], like["train"])
    assert abs(before[0] - before[1]) > 0.1  # the period split's validation is unlike its test
    assert abs(after[0] - after[1]) < 0.02


def test_temporal_val_like_test_reaches_the_cached_splits(tiny_cfg):
    """--temporal_val is a data key: load_dataset builds (and caches) the like_test validation, whose share of
    rows from users without a training row (meta.json oov_rate) is closer to the test split's."""
    from get_dataset import load_dataset
    period = load_dataset(tiny_cfg, quiet=True).meta
    like = load_dataset(tiny_cfg.replace(temporal_val="like_test"), quiet=True).meta
    assert period["protocol"] == like["protocol"] == "temporal" and like["options"]["temporal_val"] == "like_test"
    assert like["rows"]["test"] == period["rows"]["test"] and like["rows"]["val"] < period["rows"]["val"]

    def gap(meta):
        return abs(meta["oov_rate"]["val"]["user_id"] - meta["oov_rate"]["test"]["user_id"])
    assert gap(like) < 0.05 < gap(period)
