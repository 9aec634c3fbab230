"""benchmarks/bench_peer.py: argument parsing, bad input, and the table on a synthetic result (no network runs).

Skipped without Brevitas (the ``peer`` extra), which CI does not install."""

from __future__ import annotations

import math

import pytest
from script_loading import load_script

pytest.importorskip("brevitas")
pytest.importorskip("accelerate")

bench = load_script("benchmarks/bench_peer.py")


def folders(tmp_path):
    (tmp_path / "cal").mkdir(exist_ok=True)
    (tmp_path / "val" / "val").mkdir(parents=True, exist_ok=True)
    return ["--weights", "w.pth", "--cal-data", str(tmp_path / "cal"), "--data", str(tmp_path / "val")]


def test_defaults_are_the_issue_table(tmp_path):
    args = bench.parse_args(folders(tmp_path))
    assert [w.name for w in args.widths] == ["W8A8", "W4A8", "W8A4", "W4A4"]
    assert (args.cal_size, args.seed, args.subset, args.peer_round, args.threads) == (256, 0, None, "none", 1)
    args = bench.parse_args([*folders(tmp_path), "--widths", "W4A4,W8A4", "--subset", "64", "--peer-round", "gptq"])
    assert [(w.weight, w.act) for w in args.widths] == [(4, 4), (8, 4)]
    assert args.subset == 64
    assert bench.parse_args([*folders(tmp_path), "--widths", "none"]).widths == []


@pytest.mark.parametrize("bad", [["--widths", "W4"], ["--widths", "W1A8"], ["--widths", "W8A8,A4W4"],
                                 ["--subset", "0"], ["-cs", "-3"], ["--peer-round", "adaround"]])
def test_bad_arguments_one_line_exit_2(tmp_path, capsys, bad):
    with pytest.raises(SystemExit) as exit_:
        bench.parse_args([*folders(tmp_path), *bad])
    assert exit_.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()[-1:]) == 1


def test_missing_folder_exit_2_and_no_log(tmp_path, capsys):
    log = tmp_path / "log.txt"
    argv = ["--weights", "w.pth", "--cal-data", str(tmp_path / "absent"), "--data", str(tmp_path),
            "--log", str(log)]
    with pytest.raises(SystemExit) as exit_:
        bench.main(argv)
    assert exit_.value.code == 2
    assert "absent" in capsys.readouterr().err
    assert not log.exists()


def test_missing_peer_names_the_extra(monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_brevitas(name, *args, **kwargs):
        if name == "brevitas":
            raise ImportError("no brevitas", name="brevitas")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_brevitas)
    with pytest.raises(SystemExit) as exit_:
        bench.require_peer()
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ".[peer]" in err and "brevitas" in err


def test_our_commands_pick_the_same_images(tmp_path):
    args = bench.parse_args([*folders(tmp_path), "-cs", "32", "--seed", "3", "--subset", "64"])
    collect = bench.ours_command(args, tmp_path, None, collect=True)
    use = bench.ours_command(args, tmp_path, bench.Width(4, 8))
    for command in (collect, use):
        text = " ".join(command)
        assert f"--cal-data {tmp_path / 'cal'} -cs 32 --seed 3 --data {tmp_path / 'val'}" in text
        assert "--subset 64" in text
    assert collect[collect.index("-sm") + 1] == "collect" and use[use.index("-sm") + 1] == "use"
    assert "--equalize" in collect and "-bca" not in collect  # statistics of the equalized model; -bca is per width
    assert use[use.index("--qtype") + 1] == "int8" and use[use.index("-qw") + 1] == "int4"


def test_table_on_a_synthetic_result():
    peer = {"FP32": bench.Cell(80.0, 2277, 4.8), "W4A4": bench.Cell(10.0, 2277, 301.25)}
    ours = {"FP32": bench.Cell(80.8, 2277, 0.0), "W4A4": bench.Cell(36.67, 2277, 42.0)}
    text = bench.format_table(["FP32", "W4A4"], peer, ours)
    lines = text.splitlines()
    se = 100 * math.sqrt(0.1 * 0.9 / 2277)
    assert lines[0].startswith("| width | peer top-1 % | peer calibration s | ours top-1 % | ours calibration s |")
    assert lines[3] == f"| W4A4 | 10.00 ± {se:.2f} | 301.2 | 36.67 ± 1.01 | 42.0 |"
    fields = dict(item.split("=") for item in lines[-1].split())
    assert fields["images"] == "2277"
    assert float(fields["peer_W4A4_se"]) == pytest.approx(se, abs=1e-3)
    assert float(fields["ours_W4A4_top1"]) == 36.67 and float(fields["peer_W4A4_cal_s"]) == pytest.approx(301.2)
    one_side = bench.format_table(["W4A4"], {}, ours).splitlines()
    assert one_side[2] == "| W4A4 | – | – | 36.67 ± 1.01 | 42.0 |"


def test_missing_weights_file_exit_2_and_no_log(tmp_path, capsys):
    log = tmp_path / "log.txt"
    with pytest.raises(SystemExit) as exit_:
        bench.main([*folders(tmp_path), "--weights", str(tmp_path / "absent.pth"), "--log", str(log)])
    assert exit_.value.code == 2
    assert "absent.pth" in capsys.readouterr().err
    assert not log.exists()
