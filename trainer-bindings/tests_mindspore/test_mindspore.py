"""ckptstore.mindspore with the real MindSpore: model.train + ModelCheckpoint, load_checkpoint +
load_param_into_net, triggers, retention, exception saves, bad input, and parity with
MindSpore's own ModelCheckpoint on the same run."""

import os
import time

import numpy as np
import pytest

import mindspore as ms
from mindspore import Parameter, Tensor, nn
from mindspore.train import Callback
from mindspore.train import CheckpointConfig as MsCheckpointConfig
from mindspore.train import ModelCheckpoint as MsModelCheckpoint

import ckptstore
from ckptstore.mindspore import (CheckpointConfig, ModelCheckpoint, load_checkpoint,
                                 load_param_into_net, per_minutes_doomed, save_checkpoint)
from msnet import STEPS_PER_EPOCH, Net, assert_same, dataset, model, params


def names(store_dir) -> list[str]:
    with ckptstore.Store(store_dir, read_only=True) as s:
        return [c["metadata"]["name"] for c in s.list()]


def assert_same_dicts(ours: dict, theirs: dict, ordered: bool = True) -> None:
    """Two load_checkpoint dicts hold the same names (in the same order), str values and
    Parameters of the same dtype, shape and bytes."""
    assert (list(ours) if ordered else sorted(ours)) == \
        (list(theirs) if ordered else sorted(theirs))
    for k, v in theirs.items():
        if isinstance(v, str):
            assert ours[k] == v, k
            continue
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape, k
        assert ours[k].asnumpy().tobytes() == v.asnumpy().tobytes(), k


def as_numpy(d: dict) -> dict:
    return {k: v.asnumpy() for k, v in d.items() if not isinstance(v, str)}


class Recorder(Callback):
    """Copies every parameter of the train network at each step end: (step, params)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def step_end(self, run_context):
        cb = run_context.original_args()
        self.seen.append((cb.cur_step_num, params(cb.train_network)))


class RaiseAt(Callback):
    def __init__(self, step):
        super().__init__()
        self.step = step

    def step_end(self, run_context):
        if run_context.original_args().cur_step_num == self.step:
            raise RuntimeError(f"injected failure at step {self.step}")


# -- the seed's own example --------------------------------------------------------------------

@pytest.mark.parametrize("sink", [False, True])
def test_train_with_callback_then_load_into_a_fresh_net(tmp_path, sink):
    d = tmp_path / "ckpts"
    net, opt, m = model()
    cfg = CheckpointConfig(save_checkpoint_steps=4, keep_checkpoint_max=3,
                           append_info=["epoch_num", "step_num"])
    cb = ModelCheckpoint(prefix="checkpoint_lenet", directory=str(d), config=cfg)
    m.train(3, dataset(), callbacks=[cb], dataset_sink_mode=sink)
    final = params(m.train_network)

    # 18 steps, 6 per epoch: saves at global steps 4, 8, 12, 16 and the last (18); keep 3
    assert names(d) == ["checkpoint_lenet-2_6", "checkpoint_lenet-3_4", "checkpoint_lenet-3_6"]
    with ckptstore.Store(d, read_only=True) as s:
        last = s.list()[-1]
        assert (last["step"], last["epoch"]) == (18, 3)
    assert cb.latest_ckpt_file_name == os.path.join(str(d), "checkpoint_lenet-3_6.ckpt")

    # the seed's code: load_checkpoint + load_param_into_net into fresh cells
    net2, opt2, _ = model(seed=7)
    assert not all(np.array_equal(a, final[k]) for k, a in params(net2).items())
    param_dict = load_checkpoint(cb.latest_ckpt_file_name)
    assert int(param_dict["epoch_num"].asnumpy()) == 3
    assert int(param_dict["step_num"].asnumpy()) == 18
    assert param_dict["epoch_num"].dtype == ms.int64
    not_loaded, ckpt_not_loaded = load_param_into_net(net2, param_dict)
    assert not_loaded == []
    assert "epoch_num" in ckpt_not_loaded and "moments.fc1.weight" in ckpt_not_loaded
    load_param_into_net(opt2, param_dict)
    assert_same({k: v for k, v in params(net2).items()},
                {k: final[k] for k in params(net2)})
    assert_same(params(opt2), {k: final[k] for k in params(opt2)}, shapes=False)

    # every spelling of the same checkpoint gives the same dict
    for spelling in (str(d / "checkpoint_lenet-3_6"), str(d / "checkpoint_lenet-3_6.safetensors"),
                     str(d / "latest"), str(d), d / "checkpoint_lenet-3_6.ckpt"):
        assert_same(as_numpy(load_checkpoint(spelling)), as_numpy(param_dict))
    with ckptstore.Store(d, read_only=True) as s:
        assert_same(as_numpy(load_checkpoint(s)), as_numpy(param_dict))
    # an older one by name, through net=
    net3, _, _ = model(seed=9)
    older = load_checkpoint(str(d / "checkpoint_lenet-3_4.ckpt"), net=net3)
    assert int(older["step_num"].asnumpy()) == 16
    assert not np.array_equal(params(net3)["fc1.weight"], final["fc1.weight"])


def test_same_names_values_and_load_results_as_mindsporess_own_callback(tmp_path):
    """The same run, once with MindSpore's ModelCheckpoint writing files and once with ours
    writing the store: the same checkpoints survive, under the same names, and load to the
    same dicts with the same load_param_into_net results."""
    info = ["epoch_num", "step_num", {"lr": 0.05, "flag": True, "note": "run-1", "n": 7}]

    ms_dir, st = tmp_path / "mindspore_files", tmp_path / "store"
    for callback, config, directory in ((MsModelCheckpoint, MsCheckpointConfig, ms_dir),
                                        (ModelCheckpoint, CheckpointConfig, st)):
        _, _, m = model()  # the same seed: the same initial parameters
        m.train(2, dataset(), dataset_sink_mode=False, callbacks=[callback(
            prefix="lenet", directory=str(directory),
            config=config(save_checkpoint_steps=5, keep_checkpoint_max=2, append_info=info))])

    ms_files = sorted(f[:-5] for f in os.listdir(ms_dir) if f.endswith(".ckpt"))
    assert sorted(names(st)) == ms_files, (names(st), ms_files)
    for name in ms_files:
        theirs = ms.load_checkpoint(str(ms_dir / f"{name}.ckpt"))
        ours = load_checkpoint(str(st / f"{name}.ckpt"))
        assert_same_dicts(ours, theirs)
        for target in (Net(), nn.Momentum(Net().trainable_params(), 0.1, 0.9)):
            assert load_param_into_net(target, ours) == ms.load_param_into_net(target, theirs)


def test_async_save_commits_the_same_checkpoints(tmp_path):
    net, _, m = model()
    d = tmp_path / "a"
    rec = Recorder()
    cb = ModelCheckpoint("a", str(d), CheckpointConfig(save_checkpoint_steps=3,
                                                       keep_checkpoint_max=10, async_save=True))
    m.train(2, dataset(), callbacks=[cb, rec], dataset_sink_mode=False)
    assert names(d) == ["a-1_3", "a-1_6", "a-2_3", "a-2_6"]
    by_step = dict(rec.seen)
    for step, name in ((3, "a-1_3"), (9, "a-2_3"), (12, "a-2_6")):
        assert_same(as_numpy({k: v for k, v in load_checkpoint(str(d / name)).items()
                              if k in by_step[step]}), by_step[step])


# -- triggers and retention --------------------------------------------------------------------

class Slow(Callback):
    def step_end(self, run_context):
        time.sleep(0.12)


class WallTimes(Callback):
    """After each step, the wall time of each checkpoint ``cb`` has committed so far."""

    def __init__(self, cb):
        super().__init__()
        self.cb, self.times = cb, {}

    def step_end(self, run_context):
        for c in self.cb.saved:
            if c["id"] not in self.times:
                self.times[c["id"]] = self.cb.store.info(id=c["id"])["wall_time_unix_ns"]


class TriggerTimes(ModelCheckpoint):
    """Records the clock reading of each save decision (MindSpore's rule: more than N seconds
    since the last decision; commit times also carry each save's own duration)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.triggers = []

    def _due(self, cb, force):
        due = super()._due(cb, force)
        if due and not force:
            self.triggers.append(self._last_time)
        return due


def test_save_checkpoint_seconds_and_keep_per_n_minutes(tmp_path):
    d = tmp_path / "t"
    cfg = CheckpointConfig(save_checkpoint_steps=None, save_checkpoint_seconds=1,
                           keep_checkpoint_max=None, keep_checkpoint_per_n_minutes=1)
    assert cfg.save_checkpoint_seconds == 1 and cfg.keep_checkpoint_per_n_minutes == 1
    cb = TriggerTimes("sec", str(d), cfg)
    walls = WallTimes(cb)
    _, _, m = model()
    t0 = time.time()
    m.train(6, dataset(), callbacks=[Slow(), cb, walls], dataset_sink_mode=False)
    assert time.time() - t0 >= 36 * 0.12
    # saves only when more than 1 s passed since the previous save decision, never one a step:
    # 36 steps of t >= 0.12 s, decisions at most 1 s + t apart, make at least 3
    assert len(cb.triggers) >= 3
    assert all(b - a > 1 for a, b in zip(cb.triggers, cb.triggers[1:]))
    with ckptstore.Store(d, read_only=True) as s:  # the save at the end, after the last step
        walls.times.update((c["id"], c["wall_time_unix_ns"]) for c in s.list()
                           if c["id"] not in walls.times)
    # retention: the newest of each 1-minute window of the commits, and the newest overall;
    # 3+ commits in a run of well under a minute span at most two windows: one was deleted
    committed = [{"id": c["id"], "wall_time_unix_ns": walls.times[c["id"]]} for c in cb.saved]
    doomed = {c["id"] for c in per_minutes_doomed(committed, 1)}
    with ckptstore.Store(d, read_only=True) as s:
        kept = [c["id"] for c in s.list()]
    assert kept == [c["id"] for c in cb.saved if c["id"] not in doomed]
    assert kept[-1] == cb.saved[-1]["id"] and len(kept) < len(cb.saved)


def test_steps_take_precedence_over_seconds_as_in_mindspore(tmp_path):
    cfg = CheckpointConfig(save_checkpoint_seconds=1000, keep_checkpoint_max=50)
    assert cfg.save_checkpoint_steps == 1 and cfg.save_checkpoint_seconds is None
    d = tmp_path / "p"
    _, _, m = model()
    m.train(1, dataset(), callbacks=[ModelCheckpoint("p", str(d), cfg)], dataset_sink_mode=False)
    assert names(d) == [f"p-1_{i}" for i in range(1, STEPS_PER_EPOCH + 1)]


def test_per_minutes_doomed_keeps_the_newest_of_each_window():
    m = 60 * 10**9
    cks = [{"id": i, "wall_time_unix_ns": t} for i, t in
           enumerate([0, m // 2, m + 1, m + 2, 3 * m, 3 * m + 5], start=1)]
    assert [c["id"] for c in per_minutes_doomed(cks, 1)] == [1, 3, 5]
    assert [c["id"] for c in per_minutes_doomed(cks, 2)] == [1, 2, 3, 5]


def test_retention_counts_only_its_own_prefix_and_never_breakpoints(tmp_path):
    d = tmp_path / "r"
    with ckptstore.Store(d) as s:
        other = Net()
        save_checkpoint(other, str(d / "other-1_1.ckpt"), store=s)
    net, _, m = model()
    cfg = CheckpointConfig(save_checkpoint_steps=2, keep_checkpoint_max=2, exception_save=True)
    with pytest.raises(RuntimeError, match="injected"):
        m.train(2, dataset(), callbacks=[ModelCheckpoint("mine", str(d), cfg), RaiseAt(5)],
                dataset_sink_mode=False)
    _, _, m2 = model()
    m2.train(1, dataset(), callbacks=[ModelCheckpoint("mine", str(d), cfg)],
             dataset_sink_mode=False)
    assert names(d) == ["other-1_1", "mine-1_5_breakpoint", "mine-1_4", "mine-1_6"]


# -- exception save ----------------------------------------------------------------------------

def test_exception_mid_epoch_leaves_a_breakpoint_of_the_last_step(tmp_path):
    d = tmp_path / "e"
    rec = Recorder()
    cfg = CheckpointConfig(save_checkpoint_steps=4, keep_checkpoint_max=5, exception_save=True,
                           append_info=["epoch_num", "step_num"])
    _, _, m = model()
    # step 9 = epoch 2, step 3 of it; the raiser runs after the network call of step 9
    with pytest.raises(RuntimeError, match="injected failure at step 9"):
        m.train(3, dataset(), callbacks=[rec, ModelCheckpoint("lenet", str(d), cfg), RaiseAt(9)],
                dataset_sink_mode=False)
    assert names(d) == ["lenet-1_4", "lenet-2_2", "lenet-2_3_breakpoint"]
    bp = load_checkpoint(str(d / "lenet-2_3_breakpoint.ckpt"))
    step, expected = rec.seen[-1]
    assert step == 9
    assert_same({k: v for k, v in as_numpy(bp).items() if k in expected}, expected)
    assert int(bp["step_num"].asnumpy()) == 9 and int(bp["epoch_num"].asnumpy()) == 2
    with ckptstore.Store(d, read_only=True) as s:
        info = s.list()[-1]
        assert (info["step"], info["epoch"], info["metadata"]["breakpoint"]) == (9, 2, 1)


def test_exception_in_the_dataset_saves_the_state_before_it(tmp_path):
    import mindspore.dataset as ds
    from msnet import data

    class Source:  # random access with a length: MindSpore fetches ahead, not everything first
        def __init__(self):
            self.x, self.y = data()

        def __len__(self):
            return 1200

        def __getitem__(self, i):
            if i == 8 * 100 + 3:  # in batch 101; MindSpore's prefetch surfaces it some dozens
                raise ValueError("corrupt sample")  # of steps early (31 here), mid-epoch
            return self.x[i % 48], self.y[i % 48]

    d = tmp_path / "g"
    rec = Recorder()
    _, _, m = model()
    cfg = CheckpointConfig(save_checkpoint_steps=3, keep_checkpoint_max=5, exception_save=True)
    with pytest.raises(RuntimeError, match="dataset"):
        m.train(1, ds.GeneratorDataset(Source(), ["x", "y"], shuffle=False).batch(8),
                callbacks=[rec, ModelCheckpoint("g", str(d), cfg)], dataset_sink_mode=False)
    last_step, expected = rec.seen[-1]
    assert 3 < last_step < 100
    assert names(d)[-1] == f"g-1_{last_step}_breakpoint"
    got = as_numpy(load_checkpoint(str(d / names(d)[-1])))
    assert_same({k: v for k, v in got.items() if k in expected}, expected)


def test_without_exception_save_an_exception_saves_nothing_more(tmp_path):
    d = tmp_path / "n"
    _, _, m = model()
    with pytest.raises(RuntimeError):
        m.train(1, dataset(), callbacks=[ModelCheckpoint("n", str(d), CheckpointConfig(
            save_checkpoint_steps=2)), RaiseAt(3)], dataset_sink_mode=False)
    assert names(d) == ["n-1_2"]


# -- save_checkpoint, dtypes, selection ---------------------------------------------------------

class Mixed(nn.Cell):
    def __init__(self):
        super().__init__()
        self.w16 = Parameter(Tensor(np.linspace(-3, 3, 12, dtype=np.float32).reshape(3, 4),
                                    ms.bfloat16), name="w16")
        self.h = Parameter(Tensor(np.arange(6, dtype=np.float16)), name="h")
        self.d = Parameter(Tensor(np.array([1e-300, 2.5])), name="d")
        self.i = Parameter(Tensor(np.array([[-(2**40), 3]], dtype=np.int64)), name="i",
                           requires_grad=False)
        self.b = Parameter(Tensor(np.array([True, False])), name="b", requires_grad=False)
        self.u = Parameter(Tensor(np.array([0, 255], dtype=np.uint8)), name="u",
                           requires_grad=False)


def test_save_checkpoint_then_load_every_dtype_bit_exact(tmp_path):
    net = Mixed()
    path = tmp_path / "s" / "mixed-1_1.ckpt"
    save_checkpoint(net, str(path), append_dict={"epoch_num": 1, "step_num": 1, "x": 0.25})
    ms_file = tmp_path / "mixed.ckpt"
    ms.save_checkpoint(net, str(ms_file), append_dict={"epoch_num": 1, "step_num": 1, "x": 0.25})
    ours, theirs = load_checkpoint(str(path)), ms.load_checkpoint(str(ms_file))
    assert_same_dicts(ours, theirs)
    assert ours["w16"].dtype == ms.bfloat16


def test_enc_key_aes_gcm_seals_the_store_and_dec_key_loads_it(tmp_path):
    net = Mixed()
    key = bytes(range(32))
    path = tmp_path / "s" / "mixed-1_1.ckpt"
    save_checkpoint(net, str(path), append_dict={"epoch_num": 1, "step_num": 1},
                    enc_key=key, enc_mode="AES-GCM")
    ms_file = tmp_path / "mixed.ckpt"
    ms.save_checkpoint(net, str(ms_file), append_dict={"epoch_num": 1, "step_num": 1})
    assert_same_dicts(load_checkpoint(str(path), dec_key=key), ms.load_checkpoint(str(ms_file)))
    with pytest.raises(ckptstore.EncryptionKeyError, match="encrypted"):
        load_checkpoint(str(path))
    with pytest.raises(ckptstore.EncryptionKeyError, match="wrong key"):
        load_checkpoint(str(path), dec_key=bytes(32))
    w = net.d.asnumpy().tobytes()  # 16 bytes: 1e-300, 2.5
    for root, _, names in os.walk(tmp_path / "s"):
        for n in names:
            with open(os.path.join(root, n), "rb") as f:
                assert w not in f.read(), n


def test_prefix_filters_and_choice_func_select_as_mindspore_does(tmp_path):
    net = Net()
    save_checkpoint(net, str(tmp_path / "s" / "x.ckpt"), append_dict={"epoch_num": 2})
    ms.save_checkpoint(net, str(tmp_path / "x.ckpt"), append_dict={"epoch_num": 2})
    ours, theirs = str(tmp_path / "s" / "x.ckpt"), str(tmp_path / "x.ckpt")
    for kw in ({"specify_prefix": "fc1"}, {"filter_prefix": ["fc1", "epoch"]},
               {"choice_func": lambda n: n.endswith("bias")},
               {"specify_prefix": ("fc2",), "choice_func": lambda n: False},
               {"specify_prefix": "fc", "filter_prefix": "fc2.b"}):
        assert list(load_checkpoint(ours, **kw)) == list(ms.load_checkpoint(theirs, **kw)), kw
    with pytest.raises(ValueError, match="empty after filter"):
        load_checkpoint(ours, specify_prefix="nothing")


def test_a_mindspore_file_outside_a_store_is_read_by_mindspore(tmp_path):
    net = Net()
    f = tmp_path / "plain.ckpt"
    ms.save_checkpoint(net, str(f))
    assert_same(as_numpy(load_checkpoint(str(f))), as_numpy(ms.load_checkpoint(str(f))))


# -- interop with real MindSpore files through the CLI ------------------------------------------

def test_mindspore_file_imports_and_our_checkpoint_exports_bit_exact(tmp_path, ckpt_cli):
    import subprocess
    net = Mixed()
    f = tmp_path / "from_ms.ckpt"
    ms.save_checkpoint(net, str(f), append_dict={"epoch_num": 4, "step_num": 1875, "note": "n"})
    st = tmp_path / "st"
    subprocess.run([ckpt_cli, "import", str(f), str(st)], check=True, capture_output=True)
    assert_same_dicts(load_checkpoint(str(st)), ms.load_checkpoint(str(f)), ordered=False)

    # and back: a checkpoint saved by the callback, exported, read by MindSpore
    d = tmp_path / "cb"
    _, _, m = model()
    m.train(1, dataset(), callbacks=[ModelCheckpoint("e", str(d), CheckpointConfig(
        save_checkpoint_steps=3, append_info=["epoch_num", "step_num"]))], dataset_sink_mode=False)
    out = tmp_path / "exported.ckpt"
    subprocess.run([ckpt_cli, "export", str(d), str(out), "--format", "mindspore", "--crc"],
                   check=True, capture_output=True)
    exported = ms.load_checkpoint(str(out), crc_check=True)
    ours = load_checkpoint(str(d / "e-1_6.ckpt"))
    for k, v in ours.items():
        if isinstance(v, str):
            continue
        assert exported[k].dtype == v.dtype and exported[k].asnumpy().tobytes() == \
            v.asnumpy().tobytes(), k
    assert int(exported["step_num"].asnumpy()) == 6


# -- bad input ---------------------------------------------------------------------------------

def test_bad_input_is_a_clear_error(tmp_path):
    # enc_key: AES-256-GCM only (a 32-byte key); CBC modes and SM4 refused by name.
    with pytest.raises(ValueError, match="32-byte key"):
        CheckpointConfig(enc_key=b"0123456789abcdef")
    with pytest.raises(ValueError, match="32-byte key"):
        ModelCheckpoint("x", str(tmp_path / "x"), MsCheckpointConfig(enc_key=b"0" * 16))
    for mode in ("AES-CBC", "SM4-CBC"):
        with pytest.raises(NotImplementedError, match=mode):
            CheckpointConfig(enc_key=b"0" * 32, enc_mode=mode)
    with pytest.raises(ValueError):
        CheckpointConfig(save_checkpoint_steps=-1)  # MindSpore's own validation
    with pytest.raises(ValueError, match="reserved"):
        CheckpointConfig(append_info=[{"name": 1}])
    with pytest.raises(ValueError, match="prefix"):
        ModelCheckpoint("a/b", str(tmp_path))
    with pytest.raises(TypeError, match="CheckpointConfig"):
        ModelCheckpoint("a", str(tmp_path), config={"save_checkpoint_steps": 1})

    d = tmp_path / "s"
    save_checkpoint(Net(), str(d / "one.ckpt"))
    with pytest.raises(ckptstore.NotFoundError, match="no checkpoint named 'two'.*one"):
        load_checkpoint(str(d / "two.ckpt"))
    with pytest.raises(ckptstore.NotFoundError, match="not a ckptstore store"):
        load_checkpoint(str(tmp_path / "nowhere" / "x.ckpt"))
    with pytest.raises(ValueError, match="dec_key.*32-byte key"):
        load_checkpoint(str(d / "one.ckpt"), dec_key=b"k" * 16)
    with pytest.raises(NotImplementedError, match="SM4-CBC"):
        load_checkpoint(str(d / "one.ckpt"), dec_key=b"k" * 32, dec_mode="SM4-CBC")
    with pytest.raises(TypeError):
        load_checkpoint(42)


def test_damaged_checkpoint_is_refused_by_name_and_skipped_by_latest(tmp_path):
    d = tmp_path / "dmg"
    with ckptstore.Store(d) as s:
        net = Net()
        save_checkpoint(net, str(d / "a.ckpt"), store=s)
        good = params(net)
        for p in net.get_parameters():
            p.set_data(Tensor(p.asnumpy() + 1))
        save_checkpoint(net, str(d / "b.ckpt"), store=s)
    # flip a byte in the data of the newest segment, near its end: inside b's last chunk
    seg = max((d / "segments").iterdir(), key=lambda p: p.name)
    data = bytearray(seg.read_bytes())
    # (before the commit trailer that ends the segment, docs/FORMAT.md, if there is one)
    end = data.rfind(b"CKPTTRL\0")
    data[(end if end >= 0 else len(data)) - 64] ^= 0xFF
    seg.write_bytes(bytes(data))
    with ckptstore.Store(d, read_only=True) as s:
        a_id, b_id = [c["id"] for c in s.list()]
        s.verify(a_id)
        with pytest.raises(ckptstore.CorruptionError):
            s.verify(b_id)
    with pytest.raises(ckptstore.CorruptionError):
        load_checkpoint(str(d / "b.ckpt"))
    latest = load_checkpoint(str(d))  # the newest that verifies: a
    assert_same({k: v for k, v in as_numpy(latest).items() if k in good}, good)


def test_saved_network_and_a_callable_prefix(tmp_path):
    net, _, m = model()
    d = tmp_path / "sn"
    cfg = CheckpointConfig(save_checkpoint_steps=STEPS_PER_EPOCH, saved_network=net)
    m.train(2, dataset(), dataset_sink_mode=False, callbacks=[ModelCheckpoint(
        lambda cb: f"net-step{cb.cur_step_num}", str(d), cfg)])
    assert names(d) == ["net-step6", "net-step12"]
    got = load_checkpoint(str(d / "net-step12.ckpt"))
    assert sorted(got) == sorted(params(net))  # the network only: no optimizer state
    assert_same(as_numpy(got), params(net))


def test_loaded_parameters_own_their_memory(tmp_path):
    net = Mixed()
    path = str(tmp_path / "s" / "m.ckpt")
    save_checkpoint(net, path)
    first = load_checkpoint(path)
    for k in ("d", "h", "w16"):
        a = first[k].asnumpy()  # MindSpore hands out the Parameter's own memory, writable
        assert a.flags.writeable
        a[...] = 0  # would fault if it were the store's read-only map
    again = load_checkpoint(path)
    for k in ("d", "h", "w16"):
        assert again[k].asnumpy().tobytes() == net.parameters_dict()[k].asnumpy().tobytes()
        assert not first[k].asnumpy().any()


# -- drop-in gaps found by MindSpore's own checkpoint tests (issue 15) --------------------------

def test_mindspore_files_in_a_store_directory_are_loadable(tmp_path):
    """Regression: a .ckpt file already in a directory that became a store was NotFound."""
    d = tmp_path / "d"
    d.mkdir()
    net = Net()
    ms.save_checkpoint(net, str(d / "old.ckpt"))
    save_checkpoint(Net(), str(d / "new.ckpt"))  # d is a store now
    assert_same_dicts(load_checkpoint(str(d / "old.ckpt")), ms.load_checkpoint(str(d / "old.ckpt")))
    assert list(load_checkpoint(str(d / "new.ckpt"))) == list(params(Net()))


def test_a_missing_checkpoint_is_a_value_error_as_in_mindspore(tmp_path):
    """Regression: NotFoundError only, where MindSpore raises ValueError."""
    from ckptstore.mindspore import CheckpointNotFoundError
    d = tmp_path / "s"
    save_checkpoint(Net(), str(d / "one.ckpt"))
    for p in (d / "two.ckpt", tmp_path / "nowhere" / "x.ckpt"):
        with pytest.raises(ValueError):
            ms.load_checkpoint(str(tmp_path / "no.ckpt"))  # the reference
        with pytest.raises(ValueError) as ei:
            load_checkpoint(str(p))
        assert isinstance(ei.value, ckptstore.NotFoundError)
        assert isinstance(ei.value, CheckpointNotFoundError)


class Unsigned(nn.Cell):
    def __init__(self):
        super().__init__()
        from mindspore._c_expression import TensorPy
        self.u16 = Parameter(Tensor(np.arange(6, dtype=np.uint16).reshape(2, 3) * 9000),
                             name="u16")
        self.u32 = Parameter(Tensor(np.array([0, 1, 2**32 - 1], dtype=np.uint32)), name="u32")
        self.u64 = Parameter(Tensor(np.array([[2**64 - 1], [7]], dtype=np.uint64)), name="u64")
        self.q4 = Parameter(Tensor(TensorPy.convert_bytes_to_tensor(
            bytes([0x12, 0x34, 0xF7]), (3,), ms.qint4x2)), name="q4")
        self.f = Parameter(Tensor(np.ones(2, np.float32)), name="f")


def test_unsigned_and_qint4x2_parameters_round_trip_as_in_mindspore(tmp_path):
    """Regression: uint16/uint32/uint64/qint4x2 were refused; MindSpore saves and loads them."""
    net = Unsigned()
    ours_path = str(tmp_path / "s" / "u.ckpt")
    save_checkpoint(net, ours_path)
    ms.save_checkpoint(net, str(tmp_path / "u.ckpt"))
    ours, theirs = load_checkpoint(ours_path), ms.load_checkpoint(str(tmp_path / "u.ckpt"))
    assert_same_dicts(ours, theirs)
    assert [str(ours[k].dtype) for k in ("u16", "u32", "u64", "q4")] == \
        ["UInt16", "UInt32", "UInt64", "Int4"]
    fresh = Unsigned()
    for p in fresh.get_parameters():
        if str(p.dtype) != "Int4":
            p.set_data(Tensor(np.zeros(p.shape, p.asnumpy().dtype)))
    assert load_param_into_net(fresh, ours) == ([], [])
    for k in ("u16", "u32", "u64"):
        assert getattr(fresh, k).asnumpy().tobytes() == getattr(net, k).asnumpy().tobytes()


def test_a_raising_choice_func_is_a_value_error_as_in_mindspore(tmp_path):
    """Regression: a choice_func that raised gave its own error (TypeError), not ValueError."""
    def bad(name):
        raise TypeError("boom")

    net = Net()
    ms.save_checkpoint(net, str(tmp_path / "x.ckpt"))
    with pytest.raises(ValueError):
        ms.load_checkpoint(str(tmp_path / "x.ckpt"), choice_func=bad)  # the reference
    save_checkpoint(net, str(tmp_path / "s" / "x.ckpt"))
    with pytest.raises(ValueError, match="choice_func.*boom"):
        load_checkpoint(str(tmp_path / "s" / "x.ckpt"), choice_func=bad)
    with pytest.raises(ValueError, match="choice_func.*boom"):
        save_checkpoint(net, str(tmp_path / "s" / "y.ckpt"), choice_func=bad)


def test_the_directory_is_made_when_the_callback_is_built_as_in_mindspore(tmp_path):
    """Regression: the directory appeared only at the first save."""
    MsModelCheckpoint("p", str(tmp_path / "theirs"))
    ModelCheckpoint("p", str(tmp_path / "ours"))
    assert (tmp_path / "theirs").is_dir() and (tmp_path / "ours").is_dir()


def test_a_callable_directory_as_in_mindspore(tmp_path):
    """Regression: a callable directory was refused. MindSpore calls it at every step end."""
    _, _, m = model()
    cb = ModelCheckpoint("c", lambda cb: str(tmp_path / f"epoch{cb.cur_epoch_num}"),
                         CheckpointConfig(save_checkpoint_steps=STEPS_PER_EPOCH))
    m.train(2, dataset(), dataset_sink_mode=False, callbacks=[cb])
    assert names(tmp_path / "epoch1") == ["c-1_6"]
    assert names(tmp_path / "epoch2") == ["c-2_6"]
    assert cb.latest_ckpt_file_name == str(tmp_path / "epoch2" / "c-2_6.ckpt")


class SaveBest(Callback):
    """A "save best" during training, into the directory the ModelCheckpoint saves to."""

    def __init__(self, d):
        super().__init__()
        self.d = d

    def step_end(self, run_context):
        cb = run_context.original_args()
        if cb.cur_step_num % 4 == 0:
            save_checkpoint(cb.train_network, str(self.d / "best.ckpt"),
                            append_dict={"step_num": int(cb.cur_step_num)})


def test_two_callbacks_and_a_save_best_on_one_directory_as_in_mindspore(tmp_path):
    """Regression: a second writer in the same process (another ModelCheckpoint, or
    save_checkpoint during model.train) got LockedError naming this process."""
    d = tmp_path / "d"
    _, _, m = model()
    cfg = CheckpointConfig(save_checkpoint_steps=STEPS_PER_EPOCH)
    m.train(1, dataset(), dataset_sink_mode=False,
            callbacks=[ModelCheckpoint("a", str(d), cfg), ModelCheckpoint("b", str(d), cfg),
                       SaveBest(d)])
    got = names(d)
    assert {"a-1_6", "b-1_6", "best"} <= set(got), got
    assert load_checkpoint(str(d / "best.ckpt"))["step_num"].asnumpy() == 4
