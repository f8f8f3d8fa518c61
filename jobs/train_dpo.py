"""DPO training of the policy on a round's verified pairs (TRL DPOTrainer). No Spark: runs on GPU hosts.

    python jobs/train_dpo.py --set train.model=Qwen/Qwen2.5-7B-Instruct --set round=0          # one GPU / CPU
    accelerate launch --config_file infra/accelerate/zero3.yaml --num_processes 8 \\
        jobs/train_dpo.py --config my.yaml --set train.model=/models/policy-r0                 # multi-GPU

`cso train` runs the same. Configuration: the `train` section of cso_lib/config.py (beta 0.5, LoRA or full,
max_length and the share of pairs it may truncate, tracker).
"""

import json
import logging
import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, where jobs/select.py would shadow the standard
# library's `select` (imported by socket / selectors).
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

from cso_lib.entry import parse_args, setup_logging  # noqa: E402
from cso_lib.errors import CSOError  # noqa: E402
from cso_lib.train import train  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    try:
        result = train(parse_args(argv))
    except CSOError as e:
        logging.getLogger("cso").error("train_dpo failed: %s", e)
        sys.exit(2)
    print(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
