"""The small deterministic training setup the MindSpore tests share (and run_train.py runs in a
child process): a two-layer network, Momentum, a fixed dataset of 6 batches per epoch."""

import numpy as np
import mindspore as ms
import mindspore.dataset as ds
from mindspore import Model, nn

BATCH, SAMPLES = 8, 48
STEPS_PER_EPOCH = SAMPLES // BATCH


class Net(nn.Cell):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Dense(8, 16)
        self.relu = nn.ReLU()
        self.fc2 = nn.Dense(16, 4)

    def construct(self, x):
        return self.fc2(self.relu(self.fc1(x)))


def data():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((SAMPLES, 8)).astype(np.float32),
            rng.integers(0, 4, SAMPLES).astype(np.int32))


def dataset():
    x, y = data()
    return ds.NumpySlicesDataset({"x": x, "y": y}, shuffle=False).batch(BATCH)


def model(seed: int = 1):
    """(net, optimizer, Model); the same seed gives the same initial parameters."""
    ms.set_seed(seed)
    net = Net()
    loss = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
    opt = nn.Momentum(net.trainable_params(), 0.05, 0.9)
    return net, opt, Model(net, loss, opt)


def params(cell) -> dict:
    """name -> a copy of the value, of every parameter of ``cell``."""
    return {p.name: p.asnumpy().copy() for _, p in cell.parameters_and_names()}


def assert_same(a: dict, b: dict, shapes: bool = True) -> None:
    """Same names, dtypes, (with ``shapes``) shapes and bytes. MindSpore itself reports some
    optimizer scalars (learning_rate) as shape () in one cell and (1,) in another."""
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert not shapes or a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), f"{k} differs"
