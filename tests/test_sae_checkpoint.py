import json

import pytest
import torch

from csc.errors import CacheError
from csc.sae.checkpoint import load_checkpoint, save_checkpoint
from csc.sae.archs.relu import ReluConfig
from csc.sae.archs.topk import TopKConfig
from csc.sae.batch import ActivationBatch
from csc.sae.config import TrainerConfig
from csc.sae.synthetic import sparse_dictionary_batches
from csc.sae.trainer import Hook, Trainer

D, N_FEAT, B = 32, 48, 64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


CASES = {
    "relu_balance": (ReluConfig(d_in=D, dict_size=64),
                     dict(gamma=0.1, balance=True, balance_ema=0.5, hard_negatives=4)),
    "topk_auxk": (TopKConfig(d_in=D, dict_size=96, k=3, layer_norm=False),
                  dict(beta=0.0, gamma=0.05, revival="auxk", auxk_k=8, dead_window_tokens=3 * B)),
    "relu_in_batch_sampled_negatives": (ReluConfig(d_in=D, dict_size=64), dict(gamma=0.1, negatives=16)),
}


def in_batch(b: ActivationBatch) -> ActivationBatch:
    """The batch with partner rows instead of partner activations: rows 2k and 2k + 1 (one sequence) pair up."""
    return ActivationBatch(b.anchors, None, b.seq_id, b.position, partner_index=torch.arange(len(b)) ^ 1)


class Reports(Hook, list):
    def on_report(self, trainer, report):
        self.append({k: v for k, v in report.items() if k != "tokens_per_s"})  # wall-clock


@pytest.mark.parametrize("case", CASES)
def test_resume_continues_bit_for_bit(tmp_path, case):
    sae_cfg, extra = CASES[case]
    n = 40
    cfg = TrainerConfig(steps=n, lr=3e-3, lr_warmup_start=1e-3, lr_warmup_steps=30,
                        beta_warmup_steps=25, gamma_warmup_steps=25, log_every=5, device="cpu",
                        **extra)
    batches = list(sparse_dictionary_batches(D, N_FEAT, B, n, seed=2))
    if "in_batch" in case:
        batches = [in_batch(b) for b in batches]

    straight = Trainer(sae_cfg, cfg)
    logs_straight = Reports()
    straight.fit(batches, [logs_straight])

    first = Trainer(sae_cfg, cfg)
    logs_resumed = Reports()
    first.fit(batches[: n // 2 + 2], [logs_resumed])  # stops between two reports
    save_checkpoint(first, tmp_path / "ckpt")
    del first
    resumed = load_checkpoint(tmp_path / "ckpt")
    assert resumed.batches_consumed == n // 2 + 2
    resumed.fit(batches[resumed.batches_consumed:], [logs_resumed])

    for name, t in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], t), name
    assert logs_resumed == logs_straight
    assert torch.equal(resumed.dead.tokens_since_fired, straight.dead.tokens_since_fired)
    assert [t.state_dict() for t in resumed.terms] == [t.state_dict() for t in straight.terms]
    if case == "topk_auxk":
        assert any(m["dead_frac"] > 0 for m in logs_straight)  # the dead state mattered


def trained(steps=3):
    t = Trainer(ReluConfig(d_in=D, dict_size=64), TrainerConfig(steps=steps, device="cpu"))
    t.fit(sparse_dictionary_batches(D, N_FEAT, B, steps))
    return t


def test_checkpoint_is_safetensors_and_json_only(tmp_path):
    t = trained()
    save_checkpoint(t, tmp_path / "c")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "trainer_state.json", "trainer_state.safetensors"]
    meta = json.loads((tmp_path / "c" / "trainer_state.json").read_text())
    assert meta["state"]["step"] == 3 and meta["state"]["model"]["W_dec"] == {"tensor": "model.W_dec"}
    back = load_checkpoint(tmp_path / "c")
    assert back.done and back.batches_consumed == 3 and back.last_report == t.last_report
    assert back.fit(iter([])) == t.last_report  # nothing left to do; the result stands


def test_broken_checkpoints_are_refused(tmp_path):
    with pytest.raises(CacheError):
        load_checkpoint(tmp_path / "missing")
    save_checkpoint(trained(), tmp_path / "c")
    state = tmp_path / "c" / "trainer_state.json"
    meta = json.loads(state.read_text())
    meta["state"]["optimizer"]["state"]["0"]["exp_avg"] = {"tensor": "not_there"}
    state.write_text(json.dumps(meta))
    with pytest.raises(CacheError, match="not_there"):
        load_checkpoint(tmp_path / "c")


def test_a_flipped_byte_in_the_tensors_is_refused(tmp_path):
    save_checkpoint(trained(), tmp_path / "c")
    f = tmp_path / "c" / "trainer_state.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0x01  # inside the last tensor: safetensors itself would load it without complaint
    f.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="trainer_state.safetensors fails its checksum"):
        load_checkpoint(tmp_path / "c")
