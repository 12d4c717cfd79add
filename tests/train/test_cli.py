"""Every command's numeric options reject out-of-range values as argparse usage errors naming the
option (exit status 2), before any work starts."""

from __future__ import annotations

import importlib

import pytest

BAD = [  # (tool, arguments, option named in the error)
    ("tools.bench_loader", ["--workers", "0"], "--workers"),
    ("tools.bench_loader", ["--batch-size", "1"], "--batch-size"),
    ("tools.bench_loader", ["--repeat", "-1"], "--repeat"),
    ("tools.bench_loss", ["--temperature", "0"], "--temperature"),
    ("tools.bench_loss", ["--temperature", "nan"], "--temperature"),
    ("tools.bench_loss", ["--max-seconds", "-5"], "--max-seconds"),
    ("tools.bench_loss", ["--time-budget", "inf"], "--time-budget"),
    ("tools.bench_loss", ["--dim", "0"], "--dim"),
    ("tools.bench_loss", ["--sizes", "1024", "x"], "--sizes"),
    ("tools.bench_optim", ["--threads", "0"], "--threads"),
    ("tools.bench_optim", ["--rounds", "0"], "--rounds"),
    ("tools.bench_optim", ["--warmup", "-1"], "--warmup"),
    ("tools.bench_train", ["--width", "0"], "--width"),
    ("tools.bench_train", ["--batch-size", "0"], "--batch-size"),
    ("tools.bench_train", ["--steps", "0"], "--steps"),
    ("tools.bench_train", ["--workers", "-2"], "--workers"),
    ("tools.gpu_check", ["--budget-s", "0"], "--budget-s"),
    ("tools.gpu_check", ["--workers", "0"], "--workers"),
    ("tools.quality_check", ["--data", "d", "--time-limit", "0"], "--time-limit"),
    ("tools.quality_check", ["--data", "d", "--time-limit", "60", "--workers", "0"],
     "--workers"),
    ("train.linear_eval", ["--train-samples", "0"], "--train-samples"),
    # a result file that cannot be written is refused before the work, not after it
    ("tools.bench_loss", ["--json", "/"], "--json"),
    ("tools.bench_train", ["--json", "/proc/results.json"], "--json"),
    ("tools.gpu_check", ["--json", "/"], "--json"),
    ("tools.quality_check", ["--data", "d", "--time-limit", "9", "--json", "/"], "--json"),
    ("train.finetune", ["--batch-size", "0"], "--batch-size"),
    ("train.finetune", ["--epochs", "nan"], "--epochs"),
    ("train.finetune", ["--min-steps", "-1"], "--min-steps"),
    ("train.finetune", ["--lr", "0"], "--lr"),
]


@pytest.mark.parametrize("tool,args,option", BAD, ids=[f"{t}{' '.join(a)}" for t, a, _ in BAD])
def test_out_of_range_option_is_a_usage_error_naming_it(capsys, tool, args, option):
    parser = importlib.import_module(tool).build_parser()
    with pytest.raises(SystemExit) as info:
        parser.parse_args(args)
    assert info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {option}" in last and args[-1] in last, last


GOOD = [
    ("tools.bench_loader", ["--workers", "1", "--batch-size", "2", "--repeat", "1"],
     {"workers": 1, "batch_size": 2, "repeat": 1}),
    ("tools.bench_loss", ["--temperature", "0.07", "--dim", "1", "--time-budget", "30"],
     {"temperature": 0.07, "dim": 1, "time_budget": 30.0}),
    ("tools.bench_optim", ["--warmup", "0", "--threads", "1"], {"warmup": 0, "threads": 1}),
    ("tools.bench_train", ["--width", "0.125", "--workers", "0", "--warmup", "0"],
     {"width": 0.125, "workers": 0, "warmup": 0}),
    ("tools.gpu_check", ["--budget-s", "1.5", "--workers", "1"], {"budget_s": 1.5, "workers": 1}),
    ("train.finetune", ["--checkpoint", "r", "--batch-size", "2", "--min-steps", "0",
                        "--epochs", "0.5"], {"batch_size": 2, "min_steps": 0, "epochs": 0.5}),
]


@pytest.mark.parametrize("tool,args,want", GOOD, ids=[t for t, _, _ in GOOD])
def test_values_at_the_edge_of_the_range_parse(tool, args, want):
    ns = importlib.import_module(tool).build_parser().parse_args(args)
    assert {k: getattr(ns, k) for k in want} == want


@pytest.mark.parametrize("args,option", [(["--workers", "0"], "--workers"),
                                         (["--max-resolution", "-1"], "--max-resolution")])
def test_convert_rejects_out_of_range_options(capsys, args, option):
    from tools.convert import build_parser

    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["src", "out", *args])
    assert info.value.code == 2 and f"argument {option}" in capsys.readouterr().err
