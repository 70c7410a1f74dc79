"""MovieLens (or the generated sample) -> model-ready arrays, cached per (dataset, protocol, seed, options).

    python get_dataset.py                         # ML-1M if found, else the generated sample
    python get_dataset.py --dataset ml-1m --download
    python get_dataset.py --data_path ../shared/data/ml-1m/ratings-all-users-no-timestamp.dat.gz \
        --protocol paper

train.py, eval.py and export.py call `load_dataset(config)`, which builds the cache on first use.

Protocols (see README "Dataset"):
  paper     random 80/20 train/test, validation = 20% of train; vocabularies from all rows; the
            mean-rating features of every split are computed from that split's own labels, as the
            published code does. The label leaks into the features: numbers are optimistic.
  random    the same split, leak-free: vocabularies and statistics from the training rows only
            (training rows see leave-one-out statistics, so their own label never leaks in).
  temporal  80/10/10 by timestamp, leak-free as `random`; ids unseen in training map to the
            out-of-vocabulary index 0; users and items without training history get the prior.
"""
import csv
import gzip
import io
import json
import re
import shutil
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from model_config import keys_of, parse_args
from util import ROOT, UserError, atomic_dir, atomic_write, md5_bytes, md5_file, read_json, run_cli, say, write_json

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
ARCHIVES = {  # name: (url, md5 published by GroupLens beside the archive)
    "ml-1m": ("https://files.grouplens.org/datasets/movielens/ml-1m.zip", "c4d9eecfca2ab87c1945afe126590906"),
    "ml-100k": ("https://files.grouplens.org/datasets/movielens/ml-100k.zip",
                "0e33842e24a9c977be4e0107933c0723"),
}
SOURCES = {  # the files of each format, in order: ratings (or the file --data_path names), users, movies
    "ml-1m": (("ratings.dat", "ratings.dat.gz"), ("users.dat", "users.dat.gz"), ("movies.dat", "movies.dat.gz")),
    "ml-100k": (("u.data", "u.data.gz"), ("u.user",), ("u.item",)),
}
SOURCES["synthetic"] = SOURCES["ml-1m"]  # the generated sample is written in the ML-1M format
ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                 "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
                 "Thriller", "War", "Western")
ML1M_GENRES = ML100K_GENRES[1:]
ML1M_AGES = (1, 18, 25, 35, 45, 50, 56)  # ML-1M age groups; ML-100K ages are mapped onto them
LEAK_NOTE = ("protocol 'paper' computes user_mean_rating and item_mean_rating of every split from that "
             "split's own labels, as the published IntTower code does: the label leaks into the features "
             "and AUC/logloss are optimistic; use --protocol random or temporal for leak-free numbers")
SEP = "\x1f"  # multi-character separators ('::') are rewritten to this byte for pandas' fast C parser


# ================================================================ raw files

@dataclass
class Raw:
    """The three MovieLens tables, normalised: ratings(user, item, rating[, timestamp]),
    users(user, gender, age, occupation, zip), movies(item, title, genres: '|'-joined)."""
    name: str
    ratings: pd.DataFrame
    users: pd.DataFrame
    movies: pd.DataFrame
    sources: dict = field(default_factory=dict)  # file -> md5 of its bytes as found on disk

    @property
    def has_timestamp(self):
        return "timestamp" in self.ratings


class Files:
    """Reads the files of a data set from a folder, a zip, or beside a given ratings file."""

    def __init__(self, path):
        self.path = Path(path)
        self.sources = {}
        self.zip = None
        self.explicit = None
        if not self.path.exists():
            raise UserError(f"data not found: {self.path}")
        if self.path.is_file() and self.path.suffix == ".zip":
            data = self._read_bytes(self.path)
            try:
                self.zip = zipfile.ZipFile(io.BytesIO(data))
            except zipfile.BadZipFile:
                raise UserError(f"{self.path}: not a zip file, or a truncated one") from None
            self.sources[self.path.name] = md5_bytes(data)
        elif self.path.is_file():
            self.explicit = self.path
            self.path = self.path.parent

    def has(self, *names):
        return self._find(names) is not None

    def _find(self, names):
        if self.zip is not None:
            members = {Path(n).name: n for n in self.zip.namelist() if not n.endswith("/")}
            return next((members[n] for n in names if n in members), None)
        return next((self.path / n for n in names if (self.path / n).is_file()), None)

    def locate(self, names, ratings=False):
        """The first of `names` present (the file given by --data_path for the ratings), else an error."""
        found = self.explicit if ratings and self.explicit is not None else self._find(names)
        if found is None:
            raise UserError(f"{' or '.join(names)} not found in {self.path}" + (" (zip)" if self.zip else ""))
        return found

    def read(self, names, ratings=False):
        """(display name, decompressed bytes) of the first of `names` present."""
        found = self.locate(names, ratings)
        if self.zip is not None:
            shown = f"{self.path}:{found}"
            try:
                data = self.zip.read(found)
            except (zipfile.BadZipFile, EOFError, OSError) as e:
                raise UserError(f"{shown}: corrupt zip member ({e})") from None
        else:
            shown = str(found)
            data = self._read_bytes(found)
            self.sources[found.name] = md5_bytes(data)
        if str(found).endswith(".gz"):
            try:
                data = gzip.decompress(data)
            except (OSError, EOFError, gzip.BadGzipFile) as e:
                raise UserError(f"{shown}: corrupt or truncated gzip file ({e})") from None
        if not data.strip():
            raise UserError(f"{shown}: the file is empty")
        return shown, data

    def first_line(self, names, ratings=False):
        """The first line of a file, without reading the rest (to see how many columns it has)."""
        found = self.locate(names, ratings)
        try:
            if self.zip is not None:
                with self.zip.open(found) as f:
                    raw = f.readline()
            else:
                with (gzip.open if str(found).endswith(".gz") else open)(found, "rb") as f:
                    raw = f.readline()
        except (OSError, EOFError, zipfile.BadZipFile) as e:
            raise UserError(f"{found}: cannot read ({e})") from None
        return raw.rstrip(b"\r\n")

    @staticmethod
    def _read_bytes(path):
        try:
            return Path(path).read_bytes()
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror}") from None


def parse_table(shown, data, sep, columns, numeric, optional=0, encoding="latin-1"):
    """Parse `sep`-separated lines into a DataFrame with `columns` (the last `optional` ones may be
    absent on every line). Every malformed line is an error naming the file and line: nothing is
    dropped silently. Vectorised: pandas' C parser, then column-wise checks."""
    fmt = sep.join(columns)
    if len(sep) > 1:
        if SEP.encode() in data:
            raise UserError(f"{shown}: unexpected control byte 0x1f in the file")
        data = data.replace(sep.encode(), SEP.encode())
        sep = SEP
    try:
        df = pd.read_csv(io.BytesIO(data), sep=sep, header=None, dtype=str, quoting=csv.QUOTE_NONE,
                         skip_blank_lines=False, keep_default_na=False, na_filter=False,
                         encoding=encoding, engine="c")
    except pd.errors.ParserError as e:
        m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(e))
        if m:
            raise UserError(f"{shown} line {m[2]}: expected {m[1]} columns ({fmt}), found {m[3]}") from None
        raise UserError(f"{shown}: cannot parse ({e})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{shown}: not {encoding} text ({e})") from None
    n_cols = df.shape[1]
    if not len(columns) - optional <= n_cols <= len(columns):
        raise UserError(f"{shown} line 1: expected {len(columns)} columns ({fmt}), found {n_cols}; "
                        f"is this the right file and separator ({sep if sep != SEP else '::'})?")
    df.columns = columns[:n_cols]
    # pandas pads short lines with empty strings; a field may never be empty
    empty = (df == "").to_numpy()
    if empty.any():
        line = int(np.argmax(empty.any(axis=1)))
        raise UserError(f"{shown} line {line + 1}: missing field(s), expected {fmt}")
    for col in numeric:
        if col not in df:
            continue
        values = pd.to_numeric(df[col], errors="coerce")
        bad = values.isna().to_numpy() | (values.to_numpy() % 1 != 0)
        if bad.any():
            line = int(np.argmax(bad))
            raise UserError(f"{shown} line {line + 1}: {col} must be an integer, got {df[col].iat[line]!r}")
        df[col] = values.astype(np.int64)
    return df


def _check_ratings(shown, ratings, users, movies):
    bad = ~ratings["rating"].between(1, 5).to_numpy()
    if bad.any():
        line = int(np.argmax(bad))
        raise UserError(f"{shown} line {line + 1}: rating must be 1-5, got {ratings['rating'].iat[line]}")
    for key, table, name in (("user", users, "users"), ("item", movies, "movies")):
        dup = table[key].duplicated().to_numpy()
        if dup.any():
            raise UserError(f"{name} file: {key} id {table[key].iat[int(np.argmax(dup))]} appears twice")
        unknown = ~ratings[key].isin(table[key]).to_numpy()
        if unknown.any():
            line = int(np.argmax(unknown))
            raise UserError(f"{shown} line {line + 1}: {key} {ratings[key].iat[line]} is not in the {name} file")


@dataclass(frozen=True)
class Format:
    """One MovieLens file format: the separators of its ratings, users and movies files and their columns."""
    sep: tuple
    user_columns: list
    user_numeric: tuple
    movie_columns: list
    one_hot_genres: bool  # ML-100K: the last 19 movie columns are genre flags (ML-1M: a '|'-joined column)


FORMATS = {
    "ml-1m": Format(("::", "::", "::"), ["user", "gender", "age", "occupation", "zip"], ("user", "age", "occupation"),
                    ["item", "title", "genres"], False),
    "ml-100k": Format(("\t", "|", "|"), ["user", "age", "gender", "occupation", "zip"], ("user", "age"),
                      ["item", "title", "release", "video_release", "url"] + [f"g{i}" for i in range(19)], True),
}
FORMATS["synthetic"] = FORMATS["ml-1m"]  # the generated sample is written in the ML-1M format


def read_movielens(name, path):
    """The three tables of an ML-1M or ML-100K release (ratings with 3 or 4 columns), normalised to
    ML-1M's: ML-100K ages are mapped onto ML-1M's age groups and its one-hot genres joined by '|'."""
    fmt, files = FORMATS[name], Files(path)
    ratings_file, users_file, movies_file = SOURCES[name]
    shown, data = files.read(ratings_file, ratings=True)
    ratings = parse_table(shown, data, fmt.sep[0], ["user", "item", "rating", "timestamp"],
                          numeric=("user", "item", "rating", "timestamp"), optional=1)
    shown_u, data = files.read(users_file)
    users = parse_table(shown_u, data, fmt.sep[1], fmt.user_columns, numeric=fmt.user_numeric)
    shown_m, data = files.read(movies_file)
    flags = fmt.movie_columns[-len(ML100K_GENRES):] if fmt.one_hot_genres else []
    if flags:  # release dates and URLs may be empty in u.item: fill them before the empty-field check
        data = re.sub(rb"\|(?=\|)", b"|-", data)
    movies = parse_table(shown_m, data, fmt.sep[2], fmt.movie_columns, numeric=["item"] + flags)
    if flags:
        users["age"] = np.asarray(ML1M_AGES)[np.searchsorted([18, 25, 35, 45, 50, 56], users["age"], "right")]
        names = np.asarray(ML100K_GENRES, dtype=object)
        movies["genres"] = ["|".join(names[row]) or "unknown" for row in movies[flags].to_numpy() == 1]
    users, movies = users[FORMATS["ml-1m"].user_columns], movies[["item", "title", "genres"]]
    _check_ratings(shown, ratings, users, movies)
    return Raw(name, ratings, users, movies, files.sources)


# ================================================================ the generated sample

def generate_synthetic(out_dir, n_users=3000, n_items=1000, mean_ratings=50, seed=2022):
    """Write ratings.dat, users.dat and movies.dat in the exact ML-1M format, with planted structure.

    Each user has 1-3 interest vectors (half of them several); demographics shift interests towards
    genres; a movie is a mix of its genres' vectors plus its own, drifting over time. A user rates
    movies she is likely to see (popularity and affinity), and the rating follows the *best
    matching* interest (a max over interests: what one dot product cannot express and MaxSim can),
    plus user, movie and demographic biases and noise."""
    rng = np.random.default_rng(seed)
    d, n_genres = 16, len(ML1M_GENRES)
    genre_vec = rng.normal(0, 1, (n_genres, d))
    # movies: 1-3 genres, vector = genre mix + own part, drift direction, popularity, quality
    n_g = rng.choice([1, 2, 3], n_items, p=[0.45, 0.35, 0.2])
    genre_pop = rng.dirichlet(np.full(n_genres, 0.8))
    item_genres = [np.sort(rng.choice(n_genres, k, replace=False, p=genre_pop)) for k in n_g]
    item_vec = np.stack([genre_vec[g].mean(0) for g in item_genres]) * 0.8 + rng.normal(0, 0.6, (n_items, d))
    item_drift = rng.normal(0, 0.6, (n_items, d))
    item_pop = rng.normal(0, 1.0, n_items)
    item_quality = rng.normal(0, 0.5, n_items)
    # users: demographics, 1-3 interests, bias, activity, active period
    gender = rng.choice(["F", "M"], n_users, p=[0.3, 0.7])
    age = rng.choice(ML1M_AGES, n_users, p=[0.04, 0.18, 0.35, 0.2, 0.09, 0.08, 0.06])
    occupation = rng.integers(0, 21, n_users)
    zips = rng.integers(10000, 99999, n_users)
    demo_vec = {("gender", g): rng.normal(0, 0.5, d) for g in ("F", "M")}
    demo_vec.update({("age", a): rng.normal(0, 0.5, d) for a in ML1M_AGES})
    demo = np.stack([demo_vec["gender", g] + demo_vec["age", a] for g, a in zip(gender, age)])
    k_interests = rng.choice([1, 2, 3], n_users, p=[0.5, 0.3, 0.2])
    interests = rng.normal(0, 1, (n_users, 3, d)) + demo[:, None, :]
    interests[k_interests < 2, 1] = interests[k_interests < 2, 0]
    interests[k_interests < 3, 2] = interests[k_interests < 3, 1]
    user_bias = rng.normal(0, 0.4, n_users) + np.where(gender == "F", 0.1, -0.05)
    n_rated = np.clip(rng.lognormal(np.log(mean_ratings) - 0.32, 0.8, n_users).astype(int), 20, n_items // 2)
    t0, span = 956_700_000, 3 * 365 * 86400  # ML-1M's first timestamp, three years
    start = rng.uniform(0, 0.85, n_users)
    length = rng.uniform(0.02, 1, n_users) * (1 - start)
    # which movies: Gumbel top-k over popularity + affinity at the middle of the user's period
    scale = 1 / np.sqrt(d)
    mid = (start + length / 2)[:, None, None]
    affinity = (np.einsum("ukd,id->uki", interests, item_vec)
                + mid * np.einsum("ukd,id->uki", interests, item_drift)).max(1) * scale
    logits = item_pop[None] + 0.6 * affinity + rng.gumbel(size=(n_users, n_items))
    order = np.argsort(-logits, axis=1)
    users_idx = np.repeat(np.arange(n_users), n_rated)
    items_idx = order[np.arange(n_users)[:, None], np.arange(n_items)[None]][
        np.arange(n_items)[None] < n_rated[:, None]]
    t = start[users_idx] + rng.uniform(0, 1, users_idx.size) * length[users_idx]
    vec_t = item_vec[items_idx] + t[:, None] * item_drift[items_idx]
    best = np.einsum("nkd,nd->nk", interests[users_idx], vec_t).max(1) * scale
    z = 1.1 * best + user_bias[users_idx] + item_quality[items_idx] + rng.normal(0, 0.6, users_idx.size)
    # ratings 1-5 with ML-1M's histogram (6% 1, 11% 2, 26% 3, 35% 4, 22% 5)
    rating = 1 + np.searchsorted(np.quantile(z, [0.056, 0.164, 0.425, 0.774]), z)
    timestamp = (t0 + t * span).astype(np.int64)

    return _write_sample(out_dir, users_idx + 1, items_idx + 1, rating, timestamp, gender, age, occupation, zips,
                         item_genres)


def _write_sample(out_dir, users, items, rating, timestamp, gender, age, occupation, zips, item_genres):
    """ratings.dat, users.dat and movies.dat of the generated sample, '::'-separated, latin-1, as ML-1M's."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ratings = pd.DataFrame({"u": users, "i": items, "r": rating, "t": timestamp})
    _write_dat(out / "ratings.dat", ratings)
    _write_dat(out / "users.dat", pd.DataFrame({"u": np.arange(1, len(gender) + 1), "g": gender, "a": age,
                                                 "o": occupation, "z": zips}))
    titles = [f"Synthetic Movie {i + 1} ({1950 + i % 50})" for i in range(len(item_genres))]
    titles[0] = "Café Société: Ça commence (1999)"  # latin-1, as in the real movies.dat
    genres = ["|".join(ML1M_GENRES[g] for g in gs) for gs in item_genres]
    _write_dat(out / "movies.dat", pd.DataFrame({"i": np.arange(1, len(item_genres) + 1), "t": titles, "g": genres}))
    return out


def _write_dat(path, df):
    lines = df.astype(str).agg("::".join, axis=1)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(("\n".join(lines) + "\n").encode("latin-1")))


# ================================================================ download

def download(name, data_dir, base_url=""):
    """Fetch <name>.zip and its published .md5, check it, extract to <data_dir>/<name> atomically."""
    from tqdm import tqdm
    url, published_md5 = ARCHIVES[name]
    if base_url:
        url = base_url.rstrip("/") + "/" + url.rsplit("/", 1)[1]
    target = Path(data_dir) / name
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url + ".md5", timeout=30) as r:
            found = re.search(rb"\b[0-9a-fA-F]{32}\b", r.read())
        expected = found[0].decode().lower() if found else published_md5
    except (urllib.error.URLError, OSError):
        expected = published_md5  # the value GroupLens publishes, known to this file
    zip_path = data_dir / f"{name}.zip"

    def fetch(tmp):
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
                total = int(r.headers.get("Content-Length") or 0)
                with tqdm(total=total or None, unit="B", unit_scale=True, desc=f"download {name}") as bar:
                    for block in iter(lambda: r.read(1 << 16), b""):
                        f.write(block)
                        bar.update(len(block))
            size = Path(tmp).stat().st_size
            if total and size != total:
                raise UserError(f"download of {url} interrupted ({size} of {total} bytes)")
        except (urllib.error.URLError, OSError, ConnectionError) as e:
            reason = getattr(e, "reason", e)
            raise UserError(f"cannot download {url}: {reason}") from None
        got = md5_file(tmp)
        if got != expected:
            raise UserError(f"checksum mismatch for {url}: md5 {got}, expected {expected}; nothing was kept")

    atomic_write(zip_path, fetch)
    with atomic_dir(target) as tmp:
        try:
            with zipfile.ZipFile(zip_path) as z:
                for member in z.infolist():
                    if member.is_dir():
                        continue
                    with z.open(member) as src, open(tmp / Path(member.filename).name, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        except zipfile.BadZipFile as e:
            raise UserError(f"{zip_path}: corrupt archive ({e})") from None
    say(f"downloaded {name} to {target} (md5 {expected} verified)")
    return target


# ================================================================ resolving what to read

def data_root(cfg):
    """--data_dir, relative to the project folder unless absolute."""
    return Path(cfg.data_dir) if Path(cfg.data_dir).is_absolute() else ROOT / cfg.data_dir


def resolve_source(cfg):
    """(dataset name, path) to read, downloading or generating as the config asks.

    `--dataset auto` uses ML-1M when its files are found and otherwise says so in one line and falls back
    to the generated sample; an explicitly requested data set must exist, and so must a download that was
    asked for (--download): a failed one is an error that says where to place the files by hand."""
    data_dir = data_root(cfg)
    if cfg.dataset == "synthetic":
        return "synthetic", Path(cfg.data_path) if cfg.data_path else synthetic_path(cfg, data_dir)
    if cfg.data_path:
        path = Path(cfg.data_path)
        if not path.exists():
            raise UserError(f"--data_path {path} does not exist")
        name = cfg.dataset if cfg.dataset != "auto" else ("ml-100k" if Files(path).has("u.data") else "ml-1m")
        return name, path
    name = "ml-1m" if cfg.dataset == "auto" else cfg.dataset
    path = data_dir / name
    if path.exists():
        return name, path
    if cfg.download:
        try:
            return name, download(name, data_dir, cfg.download_url)
        except UserError as e:
            raise UserError(f"{e}; download {ARCHIVES[name][0]} elsewhere and pass it with --data_path, or "
                            f"extract it to {path}") from None
    if cfg.dataset != "auto":
        raise UserError(f"{name} not found in {path}: run with --download, or pass --data_path "
                        f"(a folder, the zip, or a ratings file)")
    say(f"NOTE: ML-1M not found in {path} (use --download or --data_path); using the generated sample "
        f"(synthetic data), not MovieLens")
    return "synthetic", synthetic_path(cfg, data_dir)


def synthetic_path(cfg, data_dir):
    path = data_dir / (f"synthetic-u{cfg.synthetic_users}-i{cfg.synthetic_items}-r{cfg.synthetic_ratings}"
                       f"-s{cfg.synthetic_seed}")
    if not (path / "movies.dat").exists():
        with atomic_dir(path) as tmp:
            generate_synthetic(tmp, cfg.synthetic_users, cfg.synthetic_items, cfg.synthetic_ratings,
                               cfg.synthetic_seed)
    return path


# ================================================================ features and splits

def resolve_protocol(cfg, name, path):
    """--protocol, with auto resolved from the ratings file's first line: temporal when it has a timestamp
    column, else random. A temporal split of a file without timestamps is refused."""
    first = Files(path).first_line(SOURCES[name][0], ratings=True)
    has_timestamp = len(first.split(FORMATS[name].sep[0].encode())) >= 4
    protocol = cfg.protocol if cfg.protocol != "auto" else ("temporal" if has_timestamp else "random")
    if protocol == "temporal" and not has_timestamp:
        raise UserError(NO_TIMESTAMP)
    return protocol


def split_rows(n, protocol, seed, timestamp=None):
    """Row indices of train/val/test. Random: 80/20 train/test, then 20% of train for validation
    (seeded). Temporal: 80/10/10 by time (a stable sort, so every test timestamp >= every train one)."""
    if protocol == "temporal":
        order = np.argsort(timestamp, kind="stable")
        a, b = int(round(n * 0.8)), int(round(n * 0.9))
        return {"train": order[:a], "val": order[a:b], "test": order[b:]}
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * 0.2))
    n_val = int(round((n - n_test) * 0.2))
    return {"test": np.sort(perm[:n_test]), "val": np.sort(perm[n_test:n_test + n_val]),
            "train": np.sort(perm[n_test + n_val:])}


def encode(values, fit_values):
    """Ids 1..V for the values seen in `fit_values` (sorted), 0 for anything else (out of vocabulary)."""
    vocab = pd.Index(pd.unique(pd.Series(fit_values))).sort_values()
    return (vocab.get_indexer(values) + 1).astype(np.int32), vocab


def target_means(keys, labels, n_keys, rows, prior, weight, leave_one_out=None):
    """Smoothed mean label per key over `rows`: (sum + weight*prior) / (count + weight).

    Returns (per-key means, per-row means for `leave_one_out` rows, which exclude their own label)."""
    sums = np.bincount(keys[rows], weights=labels[rows], minlength=n_keys)
    counts = np.bincount(keys[rows], minlength=n_keys).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_key = np.where(counts + weight > 0, (sums + weight * prior) / (counts + weight), prior)
        if leave_one_out is None:
            return per_key, None
        k, y = keys[leave_one_out], labels[leave_one_out]
        denom = counts[k] - 1 + weight
        loo = np.where(denom > 0, (sums[k] - y + weight * prior) / np.maximum(denom, 1e-12), prior)
    return per_key, loo


def genre_matrix(genres, fit_mask):
    """(n_movies, max_len) genre ids (0 = padding or unknown genre) and mask, vocabulary from fit_mask."""
    lists = [g.split("|") if g else [] for g in genres]
    max_len = max(1, max(len(g) for g in lists))
    flat = np.array([x for g in lists for x in g], dtype=object)
    owner = np.repeat(np.arange(len(lists)), [len(g) for g in lists])
    pos = np.concatenate([np.arange(len(g)) for g in lists]) if flat.size else np.zeros(0, int)
    fit_genres = flat[fit_mask[owner]] if flat.size else flat
    codes, vocab = encode(flat, fit_genres)
    ids = np.zeros((len(lists), max_len), np.int32)
    mask = np.zeros((len(lists), max_len), np.float32)
    ids[owner, pos] = codes
    mask[owner, pos] = 1.0
    return ids, mask, vocab


NO_TIMESTAMP = ("protocol 'temporal' splits by time, but this ratings file has no timestamp column "
                "(UserID::MovieID::Rating): use --protocol random or paper, or a ratings file with timestamps")


def data_options(cfg):
    """The data-preparation keys of the config (model_config role 'data') besides protocol and seed,
    which name the cache folder: part of the cache key and of meta.json."""
    return {k: getattr(cfg, k) for k in sorted(keys_of("data") - {"protocol", "seed"})}


def labelled(raw, cfg):
    """The ratings that get a label (the neutral rating dropped if asked) and their labels."""
    r = raw.ratings
    if cfg.drop_neutral:
        r = r[r["rating"] != cfg.label_threshold]
    if len(r) == 0:
        raise UserError("no ratings left after dropping the neutral rating")
    return r, (r["rating"].to_numpy() > cfg.label_threshold).astype(np.float32)


def fit_fields(raw, cfg, user_seen, item_seen):
    """Vocabularies of every field, fit on the users/movies seen in the fitting rows (0 = out of vocabulary);
    returns the user fields' names, the encoded user and movie tables and the vocabularies."""
    users = raw.users
    user_fields = {"user_id": users["user"], "gender": users["gender"], "age": users["age"],
                   "occupation": users["occupation"]}
    if cfg.zip_prefix:
        user_fields["zip_prefix"] = users["zip"].str[:cfg.zip_prefix]
    user_cols, vocab = [], {}
    for name, values in user_fields.items():
        codes, vocab[name] = encode(values.to_numpy(), values.to_numpy()[user_seen])
        user_cols.append(codes)
    items = raw.movies["item"].to_numpy()
    item_codes, vocab["movie_id"] = encode(items, items[item_seen])
    genre_ids, genre_mask, vocab["genres"] = genre_matrix(raw.movies["genres"].tolist(), item_seen)
    tables = {"user_sparse": np.stack(user_cols, 1), "item_sparse": item_codes[:, None], "item_genres": genre_ids,
              "item_genres_mask": genre_mask}
    return list(user_fields), tables, vocab


def mean_features(protocol, splits, labels, user_pos, item_pos, n_users, n_items, mean_prior):
    """Mean-label features (the published code averages the binarised rating): per split (rows, 2) of user
    and item means, and the per-user and per-item means of the training rows (for the catalogue).

    paper: every split from its own labels (the published leak). Leak-free protocols: training rows see
    leave-one-out means, smoothed towards the training positive rate; val/test rows the training means."""
    train = splits["train"]
    prior = float(labels[train].mean())
    dense = {s: np.zeros((len(rows), 2), np.float32) for s, rows in splits.items()}
    if protocol == "paper":
        for s, rows in splits.items():
            dense[s][:, 0] = target_means(user_pos, labels, n_users, rows, prior, 0)[0][user_pos[rows]]
            dense[s][:, 1] = target_means(item_pos, labels, n_items, rows, prior, 0)[0][item_pos[rows]]
        user_mean = target_means(user_pos, labels, n_users, train, prior, 0)[0]
        item_mean = target_means(item_pos, labels, n_items, train, prior, 0)[0]
    else:
        user_mean, dense["train"][:, 0] = target_means(user_pos, labels, n_users, train, prior,
                                                       mean_prior, leave_one_out=train)
        item_mean, dense["train"][:, 1] = target_means(item_pos, labels, n_items, train, prior,
                                                       mean_prior, leave_one_out=train)
        for s in ("val", "test"):
            dense[s][:, 0] = user_mean[user_pos[splits[s]]]
            dense[s][:, 1] = item_mean[item_pos[splits[s]]]
    return dense, user_mean, item_mean


def build(raw, cfg):
    """Split the ratings, fit vocabularies and statistics as cfg.protocol (resolved: see resolve_protocol)
    says, and return (meta, {split: arrays}, {"users": table, "items": table, "vocab": arrays})."""
    protocol = cfg.protocol
    if protocol not in ("paper", "random", "temporal"):
        raise ValueError(f"build() needs a resolved protocol, got {protocol!r}")
    if protocol == "temporal" and not raw.has_timestamp:
        raise UserError(NO_TIMESTAMP)
    r, labels = labelled(raw, cfg)
    user_pos = pd.Index(raw.users["user"]).get_indexer(r["user"])
    item_pos = pd.Index(raw.movies["item"]).get_indexer(r["item"])
    timestamp = r["timestamp"].to_numpy() if raw.has_timestamp else None
    splits = split_rows(len(r), protocol, cfg.seed, timestamp)
    fit_rows = np.arange(len(r)) if protocol == "paper" else splits["train"]
    n_users, n_items = len(raw.users), len(raw.movies)
    user_seen, item_seen = np.zeros(n_users, bool), np.zeros(n_items, bool)
    user_seen[user_pos[fit_rows]] = True
    item_seen[item_pos[fit_rows]] = True
    user_fields, tables, vocab = fit_fields(raw, cfg, user_seen, item_seen)
    dense, user_mean, item_mean = mean_features(protocol, splits, labels, user_pos, item_pos, n_users, n_items,
                                                cfg.mean_prior)
    arrays = {}
    for s, rows in splits.items():
        u, i = user_pos[rows], item_pos[rows]
        arrays[s] = {"user_sparse": tables["user_sparse"][u], "user_dense": dense[s][:, :1],
                     **{k: v[i] for k, v in tables.items() if k.startswith("item_")}, "item_dense": dense[s][:, 1:],
                     "label": labels[rows], "user_key": r["user"].to_numpy()[rows].astype(np.int64),
                     "item_key": r["item"].to_numpy()[rows].astype(np.int64)}
        if timestamp is not None:
            arrays[s]["timestamp"] = timestamp[rows].astype(np.int64)
    catalog = {
        "users": {"key": raw.users["user"].to_numpy().astype(np.int64), "user_sparse": tables["user_sparse"],
                  "user_dense": user_mean[:, None].astype(np.float32)},
        "items": {"key": raw.movies["item"].to_numpy().astype(np.int64), "title": raw.movies["title"].to_numpy(str),
                  **{k: v for k, v in tables.items() if k.startswith("item_")},
                  "item_dense": item_mean[:, None].astype(np.float32)},
        "vocab": {name: v.to_numpy().astype(str) for name, v in vocab.items()},
    }
    towers = {
        "user": {"sparse": [{"name": n, "vocab_size": len(vocab[n]) + 1} for n in user_fields],
                 "multi": [], "dense": ["user_mean_rating"]},
        "item": {"sparse": [{"name": "movie_id", "vocab_size": len(vocab["movie_id"]) + 1}],
                 "multi": [{"name": "genres", "vocab_size": len(vocab["genres"]) + 1,
                            "max_len": int(tables["item_genres"].shape[1])}],
                 "dense": ["item_mean_rating"]},
    }
    return describe_data(raw, cfg, towers, splits, labels, arrays), arrays, catalog


def describe_data(raw, cfg, towers, splits, labels, arrays):
    """meta.json: what was built, how, and what the models need to know about it (towers, inputs)."""
    protocol = cfg.protocol
    def oov(split, name):
        return float((arrays[split][name][:, 0] == 0).mean()) if len(splits[split]) else 0.0
    return {
        "format_version": FORMAT_VERSION, "dataset": raw.name, "synthetic": raw.name == "synthetic",
        "protocol": protocol, "seed": cfg.seed, "leaky": protocol == "paper",
        "note": LEAK_NOTE if protocol == "paper" else "leak-free: vocabularies and statistics from training rows",
        "options": data_options(cfg), "has_timestamp": raw.has_timestamp, "towers": towers,
        "inputs": tower_inputs(towers, "user") + tower_inputs(towers, "item"),
        "rows": {s: int(len(rows)) for s, rows in splits.items()},
        "positive_rate": {s: float(labels[rows].mean()) if len(rows) else float("nan") for s, rows in splits.items()},
        "oov_rate": {s: {"user_id": oov(s, "user_sparse"), "movie_id": oov(s, "item_sparse")} for s in splits},
        "ratings_read": int(len(raw.ratings)), "sources": raw.sources,
    }


def tower_inputs(towers, tower):
    """Names of a tower's input arrays, in order: sparse ids, multi-valued ids + mask per field, dense values.
    A model takes the user tower's, then the item tower's."""
    spec, names = towers[tower], []
    names += [f"{tower}_sparse"] if spec["sparse"] else []
    for m in spec["multi"]:
        names += [f"{tower}_{m['name']}", f"{tower}_{m['name']}_mask"]
    names += [f"{tower}_dense"] if spec["dense"] else []
    return names


def unknown_inputs(towers, tower, prior):
    """One row of a tower's inputs for a user or item with no row in the tables: out-of-vocabulary ids,
    no multi-valued ids, and the training positive rate `prior` as every mean-label feature (no history)."""
    spec, rows = towers[tower], {}
    if spec["sparse"]:
        rows[f"{tower}_sparse"] = np.zeros((1, len(spec["sparse"])), np.int32)
    for m in spec["multi"]:
        rows[f"{tower}_{m['name']}"] = np.zeros((1, m["max_len"]), np.int32)
        rows[f"{tower}_{m['name']}_mask"] = np.zeros((1, m["max_len"]), np.float32)
    if spec["dense"]:
        rows[f"{tower}_dense"] = np.full((1, len(spec["dense"])), prior, np.float32)
    return rows


# ================================================================ cache

@dataclass
class Dataset:
    meta: dict
    path: Path

    def arrays(self, name):
        """All arrays (dict name -> numpy array) of a split (train, val, test) or a table (users, items, vocab)."""
        path = self.path / f"{name}.npz"
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise UserError(f"cannot read {path} ({e}); delete the cache folder to rebuild it") from None


def cache_key(name, sources, protocol, cfg):
    key = {"v": FORMAT_VERSION, "dataset": name, "sources": sources, "protocol": protocol, "seed": cfg.seed,
           "options": data_options(cfg)}
    return md5_bytes(json.dumps(key, sort_keys=True).encode())[:12]


def source_checksums(name, path):
    """md5 of every source file, without parsing them (to find the cache)."""
    files = Files(path)
    if files.zip is not None:
        return dict(files.sources)
    found = [files.locate(names, ratings=i == 0) for i, names in enumerate(SOURCES[name])]
    return {f.name: md5_bytes(Files._read_bytes(f)) for f in found}


def load_dataset(cfg, quiet=False):
    """The preprocessed data set for this config, from the cache or built now (atomically)."""
    name, path = resolve_source(cfg)
    sources = source_checksums(name, path)
    protocol = resolve_protocol(cfg, name, path)
    cfg = cfg.replace(protocol=protocol)
    folder = data_root(cfg) / "cache" / f"{name}-{protocol}-seed{cfg.seed}-{cache_key(name, sources, protocol, cfg)}"
    if (folder / "meta.json").exists():
        meta = read_json(folder / "meta.json", "cache metadata")
        if not quiet:
            say(f"data: {name} ({path}), protocol {protocol}, cached in {folder}")
    else:
        started = time.perf_counter()
        raw = read_movielens(name, path)
        meta, arrays, catalog = build(raw, cfg)
        meta["source_path"] = str(path)
        meta["build_seconds"] = round(time.perf_counter() - started, 2)
        with atomic_dir(folder) as tmp:
            for s, a in {**arrays, **catalog}.items():
                np.savez(tmp / f"{s}.npz", **a)
            write_json(tmp / "meta.json", meta)
        if not quiet:
            say(f"data: {name} ({path}), protocol {protocol}: built {folder} in {meta['build_seconds']} s")
    if meta["leaky"] and not quiet:
        say(f"WARNING: {LEAK_NOTE}")
    if meta["synthetic"] and not quiet:
        say("NOTE: this is the generated sample (synthetic data), not MovieLens")
    return Dataset(meta, folder)


def main():
    cfg, _ = parse_args(prog="get_dataset.py", description=__doc__.split("\n\n")[0])
    data = load_dataset(cfg)
    m = data.meta
    say(f"{m['dataset']} / {m['protocol']}: rows " + ", ".join(f"{s} {m['rows'][s]:,}" for s in SPLITS)
        + "; positive rate " + ", ".join(f"{s} {m['positive_rate'][s]:.3f}" for s in SPLITS))
    say("fields: " + ", ".join(f"{f['name']} ({f['vocab_size']})" for t in m["towers"].values()
                               for f in t["sparse"] + t["multi"]))
    say(f"cache: {data.path}")


if __name__ == "__main__":
    run_cli(main)
