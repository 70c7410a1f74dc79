"""export.py / infer.py: exported graphs reproduce the checkpoint, the index scorer reproduces the model, and
every fast scoring path (batched, compressed, IVF) equals exact float32 MaxSim or stays within its tolerance."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import train
from conftest import ROOT, needs_gxx, train_and_export
from export import export_run
import scorer as scorer_module
from scorer import (CompressedIndex, IVFRetriever, MaxSimIndex, Scorer, best_first, maxsim, maxsim_batch,
                    maxsim_kernel)
from model_config import Config
from util import UserError

e2e = pytest.mark.e2e  # tests of the `run` fixture: it trains and exports a model


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serving")
    return train_and_export(tmp, epochs=2), tmp / "run"


def model_and_data(cfg, run):
    import get_dataset
    from runtime import load_model, trained_run
    _, ckpt, run_cfg, meta = trained_run(Config(run_dir=str(run)), {"run_dir"})
    model = load_model(meta, run_cfg, ckpt)
    model.set_train(False)
    return model, meta, get_dataset.load_dataset(run_cfg, quiet=True)


def catalogue(n, heads=4, dim=16, clusters=50, seed=0):
    """A generated head-major index with structure (items around cluster centres, as trained ones are)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, heads, dim))
    items = centres[rng.integers(0, clusters, n)] + 0.5 * rng.normal(size=(n, heads, dim))
    return np.ascontiguousarray(items.transpose(1, 0, 2).astype(np.float32)), rng


def test_maxsim_batch_equals_maxsim():
    index, rng = catalogue(700)
    users = rng.normal(size=(5, 3, 4, 16)).astype(np.float32)
    got = maxsim_batch(users, index)
    assert got.shape == (5, 700)
    for u in range(5):
        np.testing.assert_allclose(got[u], maxsim(users[u], index), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("users, heads, dim, n", [(1, 1, 1, 1), (4, 4, 64, 1000), (12, 4, 64, 17), (13, 3, 5, 16),
                                                 (30, 2, 7, 40), (5, 4, 16, 15)])
@needs_gxx
def test_maxsim_kernel_equals_maxsim(users, heads, dim, n):
    """The C++ kernel (maxsim_index.cc) against the NumPy reference: user heads across several register chunks
    (12 with AVX-512, 6 without), any head count and width, partial last tiles; a NaN product is the maximum."""
    kernel = maxsim_kernel()
    rng = np.random.default_rng(users * 1000 + n)
    index = rng.normal(size=(heads, n, dim)).astype(np.float32)
    tiled = MaxSimIndex(index, kernel)
    assert kernel.tile in (4, 8, 16) and tiled.items.shape == (-(-n // kernel.tile), heads, dim, kernel.tile)
    for _ in range(3):
        user = rng.normal(size=(users, dim)).astype(np.float32)
        want = maxsim(user, index)
        np.testing.assert_allclose(tiled.scores(user), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    index[heads - 1, n // 2, 0] = np.nan  # one value of one item's last head: that item's score only
    got, want = MaxSimIndex(index, kernel).scores(user), maxsim(user, index)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.isnan(got).sum() == 1


@needs_gxx
@pytest.mark.parametrize("march, width", [("x86-64", 4), ("x86-64-v3", 8)])
def test_maxsim_kernel_built_for_narrower_registers(march, width):
    """The kernel as built for a CPU without AVX-512 (tiles of 8 items with AVX2, 4 with SSE; 6 user heads per
    pass) against the NumPy reference, here on whatever x86-64 CPU runs the tests."""
    import platform
    if platform.machine() != "x86_64":
        pytest.skip("x86-64 builds")
    if march == "x86-64-v3" and "avx2" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("this CPU has no AVX2")
    kernel = maxsim_kernel(march)
    assert kernel.tile == width
    rng = np.random.default_rng(width)
    for users, heads, dim, n in ((13, 3, 5, 21), (12, 4, 64, 300), (1, 1, 1, 1)):
        index = rng.normal(size=(heads, n, dim)).astype(np.float32)
        user = rng.normal(size=(users, dim)).astype(np.float32)
        want = maxsim(user, index)
        np.testing.assert_allclose(MaxSimIndex(index, kernel).scores(user), want, rtol=1e-5,
                                   atol=1e-5 * np.abs(want).max())


@needs_gxx
def test_maxsim_kernel_splits_a_request_between_threads():
    """MaxSimIndex.scores(user, threads): consecutive tile ranges, the first in the calling thread, the others in
    the pool, at least MAXSIM_SPLIT items each; the same scores as one thread."""
    import threading
    from scorer import MAXSIM_SPLIT
    kernel = maxsim_kernel()
    rng = np.random.default_rng(5)
    index = rng.normal(size=(2, 3 * MAXSIM_SPLIT + 5, 8)).astype(np.float32)
    user = rng.normal(size=(3, 2, 8)).astype(np.float32)
    calls = []
    spy = kernel._replace(score=lambda *args: (calls.append((args[5], args[6], threading.get_ident())),
                                               kernel.score(*args)))
    tiled = MaxSimIndex(index, spy)
    want = maxsim(user, index)
    for threads, parts in ((1, 1), (2, 2), (3, 3), (8, 3)):  # 3 parts at most: MAXSIM_SPLIT items each
        calls.clear()
        np.testing.assert_allclose(tiled.scores(user, threads), want, rtol=1e-5, atol=1e-4)
        ranges = sorted(c[:2] for c in calls)
        assert len(ranges) == parts and ranges[0][0] == 0 and ranges[-1][1] == len(tiled.items)
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        here = [c[0] for c in calls if c[2] == threading.get_ident()]
        assert here == [0]  # the first part in this thread, every other in the pool


def test_scorer_without_a_compiler_scores_in_numpy(monkeypatch, capsys):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert maxsim_kernel.__wrapped__() is None
    assert "MaxSim scores in NumPy (the C++ kernels did not build" in capsys.readouterr().err
    index, rng = catalogue(50)
    fallback = MaxSimIndex(index, None)  # what the Scorer and the IVF's cells hold then: the index itself
    assert fallback.items is index
    user = rng.normal(size=(3, 4, 16)).astype(np.float32)
    np.testing.assert_array_equal(fallback.scores(user, threads=2), maxsim(user, index))


@pytest.mark.parametrize("kind, tolerance", [("int8", 1e-2), ("bfloat16", 5e-3), ("float16", 1e-3)])
def test_compressed_index_within_tolerance_and_rescored_exactly(kind, tolerance):
    index, rng = catalogue(3000)
    compressed = CompressedIndex(index, kind, block=256)  # several blocks and a partial last one
    assert compressed.nbytes < index.nbytes
    for _ in range(3):
        user = rng.normal(size=(3, 4, 16)).astype(np.float32)
        exact = maxsim(user, index)
        approx = compressed.scores(user)
        assert np.abs(approx - exact).max() <= tolerance * np.abs(exact).max()
        rows, scores = compressed.top_k(user, 50)
        np.testing.assert_array_equal(scores, exact[rows])  # the shortlist is re-scored in float32
        assert list(scores) == sorted(scores, reverse=True)
        assert len(set(rows) & set(best_first(exact, 50))) >= 49


@pytest.mark.parametrize("scoring", ["numpy", pytest.param("kernel", marks=needs_gxx)])
def test_ivf_recall_on_generated_catalogue(scoring):
    kernel = maxsim_kernel() if scoring == "kernel" else None
    index, rng = catalogue(20000)
    ivf = IVFRetriever(index, lists=64, seed=1, kernel=kernel)
    assert sorted(ivf.items) == list(range(20000)) and ivf.offsets[-1] == 20000
    user = rng.normal(size=(3, 4, 16)).astype(np.float32)
    for c, cell in enumerate(ivf.cells):  # each cell holds its own items, in order, in the kernel's layout
        assert cell.kernel is kernel and cell.items.ndim == (3 if kernel is None else 4)
        assert cell.items.flags.c_contiguous  # a gather of rows is not: maxsim() reads contiguous slabs
        own = index[:, ivf.items[ivf.offsets[c]:ivf.offsets[c + 1]]]
        np.testing.assert_allclose(cell.scores(user), maxsim(user, own), rtol=1e-5, atol=1e-4)
    recalls = []
    for _ in range(5):
        user = rng.normal(size=(3, 4, 16)).astype(np.float32)
        exact = maxsim(user, index)
        truth = set(best_first(exact, 100))
        rows, scores = ivf.top_k(user, 100, nprobe=16)  # a quarter of the cells
        np.testing.assert_allclose(scores, exact[rows], rtol=1e-5, atol=1e-4)  # exact MaxSim on the shortlist
        assert list(scores) == sorted(scores, reverse=True)
        recalls.append(len(truth & set(rows)) / 100)
        every, _ = ivf.top_k(user, 100, nprobe=64)  # every cell: exact
        assert set(every) == truth
    assert np.mean(recalls) >= 0.9, recalls  # cells picked at random would hold about a quarter of it
    flat = IVFRetriever(index, lists=1, kernel=kernel)  # one cell, every item: exact
    assert flat.top_k(user, 10, nprobe=1)[0].tolist() == best_first(exact, 10).tolist()


@pytest.mark.parametrize("n", [10, 5_000, 100_000])
def test_best_first_is_the_exact_top_k(n):
    rng = np.random.default_rng(n)
    for scores in (rng.normal(size=n).astype(np.float32),                 # distinct
                   rng.integers(0, 50, n).astype(np.float32),              # many ties
                   np.sort(rng.normal(size=n)).astype(np.float32)):        # the best at the end (the sample's edge)
        for k in (1, 7, 100, n):
            got = best_first(scores, k)
            want = np.argsort(-scores, kind="stable")[:k]
            np.testing.assert_array_equal(scores[got], scores[want])  # the same values, best first
            assert len(set(got.tolist())) == len(got)
            if len(np.unique(scores)) == n:
                np.testing.assert_array_equal(got, want)
            ties = scores[got][1:] == scores[got][:-1]
            assert (np.diff(got)[ties] > 0).all()  # equal scores in index order
    assert best_first(scores, 0).size == 0


def test_maxsim_equals_loops():
    rng = np.random.default_rng(0)
    user, items = rng.normal(size=(3, 2, 4)), rng.normal(size=(5, 2, 4))
    loops = [sum(max(user[l, h] @ items[n, k] for k in range(2)) for l in range(3) for h in range(2))
             for n in range(5)]
    np.testing.assert_allclose(maxsim(user.astype(np.float32), items.transpose(1, 0, 2).astype(np.float32)), loops,
                               rtol=1e-5)
    for block in (1, 2, 3):  # blocks of items, the last one partial
        np.testing.assert_allclose(maxsim(user.astype(np.float32), items.transpose(1, 0, 2).astype(np.float32),
                                          block=block), loops, rtol=1e-5)


@e2e
def test_exported_model_matches_checkpoint(run):
    import mindspore as ms
    from mindspore import nn
    cfg, run_dir = run
    model, meta, data = model_and_data(cfg, run_dir)
    test = data.arrays("test")
    inputs = [ms.Tensor(test[k][:97]) for k in meta["inputs"]]
    expected = 1 / (1 + np.exp(-model(*inputs).asnumpy()))
    graph = nn.GraphCell(ms.load(str(run_dir / "export" / "model.mindir")))
    np.testing.assert_allclose(graph(*inputs).asnumpy(), expected, atol=1e-5)
    # dynamic batch: another batch size through the same graph
    inputs = [ms.Tensor(test[k][:13]) for k in meta["inputs"]]
    np.testing.assert_allclose(graph(*inputs).asnumpy(), 1 / (1 + np.exp(-model(*inputs).asnumpy())), atol=1e-5)


@e2e
def test_scorer_equals_full_model_logits(run):
    import mindspore as ms
    cfg, run_dir = run
    model, meta, data = model_and_data(cfg, run_dir)
    users, items = data.arrays("users"), data.arrays("items")
    scorer = Scorer(run_dir / "export")
    calls = []
    if maxsim_kernel() is not None:  # the whole catalogue through the C++ kernel (counted)
        kernel = scorer.catalogue.kernel
        scorer.catalogue.kernel = kernel._replace(score=lambda *args: (calls.append(1), kernel.score(*args)))
    numpy_scorer = Scorer(run_dir / "export")
    numpy_scorer.catalogue = MaxSimIndex(numpy_scorer.by_head, None)  # as without a compiler: maxsim in NumPy
    for user_row in (0, 7, 42):
        user_id = int(users["key"][user_row])
        user = scorer.user_vector(user_id)[0]
        logits = scorer.scores(user)  # the whole catalogue from the index
        np.testing.assert_allclose(numpy_scorer.scores(user), logits, rtol=1e-5, atol=1e-5)
        n = len(items["key"])
        pairs = {"user_sparse": np.repeat(users["user_sparse"][user_row:user_row + 1], n, 0),
                 "user_dense": np.repeat(users["user_dense"][user_row:user_row + 1], n, 0), **items}
        full = model(*[ms.Tensor(pairs[k]) for k in meta["inputs"]]).asnumpy()
        np.testing.assert_allclose(logits, full, atol=1e-4)
        top = scorer.recommend(user_id, top_k=5)["items"]
        assert [t["score"] for t in top] == sorted((t["score"] for t in top), reverse=True)
        assert top[0]["score"] == pytest.approx(float(full.max()), abs=1e-4)
    assert len(calls) == (6 if maxsim_kernel() is not None else 0)  # scores() and recommend(), 3 users


@e2e
def test_two_stage_recommend_scores_its_cells_exactly(run):
    """Scorer(nprobe=N): whole-catalogue requests go through the IVF (every cell: the exact top k; one cell:
    exact scores of what it holds); requests with candidates stay exact; infer.py takes --nprobe."""
    cfg, run_dir = run
    exact = Scorer(run_dir / "export")
    lists = len(Scorer(run_dir / "export", nprobe=1).ivf.cells)
    every, one = Scorer(run_dir / "export", nprobe=lists), Scorer(run_dir / "export", nprobe=1)
    assert all(cell.kernel is maxsim_kernel() for cell in one.ivf.cells)  # the cells by the C++ kernel if built
    assert one.catalogue.kernel is None  # no tiled copy of the whole index beside the IVF
    for user_id in (1, 5, 10**9):
        want = exact.recommend(user_id, top_k=10)["items"]
        got = every.recommend(user_id, top_k=10)
        assert [i["item_id"] for i in got["items"]] == [i["item_id"] for i in want]
        np.testing.assert_allclose([i["score"] for i in got["items"]], [i["score"] for i in want], rtol=1e-5)
        assert got["candidates"] == exact.manifest["items"]
        logits = exact.scores(exact.user_vector(user_id)[0])
        cell = one.ivf.probed(one.user_vector(user_id)[0], 1)[0]
        in_cell = set(one.item_ids[one.ivf.items[one.ivf.offsets[cell]:one.ivf.offsets[cell + 1]]].tolist())
        picked = one.recommend(user_id, top_k=10)["items"]
        assert {i["item_id"] for i in picked} <= in_cell  # only the probed cell's items
        for item in picked:
            row = int(exact.rows([item["item_id"]])[0])
            assert item["score"] == pytest.approx(float(logits[row]), abs=1e-4)
    assert one.recommend(1, candidates=[1, 2], top_k=5)["candidates"] == 2  # candidates: exact scoring
    with pytest.raises(UserError, match="nprobe"):
        Scorer(run_dir / "export", nprobe=-1)
    with pytest.raises(UserError, match="threads must be 0"):
        Scorer(run_dir / "export", threads=-1)
    out = subprocess.run([sys.executable, "infer.py", "--run_dir", str(run_dir), "--user_id", "3", "--top_k", "2",
                          "--nprobe", str(lists), "--warm_calls", "1"], capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert [i["item_id"] for i in json.loads(out.stdout)["items"]] == \
        [i["item_id"] for i in exact.recommend(3, top_k=2)["items"]]


@e2e
def test_unknown_ids_and_empty_candidates(run):
    cfg, run_dir = run
    scorer = Scorer(run_dir / "export")
    out = scorer.recommend(10**9, candidates=[1, 2, 10**9], top_k=10)
    assert not out["known_user"] and out["candidates"] == 3
    unknown = [i for i in out["items"] if i["item_id"] == 10**9][0]
    assert not unknown["known_item"] and np.isfinite(unknown["score"])
    oov_score = scorer.scores(scorer.user_vector(10**9)[0], np.array([scorer.manifest["oov_row"]]))[0]
    assert unknown["score"] == pytest.approx(float(oov_score))
    assert scorer.recommend(1, candidates=[], top_k=3)["items"] == []
    with_features = scorer.recommend(10**9, top_k=3, features={"gender": "F", "age": 25})
    assert len(with_features["items"]) == 3
    with pytest.raises(UserError, match="unknown user feature"):
        scorer.recommend(1, features={"shoe_size": 42})


@e2e
def test_manifest_mismatch_refused(run, tmp_path):
    import shutil
    cfg, run_dir = run
    copy = tmp_path / "export"
    shutil.copytree(run_dir / "export", copy)
    index = np.load(copy / "item_index.npy")
    np.save(copy / "item_index.npy", index[:-2])
    with pytest.raises(UserError, match="does not match"):
        Scorer(copy)
    with pytest.raises(UserError, match="does not match the manifest"):
        Scorer(copy, check_files=False)
    with pytest.raises(UserError, match="not an export"):
        Scorer(tmp_path)


@e2e
def test_last_layer_only_export_is_the_reduced_formula(run, tmp_path):
    import mindspore as ms
    cfg, run_dir = run
    out = tmp_path / "fast"
    export_run(Config(run_dir=str(run_dir), last_layer_only=True, output_dir=str(out)),
               {"run_dir", "last_layer_only", "output_dir"})
    fast = Scorer(out)
    assert fast.manifest["last_layer_only"] and fast.manifest["user_shape"][0] == 1
    model, meta, data = model_and_data(cfg, run_dir)
    users, items = data.arrays("users"), data.arrays("items")
    user_heads = model.user_representation(*[ms.Tensor(users[k][3:4]) for k in ("user_sparse", "user_dense")])
    item_heads = model.item_representation(*[ms.Tensor(items[k]) for k in meta["inputs"][2:]]).asnumpy()
    last = user_heads.asnumpy()[0, -1]  # (H, p): the last user layer only
    reduced = np.einsum("hp,nkp->nhk", last, item_heads).max(-1).sum(-1) + float(model.bias.asnumpy())
    got = fast.scores(fast.user_vector(int(users["key"][3]))[0])
    np.testing.assert_allclose(got, reduced, atol=1e-4)


@e2e
def test_fresh_process_cli(run):
    cfg, run_dir = run
    out = subprocess.run([sys.executable, "infer.py", "--run_dir", str(run_dir), "--user_id", "3", "--top_k", "4"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["known_user"] and len(result["items"]) == 4
    bad = subprocess.run([sys.executable, "infer.py", "--run_dir", str(run_dir), "--user_id", "3", "--candidates",
                          "1,x"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "expects comma-separated integers" in bad.stderr


@e2e
def test_coupled_model_not_exportable(tmp_path, run):
    cfg, run_dir = run
    import shutil
    other = tmp_path / "fc"
    shutil.copytree(run_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "interaction": "fc"}))
    with pytest.raises(UserError, match="couples user and item"):
        export_run(Config(run_dir=str(other)), {"run_dir"})


@e2e
def test_onnx_graphs_match_mindspore(run):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    import mindspore as ms
    cfg, run_dir = run
    model, meta, data = model_and_data(cfg, run_dir)
    manifest = json.loads((run_dir / "export" / "manifest.json").read_text())
    assert all("ONNX" in manifest["formats"][g] for g in ("model", "user_tower", "item_tower")), manifest["formats"]
    test = data.arrays("test")
    batch = manifest["onnx_batch"]["model"]
    arrays = {k: np.resize(test[k], (batch, *test[k].shape[1:])) for k in meta["inputs"]}
    session = ort.InferenceSession(str(run_dir / "export" / "model.onnx"))
    feed = {i.name: arrays[k] for i, k in zip(session.get_inputs(), meta["inputs"])}
    expected = 1 / (1 + np.exp(-model(*[ms.Tensor(arrays[k]) for k in meta["inputs"]]).asnumpy()))
    np.testing.assert_allclose(session.run(None, feed)[0], expected, atol=1e-5)
    users = data.arrays("users")
    session = ort.InferenceSession(str(run_dir / "export" / "user_tower.onnx"))
    feed = {i.name: users[k][:1] for i, k in zip(session.get_inputs(), meta["inputs"][:2])}
    np.testing.assert_allclose(session.run(None, feed)[0][0], Scorer(run_dir / "export").user_vector(
        int(users["key"][0]))[0], atol=1e-5)


@e2e
def test_onnx_user_tower_equals_mindir(run):
    cfg, run_dir = run
    scorer = Scorer(run_dir / "export")
    assert scorer.backend == "onnx"
    for user_id in (int(scorer.users["key"][0]), int(scorer.users["key"][17]), 10**9):
        fast, known = scorer.user_vector(user_id)
        reference, _ = scorer.user_vector(user_id, backend="mindir")
        np.testing.assert_allclose(fast, reference, atol=1e-5)
        np.testing.assert_allclose(scorer.scores(fast), scorer.scores(reference), atol=1e-5)
    batch = scorer.user_vectors([int(scorer.users["key"][0]), 10**9])
    np.testing.assert_allclose(batch[1], scorer.user_vector(10**9, backend="mindir")[0], atol=1e-6)
    with pytest.raises(UserError, match="unknown user tower"):
        Scorer(run_dir / "export", user_tower="tpu")


@e2e
def test_infer_reports_cold_and_warm_latency(run):
    cfg, run_dir = run
    out = subprocess.run([sys.executable, "infer.py", "--run_dir", str(run_dir), "--user_id", "3", "--top_k", "2",
                          "--warm_calls", "3"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    latency = json.loads(out.stdout)["latency_ms"]
    assert latency["cold_first_call"] > 0 and latency["warm_median"] > 0 and latency["warm_calls"] == 3
    assert latency["threads"] == scorer_module.cores()  # --threads 0, the default: every core


def test_text_ids_of_amazon_are_served(tmp_path):
    """Data sets whose ids are text (Amazon's reviewerID and asin): the scorer takes and returns the raw ids,
    and a text id scores exactly as the integer key of the same row."""
    cfg = Config(dataset="amazon-synthetic", data_dir=str(tmp_path / "data"), run_dir=str(tmp_path / "run"),
                 synthetic_users=300, synthetic_items=120, mlp=(16,), heads=2, head_dim=4, embed_dim=4,
                 batch_size=256, epochs=1)
    train.train(cfg)
    export_run(Config(run_dir=cfg.run_dir), {"run_dir"})
    scorer = Scorer(tmp_path / "run" / "export")
    assert scorer.user_names is not None and scorer.item_names is not None
    user, items = str(scorer.user_names[0]), [str(x) for x in scorer.item_names[:3]]
    out = scorer.recommend(user, items + ["NOT-AN-ASIN"], top_k=4)
    assert out["known_user"] and {i["item_id"] for i in out["items"]} == set(items) | {"NOT-AN-ASIN"}
    assert [i["known_item"] for i in out["items"] if i["item_id"] == "NOT-AN-ASIN"] == [False]
    by_key = scorer.recommend(int(scorer.users["key"][0]), scorer.item_ids[:3].tolist(), top_k=3)
    assert sorted(i["score"] for i in by_key["items"]) == sorted(i["score"] for i in out["items"] if i["known_item"])
    assert scorer.unknown_items(items + ["NOT-AN-ASIN"]) == ["NOT-AN-ASIN"]
