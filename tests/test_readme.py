"""The README's 20-line example runs as printed (with fewer steps)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs():
    text = README.read_text()
    block = re.search(r"## A program in 20 lines\n\n```python\n(.*?)```", text, re.S).group(1)
    assert "steps=2000" in block and len(block.strip().splitlines()) <= 25
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16
    y = torch.tensor(y)
    namespace = {
        "train_loader": DataLoader(TensorDataset(x[:200], y[:200]), batch_size=50, shuffle=True),
        "val_loader": DataLoader(TensorDataset(x[200:400], y[200:400]), batch_size=100),
    }
    exec(compile(block.replace("steps=2000", "steps=20"), str(README), "exec"), namespace)
    program, history = namespace["program"], namespace["history"]
    assert program.steps == {"program": 20, "classifier": 20, "hpo": 4}
    assert len(history["hpo"]) == 4 and "acc" in history["hpo"][0]
