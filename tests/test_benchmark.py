"""benchmark.py train on the generated sample: all three loops run and the ratio is theirs."""
import benchmark


def test_bench_train_times_the_three_loops(tiny_cfg):
    result = benchmark.bench_train(tiny_cfg, repeats=2, steps=3)
    assert result["batch_size"] == tiny_cfg.batch_size and len(result["speedups"]) == 2
    for key in ("ours_ms_per_step", "value_and_grad_jit_ms_per_step", "published_ms_per_step"):
        assert result[key] > 0
    rate = tiny_cfg.batch_size / (result["ours_ms_per_step"] / 1000)  # ms are rounded to 0.1
    assert abs(result["ours_samples_per_s"] - rate) <= 0.01 * rate
    low, high = min(result["speedups"]), max(result["speedups"])
    assert low - 0.05 <= result["speedup_median"] <= high + 0.05
