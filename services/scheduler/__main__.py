import sys

from services.scheduler.app import Scheduler
from shared.main import run_service

sys.exit(run_service(Scheduler))
