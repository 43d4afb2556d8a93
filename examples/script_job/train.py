"""A script job with a requirements.txt: `tinystats` is installed in the job, not here.

    python examples/vendor/build_wheelhouse.py /tmp/wheelhouse   # the operator, once, offline
    CUMULUS_CONTAINER_WHEELHOUSE=/tmp/wheelhouse cumulus up &     # (or container.wheelhouse)
    cumulus run examples/script_job/train.py --epochs 3

`cumulus run` ships this directory, finds requirements.txt beside the script, and the job
installs it (from the operator's wheelhouse: workers need no package index) before the script
starts.
"""

import argparse

import tinystats
from data import SAMPLES

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=2)
args = parser.parse_args()

for epoch in range(args.epochs):
    batch = [x * (epoch + 1) for x in SAMPLES]
    print(f"epoch {epoch}: mean {tinystats.mean(batch):.2f}, stdev {tinystats.stdev(batch):.2f}")
print(f"done with tinystats {tinystats.__version__}")
