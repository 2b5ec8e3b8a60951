"""One rank of tests/test_distributed.py, launched by torchrun: runs the cases and writes rank<N>.json."""
import json
import os
import sys

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ddp_cases  # noqa: E402
import trainer_cases  # noqa: E402


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {
        "scores": ddp_cases.run_scores(rank, world).to_dict(),
        "training": ddp_cases.run_training(rank, world),
        "trainer": trainer_cases.run_trainer_ddp(rank, world, os.path.join(out_dir, "trainer")),
        "laet": trainer_cases.run_trainer_laet_ddp(rank, world, os.path.join(out_dir, "laet")),
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
