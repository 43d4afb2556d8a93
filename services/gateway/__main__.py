import sys

from services.gateway.app import Gateway
from shared.main import run_service

sys.exit(run_service(Gateway))
