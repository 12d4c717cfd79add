"""Every tool's numeric options reject out-of-range values as argparse usage errors naming the
option (exit status 2), before any work starts."""

from __future__ import annotations

import importlib

import pytest

BAD = [  # (tool, arguments, option named in the error)
    ("bench_loader", ["--workers", "0"], "--workers"),
    ("bench_loader", ["--batch-size", "1"], "--batch-size"),
    ("bench_loader", ["--repeat", "-1"], "--repeat"),
    ("bench_loss", ["--temperature", "0"], "--temperature"),
    ("bench_loss", ["--temperature", "nan"], "--temperature"),
    ("bench_loss", ["--max-seconds", "-5"], "--max-seconds"),
    ("bench_loss", ["--time-budget", "inf"], "--time-budget"),
    ("bench_loss", ["--dim", "0"], "--dim"),
    ("bench_loss", ["--sizes", "1024", "x"], "--sizes"),
    ("bench_optim", ["--threads", "0"], "--threads"),
    ("bench_optim", ["--rounds", "0"], "--rounds"),
    ("bench_optim", ["--warmup", "-1"], "--warmup"),
    ("bench_train", ["--width", "0"], "--width"),
    ("bench_train", ["--batch-size", "0"], "--batch-size"),
    ("bench_train", ["--steps", "0"], "--steps"),
    ("bench_train", ["--workers", "-2"], "--workers"),
    ("gpu_check", ["--budget-s", "0"], "--budget-s"),
    ("gpu_check", ["--workers", "0"], "--workers"),
]


@pytest.mark.parametrize("tool,args,option", BAD, ids=[f"{t}{' '.join(a)}" for t, a, _ in BAD])
def test_out_of_range_option_is_a_usage_error_naming_it(capsys, tool, args, option):
    parser = importlib.import_module(f"tools.{tool}").build_parser()
    with pytest.raises(SystemExit) as info:
        parser.parse_args(args)
    assert info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {option}" in last and args[-1] in last, last


GOOD = [
    ("bench_loader", ["--workers", "1", "--batch-size", "2", "--repeat", "1"],
     {"workers": 1, "batch_size": 2, "repeat": 1}),
    ("bench_loss", ["--temperature", "0.07", "--dim", "1", "--time-budget", "30"],
     {"temperature": 0.07, "dim": 1, "time_budget": 30.0}),
    ("bench_optim", ["--warmup", "0", "--threads", "1"], {"warmup": 0, "threads": 1}),
    ("bench_train", ["--width", "0.125", "--workers", "0", "--warmup", "0"],
     {"width": 0.125, "workers": 0, "warmup": 0}),
    ("gpu_check", ["--budget-s", "1.5", "--workers", "1"], {"budget_s": 1.5, "workers": 1}),
]


@pytest.mark.parametrize("tool,args,want", GOOD, ids=[t for t, _, _ in GOOD])
def test_values_at_the_edge_of_the_range_parse(tool, args, want):
    ns = importlib.import_module(f"tools.{tool}").build_parser().parse_args(args)
    assert {k: getattr(ns, k) for k in want} == want


@pytest.mark.parametrize("args,option", [(["--workers", "0"], "--workers"),
                                         (["--max-resolution", "-1"], "--max-resolution")])
def test_convert_rejects_out_of_range_options(capsys, args, option):
    from tools.convert import build_parser

    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["src", "out", *args])
    assert info.value.code == 2 and f"argument {option}" in capsys.readouterr().err
