"""ckptstore.lightning.StoreCheckpointIO: with Trainer(plugins=[...]) and ModelCheckpoint on
CPU (top-k removal, last.ckpt replaced, resume from a stored path), sync and async; removal
ordered after queued saves; paths mapped to store checkpoints."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
L = pytest.importorskip("lightning")

import ckptstore  # noqa: E402
from ckptstore.lightning import PATH_KEY, StoreCheckpointIO, _read_pointer  # noqa: E402


class Tiny(L.LightningModule):
    def __init__(self, lr: float = 0.05):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                       torch.nn.Linear(16, 1))

    def training_step(self, batch, _):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=5)]


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    ds = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    return torch.utils.data.DataLoader(ds, batch_size=8)


def _trainer(io, dirpath, max_epochs, **cb_kw):
    kw = {"monitor": "train_loss", "save_top_k": 2, "save_last": True,
          "every_n_train_steps": 4, **cb_kw}
    cb = L.pytorch.callbacks.ModelCheckpoint(dirpath=dirpath, **kw)
    t = L.Trainer(max_epochs=max_epochs, plugins=[io] if io is not None else None, callbacks=[cb], logger=False,
                  enable_progress_bar=False, enable_model_summary=False,
                  accelerator="cpu", devices=1)
    return t, cb


def _paths(store_path) -> dict[str, int]:
    s = ckptstore.Store(store_path, read_only=True)
    out: dict[str, int] = {}
    for c in s.list():
        p = c["metadata"][PATH_KEY]
        out[p] = out.get(p, 0) + 1
    return out


@pytest.mark.parametrize("async_save", [False, True])
def test_trainer_model_checkpoint_and_resume(tmp_path, async_save):
    torch.manual_seed(0)
    store_path = tmp_path / "store"
    run = tmp_path / "run"
    io = StoreCheckpointIO(store_path, async_save=async_save)
    trainer, cb = _trainer(io, run, max_epochs=2)
    model = Tiny()
    trainer.fit(model, _data())
    # The store holds top-2 plus last, each path once; at each path a pointer file, and
    # nothing else in the directory.
    paths = _paths(store_path)
    expected = {os.path.abspath(p) for p in cb.best_k_models} | {os.path.abspath(cb.last_model_path)}
    assert set(paths) == expected and len(expected) == 3, (paths, expected)
    assert all(n == 1 for n in paths.values()), paths
    assert {str(p) for p in run.iterdir()} == expected
    assert all(_read_pointer(p)["path"] == p for p in expected)

    # load_checkpoint gives Lightning's dict back.
    ck = StoreCheckpointIO(store_path).load_checkpoint(cb.last_model_path)
    assert ck["global_step"] == trainer.global_step and ck["hyper_parameters"]["lr"] == 0.05
    for k, v in model.state_dict().items():
        assert torch.equal(ck["state_dict"][k], v), k

    # Resume from the stored best checkpoint in a new Trainer: training continues from it.
    io2 = StoreCheckpointIO(store_path, async_save=async_save)
    trainer2, _ = _trainer(io2, run, max_epochs=3)
    model2 = Tiny()
    trainer2.fit(model2, _data(), ckpt_path=cb.last_model_path)
    assert trainer2.global_step == trainer.global_step + 8
    assert trainer2.current_epoch == 3


def test_remove_waits_for_queued_saves(tmp_path):
    store_path = tmp_path / "store"
    io = StoreCheckpointIO(store_path, async_save=True)
    big = {"w": torch.randn(8 << 20), "global_step": 1, "epoch": 0}
    io.save_checkpoint(big, tmp_path / "a.ckpt")
    io.save_checkpoint({**big, "global_step": 2}, tmp_path / "b.ckpt")
    io.remove_checkpoint(tmp_path / "a.ckpt")
    # When the removal returns, the queued save of b is durable and a is gone.
    assert _paths(store_path) == {str(tmp_path / "b.ckpt"): 1}
    # Saving a path again replaces it once the new one is durable.
    io.save_checkpoint({**big, "global_step": 3}, tmp_path / "b.ckpt")
    io.teardown()
    s = ckptstore.Store(store_path, read_only=True)
    assert [c["step"] for c in s.list()] == [3]
    with pytest.raises(FileNotFoundError, match="no checkpoint saved as"):
        StoreCheckpointIO(store_path).load_checkpoint(tmp_path / "a.ckpt")


def test_unencodable_value_writes_nothing(tmp_path):
    io = StoreCheckpointIO(tmp_path / "store")
    with pytest.raises(TypeError):
        io.save_checkpoint({"hyper_parameters": {"fn": object()}, "global_step": 1},
                           tmp_path / "x.ckpt")
    io.teardown()
    assert ckptstore.Store(tmp_path / "store", read_only=True).list() == []


def run_doc_example(relpath, heading, monkeypatch, tmp_path) -> dict:
    import tempfile

    from conftest import doc_code
    code = doc_code(relpath, heading)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    env: dict = {}
    exec(compile(code, relpath, "exec"), env)
    return env


def test_readme_dcp_lightning_quick_start_runs(monkeypatch, tmp_path):
    """README.md's DCP + Lightning quick start runs as written."""
    env = run_doc_example("README.md", "### PyTorch DCP and Lightning", monkeypatch, tmp_path)
    assert [c["step"] for c in ckptstore.Store(env["path"], read_only=True).list()] == [1000]
    assert isinstance(env["trainer"], L.Trainer)


def test_python_guide_dcp_lightning_example_runs(monkeypatch, tmp_path):
    """docs/PYTHON.md's DCP + Lightning example runs as written."""
    env = run_doc_example("docs/PYTHON.md", "## torch.distributed.checkpoint and Lightning",
                          monkeypatch, tmp_path)
    assert [c["step"] for c in ckptstore.Store(env["path"], read_only=True).list()] == [1000, 1001]


def _names(d) -> set[str]:
    return {p.name for p in d.iterdir()}


def test_lightnings_async_wrapper_trains_and_resumes_from_last(tmp_path):
    """Regression: under Lightning's AsyncCheckpointIO the worker thread's save and the main
    thread's removal each opened a writer, and training died with LockedError; and
    fit(ckpt_path="last") found nothing (no file at the Lightning paths) and started over."""
    from lightning.pytorch.plugins.io import AsyncCheckpointIO
    torch.manual_seed(0)
    store_path, run = tmp_path / "store", tmp_path / "run"
    inner = StoreCheckpointIO(store_path)
    trainer, cb = _trainer(AsyncCheckpointIO(inner), run, max_epochs=2)
    trainer.fit(Tiny(), _data())
    # Every path Lightning keeps is in the store. (It may hold more: AsyncCheckpointIO removes
    # on the main thread while the save it overtakes may still be queued on its worker, and
    # then that save lands after its removal; Lightning's own files do the same.)
    paths = _paths(store_path)
    kept = {os.path.abspath(p) for p in cb.best_k_models} | {os.path.abspath(cb.last_model_path)}
    assert kept <= set(paths) and all(os.path.isfile(p) for p in kept), (paths, kept)
    # AsyncCheckpointIO.teardown does not call the wrapped IO's teardown: still open
    assert inner._store is not None and not inner._store.closed
    inner.teardown()
    assert inner._store is None

    inner2 = StoreCheckpointIO(store_path)
    trainer2, _ = _trainer(AsyncCheckpointIO(inner2), run, max_epochs=3)
    trainer2.fit(Tiny(), _data(), ckpt_path="last")
    assert trainer2.global_step == trainer.global_step + 8 and trainer2.current_epoch == 3
    inner2.teardown()


def test_a_second_run_into_the_same_dirpath_keeps_the_first_runs_checkpoints(tmp_path):
    """Regression: a second run saved under the first run's names (nothing existed at the
    paths, so ModelCheckpoint never added "-v1") and replaced its checkpoints. The names now
    follow Lightning's own, file-based behaviour in the same two runs."""
    def one_run(io, run):
        torch.manual_seed(0)
        trainer, _ = _trainer(io, run, max_epochs=1, monitor=None, save_top_k=-1)
        trainer.fit(Tiny(), _data())
        if io is not None:
            io.teardown()

    ref = tmp_path / "reference"  # Lightning's own torch.save files
    one_run(None, ref)
    one_run(None, ref)
    store_path, run = tmp_path / "store", tmp_path / "run"
    one_run(StoreCheckpointIO(store_path), run)
    first = {p.name: StoreCheckpointIO(store_path).load_checkpoint(p)["state_dict"]
             for p in run.iterdir()}
    one_run(StoreCheckpointIO(store_path), run)
    assert _names(run) == _names(ref) and any("-v1" in n for n in _names(run)), \
        (_names(run), _names(ref))
    for name, sd in first.items():  # the first run's checkpoints, unchanged
        back = StoreCheckpointIO(store_path).load_checkpoint(run / name)["state_dict"]
        assert all(torch.equal(back[k], v) for k, v in sd.items()), name
    assert sum(_paths(store_path).values()) == len(_names(run))


def test_a_lightning_file_from_before_the_store_still_loads(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"state_dict": {"w": torch.ones(3)}, "global_step": 7}, run / "old.ckpt")
    ck = StoreCheckpointIO(tmp_path / "store").load_checkpoint(run / "old.ckpt")
    assert ck["global_step"] == 7 and torch.equal(ck["state_dict"]["w"], torch.ones(3))
