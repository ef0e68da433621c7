import pytest
import torch
from torch import nn

from train.config import TrainConfig
from train.engine import EpochTally, LossNotFinite, evaluate, train_one_epoch
from train.normalize import Normalize


def _setup():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batches = [(torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.uint8), torch.tensor([0, 1]))
               for _ in range(3)]
    return model, opt, scaler, batches


def test_non_finite_loss_stops_with_a_clear_error():
    model, opt, scaler, batches = _setup()
    cfg = TrainConfig(batch_size=2, log_every=1)

    def nan_loss(out, y):
        return nn.functional.cross_entropy(out, y) * float("nan")

    with pytest.raises(LossNotFinite, match="loss is nan at epoch 3 step 0"):
        train_one_epoch(model, batches, steps=3, optimizer=opt, scaler=scaler,
                        lr_at=lambda k: 0.1, tally=EpochTally.start(torch.device("cpu")),
                        criterion=nan_loss, norm=Normalize(torch.device("cpu"), False),
                        cfg=cfg, epoch=3, show=False)


def test_loader_ending_early_is_an_error():
    model, opt, scaler, batches = _setup()
    cfg = TrainConfig(batch_size=2, log_every=1)
    with pytest.raises(RuntimeError, match="the loader ended early"):
        train_one_epoch(model, batches, steps=5, optimizer=opt, scaler=scaler,
                        lr_at=lambda k: 0.1, tally=EpochTally.start(torch.device("cpu")),
                        criterion=nn.CrossEntropyLoss(),
                        norm=Normalize(torch.device("cpu"), False), cfg=cfg, epoch=0,
                        show=False)


def test_eval_count_mismatch_fails_loudly():
    model, *_, batches = _setup()
    loader = [(x, y, ["k1", "k2"], [("k1", 0, 0), ("k2", 0, 1)]) for x, y in batches]
    norm = Normalize(torch.device("cpu"), False)
    assert evaluate(model, loader, norm, num_samples=6, amp="none",
                    num_classes=4)["val_samples"] == 6
    with pytest.raises(RuntimeError, match="evaluated 6 samples across all ranks, the "
                                           "manifest has 7"):
        evaluate(model, loader, norm, num_samples=7, amp="none", num_classes=4)
