"""`lightning-ood validate`: the held-out accuracy."""

from __future__ import annotations

import re

from tests.helpers import case_args as args
from tests.helpers import run_cli


def test_validate_prints_the_held_out_accuracy(case, capsys):
    tmp, data, ckpt, _ = case
    run_cli("validate", *args(tmp, data, "--ckpt_path", str(ckpt), "--data.val_split", "10", "--data.val_seed", "3"))
    out = " ".join(capsys.readouterr().out.split())
    assert re.search(r"Held-out accuracy on cifar10: \d+\.\d\d% \(10 training images held out by "
                     r"--data.init_args.val_split, seed 3\)\.", out), out  # fmt: skip
