"""Any interaction log, described by a schema (schemas/*.toml or --schema FILE) -> model-ready arrays, cached
per (data set, protocol, seed, options).

    python get_dataset.py                         # ML-1M if found, else the generated sample
    python get_dataset.py --dataset ml-1m --download
    python get_dataset.py --data_path ../shared/data/ml-1m/ratings-all-users-no-timestamp.dat.gz \
        --protocol paper
    python get_dataset.py --dataset alibaba       # or amazon: the paper's other data sets (files placed by hand)
    python get_dataset.py --dataset alibaba-synthetic   # a generated sample in the official format
    python get_dataset.py --schema my_data.toml --data_path my_logs/

One reader turns a schema (data/README.md "Schema") into model inputs: the built-in data sets (ML-1M,
ML-100K, Amazon Electronics, Alibaba display ads, the generated samples) are schemas on the same path.
train.py, eval.py and export.py call `load_dataset(config)`, which builds the cache on first use; the
cached splits are .npy files read memory-mapped.

Protocols (see README "Dataset"):
  paper     random 80/20 train/test, validation = 20% of train; vocabularies from all rows; the
            mean-target features of every split are computed from that split's own labels, as the
            published code does. The label leaks into the features: numbers are optimistic.
  random    the same split, leak-free: vocabularies and statistics from the training rows only
            (training rows see leave-one-out statistics, so their own label never leaks in).
  temporal  80/10/10 by timestamp (or the schema's day split: Alibaba's official last-day test), leak-free
            as `random`; ids unseen in training map to the out-of-vocabulary index 0; users and items
            without training history get the prior.
"""
import ast
import csv
import fnmatch
import gzip
import io
import json
import re
import shutil
import time
import tomllib
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from model_config import keys_of, parse_args
from util import ROOT, UserError, atomic_dir, atomic_write, md5_bytes, md5_file, read_json, run_cli, say, write_json

FORMAT_VERSION = 2  # 2: schema-driven, splits as memory-mappable .npy folders
SPLITS = ("train", "val", "test")
SCHEMA_DIR = ROOT / "schemas"
BUILTIN = {"ml-1m": "ml-1m", "ml-100k": "ml-100k", "synthetic": "ml-1m", "amazon": "amazon",
           "alibaba": "alibaba", "amazon-synthetic": "amazon", "alibaba-synthetic": "alibaba"}
ARCHIVES = {  # name: (url, md5 published by GroupLens beside the archive)
    "ml-1m": ("https://files.grouplens.org/datasets/movielens/ml-1m.zip", "c4d9eecfca2ab87c1945afe126590906"),
    "ml-100k": ("https://files.grouplens.org/datasets/movielens/ml-100k.zip",
                "0e33842e24a9c977be4e0107933c0723"),
}
WHERE_TO_GET = {
    "amazon": "get reviews_Electronics_5.json.gz and meta_Electronics.json.gz from "
              "https://jmcauley.ucsd.edu/data/amazon/ (2014; or the 2018 release's Electronics_5.json.gz and "
              "meta_Electronics.json.gz) and place them in {path}",
    "alibaba": "get raw_sample.csv, user_profile.csv and ad_feature.csv (Tianchi data set 56, "
               "https://tianchi.aliyun.com/dataset/56, login needed; extract the .tar.gz files) and place them "
               "in {path}",
}
ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                 "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
                 "Thriller", "War", "Western")
ML1M_GENRES = ML100K_GENRES[1:]
ML1M_AGES = (1, 18, 25, 35, 45, 50, 56)  # ML-1M age groups; ML-100K ages are mapped onto them
LEAK_NOTE = ("protocol 'paper' computes the mean-target features (user_mean_rating, item_mean_rating) of every "
             "split from that split's own labels, as the published IntTower code does: the label leaks into the "
             "features and AUC/logloss are optimistic; use --protocol random or temporal for leak-free numbers")
SEP = "\x1f"  # multi-character separators ('::') are rewritten to this byte for pandas' fast C parser
CHUNK_ROWS = 2_000_000  # rows per chunk when the cache's splits are written


# ================================================================ the schema

SCHEMA_KEYS = {"name", "description", "features", "download", "interactions", "users", "items", "label",
               "target_means", "split"}
TABLE_KEYS = {"files", "format", "sep", "header", "encoding", "columns", "optional_columns", "types", "ranges",
              "nullable", "na_values", "alternatives", "derive", "list_sep"}
SECTION_KEYS = {"interactions": TABLE_KEYS | {"user_key", "item_key", "timestamp"},
                "users": TABLE_KEYS | {"key", "missing", "only_keys_in_interactions"},
                "items": TABLE_KEYS | {"key", "title", "missing", "only_keys_in_interactions"}}
FEATURE_KEYS = {"name", "column", "side", "kind", "id", "sep", "max_len", "min_count", "hash_buckets", "norm",
                "prefix"}
TYPES = ("int", "float", "number", "str")
KINDS = ("categorical", "multi", "numeric")
NORMS = ("standardise", "log1p", "minmax")
MISSING = ("error", "drop", "oov")


def load_schema(source):
    """A schema from a TOML file or a built-in name (schemas/<name>.toml), checked: one-line errors naming
    the schema key."""
    path = Path(source) if str(source).endswith(".toml") or Path(source).exists() else SCHEMA_DIR / f"{source}.toml"
    try:
        schema = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"schema not found: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"schema {path}: not valid TOML ({e})") from None
    check_schema(schema, path)
    return schema


def check_schema(s, path):
    """Everything a schema can get wrong before any data is read, each check one line naming the key.

    Long on purpose: a flat list of independent checks in the order of the schema's sections, read top to
    bottom; splitting it would scatter the rules of one format over several places."""
    def bad(key, problem):
        raise UserError(f"schema {Path(path).name}: key {key}: {problem}")

    def known(d, allowed, where):
        if not isinstance(d, dict):
            bad(where, "must be a table")
        extra = sorted(set(d) - allowed)
        if extra:
            bad(f"{where}.{extra[0]}" if where else extra[0], f"unknown key (known: {', '.join(sorted(allowed))})")

    known(s, SCHEMA_KEYS, "")
    for key in ("name", "interactions", "label", "features"):
        if key not in s:
            bad(key, "missing")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(s["name"])):
        bad("name", f"letters, digits, '.', '_' and '-' only, got {s['name']!r}")
    data_keys = keys_of("data")
    for section in ("interactions", "users", "items"):
        if section not in s:
            continue
        t = s[section]
        known(t, SECTION_KEYS[section], section)
        t["file_columns"] = list(t.get("columns", []))  # before derived columns are added
        for key in ("files", "columns"):
            if not t.get(key):
                bad(f"{section}.{key}", "missing")
        t["files"] = [t["files"]] if isinstance(t["files"], str) else list(t["files"])
        if t.get("format", "csv") not in ("csv", "jsonl", "literal"):
            bad(f"{section}.format", f"csv, jsonl or literal, got {t['format']!r}")
        if len(set(t["columns"])) != len(t["columns"]):
            bad(f"{section}.columns", "a column is named twice")
        for key in ("types", "ranges"):
            for col in t.get(key, {}):
                if col not in t["columns"]:
                    bad(f"{section}.{key}.{col}", f"not one of {section}.columns")
        for col, kind in t.get("types", {}).items():
            if kind not in TYPES:
                bad(f"{section}.types.{col}", f"one of {', '.join(TYPES)}, got {kind!r}")
        for col in t.get("nullable", []):
            if col not in t["columns"]:
                bad(f"{section}.nullable", f"{col!r} is not one of {section}.columns")
        keys = ("user_key", "item_key", "timestamp") if section == "interactions" else ("key", "title")
        for key in keys:
            if key in t and t[key] not in t["columns"]:
                bad(f"{section}.{key}", f"{t[key]!r} is not one of {section}.columns ({', '.join(t['columns'])})")
        required = ("user_key", "item_key") if section == "interactions" else ("key", "missing")
        for key in required:
            if key not in t:
                bad(f"{section}.{key}", "missing" + (": say what happens to interactions whose key has no row "
                                                     "here (drop, oov or error)" if key == "missing" else ""))
        if section != "interactions" and t["missing"] not in MISSING:
            bad(f"{section}.missing", f"one of {', '.join(MISSING)}, got {t['missing']!r}")
        for k, d in enumerate(t.get("derive", [])):
            if not isinstance(d, dict) or "column" not in d or not (("bins" in d and "labels" in d)
                                                                   or ("flags" in d and "values" in d)):
                bad(f"{section}.derive[{k}]", "needs column and either bins + labels or flags + values")
            if "bins" in d and len(d["labels"]) != len(d["bins"]) + 1:
                bad(f"{section}.derive[{k}].labels", "one more label than bins")
            if "flags" in d and len(d["flags"]) != len(d["values"]):
                bad(f"{section}.derive[{k}].values", "one value per flag column")
            t["columns"] = list(t["columns"]) + ([d["column"]] if d["column"] not in t["columns"] else [])
    inter = s["interactions"]
    label = s["label"]
    known(label, {"column", "binary", "above", "drop", "drop_threshold"}, "label")
    if label.get("column") not in inter["columns"]:
        bad("label.column", f"{label.get('column')!r} is not one of interactions.columns")
    if not isinstance(s["features"], list) or not s["features"]:
        bad("features", "a list of at least one feature")
    names, ids = set(), set()
    for k, f in enumerate(s["features"]):
        where = f"features[{k}]"
        known(f, FEATURE_KEYS, where)
        for key in ("name", "column", "side"):
            if key not in f:
                bad(f"{where}.{key}", "missing")
        if f["name"] in names:
            bad(f"{where}.name", f"duplicate feature name {f['name']!r}")
        names.add(f["name"])
        if f["side"] not in ("user", "item"):
            bad(f"{where}.side", f"user or item, got {f['side']!r}")
        kind = f.setdefault("kind", "categorical")
        if kind not in KINDS:
            bad(f"{where}.kind", f"one of {', '.join(KINDS)}, got {kind!r}")
        table = "users" if f["side"] == "user" else "items"
        columns = list(s.get(table, {}).get("columns", [])) + list(inter["columns"])
        if f["column"] not in columns:
            bad(f"{where}.column", f"{f['column']!r} is not a column of {table} or interactions "
                                   f"({', '.join(dict.fromkeys(columns))})")
        if kind == "numeric":
            if f.setdefault("norm", "standardise") not in NORMS:
                bad(f"{where}.norm", f"one of {', '.join(NORMS)}, got {f['norm']!r}")
        elif "norm" in f:
            bad(f"{where}.norm", "only numeric features are normalised")
        if kind == "multi" and "sep" not in f:
            bad(f"{where}.sep", "a multi-valued feature needs its separator")
        if f.get("id"):
            if f["side"] in ids:
                bad(f"{where}.id", f"the {f['side']} tower already has an id feature")
            if kind != "categorical":
                bad(f"{where}.id", "the id feature must be categorical")
            ids.add(f["side"])
        for key in ("max_len", "min_count", "hash_buckets", "prefix"):
            if key in f and not (isinstance(f[key], int) and f[key] >= 0 or _is_ref(f[key])):
                bad(f"{where}.{key}", f"a non-negative integer, got {f[key]!r}")
    tm = s.get("target_means", {})
    known(tm, {"user", "item"}, "target_means")
    for section, values in _refs(s):
        if values[2:] not in data_keys:
            bad(section, f"{values!r} names no data option (model_config role 'data': "
                         f"{', '.join(sorted(data_keys))})")
    known(s.get("split", {}), {"temporal_test_days", "temporal_val_fraction", "day_offset_hours"}, "split")
    if s.get("split", {}).get("temporal_test_days") and "timestamp" not in inter:
        bad("split.temporal_test_days", "a day split needs interactions.timestamp")
    return s


def _is_ref(value):
    return isinstance(value, str) and value.startswith("--")


def _refs(d, where=""):
    """(schema key, "--option") of every value that refers to a config option."""
    items = d.items() if isinstance(d, dict) else enumerate(d) if isinstance(d, list) else ()
    for k, v in items:
        key = f"{where}.{k}" if isinstance(k, str) else f"{where}[{k}]"
        if _is_ref(v):
            yield key.lstrip("."), v
        elif isinstance(v, (dict, list)):
            yield from _refs(v, key)


def resolve_refs(d, cfg):
    """The schema with every "--option" value replaced by the config's value of that option."""
    if isinstance(d, dict):
        return {k: resolve_refs(v, cfg) for k, v in d.items()}
    if isinstance(d, list):
        return [resolve_refs(v, cfg) for v in d]
    return getattr(cfg, d[2:]) if _is_ref(d) else d


def schema_of(cfg, name):
    """The schema of the data set `name` (resolve_source): --schema FILE, else the built-in one."""
    if getattr(cfg, "schema", ""):
        return load_schema(cfg.schema)
    return builtin_schema(name)


def builtin_schema(name):
    s = load_schema(BUILTIN[name])
    s["name"] = name
    return s


# ================================================================ raw files

class Files:
    """Reads the files of a data set from a folder, a zip, or beside a given interactions file."""

    def __init__(self, path):
        self.path = Path(path)
        self.sources = {}
        self.zip = None
        self.explicit = None
        if not self.path.exists():
            raise UserError(f"data not found: {self.path}")
        if self.path.is_file() and self.path.suffix == ".zip" and self._archive():
            data = self._read_bytes(self.path)
            try:
                self.zip = zipfile.ZipFile(io.BytesIO(data))
            except zipfile.BadZipFile:
                raise UserError(f"{self.path}: not a zip file, or a truncated one") from None
            self.sources[self.path.name] = md5_bytes(data)
        elif self.path.is_file():
            self.explicit = self.path
            self.path = self.path.parent

    def _archive(self):
        """A zip given as the data path is an archive of the data set, unless it holds one file (a table)."""
        try:
            with zipfile.ZipFile(self.path) as z:
                return len([n for n in z.namelist() if not n.endswith("/")]) != 1
        except (zipfile.BadZipFile, OSError):
            return True

    def has(self, *names):
        return bool(self.find_all(names))

    def find_all(self, names):
        """Every file matching the first of `names` (a name or a glob) that matches anything."""
        if self.zip is not None:
            members = {Path(n).name: n for n in self.zip.namelist() if not n.endswith("/")}
            for pattern in names:
                hits = sorted(members[m] for m in fnmatch.filter(members, pattern))
                if hits:
                    return hits
            return []
        for pattern in names:
            hits = sorted(p for p in self.path.glob(pattern) if p.is_file())
            if hits:
                return hits
        return []

    def locate_all(self, names, ratings=False):
        """The files of a table (the file given by --data_path for the interactions), else an error."""
        if ratings and self.explicit is not None:
            return [self.explicit]
        found = self.find_all(names)
        if not found:
            raise UserError(f"{' or '.join(names)} not found in {self.path}" + (" (zip)" if self.zip else ""))
        return found

    def locate(self, names, ratings=False):
        return self.locate_all(names, ratings)[0]

    def read(self, names, ratings=False):
        return self.read_one(self.locate(names, ratings))

    def read_one(self, found):
        """(display name, decompressed bytes) of a file: plain, gzip (.gz) or a one-file zip (.zip)."""
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
        elif str(found).endswith(".zip"):
            try:
                with zipfile.ZipFile(io.BytesIO(data)) as z:
                    members = [n for n in z.namelist() if not n.endswith("/")]
                    if len(members) != 1:
                        raise UserError(f"{shown}: a zipped table must hold exactly one file, found {len(members)}")
                    data = z.read(members[0])
            except (zipfile.BadZipFile, EOFError, OSError) as e:
                raise UserError(f"{shown}: not a zip file, or a truncated one ({e})") from None
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
            elif str(found).endswith(".zip"):
                with zipfile.ZipFile(found) as z, z.open(z.namelist()[0]) as f:
                    raw = f.readline()
            else:
                with (gzip.open if str(found).endswith(".gz") else open)(found, "rb") as f:
                    raw = f.readline()
        except (OSError, EOFError, zipfile.BadZipFile) as e:
            raise UserError(f"{found}: cannot read ({e})") from None
        return raw.rstrip(b"\r\n")

    def checksums(self, names, ratings=False):
        """md5 of the files of a table, without parsing them (to find the cache)."""
        if self.zip is not None:
            return {}
        return {f.name: md5_file(f) for f in self.locate_all(names, ratings)}

    @staticmethod
    def _read_bytes(path):
        try:
            return Path(path).read_bytes()
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror}") from None


def check_text(shown, data, what):
    """Refuse binary data (random bytes, a compressed file without its suffix) in one line."""
    head = data[:65536]
    control = sum(head.count(bytes([b])) for b in list(range(0, 9)) + list(range(14, 32)) if b != 0x1f)
    if b"\x00" in head or control > max(3, len(head) // 100):
        kind = "gzip data: name it .gz" if head[:2] == b"\x1f\x8b" else "zip data: name it .zip" \
            if head[:2] == b"PK" else "binary data"
        raise UserError(f"{shown}: not a {what} text file ({kind}); is this the right file?")


def parse_table(shown, data, sep, columns, numeric, optional=0, encoding="latin-1", nullable=(), first_line=1):
    """Parse `sep`-separated lines into a DataFrame of strings with `columns` (the last `optional` ones may
    be absent on every line). Every malformed line is an error naming the file and line: nothing is
    dropped silently. Vectorised: pandas' C parser, then column-wise checks. (The slow, exact path: used
    to find what is wrong when the typed fast path fails, and for small files.)"""
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
            raise UserError(f"{shown} line {int(m[2]) + first_line - 1}: expected {m[1]} columns ({fmt}), "
                            f"found {m[3]}") from None
        raise UserError(f"{shown}: cannot parse ({e})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{shown}: not {encoding} text ({e})") from None
    n_cols = df.shape[1]
    if not len(columns) - optional <= n_cols <= len(columns):
        raise UserError(f"{shown} line {first_line}: expected {len(columns)} columns ({fmt}), found {n_cols}; "
                        f"is this the right file and separator ({sep if sep != SEP else '::'})?")
    df.columns = columns[:n_cols]
    # pandas pads short lines with empty strings; a field may never be empty unless declared nullable
    checked = [c for c in df.columns if c not in nullable]
    empty = (df[checked] == "").to_numpy()
    if empty.any():
        line = int(np.argmax(empty.any(axis=1)))
        raise UserError(f"{shown} line {line + first_line}: missing field(s), expected {fmt}")
    for col in numeric:
        if col not in df:
            continue
        values = pd.to_numeric(df[col], errors="coerce")
        bad = values.isna().to_numpy() | (values.to_numpy() % 1 != 0)
        if bad.any():
            line = int(np.argmax(bad))
            raise UserError(f"{shown} line {line + first_line}: {col} must be an integer, got {df[col].iat[line]!r}")
        df[col] = values.astype(np.int64)
    return df


@dataclass
class Table:
    """One table of a data set as read: its rows, and where each row came from (for error messages)."""
    df: pd.DataFrame
    origins: list  # (first row label, file shown, line number of that row) per file
    shown: str     # the files, for messages

    def where(self, label):
        """'file line N' of the row with index label `label`."""
        start, shown, line = next(o for o in reversed(self.origins) if o[0] <= label)
        return f"{shown} line {int(label) - start + line}"


def read_table(files, t, section, keys=None, ratings=False):
    """Read every file of a table as the schema's section `t` says; `keys` (a set of key values) keeps only the
    rows of those keys in line formats (Amazon's meta file: only the reviewed items are parsed)."""
    frames, origins, offset = [], [], 0
    for found in files.locate_all(t["files"], ratings):
        shown, data = files.read_one(found)
        fmt = t.get("format", "csv")
        check_text(shown, data, {"csv": "delimited", "jsonl": "JSON-lines", "literal": "JSON or Python-literal"}[fmt])
        if fmt == "csv":
            df, first = _read_csv(shown, data, t, section, big=section == "interactions")
        else:
            df, first = _read_lines(shown, data, t, section, keys)
        df.index = df.index + offset
        origins.append((offset, shown, first))
        offset += int(df.index.max()) + 1 - offset if len(df) else 0
        frames.append(df)
    df = frames[0] if len(frames) == 1 else pd.concat(frames)
    table = Table(df, origins, ", ".join(o[1] for o in origins))
    _typed(table, t)
    for d in t.get("derive", []):
        _derive(table.df, d)
    return table


def _read_csv(shown, data, t, section, big):
    """A delimited file, typed by the schema: pandas' C parser with dtypes (the fast path); when it fails,
    parse_table finds the file and line that is wrong."""
    sep, enc = t.get("sep", ","), t.get("encoding", "utf-8")
    columns, types, nullable = t["file_columns"], t.get("types", {}), set(t.get("nullable", []))
    ints = [c for c in columns if types.get(c) == "int"]
    raw_sep, original = sep, data
    if len(sep) > 1:
        if SEP.encode() in data:
            raise UserError(f"{shown}: unexpected control byte 0x1f in the file")
        data, sep = data.replace(sep.encode(), SEP.encode()), SEP
    end = data.find(b"\n")
    first = (data if end < 0 else data[:end]).rstrip(b"\r")
    if t.get("header", False):
        names = [n.strip().strip('"') for n in first.decode(enc, "replace").split(sep)]
        missing = [c for c in columns if c not in names]
        if missing:
            raise UserError(f"{shown}: schema key {section}.columns: {missing[0]!r} is not in the file's header "
                            f"({', '.join(names)})")
        kw, line0, body = {"skiprows": 1, "names": names, "usecols": columns}, 2, original[original.find(b"\n") + 1:]
    else:
        n = len(first.split(sep.encode()))
        optional = t.get("optional_columns", 0)
        if not len(columns) - optional <= n <= len(columns):
            raise UserError(f"{shown} line 1: expected {len(columns)} columns ({raw_sep.join(columns)}), found {n}; "
                            f"is this the right file and separator ({raw_sep})?")
        names = columns[:n]
        kw, line0, body = {"names": names}, 1, original
    dtype = {c: {"int": "int64", "float": "float64"}.get(types.get(c), "category" if big else "object")
             for c in names if c in columns}
    try:
        df = pd.read_csv(io.BytesIO(data), sep=sep, header=None, dtype=dtype, engine="c", encoding=enc,
                         quoting=csv.QUOTE_MINIMAL if sep == "," else csv.QUOTE_NONE, skip_blank_lines=False,
                         keep_default_na=False, na_values=[""] + list(t.get("na_values", [])), **kw)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError, OverflowError) as e:
        # the slow path says which line is wrong
        parse_table(shown, body, raw_sep, names, ints, optional=t.get("optional_columns", 0) if line0 == 1 else 0,
                    encoding=enc, nullable=nullable | (set(names) - set(columns)), first_line=line0)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{shown}: cannot parse ({reason})") from None
    df = df[[c for c in names if c in columns]]
    for col in df.columns:
        if col in nullable:
            continue
        empty = df[col].isna().to_numpy()
        if empty.any():
            row = int(np.argmax(empty))
            raise UserError(f"{shown} line {row + line0}: missing field(s) ({col} is empty), expected "
                            f"{raw_sep.join(names)}")
    return df, line0


def _parse_line(text):
    try:
        return json.loads(text)
    except ValueError:
        return ast.literal_eval(text)  # the 2014 Amazon meta files: one Python literal per line


def _read_lines(shown, data, t, section, keys):
    """One JSON object (format jsonl) or JSON object / Python literal (format literal) per line; only the
    schema's columns are kept, lists are flattened and joined by list_sep ('|')."""
    enc = t.get("encoding", "utf-8")
    try:
        lines = pd.Series(data.decode(enc).split("\n"))
    except UnicodeDecodeError as e:
        raise UserError(f"{shown}: not {enc} text ({e})") from None
    lines = lines[lines.str.strip() != ""]
    key = t.get("key") if section != "interactions" else None
    if keys is not None and key and t.get("only_keys_in_interactions"):
        found = lines.str.extract(r"""["']""" + re.escape(key) + r"""["']\s*:\s*["']([^"']*)["']""", expand=False)
        lines = lines[found.isin(keys).to_numpy()]
    columns, alternatives = t["file_columns"], t.get("alternatives", {})
    parse = json.loads if t.get("format") == "jsonl" else _parse_line
    records = []
    for label, text in zip(lines.index, lines.to_numpy()):
        try:
            obj = parse(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
            what = "JSON" if parse is json.loads else "JSON nor a Python literal"
            raise UserError(f"{shown} line {label + 1}: cannot parse the line (not {what}: "
                            f"{str(e).splitlines()[0][:80]})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{shown} line {label + 1}: expected an object ({{...}}), got {type(obj).__name__}")
        records.append([obj.get(c, obj.get(alternatives.get(c), None)) for c in columns])
    df = pd.DataFrame(records, columns=columns, index=lines.index)
    sep = t.get("list_sep", "|")
    for col in columns:
        values = df[col]
        is_list = values.map(lambda v: isinstance(v, list)).to_numpy() if len(values) else np.zeros(0, bool)
        if is_list.any():
            df.loc[is_list, col] = values[is_list].map(lambda v: sep.join(dict.fromkeys(
                str(x) for x in _flatten(v) if str(x).strip())))
    nullable = set(t.get("nullable", []))
    for col in columns:
        if col in nullable:
            continue
        empty = df[col].isna().to_numpy()
        if empty.any():
            raise UserError(f"{shown} line {df.index[int(np.argmax(empty))] + 1}: {col!r} is missing")
    return df, 1


def _flatten(values):
    for v in values:
        yield from (_flatten(v) if isinstance(v, list) else (v,))


def _typed(table, t):
    """Column types (int, float, number: '$12.99' accepted, unparsable -> missing) and ranges, checked."""
    df, nullable = table.df, set(t.get("nullable", []))
    for col, kind in t.get("types", {}).items():
        if col not in df or kind == "str":
            continue
        values = df[col]
        if kind == "number" and values.dtype == object:
            values = values.astype(str).str.replace(r"[$,\s]", "", regex=True)
        if values.dtype.kind not in "iuf":
            values = pd.to_numeric(values, errors="coerce")
        bad = values.isna().to_numpy() & ~df[col].isna().to_numpy() if kind == "number" else \
            values.isna().to_numpy() & ~(df[col].isna().to_numpy() & (col in nullable))
        if kind == "int":
            bad |= values.fillna(0).to_numpy() % 1 != 0
        if bad.any() and kind != "number":
            row = df.index[int(np.argmax(bad))]
            what = "an integer" if kind == "int" else "a number"
            raise UserError(f"{table.where(row)}: {col} must be {what}, got {df[col].loc[row]!r}")
        if kind == "int" and not values.isna().any():
            values = values.astype(np.int64)
        df[col] = values
    for col, (lo, hi) in t.get("ranges", {}).items():
        bad = ~df[col].between(lo, hi).to_numpy()
        if bad.any():
            row = df.index[int(np.argmax(bad))]
            raise UserError(f"{table.where(row)}: {col} must be {lo}-{hi}, got {df[col].loc[row]}")


def _derive(df, d):
    """A derived column: bins of a number (ML-100K ages onto ML-1M's groups), or the names of set flags
    joined by sep (ML-100K's 19 genre columns)."""
    if "bins" in d:
        df[d["column"]] = np.asarray(d["labels"])[np.searchsorted(d["bins"], df[d["column"]].to_numpy(), "right")]
        return
    flags = df[d["flags"]].to_numpy() == 1
    names = np.asarray(d["values"], dtype=object)
    empty = d.get("empty", "")
    df[d["column"]] = [d.get("sep", "|").join(names[row]) or empty for row in flags]


@dataclass
class Raw:
    """A data set as read: the interactions and the optional user and item tables, with their schema."""
    name: str
    schema: dict
    interactions: Table
    tables: dict = field(default_factory=dict)   # "users" / "items" -> Table
    sources: dict = field(default_factory=dict)  # file -> md5 of its bytes as found on disk

    @property
    def ratings(self):  # the interactions (MovieLens: the ratings)
        return self.interactions.df

    @property
    def users(self):
        return self.tables["users"].df if "users" in self.tables else None

    @property
    def items(self):
        return self.tables["items"].df if "items" in self.tables else None

    movies = items

    @property
    def has_timestamp(self):
        ts = self.schema["interactions"].get("timestamp")
        return ts is not None and ts in self.interactions.df


def read_source(schema, path, name=None):
    """Read the files of a data set as `schema` describes (the one reader of every data set)."""
    files = Files(path)
    inter = read_table(files, schema["interactions"], "interactions", ratings=True)
    tables = {}
    for side, section in (("user", "users"), ("item", "items")):
        if section not in schema:
            continue
        t = schema[section]
        key_col = schema["interactions"][f"{side}_key"]
        keys = set(inter.df[key_col].astype(str).unique()) if t.get("only_keys_in_interactions") else None
        table = read_table(files, t, section, keys)
        dup = table.df[t["key"]].duplicated().to_numpy()
        if dup.any():
            row = table.df.index[int(np.argmax(dup))]
            raise UserError(f"{table.where(row)}: {section} file: {t['key']} id {table.df[t['key']].loc[row]} "
                            f"appears twice")
        hit = inter.df[key_col].isin(table.df[t["key"]]).to_numpy()
        if len(hit) and not hit.any():
            raise UserError(f"schema key {section}.key: no {key_col} of {inter.shown} matches a {t['key']} of "
                            f"{table.shown} (e.g. {inter.df[key_col].iat[0]!r} and {table.df[t['key']].iat[0]!r}): "
                            f"do they hold the same ids?")
        if t["missing"] == "error" and not hit.all():
            row = inter.df.index[int(np.argmax(~hit))]
            raise UserError(f"{inter.where(row)}: {key_col} {inter.df[key_col].loc[row]} is not in the {section} "
                            f"file ({table.shown})")
        tables[section] = table
    return Raw(name or schema["name"], schema, inter, tables, files.sources)


def read_movielens(name, path):
    """An ML-1M, ML-100K or generated-sample release through its built-in schema."""
    return read_source(builtin_schema(name), path, name)


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


def generate_amazon(out_dir, n_users=2000, n_items=600, mean_reviews=12, seed=2022, release=2014):
    """reviews_Electronics_5.json.gz and meta_Electronics.json.gz in the McAuley 2014 format (JSON lines; meta
    lines are Python literals with single quotes, categories a list of lists), or the 2018 one (strict JSON,
    'category' a list, price "$x.xx"), with their quirks: items without price or categories, a reviewed item
    without a meta line, meta lines of items nobody reviewed. Ratings follow planted user/item affinities."""
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    d = 8
    users = np.array([f"A{x:013X}" for x in rng.choice(16**12, n_users, replace=False)])
    items = np.array([f"B00{x:07X}" for x in rng.choice(16**7, n_items, replace=False)])
    leaves = ["Cables & Accessories", "Headphones", "Cameras", "Laptops", "Monitors", "Car Electronics",
              "Portable Audio", "Tablets", "Printers", "Networking"]
    mids = ["Computers & Accessories", "Camera & Photo", "Accessories & Supplies", "Home Audio"]
    cat_vec = rng.normal(0, 1, (len(leaves), d))
    item_cat = rng.integers(0, len(leaves), n_items)
    item_vec = cat_vec[item_cat] + rng.normal(0, 0.7, (n_items, d))
    user_vec = rng.normal(0, 1, (n_users, d))
    n_rev = np.clip(rng.poisson(mean_reviews, n_users), 5, n_items)
    u = np.repeat(np.arange(n_users), n_rev)
    pop = rng.dirichlet(np.full(n_items, 0.5))
    i = np.concatenate([rng.choice(n_items, k, replace=False, p=pop) for k in n_rev])
    z = (user_vec[u] * item_vec[i]).sum(1) / np.sqrt(d) + rng.normal(0, 0.7, len(u)) + rng.normal(0, .4, n_items)[i]
    overall = (1 + np.searchsorted(np.quantile(z, [0.06, 0.12, 0.24, 0.47]), z)).astype(float)
    t = 1_200_000_000 + rng.integers(0, 200_000_000, len(u))
    reviews = []
    for k in range(len(u)):
        day = time.strftime("%m %d, %Y", time.gmtime(int(t[k])))
        reviews.append(json.dumps({"reviewerID": users[u[k]], "asin": items[i[k]], "reviewerName": f"user {u[k]}",
                                   "helpful": [int(k % 3), int(k % 5)], "reviewText": "It works. Good value.",
                                   "overall": overall[k], "summary": "Fine", "unixReviewTime": int(t[k]),
                                   "reviewTime": day}))
    metas = []
    extra = [f"B01{x:07X}" for x in rng.choice(16**7, max(1, n_items // 20), replace=False)]  # never reviewed
    for k, asin in enumerate(list(items[1:]) + extra):  # items[0] is reviewed but has no meta line
        c = item_cat[k + 1] if k + 1 < n_items else 0
        rec = {"asin": asin, "title": f"Gadget {k}" if k % 7 else f"Kid's Gadget {k}"}  # an apostrophe: "..." in repr
        if k % 9 != 3:
            price = round(float(np.exp(rng.normal(3, 1))), 2)
            rec["price"] = f"${price:.2f}" if release == 2018 else price
        rec["imUrl"] = f"http://ecx.images-amazon.com/images/I/{asin}.jpg"
        rec["salesRank"] = {"Electronics": int(rng.integers(1, 10**6))}
        if k % 11 != 5:
            path = ["Electronics", mids[c % len(mids)], leaves[c]]
            rec["category" if release == 2018 else "categories"] = path if release == 2018 else [path, ["Electronics"]]
        metas.append(json.dumps(rec) if release == 2018 else repr(rec))
    prefix = "" if release == 2018 else "reviews_"
    for name, lines in ((f"{prefix}Electronics_5.json.gz", reviews), ("meta_Electronics.json.gz", metas)):
        data = gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0)
        atomic_write(out / name, lambda tmp, data=data: Path(tmp).write_bytes(data))
    return out


ALIBABA_T0 = 1494000000  # 2017-05-06 00:00 in Beijing time, the log's first day


def generate_alibaba(out_dir, n_users=20000, n_items=5000, per_user=20, seed=2022, chunk=2_000_000):
    """raw_sample.csv, user_profile.csv and ad_feature.csv in the Tianchi format (headers; user_profile's last
    header name ends in a space; empty pvalue_level / new_user_class_level; brand NULL), 8 days of
    impressions, 5 % of users without a profile, clicks (~5 %) from planted user-segment x category
    affinities. Vectorised and written in chunks: 26 M rows (the real size) take a few minutes.
    One generative story (users, ads, impressions, clicks, files), read top to bottom: hence its length."""
    from tqdm import tqdm
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_cates, n_segments, d = max(20, n_items // 50), 97, 8
    user_ids = np.sort(rng.choice(max(2 * n_users, 10), n_users, replace=False)) + 1
    item_ids = np.sort(rng.choice(max(2 * n_items, 10), n_items, replace=False)) + 1
    segment = rng.integers(0, n_segments, n_users)
    seg_vec, cate_vec = rng.normal(0, 1, (n_segments, d)), rng.normal(0, 1, (n_cates, d))
    user_vec = seg_vec[segment] + rng.normal(0, 0.5, (n_users, d))
    cate = rng.integers(0, n_cates, n_items)
    item_vec = cate_vec[cate] + rng.normal(0, 0.5, (n_items, d))
    item_bias = rng.normal(0, 0.5, n_items)
    pop = rng.zipf(1.6, n_items).astype(float)
    pop /= pop.sum()
    profile = rng.random(n_users) > 0.05
    up = pd.DataFrame({"userid": user_ids[profile], "cms_segid": segment[profile] % 97,
                       "cms_group_id": segment[profile] % 13, "final_gender_code": 1 + segment[profile] % 2,
                       "age_level": rng.integers(0, 7, n_users)[profile],
                       "pvalue_level": rng.integers(1, 4, n_users)[profile].astype(str),
                       "shopping_level": rng.integers(1, 4, n_users)[profile],
                       "occupation": rng.integers(0, 2, n_users)[profile],
                       "new_user_class_level": rng.integers(1, 5, n_users)[profile].astype(str)})
    up.loc[rng.random(len(up)) < 0.5, "pvalue_level"] = ""
    up.loc[rng.random(len(up)) < 0.3, "new_user_class_level"] = ""
    ads = pd.DataFrame({"adgroup_id": item_ids, "cate_id": cate + 1, "campaign_id": rng.integers(1, n_items, n_items),
                        "customer": rng.integers(1, max(2, n_items // 3), n_items),
                        "brand": rng.integers(1, max(2, n_items // 8), n_items).astype(str),
                        "price": np.round(np.exp(rng.normal(4, 1.2, n_items)), 2)})
    ads.loc[rng.random(n_items) < 0.3, "brand"] = "NULL"

    def write_csv(name, df, header):
        def write(tmp):
            with open(tmp, "w", newline="") as f:
                f.write(header + "\n")
                df.to_csv(f, header=False, index=False)
        atomic_write(out / name, write)

    write_csv("user_profile.csv", up, ",".join(up.columns[:-1]) + ",new_user_class_level ")
    write_csv("ad_feature.csv", ads, ",".join(ads.columns))
    n = n_users * per_user
    bias = np.log(0.05 / 0.95)

    def write_samples(tmp):
        with open(tmp, "w", newline="") as f:
            f.write("user,time_stamp,adgroup_id,pid,nonclk,clk\n")
            for start in tqdm(range(0, n, chunk), desc="raw_sample.csv", unit="chunk", leave=False):
                m = min(chunk, n - start)
                u = rng.integers(0, n_users, m)
                i = rng.choice(n_items, m, p=pop)
                z = bias + 0.8 * (user_vec[u] * item_vec[i]).sum(1) / np.sqrt(d) + item_bias[i]
                clk = (rng.random(m) < 1 / (1 + np.exp(-z))).astype(np.int8)
                pd.DataFrame({"user": user_ids[u], "time_stamp": ALIBABA_T0 + rng.integers(0, 8 * 86400, m),
                              "adgroup_id": item_ids[i],
                              "pid": np.where(rng.random(m) < 0.6, "430548_1007", "430539_1007"),
                              "nonclk": 1 - clk, "clk": clk}).to_csv(f, header=False, index=False)
    atomic_write(out / "raw_sample.csv", write_samples)
    return out


# ================================================================ resolving what to read

def data_root(cfg):
    """--data_dir, relative to the project folder unless absolute."""
    return Path(cfg.data_dir) if Path(cfg.data_dir).is_absolute() else ROOT / cfg.data_dir


def resolve_source(cfg):
    """(dataset name, path) to read, downloading or generating as the config asks.

    --schema FILE reads --data_path (or <data_dir>/<schema name>). `--dataset auto` uses ML-1M when its files
    are found and otherwise says so in one line and falls back to the generated sample; an explicitly
    requested data set must exist, and so must a download that was asked for (--download): a failed one is an
    error that says where to place the files by hand."""
    data_dir = data_root(cfg)
    if getattr(cfg, "schema", ""):
        name = load_schema(cfg.schema)["name"]
        path = Path(cfg.data_path) if cfg.data_path else data_dir / name
        if not path.exists():
            raise UserError(f"data of schema {cfg.schema} not found in {path}: pass --data_path (a folder, a zip, "
                            f"or the interactions file)")
        return name, path
    if cfg.dataset.endswith("synthetic"):
        return cfg.dataset, Path(cfg.data_path) if cfg.data_path else synthetic_path(cfg, data_dir)
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
    if name in WHERE_TO_GET:
        if cfg.download:
            raise UserError(f"{name} has no download with a stable address and checksum: "
                            + WHERE_TO_GET[name].format(path=path))
        raise UserError(f"{name} not found in {path}: " + WHERE_TO_GET[name].format(path=path)
                        + f" (or pass --data_path; --dataset {name}-synthetic is a generated sample in its format)")
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
    """The generated sample of --dataset (synthetic: ML-1M format; amazon-synthetic, alibaba-synthetic), written
    on first use: --synthetic_users, --synthetic_items, --synthetic_ratings (per user), --synthetic_seed."""
    prefix = cfg.dataset if cfg.dataset.endswith("synthetic") else "synthetic"
    path = data_dir / (f"{prefix}-u{cfg.synthetic_users}-i{cfg.synthetic_items}-r{cfg.synthetic_ratings}"
                       f"-s{cfg.synthetic_seed}")
    if not (path / "movies.dat").exists() and not any(path.glob("*.gz")) and not (path / "ad_feature.csv").exists():
        generate = {"synthetic": generate_synthetic, "amazon-synthetic": generate_amazon,
                    "alibaba-synthetic": generate_alibaba}[prefix]
        with atomic_dir(path) as tmp:
            generate(tmp, cfg.synthetic_users, cfg.synthetic_items, cfg.synthetic_ratings, cfg.synthetic_seed)
    return path


NO_TIMESTAMP = ("protocol 'temporal' splits by time, but this ratings file has no timestamp column "
                "(UserID::MovieID::Rating): use --protocol random or paper, or a ratings file with timestamps")


def has_timestamp_column(schema, path):
    """Whether the interactions file has the schema's timestamp column (from its first line only)."""
    t = schema["interactions"]
    ts = t.get("timestamp")
    if ts is None:
        return False
    first = Files(path).first_line(t["files"], ratings=True)
    fmt = t.get("format", "csv")
    if fmt != "csv":
        try:
            return ts in _parse_line(first.decode(t.get("encoding", "utf-8"), "replace"))
        except (ValueError, SyntaxError, TypeError):
            return True  # the reader will say what is wrong with the line
    names = first.decode(t.get("encoding", "utf-8"), "replace").split(t.get("sep", ","))
    if t.get("header"):
        return ts in [n.strip().strip('"') for n in names]
    return t["file_columns"].index(ts) < len(names)


def resolve_protocol(cfg, name, path, schema=None):
    """--protocol, with auto resolved from the interactions file's first line: temporal when it has the
    schema's timestamp column, else random. A temporal split without timestamps is refused."""
    schema = schema or schema_of(cfg, name)
    has_ts = has_timestamp_column(schema, path)
    protocol = cfg.protocol if cfg.protocol != "auto" else ("temporal" if has_ts else "random")
    if protocol == "temporal" and not has_ts:
        raise UserError(no_timestamp(schema))
    return protocol


def no_timestamp(schema):
    if schema["interactions"].get("file_columns", [])[:3] == ["user", "item", "rating"]:
        return NO_TIMESTAMP
    ts = schema["interactions"].get("timestamp")
    return (f"protocol 'temporal' splits by time, but " + (f"the interactions file has no {ts!r} column" if ts else
            "the schema declares no interactions.timestamp") + ": use --protocol random or paper")


# ================================================================ features and splits

def split_rows(n, protocol, seed, timestamp=None, split=None, users=None, val="period"):
    """Row indices of train/val/test. Random: 80/20 train/test, then 20% of train for validation
    (seeded). Temporal: 80/10/10 by time (a stable sort, so every test timestamp >= every train one), or,
    when the schema's split gives temporal_test_days, the last N calendar days as test and a seeded
    fraction of the earlier days as validation (Alibaba's official split). Temporal with
    val="like_test" (and `users`, each row's user): validation_like_test."""
    split = split or {}
    if protocol == "temporal" and split.get("temporal_test_days"):
        day = (np.asarray(timestamp, np.int64) + int(split.get("day_offset_hours", 0) * 3600)) // 86400
        test = day > day.max() - split["temporal_test_days"]
        rest = np.flatnonzero(~test)
        held = np.random.default_rng(seed).random(len(rest)) < split.get("temporal_val_fraction", 0.1)
        return {"train": rest[~held], "val": rest[held], "test": np.flatnonzero(test)}
    if protocol == "temporal":
        order = np.argsort(timestamp, kind="stable")
        a, b = int(round(n * 0.8)), int(round(n * 0.9))
        if val == "like_test":
            return validation_like_test(order[:a], order[a:b], order[b:], users, seed)
        return {"train": order[:a], "val": order[a:b], "test": order[b:]}
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * 0.2))
    n_val = int(round((n - n_test) * 0.2))
    return {"test": np.sort(perm[:n_test]), "val": np.sort(perm[n_test:n_test + n_val]),
            "train": np.sort(perm[n_test + n_val:])}


def validation_like_test(train, period, test, users, seed):
    """A temporal validation split that looks like the test split. The 10% of rows before the test period
    come mostly from users who join in that period (63% of its rows on ML-1M, against 11% of the test
    rows coming from users without a training row), so validating on all of them tunes for cold users.
    Here validation keeps that period's rows of returning users (a row before the period) and the rows
    of a seeded sample of its new users, as many as make validation's share of rows from users without
    a training row closest to the test split's; the other new users' rows go to training. The choice
    reads user ids of the test period (how many rows of unseen users it has), never a label."""
    size = int(users.max()) + 1
    returning = np.zeros(size, bool)
    returning[users[train]] = True
    new_users = np.unique(users[period][~returning[users[period]]])
    new_users = new_users[np.random.default_rng([seed, 7]).permutation(len(new_users))]  # a stream of its own
    rank = np.full(size, len(new_users))
    rank[new_users] = np.arange(len(new_users))  # new users enter validation in this order
    period_rank, test_rank = rank[users[period]], rank[users[test]]
    in_period = np.zeros(size, bool)
    in_period[users[period]] = True
    # with the first m new users in validation: rows of unseen users in validation and in test
    val_new = np.concatenate([[0], np.cumsum(np.bincount(period_rank[period_rank < len(new_users)],
                                                          minlength=len(new_users)))])
    test_new = np.concatenate([[0], np.cumsum(np.bincount(test_rank[test_rank < len(new_users)],
                                                           minlength=len(new_users)))])
    old_rows = int((period_rank == len(new_users)).sum())
    never = int((~returning[users[test]] & ~in_period[users[test]]).sum())  # test users unseen in any case
    gap = np.abs(val_new / np.maximum(old_rows + val_new, 1) - (never + test_new) / max(len(test), 1))
    m = int(np.argmin(gap))
    to_val = (period_rank < m) | (period_rank == len(new_users))  # the first m new users, and every returning one
    return {"train": np.sort(np.concatenate([train, period[~to_val]])), "val": period[to_val], "test": test}


def encode(values, fit_values):
    """Ids 1..V for the values seen in `fit_values` (sorted), 0 for anything else (out of vocabulary)."""
    vocab = pd.Index(pd.unique(pd.Series(fit_values))).sort_values()
    return (vocab.get_indexer(values) + 1).astype(np.int32), vocab


def hash_ids(values, buckets):
    """Feature hashing: ids 1..buckets of the values' text (pandas' fixed-key SipHash: the same in every
    process), so a table's size is bounded whatever the number of distinct values."""
    text = np.asarray([str(v) for v in values], dtype=object)
    return (1 + pd.util.hash_array(text, categorize=False) % np.uint64(buckets)).astype(np.int64) \
        if len(text) else np.zeros(0, np.int64)


def factorize_sorted(values):
    """(codes, sorted unique values): -1 for missing values."""
    codes, uniques = pd.factorize(values)
    uniques = np.asarray(uniques)
    order = np.argsort(uniques, kind="stable")
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    codes = np.where(codes >= 0, rank[np.maximum(codes, 0)], -1)
    return codes, uniques[order]


def vocabulary(codes, uniques, counts, f, cap):
    """Ids of coded values: 1..V for the values counted at least max(min_count, 1) times in the fitting
    rows (sorted), hashed into hash_buckets (the feature's, or --hash_buckets when more values remain), 0 for
    the rest and missing values. Returns (ids, vocabulary, vocab_size, buckets)."""
    keep = counts >= max(f.get("min_count", 0), 1)
    buckets = f.get("hash_buckets", 0) or (cap if cap and keep.sum() > cap else 0)
    if buckets:
        lut = np.where(keep, hash_ids(uniques, buckets), 0)
        vocab, size = np.zeros(0, str), buckets + 1
    else:
        lut = np.where(keep, np.cumsum(keep), 0)
        vocab, size = uniques[keep], int(keep.sum()) + 1
    ids = np.where(codes >= 0, lut[np.maximum(codes, 0)] if len(lut) else 0, 0).astype(np.int32)
    return ids, vocab, size, buckets


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


def data_options(cfg):
    """The data-preparation keys of the config (model_config role 'data') besides protocol and seed,
    which name the cache folder: part of the cache key and of meta.json."""
    return {k: getattr(cfg, k) for k in sorted(keys_of("data") - {"protocol", "seed"})}


def label_rule(inter, label):
    """(label values (float32, all rows), rows kept): a binary column, or value > `above` with the values in
    `drop` (and the threshold itself when drop_threshold) dropped. Anything else is an error."""
    col = label["column"]
    values = inter.df[col]
    if values.dtype.kind not in "iuf":
        values = pd.to_numeric(values, errors="coerce")
        bad = values.isna().to_numpy()
        if bad.any():
            row = inter.df.index[int(np.argmax(bad))]
            raise UserError(f"{inter.where(row)}: label column {col} must be a number, got "
                            f"{inter.df[col].loc[row]!r}")
    values = values.to_numpy()
    if "above" in label:
        drop = set(label.get("drop", [])) | ({label["above"]} if label.get("drop_threshold") else set())
        keep = ~np.isin(values, list(drop)) if drop else np.ones(len(values), bool)
        return (values > label["above"]).astype(np.float32), keep
    bad = (values != 0) & (values != 1)
    if bad.any():
        row = inter.df.index[int(np.argmax(bad))]
        if label.get("binary"):
            raise UserError(f"{inter.where(row)}: label column {col} must be 0 or 1 (label.binary), got "
                            f"{inter.df[col].loc[row]}")
        raise UserError(f"schema key label: column {col} is neither binary (0/1) nor covered by a rule "
                        f"({inter.where(row)} has {inter.df[col].loc[row]}): set label.above (label = value > "
                        f"above) and, if needed, label.drop")
    return values.astype(np.float32), np.ones(len(values), bool)


class Plan:
    """Everything a data set's arrays are made of, fitted as the protocol says: labels, the rows of each split,
    per-field ids (of table rows, or of interaction rows), numeric values, mean-target features. The split
    arrays are gathered from it in chunks (split_arrays), the user and item tables once (catalog)."""

    def __init__(self, raw, cfg):
        protocol = self.protocol = cfg.protocol
        if protocol not in ("paper", "random", "temporal"):
            raise ValueError(f"build() needs a resolved protocol, got {protocol!r}")
        s = self.schema = resolve_refs(raw.schema, cfg)
        self.raw, self.cfg = raw, cfg
        if protocol == "temporal" and not raw.has_timestamp:
            raise UserError(no_timestamp(s))
        inter, df = raw.interactions, raw.interactions.df
        label_values, keep = label_rule(inter, s["label"])
        if not keep.any():
            raise UserError("no ratings left after dropping the neutral rating" if s["label"].get("drop_threshold")
                            else f"no interactions left after label.drop ({s['label'].get('drop')})")
        pos, keep = self._joins(df, keep)
        rows = None if keep.all() else np.flatnonzero(keep)
        self.sel = sel = (lambda a: a) if rows is None else (lambda a: a[rows])
        if not len(label_values if rows is None else rows):
            raise UserError("no interactions left after the joins (users.missing / items.missing = drop)")
        for side in ("user", "item"):
            if pos[side] is None:  # no side table: the table is the distinct keys of the interactions
                key_col = s["interactions"][f"{side}_key"]
                codes, uniques = factorize_sorted(sel(df[key_col].to_numpy()))
                pos[side] = codes
                self.tables[side] = (pd.DataFrame({key_col: uniques}), key_col)
            else:
                pos[side] = sel(pos[side])
        self.pos = pos
        self.labels = sel(label_values)
        n = self.n = len(self.labels)
        ts = s["interactions"].get("timestamp")
        self.timestamp = sel(df[ts].to_numpy()).astype(np.int64) if raw.has_timestamp else None
        self.splits = split_rows(n, protocol, cfg.seed, self.timestamp, s.get("split"), pos["user"], cfg.temporal_val)
        self.fit_rows = np.arange(n) if protocol == "paper" else self.splits["train"]
        self.size = {side: len(self.tables[side][0]) for side in ("user", "item")}
        self.fit_count = {side: np.bincount(pos[side][self.fit_rows], minlength=self.size[side] + 1)
                          for side in ("user", "item")}
        self._keys()
        self._features()

    def _joins(self, df, keep):
        """Each interaction's row in the user and item tables (T = the unknown row, for 'oov'), misses counted
        in self.join and dropped from `keep` where the schema says drop; returns (positions, keep)."""
        s, raw = self.schema, self.raw
        self.join, pos, self.tables = {}, {}, {}
        for side, section in (("user", "users"), ("item", "items")):
            key_col = s["interactions"][f"{side}_key"]
            if section in s:
                table = raw.tables[section]
                tdf = table.df.reset_index(drop=True)
                p = pd.Index(tdf[s[section]["key"]]).get_indexer(df[key_col])
                miss = p < 0
                policy = s[section]["missing"]
                n_miss = int((miss & keep).sum())
                self.join[section] = {"file": table.shown, "policy": policy, "interactions_without_row": n_miss,
                                      "keys_without_row": int(df[key_col][miss & keep].nunique()) if n_miss else 0}
                if n_miss:
                    say(f"{section}: {n_miss:,} interactions ({self.join[section]['keys_without_row']:,} keys) have "
                        f"no row in {table.shown}: " + ("dropped" if policy == "drop" else "out-of-vocabulary "
                                                         "features") + f" ({section}.missing = {policy})")
                if policy == "drop":
                    keep &= ~miss
                pos[side] = np.where(miss, len(tdf), p)
                self.tables[side] = (tdf, s[section]["key"])
            else:
                pos[side] = None
        return pos, keep

    def _keys(self):
        """int64 keys of every row and table row (the ids themselves when they are integers, else 1..T by
        table position, and T+1... for keys without a row)."""
        df, s = self.raw.interactions.df, self.schema
        self.keys, self.table_keys, self.names = {}, {}, {}
        for side in ("user", "item"):
            tdf, key = self.tables[side]
            col = s["interactions"][f"{side}_key"]
            if tdf[key].dtype.kind in "iu" and df[col].dtype.kind in "iu":
                self.keys[side] = self.sel(df[col].to_numpy()).astype(np.int64)
                self.table_keys[side] = tdf[key].to_numpy().astype(np.int64)
            else:
                p, size = self.pos[side], self.size[side]
                k = p.astype(np.int64) + 1
                missing = p == size
                if missing.any():
                    k[missing] = size + 1 + pd.factorize(self.sel(df[col].to_numpy())[missing])[0]
                self.keys[side] = k
                self.table_keys[side] = np.arange(1, size + 1, dtype=np.int64)
                self.names[side] = tdf[key].astype(str).to_numpy(dtype=str)

    def _features(self):
        """Every declared feature, by kind (_categorical, _multi_valued, _numeric), then the mean-target
        features and the towers' specs (meta.json "towers")."""
        s, df = self.schema, self.raw.interactions.df
        self.fields = {t: {"sparse": [], "multi": [], "dense": []} for t in ("user", "item")}
        self.vocab, self.info = {}, []
        for k, f in enumerate(s["features"]):
            if "prefix" in f and not f["prefix"]:
                continue  # a prefix feature switched off (--zip_prefix 0)
            side, kind = f["side"], f["kind"]
            tdf = self.tables[side][0]
            on_table = f["column"] in tdf
            values = tdf[f["column"]] if on_table else df[f["column"]]
            if "prefix" in f:
                values = values.astype("string").str[:f["prefix"]]
            info = {"name": f["name"], "side": side, "kind": kind, "column": f["column"],
                    "from": "table" if on_table else "interactions", "id": bool(f.get("id"))}
            add = {"categorical": self._categorical, "multi": self._multi_valued, "numeric": self._numeric}[kind]
            info.update(add(k, f, side, values, on_table))
            self.info.append(info)
        tm = s.get("target_means", {})
        self.means = None
        if tm:
            self.means = mean_features(self.protocol, self.splits, self.labels, self.pos["user"], self.pos["item"],
                                       self.size["user"] + 1, self.size["item"] + 1, self.cfg.mean_prior)
            for j, side in enumerate(("user", "item")):
                if side in tm:
                    self.fields[side]["dense"].append((tm[side], "mean", j, None))
        self.towers = {}
        for side in ("user", "item"):
            spec = self.fields[side]
            ids = [f["name"] for f in s["features"] if f["side"] == side and f.get("id")]
            self.towers[side] = {"sparse": [e[0] for e in spec["sparse"]], "multi": [e[0] for e in spec["multi"]],
                                 "dense": [e[0] for e in spec["dense"]], "id": ids[0] if ids else None}
            if not spec["sparse"] and not spec["multi"]:
                raise UserError(f"schema key features: the {side} tower needs at least one categorical or "
                                f"multi-valued feature")

    def _categorical(self, k, f, side, values, on_table):
        """Ids of a categorical feature (vocabulary from the fitting rows, min_count, hash_buckets)."""
        size, train = self.size[side], self.splits["train"]
        codes, uniques = factorize_sorted(values)
        if on_table:
            w = self.fit_count[side][:size]
            ok = codes >= 0
            counts = np.bincount(codes[ok], weights=w[ok], minlength=len(uniques))
        else:
            codes = self.sel(codes)
            fit = codes[self.fit_rows]
            counts = np.bincount(fit[fit >= 0], minlength=len(uniques))
        ids, vocab, vsize, buckets = vocabulary(codes, uniques, counts, f, self.cfg.hash_buckets)
        if on_table:
            array = np.append(ids, 0).astype(np.int32)  # the unknown row: out of vocabulary
            catalog = array[:size]
        else:
            array = ids
            catalog = np.full(size, np.bincount(ids[train]).argmax() if len(train) else 0, np.int32)
        entry = {"name": f["name"], "vocab_size": vsize}
        if buckets:
            entry["hash_buckets"] = buckets
        self.fields[side]["sparse"].append((entry, on_table, array, catalog))
        self.vocab[f["name"]] = np.asarray(vocab).astype(str)
        return {"vocab_size": vsize, "hash_buckets": buckets, "min_count": f.get("min_count", 0)}

    def _multi_valued(self, k, f, side, values, on_table):
        """Ids and mask of a multi-valued feature (a column of the side table)."""
        if not on_table:
            raise UserError(f"schema key features[{k}].column: a multi-valued feature must be a column of "
                            f"the {side}s table, not of the interactions")
        ids, mask, vocab, vsize, buckets = self._multi(values, f, side)
        entry = {"name": f["name"], "vocab_size": vsize, "max_len": int(ids.shape[1])}
        if buckets:
            entry["hash_buckets"] = buckets
        self.fields[side]["multi"].append((entry, ids, mask))
        self.vocab[f["name"]] = np.asarray(vocab).astype(str)
        return {"vocab_size": vsize, "max_len": int(ids.shape[1]), "hash_buckets": buckets}

    def _numeric(self, k, f, side, values, on_table):
        """A numeric feature, normalised with statistics of the training rows (missing values: the fill)."""
        size, train, pos = self.size[side], self.splits["train"], self.pos[side]
        x = pd.to_numeric(values, errors="coerce").to_numpy(np.float64)
        fit_values = np.append(x, np.nan)[pos[train]] if on_table else self.sel(x)[train]
        y, fill, stats = normalise(x, fit_values, f["norm"])
        array = np.append(y, fill).astype(np.float32) if on_table else self.sel(y).astype(np.float32)
        self.fields[side]["dense"].append((f["name"], on_table, array,
                                           array[:size] if on_table else np.full(size, fill, np.float32)))
        return {"norm": f["norm"], "fill": fill, "missing": int(np.isnan(x).sum()), **stats}

    def _multi(self, values, f, side):
        """(T+1, L) ids and mask of a multi-valued table column ('a|b|c'), vocabulary fitted as categorical."""
        size = self.size[side]
        lists = values.fillna("").astype(str).reset_index(drop=True).str.split(f["sep"], regex=False).explode()
        tokens = lists.to_numpy(object)
        owner = lists.index.to_numpy()
        ok = (tokens != "") & pd.notna(tokens)
        tokens, owner = tokens[ok], owner[ok]
        starts = np.r_[0, np.flatnonzero(np.diff(owner)) + 1] if len(owner) else np.zeros(0, np.int64)
        pos = np.arange(len(owner)) - np.repeat(starts, np.diff(np.r_[starts, len(owner)]))
        longest = int(pos.max()) + 1 if len(pos) else 1
        max_len = max(1, min(f.get("max_len") or longest, longest))
        inside = pos < max_len
        tokens, owner, pos = tokens[inside], owner[inside], pos[inside]
        codes, uniques = factorize_sorted(tokens)
        w = self.fit_count[side][:size][owner]
        counts = np.bincount(codes, weights=w, minlength=len(uniques))
        codes_ids, vocab, vsize, buckets = vocabulary(codes, uniques, counts, f, self.cfg.hash_buckets)
        ids = np.zeros((size + 1, max_len), np.int32)
        mask = np.zeros((size + 1, max_len), np.float32)
        ids[owner, pos] = codes_ids
        mask[owner, pos] = 1.0
        return ids, mask, vocab, vsize, buckets

    def split_arrays(self, split, lo=0, hi=None):
        """The arrays of rows lo:hi of a split (model inputs named as tower_inputs says, label, keys, time)."""
        rows = self.splits[split][lo:hi]
        out = {}
        for side in ("user", "item"):
            spec, p = self.fields[side], self.pos[side][rows]
            if spec["sparse"]:
                a = np.empty((len(rows), len(spec["sparse"])), np.int32)
                for j, (_, on_table, array, _) in enumerate(spec["sparse"]):
                    a[:, j] = array[p] if on_table else array[rows]
                out[f"{side}_sparse"] = a
            for entry, ids, mask in spec["multi"]:
                out[f"{side}_{entry['name']}"], out[f"{side}_{entry['name']}_mask"] = ids[p], mask[p]
            if spec["dense"]:
                d = np.empty((len(rows), len(spec["dense"])), np.float32)
                for j, (_, on_table, array, _) in enumerate(spec["dense"]):
                    d[:, j] = self.means[0][split][lo:hi, array] if on_table == "mean" else \
                        array[p] if on_table else array[rows]
                out[f"{side}_dense"] = d
        out["label"] = self.labels[rows]
        out["user_key"], out["item_key"] = self.keys["user"][rows], self.keys["item"][rows]
        if self.timestamp is not None:
            out["timestamp"] = self.timestamp[rows]
        return out

    def catalog(self):
        """The user and item tables (one row per user / item: what export.py indexes) and the vocabularies."""
        out = {}
        for side, name in (("user", "users"), ("item", "items")):
            spec, size = self.fields[side], self.size[side]
            t = {"key": self.table_keys[side]}
            if side in self.names:
                t["name"] = self.names[side]
            if side == "item":
                tdf, key = self.tables[side]
                col = self.schema.get("items", {}).get("title")
                title = tdf[col].astype(object).where(tdf[col].notna(), tdf[key].astype(str)) if col else tdf[key]
                t["title"] = title.astype(str).to_numpy(dtype=str)
            if spec["sparse"]:
                t[f"{side}_sparse"] = np.stack([e[3] for e in spec["sparse"]], 1).astype(np.int32)
            for entry, ids, mask in spec["multi"]:
                t[f"{side}_{entry['name']}"], t[f"{side}_{entry['name']}_mask"] = ids[:size], mask[:size]
            if spec["dense"]:
                cols = [self.means[1 + array][:size] if on_table == "mean" else catalog
                        for _, on_table, array, catalog in spec["dense"]]
                t[f"{side}_dense"] = np.stack(cols, 1).astype(np.float32)
            out[name] = t
        out["vocab"] = self.vocab
        return out

    def meta(self):
        """meta.json: what was built, how, and what the models need to know about it (towers, inputs)."""
        raw, cfg, protocol, towers = self.raw, self.cfg, self.protocol, self.towers
        def oov(split, side):
            spec = self.fields[side]["sparse"]
            idx = next((j for j, e in enumerate(spec) if e[0]["name"] == towers[side]["id"]), 0)
            rows = self.splits[split]
            if not len(rows) or not spec:
                return 0.0
            _, on_table, array, _ = spec[idx]
            return float(np.mean((array[self.pos[side][rows]] if on_table else array[rows]) == 0))
        ids = {side: towers[side]["id"] or (towers[side]["sparse"][0]["name"] if towers[side]["sparse"] else side)
               for side in ("user", "item")}
        leaky = protocol == "paper" and bool(self.schema.get("target_means"))
        return {
            "format_version": FORMAT_VERSION, "dataset": raw.name, "synthetic": raw.name.endswith("synthetic"),
            "protocol": protocol, "seed": cfg.seed, "leaky": leaky,
            "note": LEAK_NOTE if leaky else "leak-free: vocabularies and statistics from training rows"
            if protocol != "paper" else "random split, vocabularies from all rows; no mean-target features",
            "options": data_options(cfg), "has_timestamp": raw.has_timestamp, "towers": towers,
            "inputs": tower_inputs(towers, "user") + tower_inputs(towers, "item"),
            "rows": {s: int(len(rows)) for s, rows in self.splits.items()},
            "positive_rate": {s: float(self.labels[rows].mean()) if len(rows) else float("nan")
                              for s, rows in self.splits.items()},
            "oov_rate": {s: {ids["user"]: oov(s, "user"), ids["item"]: oov(s, "item")} for s in self.splits},
            "ratings_read": int(len(raw.interactions.df)), "interactions_used": int(self.n),
            "join": self.join, "fields": self.info, "label": self.schema["label"],
            "split": self.schema.get("split", {}),
            "embedding_rows": {side: int(sum(f["vocab_size"] for f in towers[side]["sparse"] + towers[side]["multi"]))
                               for side in towers},
            "schema": {"name": self.schema["name"], "md5": schema_md5(raw.schema)}, "sources": raw.sources,
        }


def normalise(x, fit, norm):
    """A numeric column normalised with statistics of the training rows `fit`; missing values (NaN) take the
    training mean of the normalised values. Returns (values, fill, statistics)."""
    fit = fit[~np.isnan(fit)]
    if norm == "log1p":
        y, stats = np.log1p(np.maximum(x, 0)), {}
        fy = np.log1p(np.maximum(fit, 0))
    elif norm == "minmax":
        lo, hi = (float(fit.min()), float(fit.max())) if len(fit) else (0.0, 1.0)
        span = hi - lo if hi > lo else 1.0
        y, stats, fy = (x - lo) / span, {"min": lo, "max": hi}, (fit - lo) / span
    else:
        mean, std = (float(fit.mean()), float(fit.std())) if len(fit) else (0.0, 1.0)
        std = std if std > 0 else 1.0
        y, stats, fy = (x - mean) / std, {"mean": mean, "std": std}, (fit - mean) / std
    fill = float(fy.mean()) if len(fy) else 0.0
    return np.where(np.isnan(y), fill, y), fill, stats


def schema_md5(schema):
    return md5_bytes(json.dumps(schema, sort_keys=True, default=str).encode())


def build(raw, cfg):
    """Split the interactions, fit vocabularies and statistics as cfg.protocol (resolved: see resolve_protocol)
    says, and return (meta, {split: arrays}, {"users": table, "items": table, "vocab": arrays}) in memory."""
    plan = Plan(raw, cfg)
    return plan.meta(), {s: plan.split_arrays(s) for s in SPLITS}, plan.catalog()


def tower_inputs(towers, tower):
    """Names of a tower's input arrays, in order: sparse ids, multi-valued ids + mask per field, dense values.
    A model takes the user tower's, then the item tower's."""
    spec, names = towers[tower], []
    names += [f"{tower}_sparse"] if spec["sparse"] else []
    for m in spec["multi"]:
        names += [f"{tower}_{m['name']}", f"{tower}_{m['name']}_mask"]
    names += [f"{tower}_dense"] if spec["dense"] else []
    return names


def id_field(towers, tower):
    """Index in `{tower}_sparse` of the tower's id field (the schema's `id = true`; else the first field)."""
    names = [f["name"] for f in towers[tower]["sparse"]]
    return names.index(towers[tower]["id"]) if towers[tower].get("id") in names else 0


def dense_fills(meta):
    """The value of each numeric feature for a user or item without a row (its training fill: the
    normalised training mean, as the tables' unknown row); mean-label features are not in it (the prior)."""
    return {f["name"]: f["fill"] for f in meta.get("fields", []) if f.get("kind") == "numeric"}


def unknown_inputs(towers, tower, prior, fills=None):
    """One row of a tower's inputs for a user or item with no row in the tables: out-of-vocabulary ids,
    no multi-valued ids, each numeric feature's training fill (dense_fills) and the training positive rate
    `prior` as every mean-label feature (no history)."""
    spec, rows, fills = towers[tower], {}, fills or {}
    if spec["sparse"]:
        rows[f"{tower}_sparse"] = np.zeros((1, len(spec["sparse"])), np.int32)
    for m in spec["multi"]:
        rows[f"{tower}_{m['name']}"] = np.zeros((1, m["max_len"]), np.int32)
        rows[f"{tower}_{m['name']}_mask"] = np.zeros((1, m["max_len"]), np.float32)
    if spec["dense"]:
        rows[f"{tower}_dense"] = np.array([[fills.get(name, prior) for name in spec["dense"]]], np.float32)
    return rows


# ================================================================ cache

@dataclass
class Dataset:
    meta: dict
    path: Path

    def arrays(self, name, mmap=None):
        """All arrays (dict name -> numpy array) of a split (train, val, test) or a table (users, items, vocab).
        Splits are memory-mapped read-only from the cache's .npy files (plain ndarray views of the mapping:
        pages are read as batches touch them); tables, and splits with mmap=False, are read into memory."""
        mmap = name in SPLITS if mmap is None else mmap
        folder = self.path / name
        if not folder.is_dir():
            raise UserError(f"cannot read {folder} (missing); delete the cache folder to rebuild it")
        out = {}
        for path in sorted(folder.glob("*.npy"), key=lambda p: self.meta.get("order", {}).get(name, []).index(p.stem)
                           if p.stem in self.meta.get("order", {}).get(name, []) else 1 << 30):
            try:
                try:
                    array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
                    out[path.stem] = array.view(np.ndarray) if mmap else array  # MindSpore refuses np.memmap
                except ValueError:  # an empty array cannot be mapped
                    out[path.stem] = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise UserError(f"cannot read {path} ({e}); delete the cache folder to rebuild it") from None
        return out


def cache_key(name, sources, protocol, cfg, schema=None):
    key = {"v": FORMAT_VERSION, "dataset": name, "sources": sources, "protocol": protocol, "seed": cfg.seed,
           "options": data_options(cfg), "schema": schema_md5(schema) if schema else None}
    return md5_bytes(json.dumps(key, sort_keys=True).encode())[:12]


def source_checksums(name, path, schema=None):
    """md5 of every source file, without parsing them (to find the cache)."""
    schema = schema or builtin_schema(name)
    files = Files(path)
    if files.zip is not None:
        return dict(files.sources)
    sums = {}
    for section in ("interactions", "users", "items"):
        if section in schema:
            sums.update(files.checksums(schema[section]["files"], ratings=section == "interactions"))
    return sums


def write_cache(plan, folder):
    """The cache folder, atomically: each split's arrays as .npy files written in chunks of CHUNK_ROWS rows
    (memory stays bounded whatever the number of rows), the tables, meta.json last."""
    from tqdm import tqdm
    meta = plan.meta()
    order = {}
    with atomic_dir(folder) as tmp:
        total = sum(len(plan.splits[s]) for s in SPLITS)
        with tqdm(total=total, unit="row", unit_scale=True, desc="write splits", disable=total < 5 * CHUNK_ROWS,
                  leave=False) as bar:
            for s in SPLITS:
                n = len(plan.splits[s])
                (tmp / s).mkdir()
                files = None
                for lo in range(0, max(n, 1), CHUNK_ROWS):
                    part = plan.split_arrays(s, lo, lo + CHUNK_ROWS)
                    if files is None:
                        order[s] = list(part)
                        files = {k: np.lib.format.open_memmap(tmp / s / f"{k}.npy", mode="w+", dtype=v.dtype,
                                                              shape=(n, *v.shape[1:])) if n else None
                                 for k, v in part.items()}
                        if not n:
                            for k, v in part.items():
                                np.save(tmp / s / f"{k}.npy", v)
                    if n:
                        for k, v in part.items():
                            files[k][lo:lo + len(v)] = v
                    bar.update(len(part["label"]))
                for f in (files or {}).values():
                    if f is not None:
                        f.flush()
                del files
        for name, arrays in plan.catalog().items():
            (tmp / name).mkdir()
            order[name] = list(arrays)
            for k, v in arrays.items():
                np.save(tmp / name / f"{k}.npy", v)
        meta["order"] = order
        meta["source_path"] = str(plan.raw_path)
        meta["build_seconds"] = round(time.perf_counter() - plan.started, 2)
        meta["cache_bytes"] = sum(p.stat().st_size for p in tmp.rglob("*.npy"))
        write_json(tmp / "meta.json", meta)
    return meta


def load_dataset(cfg, quiet=False):
    """The preprocessed data set for this config, from the cache or built now (atomically)."""
    name, path = resolve_source(cfg)
    schema = schema_of(cfg, name)
    sources = source_checksums(name, path, schema)
    protocol = resolve_protocol(cfg, name, path, schema)
    cfg = cfg.replace(protocol=protocol)
    folder = data_root(cfg) / "cache" / f"{name}-{protocol}-seed{cfg.seed}-{cache_key(name, sources, protocol, cfg, schema)}"
    if (folder / "meta.json").exists():
        meta = read_json(folder / "meta.json", "cache metadata")
        if not quiet:
            say(f"data: {name} ({path}), protocol {protocol}, cached in {folder}")
    else:
        started = time.perf_counter()
        raw = read_source(schema, path, name)
        plan = Plan(raw, cfg)
        plan.raw_path, plan.started = path, started
        del raw
        meta = write_cache(plan, folder)
        if not quiet:
            say(f"data: {name} ({path}), protocol {protocol}: built {folder} in {meta['build_seconds']} s")
    if meta["leaky"] and not quiet:
        say(f"WARNING: {LEAK_NOTE}")
    if meta["synthetic"] and not quiet:
        say(f"NOTE: this is a generated sample (synthetic data) in the {BUILTIN.get(name, name)} format, not the "
            f"real data set")
    return Dataset(meta, folder)


def main():
    cfg, _ = parse_args(prog="get_dataset.py", description=__doc__.split("\n\n")[0])
    data = load_dataset(cfg)
    m = data.meta
    say(f"{m['dataset']} / {m['protocol']}: rows " + ", ".join(f"{s} {m['rows'][s]:,}" for s in SPLITS)
        + "; positive rate " + ", ".join(f"{s} {m['positive_rate'][s]:.3f}" for s in SPLITS))
    say("fields: " + ", ".join(f"{f['name']} ({f['vocab_size']})" for t in m["towers"].values()
                               for f in t["sparse"] + t["multi"]))
    say("rows whose id has no training row (out of vocabulary): " + "; ".join(
        f"{s} " + ", ".join(f"{name} {rate:.1%}" for name, rate in m["oov_rate"][s].items()) for s in ("val", "test")))
    for section, j in m.get("join", {}).items():
        if j["interactions_without_row"]:
            say(f"join: {j['interactions_without_row']:,} interactions without a row in {section} ({j['policy']})")
    say(f"cache: {data.path}")


if __name__ == "__main__":
    run_cli(main)
