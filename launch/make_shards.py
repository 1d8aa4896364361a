"""Write WebDataset shards + DALI indexes: thin wrapper of `python -m pvt_dist.data.make_shards`.

python launch/make_shards.py fashion-mnist --out data/fashion_mnist
python launch/make_shards.py imagenet --root /data/ILSVRC2012 --out data/in1k --val-labels LOC_val.csv
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pvt_dist.data.make_shards import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
