"""The synthetic classes must be learnable: a label bug then shows up as chance accuracy."""

import numpy as np
import torch
from torch import nn

from prep.sample import SampleSpec, _image, plan_sample


def _tensors(plan, items):
    import io

    from PIL import Image

    xs, ys = [], []
    for stem, wnid in items:
        im = Image.open(io.BytesIO(_image(plan, stem, wnid))).convert("RGB").resize((32, 32))
        xs.append(torch.from_numpy(np.asarray(im)).permute(2, 0, 1).float() / 255)
        ys.append(plan.wnids.index(wnid))
    return torch.stack(xs), torch.tensor(ys)


def _accuracy(shuffle_labels: bool) -> float:
    torch.manual_seed(0)
    plan = plan_sample(SampleSpec(classes=10, train_per_class=30, val_per_class=10, size=48))
    x, y = _tensors(plan, [(s, w) for w, ss in plan.train.items() for s in ss])
    if shuffle_labels:  # what a label-mapping bug does
        y = y[torch.randperm(len(y))]
    xv, yv = _tensors(plan, plan.val.items())
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(15):
        for i in torch.randperm(len(x)).split(32):
            xb = x[i]
            if torch.rand(()) < 0.5:
                xb = xb.flip(3)
            loss = nn.functional.cross_entropy(model(xb), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return (model(xv).argmax(1) == yv).float().mean().item()


def test_small_cnn_learns_the_sample_and_chance_with_wrong_labels():
    assert _accuracy(shuffle_labels=False) > 0.9
    assert _accuracy(shuffle_labels=True) < 0.35
