import sys

from services.partitioner.app import Partitioner
from shared.main import run_service

sys.exit(run_service(Partitioner))
