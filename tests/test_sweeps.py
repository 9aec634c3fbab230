"""-ep with chosen widths: -ep_a (activations) and -ep_w (weights) make a W x A table in one run."""

import pandas as pd
import pytest
from test_cli import data_dir, run_cli, stats_dir  # noqa: F401  (module fixtures of the CLI tests)


def test_weight_and_activation_grid(data_dir, stats_dir):
    flags = ("-sm", "use", "-th", "laplace")
    assert run_cli(data_dir, stats_dir, *flags, "-ep", "-ep_a", "int8,int4", "-ep_w", "int8,int4") == 0
    rows = pd.read_csv(stats_dir / "results.csv", keep_default_na=False)
    table = pd.read_csv(rows.iloc[-1]["file"])
    assert list(table["precision"]) == ["fp32", "W8A8", "W8A4", "W4A8", "W4A4"]
    assert list(table["qweight"]) == ["fp32", "int8", "int8", "int4", "int4"]
    # a cell of the sweep is the same run as the single setting
    assert run_cli(data_dir, stats_dir, *flags, "--qtype", "int4", "-qw", "int4") == 0
    single = pd.read_csv(stats_dir / "results.csv", keep_default_na=False).iloc[-1]
    cell = table.set_index("precision").loc["W4A4"]
    assert (cell["top1"], cell["top5"]) == (single["top1"], single["top5"])


@pytest.mark.parametrize("flags, message", [
    (("-ep_a", "int4"), "give -ep too"),
    (("-ep", "-ep_a", "int4,fp32"), "activation widths"),
    (("-ep", "-ep_w", "int4,int4"), "each type once"),
])
def test_bad_sweep_flags(data_dir, tmp_path, capsys, flags, message):
    assert run_cli(data_dir, tmp_path, "-sm", "no", *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
