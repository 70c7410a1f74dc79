"""benchmark.py on the generated sample: every mode runs and reports what it measured."""
from pathlib import Path

import pytest

import benchmark
from scorer import maxsim_kernel
from util import UserError

pytestmark = pytest.mark.e2e


def test_bench_train_times_the_three_loops(tiny_cfg):
    result = benchmark.bench_train(tiny_cfg, repeats=2, steps=3)
    assert result["batch_size"] == tiny_cfg.batch_size and len(result["speedups"]) == 2
    assert result["dropout_masks"] == tiny_cfg.dropout_masks
    for key in ("ours_ms_per_step", "value_and_grad_jit_ms_per_step", "published_ms_per_step"):
        assert result[key] > 0
    rate = tiny_cfg.batch_size / (result["ours_ms_per_step"] / 1000)  # ms are rounded to 0.1: off by <= 0.05 ms
    assert abs(result["ours_samples_per_s"] - rate) <= rate * 0.05 / result["ours_ms_per_step"] + 1
    low, high = min(result["speedups"]), max(result["speedups"])
    assert low - 0.05 <= result["speedup_median"] <= high + 0.05
    assert result["gflop_per_step"] > 0 and 0 < result["flop_floor_ms_per_step"] < result["ours_ms_per_step"]
    assert result["options"]["mlp"] == [32, 16] and result["options"]["dropout"] == 0.0  # what differs from defaults
    assert "lr" not in result["options"]


def test_torch_peer_refuses_what_it_does_not_build_and_a_missing_torch(tiny_cfg, monkeypatch):
    """--peer torch: PyTorch is optional (never in requirements.txt); without it, one clear line."""
    from get_dataset import load_dataset
    meta = load_dataset(tiny_cfg, quiet=True).meta
    with pytest.raises(UserError, match="builds IntTower and two_tower"):
        benchmark.torch_peer(meta, tiny_cfg.replace(model="cold"))
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # what `import torch` sees when it is absent
    with pytest.raises(UserError, match="pip install torch"):
        benchmark.torch_peer(meta, tiny_cfg)


def test_bench_data_reads_the_same_rows_both_ways(tiny_cfg):
    result = benchmark.bench_data(tiny_cfg, repeats=1)
    assert result["ratings"] > result["train_rows"] > 0
    assert result["preprocess_seconds_median"] > 0
    assert result["load_npz_seconds_median"] > 0 and result["load_mindrecord_seconds_median"] > 0


def test_bench_serve_scores_from_a_trained_run(tiny_cfg):
    import train
    cfg = tiny_cfg.replace(run_dir=str(Path(tiny_cfg.output_dir) / "run"), epochs=1)
    train.train(cfg)
    result = benchmark.bench_serve(cfg, repeats=1, sizes=(100, 1_000))
    assert result["user_shape"] == [len(cfg.mlp), cfg.heads, cfg.head_dim]
    assert result["item_shape"] == [cfg.heads, cfg.head_dim]
    assert result["bytes_per_item_float32"] == cfg.heads * cfg.head_dim * 4
    assert [r["candidates"] for r in result["rows"]] == [100, 1_000]
    for row in result["rows"]:
        assert row["maxsim_ms"] > 0 and row["full_model_ms"] > 0 and row["two_tower_dot_ms"] > 0
    serving = benchmark.bench_serving(cfg, repeats=1, sizes=(500,), catalogue=3_000)
    (request,) = serving["requests"]
    assert request["end_to_end_500_ms"] > 0 and set(request["floor_500"]) == {"flop_floor_ms", "byte_floor_ms"}
    assert request["end_to_end_500_cores_ms"] > 0 and request["maxsim_numpy_500_ms"] > 0
    assert request["maxsim"] == ("numpy" if maxsim_kernel() is None else "kernel")
    assert serving["floor"]["read_gb_s"] > 0 and serving["floor"]["read_gb_s_one_thread"] > 0
    assert [v["index"] for v in serving["compressed"]] == ["float32 (exact)", "int8", "bfloat16", "float16"]
    assert all(0 <= v["top100_overlap_rescored"] <= 1 for v in serving["compressed"][1:])
    assert [b["users_per_call"] for b in serving["batched_10000"]] == [8, 32]
    for part in serving["catalogue"]["noises"]:  # probed cells are nested: recall and work never fall
        recalls = [row["recall_at_100"] for row in part["rows"]]
        assert 0 <= recalls[0] and recalls == sorted(recalls) and recalls[-1] <= 1
        scored = [row["items_scored"] for row in part["rows"]]
        assert scored == sorted(scored) and scored[-1] <= 3_000


def test_bench_serve_needs_a_run(tiny_cfg):
    with pytest.raises(UserError, match="--run_dir"):
        benchmark.bench_serve(tiny_cfg, repeats=1)


def test_step_flops_counts_dense_maxsim_and_cir(tiny_cfg):
    from model import build_model
    meta = {"inputs": ["user_sparse", "user_dense", "item_sparse", "item_dense"],
            "towers": {"user": {"sparse": [{"name": "u", "vocab_size": 5}], "multi": [], "dense": ["m"]},
                       "item": {"sparse": [{"name": "i", "vocab_size": 7}], "multi": [], "dense": ["n"]}}}
    cfg = tiny_cfg.replace(mlp=(6, 4), heads=2, head_dim=3, embed_dim=5, batch_size=10, cir_anchors=0, se="none")
    model = build_model(meta, cfg)
    # dense layers: each tower 6->6 (5+1 inputs), 6->4; FE projections 6->6, 4->6 (user), 4->6 (item)
    dense = 2 * (6 * 6 + 6 * 4) + (6 * 6 + 4 * 6) + 4 * 6
    expected = 3 * (2 * 10 * dense + 2 * 10 * 2 * 2 * 2 * 3 + 2 * 10 * 10 * 4)
    assert benchmark.step_flops(model, cfg) == expected


def test_kernel_probes_report_every_dtype_and_both_multiplies(tiny_cfg):
    from runtime import init_mindspore
    init_mindspore(tiny_cfg)
    probes = benchmark.kernel_probes(rows=64, width=16, repeats=3)
    assert set(probes["cpu_flags"]) == {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
    speeds = probes["matmul_64x16x16_gflop_s"]
    assert set(speeds) == {"float32", "float16", "bfloat16"} and speeds["float32"] > 0
    assert all(isinstance(v, float) or v.startswith("no kernel") for v in speeds.values())
    assert probes["mul_by_vector_ms"] > 0 and probes["mul_equal_shapes_ms"] > 0


def test_split_ms_separates_both_frameworks_matrix_products_from_the_rest():
    ours = {"MatMul": 10.0, "BatchMatMul": 2.0, "Mul": 3.0, "Gather": 1.0}
    torch = {"aten::mm": 8.0, "aten::addmm": 1.5, "aten::bmm": 0.5, "aten::bernoulli_": 4.0, "aten::mul": 2.0}
    assert benchmark.split_ms(ours) == (12.0, 4.0)
    assert benchmark.split_ms(torch) == (10.0, 6.0)


def test_bench_profile_splits_a_step_and_counts_its_kernels(tiny_cfg, monkeypatch):
    monkeypatch.setattr(benchmark, "kernel_probes", dict)  # measured in its own test above
    result = benchmark.bench_profile(tiny_cfg, steps=2)
    assert "MatMul" in result["top_operators_ms_per_step"] and result["matrix_products_ms_per_step"] > 0
    total = result["matrix_products_ms_per_step"] + result["other_kernels_ms_per_step"]
    assert abs(total - result["kernel_ms_per_step"]) <= 0.15  # each rounded to 0.1
    assert 100 < result["kernels_per_step"] < 2000  # forward, backward and Adam of a small IntTower
    outside = result["wall_ms_per_step_profiled"] - result["kernel_ms_per_step"]
    assert abs(result["outside_kernels_ms_per_step"] - outside) <= 0.15
