"""Output names cannot escape the prefix; regressor files are validated before use; a regressor
survives a save/load round trip."""

import json

import pytest
import torch

from pipeline.regressor import IoURegressor, load_regressor, save_regressor
from pipeline.storage import Output


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".", "x\\y", "", "shard 1"])
def test_output_names_cannot_escape(tmp_path, name):
    out = Output(str(tmp_path / "out"))
    with pytest.raises(ValueError, match="unsafe output name"):
        out.path("boxes", name)


def test_output_writes_atomically_and_lists_markers(tmp_path):
    out = Output(str(tmp_path / "out"))
    assert out.done_shards() == set()
    out.write_json({"ok": 1}, "_shards", "shard-a.json")
    out.write_json({"ok": 1}, "_shards", "shard-b.json")
    assert out.done_shards() == {"shard-a", "shard-b"}
    assert not list((tmp_path / "out" / "_shards").glob("*.tmp"))


def test_regressor_round_trip(tmp_path):
    torch.manual_seed(0)
    model = IoURegressor(num_layers=3, num_heads=2, grid=8).eval()
    x = torch.rand(5, 4, 3, 2, 8, 8)
    save_regressor(model, tmp_path / "r", {"model_id": "m"})
    loaded, meta = load_regressor(tmp_path / "r", 3, 2)
    assert meta["model_id"] == "m" and meta["grid"] == 8
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x))
    assert ((loaded(x) >= 0) & (loaded(x) <= 1)).all()


def test_regressor_validation(tmp_path):
    save_regressor(IoURegressor(3, 2, 8), tmp_path / "r", {"model_id": "m"})
    with pytest.raises(ValueError, match="trained for 3 layers x 2 heads"):
        load_regressor(tmp_path / "r", 4, 2)
    meta = json.loads((tmp_path / "r" / "regressor.json").read_text())
    (tmp_path / "r" / "regressor.json").write_text(json.dumps({**meta, "grid": "16"}))
    with pytest.raises(ValueError, match="'grid' must be a positive integer"):
        load_regressor(tmp_path / "r", 3, 2)
    with pytest.raises(FileNotFoundError, match="regressor.safetensors and regressor.json"):
        load_regressor(tmp_path / "missing", 3, 2)


def test_fit_learns_when_most_ious_are_zero():
    # The organism's candidates: ~75% have IoU 0. The signal sits in the maps (the attention mass
    # in the centre cell of one coordinate token). A regressor that starts at sigmoid(0) = 0.5
    # collapsed to a constant on such data; this one must rank held-out candidates.
    from pipeline.metrics import pearson
    from pipeline.train_regressor import fit

    def data(n, seed):
        g = torch.Generator().manual_seed(seed)
        iou = torch.where(torch.rand(n, generator=g) < 0.75, torch.zeros(n), torch.rand(n, generator=g))
        maps = torch.rand(n, 4, 2, 2, 8, 8, generator=g)
        maps[:, 0, 0, 0, 4, 4] += 8 * iou
        maps = maps / maps.sum(dim=(-1, -2), keepdim=True)
        return maps.numpy(), iou.numpy(), None, [0, 1], [0, 1], 8

    train, calib = data(600, 0), data(300, 1)
    model, metrics = fit(train, calib, epochs=30, log=lambda *_: None)
    with torch.no_grad():
        pred = model(torch.from_numpy(calib[0])).numpy()
    assert pred.std() > 0.02  # not one constant
    assert metrics["calib_pearson"] > 0.8 and pearson(pred, calib[1]) > 0.8


def test_dense_maps_fills_chunks_in_row_order_and_names_a_wrong_width():
    import numpy as np
    import polars as pl

    from pipeline.train_regressor import _dense_maps

    shape = (4, 2, 3, 2, 2)
    rows = np.random.default_rng(0).random((7, int(np.prod(shape)))).astype(np.float32)
    col = pl.Series("maps", rows.tolist(), dtype=pl.List(pl.Float32))
    got = _dense_maps(col, shape, chunk=3)  # chunks of 3, 3, 1 rows
    assert got.shape == (7, *shape) and got.dtype == np.float32
    assert np.array_equal(got.reshape(7, -1), rows)
    with pytest.raises(ValueError, match="maps of 96 values, expected 192"):
        _dense_maps(col, (4, 2, 3, 2, 2, 2))
