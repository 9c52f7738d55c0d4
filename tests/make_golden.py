"""Regenerate tests/data/golden_tiny_losses.json (run when the model or driver changes on purpose):

    python -m tests.make_golden
"""

import json
import tempfile
from pathlib import Path

from glm52_train.data.prepare import prepare_data
from tests.conftest import GOLDEN_CORPUS, TOKENIZER
from tests.test_training import GOLDEN
from tests.train_helpers import losses, pretrain, tiny_run_config


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="glm52-golden-"))
    prefix = str(tmp / "golden")
    prepare_data([GOLDEN_CORPUS], prefix, TOKENIZER, workers=1)
    pretrain(tiny_run_config(tmp, prefix, train={"iters": 12, "eval_interval": 6}))
    got = losses(tmp / "run")
    GOLDEN.write_text(json.dumps({str(k): v for k, v in sorted(got.items())}, indent=2) + "\n")
    print(f"wrote {GOLDEN}: {got}")


if __name__ == "__main__":
    main()
