"""The -dd dump format: one writer (passes.dump), one reader (report and mse_analysis)."""

from __future__ import annotations

import numpy as np
import pytest

from pytorch_quantizer.dumps import DumpError, dump_path, dumped_layers, load_fp32, read_fp32, write_dump


def test_round_trip_in_layer_order(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {name: rng.standard_normal((2, 3, 4)).astype(np.float32) for name in ("conv10_activation",
                                                                                   "conv2_activation",
                                                                                   "linear0_activation")}
    for name, x in arrays.items():
        write_dump(tmp_path, name, x, np.round(x))
    assert dumped_layers(tmp_path) == ["conv2_activation", "conv10_activation", "linear0_activation"]
    loaded = load_fp32(tmp_path)
    assert list(loaded) == dumped_layers(tmp_path)
    for name, x in arrays.items():
        np.testing.assert_array_equal(loaded[name], x)
        with np.load(dump_path(tmp_path, name)) as data:
            np.testing.assert_array_equal(data["quantized"], np.round(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.npz" for n in arrays)  # no temporaries left


def test_bad_folders_and_files(tmp_path):
    with pytest.raises(DumpError, match="does not exist"):
        load_fp32(tmp_path / "missing")
    with pytest.raises(DumpError, match="no <layer>.npz dump files"):
        load_fp32(tmp_path)
    np.savez(tmp_path / "conv0_activation.npz", other=np.zeros(3))
    with pytest.raises(DumpError, match="has no 'fp32' array .*other"):
        read_fp32(dump_path(tmp_path, "conv0_activation"))
