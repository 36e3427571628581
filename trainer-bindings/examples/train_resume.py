#!/usr/bin/env python3
"""Trains a small model on CPU with ckptstore's ModelCheckpoint and resumes after any kill.

    python train_resume.py --dir /tmp/run1 --steps 300

Kill it (SIGKILL, power cut, ...) and start it again with the same arguments: it resumes from
the newest valid checkpoint — model, optimizer, RNG, step — and finishes with exactly the
weights an uninterrupted run ends with, bit for bit (tests/test_train_resume.py checks that).
The data is generated in the script (no downloads); training is deterministic on CPU.
"""

from __future__ import annotations

import argparse
import time

import torch

import ckptstore as cs


def make_data(n: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n, 16, generator=g)
    w = torch.randn(16, 1, generator=g)
    y = torch.tanh(x @ w) + 0.05 * torch.randn(n, 1, generator=g)
    return x, y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", required=True, help="checkpoint store directory")
    ap.add_argument("--steps", type=int, default=300, help="total training steps")
    ap.add_argument("--save-every", type=int, default=10, help="checkpoint every N steps")
    ap.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    ap.add_argument("--async-save", action="store_true", help="save with save_async")
    ap.add_argument("--step-delay", type=float, default=0.0,
                    help="seconds to sleep per step (gives a killer time to strike)")
    args = ap.parse_args()

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = make_data()
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(),
                                torch.nn.Dropout(0.1), torch.nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=50, gamma=0.5)
    batches = torch.Generator().manual_seed(99)  # which samples each step sees

    cfg = cs.CheckpointConfig(save_checkpoint_steps=args.save_every, keep_checkpoint_max=args.keep,
                              async_save=args.async_save, append_info=["step_num"],
                              exception_save=True)
    cb = cs.ModelCheckpoint(prefix="mlp", directory=args.dir, config=cfg)
    step = 0
    state = cb.resume()
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        batches.set_state(state["batch_rng"])
        torch.set_rng_state(state["torch_rng"])  # dropout masks
        step = state["step"]
        print(f"resumed at step {step}", flush=True)

    def snapshot() -> dict:
        return {"model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "batch_rng": batches.get_state(),
                "torch_rng": torch.get_rng_state(), "step": step}

    with cb:
        while step < args.steps:
            idx = torch.randint(0, x.shape[0], (64,), generator=batches)
            loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            epoch = step // 100
            if step == args.steps:
                cb.save_now(step, epoch, snapshot)  # the final state, whatever the trigger
            else:
                cb.step_end(step, epoch, snapshot)
            print(f"step {step} loss {loss.item():.6f}", flush=True)
            if args.step_delay:
                time.sleep(args.step_delay)
    print("done", flush=True)


if __name__ == "__main__":
    main()
