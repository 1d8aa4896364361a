"""Submit training to Slurm with submitit (checkpointable: requeued and resumed on preemption/timeout).

    python launch/submit.py --config configs/x.yaml --nodes 2 --gpus-per-node 8 --partition gpu \
        --timeout-min 1440 optim.lr=1e-3

See pvt_dist/cluster/submitit_job.py for the options and the preemption flow.
"""

import sys

from pvt_dist.cluster.submitit_job import main

if __name__ == "__main__":
    sys.exit(main())
