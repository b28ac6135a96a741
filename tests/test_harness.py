"""What the benchmarks share (benchmarks.harness): the shape sets, fixed gradients, schedules,
the interleaved timer, the byte model and the command-line pieces."""

from __future__ import annotations

import argparse

import pytest
import torch
from torch import nn

from benchmarks import harness


def test_gpt2_small_shape_set():
    model = harness.build_model("gpt2_small", torch.device("cpu"))
    weights = [p for p in model.parameters() if p.ndim == 2]
    assert len(weights) == 48
    assert {tuple(w.shape) for w in weights} == {(2304, 768), (768, 768), (3072, 768),
                                                 (768, 3072)}
    assert sum(w.numel() for w in weights) == 12 * (768 * 2304 + 768 * 768 + 2 * 768 * 3072)


def test_models_and_gradients_are_the_same_every_time():
    cpu = torch.device("cpu")
    a, b = harness.build_model("small_cnn", cpu), harness.build_model("small_cnn", cpu)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    grads = harness.fixed_grads(a, cpu)
    assert [g.shape for g in grads] == [p.shape for p in a.parameters()]
    assert all(torch.equal(g, h) for g, h in zip(grads, harness.fixed_grads(b, cpu), strict=True))
    harness.assign_grads(a, grads)
    for p, g in zip(a.parameters(), grads, strict=True):
        assert torch.equal(p.grad, g) and p.grad is not g  # a clone: a step cannot change g


def test_channels_last_models_tensors_and_gradients():
    """build_model(channels_last=True) puts the 4-D weights in that format; the fixed
    gradients and their copies follow each parameter's layout (as autograd's do), with the
    values of the contiguous model's; in_channels_last converts 4-D and 5-D tensors only."""
    cpu = torch.device("cpu")
    plain = harness.build_model("small_cnn", cpu)
    last = harness.build_model("small_cnn", cpu, channels_last=True)
    convs = [p for p in last.parameters() if p.ndim == 4]
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert any(not p.is_contiguous() for p in convs)  # one input channel is both layouts
    grads = harness.fixed_grads(last, cpu)
    assert [g.stride() for g in grads] == [p.stride() for p in last.parameters()]
    harness.assign_grads(plain, grads)
    for p, q, g in zip(plain.parameters(), last.parameters(), grads, strict=True):
        assert torch.equal(p, q) and torch.equal(p.grad, g) and p.grad.is_contiguous()
    assert harness.in_channels_last(torch.randn(2, 8, 3, 3)).stride() == (72, 1, 24, 8)
    assert harness.in_channels_last(torch.randn(2, 8, 1, 3, 3)).is_contiguous(
        memory_format=torch.channels_last_3d)
    flat = torch.randn(4, 8)
    assert harness.in_channels_last(flat) is flat


def test_params_of_splits_sparse_and_dense_groups():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4))
    groups = harness.sparse_groups(model, 2, 4)
    sparse, dense = harness.params_of(groups, sparse=True), harness.params_of(groups, sparse=False)
    assert [p.shape for p in sparse] == [torch.Size([32, 32])]  # stem and classifier dense
    assert {id(p) for p in harness.params_of(groups)} == {id(p) for p in model.parameters()}
    assert len(sparse) + len(dense) == len(list(model.parameters()))


def test_schedules_of_each_kind():
    assert harness.schedule("ordinary") == {"t_i": 0, "t_f": 0}
    assert harness.schedule("update")["t_i"] == 0 and harness.schedule("update")["delta_t"] == 1
    gradual = harness.schedule("gradual")
    assert gradual["t_i"] == gradual["t_f"] == harness.FAR > harness.GRADUAL_LEAD
    with pytest.raises(ValueError, match="Invalid kind value: 'frozen'"):
        harness.schedule("frozen")


def test_interleaving_rotates_the_order_and_skips_warmup():
    order: list[str] = []
    calls = {name: (lambda name=name: order.append(name)) for name in "abc"}
    seen: list[str] = []
    rounds = harness.interleaved_rounds(calls, steps=2, warmup=1,
                                        timer=harness.Timer(torch.device("cpu")),
                                        before=seen.append)
    assert order == list("abcbcacab") and seen == order
    assert set(rounds) == set("abc") and all(len(t) == 2 for t in rounds.values())
    assert all(t >= 0 for times in rounds.values() for t in times)


def test_host_timer_on_the_cpu_is_the_wall_time_of_the_call():
    import time

    ms = harness.HostTimer(torch.device("cpu"))(lambda: time.sleep(0.02))
    assert 20 <= ms < 1000


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_host_timer_does_not_wait_for_the_gpu():
    # torch.cuda._sleep spins the GPU for a number of cycles (about 0.1 s here) while the
    # host returns at once: Timer sees the GPU's time, HostTimer only the launch.
    device = torch.device("cuda")
    spin = lambda: torch.cuda._sleep(200_000_000)  # noqa: E731
    spin()  # the first launch loads the kernel
    torch.cuda.synchronize()
    host, full = harness.HostTimer(device)(spin), harness.Timer(device)(spin)
    assert full > 20 and host < full / 4


def test_ratio_quartiles_pair_the_calls_round_by_round():
    # a slow round (x10) slows both calls: their per-round ratios stay 0.5 to 0.8
    fused, ordinary = [1.0, 10.0, 1.0, 1.0, 1.0], [0.5, 6.0, 0.7, 0.8, 0.6]
    q1, q3 = harness.ratio_quartiles(ordinary, fused)
    assert 0.5 <= q1 < q3 <= 0.8
    assert harness.ratio_quartiles([3.0], [2.0]) == (1.5, 1.5)
    for rounds in ([0.5, 4.0], [0.5, 4.0, 1.0]):  # few rounds: still within the ratios seen
        q1, q3 = harness.ratio_quartiles(rounds, [1.0] * len(rounds))
        assert min(rounds) <= q1 <= q3 <= max(rounds)
    with pytest.raises(ValueError):
        harness.ratio_quartiles([1.0, 2.0], [1.0])


def test_interleaved_rounds_keep_every_timed_round():
    ticks = iter([100.0, 1.0, 3.0, 2.0])
    rounds = harness.interleaved_rounds({"a": lambda: None}, steps=3, warmup=1,
                                        timer=lambda fn: next(ticks))
    assert rounds == {"a": [1.0, 3.0, 2.0]}


def test_interleaving_reports_the_median_of_the_timed_rounds():
    ticks = iter([100.0, 1.0, 3.0, 2.0])  # the warm-up round (100) is not timed
    rounds = harness.interleaved_rounds({"a": lambda: None}, steps=3, warmup=1,
                                        timer=lambda fn: next(ticks))
    assert harness.medians(rounds) == {"a": 2.0}


def test_step_bytes_model():
    dense = torch.zeros(10, 8)
    sparse = torch.zeros(100, 16)
    groups = [{"params": [sparse], "sparse": True}, {"params": [dense], "sparse": False}]
    words = 4  # float32
    assert harness.step_bytes(groups, None, None, "sgd") == (80 + 1600) * words * 5
    assert harness.step_bytes(groups, None, None, "adamw") == (80 + 1600) * words * 7
    # compact: 3 words per weight plus 2 (SGD) / 4 (AdamW) per kept weight
    assert harness.step_bytes(groups, 2, 4, "sgd") == 80 * 4 * 5 + 1600 * 4 * (3 + 1)
    assert harness.step_bytes(groups, 1, 16, "adamw") == 80 * 4 * 7 + round(
        1600 * 4 * (3 + 4 / 16))
    assert harness.gbps(2_000_000, 2.0) == pytest.approx(1.0)


def test_command_line_pieces(tmp_path):
    assert harness.nm_pattern("2:4") == (2, 4)
    for bad in ("4:4", "2-4", "0:4"):
        with pytest.raises(argparse.ArgumentTypeError, match="invalid N:M pattern"):
            harness.nm_pattern(bad)
    line = harness.machine("cpu")
    assert line == f"device cpu, torch {torch.__version__}, {torch.get_num_threads()} threads"
    path = tmp_path / "sub" / "rows.csv"
    harness.write_csv([{"a": 1, "b": None}, {"a": 2.5, "b": "x"}], path)
    assert path.read_text().splitlines() == ["a,b", "1,", "2.5,x"]


def test_require_at_least_names_the_flag_and_value(capsys):
    parser = argparse.ArgumentParser()
    ok = argparse.Namespace(rounds=2, train_batch=None)
    harness.require_at_least(parser, ok, {"rounds": 2, "train_batch": 1})  # None: not given
    with pytest.raises(SystemExit):
        harness.require_at_least(parser, argparse.Namespace(rounds=2, train_batch=0),
                                 {"rounds": 2, "train_batch": 1})
    assert "Invalid --train-batch value: 0 (at least 1)" in capsys.readouterr().err


def test_regrad_gives_the_named_model_fresh_copies_of_the_fixed_gradients():
    models = {"a": nn.Linear(3, 2), "b": nn.Linear(3, 2)}
    grads = harness.fixed_grads(models["a"], torch.device("cpu"))
    before = harness.regrad(models, grads)
    before("a")
    assert all(p.grad is None for p in models["b"].parameters())
    for p, g in zip(models["a"].parameters(), grads, strict=True):
        assert torch.equal(p.grad, g) and p.grad.data_ptr() != g.data_ptr()
