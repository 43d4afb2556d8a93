import sys

from services.runner.app import Runner
from shared.main import run_service

sys.exit(run_service(Runner))
