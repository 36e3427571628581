"""ckptstore.lightning.StoreCheckpointIO: with Trainer(plugins=[...]) and ModelCheckpoint on
CPU (top-k removal, last.ckpt replaced, resume from a stored path), sync and async; removal
ordered after queued saves; paths mapped to store checkpoints."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
L = pytest.importorskip("lightning")

import ckptstore  # noqa: E402
from ckptstore.lightning import PATH_KEY, StoreCheckpointIO  # noqa: E402


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


def _trainer(io, dirpath, max_epochs):
    cb = L.pytorch.callbacks.ModelCheckpoint(dirpath=dirpath, monitor="train_loss",
                                             save_top_k=2, save_last=True,
                                             every_n_train_steps=4)
    t = L.Trainer(max_epochs=max_epochs, plugins=[io], callbacks=[cb], logger=False,
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
    # Nothing at the paths themselves; the store holds top-2 plus last, each path once.
    assert not run.exists() or not any(run.iterdir())
    paths = _paths(store_path)
    expected = {os.path.abspath(p) for p in cb.best_k_models} | {os.path.abspath(cb.last_model_path)}
    assert set(paths) == expected and len(expected) == 3, (paths, expected)
    assert all(n == 1 for n in paths.values()), paths

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
