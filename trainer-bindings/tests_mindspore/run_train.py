"""A MindSpore training script as users write it, on the store: resume from the latest
checkpoint if there is one, train to EPOCHS with ModelCheckpoint, dump the final parameters.

usage: run_train.py STORE_DIR OUT_NPZ [--sleep S] [--exception-save]
Prints "STEP <global step> SAVED <checkpoints saved by this process>" after every step."""

import os
import sys
import time

import numpy as np
from mindspore import nn
from mindspore.train import Callback, Model

from ckptstore import NotFoundError
from ckptstore.mindspore import CheckpointConfig, ModelCheckpoint, load_checkpoint, \
    load_param_into_net
from msnet import STEPS_PER_EPOCH, Net, dataset

EPOCHS = 5
store_dir, out_npz = sys.argv[1], sys.argv[2]
sleep = float(sys.argv[4]) if sys.argv[3:4] == ["--sleep"] else 0.0
exception_save = "--exception-save" in sys.argv

import mindspore as ms  # noqa: E402

ms.set_seed(1)
net = Net()
# a learning rate per step: a resume that lost the optimizer's global_step would diverge
lr = [0.1] * 10 + [0.05] * 10 + [0.02] * (EPOCHS * STEPS_PER_EPOCH - 20)
opt = nn.Momentum(net.trainable_params(), learning_rate=lr, momentum=0.9)
model = Model(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"), opt)

initial_epoch = 0
try:
    param_dict = load_checkpoint(os.path.join(store_dir, "latest"))
except NotFoundError:
    param_dict = None
if param_dict is not None:
    assert load_param_into_net(net, param_dict)[0] == []
    assert load_param_into_net(opt, param_dict)[0] == []
    initial_epoch = int(param_dict["epoch_num"].asnumpy())
    print(f"RESUME epoch {initial_epoch} step {int(param_dict['step_num'].asnumpy())}",
          flush=True)

ckpt_cb = ModelCheckpoint(prefix="train", directory=store_dir, config=CheckpointConfig(
    save_checkpoint_steps=STEPS_PER_EPOCH, keep_checkpoint_max=2,
    append_info=["epoch_num", "step_num"], exception_save=exception_save))


class Progress(Callback):
    def step_end(self, run_context):
        print(f"STEP {int(opt.global_step.asnumpy()[0])} SAVED {len(ckpt_cb.saved)}", flush=True)
        time.sleep(sleep)


if initial_epoch < EPOCHS:
    model.train(EPOCHS, dataset(), callbacks=[ckpt_cb, Progress()], dataset_sink_mode=False,
                initial_epoch=initial_epoch)
np.savez(out_npz, **{p.name: p.asnumpy() for _, p in model.train_network.parameters_and_names()})
print("DONE", flush=True)
