"""Quarantine and self-healing through the Python API (docs/GUARANTEES.md, "Bad chunks"): a
frozen tensor whose stored bytes rot fails verification in every checkpoint that shares it;
the next save of the same tensor heals them all, bit-exact."""

import torch
import pytest

import ckptstore as cs


def test_a_rotten_frozen_tensor_is_healed_by_the_next_save(store_dir):
    frozen = torch.arange(8192, dtype=torch.int32)  # 32 KiB, shared by every checkpoint
    with cs.Store(store_dir) as s:
        for step in (1, 2, 3):
            cs.save(s, {"frozen": frozen, "w": torch.full((4,), float(step))}, step=step)
        ids = [c["id"] for c in s.list()]
    # Bit rot: one byte of the frozen tensor's stored bytes, found by its content.
    needle = frozen.numpy().tobytes()[4096:4160]
    for seg in (store_dir / "segments").glob("*.seg"):
        raw = bytearray(seg.read_bytes())
        at = raw.find(needle)
        if at >= 0:
            raw[at + 10] ^= 0x01
            seg.write_bytes(bytes(raw))
            break
    else:
        pytest.fail("frozen bytes not found in any segment")
    with cs.Store(store_dir) as s:
        for i in ids:
            with pytest.raises(cs.CorruptionError):
                s.verify(i)
        cs.save(s, {"frozen": frozen, "w": torch.full((4,), 4.0)}, step=4)
        for i in ids:
            s.verify(i)
    with cs.Store(store_dir, read_only=True) as s:
        for i, step in zip(ids, (1, 2, 3)):
            back = cs.load(s, id=i)
            assert torch.equal(back["frozen"], frozen)
            assert torch.equal(back["w"], torch.full((4,), float(step)))


def test_scrub_returns_the_cli_json_report_and_heals(store_dir):
    frozen = torch.arange(8192, dtype=torch.int32)
    with cs.Store(store_dir) as s:
        cs.save(s, {"frozen": frozen}, step=1)
        cs.save(s, {"frozen": frozen, "w": torch.ones(4)}, step=2)
        clean = s.scrub()
        assert clean["ok"] is True and clean["broken"] == []
        assert clean["checkpoints"] == 2 and clean["bytes_read"] > 0
        assert clean["quarantined"] == clean["healed"] == clean["unhealed"] == []
    needle = frozen.numpy().tobytes()[4096:4160]
    for seg in sorted((store_dir / "segments").glob("*.seg")):
        raw = bytearray(seg.read_bytes())
        at = raw.find(needle)
        if at >= 0:
            raw[at + 10] ^= 0x01
            seg.write_bytes(bytes(raw))
            break
    else:
        pytest.fail("frozen bytes not found in any segment")
    with cs.Store(store_dir) as s:
        r = s.scrub()
        assert r["ok"] is False
        assert [b["id"] for b in r["broken"]] == [1, 2]
        assert len(r["quarantined"]) == 1 and set(r["quarantined"][0]) == {"segment", "offset"}
        assert r["unhealed"][0]["checkpoints"] == [1, 2] and r["healed"] == []
        # The next save of the same bytes heals; a scrub then finds every checkpoint intact.
        cs.save(s, {"frozen": frozen}, step=3)
        again = s.scrub()
        assert again["ok"] is True and again["broken"] == [] and again["checkpoints"] == 3
    with cs.Store(store_dir, read_only=True) as s:
        assert torch.equal(cs.load(s, id=1)["frozen"], frozen)
